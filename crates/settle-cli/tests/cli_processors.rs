//! The user's own processors through the real CLI: every row of the
//! `--exec` contract, outputs exported in input order, each attempt's own
//! log, the processor recorded with the run, and bad configuration refused
//! before anything is created.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{json, Value};

/// A per-item command in sh: what it does follows `payload.action`.
const WORKER: &str = r#"#!/bin/sh
item=$(cat)
echo "start $SETTLE_ITEM_ID attempt $SETTLE_ATTEMPT key $SETTLE_IDEMPOTENCY_KEY" >&2
case "$item" in
  *'"ok"'*) echo "{\"charged\":\"$SETTLE_ITEM_ID\"}" ;;
  *'"text"'*) echo "plain words" ;;
  *'"silent"'*) ;;
  *'"decline"'*) echo "card declined for $SETTLE_ITEM_ID" >&2; exit 65 ;;
  *'"flaky"'*) if [ "$SETTLE_ATTEMPT" -lt 3 ]; then echo "gateway timeout" >&2; exit 1; fi; echo '"late"' ;;
  *'"crash"'*) kill -9 $$ ;;
  *'"hang"'*) sleep 30 ;;
  *'"three"'*) echo "custom permanent" >&2; exit 3 ;;
  *) echo "unknown action" >&2; exit 2 ;;
esac
"#;

fn worker(env: &Env) -> String {
    let path = env.path("worker.sh");
    std::fs::write(&path, WORKER).unwrap();
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&path, perms).unwrap();
    path.to_str().unwrap().to_owned()
}

fn items(env: &Env, actions: &[(&str, &str)]) -> String {
    let text: String = actions
        .iter()
        .map(|(id, action)| format!("{}\n", json!({"id": id, "payload": {"action": action}})))
        .collect();
    env.write("items.jsonl", text)
}

