//! `--exec CMD --protocol jsonl`, driven through the `Processor` trait with
//! real processes: sh scripts, and the Python and Node helpers of `sdk/`.
// Helpers outside #[test] functions too: a failed unwrap fails the test.
#![allow(clippy::unwrap_used)]

use serde_json::value::RawValue;
use serde_json::Value;
use settle_core::domain::{now_millis, ErrorKind, Item, ItemId, RunId};
use settle_core::{AttemptContext, ExecProtocol, Processor, ProcessorSpec};
use settle_processors::jsonl::Jsonl;
use settle_processors::{build, Parallelism};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn item(id: &str, payload: &str) -> Item {
    Item::new(
        ItemId::new(id).unwrap(),
        RawValue::from_string(payload.to_owned()).unwrap(),
    )
}

fn ctx(item: &Item) -> AttemptContext {
    AttemptContext::new(RunId::generate(now_millis()), item, 1)
}

fn output(out: Option<settle_core::domain::Output>) -> Value {
    serde_json::from_str(out.expect("an output").get()).unwrap()
}

/// A Python processor built on `sdk/python/settle.py`: `body` is the body of
/// `handle(item, ctx)`.
fn python(dir: &Path, body: &str) -> String {
    python_serving(dir, body, "")
}

/// [`python`], with `serve`'s other arguments.
fn python_serving(dir: &Path, body: &str, args: &str) -> String {
    let sdk = repo().join("sdk/python");
    let script = format!(
        "import os, sys, time\nsys.path.insert(0, {sdk:?})\nimport settle\n\n\
         def handle(item, ctx):\n{body}\n\nsettle.serve(handle{args})\n",
        sdk = sdk.display().to_string(),
        body = indent(body),
    );
    let path = dir.join("handler.py");
    std::fs::write(&path, script).unwrap();
    format!("python3 {}", path.display())
}

/// A Node processor built on `sdk/node/settle.js`: `body` is the body of
/// `async (item, ctx) => { ... }`.
fn node(dir: &Path, body: &str) -> String {
    let sdk = repo().join("sdk/node/settle.js");
    let script = format!(
        "const settle = require({sdk:?});\n\
         settle.serve(async (item, ctx) => {{\n{body}\n}});\n",
        sdk = sdk.display().to_string(),
    );
    let path = dir.join("handler.js");
    std::fs::write(&path, script).unwrap();
    format!("node {}", path.display())
}

fn indent(body: &str) -> String {
    body.lines()
        .map(|l| format!("    {l}\n"))
        .collect::<String>()
}

/// An sh processor that answers by the item's `script` payload.
fn sh(dir: &Path) -> String {
    let script = r#"
while IFS= read -r line; do
  id=$(printf '%s' "$line" | sed 's/.*"id":"\([^"]*\)".*/\1/')
  echo "working on $id" >&2
  case "$line" in
    *'"garbage"'*) echo "this is not json";;
    *'"other"'*) printf '{"id":"someone-else","status":"ok"}\n';;
    *'"hang"'*) sleep 30;;
    *'"twice"'*) printf '{"id":"%s","status":"ok"}\n{"id":"%s","status":"ok"}\n' "$id" "$id";;
    *'"crash"'*) echo "out of memory, giving up" >&2; exit 3;;
    *'"throttled-true"'*) printf '{"id":"%s","throttled":true,"retry_after_ms":1500,"error":"HTTP 429 from the gateway"}\n' "$id";;
    *'"status-throttled"'*) printf '{"id":"%s","status":"throttled"}\n' "$id";;
    *'"only-wait"'*) printf '{"id":"%s","retry_after_ms":700}\n' "$id";;
    *'"throttled-ok"'*) printf '{"id":"%s","status":"ok","throttled":true}\n' "$id";;
    *'"stray"'*)
      printf '{"id":"%s","status":"ok"}\n' "$id"
      # After the answer, between items: no item's log.
      sleep 0.2; echo "stray line between items" >&2;;
    *) printf '{"id":"%s","status":"ok","output":{"pid":%s}}\n' "$id" "$$";;
  esac
