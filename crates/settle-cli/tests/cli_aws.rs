//! `settle --backend aws` end to end on the emulator (moto_server at
//! `AWS_ENDPOINT_URL`): the local runner plays the event source mapping
//! against the real SQS and DynamoDB APIs; run, failures, show, redrive of
//! one item and of all, with exact tallies at every step.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::time::Duration;

#[test]
fn aws_run_then_redrive_one_then_all_keeps_exact_tallies() {
    // maxReceiveCount 6 as in the template; runs use 3 attempts.
    let env = Env::aws(6);
    let items = env.scripts(
        "i.jsonl",
        &[
            ("ok1", "ok"),
            ("ok2", "ok"),
            ("r1", "retryable:1"),
            ("r4", "retryable:4"),
            ("perm", "permanent"),
            ("panic", "panic"),
            ("slow", "sleep:50"),
        ],
    );
    let run = env.run(&items, &["--max-receives", "3"]);
    let id = run_id(&run);
    // r4 fails its 3 attempts; perm fails at once; panic fails 3 times.
    assert_run(&run, "partial", 7, 4, 3, 0);
    let failed: Vec<(String, u64)> = env.failures(&id)["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["item_id"].as_str().unwrap().to_owned(),
                f["attempts"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        failed,
        vec![("panic".into(), 3), ("perm".into(), 1), ("r4".into(), 3)]
    );
    assert_eq!(env.status(&id), run);
    assert_eq!(env.show(&id, "r1")["attempts"], 2);

    // One item: r4 fails its 4th attempt (the redrive's first receive) and
    // succeeds on its 5th: attempts count across the redrive.
    let mut args = vec!["redrive", id.as_str(), "--item", "r4", "--json"];
    args.extend(FAST);
    let one = env.ok_json(&args);
    assert_run_extra(&one, &REDRIVE_KEYS, "partial", 7, 5, 2, 0);
    assert_eq!(one["redriven"], 1);
    assert_eq!(env.show(&id, "r4")["attempts"], 5);

    // The rest: both fail again (permanent, and a panic every time).
    let mut args = vec!["redrive", id.as_str(), "--json"];
    args.extend(FAST);
    let all = env.ok_json(&args);
    assert_run_extra(&all, &REDRIVE_KEYS, "partial", 7, 5, 2, 0);
    assert_eq!(all["redriven"], 2);
    assert_eq!(env.show(&id, "perm")["attempts"], 2);

    // An unknown item moves nothing and says so.
    env.settle(&["redrive", &id, "--item", "nope", "--json"])
        .expect_code(2)
        .stderr_has("nope");
    let mut settled = all.clone();
    for key in REDRIVE_KEYS {
        settled.as_object_mut().unwrap().remove(key);
    }
    // The redrive completed: the run no longer has one.
    assert_eq!(settled["redrive"]["complete"], true, "{settled}");
    settled["redrive"] = serde_json::Value::Null;
    assert_eq!(env.status(&id), settled);
}

#[test]
fn aws_run_refuses_max_receives_at_the_queue_limit() {
    let env = Env::aws(3);
    let items = env.scripts("i.jsonl", &[("a", "ok")]);
    env.settle(&["run", "--items", &items, "--max-receives", "3"])
        .expect_code(2)
        .stderr_has("must be below the work queue's maxReceiveCount (3)");
}

/// A user's command does the work; its outputs and each attempt's log are
/// kept in the deployed ledger and read back by `results`, `show` and
/// `logs` with `--backend aws`.
#[test]
fn aws_keeps_each_items_output_and_each_attempts_log() {
    let env = Env::aws(6);
    let cmd = env.write(
        "worker.sh",
        r#"id=$(sed 's/.*"id":"\([^"]*\)".*/\1/')
echo "working on $id" >&2
case "$id" in
  bad*) echo "card declined for $id" >&2; exit 65;;
esac
printf '{"charged":"%s"}' "$id"
"#,
    );
    let exec = format!("sh {cmd}");
    let items = env.write(
        "i.jsonl",
        "{\"id\":\"a\",\"payload\":{}}\n{\"id\":\"bad-1\",\"payload\":{}}\n{\"id\":\"b\",\"payload\":{}}\n",
    );
    let run = env.run(&items, &["--exec", &exec]);
    assert_run(&run, "partial", 3, 2, 1, 0);
    let id = run_id(&run);
    let out = env.settle(&["results", &id]);
    out.expect_code(0);
    let lines: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines,
        vec![
            serde_json::json!({"id": "a", "status": "succeeded", "attempts": 1, "output": {"charged": "a"}}),
            serde_json::json!({"id": "bad-1", "status": "failed", "attempts": 1, "error": "exit 65: card declined for bad-1"}),
            serde_json::json!({"id": "b", "status": "succeeded", "attempts": 1, "output": {"charged": "b"}}),
        ]
    );
    let shown = env.show(&id, "bad-1");
    assert_eq!(
        shown["history"][0]["log"],
        "working on bad-1\ncard declined for bad-1\n"
    );
    let logs = env.settle(&["logs", &id, "b"]);
    logs.expect_code(0);
    assert!(logs.stdout.contains("working on b\n"), "{}", logs.stdout);
    assert!(!logs.stdout.contains("bad-1"), "{}", logs.stdout);
}