fn results(env: &Env, run: &str) -> Vec<Value> {
    let out = env.settle(&["results", run]);
    out.expect_code(0);
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn every_row_of_the_exec_contract_through_the_cli() {
    let env = Env::new();
    let cmd = worker(&env);
    let file = items(
        &env,
        &[
            ("i-ok", "ok"),
            ("i-text", "text"),
            ("i-silent", "silent"),
            ("i-decline", "decline"),
            ("i-flaky", "flaky"),
            ("i-crash", "crash"),
            ("i-hang", "hang"),
        ],
    );
    let mut args = vec![
        "run",
        "--items",
        file.as_str(),
        "--exec",
        cmd.as_str(),
        "--json",
    ];
    // The item timeout is half the visibility timeout: 1 s.
    args.extend(["--retry-delay-ms", "20", "--visibility-timeout", "2"]);
    let out = env.settle(&args);
    out.expect_code(0);
    let run = out.json();
    assert_run(&run, "partial", 7, 4, 3, 0);
    let id = run_id(&run);

    // In the file's order, with outputs and errors.
    let got = results(&env, &id);
    let want = vec![
        json!({"id": "i-ok", "status": "succeeded", "attempts": 1, "output": {"charged": "i-ok"}}),
        json!({"id": "i-text", "status": "succeeded", "attempts": 1, "output": "plain words"}),
        json!({"id": "i-silent", "status": "succeeded", "attempts": 1, "output": null}),
        json!({"id": "i-decline", "status": "failed", "attempts": 1, "error": "exit 65: card declined for i-decline"}),
        json!({"id": "i-flaky", "status": "succeeded", "attempts": 3, "output": "late"}),
        json!({"id": "i-crash", "status": "failed", "attempts": 3, "error": "killed by signal 9: Killed"}),
        json!({"id": "i-hang", "status": "failed", "attempts": 3, "error": "timed out after 1000 ms"}),
    ];
    assert_eq!(got, want);
    let failed = env.settle(&["results", &id, "--status", "failed"]);
    assert_eq!(failed.stdout.lines().count(), 3, "{}", failed.stdout);

    // Each attempt keeps its own log; the flaky item's tell its story.
    let v = env.show(&id, "i-flaky");
    let logs: Vec<String> = v["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["log"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        logs,
        (1..=3)
            .map(|n| {
                let mut l = format!("start i-flaky attempt {n} key {id}:i-flaky\n");
                if n < 3 {
                    l.push_str("gateway timeout\n");
                }
                l
            })
            .collect::<Vec<_>>()
    );
    assert_eq!(v["output"], "late");
    let human = env.settle(&["logs", &id, "i-flaky", "--attempt", "2"]);
    human.expect_code(0);
    assert_eq!(
        human.stdout.lines().collect::<Vec<_>>()[1..],
        [
            format!("start i-flaky attempt 2 key {id}:i-flaky").as_str(),
            "gateway timeout"
        ]
    );
    env.settle(&["logs", &id, "i-flaky", "--attempt", "9"])
        .expect_code(2)
        .stderr_has("has no attempt 9");
    // A hang's log is kept too, although its attempt was cut off.
    let hang = env.show(&id, "i-hang");
    assert!(hang["history"][0]["log"]
        .as_str()
        .unwrap()
        .starts_with("start i-hang attempt 1"));
}

#[test]
fn permanent_exit_codes_can_be_named() {
    let env = Env::new();
    let cmd = worker(&env);
    let file = items(&env, &[("a", "three"), ("b", "decline")]);
    let mut args = vec![
        "run",
        "--items",
        file.as_str(),
        "--exec",
        cmd.as_str(),
        "--permanent-exit-codes",
        "3",
        "--json",
    ];
    args.extend(FAST);
    let run = env.ok_json(&args);
    let id = run_id(&run);
    let got = results(&env, &id);
    // With `--permanent-exit-codes 3`, 3 is permanent (one attempt) and 65
    // is not, so it is retried.
    assert_eq!(got[0]["attempts"], 1, "{got:?}");
    assert_eq!(got[1]["attempts"], 3, "{got:?}");
}

#[test]
fn a_run_without_a_processor_is_refused_before_anything_is_created() {
    let env = Env::new();
    let file = items(&env, &[("a", "ok")]);
    let out = env
        .command(&["run", "--items", &file])
        .env_remove("SETTLE_PROCESSOR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for choice in [
        "--exec CMD",
        "--protocol jsonl",
        "--http URL",
        "--processor scripted",
    ] {
        assert!(err.contains(choice), "{err}");
    }
    assert!(!env.db().exists(), "nothing created");

    for (flags, says) in [
        (
            vec!["--exec", "no-such-program-xyz --flag"],
            "not found on the PATH",
        ),
        (vec!["--exec", "/no/such/worker"], "does not exist"),
        (vec!["--http", "ftp://example.com/x"], "--http"),
        (
            vec!["--http", "http://127.0.0.1:9/x", "--http-header", "NoColon"],
            "--http-header",
        ),
    ] {
        let mut args = vec!["run", "--items", file.as_str()];
        args.extend(flags);
        env.settle(&args).expect_code(2).stderr_has(says);
        assert!(!env.db().exists(), "nothing created for {args:?}");
    }
    // Two processors at once.
    env.settle(&[
        "run",
        "--items",
        &file,
        "--exec",
        "cat",
        "--processor",
        "scripted",
    ])
    .expect_code(2)
    .stderr_has("cannot be used with");
}

#[test]
fn resume_and_redrive_use_the_processor_the_run_recorded() {
    let env = Env::new();
    let cmd = worker(&env);
    let file = items(&env, &[("a", "ok"), ("b", "decline")]);
    env.settle(&["load", "--items", &file]).expect_code(0);
    let run = env.ok_json(&["dispatch", "--exec", &cmd, "--json"]);
    let id = run_id(&run);
    let mut resume = vec!["resume", id.as_str(), "--json"];
    resume.extend(FAST);
    let out = env
        .command(&resume)
        .env_remove("SETTLE_PROCESSOR")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        results(&env, &id)[0]["output"],
        json!({"charged": "a"}),
        "the run's own --exec did the work"
    );
    // A redrive with another processor (a fixed version, say) says so.
    let mut redrive = vec!["redrive", id.as_str(), "--json", "--processor", "scripted"];
    redrive.extend(FAST);
    let out = env.settle(&redrive);
    out.expect_code(0).stderr_has("rather than its own --exec");
    assert_run_extra(&out.json(), &REDRIVE_KEYS, "succeeded", 2, 2, 0, 0);
}

