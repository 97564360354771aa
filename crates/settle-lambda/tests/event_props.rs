//! Property tests of the Lambda events: the fixtures in `infra/events/`,
//! mutated (keys dropped, values replaced by other JSON, bodies cut or
//! garbled), go through the same decoding the functions do. Whatever the
//! mutation, decoding returns a value or an error that says what is wrong,
//! never a panic, and a bad record is rejected alone: every record with a
//! message id is accounted for exactly once, and the worker returns only
//! records it could not settle. Failing cases are kept in
//! `proptest-regressions/` (the corpus) and replayed first on every run.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test.

mod common;

use common::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use serde_json::{json, Value};
use settle_core::message::{decode_results, WorkBody};
use settle_core::work::WorkerConfig;
use settle_core::Scripted;
use settle_lambda::records::deliveries;
use settle_lambda::{DispatchRequest, SqsEvent, WorkerFunction};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// One change to a JSON tree, addressed by a path of random picks.
#[derive(Debug, Clone)]
enum Mutation {
    /// Drop a key of the object the path reaches.
    Remove(Vec<usize>),
    /// Put another JSON value where the path reaches.
    Replace(Vec<usize>, Value),
    /// Cut or garble the string the path reaches (a body, an id).
    Garble(Vec<usize>, usize, u8),
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        Just(json!(-1)),
        Just(json!(0)),
        Just(json!(1e300)),
        ".{0,40}".prop_map(Value::String),
        Just(json!("{\"results\":[]}")),
        Just(json!("")),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-zA-Z]{1,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let path = || proptest::collection::vec(any::<usize>(), 1..6);
    prop_oneof![
        path().prop_map(Mutation::Remove),
        (path(), json_value()).prop_map(|(p, v)| Mutation::Replace(p, v)),
        (path(), any::<usize>(), any::<u8>()).prop_map(|(p, at, b)| Mutation::Garble(p, at, b)),
    ]
}

/// Follows `path` down the tree, each pick modulo the children there; stops
/// early at a leaf.
fn reach<'a>(v: &'a mut Value, path: &[usize]) -> &'a mut Value {
    let Some((&pick, rest)) = path.split_first() else {
        return v;
    };
    let len = match &*v {
        Value::Array(a) => a.len(),
        Value::Object(o) => o.len(),
        _ => 0,
    };
    if len == 0 {
        return v;
    }
    match v {
        Value::Array(a) => reach(&mut a[pick % len], rest),
        Value::Object(o) => reach(o.values_mut().nth(pick % len).unwrap(), rest),
        _ => unreachable!("only containers have children"),
    }
}

fn apply(v: &mut Value, m: &Mutation) {
    match m {
        Mutation::Remove(path) => {
            let (last, parent) = path.split_last().unwrap();
            if let Value::Object(o) = reach(v, parent) {
                if !o.is_empty() {
                    let key = o.keys().nth(last % o.len()).unwrap().clone();
                    o.remove(&key);
                }
            }
        }
        Mutation::Replace(path, new) => *reach(v, path) = new.clone(),
        Mutation::Garble(path, at, byte) => {
            if let Value::String(s) = reach(v, path) {
                let mut bytes = s.clone().into_bytes();
                if !bytes.is_empty() {
                    let at = at % bytes.len();
                    if byte % 2 == 0 {
                        bytes.truncate(at);
                    } else {
                        bytes[at] = *byte;
                    }
                }
                // JSON strings are UTF-8: a broken sequence becomes U+FFFD,
                // as any JSON producer would have to send it.
                *s = String::from_utf8_lossy(&bytes).into_owned();
            }
        }
    }
}

fn mutated(fixture: &str, ms: &[Mutation]) -> Value {
    let mut v = fixture_json(fixture);
    for m in ms {
        apply(&mut v, m);
    }
    v
}

