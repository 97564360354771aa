//! `infra/events/dispatcher-schedule.json` and manual payloads through the
//! dispatcher handler, on the embedded backend.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test.

mod common;

use async_trait::async_trait;
use common::*;
use settle_core::message::WorkBody;
use settle_core::ports::{BoxError, Queue};
use settle_core::{Ledger, RunConfig, RunId, Source};
use settle_embedded::Embedded;
use settle_lambda::dispatcher::{derived_run_id, DispatchError};
use settle_lambda::{Continuation, DispatchOutcome, DispatchRequest, DispatcherFunction};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

/// Records the runs handed to a fresh invocation instead of invoking one.
#[derive(Debug, Default)]
struct Recorded(Mutex<Vec<RunId>>);

#[async_trait]
impl Continuation for Recorded {
    async fn resume_later(&self, run: &RunId) -> Result<(), BoxError> {
        self.0.lock().unwrap().push(run.clone());
        Ok(())
    }
}

async fn setup(items: usize) -> (Embedded, DispatcherFunction, Arc<Recorded>) {
    let e = embedded().await;
    load(
        &e,
        (0..items)
            .map(|i| item(&format!("sub-{i:06}"), "ok"))
            .collect(),
    )
    .await;
    let cont = Arc::new(Recorded::default());
    let queue_max = e.work.max_receives().await.unwrap();
    assert_eq!(queue_max, Some(6));
    let f = DispatcherFunction::new(e.backend(), RunConfig::default(), queue_max, cont.clone())
        .unwrap();
    (e, f, cont)
}

async fn work_items(e: &Embedded) -> Vec<(RunId, String)> {
    drain(&e.work)
        .await
        .iter()
        .map(|d| {
            let b = WorkBody::decode(&d.body).unwrap();
            (b.run, b.item.to_string())
        })
        .collect()
}

#[tokio::test]
async fn the_schedule_fixture_dispatches_a_run_and_its_retry_resumes_it() {
    let (e, f, cont) = setup(25).await;
    let request = DispatchRequest::parse(&fixture_json("dispatcher-schedule.json")).unwrap();
    let summary = f.handle(request.clone(), "req-1", None).await.unwrap();
    let run = summary.run_id.clone().unwrap();
    // 2026-11-24T02:00:00Z and the event id name the run.
    assert_eq!(
        run,
        derived_run_id(1_795_485_600_000, "5f1e2d3c-4b5a-4697-8877-a6b5c4d3e2f1")
    );
    assert!(run.as_str().starts_with("r20261124T020000Z-"));
    assert_eq!(
        serde_json::to_value(&summary).unwrap(),
        serde_json::json!({"run_id": run.as_str(), "outcome": "done", "enqueued": 25, "total": 25})
    );
    let record = e.store.run(&run).await.unwrap().unwrap();
    assert!(record.dispatched);
    assert_eq!(record.config, RunConfig::default());
    assert!(cont.0.lock().unwrap().is_empty());

    // Lambda retries the same event (say the response was lost): same run, nothing new sent.
    load(&e, vec![item("late-1", "ok")]).await;
    let again = f.handle(request, "req-1-retry", None).await.unwrap();
    assert_eq!(again.run_id.as_ref(), Some(&run));
    assert_eq!((again.enqueued, again.total), (25, 25));
    let sent = work_items(&e).await;
    assert_eq!(sent.len(), 25);
    assert!(sent.iter().all(|(r, _)| r == &run));
    assert_eq!(
        e.store.pending().await.unwrap(),
        1,
        "the late item waits for the next tick"
    );
}

#[tokio::test]
async fn overlapping_ticks_never_dispatch_an_item_twice() {
    let (e, f, _) = setup(2500).await;
    let tick = |id: &str| {
        let mut v = fixture_json("dispatcher-schedule.json");
        v["id"] = id.into();
        DispatchRequest::parse(&v).unwrap()
    };
    let (a, b) = tokio::join!(
        f.handle(tick("tick-a"), "req-a", None),
        f.handle(tick("tick-b"), "req-b", None)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.run_id, b.run_id);
    assert_eq!(a.total + b.total, 2500);
    let sent = work_items(&e).await;
    let ids: HashSet<&String> = sent.iter().map(|(_, i)| i).collect();
    assert_eq!((sent.len(), ids.len()), (2500, 2500));
}