/// The complaint Settle answers: the logs of concurrent items never mix.
#[test]
fn concurrent_items_keep_their_own_logs() {
    const N: usize = 60;
    let env = Env::new();
    let script = env.path("chatty.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\ncat >/dev/null\ni=0\nwhile [ $i -lt 100 ]; do echo \"$SETTLE_ITEM_ID line $i\" >&2; i=$((i+1)); done\necho '{}'\n",
    )
    .unwrap();
    let file: String = (0..N)
        .map(|i| format!("{{\"id\":\"c{i:02}\"}}\n"))
        .collect();
    let file = env.write("items.jsonl", file);
    let cmd = format!("sh {}", script.display());
    let mut args = vec![
        "run",
        "--items",
        file.as_str(),
        "--exec",
        cmd.as_str(),
        "--concurrency",
        "60",
        "--json",
    ];
    args.extend(FAST);
    let id = run_id(&env.ok_json(&args));
    for i in 0..N {
        let item = format!("c{i:02}");
        let v = env.ok_json(&["logs", &id, &item, "--json"]);
        let log = v["attempts"][0]["log"].as_str().unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 100, "{item}: {log}");
        assert!(
            lines.iter().all(|l| l.starts_with(&format!("{item} line"))),
            "{item}'s log holds another item's lines: {log}"
        );
    }
}

/// The repository's root, where the examples and helpers live.
fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Renewal items for the examples: cards ending 0002 are declined for good,
/// 0119 time out at the gateway (retryable, every attempt).
fn renewals(env: &Env) -> String {
    let cards = ["4242424242424242", "4000000000000002", "4000000000000119"];
    let text: String = (0..30)
        .map(|i| {
            let payload = json!({"user": format!("u{i}"), "plan": "pro", "card": cards[i % 3]});
            format!(
                "{}\n",
                json!({"id": format!("sub-{i:02}"), "payload": payload})
            )
        })
        .collect();
    env.write("renewals.jsonl", text)
}

fn jsonl_example(cmd: &str) {
    let env = Env::new();
    let file = renewals(&env);
    let mut args = vec![
        "run",
        "--items",
        file.as_str(),
        "--exec",
        cmd,
        "--protocol",
        "jsonl",
        "--json",
    ];
    args.extend(FAST);
    let out = env.settle(&args);
    out.expect_code(0);
    let run = out.json();
    assert_run(&run, "partial", 30, 10, 20, 0);
    let id = run_id(&run);
    let got = results(&env, &id);
    assert_eq!(got.len(), 30);
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r["id"], format!("sub-{i:02}"), "input order");
        match i % 3 {
            0 => {
                assert_eq!(r["status"], "succeeded", "{r}");
                assert_eq!(r["output"]["amount_cents"], 1500, "{r}");
                assert_eq!(r["attempts"], 1);
            }
            1 => {
                assert_eq!(r["status"], "failed", "{r}");
                assert_eq!(r["attempts"], 1, "declined for good: {r}");
                assert!(r["error"].as_str().unwrap().contains("declined"), "{r}");
            }
            _ => {
                assert_eq!(r["status"], "failed", "{r}");
                assert_eq!(r["attempts"], 3, "retried: {r}");
                assert!(
                    r["error"].as_str().unwrap().contains("gateway timeout"),
                    "{r}"
                );
            }
        }
    }
    // Each attempt's log is its own item's.
    let v = env.show(&id, "sub-02");
    for a in v["history"].as_array().unwrap() {
        let log = a["log"].as_str().unwrap();
        assert!(log.contains("renewing u2 on pro"), "{log}");
        assert!(!log.contains("u0 ") && !log.contains("u1 "), "{log}");
    }
}

#[test]
fn the_python_example_runs_as_a_jsonl_processor() {
    let cmd = format!(
        "python3 {}",
        repo().join("examples/python/renew.py").display()
    );
    jsonl_example(&cmd);
}