/// Dead-letter copies per item id in the stack's work DLQ. Each message is
/// received once (hidden while the scan goes on) and then made visible
/// again, so the DLQ is as it was for the next command.
fn dead_letters(env: &Env) -> std::collections::BTreeMap<String, u64> {
    use settle_core::message::WorkBody;
    use settle_core::ports::Queue;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cfg = settle_aws::AwsConfig::from_lookup(|k| {
            env.vars
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        })
        .unwrap();
        let aws = settle_aws::connect(&cfg).await.unwrap();
        let dlq = aws.dlq();
        let mut seen = Vec::new();
        loop {
            let got = dlq.receive(10, Duration::from_secs(60)).await.unwrap();
            if got.is_empty() {
                break;
            }
            seen.extend(got);
        }
        let mut per_item = std::collections::BTreeMap::new();
        for d in &seen {
            let body = WorkBody::decode(&d.body).unwrap();
            *per_item.entry(body.item.to_string()).or_default() += 1;
            dlq.change_visibility(&d.receipt, Duration::ZERO)
                .await
                .unwrap();
        }
        per_item
    })
}

/// With a visibility timeout shorter than some attempts and than the
/// emulator's slowest calls, messages come back while their attempt still
/// reports, or before their delete lands: such a copy must not run the
/// processor again. A permanent failure is attempted once, and the DLQ
/// holds exactly one message per failed item, before and after a redrive.
#[test]
fn aws_short_visibility_attempts_permanent_failures_once_and_dead_letters_each_once() {
    let env = Env::aws(6);
    let mut items: Vec<(String, &str)> = Vec::new();
    for i in 0..110 {
        let script = match i % 11 {
            0 | 1 => "permanent",
            2 => "retryable:9",
            3..=5 => "sleep:400",
            _ => "ok",
        };
        items.push((format!("i{i:03}"), script));
    }
    let refs: Vec<(&str, &str)> = items.iter().map(|(i, s)| (i.as_str(), *s)).collect();
    let file = env.scripts("i.jsonl", &refs);
    let short = [
        "--visibility-timeout",
        "1",
        "--retry-delay-ms",
        "20",
        "--json",
    ];
    let mut args = vec!["run", "--items", &file, "--max-receives", "3"];
    args.extend(short);
    let run = env.settle(&args).json();
    let id = run_id(&run);
    // 20 permanent failures, and 10 items that fail more often than they
    // may be attempted.
    assert_run(&run, "partial", 110, 80, 30, 0);
    let scripted = |want: &str| -> Vec<String> {
        items
            .iter()
            .filter(|(_, s)| *s == want)
            .map(|(i, _)| i.clone())
            .collect()
    };
    let permanent = scripted("permanent");
    let mut failed = permanent.clone();
    failed.extend(scripted("retryable:9"));
    failed.sort();
    let listed: Vec<String> = env.failures(&id)["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["item_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, failed);
    // One attempt in the history: a copy never runs it again.
    let tried = |item: &str| env.show(&id, item)["history"].as_array().unwrap().len();
    for item in &permanent {
        assert_eq!(tried(item), 1, "{item}");
    }
    let copies = dead_letters(&env);
    assert_eq!(copies.keys().cloned().collect::<Vec<_>>(), failed);
    assert!(copies.values().all(|n| *n == 1), "{copies:?}");

    // The redrive: every failed item fails again, the permanent ones after
    // one more attempt.
    let mut args = vec!["redrive", id.as_str()];
    args.extend(short);
    let all = env.ok_json(&args);
    assert_run_extra(&all, &REDRIVE_KEYS, "partial", 110, 80, 30, 0);
    assert_eq!(all["redriven"], 30);
    for item in &permanent {
        assert_eq!(tried(item), 2, "{item}");
    }
    let copies = dead_letters(&env);
    assert_eq!(copies.keys().cloned().collect::<Vec<_>>(), failed);
    assert!(copies.values().all(|n| *n == 1), "{copies:?}");
}