done
"#;
    let path = dir.join("answer.sh");
    std::fs::write(&path, script).unwrap();
    format!("sh {}", path.display())
}

async fn pid_of(p: &Jsonl, id: &str) -> u64 {
    let it = item(id, r#"{"script":"ok"}"#);
    let out = p.process(&it, &ctx(&it)).await.expect("ok");
    output(out)["pid"].as_u64().unwrap()
}

/// Gone, or a zombie waiting to be reaped.
fn dead(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

async fn wait_dead(pid: u64) {
    for _ in 0..100 {
        if dead(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("process {pid} is still alive");
}

#[tokio::test]
async fn ok_with_output_and_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = python(
        dir.path(),
        "print('hello from', item['id'], 'attempt', ctx.attempt, 'key', ctx.idempotency_key)\n\
         if item['payload'] is None:\n    return None\n\
         return {'echo': item['payload'], 'deadline': ctx.deadline_ms, 'run': ctx.run_id}",
    );
    let p = Jsonl::new(&cmd, 2).unwrap();
    let it = item("a-1", r#"{"n": 7}"#);
    let mut c = ctx(&it);
    let before = now_millis();
    c.deadline = Some(tokio::time::Instant::now() + Duration::from_secs(30));
    let out = output(p.process(&it, &c).await.unwrap());
    let after = now_millis();
    assert_eq!(out["echo"], serde_json::json!({"n": 7}));
    assert_eq!(out["run"], c.run.as_str());
    let deadline = out["deadline"].as_u64().unwrap();
    assert!(
        (before + 29_000..=after + 30_000).contains(&deadline),
        "deadline_ms {deadline}, 30 s after {before}..{after}"
    );
    let log = c.take_log().unwrap();
    assert_eq!(
        log,
        format!("hello from a-1 attempt 1 key {}\n", c.idempotency_key)
    );

    let it = item("a-2", "null");
    assert_eq!(p.process(&it, &ctx(&it)).await.unwrap(), None);
}

#[tokio::test]
async fn retry_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = python(
        dir.path(),
        "raise settle.RetryError('rate limited by the gateway', retry_after_ms=1500)",
    );
    let p = Jsonl::new(&cmd, 1).unwrap();
    let it = item("r", "{}");
    let e = p.process(&it, &ctx(&it)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable);
    assert_eq!(e.message, "rate limited by the gateway");
    assert_eq!(e.retry_after, Some(Duration::from_millis(1500)));
}

/// The helpers' `ThrottledError`, one at a time and several at once.
#[tokio::test]
async fn the_helpers_say_throttled() {
    let dir = tempfile::tempdir().unwrap();
    let python = python(
        dir.path(),
        "print('HTTP 429 from the gateway')\n\
         if item['payload'].get('wait'):\n    raise settle.ThrottledError('rate limited', retry_after_ms=1500)\n\
         raise settle.ThrottledError('rate limited')",
    );
    let node = node(
        dir.path(),
        "console.log('HTTP 429 from the gateway');\n\
         throw new settle.ThrottledError('rate limited', item.payload.wait ? { retryAfterMs: 1500 } : {});",
    );
    for cmd in [python, node] {
        let p = Jsonl::new(&cmd, 1).unwrap();
        for (payload, after) in [(r#"{"wait":true}"#, Some(1500)), ("{}", None)] {
            let it = item("t", payload);
            let c = ctx(&it);
            let e = p.process(&it, &c).await.unwrap_err();
            assert_eq!(
                (e.kind, e.message.as_str()),
                (ErrorKind::Throttled, "rate limited"),
                "{cmd}"
            );
            assert_eq!(e.retry_after, after.map(Duration::from_millis), "{cmd}");
            let log = c.take_log().unwrap();
            // Not an unexpected error: no stack trace in the log.
            assert_eq!(log, "HTTP 429 from the gateway\n", "{cmd}");
        }
    }
}

#[tokio::test]
async fn fail_is_permanent_and_other_errors_retry() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = node(
        dir.path(),
        "if (item.payload.card === 'declined') throw new settle.PermanentError('card declined');\n\
         if (item.payload.card === 'flaky') throw new Error('socket hang up');\n\
         if (item.payload.card === 'later') throw new settle.RetryError('busy', { retryAfterMs: 250 });\n\
         return 'charged';",
    );
    let p = Jsonl::new(&cmd, 1).unwrap();
    let it = item("d", r#"{"card":"declined"}"#);
    let e = p.process(&it, &ctx(&it)).await.unwrap_err();
    assert_eq!(
        (e.kind, e.message.as_str()),
        (ErrorKind::Permanent, "card declined")
    );

    let it = item("f", r#"{"card":"flaky"}"#);
    let c = ctx(&it);
    let e = p.process(&it, &c).await.unwrap_err();
    assert_eq!(
        (e.kind, e.message.as_str()),
        (ErrorKind::Retryable, "socket hang up")
    );
    assert!(c
        .take_log()
        .unwrap()
        .contains("Error: socket hang up\n    at"));

    let it = item("l", r#"{"card":"later"}"#);
    let e = p.process(&it, &ctx(&it)).await.unwrap_err();
    assert_eq!(e.retry_after, Some(Duration::from_millis(250)));

    let it = item("ok", r#"{"card":"fine"}"#);
    let out = p.process(&it, &ctx(&it)).await.unwrap();
    assert_eq!(out.unwrap().get(), r#""charged""#);
}

/// Each way an answer asks to slow down, and the one that contradicts itself.
#[tokio::test]
async fn throttled_answers_ask_to_slow_down() {
    let dir = tempfile::tempdir().unwrap();
    let p = Jsonl::new(&sh(dir.path()), 1).unwrap();
    let first = pid_of(&p, "before").await;
    for (script, message, after) in [
        ("throttled-true", "HTTP 429 from the gateway", Some(1500)),
        ("status-throttled", "the processor asked to slow down", None),
        ("only-wait", "the processor asked to slow down", Some(700)),
    ] {
        let it = item(script, &format!(r#"{{"script":"{script}"}}"#));
        let c = ctx(&it);
        let e = p.process(&it, &c).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Throttled, "{script}");
        assert_eq!(e.message, message, "{script}");
        assert_eq!(e.retry_after, after.map(Duration::from_millis), "{script}");
        assert_eq!(
            c.take_log().as_deref(),
            Some(&*format!("working on {script}\n"))
        );
    }
    // A throttle is a well-formed answer: the process goes on.
    assert_eq!(pid_of(&p, "after").await, first);

    let it = item("contradiction", r#"{"script":"throttled-ok"}"#);
    let e = p.process(&it, &ctx(&it)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable);
    assert!(
        e.message
            .contains(r#"is not an answer (`"throttled": true` with another status)"#),
        "{e}"
    );
    wait_dead(first).await;
}

#[tokio::test]
async fn a_crash_mid_item_fails_it_and_the_next_gets_a_fresh_process() {
    let dir = tempfile::tempdir().unwrap();
    let p = Jsonl::new(&sh(dir.path()), 1).unwrap();
    let before = pid_of(&p, "one").await;
    let it = item("two", r#"{"script":"crash"}"#);
    let c = ctx(&it);
    let e = p.process(&it, &c).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable);
    assert!(
        e.message
            .contains("exited with 3 before answering: out of memory, giving up"),
        "{e}"
    );
    assert_eq!(
        c.take_log().unwrap(),
        "working on two\nout of memory, giving up\n"
    );
    let after = pid_of(&p, "three").await;
    assert_ne!(before, after);
}

#[tokio::test]
async fn a_python_crash_keeps_its_traceback_in_the_items_log() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = python(
        dir.path(),
        "if item['payload'] == 'die':\n    print('about to die')\n    sys.stderr.flush()\n    os._exit(9)\n\
         return os.getpid()",
    );
    let p = Jsonl::new(&cmd, 1).unwrap();
    let it = item("x", r#""die""#);
    let c = ctx(&it);
    let e = p.process(&it, &c).await.unwrap_err();
    assert!(
        e.message.contains("exited with 9") && e.message.ends_with("about to die"),
        "{e}"
    );
    let it = item("y", r#""live""#);
    assert!(p.process(&it, &ctx(&it)).await.unwrap().is_some());
}

#[tokio::test]
async fn a_garbage_answer_is_quoted_and_the_process_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let p = Jsonl::new(&sh(dir.path()), 1).unwrap();
    let before = pid_of(&p, "one").await;
    let it = item("g", r#"{"script":"garbage"}"#);
    let e = p.process(&it, &ctx(&it)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable);
    assert!(
        e.message.contains("not an answer") && e.message.ends_with(r#": "this is not json""#),
        "{e}"
    );
    assert_ne!(pid_of(&p, "three").await, before);
    wait_dead(before).await;
}

#[tokio::test]
async fn an_answer_for_another_id_fails_the_item() {
    let dir = tempfile::tempdir().unwrap();
    let p = Jsonl::new(&sh(dir.path()), 1).unwrap();
    let before = pid_of(&p, "one").await;
    let it = item("mine", r#"{"script":"other"}"#);
    let e = p.process(&it, &ctx(&it)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable);
    assert!(
        e.message
            .contains(r#"answered for item "someone-else" while item "mine" was in flight"#),
        "{e}"
    );
    assert_ne!(pid_of(&p, "three").await, before);
}

#[tokio::test]
async fn a_process_that_answers_twice_is_replaced_before_the_next_item() {
    let dir = tempfile::tempdir().unwrap();
    let p = Jsonl::new(&sh(dir.path()), 1).unwrap();
    let it = item("two", r#"{"script":"twice"}"#);
    p.process(&it, &ctx(&it)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Its second line is not taken for the next item's answer.
    let it = item("next", r#"{"script":"ok"}"#);
    assert!(p.process(&it, &ctx(&it)).await.unwrap().is_some());
}

#[tokio::test]
async fn a_hang_past_the_timeout_ends_the_process_and_the_next_item_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let p = Jsonl::new(&sh(dir.path()), 1).unwrap();
    let before = pid_of(&p, "one").await;
    let it = item("h", r#"{"script":"hang"}"#);
    let c = ctx(&it);
    // As the worker does: the attempt's future is dropped at the timeout.
    let cut = tokio::time::timeout(Duration::from_millis(300), p.process(&it, &c)).await;
    assert!(cut.is_err(), "the hang was answered: {cut:?}");
    assert_eq!(c.take_log().unwrap(), "working on h\n");
    wait_dead(before).await;
    // A fresh process, and the answer is this item's (not the hang's).
    let it = item("next", r#"{"script":"ok"}"#);
    let out = output(p.process(&it, &ctx(&it)).await.unwrap());
    assert_ne!(out["pid"].as_u64().unwrap(), before);
}

#[tokio::test]
async fn the_deadline_cuts_an_attempt_off_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let p = Jsonl::new(&sh(dir.path()), 1).unwrap();
    let it = item("h", r#"{"script":"hang"}"#);
    let mut c = ctx(&it);
    c.deadline = Some(tokio::time::Instant::now() + Duration::from_millis(300));
    let e = p.process(&it, &c).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable);
    assert!(e.message.contains("no answer by the deadline"), "{e}");
    let it = item("next", r#"{"script":"ok"}"#);
    assert!(p.process(&it, &ctx(&it)).await.is_ok());
}

#[tokio::test]
async fn stderr_between_items_is_no_items_log() {
    let dir = tempfile::tempdir().unwrap();
    let p = Jsonl::new(&sh(dir.path()), 1).unwrap();
    let it = item("s", r#"{"script":"stray"}"#);
    let c = ctx(&it);
    p.process(&it, &c).await.unwrap();
    assert_eq!(c.take_log().unwrap(), "working on s\n");
    // The process writes its stray line 0.2 s after answering.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let it = item("t", r#"{"script":"ok"}"#);
    let c = ctx(&it);
    p.process(&it, &c).await.unwrap();
    assert_eq!(c.take_log().unwrap(), "working on t\n");
}

#[tokio::test]
async fn an_output_over_the_limit_is_permanent() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = python(dir.path(), "return 'x' * 70000");
    let p = Jsonl::new(&cmd, 1).unwrap();
    let it = item("big", "{}");
    let e = p.process(&it, &ctx(&it)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(e.message.contains("70002 bytes"), "{e}");
}

#[tokio::test]
async fn a_command_that_cannot_start() {
    let spec = |command: &str| ProcessorSpec::Exec {
        command: command.into(),
        protocol: ExecProtocol::Jsonl,
        permanent_exit_codes: vec![65],
    };
    let Err(e) = build(&spec("no-such-program-settle --serve"), Parallelism::of(4)) else {
        panic!("a command that is not on the PATH was accepted")
    };
    assert!(e.to_string().contains("not found on the PATH"), "{e}");
    // The shell decides what this is; it starts, says why and exits.
    let p = build(
        &spec("echo 'cannot reach the database' >&2; exit 2"),
        Parallelism::of(1),
    )
    .unwrap();
    let it = item("i", "{}");
    let c = ctx(&it);
    let e = p.process(&it, &c).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable);
    assert!(
        e.message
            .ends_with("exited with 2 before answering: cannot reach the database"),
        "{e}"
    );
    assert_eq!(c.take_log().unwrap(), "cannot reach the database\n");
}

/// A raw Python process that says hello (8 at once) and answers each item
/// from a thread of its own, so out of order, by its payload: `sleep` (s)
/// first, then `script`: "hang" (never answers), "crash" (exits 3),
/// "other" (answers for another item), else ok with its pid and a log.
fn many_at_once(dir: &Path) -> String {
    let script = r#"
import json, os, sys, threading, time
out, lock = sys.stdout, threading.Lock()
def say(obj):
    with lock:
        out.write(json.dumps(obj) + "\n")
        out.flush()
print("starting", file=sys.stderr, flush=True)
say({"hello": "settle-jsonl", "max_in_flight": 8})
def work(req):
    p = req.get("payload") or {}
    time.sleep(p.get("sleep", 0))
    script = p.get("script", "ok")
    if script == "hang":
        return
    if script == "crash":
        print("crashing", file=sys.stderr, flush=True)
        os._exit(3)
    if script == "other":
        return say({"id": "someone-else", "status": "ok"})
    print("stderr is no item's log", file=sys.stderr, flush=True)
    say({"id": req["id"], "status": "ok", "output": {"pid": os.getpid()},
         "log": "log of %s\n" % req["id"]})
for line in sys.stdin:
    threading.Thread(target=work, args=(json.loads(line),)).start()
"#;
    let path = dir.join("many.py");
    std::fs::write(&path, script).unwrap();
    format!("python3 {}", path.display())
}

async fn run_all(
    p: &Arc<Jsonl>,
    items: Vec<(String, String)>,
) -> Vec<(
    String,
    Result<Value, settle_core::domain::ProcessError>,
    String,
)> {
    let mut tasks = tokio::task::JoinSet::new();
    for (n, (id, payload)) in items.into_iter().enumerate() {
        let p = p.clone();
        tasks.spawn(async move {
            // In the order given: the first is sent first.
            tokio::time::sleep(Duration::from_millis(20 * n as u64)).await;
            let it = item(&id, &payload);
            let c = ctx(&it);
            let out = p.process(&it, &c).await.map(output);
            (id, out, c.take_log().unwrap_or_default())
        });
    }
    let mut done = Vec::new();
    while let Some(d) = tasks.join_next().await {
        done.push(d.unwrap());
    }
    done.sort_by(|a, b| a.0.cmp(&b.0));
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_says_hello_takes_many_items_answered_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let p = Arc::new(Jsonl::new(&many_at_once(dir.path()), 40).unwrap());
    let items = (0..40)
        .map(|n| {
            (
                format!("i{n:02}"),
                format!(r#"{{"sleep":{}}}"#, f64::from((40 - n) % 7) / 20.0),
            )
        })
        .collect();
    let done = run_all(&p, items).await;
    let mut pids = std::collections::BTreeSet::new();
    for (id, out, log) in &done {
        let out = out.as_ref().unwrap_or_else(|e| panic!("{id}: {e}"));
        pids.insert(out["pid"].as_u64().unwrap());
        // The item that started a process also has what it said before its hello.
        let own = format!("log of {id}\n");
        assert!(
            log == &own || log == &format!("starting\n{own}"),
            "{id}'s log: {log:?}"
        );
    }
    // 8 at once per process: processes take several items each, not one
    // per item. How many start depends on how fast python3 says hello: a
    // start slower than FIRST_WAVE_GRACE (a loaded machine) adds processes,
    // so the bound is only that some process took more than one item.
    assert!(pids.len() < 40, "{} processes for 40 items", pids.len());
}

#[tokio::test]
async fn a_hello_process_that_crashes_fails_every_item_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let p = Arc::new(Jsonl::with_limits(&many_at_once(dir.path()), 8, 1).unwrap());
    let done = run_all(
        &p,
        vec![
            ("a".into(), r#"{"sleep":1}"#.into()),
            ("b".into(), r#"{"sleep":1}"#.into()),
            ("c".into(), r#"{"sleep":0.2,"script":"crash"}"#.into()),
        ],
    )
    .await;
    for (id, out, _) in &done {
        let e = out.as_ref().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Retryable, "{id}");
        assert!(
            e.message.contains("exited with 3 before answering"),
            "{id}: {e}"
        );
    }
    // A fresh process for the next item.
    let done = run_all(&p, vec![("d".into(), "{}".into())]).await;
    assert!(done[0].1.is_ok(), "{:?}", done[0].1);
}

#[tokio::test]
async fn a_hello_process_that_answers_for_an_item_it_does_not_hold_fails_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let p = Arc::new(Jsonl::with_limits(&many_at_once(dir.path()), 8, 1).unwrap());
    let done = run_all(
        &p,
        vec![
            ("a".into(), r#"{"sleep":1}"#.into()),
            ("x".into(), r#"{"sleep":0.2,"script":"other"}"#.into()),
        ],
    )
    .await;
    for (id, out, _) in &done {
        let e = out.as_ref().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Retryable, "{id}");
        assert!(
            e.message
                .contains(r#"answered for item "someone-else", which it was not given"#),
            "{id}: {e}"
        );
    }
}

#[tokio::test]
async fn a_deadline_retires_a_hello_process_once_its_other_items_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let p = Arc::new(Jsonl::with_limits(&many_at_once(dir.path()), 8, 1).unwrap());
    // Started, and said hello: the next two share it.
    let it = item("warm", "{}");
    let pid = output(p.process(&it, &ctx(&it)).await.unwrap())["pid"]
        .as_u64()
        .unwrap();
    let hang = {
        let p = p.clone();
        tokio::spawn(async move {
            let it = item("h", r#"{"script":"hang"}"#);
            let mut c = ctx(&it);
            c.deadline = Some(tokio::time::Instant::now() + Duration::from_millis(300));
            p.process(&it, &c).await.unwrap_err()
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let it = item("slow", r#"{"sleep":0.8}"#);
    let slow = output(p.process(&it, &ctx(&it)).await.unwrap())["pid"]
        .as_u64()
        .unwrap();
    assert_eq!(slow, pid);
    let e = hang.await.unwrap();
    assert_eq!(e.kind, ErrorKind::Retryable);
    assert!(e.message.contains("no answer by the deadline"), "{e}");
    wait_dead(pid).await;
    let it = item("next", "{}");
    let next = output(p.process(&it, &ctx(&it)).await.unwrap())["pid"]
        .as_u64()
        .unwrap();
    assert_ne!(next, pid);
}

/// `log` is `id`'s 100 lines, in order, and nothing else; said briefly.
fn check_log(id: &str, log: &str) {
    let lines: Vec<&str> = log.lines().collect();
    let foreign: Vec<&&str> = lines
        .iter()
        .filter(|l| !l.starts_with(&format!("{id} ")))
        .take(3)
        .collect();
    assert!(foreign.is_empty(), "{id}'s log holds {foreign:?}");
    let expected: Vec<String> = (0..100).map(|i| format!("{id} line {i}")).collect();
    assert!(
        lines == expected,
        "{id}'s log has {} of its 100 lines, the last {:?}",
        lines.len(),
        lines.last()
    );
}

/// 200 items, 50 processes at once, each item writing 100 lines naming
/// itself: every attempt's log holds its own 100 lines, in order, and
/// nothing else. Processes are reused (4 items each on average), so every
/// boundary between two items of one process is crossed.
async fn log_isolation(cmd: String) {
    let p = Arc::new(Jsonl::new(&cmd, 50).unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..200 {
        let p = p.clone();
        tasks.spawn(async move {
            let id = format!("item-{n}");
            let it = item(&id, "{}");
            let c = ctx(&it);
            let out = p.process(&it, &c).await;
            assert!(out.is_ok(), "{id}: {out:?}");
            let log = c.take_log().unwrap_or_default();
            check_log(&id, &log);
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn log_isolation_python() {
    let dir = tempfile::tempdir().unwrap();
    log_isolation(python(
        dir.path(),
        "for i in range(100):\n    print(item['id'], 'line', i)\n    if i % 25 == 0:\n        time.sleep(0.001)\nreturn i",
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn log_isolation_python_threads() {
    let dir = tempfile::tempdir().unwrap();
    log_isolation(python_serving(
        dir.path(),
        "for i in range(100):\n    print(item['id'], 'line', i, file=sys.stderr if i % 2 else sys.stdout)\n    if i % 25 == 0:\n        time.sleep(0.001)\nreturn i",
        ", concurrency=16",
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn log_isolation_node() {
    let dir = tempfile::tempdir().unwrap();
    log_isolation(node(
        dir.path(),
        "for (let i = 0; i < 100; i++) {\n  (i % 2 ? console.log : console.error)(`${item.id} line ${i}`);\n  if (i % 25 === 0) await new Promise((r) => setTimeout(r, 1));\n}\nreturn 1;",
    ))
    .await;
}

/// The examples of `examples/` work as documented.
#[tokio::test]
async fn the_renewal_examples() {
    for cmd in [
        "python3 examples/python/renew.py",
        "node examples/node/renew.js",
    ] {
        let cmd = format!("cd {} && {cmd}", repo().display());
        let p = Jsonl::new(&cmd, 2).unwrap();
        let it = item(
            "u-1",
            r#"{"user":"u-1","plan":"pro","card":"4242424242424242"}"#,
        );
        let c = ctx(&it);
        let out = output(p.process(&it, &c).await.unwrap());
        assert_eq!(out["amount_cents"], 1500, "{cmd}");
        assert!(c.take_log().unwrap().contains("charged: ch_"), "{cmd}");
        let it = item(
            "u-2",
            r#"{"user":"u-2","plan":"pro","card":"4000000000000002"}"#,
        );
        let e = p.process(&it, &ctx(&it)).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Permanent, "{cmd}: {e}");
        let it = item(
            "u-3",
            r#"{"user":"u-3","plan":"pro","card":"4000000000009995"}"#,
        );
        let e = p.process(&it, &ctx(&it)).await.unwrap_err();
        assert_eq!(e.retry_after, Some(Duration::from_secs(60)), "{cmd}: {e}");
    }
}

/// A process that never reads its stdin: an item larger than the pipe's
/// buffer cannot even be written, and the deadline still cuts it off.
#[tokio::test]
async fn the_deadline_cuts_off_an_item_the_process_never_reads() {
    let p = Jsonl::new("sleep 30", 1).unwrap();
    let it = item("big", &format!("{:?}", "x".repeat(300_000)));
    let mut c = ctx(&it);
    c.deadline = Some(tokio::time::Instant::now() + Duration::from_millis(300));
    let started = std::time::Instant::now();
    let e = p.process(&it, &c).await.unwrap_err();
    assert!(e.message.contains("no answer by the deadline"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