#[test]
fn the_node_example_runs_as_a_jsonl_processor() {
    let cmd = format!("node {}", repo().join("examples/node/renew.js").display());
    jsonl_example(&cmd);
}

/// A small endpoint in Python: 200 with JSON for most ids, 402 for ids
/// starting "decline", 502 for ids starting "busy"; prints its port.
const SERVER: &str = r#"
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        i = body["id"]
        if i.startswith("decline"):
            code, reply = 402, {"error": "card_declined"}
        elif i.startswith("busy"):
            code, reply = 502, {"error": "busy"}
        else:
            code, reply = 200, {"id": i, "key": self.headers["Idempotency-Key"], "token": self.headers["X-Token"]}
        data = json.dumps(reply).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

#[test]
fn an_http_endpoint_processes_items() {
    use std::io::BufRead;
    let env = Env::new();
    let script = env.write("server.py", SERVER);
    let mut server = std::process::Command::new("python3")
        .arg(&script)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let url = format!("http://127.0.0.1:{}/charge", port.trim());
    let file = env.write(
        "items.jsonl",
        "{\"id\":\"a\"}\n{\"id\":\"decline-1\"}\n{\"id\":\"busy-1\"}\n",
    );
    let mut args = vec![
        "run",
        "--items",
        file.as_str(),
        "--http",
        url.as_str(),
        "--http-header",
        "X-Token: s3cret",
        "--json",
    ];
    args.extend(FAST);
    let out = env.settle(&args);
    let _ = server.kill();
    let _ = server.wait();
    out.expect_code(0);
    assert!(
        !out.stderr.contains("s3cret"),
        "a header value is never shown"
    );
    let id = run_id(&out.json());
    let got = results(&env, &id);
    assert_eq!(
        got[0],
        json!({"id": "a", "status": "succeeded", "attempts": 1,
               "output": {"id": "a", "key": format!("{id}:a"), "token": "s3cret"}})
    );
    assert_eq!(got[1]["attempts"], 1, "{:?}", got[1]);
    assert!(
        got[1]["error"].as_str().unwrap().starts_with("HTTP 402"),
        "{:?}",
        got[1]
    );
    assert_eq!(got[2]["attempts"], 3, "{:?}", got[2]);
    assert!(
        got[2]["error"].as_str().unwrap().starts_with("HTTP 502"),
        "{:?}",
        got[2]
    );
    let status = env.settle(&["status", &id]);
    assert!(!status.stdout.contains("s3cret"));
}

#[test]
fn replay_runs_one_item_here_and_changes_nothing() {
    let env = Env::new();
    let cmd = worker(&env);
    let file = items(&env, &[("a", "ok"), ("b", "decline")]);
    let mut args = vec![
        "run",
        "--items",
        file.as_str(),
        "--exec",
        cmd.as_str(),
        "--json",
    ];
    args.extend(FAST);
    let id = run_id(&env.ok_json(&args));
    let before = (env.status(&id), env.show(&id, "b"));

    // With the run's own processor: the same failure, with its log.
    let out = env.settle(&["replay", &id, "b", "--json"]);
    out.expect_code(4);
    let v = out.json();
    assert_eq!(v["outcome"], "failed");
    assert_eq!(v["kind"], "permanent");
    assert_eq!(v["error"], "exit 65: card declined for b");
    assert_eq!(v["attempt"], 2, "the attempt after the last one");
    assert_eq!(
        v["log"],
        format!("start b attempt 2 key {id}:b\ncard declined for b\n")
    );
    // With a fixed version: its output.
    let fixed = env.settle(&[
        "replay",
        &id,
        "b",
        "--exec",
        "cat >/dev/null; echo '{\"fixed\":true}'",
    ]);
    fixed.expect_code(0);
    assert!(
        fixed.stdout.contains("Output: {\"fixed\":true}"),
        "{}",
        fixed.stdout
    );
    assert!(
        fixed.stderr.contains("rather than its own"),
        "{}",
        fixed.stderr
    );
    assert_eq!(
        (env.status(&id), env.show(&id, "b")),
        before,
        "nothing changed"
    );
    env.settle(&["replay", &id, "nope"])
        .expect_code(2)
        .stderr_has("not in run");
}

