//! `infra/events/worker-sqs.json` through the worker handler, on the
//! embedded backend: the "ok", "permanent", "panic" and undecodable records
//! each settle on their own, and only the panic is retried: as a new
//! message that carries its next attempt.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test.

mod common;

use common::*;
use settle_core::domain::{AttemptOutcome, ErrorKind, ItemId, ItemStatus};
use settle_core::message::{decode_results, ResultBody, WorkBody};
use settle_core::work::WorkerConfig;
use settle_core::{Ledger, Scripted};
use settle_lambda::{ReducerFunction, WorkerFunction};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const OK: &str = "7b2c1d3e-4f50-4a61-8b72-9c83d4e5f601";
const UNDECODABLE: &str = "7b2c1d3e-4f50-4a61-8b72-9c83d4e5f604";

const ITEMS: &[(&str, &str)] = &[
    ("sub-000001", "ok"),
    ("sub-000002", "permanent"),
    ("sub-000003", "panic"),
];

fn worker(e: &settle_embedded::Embedded) -> WorkerFunction {
    WorkerFunction::new(
        &e.backend(),
        Arc::new(Scripted),
        WorkerConfig {
            item_timeout: Some(Duration::from_secs(5)),
            ..WorkerConfig::default()
        },
    )
}

#[test]
fn fixture_bodies_are_the_cores_encoding() {
    let event = sqs_fixture("worker-sqs.json");
    let mut decoded = 0;
    for r in &event.records {
        let body = r.body.as_deref().unwrap();
        match WorkBody::decode(body) {
            Ok(b) => {
                assert_eq!(b.encode(), body, "record {:?}", r.message_id);
                decoded += 1;
            }
            Err(_) => assert_eq!(r.message_id.as_deref(), Some(UNDECODABLE)),
        }
    }
    assert_eq!(decoded, 3);
}

#[tokio::test]
async fn each_record_settles_alone_and_only_the_panic_is_retried() {
    let e = embedded().await;
    let run = fixture_run(&e, ITEMS).await;
    let deadline = Instant::now() + Duration::from_secs(30);

    let response = worker(&e)
        .handle(sqs_fixture("worker-sqs.json"), Some(deadline))
        .await
        .unwrap();
    // Every record is done: the panic's retry is a new message.
    assert!(failure_ids(&response).is_empty());
    tokio::time::sleep(Duration::from_millis(1_400)).await;
    let retried: Vec<(String, u32)> = drain(&e.work)
        .await
        .iter()
        .map(|d| {
            let b = WorkBody::decode(&d.body).unwrap();
            (b.item.to_string(), b.attempt())
        })
        .collect();
    assert_eq!(retried, vec![("sub-000003".to_string(), 2)]);

    // The DLQ holds the permanent failure's dead-letter copy and the
    // undecodable body verbatim.
    let dead = drain(&e.dlq).await;
    let dead_bodies: Vec<&str> = dead.iter().map(|d| d.body.as_str()).collect();
    assert_eq!(dead_bodies.len(), 2, "{dead_bodies:?}");
    assert!(dead_bodies.contains(&r#"{"run": "not a settle message""#));
    let copy = dead_bodies
        .iter()
        .find_map(|b| WorkBody::decode(b).ok())
        .unwrap();
    assert_eq!(copy.item.as_str(), "sub-000002");
    assert_eq!(copy.dead.unwrap().error, "permanent failure (scripted)");

    // One result per processed item.
    let results = drain(&e.results).await;
    let mut bodies: Vec<ResultBody> = results
        .iter()
        .flat_map(|d| decode_results(&d.body).unwrap())
        .collect();
    bodies.sort_by(|a, b| a.item.cmp(&b.item));
    assert_eq!(bodies.len(), 3);
    assert_eq!(bodies[0].attempt.outcome, AttemptOutcome::Succeeded);
    assert_eq!(bodies[0].attempt.message_id, OK);
    assert!(matches!(
        &bodies[1].attempt.outcome,
        AttemptOutcome::Failed {
            kind: ErrorKind::Permanent,
            terminal: true,
            ..
        }
    ));
    assert!(matches!(
        &bodies[2].attempt.outcome,
        AttemptOutcome::Failed { kind: ErrorKind::Retryable, terminal: false, error }
            if error == "panic: scripted panic for item sub-000003"
    ));

    // The reducer turns them into the ledger: one succeeded, one failed, the
    // panicked item still pending its retry.
    let reduced = ReducerFunction::new(&e.backend())
        .handle(as_sqs_event(&results))
        .await
        .unwrap();
    assert!(failure_ids(&reduced).is_empty());
    let r = e.store.run(&run).await.unwrap().unwrap();
    assert_eq!((r.total, r.succeeded, r.failed, r.pending()), (3, 1, 1, 1));
    let keys: Vec<_> = ITEMS
        .iter()
        .map(|(i, _)| (run.clone(), ItemId::new(*i).unwrap()))
        .collect();
    let rows = e.store.items(&keys).await.unwrap();
    let status = |i: usize| rows[&keys[i]].value.status;
    assert_eq!(status(0), ItemStatus::Succeeded);
    assert_eq!(status(1), ItemStatus::Failed);
    assert_eq!(status(2), ItemStatus::Pending);
    assert_eq!(
        rows[&keys[2]].value.last_error.as_deref(),
        Some("panic: scripted panic for item sub-000003")
    );
}

#[tokio::test]
async fn near_the_deadline_nothing_starts_and_everything_decodable_is_retried() {
    let e = embedded().await;
    fixture_run(&e, ITEMS).await;
    // Under the worker's 2 s deadline margin: no item may start.
    let deadline = Instant::now() + Duration::from_millis(500);
    let response = worker(&e)
        .handle(sqs_fixture("worker-sqs.json"), Some(deadline))
        .await
        .unwrap();
    // Each decodable record goes on as a new message, its attempt unused.
    assert!(failure_ids(&response).is_empty());
    let mut sent: Vec<(String, u32)> = drain(&e.work)
        .await
        .iter()
        .map(|d| {
            let b = WorkBody::decode(&d.body).unwrap();
            (b.item.to_string(), b.attempt())
        })
        .collect();
    sent.sort();
    assert_eq!(
        sent,
        vec![
            ("sub-000001".to_string(), 1),
            ("sub-000002".to_string(), 1),
            ("sub-000003".to_string(), 1)
        ]
    );
    assert!(drain(&e.results).await.is_empty());
    // The undecodable record never had an item to start: it is parked at once.
    assert_eq!(drain(&e.dlq).await.len(), 1);
}
