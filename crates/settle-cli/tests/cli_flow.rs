//! Flow control through the CLI on the embedded backend: a throttled
//! answer never uses an attempt nor fails an item, `--rate` paces the run,
//! a busy key does not hold another back, and a run throttled past
//! `--max-throttle-wait` stops with its items pending.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[test]
fn throttled_items_use_no_attempt_and_never_fail() {
    let env = Env::new();
    let mut items: Vec<(String, &str)> = (0..60).map(|i| (format!("ok{i}"), "ok")).collect();
    items.extend((0..4).map(|i| (format!("t{i}"), "throttled:3")));
    let refs: Vec<(&str, &str)> = items.iter().map(|(i, s)| (i.as_str(), *s)).collect();
    let file = env.scripts("items.jsonl", &refs);
    // One receive each: a throttle that used an attempt would fail the item.
    let run = env.run(&file, &["--max-receives", "1"]);
    assert_run(&run, "succeeded", 64, 64, 0, 0);
    let id = run_id(&run);
    assert_eq!(run["throttled"], 12, "{run}");
    for i in 0..4 {
        let item = env.show(&id, &format!("t{i}"));
        assert_eq!(
            (&item["attempts"], &item["throttled"], &item["status"]),
            (&json!(1), &json!(3), &json!("succeeded")),
            "{item}"
        );
        assert_eq!(item["history"].as_array().unwrap().len(), 1, "{item}");
    }
    let human = env.settle(&["status", &id]);
    assert!(
        human
            .stdout
            .contains("Throttled 12 times by the service called"),
        "{}",
        human.stdout
    );
    // Nothing left behind: no dead letter, no message.
    assert_eq!(env.failures(&id)["failures"], json!([]));
}

#[test]
fn a_rate_paces_the_run_and_is_kept_with_it() {
    let env = Env::new();
    let refs: Vec<(String, &str)> = (0..30).map(|i| (format!("i{i}"), "ok")).collect();
    let refs: Vec<(&str, &str)> = refs.iter().map(|(i, s)| (i.as_str(), *s)).collect();
    let file = env.scripts("items.jsonl", &refs);
    let started = Instant::now();
    let run = env.run(&file, &["--rate", "20/s"]);
    let took = started.elapsed();
    assert_run(&run, "succeeded", 30, 30, 0, 0);
    // 30 starts at 20 per second, after a burst of 2: at least 1.4 s.
    assert!(took >= Duration::from_millis(1400), "took {took:?}");
}

#[test]
fn rates_and_keys_are_checked_before_anything_is_created() {
    let env = Env::new();
    let file = env.scripts("items.jsonl", &[("a", "ok")]);
    for (flags, says) in [
        (vec!["--rate", "0/s"], "above 0"),
        (vec!["--rate", "5/week"], "unknown unit"),
        (vec!["--key", "customer"], "JSON pointer"),
        (vec!["--key-concurrency", "2"], "--key"),
        (vec!["--max-throttle-wait", "soon"], "duration"),
    ] {
        let mut args = vec!["run", "--items", file.as_str()];
        args.extend(&flags);
        let out = env.settle(&args);
        out.expect_code(2).stderr_has(says);
        assert!(!env.db().exists(), "{flags:?} created the database");
    }
}

/// Items of a hot key, queued first, do not hold back a cold key's items
/// queued behind them: the hot key takes at most half of the places.
#[test]
fn a_hot_key_does_not_hold_a_cold_key_back() {
    let env = Env::new();
    let mut lines = String::new();
    for i in 0..240 {
        lines.push_str(&format!(
            "{}\n",
            json!({"id": format!("hot{i}"), "payload": {"customer": "hot", "script": "sleep:200"}})
        ));
    }
    for i in 0..6 {
        lines.push_str(&format!(
            "{}\n",
            json!({"id": format!("cold{i}"), "payload": {"customer": "cold", "script": "sleep:200"}})
        ));
    }
    let file = env.write("items.jsonl", lines);
    let args = [
        "run",
        "--items",
        file.as_str(),
        "--json",
        "--concurrency",
        "8",
        "--key",
        "/customer",
    ];
    let run = env.ok_json(&args);
    assert_run(&run, "succeeded", 246, 246, 0, 0);
    let id = run_id(&run);
    let ended = |item: &str| -> u64 {
        let v: Value = env.show(&id, item);
        let h = &v["history"][0];
        let started = humantime::parse_rfc3339(h["started_at"].as_str().unwrap()).unwrap();
        let ms = started
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        ms + h["duration_ms"].as_u64().unwrap()
    };
    let first = (0..240).map(|i| ended(&format!("hot{i}"))).min().unwrap();
    let last_hot = (0..240).map(|i| ended(&format!("hot{i}"))).max().unwrap();
    let last_cold = (0..6).map(|i| ended(&format!("cold{i}"))).max().unwrap();
    // At 4 places for the hot key, its 240 items of 200 ms take 12 s; the
    // cold key's are done within the first few seconds, not after them.
    assert!(
        last_cold - first < (last_hot - first) / 3,
        "cold done at {} ms, hot at {} ms",
        last_cold - first,
        last_hot - first
    );
}

#[test]
fn a_run_throttled_past_its_wait_stops_with_its_items_pending() {
    let env = Env::new();
    let file = env.scripts(
        "items.jsonl",
        &[("a", "throttled:100000"), ("b", "throttled:100000")],
    );
    let args = [
        "run",
        "--items",
        file.as_str(),
        "--json",
        "--max-throttle-wait",
        "2s",
    ];
    let child = env.spawn(&args);
    let out = wait_within(child, &args, Duration::from_secs(60));
    out.expect_code(75)
        .stderr_has("stopped waiting")
        .stderr_has("settle resume ");
    let v = out.json();
    assert_eq!((&v["pending"], &v["failed"]), (&json!(2), &json!(0)), "{v}");
    assert!(v["throttled"].as_u64().unwrap() >= 2, "{v}");
    assert_eq!(
        v["throttled_stop"]["resume"],
        format!("settle resume {}", run_id(&v))
    );
    // Resumable: the items are pending, not failed, and their messages wait.
    let status = env.status(&run_id(&v));
    assert_eq!(
        (&status["pending"], &status["failed"]),
        (&json!(2), &json!(0))
    );
}