#[tokio::test]
async fn time_running_short_hands_the_run_to_a_fresh_invocation() {
    let (e, f, cont) = setup(30).await;
    // The stop time is already here: the run is created, then handed over.
    let first = f
        .handle(
            DispatchRequest::parse(&serde_json::json!({})).unwrap(),
            "req-1",
            Some(Instant::now()),
        )
        .await
        .unwrap();
    assert_eq!(first.outcome, DispatchOutcome::Continued);
    let run = first.run_id.unwrap();
    assert_eq!(
        cont.0.lock().unwrap().as_slice(),
        std::slice::from_ref(&run)
    );

    // The continuation's payload, as the self-invoke sends it.
    let payload = serde_json::json!({ "resume": run.as_str() });
    let done = f
        .handle(DispatchRequest::parse(&payload).unwrap(), "req-2", None)
        .await
        .unwrap();
    assert_eq!(done.outcome, DispatchOutcome::Done);
    assert_eq!((done.enqueued, done.total), (30, 30));
    assert_eq!(work_items(&e).await.len(), 30);
}

#[tokio::test]
async fn manual_settings_are_used_and_a_bad_max_receives_creates_nothing() {
    let (e, f, _) = setup(3).await;
    let err = f
        .handle(
            DispatchRequest::parse(&serde_json::json!({"max_receives": 6})).unwrap(),
            "req-1",
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            DispatchError::MaxReceives {
                run_max: 6,
                queue_max: 6
            }
        ),
        "{err}"
    );
    assert!(e.store.runs(10).await.unwrap().is_empty());
    assert_eq!(e.work.depth().await.unwrap().total(), 0);

    let ok = f
        .handle(
            DispatchRequest::parse(
                &serde_json::json!({"max_receives": 5, "tolerated_failure_percent": 10}),
            )
            .unwrap(),
            "req-2",
            None,
        )
        .await
        .unwrap();
    let record = e
        .store
        .run(ok.run_id.as_ref().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.config.max_receives, 5);
    assert_eq!(record.config.tolerated_failure_percent, 10.0);
    assert!(work_items(&e)
        .await
        .iter()
        .all(|(r, _)| r == ok.run_id.as_ref().unwrap()));
}

#[tokio::test]
async fn bad_defaults_fail_at_cold_start_and_unknown_runs_are_named() {
    let (e, f, cont) = setup(0).await;
    let err = DispatcherFunction::new(
        e.backend(),
        RunConfig {
            max_receives: 6,
            ..RunConfig::default()
        },
        Some(6),
        cont.clone(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("must be below the work queue's maxReceiveCount"),
        "{err}"
    );
    let err = DispatcherFunction::new(e.backend(), RunConfig::default(), None, cont).unwrap_err();
    assert!(err.to_string().contains("no redrive policy"), "{err}");

    let missing = "r20261124T020000Z-000000";
    let err = f
        .handle(
            DispatchRequest::parse(&serde_json::json!({ "resume": missing })).unwrap(),
            "req",
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), format!("run {missing} not found"));

    // Nothing pending: a tick leaves no empty run behind.
    let request = DispatchRequest::parse(&fixture_json("dispatcher-schedule.json")).unwrap();
    let summary = f.handle(request, "req", None).await.unwrap();
    assert_eq!(summary.outcome, DispatchOutcome::NothingPending);
    assert!(e.store.runs(10).await.unwrap().is_empty());
}

/// A scheduled tick with nothing in flight reconciles a run whose work
/// message the queue dead-lettered unanswered: the item is counted failed
/// and the run settles, with no operator.
#[tokio::test]
async fn a_quiet_tick_reconciles_messages_the_queue_parked() {
    use settle_core::reduce::reduce;
    use std::time::Duration;
    let e = embedded().await;
    let run = fixture_run(&e, &[("sub-000001", "ok")]).await;
    let body = WorkBody::new(run.clone(), item("sub-000001", "ok"), 0, 3).encode();
    e.work.send(vec![body]).await.unwrap();
    // Received to the queue's limit (6) and never answered.
    let mut receives = 0;
    while e.dlq.depth().await.unwrap().total() == 0 {
        receives += e.work.receive(1, Duration::ZERO).await.unwrap().len();
        assert!(receives <= 6, "the queue never parked the message");
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    assert_eq!(receives, 6);

    let queue_max = e.work.max_receives().await.unwrap();
    let f = DispatcherFunction::new(
        e.backend(),
        RunConfig::default(),
        queue_max,
        Arc::new(Recorded::default()),
    )
    .unwrap();
    let tick = DispatchRequest::parse(&fixture_json("dispatcher-schedule.json")).unwrap();
    let summary = f.handle(tick, "req-1", None).await.unwrap();
    assert_eq!(summary.outcome, DispatchOutcome::NothingPending);
    let results = drain(&e.results).await;
    assert_eq!(results.len(), 1, "one terminal failure for the reducer");
    reduce(&e.store, &results).await;
    let r = e.store.run(&run).await.unwrap().unwrap();
    assert_eq!((r.succeeded, r.failed, r.pending()), (0, 1, 0));
    let dead = drain(&e.dlq).await;
    let marked = WorkBody::decode(&dead[0].body).unwrap();
    assert!(marked.dead.unwrap().error.contains("dead-lettered"));
}
