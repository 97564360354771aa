//! The worker stage over real embedded queues: each message settles on its
//! own. A malformed body, a panic or a deadline affects only its message.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test.

use serde_json::value::RawValue;
use settle_core::domain::{AttemptOutcome, ErrorKind, Item, ItemId, RunId};
use settle_core::message::{decode_results, ResultBody, WorkBody};
use settle_core::ports::{Delivery, Queue};
use settle_core::work::{delete_done, Worker, WorkerConfig};
use settle_core::Scripted;
use settle_embedded::Embedded;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const VIS: Duration = Duration::from_secs(30);

async fn open() -> (Embedded, Worker) {
    let dir = tempfile::tempdir().unwrap().keep();
    let e = Embedded::open(&dir.join("s.db")).await.unwrap();
    let worker = Worker::new(
        Arc::new(Scripted),
        Arc::new(e.work.clone()),
        Arc::new(e.dlq.clone()),
        Arc::new(e.results.clone()),
        WorkerConfig {
            retry_delay: Duration::from_millis(10),
            item_timeout: Some(Duration::from_millis(300)),
            ..WorkerConfig::default()
        },
    );
    (e, worker)
}

fn body(run: &RunId, id: &str, script: &str, max: u32) -> String {
    let payload = RawValue::from_string(format!(r#"{{"script":"{script}"}}"#)).unwrap();
    WorkBody::new(
        run.clone(),
        Item::new(ItemId::new(id).unwrap(), payload),
        0,
        max,
    )
    .encode()
}

async fn drain(q: &dyn Queue) -> Vec<Delivery> {
    let mut all = Vec::new();
    loop {
        let got = q.receive(10, VIS).await.unwrap();
        if got.is_empty() {
            return all;
        }
        all.extend(got);
    }
}

fn results(ds: &[Delivery]) -> Vec<ResultBody> {
    let mut r: Vec<ResultBody> = ds
        .iter()
        .flat_map(|d| decode_results(&d.body).unwrap())
        .collect();
    r.sort_by(|a, b| a.item.cmp(&b.item));
    r
}

#[tokio::test]
async fn each_message_settles_on_its_own() {
    let (e, worker) = open().await;
    let run = RunId::generate(0);
    e.work
        .send(vec![
            body(&run, "a-ok", "ok", 3),
            "{not a settle message".to_string(),
            body(&run, "b-panic", "panic", 3),
            body(&run, "c-perm", "permanent", 3),
            body(&run, "d-retry", "retryable:1", 3),
            body(&run, "e-hang", "sleep:60000", 3),
        ])
        .await
        .unwrap();
    let batch = e.work.receive(10, VIS).await.unwrap();
    assert_eq!(batch.len(), 6);
    let started = Instant::now();
    let resp = worker.handle(&batch, None).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the hang was cut off by the item timeout"
    );

    // The panic was the processor's: this thread (the test's, on a
    // current-thread runtime) is out of the processor again, so a panic of
    // its own would be reported as a bug.
    assert!(!settle_core::work::in_processor());

    // Every message is done: a retry is a new message, which carries the attempt on.
    assert!(resp.failures.is_empty(), "{:?}", resp.failures);

    // One result per decodable message, each with its own outcome.
    let res = results(&drain(&e.results).await);
    let outcome = |id: &str| {
        res.iter()
            .find(|r| r.item.as_str() == id)
            .unwrap()
            .attempt
            .outcome
            .clone()
    };
    assert_eq!(res.len(), 5);
    assert_eq!(outcome("a-ok"), AttemptOutcome::Succeeded);
    match outcome("b-panic") {
        AttemptOutcome::Failed {
            kind,
            error,
            terminal,
        } => {
            assert_eq!(kind, ErrorKind::Retryable);
            assert!(
                error.starts_with("panic: scripted panic for item b-panic"),
                "{error}"
            );
            assert!(!terminal);
        }
        o => panic!("{o:?}"),
    }
    assert!(matches!(
        outcome("c-perm"),
        AttemptOutcome::Failed {
            kind: ErrorKind::Permanent,
            terminal: true,
            ..
        }
    ));
    assert!(matches!(
        outcome("d-retry"),
        AttemptOutcome::Failed {
            terminal: false,
            ..
        }
    ));
    match outcome("e-hang") {
        AttemptOutcome::Failed { error, .. } => assert_eq!(error, "timed out after 300 ms"),
        o => panic!("{o:?}"),
    }

    // The DLQ holds the permanent failure (marked) and the malformed body (verbatim).
    let dead = drain(&e.dlq).await;
    assert_eq!(dead.len(), 2);
    assert!(dead.iter().any(|d| d.body == "{not a settle message"));
    let perm = dead.iter().find(|d| d.body.contains("c-perm")).unwrap();
    let perm = WorkBody::decode(&perm.body).unwrap();
    assert_eq!(perm.dead.unwrap().attempts, 1);

    // The runner deletes the batch; what stays is the next attempt of the
    // panic, the retryable failure and the hang (timed out), nothing else.
    assert_eq!(delete_done(&e.work, &batch, &resp).await.unwrap(), 6);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut next: Vec<(String, u32)> = drain(&e.work)
        .await
        .iter()
        .map(|d| {
            let b = WorkBody::decode(&d.body).unwrap();
            assert_eq!(d.receive_count, 1);
            (b.item.to_string(), b.attempt())
        })
        .collect();
    next.sort();
    assert_eq!(
        next,
        vec![
            ("b-panic".to_string(), 2),
            ("d-retry".to_string(), 2),
            ("e-hang".to_string(), 2)
        ]
    );
}

#[tokio::test]
async fn the_last_receive_and_a_receive_past_it_are_terminal() {
    let (e, worker) = open().await;
    let run = RunId::generate(0);
    e.work
        .send(vec![body(&run, "r", "retryable:9", 1)])
        .await
        .unwrap();
    let batch = e.work.receive(10, VIS).await.unwrap();
    assert!(
        worker.handle(&batch, None).await.failures.is_empty(),
        "max 1: the first failure is terminal"
    );
    let res = results(&drain(&e.results).await);
    assert!(matches!(
        res[0].attempt.outcome,
        AttemptOutcome::Failed { terminal: true, .. }
    ));

    // A receive past the limit means the last attempt never reported: record it, don't run it.
    e.work
        .send(vec![body(&run, "crashed", "ok", 1)])
        .await
        .unwrap();
    let first = e.work.receive(10, Duration::ZERO).await.unwrap();
    assert_eq!(first[0].receive_count, 1);
    // A zero visibility timeout means visible again a millisecond on.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let again = e.work.receive(10, VIS).await.unwrap();
    assert_eq!(again[0].receive_count, 2);
    // Delivered again with no outcome known: its holder may be alive
    // elsewhere, so it waits once (the item timeout plus the retry delay
    // here), its attempt unused.
    assert_eq!(worker.handle(&again, None).await.failures.len(), 1);
    assert!(drain(&e.results).await.is_empty());
    // The third, one before the queue's limit (the run's 1 plus 3 extra
    // receives), would be parked by the queue on the next: the attempt goes
    // on in a fresh message that carries its lost receives.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let third = e.work.receive(10, VIS).await.unwrap();
    assert_eq!(third[0].receive_count, 3);
    let resp = worker.handle(&third, None).await;
    assert!(resp.failures.is_empty());
    delete_done(&e.work, &third, &resp).await.unwrap();
    // After the same wait as a redelivery's.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let fresh = e.work.receive(10, VIS).await.unwrap();
    assert_eq!(fresh[0].receive_count, 1);
    let mut body = WorkBody::decode(&fresh[0].body).unwrap();
    assert_eq!((body.attempt(), body.lost_receives), (1, 2));
    assert!(drain(&e.results).await.is_empty());

    // Twice the queue's limit of lost receives: a worker that dies on the
    // attempt every time. Recorded as failed for good, not run again.
    body.lost_receives = 8;
    e.work.send(vec![body.encode()]).await.unwrap();
    let poison = e.work.receive(10, VIS).await.unwrap();
    assert!(worker.handle(&poison, None).await.failures.is_empty());
    let res = results(&drain(&e.results).await);
    match &res[0].attempt.outcome {
        AttemptOutcome::Failed {
            error, terminal, ..
        } => {
            assert!(*terminal);
            assert!(error.starts_with("no outcome after 8 receives"), "{error}");
        }
        o => panic!("a poison message must not run again: {o:?}"),
    }
}

#[tokio::test]
async fn near_the_deadline_nothing_new_starts() {
    let (e, worker) = open().await;
    let run = RunId::generate(0);
    e.work
        .send(vec![body(&run, "a", "ok", 3), body(&run, "b", "ok", 3)])
        .await
        .unwrap();
    let batch = e.work.receive(10, VIS).await.unwrap();
    // Less than the default 2 s margin remains: both go on untouched, as
    // new messages whose attempt is still the first.
    let resp = worker
        .handle(&batch, Some(Instant::now() + Duration::from_millis(500)))
        .await;
    assert!(resp.failures.is_empty());
    assert!(
        drain(&e.results).await.is_empty(),
        "no attempt was made, so none is reported"
    );
    let back = e.work.receive(10, VIS).await.unwrap();
    assert_eq!(back.len(), 2, "sent again at once");
    for d in &back {
        assert_eq!(d.receive_count, 1);
        assert_eq!(WorkBody::decode(&d.body).unwrap().attempt(), 1);
    }
}

/// Records the deadline each attempt was given.
#[derive(Debug, Default)]
struct SeesDeadline(std::sync::Mutex<Vec<Option<Instant>>>);

#[async_trait::async_trait]
impl settle_core::Processor for SeesDeadline {
    async fn process(
        &self,
        _item: &Item,
        ctx: &settle_core::AttemptContext,
    ) -> Result<Option<settle_core::domain::Output>, settle_core::ProcessError> {
        self.0.lock().unwrap().push(ctx.deadline);
        Ok(None)
    }
}

/// The attempt's deadline (which an idempotency claim lasts until) is the
/// earlier of the item timeout and the invocation's end.
#[tokio::test]
async fn the_attempt_deadline_is_the_item_timeout_or_the_invocation_end() {
    let dir = tempfile::tempdir().unwrap().keep();
    let e = Embedded::open(&dir.join("s.db")).await.unwrap();
    let seen = Arc::new(SeesDeadline::default());
    let run = RunId::generate(0);
    for (timeout, invocation, lo, hi) in [
        (Some(300), None, 250, 300),
        (Some(300), Some(10_000), 250, 300),
        (Some(60_000), Some(10_000), 9_950, 10_000),
        (None, Some(10_000), 9_950, 10_000),
    ] {
        let worker = Worker::new(
            seen.clone(),
            Arc::new(e.work.clone()),
            Arc::new(e.dlq.clone()),
            Arc::new(e.results.clone()),
            WorkerConfig {
                item_timeout: timeout.map(Duration::from_millis),
                ..WorkerConfig::default()
            },
        );
        e.work.send(vec![body(&run, "x", "ok", 3)]).await.unwrap();
        let batch = e.work.receive(10, VIS).await.unwrap();
        let start = Instant::now();
        let invocation = invocation.map(|ms| start + Duration::from_millis(ms));
        let response = worker.handle(&batch, invocation).await;
        delete_done(&e.work, &batch, &response).await.unwrap();
        let deadline = seen.0.lock().unwrap().pop().unwrap().unwrap();
        let left = deadline.duration_since(start).as_millis();
        assert!(
            (lo..=hi).contains(&left),
            "{timeout:?}/{invocation:?}: {left} ms"
        );
    }
    // Neither: no deadline.
    let worker = Worker::new(
        seen.clone(),
        Arc::new(e.work.clone()),
        Arc::new(e.dlq.clone()),
        Arc::new(e.results.clone()),
        WorkerConfig::default(),
    );
    e.work.send(vec![body(&run, "y", "ok", 3)]).await.unwrap();
    let batch = e.work.receive(10, VIS).await.unwrap();
    worker.handle(&batch, None).await;
    assert_eq!(seen.0.lock().unwrap().pop().unwrap(), None);
}

/// A processor's retry hint (an idempotency claim held elsewhere) puts the
/// retry off past the worker's own backoff; without one, the backoff rules.
#[tokio::test]
async fn a_retry_hint_lengthens_the_retry_delay() {
    let dir = tempfile::tempdir().unwrap().keep();
    let e = Embedded::open(&dir.join("s.db")).await.unwrap();
    let worker = Worker::new(
        Arc::new(settle_conformance::processors::AsksToWait(
            Duration::from_secs(2),
        )),
        Arc::new(e.work.clone()),
        Arc::new(e.dlq.clone()),
        Arc::new(e.results.clone()),
        WorkerConfig {
            retry_delay: Duration::from_millis(10),
            ..WorkerConfig::default()
        },
    );
    let run = RunId::generate(0);
    e.work
        .send(vec![
            body(&run, "wait-1", "ok", 3),
            body(&run, "now-1", "ok", 3),
        ])
        .await
        .unwrap();
    let batch = e.work.receive(10, VIS).await.unwrap();
    let response = worker.handle(&batch, None).await;
    assert!(response.failures.is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let back: Vec<String> = e
        .work
        .receive(10, VIS)
        .await
        .unwrap()
        .iter()
        .map(|d| WorkBody::decode(&d.body).unwrap().item.to_string())
        .collect();
    assert_eq!(back, vec!["now-1".to_string()], "the hinted one waits");
}

/// Writes a line naming its item to the attempt's log, then: "big" returns
/// an output over the limit, "hang" outlives the item timeout, "boom"
/// panics; anything else returns `{"id": ...}`.
#[derive(Debug)]
struct Logs;

#[async_trait::async_trait]
impl settle_core::Processor for Logs {
    async fn process(
        &self,
        item: &Item,
        ctx: &settle_core::AttemptContext,
    ) -> Result<Option<settle_core::domain::Output>, settle_core::ProcessError> {
        ctx.log(format!("working on {}\n", item.id));
        match item.id.as_str() {
            "big" => Ok(Some(
                settle_core::domain::Output::json(&"x".repeat(70_000)).unwrap(),
            )),
            "hang" => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(None)
            }
            "boom" => panic!("boom"),
            id => Ok(Some(
                settle_core::domain::Output::json(&serde_json::json!({ "id": id })).unwrap(),
            )),
        }
    }
}

/// Each attempt carries its own output and log to the results, also when
/// it timed out or panicked; an output over the limit fails permanently.
#[tokio::test]
async fn attempts_carry_their_output_and_their_own_log() {
    let dir = tempfile::tempdir().unwrap().keep();
    let e = Embedded::open(&dir.join("s.db")).await.unwrap();
    let worker = Worker::new(
        Arc::new(Logs),
        Arc::new(e.work.clone()),
        Arc::new(e.dlq.clone()),
        Arc::new(e.results.clone()),
        WorkerConfig {
            item_timeout: Some(Duration::from_millis(200)),
            ..WorkerConfig::default()
        },
    );
    let run = RunId::generate(0);
    let ids = ["a", "b", "big", "hang", "boom"];
    e.work
        .send(ids.iter().map(|id| body(&run, id, "ok", 3)).collect())
        .await
        .unwrap();
    let batch = e.work.receive(10, VIS).await.unwrap();
    assert_eq!(batch.len(), ids.len());
    worker.handle(&batch, None).await;
    let got = e.results.receive(10, VIS).await.unwrap();
    let results: Vec<_> = got
        .iter()
        .flat_map(|d| settle_core::message::decode_results(&d.body).unwrap())
        .collect();
    assert_eq!(results.len(), ids.len());
    for r in &results {
        let a = &r.attempt;
        let id = r.item.as_str();
        assert_eq!(
            a.log.as_deref(),
            Some(format!("working on {id}\n").as_str()),
            "{id}: only its own line"
        );
        match id {
            "a" | "b" => {
                assert_eq!(a.outcome, AttemptOutcome::Succeeded);
                assert_eq!(
                    a.output.as_ref().map(|o| o.get().to_owned()),
                    Some(format!(r#"{{"id":"{id}"}}"#))
                );
            }
            "big" => match &a.outcome {
                AttemptOutcome::Failed {
                    kind,
                    error,
                    terminal,
                } => {
                    assert_eq!(*kind, settle_core::domain::ErrorKind::Permanent);
                    assert!(*terminal);
                    assert!(
                        error.contains("70002 bytes") && error.contains("65536"),
                        "{error}"
                    );
                    assert!(a.output.is_none());
                }
                other => panic!("big: {other:?}"),
            },
            "hang" | "boom" => match &a.outcome {
                AttemptOutcome::Failed { kind, error, .. } => {
                    assert_eq!(*kind, settle_core::domain::ErrorKind::Retryable);
                    let want = if id == "hang" {
                        "timed out"
                    } else {
                        "panic: boom"
                    };
                    assert!(error.contains(want), "{id}: {error}");
                }
                other => panic!("{id}: {other:?}"),
            },
            other => panic!("unexpected item {other}"),
        }
    }
}

/// While a batch is in hand its messages stay hidden, however long the
/// attempt takes: a message is never delivered again (and its item never
/// processed twice) only because its visibility ran out mid-attempt.
#[tokio::test]
async fn a_batch_in_hand_keeps_its_messages_hidden() {
    let dir = tempfile::tempdir().unwrap().keep();
    let e = Embedded::open(&dir.join("s.db")).await.unwrap();
    let vis = Duration::from_secs(1);
    let worker = Worker::new(
        Arc::new(Scripted),
        Arc::new(e.work.clone()),
        Arc::new(e.dlq.clone()),
        Arc::new(e.results.clone()),
        WorkerConfig {
            visibility: Some(vis),
            ..WorkerConfig::default()
        },
    );
    let run = RunId::generate(0);
    e.work
        .send(vec![body(&run, "slow", "sleep:2500", 3)])
        .await
        .unwrap();
    let batch = e.work.receive(10, vis).await.unwrap();
    assert_eq!(batch.len(), 1);
    let handling = worker.handle(&batch, None);
    tokio::pin!(handling);
    let started = Instant::now();
    let response = loop {
        tokio::select! {
            r = &mut handling => break r,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                let again = e.work.receive(10, vis).await.unwrap();
                assert!(
                    again.is_empty(),
                    "delivered again {:?} into a 2.5 s attempt",
                    started.elapsed()
                );
            }
        }
    };
    assert!(started.elapsed() >= Duration::from_millis(2500));
    assert!(response.failures.is_empty());
    delete_done(&e.work, &batch, &response).await.unwrap();
    assert_eq!(e.work.depth().await.unwrap().total(), 0);
}

/// A batch processor: records each call's items; each item's script says
/// its outcome (`ok`, `permanent`, `big`: an oversized output), `drop`
/// leaves the last outcome out, `panic` and `hang` befall the whole call.
#[derive(Default)]
struct Batches {
    calls: std::sync::Mutex<Vec<Vec<String>>>,
}

#[async_trait::async_trait]
impl settle_core::BatchProcessor for Batches {
    async fn process_batch(
        &self,
        batch: &[settle_core::BatchAttempt],
    ) -> Vec<Result<Option<settle_core::domain::Output>, settle_core::ProcessError>> {
        use settle_core::domain::Output;
        use settle_core::ProcessError;
        let scripts: Vec<String> = batch
            .iter()
            .map(|a| {
                let v: serde_json::Value = serde_json::from_str(a.item.payload.get()).unwrap();
                v["script"].as_str().unwrap().to_owned()
            })
            .collect();
        self.calls.lock().unwrap().push(
            batch
                .iter()
                .map(|a| a.item.id.as_str().to_owned())
                .collect(),
        );
        if scripts.iter().any(|s| s == "panic") {
            panic!("the batch call broke");
        }
        if scripts.iter().any(|s| s == "hang") {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        let mut out: Vec<_> = batch
            .iter()
            .zip(&scripts)
            .map(|(a, script)| {
                a.ctx.log(format!("saw {}\n", a.item.id));
                match script.as_str() {
                    "permanent" => Err(ProcessError::permanent("no such card")),
                    "big" => Ok(Some(Output::json(&"x".repeat(70_000)).unwrap())),
                    _ => Ok(Some(Output::json(a.item.id.as_str()).unwrap())),
                }
            })
            .collect();
        if scripts.iter().any(|s| s == "drop") {
            out.pop();
        }
        out
    }
}

async fn batched(processor: Arc<Batches>) -> (Embedded, Worker) {
    let dir = tempfile::tempdir().unwrap().keep();
    let e = Embedded::open(&dir.join("s.db")).await.unwrap();
    let worker = Worker::batched(
        processor,
        Arc::new(e.work.clone()),
        Arc::new(e.dlq.clone()),
        Arc::new(e.results.clone()),
        WorkerConfig {
            retry_delay: Duration::from_millis(10),
            item_timeout: Some(Duration::from_millis(300)),
            ..WorkerConfig::default()
        },
    );
    (e, worker)
}

fn failure_of(r: &ResultBody) -> (ErrorKind, String) {
    match &r.attempt.outcome {
        AttemptOutcome::Failed { kind, error, .. } => (*kind, error.clone()),
        other => panic!("{}: {other:?}", r.item),
    }
}

#[tokio::test]
async fn a_batch_processor_gets_the_due_items_in_one_call_and_each_settles_alone() {
    let processor = Arc::new(Batches::default());
    let (e, worker) = batched(processor.clone()).await;
    let run = RunId::generate(0);
    e.work
        .send(vec![
            body(&run, "a-ok", "ok", 3),
            "{not a settle message".to_string(),
            body(&run, "b-perm", "permanent", 3),
            body(&run, "c-big", "big", 3),
            // The call's answer leaves out the last item's outcome.
            body(&run, "d-dropped", "drop", 3),
        ])
        .await
        .unwrap();
    let batch = e.work.receive(10, VIS).await.unwrap();
    let resp = worker.handle(&batch, None).await;

    // One call, with the decodable messages only, in the batch's order.
    let calls = processor.calls.lock().unwrap().clone();
    assert_eq!(calls, vec![vec!["a-ok", "b-perm", "c-big", "d-dropped"]]);

    // The dropped outcome is retried: its next attempt is queued.
    assert!(resp.failures.is_empty());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let next = drain(&e.work).await;
    assert_eq!(next.len(), 1);
    assert_eq!(
        WorkBody::decode(&next[0].body).unwrap().item.as_str(),
        "d-dropped"
    );
    let res = results(&drain(&e.results).await);
    assert_eq!(res.len(), 4);
    assert_eq!(res[0].attempt.outcome, AttemptOutcome::Succeeded);
    assert_eq!(res[0].attempt.output.as_ref().unwrap().get(), r#""a-ok""#);
    assert_eq!(
        failure_of(&res[1]),
        (ErrorKind::Permanent, "no such card".into())
    );
    let (kind, error) = failure_of(&res[2]);
    assert_eq!(kind, ErrorKind::Permanent);
    assert!(error.contains("may be at most 65536"), "{error}");
    assert_eq!(
        failure_of(&res[3]),
        (
            ErrorKind::Retryable,
            "the batch processor gave no outcome for this item".into()
        )
    );
    // Each attempt keeps the log written for its own item.
    for r in &res {
        let want = format!("saw {}\n", r.item);
        assert_eq!(r.attempt.log.as_deref(), Some(want.as_str()));
    }
    // The malformed body and the two permanent failures are parked.
    assert_eq!(drain(&e.dlq).await.len(), 3);
}

#[tokio::test]
async fn a_panic_or_a_hang_of_the_call_fails_its_items_retryably() {
    for (script, want) in [
        ("panic", "panic: the batch call broke"),
        ("hang", "timed out after 300 ms"),
    ] {
        let processor = Arc::new(Batches::default());
        let (e, worker) = batched(processor.clone()).await;
        let run = RunId::generate(0);
        e.work
            .send(vec![body(&run, "a", "ok", 3), body(&run, "b", script, 3)])
            .await
            .unwrap();
        let batch = e.work.receive(10, VIS).await.unwrap();
        let started = Instant::now();
        let resp = worker.handle(&batch, None).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!settle_core::work::in_processor());
        assert!(resp.failures.is_empty(), "{script}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(drain(&e.work).await.len(), 2, "{script}: both retried");
        let res = results(&drain(&e.results).await);
        for r in &res {
            assert_eq!(
                failure_of(r),
                (ErrorKind::Retryable, want.to_owned()),
                "{script}"
            );
        }
        assert_eq!(res.len(), 2);
    }
}

#[tokio::test]
async fn a_batch_with_nothing_due_makes_no_call() {
    let processor = Arc::new(Batches::default());
    let (e, worker) = batched(processor.clone()).await;
    e.work
        .send(vec!["{not a settle message".to_string()])
        .await
        .unwrap();
    let batch = e.work.receive(10, VIS).await.unwrap();
    let resp = worker.handle(&batch, None).await;
    assert!(resp.failures.is_empty());
    assert!(processor.calls.lock().unwrap().is_empty());
    assert_eq!(drain(&e.dlq).await.len(), 1);
}

/// A copy of a message delivered again while its attempt still runs, or
/// after it settled but before its delete landed (a visibility timeout
/// shorter than a stalled queue call), does not run the processor again:
/// the held one is handed back for later, the settled one acknowledged.
#[tokio::test]
async fn copies_of_held_or_settled_messages_do_not_run_again() {
    let (e, worker) = open().await;
    let run = RunId::generate(0);
    e.work
        .send(vec![
            body(&run, "perm", "permanent", 3),
            body(&run, "slow", "sleep:200", 3),
        ])
        .await
        .unwrap();
    let batch = e.work.receive(10, VIS).await.unwrap();
    assert_eq!(batch.len(), 2);
    let slow: Vec<Delivery> = batch
        .iter()
        .filter(|d| d.body.contains("sleep"))
        .cloned()
        .collect();

    // The slow item's copy arrives while its attempt runs: handed back.
    let (first, copy) = tokio::join!(worker.handle(&batch, None), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        worker.handle(&slow, None).await
    });
    assert!(first.failures.is_empty(), "{first:?}");
    assert_eq!(copy.failures, vec![slow[0].message_id.clone()]);

    // Both settled: copies of either are acknowledged, not run.
    let again = worker.handle(&batch, None).await;
    assert!(again.failures.is_empty(), "{again:?}");

    // One attempt each: one result per item, one dead letter.
    let reported = results(&drain(&e.results).await);
    let ids: Vec<&str> = reported.iter().map(|r| r.item.as_str()).collect();
    assert_eq!(ids, ["perm", "slow"]);
    assert_eq!(drain(&e.dlq).await.len(), 1);
}

/// The batch response counts what each run's attempts came to (the
/// worker function's metrics).
#[tokio::test]
async fn the_response_counts_each_runs_attempts() {
    let (e, worker) = open().await;
    let (run, other) = (RunId::generate(0), RunId::generate(1));
    let mut redriven = WorkBody::decode(&body(&run, "back", "ok", 3)).unwrap();
    redriven.redrive = Some("pass".into());
    e.work
        .send(vec![
            body(&run, "a-ok", "ok", 3),
            body(&run, "b-perm", "permanent", 3),
            body(&run, "c-retry", "retryable:1", 3),
            redriven.encode(),
            body(&other, "d-ok", "ok", 3),
        ])
        .await
        .unwrap();
    let batch = e.work.receive(10, VIS).await.unwrap();
    let response = worker.handle(&batch, None).await;
    let mine = &response.runs[&run];
    assert_eq!(
        (
            mine.succeeded,
            mine.failed,
            mine.retried,
            mine.dead_lettered,
            mine.redriven,
            mine.durations_ms.len()
        ),
        (2, 1, 1, 1, 1, 4)
    );
    let theirs = &response.runs[&other];
    assert_eq!((theirs.succeeded, theirs.durations_ms.len()), (1, 1));
    assert_eq!(response.runs.len(), 2);
}

/// A fresh database, a worker over it with `processor` and `config`, and
/// a batch of `n` items that succeed (in hand, received).
async fn in_hand(
    processor: Arc<dyn settle_core::Processor>,
    config: WorkerConfig,
    n: usize,
) -> (Embedded, Worker, Vec<Delivery>) {
    let dir = tempfile::tempdir().unwrap().keep();
    let e = Embedded::open(&dir.join("s.db")).await.unwrap();
    let worker = Worker::new(
        processor,
        Arc::new(e.work.clone()),
        Arc::new(e.dlq.clone()),
        Arc::new(e.results.clone()),
        config,
    );
    let run = RunId::generate(0);
    e.work
        .send(
            (0..n)
                .map(|i| body(&run, &format!("i{i}"), "ok", 3))
                .collect(),
        )
        .await
        .unwrap();
    let batch = e.work.receive(10, VIS).await.unwrap();
    assert_eq!(batch.len(), n);
    (e, worker, batch)
}

/// Counts the attempts in its hands, and the most at once; each takes 100 ms.
#[derive(Default)]
struct Counting {
    now: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl settle_core::Processor for Counting {
    async fn process(
        &self,
        _: &Item,
        _: &settle_core::AttemptContext,
    ) -> Result<Option<settle_core::domain::Output>, settle_core::domain::ProcessError> {
        use std::sync::atomic::Ordering::SeqCst;
        let n = self.now.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(n, SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.now.fetch_sub(1, SeqCst);
        Ok(None)
    }
}

/// With items at once bounded, a batch's items take turns, and an item's
/// wait for its turn is no part of its attempt: eight items of 100 ms at
/// one at a time all succeed under a 400 ms item timeout, each attempt
/// lasting its own 100 ms.
#[tokio::test]
async fn bounded_items_take_turns_without_their_wait_counting() {
    let counting = Arc::new(Counting::default());
    let config = WorkerConfig {
        item_timeout: Some(Duration::from_millis(400)),
        visibility: Some(VIS),
        concurrency: Some(1),
        ..WorkerConfig::default()
    };
    let (e, worker, batch) = in_hand(counting.clone(), config, 8).await;
    let resp = worker.handle(&batch, None).await;
    assert!(resp.failures.is_empty(), "{:?}", resp.failures);
    assert_eq!(counting.most.load(std::sync::atomic::Ordering::SeqCst), 1);
    let res = results(&drain(&e.results).await);
    assert_eq!(res.len(), 8);
    for r in &res {
        assert_eq!(r.attempt.outcome, AttemptOutcome::Succeeded, "{r:?}");
        assert!(
            r.attempt.duration_ms < 400,
            "{}: the wait counted in its attempt ({} ms)",
            r.item.as_str(),
            r.attempt.duration_ms
        );
    }
}

/// What a processor says it can take at once bounds the items started
/// too, under the worker's own bound.
#[tokio::test]
async fn a_processors_capacity_bounds_the_items_at_once() {
    struct Two(Counting);
    #[async_trait::async_trait]
    impl settle_core::Processor for Two {
        async fn process(
            &self,
            item: &Item,
            ctx: &settle_core::AttemptContext,
        ) -> Result<Option<settle_core::domain::Output>, settle_core::domain::ProcessError>
        {
            self.0.process(item, ctx).await
        }
        fn capacity(&self) -> Option<usize> {
            Some(2)
        }
    }
    let two = Arc::new(Two(Counting::default()));
    let config = WorkerConfig {
        item_timeout: Some(Duration::from_millis(400)),
        visibility: Some(VIS),
        concurrency: Some(8),
        ..WorkerConfig::default()
    };
    let (_e, worker, batch) = in_hand(two.clone(), config, 8).await;
    let resp = worker.handle(&batch, None).await;
    assert!(resp.failures.is_empty(), "{:?}", resp.failures);
    assert_eq!(two.0.most.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// An item that waited for its place into the invocation's last margin is
/// not started: it goes back untouched, as one that arrived then would.
#[tokio::test]
async fn an_item_that_waited_into_the_deadline_margin_is_not_started() {
    let config = WorkerConfig {
        visibility: Some(VIS),
        concurrency: Some(1),
        deadline_margin: Duration::from_millis(100),
        ..WorkerConfig::default()
    };
    let (e, worker, batch) = in_hand(Arc::new(Counting::default()), config, 4).await;
    // Four items of 100 ms, one at a time, 250 ms before the end: the
    // fourth could start at 300 ms at the earliest.
    let now = settle_core::domain::now_millis();
    let resp = worker
        .handle(&batch, Some(Instant::now() + Duration::from_millis(250)))
        .await;
    let res = results(&drain(&e.results).await);
    assert!(!res.is_empty() && res.len() < 4, "{res:?}");
    for r in &res {
        assert!(
            r.attempt.started_at <= now + 150 + 1,
            "{} started inside the margin",
            r.item.as_str()
        );
    }
    // The others went on as new messages, their first attempt unused.
    assert!(resp.failures.is_empty(), "{:?}", resp.failures);
    let back = drain(&e.work).await;
    assert_eq!(back.len(), 4 - res.len());
    assert!(back
        .iter()
        .all(|d| WorkBody::decode(&d.body).unwrap().attempt() == 1));
}
