//! `infra/events/reducer-sqs.json` through the reducer handler, on the
//! embedded backend: a duplicate result counts once, a bad result is
//! returned alone, and the run settles with an exact tally.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test.

mod common;

use common::*;
use settle_core::domain::{ItemId, ItemStatus, RunStatus};
use settle_core::message::{decode_results, pack_results, ResultBody};
use settle_core::Ledger;
use settle_lambda::ReducerFunction;

const BAD_RESULT: &str = "c4d5e6f7-0818-4a29-9b3a-4c5d6e7f8096";

#[test]
fn fixture_bodies_are_the_cores_encoding() {
    let event = sqs_fixture("reducer-sqs.json");
    for r in &event.records {
        let body = r.body.as_deref().unwrap();
        match decode_results(body) {
            Ok(rs) => {
                let encoded: Vec<String> = rs.iter().map(ResultBody::encode).collect();
                assert_eq!(
                    pack_results(&encoded)[0].0,
                    body,
                    "record {:?}",
                    r.message_id
                )
            }
            Err(_) => assert_eq!(r.message_id.as_deref(), Some(BAD_RESULT)),
        }
    }
}

#[tokio::test]
async fn results_settle_the_run_exactly_once() {
    let e = embedded().await;
    let run = fixture_run(
        &e,
        &[
            ("sub-000001", "ok"),
            ("sub-000002", "permanent"),
            ("sub-000003", "panic"),
        ],
    )
    .await;
    let reducer = ReducerFunction::new(&e.backend());

    let response = reducer
        .handle(sqs_fixture("reducer-sqs.json"))
        .await
        .unwrap();
    assert_eq!(failure_ids(&response), vec![BAD_RESULT]);

    let r = e.store.run(&run).await.unwrap().unwrap();
    assert_eq!((r.total, r.succeeded, r.failed, r.pending()), (3, 2, 1, 0));
    assert_eq!(r.status(), RunStatus::Partial);
    assert!(r.settled_at.is_some());
    let item = |id: &str| (run.clone(), ItemId::new(id).unwrap());
    let keys = [item("sub-000001"), item("sub-000002"), item("sub-000003")];
    let rows = e.store.items(&keys).await.unwrap();
    assert_eq!(rows[&keys[0]].value.status, ItemStatus::Succeeded);
    assert_eq!(
        rows[&keys[0]].value.history.len(),
        1,
        "the duplicate is not kept"
    );
    assert_eq!(rows[&keys[1]].value.status, ItemStatus::Failed);
    assert_eq!(rows[&keys[2]].value.status, ItemStatus::Succeeded);
    assert_eq!(rows[&keys[2]].value.attempts, 2);

    // The whole batch delivered again (a lost delete): nothing moves.
    let again = reducer
        .handle(sqs_fixture("reducer-sqs.json"))
        .await
        .unwrap();
    assert_eq!(failure_ids(&again), vec![BAD_RESULT]);
    let r2 = e.store.run(&run).await.unwrap().unwrap();
    assert_eq!(
        (r2.succeeded, r2.failed, r2.settled_at),
        (2, 1, r.settled_at)
    );
}
