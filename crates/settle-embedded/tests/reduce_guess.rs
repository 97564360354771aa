//! The reducer inserts a first attempt's row without reading it first; a
//! row that exists after all must make it read and apply, never count twice.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test.

use settle_core::dispatch;
use settle_core::domain::{
    Attempt, AttemptOutcome, ErrorKind, Item, ItemId, ItemStatus, RunConfig, RunId,
};
use settle_core::message::ResultBody;
use settle_core::ports::{Delivery, Ledger, Source};
use settle_core::reduce::reduce;
use settle_embedded::Embedded;

fn result(run: &RunId, item: &str, attempt: u32, outcome: AttemptOutcome) -> Delivery {
    let body = ResultBody {
        run: run.clone(),
        item: ItemId::new(item).unwrap(),
        seq: 0,
        attempt: Attempt {
            attempt,
            message_id: format!("m{attempt}"),
            started_at: 1,
            duration_ms: 1,
            outcome,
            output: None,
            log: None,
            retry_at: None,
        },
    };
    Delivery {
        message_id: format!("r{attempt}"),
        receipt: String::new(),
        body: body.encode(),
        receive_count: 1,
    }
}

#[tokio::test]
async fn a_first_attempt_reduced_after_a_later_one_is_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let e = Embedded::open(&dir.path().join("s.db")).await.unwrap();
    let item = Item::new(
        ItemId::new("a").unwrap(),
        settle_core::domain::null_payload(),
    );
    e.store
        .load(Box::new(vec![Ok((1, item))].into_iter()))
        .await
        .unwrap();
    let run = dispatch::create_run(&e.store, RunConfig::default())
        .await
        .unwrap();
    while e.store.claim(&run.id, 10).await.unwrap() > 0 {}
    e.store
        .record_dispatch(&run.id, 1, None, true)
        .await
        .unwrap();

    // Attempt 2 (a success) arrives first, attempt 1 (a retryable failure) after.
    let second = reduce(
        &e.store,
        &[result(&run.id, "a", 2, AttemptOutcome::Succeeded)],
    )
    .await;
    assert_eq!((second.applied, second.duplicates), (1, 0));
    let failed = AttemptOutcome::Failed {
        kind: ErrorKind::Retryable,
        error: "timeout".into(),
        terminal: false,
    };
    let first = reduce(&e.store, &[result(&run.id, "a", 1, failed.clone())]).await;
    assert!(first.response.failures.is_empty(), "{first:?}");
    assert_eq!((first.applied, first.duplicates), (1, 0));
    // And once more: now a duplicate.
    let again = reduce(&e.store, &[result(&run.id, "a", 1, failed)]).await;
    assert_eq!((again.applied, again.duplicates), (0, 1));

    let r = e.store.run(&run.id).await.unwrap().unwrap();
    assert_eq!((r.succeeded, r.failed, r.pending()), (1, 0, 0));
    let rows = e
        .store
        .items(&[(run.id.clone(), ItemId::new("a").unwrap())])
        .await
        .unwrap();
    let rec = &rows.values().next().unwrap().value;
    assert_eq!(rec.status, ItemStatus::Succeeded);
    let attempts: Vec<u32> = rec.history.iter().map(|h| h.attempt).collect();
    assert_eq!(attempts, vec![1, 2]);
}