/// Messages left in the stack's work and results queues (visible or not).
fn queued(env: &Env) -> (u64, u64) {
    use settle_core::ports::Queue;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cfg = settle_aws::AwsConfig::from_lookup(|k| {
            env.vars
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        })
        .unwrap();
        let aws = settle_aws::connect(&cfg).await.unwrap();
        let work = aws.work().depth().await.unwrap().total();
        let results = aws.results().depth().await.unwrap().total();
        (work, results)
    })
}

/// Busy loops on every core for as long as it lives: a loaded machine, on
/// which the emulator answers late and the visibility timeout runs out
/// while attempts still report.
struct Load(Vec<std::process::Child>);

impl Load {
    fn start() -> Self {
        // Half the cores: the emulator and the runner get the rest.
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Load(
            (0..(cores / 2).max(1))
                .map(|_| {
                    std::process::Command::new("sh")
                        .args(["-c", "end=$(($(date +%s) + 300)); while [ $(date +%s) -lt $end ]; do :; done"])
                        .spawn()
                        .unwrap()
                })
                .collect(),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A redelivery is not an attempt: on a loaded machine, with a visibility
/// timeout of 1 s and of 5 s, messages come back while their attempts
/// still run or report. Every item that can succeed succeeds, with exactly
/// the attempts its script takes; the failed items are exactly the
/// permanent, always-failing and panicking ones; the DLQ holds one message
/// for each of them and none for any other, and no queue holds anything.
#[test]
fn aws_redeliveries_use_no_attempts_on_a_loaded_machine() {
    let _load = Load::start();
    for (visibility, slow) in [("1", "sleep:300"), ("5", "sleep:2000")] {
        let env = Env::aws(6);
        let mut items: Vec<(String, &str)> = Vec::new();
        let mut add = |prefix: &str, n: usize, script: &'static str| {
            for i in 0..n {
                items.push((format!("{prefix}{i:03}"), script));
            }
        };
        add("ok", 150, "ok");
        add("r1-", 10, "retryable:1");
        add("r2-", 10, "retryable:2");
        add("slow", 20, slow);
        add("perm", 20, "permanent");
        add("r9-", 5, "retryable:9");
        add("panic", 5, "panic");
        let refs: Vec<(&str, &str)> = items.iter().map(|(i, s)| (i.as_str(), *s)).collect();
        let file = env.scripts("i.jsonl", &refs);
        let args = [
            "run",
            "--items",
            &file,
            "--max-receives",
            "3",
            "--visibility-timeout",
            visibility,
            "--retry-delay-ms",
            "20",
            "--json",
        ];
        let started = std::time::Instant::now();
        let out = wait_within(env.spawn(&args), &args, Duration::from_secs(300));
        eprintln!(
            "visibility {visibility}: the run took {:?}",
            started.elapsed()
        );
        let run = out.json();
        let id = run_id(&run);
        assert_run(&run, "partial", 220, 190, 30, 0);
        let mut failed: Vec<String> = items
            .iter()
            .filter(|(_, s)| matches!(*s, "permanent" | "retryable:9" | "panic"))
            .map(|(i, _)| i.clone())
            .collect();
        failed.sort();
        let listed: Vec<String> = env.failures(&id)["failures"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["item_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(listed, failed, "visibility {visibility}");
        // Attempts are runs of the processor, numbered without gaps.
        for (item, script) in &items {
            let want = match *script {
                "retryable:1" => 2,
                "retryable:2" | "retryable:9" | "panic" => 3,
                _ => 1,
            };
            let shown = env.show(&id, item);
            let numbers: Vec<u64> = shown["history"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["attempt"].as_u64().unwrap())
                .collect();
            assert_eq!(
                numbers,
                (1..=want).collect::<Vec<u64>>(),
                "visibility {visibility}, {item} ({script}): {shown}"
            );
        }
        let copies = dead_letters(&env);
        assert_eq!(
            copies.keys().cloned().collect::<Vec<_>>(),
            failed,
            "visibility {visibility}"
        );
        assert!(copies.values().all(|n| *n == 1), "{copies:?}");
        assert_eq!(queued(&env), (0, 0), "visibility {visibility}");
    }
}
