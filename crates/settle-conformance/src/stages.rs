//! Clauses of the stages that work across ports: reconciling what the
//! queue dead-lettered by itself, and the redrive.

use crate::{delete_all, fresh_run, item, receive_n, redrive_all, result, Subject, AFTER_VIS, VIS};
use settle_core::domain::AttemptOutcome;
use settle_core::message::WorkBody;
use settle_core::{reconcile, reduce};

/// A work message the queue dead-lettered by its own policy (no worker
/// reported its last attempt) is reconciled: counted failed with a reason,
/// marked in the DLQ, and redriven like any other. A second pass finds nothing.
pub async fn reconcile_settles_messages_the_queue_parked(s: &Subject) {
    let run = fresh_run(s, 2).await;
    let body = |id: &str, seq| {
        WorkBody::new(run.clone(), item(id, "null"), seq, s.work_max_receives).encode()
    };
    s.work.send(vec![body("t0", 0)]).await.unwrap();
    // Received to the queue's limit, and never answered: a worker that died every time.
    for n in 1..=s.work_max_receives {
        let got = receive_n(s.work.as_ref(), 1, VIS).await;
        assert_eq!(got.len(), 1, "receive {n}");
        tokio::time::sleep(AFTER_VIS).await;
    }
    assert!(receive_n(s.work.as_ref(), 1, VIS).await.is_empty());
    // t1 succeeded normally: not the reconciler's business.
    let ok = result(&run, "t1", 1, "m1", AttemptOutcome::Succeeded);
    reduce::reduce(s.ledger.as_ref(), &[ok]).await;

    let rep =
        reconcile::reconcile_parked(s.ledger.as_ref(), s.dlq.as_ref(), s.results.as_ref(), &run)
            .await
            .unwrap();
    assert_eq!((rep.failed, rep.dropped), (1, 0));
    let results = receive_n(s.results.as_ref(), 1, VIS).await;
    assert_eq!(results.len(), 1, "one failure result for the reducer");
    let red = reduce::reduce(s.ledger.as_ref(), &results).await;
    assert!(red.response.failures.is_empty());
    delete_all(s.results.as_ref(), &results).await;
    let r = s.ledger.run(&run).await.unwrap().unwrap();
    assert_eq!((r.succeeded, r.failed, r.pending()), (1, 1, 0));
    assert!(r.is_settled());
    let f = s.ledger.failures(&run, None, 10).await.unwrap();
    assert_eq!(f.len(), 1);
    let reason = f[0].1.last_error.clone().unwrap();
    assert!(reason.contains("dead-lettered"), "{reason}");

    let again =
        reconcile::reconcile_parked(s.ledger.as_ref(), s.dlq.as_ref(), s.results.as_ref(), &run)
            .await
            .unwrap();
    assert_eq!(
        again,
        reconcile::ReconcileReport::default(),
        "the marked copy is not reconciled twice"
    );
    let moved = redrive_all(s, &run).await.unwrap();
    assert_eq!(moved.messages, 1, "the marked copy redrives");
    assert!(moved.missing.is_empty(), "{moved:?}");
    // Redriving all again: t0 is failed in the ledger but has nothing in
    // the DLQ to move (it is back on the work queue), and the report says so.
    let again = redrive_all(s, &run).await.unwrap();
    assert_eq!(again.messages, 0);
    assert_eq!(
        again.missing.iter().map(|i| i.as_str()).collect::<Vec<_>>(),
        ["t0"]
    );
    let back = receive_n(s.work.as_ref(), 1, VIS).await;
    let b = WorkBody::decode(&back[0].body).unwrap();
    assert_eq!((b.item.as_str(), b.seq, b.dead.is_none()), ("t0", 0, true));
    assert!(
        b.prior_attempts >= 1,
        "attempts keep counting across the redrive"
    );
}

/// A redrive sends one message per item back, whatever copies of it the
/// DLQ held (duplicate deliveries dead-lettered twice), and deletes the
/// copies: the item is processed once more, not once per copy.
pub async fn redrive_moves_one_message_per_item(s: &Subject) {
    let run = fresh_run(s, 2).await;
    let dead = |id: &str| {
        let mut b = WorkBody::new(run.clone(), item(id, "null"), 0, 3);
        b.dead = Some(settle_core::message::DeadLetter {
            error: "permanent failure".into(),
            attempts: 1,
        });
        b.encode()
    };
    s.dlq
        .send(vec![dead("t0"), dead("t1"), dead("t0"), dead("t0")])
        .await
        .unwrap();
    let moved = redrive_all(s, &run).await.unwrap();
    assert_eq!(
        (moved.items.len(), moved.messages, moved.stale),
        (2, 2, 2),
        "{moved:?}"
    );
    let back = receive_n(s.work.as_ref(), 4, VIS).await;
    let mut ids: Vec<String> = back
        .iter()
        .map(|d| WorkBody::decode(&d.body).unwrap().item.as_str().to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, ["t0", "t1"]);
    assert_eq!(
        s.dlq.depth().await.unwrap().total(),
        0,
        "no stale copy left"
    );
}
