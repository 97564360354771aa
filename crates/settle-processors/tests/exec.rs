//! `--exec CMD`, a process per attempt: each row of the contract table in
//! `src/exec.rs`, driven through the `Processor` trait with real commands.
// Helpers outside #[test] functions too: a failed unwrap fails the test.
#![allow(clippy::unwrap_used)]

use serde_json::value::RawValue;
use serde_json::Value;
use settle_core::domain::{now_millis, ErrorKind, Item, ItemId, RunId};
use settle_core::{AttemptContext, Processor};
use settle_processors::exec::Exec;
use settle_processors::EXIT_THROTTLED;
use std::sync::Arc;
use std::time::Duration;

fn item(id: &str, payload: &str) -> Item {
    Item::new(
        ItemId::new(id).unwrap(),
        RawValue::from_string(payload.to_owned()).unwrap(),
    )
}

fn ctx(item: &Item) -> AttemptContext {
    AttemptContext::new(RunId::generate(now_millis()), item, 1)
}

fn exec(command: &str) -> Exec {
    Exec::new(command, vec![65], 4).unwrap()
}

async fn run(p: &Exec, payload: &str) -> Result<Option<String>, settle_core::domain::ProcessError> {
    let it = item("i", payload);
    p.process(&it, &ctx(&it))
        .await
        .map(|o| o.map(|o| o.get().to_owned()))
}