/// Records with a usable message id, as the event holds them.
fn ids(event: &SqsEvent) -> Vec<String> {
    event
        .records
        .iter()
        .filter_map(|r| r.message_id.clone())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn sqs_events_decode_record_by_record(
        fixture in prop_oneof![Just("worker-sqs.json"), Just("reducer-sqs.json")],
        ms in proptest::collection::vec(mutation(), 1..5),
    ) {
        let v = mutated(fixture, &ms);
        // What the runtime does first; an event it cannot read fails the
        // invocation, and Lambda returns the whole batch to the queue.
        let Ok(event) = serde_json::from_value::<SqsEvent>(v) else { return Ok(()) };
        let records = event.records.len();
        let all_ids = ids(&event);
        match deliveries(event) {
            Err(e) => {
                prop_assert!(e.index < records);
                prop_assert!(e.to_string().contains("no messageId"));
            }
            Ok(r) => {
                prop_assert_eq!(r.deliveries.len() + r.rejected.len(), records, "each record once");
                let mut seen: Vec<String> = r.deliveries.iter().map(|d| d.message_id.clone()).collect();
                seen.extend(r.rejected.iter().cloned());
                seen.sort();
                let mut want = all_ids.clone();
                want.sort();
                prop_assert_eq!(seen, want);
                for d in &r.deliveries {
                    prop_assert!(d.receive_count >= 1);
                    // The bodies' decoders: a value or an error, never a panic.
                    let _ = WorkBody::decode(&d.body).map_err(|e| e.to_string());
                    let _ = decode_results(&d.body).map_err(|e| e.to_string());
                }
            }
        }
    }

    #[test]
    fn dispatcher_requests_parse_or_say_why(
        ms in proptest::collection::vec(mutation(), 0..4),
        other in json_value(),
    ) {
        for v in [mutated("dispatcher-schedule.json", &ms), other] {
            if let Err(e) = DispatchRequest::parse(&v) {
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }
}

/// The worker handler fed mutated worker events: it never panics, returns
/// only ids of the event's records, and the untouched "ok" record (the
/// first) settles whatever happened to the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_handler_fails_only_bad_records() {
    let e = embedded().await;
    let _run = fixture_run(
        &e,
        &[
            ("sub-000001", "ok"),
            ("sub-000002", "permanent"),
            ("sub-000003", "panic"),
        ],
    )
    .await;
    let worker = WorkerFunction::new(
        &e.backend(),
        Arc::new(Scripted),
        WorkerConfig {
            item_timeout: Some(Duration::from_secs(5)),
            ..WorkerConfig::default()
        },
    );
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    });
    // Mutations of records 1.. only: record 0 is the witness that stays good.
    let strategy = proptest::collection::vec((1usize..4, mutation()), 1..4);
    let mut handled = 0;
    for _ in 0..48 {
        let picks = strategy.new_tree(&mut runner).unwrap().current();
        let mut v = fixture_json("worker-sqs.json");
        for (record, m) in &picks {
            apply(&mut v["Records"][*record], m);
        }
        let Ok(event) = serde_json::from_value::<SqsEvent>(v) else {
            continue;
        };
        let first = event.records[0].message_id.clone().unwrap();
        let ids = ids(&event);
        // A mutation may have copied the witness's id onto another record.
        let witness_unique = ids.iter().filter(|i| **i == first).count() == 1;
        let all: BTreeSet<String> = ids.into_iter().collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        match worker.handle(event, Some(deadline)).await {
            Err(unidentified) => assert!(unidentified.index >= 1, "{unidentified}"),
            Ok(resp) => {
                handled += 1;
                for f in &resp.batch_item_failures {
                    let id = f.item_identifier.clone();
                    assert!(all.contains(&id), "{id} is not a record of the event");
                    assert!(
                        !(witness_unique && id == first),
                        "the untouched record failed with the others: {picks:?}"
                    );
                }
            }
        }
    }
    assert!(handled > 0, "no mutated event reached the handler");
}
