//! End-to-end tests of `settle run`, `status`, `failures`, `show`, `runs`,
//! `load`/`dispatch`/`resume` and `generate`, on the real binary.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::Read;
use std::process::Child;
use std::time::Duration;

/// One item of every scripted behaviour, plus two without a script.
fn every_script(env: &Env) -> String {
    let mut text = String::new();
    for (id, script) in [
        ("ok", "ok"),
        ("perm", "permanent"),
        ("r2", "retryable:2"),
        ("r5", "retryable:5"),
        ("panic", "panic"),
        ("sleep", "sleep:50"),
        ("fly", "fly"),
    ] {
        text.push_str(&format!(
            "{}\n",
            json!({"id": id, "payload": {"script": script}})
        ));
    }
    text.push_str("{\"id\":\"noscript\",\"payload\":{\"user\":\"u1\"}}\n");
    text.push_str("{\"id\":\"nopayload\"}\n");
    env.write("every.jsonl", text)
}

/// The tally of [`every_script`] with max receives 3.
const EVERY_TOTAL: u64 = 9;
const EVERY_SUCCEEDED: u64 = 5; // ok, r2, sleep, noscript, nopayload
const EVERY_FAILED: u64 = 4; // perm, r5, panic, fly

fn every_failures(run: &str) -> Value {
    json!({
        "run_id": run,
        "failures": [
            failure("fly", 1, "unknown script \"fly\""),
            failure("panic", 3, "panic: scripted panic for item panic"),
            failure("perm", 1, "permanent failure (scripted)"),
            failure("r5", 3, "retryable failure 3 of 5 (scripted)"),
        ]
    })
}

const ITEM_KEYS: [&str; 9] = [
    "attempts",
    "history",
    "item_id",
    "last_error",
    "output",
    "run_id",
    "status",
    "throttled",
    "waiting_until",
];
const HISTORY_KEYS: [&str; 10] = [
    "attempt",
    "duration_ms",
    "error",
    "kind",
    "log",
    "message_id",
    "outcome",
    "output",
    "started_at",
    "terminal",
];

fn assert_item_shape(v: &Value, run: &str, item: &str) {
    assert_eq!(keys(v), ITEM_KEYS.map(String::from).to_vec(), "{v}");
    assert_eq!(v["run_id"], run);
    assert_eq!(v["item_id"], item);
    for entry in v["history"].as_array().unwrap() {
        assert_eq!(
            keys(entry),
            HISTORY_KEYS.map(String::from).to_vec(),
            "{entry}"
        );
    }
}