#[tokio::test]
async fn exit_0_with_json_non_json_and_no_output() {
    let out = run(&exec(r#"cat >/dev/null; echo '{"charged": 1500}'"#), "{}").await;
    assert_eq!(out.unwrap().as_deref(), Some(r#"{"charged": 1500}"#));
    let out = run(&exec("echo renewed until May"), "{}").await.unwrap();
    let text: Value = serde_json::from_str(&out.unwrap()).unwrap();
    assert_eq!(text.as_str().map(str::trim_end), Some("renewed until May"));
    assert_eq!(run(&exec("true"), "{}").await.unwrap(), None);
}

#[tokio::test]
async fn exit_65_is_permanent_with_the_last_stderr_line() {
    let e = run(
        &exec("echo 'checking' >&2; echo 'card declined' >&2; exit 65"),
        "{}",
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert_eq!(e.message, "exit 65: card declined");
    // --permanent-exit-codes adds codes of the user's choosing.
    let p = Exec::new("exit 3", vec![65, 3], 1).unwrap();
    let e = run(&p, "{}").await.unwrap_err();
    assert_eq!(
        (e.kind, e.message.as_str()),
        (ErrorKind::Permanent, "exit 3")
    );
}

#[tokio::test]
async fn exit_75_is_throttled_with_the_last_stderr_line() {
    assert_eq!(EXIT_THROTTLED, 75);
    let e = run(
        &exec("echo 'calling the gateway' >&2; echo 'HTTP 429: slow down' >&2; exit 75"),
        "{}",
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Throttled);
    assert_eq!(e.message, "exit 75: HTTP 429: slow down");
    assert_eq!(e.retry_after, None);
}

#[tokio::test]
async fn exit_75_takes_its_retry_after_from_stdout() {
    let e = run(
        &exec(r#"echo '{"retry_after_ms": 2500}'; echo 'rate limited' >&2; exit 75"#),
        "{}",
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Throttled);
    assert_eq!(e.message, "exit 75: rate limited");
    assert_eq!(e.retry_after, Some(Duration::from_millis(2500)));

    // Anything else on stdout is no retry-after, and the log says why; the
    // attempt is throttled all the same.
    for stdout in ["soon", r#"{"retry_after_ms": -1}"#, "[1]"] {
        let p = exec(&format!("echo '{stdout}'; exit 75"));
        let it = item("i", "{}");
        let c = ctx(&it);
        let e = p.process(&it, &c).await.unwrap_err();
        assert_eq!(
            (e.kind, e.retry_after),
            (ErrorKind::Throttled, None),
            "{stdout}"
        );
        let log = c.take_log().unwrap_or_default();
        assert!(
            log.contains(r#"[settle: exit 75 with a stdout that is not {"retry_after_ms": N}"#),
            "{stdout}: {log}"
        );
    }
    // A JSON object without the field is no retry-after either, silently.
    let e = run(&exec(r#"echo '{"wait": "a bit"}'; exit 75"#), "{}")
        .await
        .unwrap_err();
    assert_eq!((e.kind, e.retry_after), (ErrorKind::Throttled, None));
}

#[tokio::test]
async fn exit_75_named_a_permanent_exit_code_is_permanent() {
    let p = Exec::new("exit 75", vec![65, 75], 1).unwrap();
    let e = run(&p, "{}").await.unwrap_err();
    assert_eq!(
        (e.kind, e.message.as_str()),
        (ErrorKind::Permanent, "exit 75")
    );
}

#[tokio::test]
async fn another_exit_is_retryable_with_the_last_stderr_line() {
    let e = run(
        &exec("echo 'connecting' >&2; echo 'database unreachable' >&2; echo >&2; exit 1"),
        "{}",
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable);
    assert_eq!(e.message, "exit 1: database unreachable");
}

#[tokio::test]
async fn death_by_a_signal_is_retryable() {
    let e = run(&exec("echo 'about to be killed' >&2; kill -9 $$"), "{}")
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable);
    assert_eq!(e.message, "killed by signal 9: about to be killed");
}

#[tokio::test]
async fn the_item_and_its_attempt_are_on_stdin_and_in_the_environment() {
    let p = exec(
        r#"printf '{"stdin": %s, "run": "%s", "id": "%s", "attempt": %s, "key": "%s", "deadline": %s}' "$(cat)" "$SETTLE_RUN_ID" "$SETTLE_ITEM_ID" "$SETTLE_ATTEMPT" "$SETTLE_IDEMPOTENCY_KEY" "${SETTLE_DEADLINE_MS:-null}""#,
    );
    let it = item("user-7", r#"{"plan":"pro"}"#);
    let mut c = AttemptContext::new(RunId::generate(now_millis()), &it, 3);
    let out = p.process(&it, &c).await.unwrap().unwrap();
    let v: Value = serde_json::from_str(out.get()).unwrap();
    assert_eq!(v["stdin"]["id"], "user-7");
    assert_eq!(v["stdin"]["payload"], serde_json::json!({"plan": "pro"}));
    assert_eq!(v["stdin"]["run_id"], c.run.as_str());
    assert_eq!(v["stdin"]["attempt"], 3);
    assert_eq!(v["stdin"]["idempotency_key"], c.idempotency_key.as_str());
    assert_eq!(v["run"], c.run.as_str());
    assert_eq!(v["id"], "user-7");
    assert_eq!(v["attempt"], 3);
    assert_eq!(v["key"], c.idempotency_key.as_str());
    assert_eq!(
        v["deadline"],
        Value::Null,
        "no deadline, no SETTLE_DEADLINE_MS"
    );

    let before = now_millis();
    c.deadline = Some(tokio::time::Instant::now() + Duration::from_secs(60));
    let out = p.process(&it, &c).await.unwrap().unwrap();
    let after = now_millis();
    let v: Value = serde_json::from_str(out.get()).unwrap();
    let deadline = v["deadline"].as_u64().unwrap();
    assert!((before + 59_000..=after + 60_000).contains(&deadline));
    assert_eq!(v["stdin"]["deadline_ms"], deadline);
}

#[tokio::test]
async fn an_output_over_the_limit_is_permanent() {
    let e = run(&exec("head -c 70000 /dev/zero | tr '\\0' x"), "{}")
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(e.message.starts_with("the output is 70000 bytes"), "{e}");
}

/// Gone, or a zombie waiting to be reaped.
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test]
async fn the_timeout_kills_the_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    // A background sleep that outlives its shell unless the group is
    // killed, and a shell that hangs.
    let p = exec(&format!(
        "sleep 300 & echo $! > {pids}.tmp; echo $$ >> {pids}.tmp; mv {pids}.tmp {pids}; echo 'waiting' >&2; wait",
        pids = pids.display()
    ));
    let it = item("hang", "{}");
    let c = ctx(&it);
    // As the worker does: the attempt's future is dropped at the timeout.
    let cut = tokio::time::timeout(Duration::from_millis(500), p.process(&it, &c)).await;
    assert!(cut.is_err(), "the hang ended by itself: {cut:?}");
    assert_eq!(c.take_log().as_deref(), Some("waiting\n"));
    let pids: Vec<u32> = std::fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2);
    for _ in 0..100 {
        if pids.iter().all(|&pid| dead(pid)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let alive: Vec<&u32> = pids.iter().filter(|&&pid| !dead(pid)).collect();
    panic!("left behind: {alive:?}");
}

/// 100 items, 50 processes at once, each writing 100 lines naming its item:
/// every attempt's log holds its own 100 lines, in order, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn log_isolation() {
    let p = Arc::new(
        Exec::new(
            r#"i=0; while [ $i -lt 100 ]; do echo "$SETTLE_ITEM_ID line $i" >&2; i=$((i+1)); done"#,
            vec![65],
            50,
        )
        .unwrap(),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..100 {
        let p = p.clone();
        tasks.spawn(async move {
            let id = format!("item-{n}");
            let it = item(&id, "{}");
            let c = ctx(&it);
            let out = p.process(&it, &c).await;
            assert!(out.is_ok(), "{id}: {out:?}");
            let log = c.take_log().unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let foreign: Vec<&&str> = lines
                .iter()
                .filter(|l| !l.starts_with(&format!("{id} ")))
                .take(3)
                .collect();
            assert!(foreign.is_empty(), "{id}'s log holds {foreign:?}");
            let expected: Vec<String> = (0..100).map(|i| format!("{id} line {i}")).collect();
            assert!(lines == expected, "{id}'s log has {} lines", lines.len());
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}