/// Milliseconds of the day of an RFC 3339 time as `show` prints it.
fn ms_of_day(t: &str) -> u64 {
    let clock = &t[11..23]; // HH:MM:SS.mmm
    let h: u64 = clock[0..2].parse().unwrap();
    let m: u64 = clock[3..5].parse().unwrap();
    let s: u64 = clock[6..8].parse().unwrap();
    let ms: u64 = clock[9..12].parse().unwrap();
    ((h * 60 + m) * 60 + s) * 1000 + ms
}

#[test]
fn a_retry_after_is_honoured_before_the_next_attempt() {
    let env = Env::new();
    let script = env.write(
        "later.py",
        format!(
            "import sys\nsys.path.insert(0, {:?})\nimport settle\n\
             def h(item, ctx):\n    if ctx.attempt == 1:\n        raise settle.RetryError('busy', retry_after_ms=1500)\n    return 'done'\n\
             settle.serve(h)\n",
            repo().join("sdk/python").display().to_string()
        ),
    );
    let file = env.write("items.jsonl", "{\"id\":\"a\"}\n");
    let cmd = format!("python3 {script}");
    // The worker's own backoff (20 ms) is far shorter than the hint.
    let mut args = vec![
        "run",
        "--items",
        file.as_str(),
        "--exec",
        cmd.as_str(),
        "--protocol",
        "jsonl",
        "--json",
    ];
    args.extend(FAST);
    let id = run_id(&env.ok_json(&args));
    let v = env.show(&id, "a");
    let h = v["history"].as_array().unwrap();
    assert_eq!(h.len(), 2, "{v}");
    assert_eq!(h[0]["error"], "busy");
    let first_end =
        ms_of_day(h[0]["started_at"].as_str().unwrap()) + h[0]["duration_ms"].as_u64().unwrap();
    let second = ms_of_day(h[1]["started_at"].as_str().unwrap());
    assert!(
        second >= first_end + 1500,
        "the retry came {} ms after the hint's start",
        second - first_end
    );
    assert_eq!(v["output"], "done");
}

/// `--concurrency N` is the most items worked on at once whatever the
/// batch size, for the scripted processor too (a worker gets every item
/// of a batch together): at 1, five items of one batch that sleep 100 ms
/// each finish at least 100 ms apart, and each attempt lasts its own
/// 100 ms, not its wait for a turn.
#[test]
fn concurrency_bounds_the_items_at_once_whatever_the_batch() {
    let env = Env::new();
    let ids: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
    let scripts: Vec<(&str, &str)> = ids.iter().map(|id| (id.as_str(), "sleep:100")).collect();
    let items = env.scripts("slow.jsonl", &scripts);
    let run = env.run(&items, &["--concurrency", "1", "--batch-size", "10"]);
    assert_run(&run, "succeeded", 5, 5, 0, 0);
    let run = run_id(&run);
    let mut ends: Vec<u128> = ids
        .iter()
        .map(|id| {
            let a = &env.show(&run, id)["history"][0];
            let started = humantime::parse_rfc3339(a["started_at"].as_str().unwrap()).unwrap();
            let started = started
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis();
            let took = a["duration_ms"].as_u64().unwrap();
            assert!(
                took < 400,
                "{id}: its wait counted in its attempt ({took} ms)"
            );
            started + u128::from(took)
        })
        .collect();
    ends.sort_unstable();
    for w in ends.windows(2) {
        // Milliseconds on both sides: 1 ms of rounding.
        assert!(w[1] - w[0] >= 99, "items finished together: {ends:?}");
    }
}