#[test]
fn every_script_settles_as_scripted() {
    let env = Env::new();
    let items = every_script(&env);
    let out = env.settle(&[
        "run",
        "--items",
        &items,
        "--json",
        "--max-receives",
        "3",
        "--retry-delay-ms",
        "20",
        "--visibility-timeout",
        "5",
    ]);
    out.expect_code(0);
    let run = out.json();
    assert_run(
        &run,
        "partial",
        EVERY_TOTAL,
        EVERY_SUCCEEDED,
        EVERY_FAILED,
        0,
    );
    let id = run_id(&run);
    out.stderr_has(&format!("Run {id} started"));
    assert!(
        !out.stderr.contains("panicked at"),
        "a contained processor panic is not printed:\n{}",
        out.stderr
    );
    assert_eq!(env.status(&id), run, "status agrees with the run's output");

    // Succeeded on the first attempt.
    for item in ["ok", "noscript", "nopayload", "sleep"] {
        let v = env.show(&id, item);
        assert_item_shape(&v, &id, item);
        assert_eq!(v["status"], "succeeded", "{item}: {v}");
        assert_eq!(v["attempts"], 1, "{item}: {v}");
        assert_eq!(v["last_error"], Value::Null, "{item}: {v}");
        assert_eq!(history(&v), vec![h(1, "succeeded", None, false)], "{item}");
        assert_eq!(v["history"][0]["error"], Value::Null);
    }
    let sleep = env.show(&id, "sleep");
    assert!(
        sleep["history"][0]["duration_ms"].as_u64().unwrap() >= 50,
        "sleep:50 takes at least 50 ms: {sleep}"
    );

    // Permanent: one attempt, terminal at once.
    let perm = env.show(&id, "perm");
    assert_item_shape(&perm, &id, "perm");
    assert_eq!(perm["status"], "failed");
    assert_eq!(perm["attempts"], 1);
    assert_eq!(perm["last_error"], "permanent failure (scripted)");
    assert_eq!(
        history(&perm),
        vec![h(1, "failed", Some("permanent"), true)]
    );
    assert_eq!(perm["history"][0]["error"], "permanent failure (scripted)");

    // retryable:2 succeeds on its third attempt.
    let r2 = env.show(&id, "r2");
    assert_eq!(r2["status"], "succeeded");
    assert_eq!(r2["attempts"], 3);
    assert_eq!(
        history(&r2),
        vec![
            h(1, "failed", Some("retryable"), false),
            h(2, "failed", Some("retryable"), false),
            h(3, "succeeded", None, false),
        ]
    );
    assert_eq!(
        r2["history"][0]["error"],
        "retryable failure 1 of 2 (scripted)"
    );
    assert_eq!(
        r2["history"][1]["error"],
        "retryable failure 2 of 2 (scripted)"
    );
    let msgs: BTreeSet<&str> = r2["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        msgs.len(),
        3,
        "each retry is a message of its own, carrying the attempt count: {r2}"
    );

    // retryable:5 outlasts max receives 3.
    let r5 = env.show(&id, "r5");
    assert_eq!(r5["status"], "failed");
    assert_eq!(r5["attempts"], 3);
    assert_eq!(r5["last_error"], "retryable failure 3 of 5 (scripted)");
    assert_eq!(
        history(&r5),
        vec![
            h(1, "failed", Some("retryable"), false),
            h(2, "failed", Some("retryable"), false),
            h(3, "failed", Some("retryable"), true),
        ]
    );

    // A panic is retryable and fails after max receives.
    let panic = env.show(&id, "panic");
    assert_eq!(panic["status"], "failed");
    assert_eq!(panic["attempts"], 3);
    assert_eq!(
        history(&panic),
        vec![
            h(1, "failed", Some("retryable"), false),
            h(2, "failed", Some("retryable"), false),
            h(3, "failed", Some("retryable"), true),
        ]
    );
    for a in panic["history"].as_array().unwrap() {
        assert!(a["error"].as_str().unwrap().starts_with("panic: "), "{a}");
    }
    assert_eq!(panic["last_error"], "panic: scripted panic for item panic");

    // An unknown script is a permanent failure.
    let fly = env.show(&id, "fly");
    assert_eq!(fly["status"], "failed");
    assert_eq!(fly["attempts"], 1);
    assert_eq!(fly["last_error"], "unknown script \"fly\"");
    assert_eq!(history(&fly), vec![h(1, "failed", Some("permanent"), true)]);

    assert_eq!(env.failures(&id), every_failures(&id));
}

#[test]
fn max_receives_one_fails_retryable_items_at_once() {
    let env = Env::new();
    let items = env.scripts(
        "i.jsonl",
        &[("a", "retryable:1"), ("b", "ok"), ("c", "panic")],
    );
    let run = env.run(&items, &["--max-receives", "1"]);
    assert_run(&run, "partial", 3, 1, 2, 0);
    let id = run_id(&run);
    assert_eq!(
        env.failures(&id),
        json!({"run_id": id, "failures": [
            failure("a", 1, "retryable failure 1 of 1 (scripted)"),
            failure("c", 1, "panic: scripted panic for item c"),
        ]})
    );
    assert_eq!(
        history(&env.show(&id, "a")),
        vec![h(1, "failed", Some("retryable"), true)]
    );
}

