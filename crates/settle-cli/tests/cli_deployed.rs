//! `settle --backend aws --workers deployed` against the offline stack
//! (`infra/emulator.sh up --deployed`): the dispatcher, worker and reducer
//! binaries run as Lambda functions under `cargo lambda watch`, fed by
//! `infra/esm.py` (the SQS event source mappings and the schedule) over a
//! moto_server of their own. The CLI only dispatches and follows the tally;
//! every item is processed and counted by the functions.
//!
//! Each test starts its own stack in its own state directory, apart from
//! the emulator that `make test` runs for the other tests. Without
//! cargo-lambda (`make venv`) the stack cannot start, and the test fails
//! and says so.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use settle_core::message::WorkBody;
use settle_core::Queue;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// One offline stack, stopped (and its state removed) when dropped.
struct Stack {
    dir: tempfile::TempDir,
    exports: Vec<(String, String)>,
}

impl Stack {
    /// `infra/emulator.sh up --deployed` with its own state directory; the
    /// dispatcher ticks every `tick_seconds` (0: never).
    fn up(tick_seconds: u32) -> Self {
        Self::up_with(tick_seconds, &[])
    }

    /// As [`Stack::up`], with more settings for `infra/emulator.sh`.
    fn up_with(tick_seconds: u32, settings: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let out = Command::new(repo_root().join("infra/emulator.sh"))
            .args(["up", "--deployed"])
            .env("SETTLE_EMULATOR_DIR", dir.path())
            .env("SETTLE_STACK_TICK_SECONDS", tick_seconds.to_string())
            // Retries in a fraction of a second (rounded up to SQS's whole
            // seconds), not the template's 1 s doubling per receive.
            .env("SETTLE_RETRY_DELAY_MS", "200")
            .env("SETTLE_PROCESSOR", "scripted")
            .envs(settings.iter().copied())
            .env_remove("SETTLE_WORKERS")
            .output()
            .expect("run infra/emulator.sh");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut stack = Self {
            dir,
            exports: Vec::new(),
        };
        assert!(
            out.status.success(),
            "the offline stack did not start (infra/emulator.sh up --deployed):\n{stderr}\n\
             It needs cargo-lambda and moto in .venv (make venv), and builds the \
             functions as `cargo test --workspace` does.\n{}",
            stack.logs()
        );
        stack.exports = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect();
        assert_eq!(stack.var("SETTLE_WORKERS"), "deployed");
        assert!(stack
            .var("AWS_ENDPOINT_URL_LAMBDA")
            .starts_with("http://127.0.0.1:"));
        eprintln!("offline stack up in {:?}", started.elapsed());
        stack
    }