/// A jsonl command that takes one item at a time (no hello), at the
/// default concurrency: the items beyond its processes wait for one
/// outside their attempts, so none times out waiting. 48 items of 500 ms
/// over the default 4 processes per core, under a 2 s item timeout
/// (`--visibility-timeout 4`): each succeeds at its first attempt, which
/// lasts about its own 500 ms.
#[test]
fn items_waiting_for_a_one_at_a_time_process_do_not_time_out() {
    let env = Env::new();
    let script = env.write(
        "slow.sh",
        r#"while IFS= read -r line; do
  id=$(printf '%s' "$line" | sed 's/.*"id":"\([^"]*\)".*/\1/')
  sleep 0.5
  printf '{"id":"%s","status":"ok"}\n' "$id"
done
"#,
    );
    let ids: Vec<String> = (0..48).map(|i| format!("j{i:02}")).collect();
    let scripts: Vec<(&str, &str)> = ids.iter().map(|id| (id.as_str(), "ok")).collect();
    let file = env.scripts("slow.jsonl", &scripts);
    let cmd = format!("sh {script}");
    let run = env.ok_json(&[
        "run",
        "--items",
        &file,
        "--json",
        "--exec",
        &cmd,
        "--protocol",
        "jsonl",
        "--visibility-timeout",
        "4",
        "--retry-delay-ms",
        "20",
    ]);
    assert_run(&run, "succeeded", 48, 48, 0, 0);
    let run = run_id(&run);
    for id in &ids {
        let v = env.show(&run, id);
        let took = v["history"][0]["duration_ms"].as_u64().unwrap();
        assert_eq!(v["attempts"], 1, "{id}: {v}");
        assert!(took < 2000, "{id}: {took} ms");
    }
}

/// A retry-after longer than 12 h is capped at 12 h: the attempt's error
/// says so, and so does stderr, once.
#[test]
fn a_retry_after_past_twelve_hours_is_capped_and_said() {
    let env = Env::new();
    let script = env.write(
        "tomorrow.py",
        format!(
            "import sys\nsys.path.insert(0, {:?})\nimport settle\n\
             def h(item, ctx):\n    raise settle.RetryError('come back tomorrow', retry_after_ms=86400000)\n\
             settle.serve(h)\n",
            repo().join("sdk/python").display().to_string()
        ),
    );
    let file = env.write("items.jsonl", "{\"id\":\"a\"}\n{\"id\":\"b\"}\n");
    let cmd = format!("python3 {script}");
    let args = [
        "run",
        "--items",
        file.as_str(),
        "--exec",
        cmd.as_str(),
        "--protocol",
        "jsonl",
        "--retry-delay-ms",
        "20",
    ];
    let mut child = env.spawn(&args);
    let started = std::time::Instant::now();
    let errors = loop {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "no attempt was recorded"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
        let status = env.settle(&["status", "--json"]);
        if status.code != 0 {
            continue;
        }
        let id = run_id(&status.json());
        let errors: Vec<String> = ["a", "b"]
            .iter()
            .filter_map(|item| {
                let out = env.settle(&["show", &id, item, "--json"]);
                (out.code == 0).then(|| out.json())
            })
            .filter_map(|v| v["history"][0]["error"].as_str().map(str::to_owned))
            .collect();
        if errors.len() == 2 {
            break errors;
        }
    };
    for error in &errors {
        assert_eq!(
            error,
            "come back tomorrow (retry-after 86400 s capped at 43200 s)"
        );
    }
    // `status` says what the run waits for, rather than look stuck.
    let status = env.settle(&["status", "--json"]);
    let waiting = &status.json()["waiting"];
    assert_eq!(waiting["items"], 2, "{}", status.stdout);
    let until = humantime::parse_rfc3339(waiting["until"].as_str().expect("a time"))
        .expect("an RFC 3339 time");
    let ahead = until
        .duration_since(std::time::SystemTime::now())
        .expect("the wait ends in the future");
    assert!(
        ahead > std::time::Duration::from_secs(43_000)
            && ahead <= std::time::Duration::from_secs(43_200),
        "waits {ahead:?}"
    );
    let human = env.settle(&["status"]);
    assert!(
        human.stdout.contains("Waiting until ") && human.stdout.contains(" for 2 items"),
        "{}",
        human.stdout
    );
    child.kill().unwrap();
    let out = wait(child, &args);
    let said = out
        .stderr
        .matches("retries are put off by at most 43200 s")
        .count();
    assert_eq!(said, 1, "{}", out.stderr);
}
