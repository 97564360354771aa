//! Helpers for the fixture tests: a fresh embedded backend per test, the
//! fixtures read from `infra/events/` exactly as committed, and the run
//! they reference.
#![allow(dead_code, clippy::unwrap_used)] // test code: each test uses a subset; a failed unwrap is a failed test.

use aws_lambda_events::event::sqs::SqsEvent;
use serde_json::value::RawValue;
use settle_core::domain::{Item, ItemId, RunConfig, RunId, RunRecord};
use settle_core::ports::{Delivery, Queue};
use settle_embedded::Embedded;
use std::path::PathBuf;
use std::time::Duration;

/// The run the worker and reducer fixtures belong to.
pub const FIXTURE_RUN: &str = "r20261124T020000Z-5e771e";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The fixture file's text, as committed.
pub fn fixture_text(name: &str) -> String {
    let path = repo_root().join("infra/events").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn fixture_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&fixture_text(name)).unwrap()
}

pub fn sqs_fixture(name: &str) -> SqsEvent {
    serde_json::from_str(&fixture_text(name)).unwrap()
}

pub async fn embedded() -> Embedded {
    let dir = tempfile::tempdir().unwrap().keep();
    let e = Embedded::open(&dir.join("settle.db")).await.unwrap();
    // The work queue's redrive limit: 3 + the embedded safety margin of 3 = 6,
    // the template's MaxReceiveCount default.
    e.set_max_receives(3).await.unwrap();
    e
}

pub fn item(id: &str, script: &str) -> Item {
    Item::new(
        ItemId::new(id).unwrap(),
        RawValue::from_string(format!(r#"{{"script":"{script}"}}"#)).unwrap(),
    )
}

pub async fn load(e: &Embedded, items: Vec<Item>) {
    let input: settle_core::ports::LoadInput = Box::new(
        items
            .into_iter()
            .enumerate()
            .map(|(i, it)| Ok((i as u64 + 1, it))),
    );
    settle_core::Source::load(&e.store, input).await.unwrap();
}

/// Creates the fixtures' run with the given items claimed into it and its
/// dispatch finished, as the dispatcher leaves a run.
pub async fn fixture_run(e: &Embedded, items: &[(&str, &str)]) -> RunId {
    use settle_core::{Ledger, Source};
    let id = RunId::parse(FIXTURE_RUN).unwrap();
    load(e, items.iter().map(|(i, s)| item(i, s)).collect()).await;
    let run = RunRecord::new(id.clone(), RunConfig::default(), 1_795_485_600_000);
    e.store.create_run(&run).await.unwrap();
    assert_eq!(e.store.claim(&id, 1000).await.unwrap(), items.len() as u64);
    e.store
        .record_dispatch(&id, items.len() as u64, None, true)
        .await
        .unwrap();
    id
}

/// Every message in `q`, received once.
pub async fn drain(q: &dyn Queue) -> Vec<Delivery> {
    let mut all = Vec::new();
    loop {
        let got = q.receive(10, Duration::from_secs(60)).await.unwrap();
        if got.is_empty() {
            return all;
        }
        all.extend(got);
    }
}

/// Deliveries as Lambda would hand them to a function: an SQS event.
pub fn as_sqs_event(ds: &[Delivery]) -> SqsEvent {
    let records: Vec<serde_json::Value> = ds
        .iter()
        .map(|d| {
            serde_json::json!({
                "messageId": d.message_id, "receiptHandle": d.receipt, "body": d.body,
                "attributes": {"ApproximateReceiveCount": d.receive_count.to_string()},
                "eventSource": "aws:sqs"
            })
        })
        .collect();
    serde_json::from_value(serde_json::json!({ "Records": records })).unwrap()
}

/// The `batchItemFailures` ids of a response, as Lambda reads them.
pub fn failure_ids(r: &aws_lambda_events::event::sqs::SqsBatchResponse) -> Vec<String> {
    let json = serde_json::to_value(r).unwrap();
    json["batchItemFailures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["itemIdentifier"].as_str().unwrap().to_owned())
        .collect()
}