    fn var(&self, name: &str) -> &str {
        self.exports
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("{name} not among the stack's exports: {:?}", self.exports))
    }

    /// A test environment whose commands talk to this stack.
    fn env(&self) -> Env {
        let mut env = Env::new();
        env.vars.clone_from(&self.exports);
        env
    }

    /// The tails of the stack's logs, for a failure message.
    fn logs(&self) -> String {
        [
            "esm.log",
            "worker.log",
            "reducer.log",
            "dispatcher.log",
            "watch.log",
            "build.log",
        ]
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            format!("--- {name} (last 40 lines) ---\n{tail}\n")
        })
        .collect()
    }

    /// Kills the worker function's processes, not the instances' loops,
    /// which start fresh ones as Lambda starts fresh environments.
    fn kill_workers(&self) {
        let pids = std::fs::read_to_string(self.dir.path().join("instance_pids")).unwrap();
        let mut killed = 0;
        for pid in pids.split_whitespace() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).ends_with("/worker\0") {
                let status = Command::new("pkill")
                    .args(["-KILL", "-P", pid])
                    .status()
                    .unwrap();
                killed += usize::from(status.success());
            }
        }
        assert!(killed > 0, "no worker process to kill among {pids:?}");
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    fn backend(&self) -> settle_aws::AwsBackend {
        let vars: BTreeMap<String, String> = self.exports.iter().cloned().collect();
        let cfg = settle_aws::AwsConfig::from_lookup(|k| vars.get(k).cloned()).unwrap();
        let endpoint = self.var("AWS_ENDPOINT_URL").to_owned();
        let rt = runtime();
        rt.block_on(async {
            let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .endpoint_url(endpoint)
                .region(aws_config::Region::new("us-east-1"))
                .test_credentials()
                .load()
                .await;
            settle_aws::connect_with(&sdk, &cfg).await.unwrap()
        })
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        let _ = Command::new(repo_root().join("infra/emulator.sh"))
            .arg("down")
            .env("SETTLE_EMULATOR_DIR", self.dir.path())
            .output();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `(visible + delayed, in flight)` of a queue.
fn depth(q: &dyn Queue) -> (u64, u64) {
    let d = runtime().block_on(q.depth()).unwrap();
    (d.visible, d.in_flight)
}

fn failures(env: &Env, run: &str) -> Vec<(String, u64, String)> {
    env.failures(run)["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["item_id"].as_str().unwrap().to_owned(),
                f["attempts"].as_u64().unwrap(),
                f["error"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn deployed_run_then_redrive_keeps_exact_tallies_and_an_exact_dlq() {
    let stack = Stack::up(0);
    let env = stack.env();
    let items = env.write(
        "i.jsonl",
        [
            json!({"id": "ok1", "payload": {"script": "ok", "output": {"n": 1}}}),
            json!({"id": "ok2", "payload": {"script": "ok", "output": {"n": 2}}}),
            json!({"id": "r1", "payload": {"script": "retryable:1"}}),
            json!({"id": "r4", "payload": {"script": "retryable:4"}}),
            json!({"id": "perm", "payload": {"script": "permanent", "log": "card declined\n"}}),
            json!({"id": "panic", "payload": {"script": "panic"}}),
            json!({"id": "slow", "payload": {"script": "sleep:300"}}),
        ]
        .iter()
        .map(|v| format!("{v}\n"))
        .collect::<String>(),
    );
    let started = Instant::now();
    let run = env.ok_json(&["run", "--items", &items, "--max-receives", "3", "--json"]);
    eprintln!("deployed run settled in {:?}", started.elapsed());
    let id = run_id(&run);
    // r4 fails its 3 attempts; perm fails at once; panic fails 3 times.
    assert_run(&run, "partial", 7, 4, 3, 0);
    assert_eq!(env.status(&id), run);
    assert_eq!(
        failures(&env, &id),
        vec![
            (
                "panic".into(),
                3,
                "panic: scripted panic for item panic".into()
            ),
            ("perm".into(), 1, "permanent failure (scripted)".into()),
            ("r4".into(), 3, "retryable failure 3 of 4 (scripted)".into()),
        ]
    );

    // Every attempt of a failed item, each with its own log.
    let perm = env.show(&id, "perm");
    assert_eq!(perm["attempts"], 1);
    assert_eq!(
        history(&perm),
        vec![h(1, "failed", Some("permanent"), true)]
    );
    assert_eq!(perm["history"][0]["log"], "card declined\n");
    let panic = env.show(&id, "panic");
    assert_eq!(
        history(&panic),
        vec![
            h(1, "failed", Some("retryable"), false),
            h(2, "failed", Some("retryable"), false),
            h(3, "failed", Some("retryable"), true),
        ]
    );
    assert_eq!(env.show(&id, "r1")["attempts"], 2);

    // Outputs and errors in input order.
    let out = env.settle(&["results", &id]);
    out.expect_code(0);
    let lines: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let brief: Vec<(String, String, u64)> = lines
        .iter()
        .map(|l| {
            (
                l["id"].as_str().unwrap().to_owned(),
                l["status"].as_str().unwrap().to_owned(),
                l["attempts"].as_u64().unwrap(),
            )
        })
        .collect();
    let want = [
        ("ok1", "succeeded", 1),
        ("ok2", "succeeded", 1),
        ("r1", "succeeded", 2),
        ("r4", "failed", 3),
        ("perm", "failed", 1),
        ("panic", "failed", 3),
        ("slow", "succeeded", 1),
    ];
    assert_eq!(
        brief,
        want.iter()
            .map(|(i, s, a)| ((*i).to_owned(), (*s).to_owned(), *a))
            .collect::<Vec<_>>()
    );
    assert_eq!(lines[0]["output"], json!({"n": 1}));
    assert_eq!(lines[1]["output"], json!({"n": 2}));

    // One item: r4 fails its 4th attempt (the redrive's first receive) and
    // succeeds on its 5th, in the deployed worker.
    let one = env.ok_json(&["redrive", &id, "--item", "r4", "--json"]);
    assert_run_extra(&one, &REDRIVE_KEYS, "partial", 7, 5, 2, 0);
    assert_eq!(one["redriven"], 1);
    assert_eq!(env.show(&id, "r4")["attempts"], 5);

    // The rest: both fail again (permanent, and a panic every time).
    let all = env.ok_json(&["redrive", &id, "--json"]);
    assert_run_extra(&all, &REDRIVE_KEYS, "partial", 7, 5, 2, 0);
    assert_eq!(all["redriven"], 2);
    assert_eq!(env.show(&id, "perm")["attempts"], 2);
    assert_eq!(
        failures(&env, &id)
            .into_iter()
            .map(|(item, _, _)| item)
            .collect::<Vec<_>>(),
        ["panic", "perm"]
    );

    // The end state: nothing left to process, and exactly one dead letter
    // per failed item.
    let aws = stack.backend();
    let b = aws.backend();
    let quiet = Instant::now();
    while depth(b.work.as_ref()) != (0, 0) || depth(b.results.as_ref()) != (0, 0) {
        assert!(
            quiet.elapsed() < Duration::from_secs(20),
            "queues not empty: work {:?}, results {:?}",
            depth(b.work.as_ref()),
            depth(b.results.as_ref())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(depth(b.dlq.as_ref()), (2, 0), "the work DLQ");
    assert_eq!(depth(b.results_dlq.as_ref()), (0, 0), "the results DLQ");
    let dead = runtime()
        .block_on(b.dlq.receive(10, Duration::from_secs(30)))
        .unwrap();
    let mut dead_items: Vec<String> = dead
        .iter()
        .map(|d| {
            let body = WorkBody::decode(&d.body).unwrap();
            assert_eq!(body.run.as_str(), id);
            body.item.to_string()
        })
        .collect();
    dead_items.sort();
    assert_eq!(dead_items, ["panic", "perm"]);
}

/// Items loaded for later: the ESM's schedule invokes the dispatcher
/// function, which starts a run of them; the functions settle it.
#[test]
fn a_scheduled_tick_starts_a_run_that_settles_exactly() {
    let stack = Stack::up(2);
    let env = stack.env();
    let items = env.scripts(
        "i.jsonl",
        &[
            ("a", "ok"),
            ("b", "ok"),
            ("c", "retryable:1"),
            ("d", "permanent"),
            ("e", "ok"),
        ],
    );
    env.settle(&["load", "--items", &items]).expect_code(0);
    let started = Instant::now();
    let id = loop {
        let runs = env.ok_json(&["runs", "--json"]);
        if let Some(run) = runs["runs"].as_array().unwrap().first() {
            break run_id(run);
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no run started within 30 s of ticks every 2 s"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let run = loop {
        let run = env.status(&id);
        if run["pending"] == 0 && run["status"] != "running" {
            break run;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "run {id} not settled within 60 s: {run}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!(
        "scheduled run settled {:?} after the load",
        started.elapsed()
    );
    assert_run(&run, "partial", 5, 4, 1, 0);
    assert_eq!(
        failures(&env, &id),
        vec![("d".into(), 1, "permanent failure (scripted)".into())]
    );
    assert_eq!(env.show(&id, "c")["attempts"], 2);
    // Later ticks find nothing pending and start no other run.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        env.ok_json(&["runs", "--json"])["runs"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// A worker that dies in the middle of a batch: the event source mapping
/// gets no answer, deletes nothing, and the message comes back after its
/// visibility timeout to a fresh instance; the run settles as if nothing
/// had happened. The killed attempt reported nothing, so the item's one
/// recorded attempt is its first, run again.
#[test]
fn a_worker_killed_mid_batch_loses_nothing() {
    let stack = Stack::up_with(0, &[("SETTLE_STACK_INVOKE_TIMEOUT_SECONDS", "8")]);
    let env = stack.env();
    let items = env.scripts("i.jsonl", &[("slow", "sleep:4000")]);
    let args = ["run", "--items", items.as_str(), "--json"];
    let run = env.spawn(&args);
    let aws = stack.backend();
    let b = aws.backend();
    let started = Instant::now();
    // The ESM has received the message: its invocation starts at once and
    // then sleeps for 4 s.
    while depth(b.work.as_ref()).1 == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the work message was never received"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    stack.kill_workers();
    let out = wait(run, &args);
    eprintln!("killed run settled {:?} after the start", started.elapsed());
    out.expect_code(0);
    let run = out.json();
    assert_run(&run, "succeeded", 1, 1, 0, 0);
    let slow = env.show(&run_id(&run), "slow");
    assert_eq!(slow["attempts"], 1, "{slow}");
    let failed = Instant::now();
    while !stack
        .log("esm.log")
        .contains("worker: invocation of 1 messages failed")
    {
        assert!(
            failed.elapsed() < Duration::from_secs(15),
            "the ESM did not log the failed invocation:\n{}",
            stack.log("esm.log")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Builds a binary of this workspace (an example: the user's function or
/// worker) as `cargo build` does, and returns its path.
fn build_example(package: &str) -> PathBuf {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // The test's own CARGO_* variables would make cargo build the
    // dependencies anew with other settings.
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR" {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .current_dir(repo_root())
        .args([
            "build",
            "-p",
            package,
            "--message-format=json-render-diagnostics",
        ])
        .output()
        .expect("run cargo build");
    assert!(
        out.status.success(),
        "cargo build -p {package} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["kind"][0] == "bin")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo build -p {package} built no binary"))
}

fn jsonl(values: &[Value]) -> String {
    values.iter().map(|v| format!("{v}\n")).collect()
}

/// The results of a run, `(id, status, attempts)` in input order.
fn results(env: &Env, run: &str) -> Vec<Value> {
    let out = env.settle(&["results", run]);
    out.expect_code(0);
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn brief(lines: &[Value]) -> Vec<(String, String)> {
    lines
        .iter()
        .map(|l| {
            (
                l["id"].as_str().unwrap().to_owned(),
                l["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn pairs(want: &[(&str, &str)]) -> Vec<(String, String)> {
    want.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

/// The function kind: the stock worker invokes the user's own function
/// (the fixture, served by the same Lambda APIs) once per batch.
#[test]
fn deployed_function_kind_invokes_the_users_function() {
    let function = build_example("settle-fixture-function");
    let extra = format!("settle-fixture-function={}", function.display());
    let stack = Stack::up_with(
        0,
        &[
            ("SETTLE_PROCESSOR", "function"),
            ("SETTLE_FUNCTION_NAME", "settle-fixture-function"),
            ("SETTLE_STACK_EXTRA_FUNCTIONS", extra.as_str()),
        ],
    );
    let env = stack.env();
    let items = env.write(
        "i.jsonl",
        jsonl(&[
            json!({"id": "ok1", "payload": {"script": "ok", "output": {"n": 1}}}),
            json!({"id": "perm", "payload": {"script": "permanent"}}),
            json!({"id": "r1", "payload": {"script": "retryable:1"}}),
            json!({"id": "r4", "payload": {"script": "retryable:4"}}),
        ]),
    );
    let run = env.ok_json(&["run", "--items", &items, "--max-receives", "3", "--json"]);
    let id = run_id(&run);
    assert_run(&run, "partial", 4, 2, 2, 0);
    let lines = results(&env, &id);
    assert_eq!(
        brief(&lines),
        pairs(&[
            ("ok1", "succeeded"),
            ("perm", "failed"),
            ("r1", "succeeded"),
            ("r4", "failed")
        ])
    );
    assert_eq!(lines[0]["output"], json!({"n": 1}));
    assert_eq!(lines[1]["error"], "permanent failure (scripted)");
    // The attempt's log names the invocation that covered it.
    let perm = env.show(&id, "perm");
    let log = perm["history"][0]["log"].as_str().unwrap();
    assert!(log.contains("settle-fixture-function"), "{log}");
    assert_eq!(env.show(&id, "r1")["attempts"], 2);

    // r4 fails its 4th attempt and succeeds on its 5th.
    let all = env.ok_json(&["redrive", &id, "--json"]);
    assert_run_extra(&all, &REDRIVE_KEYS, "partial", 4, 3, 1, 0);
    assert_eq!(env.show(&id, "r4")["attempts"], 5);
    let b = stack.backend();
    assert_eq!(
        depth(b.backend().dlq.as_ref()),
        (1, 0),
        "one dead letter: perm"
    );

    // A function error (the fixture panics) fails its batch's items as
    // retryable, with the reason, until their attempts run out.
    let boom = env.write(
        "boom.jsonl",
        jsonl(&[json!({"id": "boom", "payload": {"script": "panic"}})]),
    );
    let run = env.ok_json(&["run", "--items", &boom, "--max-receives", "2", "--json"]);
    let id = run_id(&run);
    assert_run(&run, "failed", 1, 0, 1, 0);
    let shown = env.show(&id, "boom");
    assert_eq!(
        history(&shown),
        vec![
            h(1, "failed", Some("retryable"), false),
            h(2, "failed", Some("retryable"), true),
        ]
    );
    let error = shown["history"][1]["error"].as_str().unwrap();
    assert!(error.contains("scripted panic"), "{error}");
}

/// When each item id was asked, in order.
type Asked = std::sync::Arc<std::sync::Mutex<Vec<(String, Instant)>>>;

/// An HTTP endpoint on 127.0.0.1 for the http kind: `ok*` items succeed
/// with a JSON body, `perm` gets 422, and `later` gets 429 with
/// `Retry-After: 2` on its first request. Keeps when each id was asked.
fn endpoint() -> (String, Asked) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/renew", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let s = s.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                loop {
                    let mut length = 0;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end().to_ascii_lowercase();
                        if l.is_empty() {
                            break;
                        }
                        if let Some(v) = l.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let body: Value = serde_json::from_slice(&body).unwrap();
                    let id = body["id"].as_str().unwrap_or_default().to_owned();
                    let before = s.lock().unwrap().iter().filter(|(i, _)| *i == id).count();
                    s.lock().unwrap().push((id.clone(), Instant::now()));
                    let (status, extra, text) = match id.as_str() {
                        "perm" => ("422 Unprocessable", "", "card declined".to_owned()),
                        "later" if before == 0 => {
                            ("429 Too Many", "Retry-After: 2\r\n", "slow down".to_owned())
                        }
                        _ => ("200 OK", "", format!(r#"{{"renewed":"{id}"}}"#)),
                    };
                    let reply = format!(
                        "HTTP/1.1 {status}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
                        text.len()
                    );
                    if reader.get_mut().write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

/// The http kind: the stock worker posts each item to the endpoint; a 429's
/// Retry-After holds the item back (no request before it).
#[test]
fn deployed_http_kind_posts_each_item_and_respects_retry_after() {
    let (url, seen) = endpoint();
    let stack = Stack::up_with(
        0,
        &[
            ("SETTLE_PROCESSOR", "http"),
            ("SETTLE_HTTP_URL", url.as_str()),
        ],
    );
    let env = stack.env();
    let items = env.write(
        "i.jsonl",
        jsonl(&[
            json!({"id": "ok1", "payload": {"plan": "pro"}}),
            json!({"id": "perm", "payload": {"plan": "pro"}}),
            json!({"id": "later", "payload": {"plan": "pro"}}),
        ]),
    );
    let run = env.ok_json(&["run", "--items", &items, "--json"]);
    let id = run_id(&run);
    assert_run(&run, "partial", 3, 2, 1, 0);
    let lines = results(&env, &id);
    assert_eq!(
        brief(&lines),
        pairs(&[
            ("ok1", "succeeded"),
            ("perm", "failed"),
            ("later", "succeeded")
        ])
    );
    assert_eq!(lines[0]["output"], json!({"renewed": "ok1"}));
    let error = lines[1]["error"].as_str().unwrap();
    assert!(
        error.contains("422") && error.contains("card declined"),
        "{error}"
    );
    // A 429 is a throttle, not an attempt: one attempt, one throttle.
    let later = env.show(&id, "later");
    assert_eq!(
        (later["attempts"].clone(), later["throttled"].clone()),
        (json!(1), json!(1))
    );
    let asked: Vec<Instant> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(i, _)| i == "later")
        .map(|(_, at)| *at)
        .collect();
    assert_eq!(asked.len(), 2, "later was asked twice");
    let waited = asked[1] - asked[0];
    assert!(
        waited >= Duration::from_secs(2),
        "asked again after {waited:?}, before its Retry-After"
    );
    let perm = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(i, _)| i == "perm")
        .count();
    assert_eq!(perm, 1, "a permanent failure is not retried");

    // The redrive posts it once more, and it fails again.
    let all = env.ok_json(&["redrive", &id, "--json"]);
    assert_run_extra(&all, &REDRIVE_KEYS, "partial", 3, 2, 1, 0);
    assert_eq!(all["redriven"], 1);
    let perm = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(i, _)| i == "perm")
        .count();
    assert_eq!(perm, 2, "the redrive's one request");
    let b = stack.backend();
    assert_eq!(
        depth(b.backend().dlq.as_ref()),
        (1, 0),
        "one dead letter: perm"
    );
}

/// The user's own Rust worker (examples/rust-worker) in place of the stock
/// one: the same processor as the CLI's, with its outputs and logs.
#[test]
fn deployed_own_rust_worker_runs_the_users_processor() {
    let worker = build_example("settle-example-renewals-worker");
    let stack = Stack::up_with(0, &[("SETTLE_STACK_WORKER", worker.to_str().unwrap())]);
    let env = stack.env();
    let items = env.write(
        "i.jsonl",
        jsonl(&[
            json!({"id": "sub-1", "payload": {"user": "u-1", "plan": "pro", "card": "4242424242424242"}}),
            json!({"id": "sub-2", "payload": {"user": "u-2", "plan": "basic", "card": "4000000000000002"}}),
        ]),
    );
    let run = env.ok_json(&["run", "--items", &items, "--json"]);
    let id = run_id(&run);
    assert_run(&run, "partial", 2, 1, 1, 0);
    let lines = results(&env, &id);
    assert_eq!(
        brief(&lines),
        pairs(&[("sub-1", "succeeded"), ("sub-2", "failed")])
    );
    assert_eq!(lines[0]["output"]["amount_cents"], 1500);
    assert_eq!(lines[1]["error"], "card ...0002 declined");
    let declined = env.show(&id, "sub-2");
    let log = declined["history"][0]["log"].as_str().unwrap();
    assert!(log.starts_with("renewing u-2 on basic"), "{log}");

    // The redrive: the card is declined again, on a second attempt.
    let all = env.ok_json(&["redrive", &id, "--json"]);
    assert_run_extra(&all, &REDRIVE_KEYS, "partial", 2, 1, 1, 0);
    let again = env.show(&id, "sub-2");
    assert_eq!(again["history"].as_array().unwrap().len(), 2);
    let log = again["history"][1]["log"].as_str().unwrap();
    assert!(log.contains("(attempt 2)"), "{log}");
}