#[test]
fn human_output_summarises_the_run() {
    let env = Env::new();
    let items = env.scripts("i.jsonl", &[("a", "ok"), ("b", "permanent"), ("c", "ok")]);
    let mut args = vec!["run", "--items", &items];
    args.extend(FAST);
    let out = env.settle(&args);
    out.expect_code(0);
    assert!(
        out.stdout
            .contains("Processed 3 items with 2 successes and 1 errors"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains(": partial"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains("b  after 1 attempt: permanent failure (scripted)"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("settle redrive r"), "{}", out.stdout);
}

#[test]
fn json_shapes_of_run_status_resume_and_failures() {
    let env = Env::new();
    let items = env.scripts("i.jsonl", &[("a", "ok"), ("b", "permanent")]);
    let run = env.run(&items, &[]);
    assert_run(&run, "partial", 2, 1, 1, 0);
    let id = run_id(&run);

    let status = env.status(&id);
    assert_run(&status, "partial", 2, 1, 1, 0);
    assert_eq!(status, run);

    let mut args = vec!["resume", &id, "--json"];
    args.extend(FAST);
    let resumed = env.ok_json(&args);
    assert_run(&resumed, "partial", 2, 1, 1, 0);
    assert_eq!(resumed, run, "resuming a settled run changes nothing");

    let f = env.failures(&id);
    assert_eq!(keys(&f), vec!["failures", "run_id"]);
    assert_eq!(f["run_id"], id.as_str());
    let list = f["failures"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(keys(&list[0]), vec!["attempts", "error", "item_id"]);
    assert_eq!(list[0], failure("b", 1, "permanent failure (scripted)"));

    let runs = env.runs();
    assert_eq!(keys(&runs), vec!["runs"]);
    assert_eq!(runs, json!({ "runs": [run] }));
}

#[test]
fn failures_of_a_clean_run_is_an_empty_list() {
    let env = Env::new();
    let items = env.scripts("i.jsonl", &[("a", "ok"), ("b", "ok")]);
    let run = env.run(&items, &[]);
    assert_run(&run, "succeeded", 2, 2, 0, 0);
    let id = run_id(&run);
    assert_eq!(env.failures(&id), json!({"run_id": id, "failures": []}));
}

#[test]
fn tolerated_failure_percent_decides_failed_or_partial() {
    let env = Env::new();
    let mut ten: Vec<(String, &str)> = (1..=8).map(|i| (format!("ok-{i}"), "ok")).collect();
    ten.push(("bad-1".into(), "permanent"));
    ten.push(("bad-2".into(), "permanent"));
    let ten: Vec<(&str, &str)> = ten.iter().map(|(i, s)| (i.as_str(), *s)).collect();
    let items = env.scripts("ten.jsonl", &ten);

    let strict = env.run(&items, &["--tolerated-failure-percent", "10"]);
    assert_run(&strict, "failed", 10, 8, 2, 0);
    let at = env.run(&items, &["--tolerated-failure-percent", "20"]);
    assert_run(&at, "partial", 10, 8, 2, 0);
    let loose = env.run(&items, &[]);
    assert_run(&loose, "partial", 10, 8, 2, 0);

    let clean: Vec<(String, &str)> = (1..=10).map(|i| (format!("ok-{i}"), "ok")).collect();
    let clean: Vec<(&str, &str)> = clean.iter().map(|(i, s)| (i.as_str(), *s)).collect();
    let clean = env.scripts("clean.jsonl", &clean);
    let ok = env.run(&clean, &["--tolerated-failure-percent", "0"]);
    assert_run(&ok, "succeeded", 10, 10, 0, 0);

    let all_bad = env.scripts("bad.jsonl", &[("x", "permanent"), ("y", "permanent")]);
    let bad = env.run(&all_bad, &["--tolerated-failure-percent", "100"]);
    assert_run(&bad, "failed", 2, 0, 2, 0);

    // The status is derived from the stored config, not just printed once.
    assert_eq!(env.status(&run_id(&strict))["status"], "failed");
    assert_eq!(env.status(&run_id(&at))["status"], "partial");
}

#[test]
fn status_without_a_run_id_is_the_latest_and_runs_are_newest_first() {
    let env = Env::new();
    let out = env.settle(&["status", "--json"]);
    out.expect_code(2).stderr_has("no database at");

    let a_items = env.scripts("a.jsonl", &[("a1", "ok"), ("a2", "permanent")]);
    let b_items = env.scripts("b.jsonl", &[("b1", "ok"), ("b2", "ok"), ("b3", "ok")]);
    let a = env.run(&a_items, &[]);
    std::thread::sleep(Duration::from_millis(5));
    let b = env.run(&b_items, &[]);
    assert_run(&a, "partial", 2, 1, 1, 0);
    assert_run(&b, "succeeded", 3, 3, 0, 0);
    assert_ne!(run_id(&a), run_id(&b));

    assert_eq!(env.ok_json(&["status", "--json"]), b, "latest run");
    assert_eq!(env.status(&run_id(&a)), a);
    assert_eq!(env.runs(), json!({ "runs": [b.clone(), a.clone()] }));
    assert_eq!(
        env.ok_json(&["runs", "--limit", "1", "--json"]),
        json!({ "runs": [b.clone()] })
    );

    // Resume without a run id resumes the latest (already settled) run.
    let mut args = vec!["resume", "--json"];
    args.extend(FAST);
    assert_eq!(env.ok_json(&args), b);
}

#[test]
fn show_and_status_refuse_unknown_ids() {
    let env = Env::new();
    let items = env.scripts("i.jsonl", &[("a", "ok")]);
    let run = env.run(&items, &[]);
    let id = run_id(&run);

    let out = env.settle(&["show", &id, "ghost", "--json"]);
    out.expect_code(2).stderr_has("\"ghost\"");
    assert!(out.json_error("input").contains("\"ghost\""));

    let missing = "r20200101T000000Z-000000";
    env.settle(&["show", missing, "a", "--json"])
        .expect_code(2)
        .stderr_has(&format!("run {missing} not found"));
    env.settle(&["status", missing, "--json"])
        .expect_code(2)
        .stderr_has("not found");
    env.settle(&["failures", missing, "--json"])
        .expect_code(2)
        .stderr_has("not found");
    env.settle(&["status", "not-a-run", "--json"])
        .expect_code(2)
        .stderr_has("not a Settle run id");
    env.settle(&["show", &id, "", "--json"])
        .expect_code(2)
        .stderr_has("id is empty");
    assert_eq!(env.runs(), json!({ "runs": [run] }));
}

#[test]
fn ids_recur_across_runs() {
    let env = Env::new();
    let items = every_script(&env);
    let first = env.run(&items, &[]);
    let second = env.run(&items, &[]);
    assert_run(
        &first,
        "partial",
        EVERY_TOTAL,
        EVERY_SUCCEEDED,
        EVERY_FAILED,
        0,
    );
    assert_run(
        &second,
        "partial",
        EVERY_TOTAL,
        EVERY_SUCCEEDED,
        EVERY_FAILED,
        0,
    );
    let (a, b) = (run_id(&first), run_id(&second));
    assert_ne!(a, b);
    // Each run keeps its own ledger: attempts do not add up across runs.
    for run in [&a, &b] {
        assert_eq!(env.failures(run), every_failures(run));
        let r2 = env.show(run, "r2");
        assert_eq!(r2["attempts"], 3, "{r2}");
        assert_eq!(r2["status"], "succeeded", "{r2}");
    }
    assert_eq!(env.runs(), json!({ "runs": [second, first] }));
}

#[test]
fn load_dispatch_resume_settles_with_exact_tally() {
    let env = Env::new();
    let items = every_script(&env);
    let loaded = env.ok_json(&["load", "--items", &items, "--json"]);
    assert_eq!(
        loaded,
        json!({"loaded": EVERY_TOTAL, "pending": EVERY_TOTAL})
    );
    env.assert_no_runs();

    // The same ids cannot be loaded twice while pending.
    env.settle(&["load", "--items", &items, "--json"])
        .expect_code(2)
        .stderr_has("already pending from an earlier load");

    let dispatched = env.ok_json(&["dispatch", "--max-receives", "3", "--json"]);
    assert_run(&dispatched, "running", EVERY_TOTAL, 0, 0, EVERY_TOTAL);
    let id = run_id(&dispatched);
    assert_eq!(env.status(&id), dispatched);

    let mut args = vec!["resume", &id, "--json"];
    args.extend(FAST);
    let resumed = env.ok_json(&args);
    assert_run(
        &resumed,
        "partial",
        EVERY_TOTAL,
        EVERY_SUCCEEDED,
        EVERY_FAILED,
        0,
    );
    assert_eq!(run_id(&resumed), id);
    assert_eq!(env.failures(&id), every_failures(&id));
    assert_eq!(env.status(&id), resumed);

    // Once dispatched, the same ids load again for a later run.
    let again = env.ok_json(&["load", "--items", &items, "--json"]);
    assert_eq!(
        again,
        json!({"loaded": EVERY_TOTAL, "pending": EVERY_TOTAL})
    );
}

#[test]
fn run_takes_in_items_loaded_earlier() {
    let env = Env::new();
    let early = env.scripts("early.jsonl", &[("e1", "ok"), ("e2", "permanent")]);
    let late = env.scripts("late.jsonl", &[("l1", "ok"), ("l2", "ok"), ("l3", "ok")]);
    env.ok_json(&["load", "--items", &early, "--json"]);
    let mut args = vec!["run", "--items", &late, "--json"];
    args.extend(FAST);
    let out = env.settle(&args);
    out.expect_code(0)
        .stderr_has("note: 2 items loaded earlier were pending and join this run");
    assert_run(&out.json(), "partial", 5, 4, 1, 0);
}

/// `settle run` and the `settle status` polling it open a new database file
/// at the same moment. Both race to switch it to WAL and create the schema;
/// SQLite answers one "database is locked" at once rather than wait, or the
/// half-made schema reads as another program's. The open retries BUSY and
/// reads the file's identity in one statement; this test repeats the race
/// (two statuses started first) so that a gap in either shows.
#[test]
fn a_run_opens_its_new_database_beside_concurrent_status_calls() {
    for round in 0..60 {
        let env = Env::new();
        let items = env.scripts("i.jsonl", &[("a", "ok"), ("b", "ok")]);
        let mut args = vec!["run", "--items", &items, "--json"];
        args.extend(FAST);
        let mut statuses: Vec<_> = (0..2).map(|_| env.spawn(&["status", "--json"])).collect();
        let run = env.spawn(&args);
        statuses.push(env.spawn(&["status", "--json"]));
        for s in statuses {
            // "no runs yet" (exit 1) is fine; failing to open is not.
            let out = wait(s, &["status", "--json"]);
            assert!(
                !out.stderr.contains("locked") && !out.stderr.contains("not a Settle database"),
                "round {round}: status: {}",
                out.stderr
            );
        }
        let out = wait(run, &args);
        out.expect_code(0);
        assert_run(&out.json(), "succeeded", 2, 2, 0, 0);
    }
}

/// Polls `settle status --json` (the latest run) until `done` holds, while
/// `child` (the `settle run` under test) works. If the child ends first, or
/// the state never comes, the panic shows what the child said.
fn wait_for_status(env: &Env, child: &mut Child, done: impl Fn(&Value) -> bool) -> Value {
    let started = std::time::Instant::now();
    loop {
        let out = env.settle(&["status", "--json"]);
        if out.code == 0 {
            let v = out.json();
            if done(&v) {
                return v;
            }
        }
        let exited = child.try_wait().unwrap();
        if exited.is_some() || started.elapsed() >= Duration::from_secs(60) {
            let _ = child.kill();
            let status = child.wait().unwrap();
            let mut said = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut said);
            }
            panic!(
                "status never got there in {:?}; last: {} {}; the child ({status}, {}) said: {said}",
                started.elapsed(),
                out.stdout,
                out.stderr,
                if exited.is_some() { "exited by itself" } else { "killed" },
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn interrupted_run_resumes_without_repeating_attempts() {
    let env = Env::new();
    // Batch size 1 and FIFO delivery: once `o` has succeeded, both sleeping
    // items have been received and are in flight.
    let items = env.scripts(
        "i.jsonl",
        &[("s1", "sleep:4000"), ("s2", "sleep:4000"), ("o", "ok")],
    );
    // Sleeps long enough that a loaded machine still sees the in-between state.
    let args = vec![
        "run",
        "--items",
        &items,
        "--json",
        "--batch-size",
        "1",
        "--retry-delay-ms",
        "20",
        "--visibility-timeout",
        "10",
    ];
    let mut child = env.spawn(&args);
    let before = wait_for_status(&env, &mut child, |v| v["succeeded"] == 1);
    assert_eq!(before["pending"], 2, "{before}");
    let killed = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = wait(child, &args);
    out.expect_code(130);
    let run = out.json();
    assert_eq!(keys(&run), RUN_KEYS.map(String::from).to_vec(), "{run}");
    let id = run_id(&run);
    assert_eq!(run_id(&before), id);
    assert_eq!(run["total"], 3, "{run}");
    out.stderr_has(&format!("continue with: settle resume {id}"));

    let mut args = vec!["resume", &id, "--json"];
    args.extend(FAST);
    let resumed = env.ok_json(&args);
    assert_run(&resumed, "succeeded", 3, 3, 0, 0);
    // The in-flight attempts finished on the way out; none ran twice.
    for item in ["s1", "s2", "o"] {
        let v = env.show(&id, item);
        assert_eq!(history(&v), vec![h(1, "succeeded", None, false)], "{v}");
    }
}

#[test]
fn killed_run_resumes_and_redelivers_after_the_visibility_timeout() {
    let env = Env::new();
    // Sleeps long enough that a loaded machine still sees the in-between state.
    let items = env.scripts("i.jsonl", &[("s1", "sleep:4000"), ("o", "ok")]);
    let args = [
        "run",
        "--items",
        &items,
        "--json",
        "--batch-size",
        "1",
        "--visibility-timeout",
        "10",
        "--retry-delay-ms",
        "20",
    ];
    let mut child = env.spawn(&args);
    // `o` done means `s1` (sent first) is in flight, sleeping.
    let before = wait_for_status(&env, &mut child, |v| v["succeeded"] == 1);
    child.kill().unwrap();
    let out = wait(child, &args);
    assert_ne!(out.code, 0);
    let id = run_id(&before);
    assert_run(&env.status(&id), "running", 2, 1, 0, 1);

    let resumed = env.ok_json(&[
        "resume",
        &id,
        "--json",
        "--visibility-timeout",
        "10",
        "--retry-delay-ms",
        "20",
    ]);
    assert_run(&resumed, "succeeded", 2, 2, 0, 0);
    // The killed attempt never reported: nothing knows its outcome, so the
    // redelivery runs it again, under the same number.
    let s1 = env.show(&id, "s1");
    assert_eq!(s1["attempts"], 1, "{s1}");
    assert_eq!(history(&s1), vec![h(1, "succeeded", None, false)]);
    assert_eq!(
        history(&env.show(&id, "o")),
        vec![h(1, "succeeded", None, false)]
    );
}

#[test]
fn an_item_outliving_the_visibility_timeout_times_out_and_is_retried() {
    let env = Env::new();
    let items = env.scripts("i.jsonl", &[("slow", "sleep:5000"), ("o", "ok")]);
    let run = env.ok_json(&[
        "run",
        "--items",
        &items,
        "--json",
        "--max-receives",
        "2",
        "--visibility-timeout",
        "1",
        "--retry-delay-ms",
        "20",
        "--batch-size",
        "1",
    ]);
    assert_run(&run, "partial", 2, 1, 1, 0);
    let id = run_id(&run);
    let slow = env.show(&id, "slow");
    assert_eq!(slow["status"], "failed", "{slow}");
    let hist = history(&slow);
    // The item timeout is half the visibility timeout, so the timed-out
    // attempt reports before its message can reappear. Under heavy load a
    // receive past the limit may still record "no outcome"; either way the
    // item fails once.
    assert_eq!(hist[0], h(1, "failed", Some("retryable"), false), "{slow}");
    assert_eq!(slow["history"][0]["error"], "timed out after 500 ms");
    assert!(
        hist.last().unwrap().3,
        "the last attempt is terminal: {slow}"
    );
    assert!(hist.len() >= 2, "{slow}");
    let f = env.failures(&id);
    assert_eq!(f["failures"].as_array().unwrap().len(), 1, "{f}");
    assert_eq!(f["failures"][0]["item_id"], "slow");
}

/// How many items of a generated file fail with max receives 3.
fn expected_failures(jsonl: &str) -> u64 {
    jsonl
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let script = v["payload"]["script"].as_str().unwrap_or("ok").to_owned();
            match script.as_str() {
                "ok" | "panic" | "permanent" => u64::from(script != "ok"),
                s if s.starts_with("sleep:") => 0,
                s if s.starts_with("retryable:") => {
                    let n: u64 = s["retryable:".len()..].parse().unwrap();
                    u64::from(n >= 3)
                }
                _ => 1,
            }
        })
        .sum()
}

#[test]
fn generate_is_deterministic_per_seed() {
    let env = Env::new();
    let a = env.settle(&["generate", "--count", "200", "--seed", "7"]);
    a.expect_code(0);
    let b = env.settle(&["generate", "--count", "200", "--seed", "7"]);
    let c = env.settle(&["generate", "--count", "200", "--seed", "8"]);
    assert_eq!(a.stdout, b.stdout);
    assert_ne!(a.stdout, c.stdout);
    assert_eq!(a.stdout.lines().count(), 200);
    let bench = env.settle(&["generate", "--count", "50", "--mix", "bench"]);
    bench.expect_code(0);
    assert_eq!(bench.stdout.lines().count(), 50);
    for l in bench.stdout.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        let s = v["payload"]["script"].as_str().unwrap();
        assert!(s == "ok" || s == "permanent", "{l}");
    }
    assert!(!env.db().exists(), "generate does not touch the database");
}

#[test]
fn three_thousand_generated_items_all_settle() {
    let env = Env::new();
    let gen = env.settle(&["generate", "--count", "3000", "--mix", "demo"]);
    gen.expect_code(0);
    let ids: BTreeSet<String> = gen
        .stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 3000, "3000 lines with unique ids");
    let failing = expected_failures(&gen.stdout);
    assert!(failing > 0 && failing < 3000, "{failing}");
    let items = env.write("demo.jsonl", &gen.stdout);

    let run = env.ok_json(&[
        "run",
        "--items",
        &items,
        "--json",
        "--retry-delay-ms",
        "10",
        "--visibility-timeout",
        "5",
    ]);
    let succeeded = run["succeeded"].as_u64().unwrap();
    let failed = run["failed"].as_u64().unwrap();
    assert_eq!(succeeded + failed, 3000, "{run}");
    assert_eq!(run["pending"], 0, "{run}");
    assert_run(&run, "partial", 3000, 3000 - failing, failing, 0);
    let id = run_id(&run);
    let f = env.failures(&id);
    assert_eq!(f["failures"].as_array().unwrap().len() as u64, failing);
}

#[test]
fn run_reads_items_from_stdin() {
    use std::io::Write;
    let env = Env::new();
    let mut args = vec!["run", "--items", "-", "--json"];
    args.extend(FAST);
    let mut child = env
        .command(&args)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"{\"id\":\"a\"}\n{\"id\":\"b\",\"payload\":{\"script\":\"permanent\"}}\n")
        .unwrap();
    drop(stdin);
    let out = wait(child, &args);
    out.expect_code(0);
    assert_run(&out.json(), "partial", 2, 1, 1, 0);
}

/// Ids reach the terminal with their bidi controls, separators and other
/// invisible characters escaped (U+202E would show `\u{202e}gnp.exe` as
/// `exe.png`); `--json` keeps them exact.
#[test]
fn terminal_output_escapes_bidi_controls_and_separators() {
    let env = Env::new();
    let spoof = "\u{202e}gnp.exe";
    let split = "a\u{2028}b\u{200b}c";
    let items = env.scripts("i.jsonl", &[(spoof, "permanent"), (split, "permanent")]);
    let run = run_id(&env.run(&items, &[]));
    let raw = ['\u{202e}', '\u{2028}', '\u{200b}'];
    for args in [
        vec!["failures", run.as_str()],
        vec!["status", run.as_str()],
        vec!["show", run.as_str(), spoof],
    ] {
        let out = env.settle(&args);
        out.expect_code(0);
        assert!(
            out.stdout.contains("\\u{202e}gnp.exe"),
            "{args:?}: {}",
            out.stdout
        );
        assert!(!out.stdout.contains(raw), "{args:?}: {}", out.stdout);
    }
    let out = env.settle(&["failures", &run]);
    assert!(
        out.stdout.contains("a\\u{2028}b\\u{200b}c"),
        "{}",
        out.stdout
    );
    // JSON is exact: the ids as they are.
    let failures = env.failures(&run);
    let ids: BTreeSet<&str> = failures["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["item_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, BTreeSet::from([spoof, split]));
    // An error naming the id: escaped on stderr, exact in the JSON error.
    let out = env.settle(&["logs", &run, spoof, "--attempt", "9", "--json"]);
    out.expect_code(2)
        .stderr_has("item \"\\u{202e}gnp.exe\" of run");
    assert!(!out.stderr.contains(raw), "{}", out.stderr);
    assert!(out.json()["error"].as_str().unwrap().contains(spoof));
}

/// `results -o FILE` writes beside FILE and renames; the temporaries of
/// earlier writes whose process is gone (SIGKILL) are removed by the next
/// write of the same FILE, a live process's and another file's are not.
#[test]
fn results_to_a_file_removes_dead_writers_temporaries() {
    let env = Env::new();
    let items = env.scripts("i.jsonl", &[("a", "ok"), ("b", "permanent")]);
    let run = run_id(&env.run(&items, &[]));
    // A pid no process has: a child's that has exited.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let stale = env.write(&format!(".out.jsonl.{dead}.partial"), "stale");
    let live = env.write(
        &format!(".out.jsonl.{}.partial", std::process::id()),
        "in progress",
    );
    let other = env.write(&format!(".other.jsonl.{dead}.partial"), "another file's");
    env.settle(&["results", &run, "-o", "out.jsonl"])
        .expect_code(0)
        .stderr_has("Wrote 2 results");
    assert!(
        !std::path::Path::new(&stale).exists(),
        "{stale} is still there"
    );
    assert!(std::path::Path::new(&live).exists());
    assert!(std::path::Path::new(&other).exists());
    let out = std::fs::read_to_string(env.path("out.jsonl")).unwrap();
    assert_eq!(out.lines().count(), 2, "{out}");
    let left: Vec<String> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}
