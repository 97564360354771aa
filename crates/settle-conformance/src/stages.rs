//! Clauses of the stages that work across ports: reconciling what the
//! queue dead-lettered by itself, and the redrive.

use crate::{
    delete_all, failed, fresh_run, item, receive_n, redrive_all, result, Subject, AFTER_VIS, VIS,
};
use settle_core::domain::AttemptOutcome;
use settle_core::message::WorkBody;
use settle_core::ports::Delivery;
use settle_core::{reconcile, redrive, reduce};

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

/// A redrive cut off part-way keeps its scope with the run; `resume`
/// moves the rest of that scope and nothing else: not the items the cut-off
/// pass moved (processed since, or failed again and carrying the redrive's
/// mark), not other runs' messages. Then nothing is missing.
pub async fn redrive_cut_off_is_finished_by_resume(s: &Subject) {
    const N: u64 = 25;
    let run = fresh_run(s, N).await;
    let other = fresh_run(s, 0).await;
    let dead = |run: &settle_core::RunId, id: &str| {
        let mut b = WorkBody::new(run.clone(), item(id, "null"), 0, 3);
        b.dead = Some(settle_core::message::DeadLetter {
            error: "permanent failure".into(),
            attempts: 1,
        });
        b.encode()
    };
    let mut letters: Vec<String> = (0..N).map(|i| dead(&run, &format!("t{i}"))).collect();
    letters.push(dead(&other, "t0"));
    for chunk in letters.chunks(10) {
        s.dlq.send(chunk.to_vec()).await.unwrap();
    }
    let failures: Vec<Delivery> = (0..N)
        .map(|i| result(&run, &format!("t{i}"), 1, &format!("m{i}"), failed(true)))
        .collect();
    reduce::reduce(s.ledger.as_ref(), &failures).await;
    assert_eq!(s.ledger.run(&run).await.unwrap().unwrap().failed, N);

    // Stopped before its second batch: the first one moved.
    let asked = std::sync::atomic::AtomicU32::new(0);
    let stop = || asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 1;
    let first = redrive::redrive(
        s.ledger.as_ref(),
        s.dlq.as_ref(),
        s.work.as_ref(),
        &run,
        None,
        false,
        &stop,
    )
    .await
    .unwrap();
    assert!(first.stopped && !first.is_complete(), "{first:?}");
    let k = first.items.len();
    assert!((1..N as usize).contains(&k), "{first:?}");
    let r = s.ledger.run(&run).await.unwrap().unwrap();
    assert_eq!(r.redrive.as_ref(), Some(&first.scope), "{r:?}");
    assert!(r.redriving && !r.is_settled(), "{r:?}");

    // What it moved is processed: the first item fails again (its dead
    // letter carries the redrive's mark), the rest succeed.
    let moved = receive_n(s.work.as_ref(), k, VIS).await;
    assert_eq!(moved.len(), k);
    let mut again = None;
    let mut outcomes = Vec::new();
    for (n, d) in moved.iter().enumerate() {
        let b = WorkBody::decode(&d.body).unwrap();
        let mark = b.redrive.clone().unwrap_or_default();
        assert!(mark.starts_with(&format!("{}/", first.scope.id)), "{mark}");
        let msg = format!("again-{n}");
        if n == 0 {
            let mut dead = b.clone();
            dead.dead = Some(settle_core::message::DeadLetter {
                error: "permanent failure".into(),
                attempts: 2,
            });
            s.dlq.send(vec![dead.encode()]).await.unwrap();
            outcomes.push(result(&run, b.item.as_str(), 2, &msg, failed(true)));
            again = Some(b.item.clone());
        } else {
            outcomes.push(result(
                &run,
                b.item.as_str(),
                2,
                &msg,
                AttemptOutcome::Succeeded,
            ));
        }
    }
    delete_all(s.work.as_ref(), &moved).await;
    reduce::reduce(s.ledger.as_ref(), &outcomes).await;
    let again = again.unwrap();

    let rest = redrive::resume(
        s.ledger.as_ref(),
        s.dlq.as_ref(),
        s.work.as_ref(),
        &run,
        &|| false,
    )
    .await
    .unwrap()
    .expect("the cut-off redrive is recorded");
    assert!(rest.is_complete(), "{rest:?}");
    assert_eq!(rest.scope, first.scope, "the same redrive goes on");
    assert_eq!(rest.items.len(), N as usize - k, "{rest:?}");
    assert!(rest.items.is_disjoint(&first.items), "{rest:?}");
    assert_eq!(rest.earlier, [again.clone()].into(), "{rest:?}");
    let back = receive_n(s.work.as_ref(), N as usize, VIS).await;
    assert_eq!(
        back.len(),
        N as usize - k,
        "one message per item of the rest"
    );
    delete_all(s.work.as_ref(), &back).await;
    // Left in the DLQ: the item that failed again, and the other run's.
    let left = receive_n(s.dlq.as_ref(), 3, VIS).await;
    let mut kept: Vec<(bool, String)> = left
        .iter()
        .map(|d| {
            let b = WorkBody::decode(&d.body).unwrap();
            (b.run == run, b.item.as_str().to_owned())
        })
        .collect();
    kept.sort();
    assert_eq!(
        kept,
        [(false, "t0".to_owned()), (true, again.as_str().to_owned())]
    );
    assert!(s.ledger.clear_redrive(&run, &rest.scope).await.unwrap());
    assert!(redrive::resume(
        s.ledger.as_ref(),
        s.dlq.as_ref(),
        s.work.as_ref(),
        &run,
        &|| false
    )
    .await
    .unwrap()
    .is_none());
}

/// After an interruption, the extra dead letters of a run's items go and
/// one copy per item stays, the one that counts the most attempts; parked
/// (unmarked) messages and other runs' copies are left as they were.
pub async fn extra_dead_letters_are_dropped_one_per_item_kept(s: &Subject) {
    let run = fresh_run(s, 2).await;
    let other = fresh_run(s, 0).await;
    let dead = |run: &settle_core::RunId, id: &str, attempts: u32| {
        let mut b = WorkBody::new(run.clone(), item(id, "null"), 0, 3);
        b.dead = Some(settle_core::message::DeadLetter {
            error: "permanent failure".into(),
            attempts,
        });
        b.encode()
    };
    let parked = WorkBody::new(run.clone(), item("p", "null"), 0, 3).encode();
    s.dlq
        .send(vec![
            dead(&run, "t0", 1),
            dead(&run, "t0", 3),
            dead(&run, "t1", 1),
            dead(&run, "t0", 2),
            dead(&other, "t0", 1),
            dead(&other, "t0", 1),
            parked,
        ])
        .await
        .unwrap();
    let dropped = reconcile::drop_extra_dead_letters(s.dlq.as_ref(), &run)
        .await
        .unwrap();
    assert_eq!(dropped, 2);
    let left = receive_n(s.dlq.as_ref(), 5, VIS).await;
    let mut kept: Vec<(String, String, Option<u32>)> = left
        .iter()
        .map(|d| {
            let b = WorkBody::decode(&d.body).unwrap();
            let of = if b.run == run { "run" } else { "other" };
            (
                of.to_owned(),
                b.item.as_str().to_owned(),
                b.dead.map(|d| d.attempts),
            )
        })
        .collect();
    kept.sort();
    let want = |of: &str, id: &str, attempts: Option<u32>| (of.to_owned(), id.to_owned(), attempts);
    assert_eq!(
        kept,
        vec![
            want("other", "t0", Some(1)),
            want("other", "t0", Some(1)),
            want("run", "p", None),
            want("run", "t0", Some(3)),
            want("run", "t1", Some(1)),
        ]
    );
    assert_eq!(
        s.dlq.depth().await.unwrap().total(),
        5,
        "nothing but the extra copies deleted"
    );
}

/// A message the queue parked after a worker had already recorded its
/// terminal failure (and sent its dead letter) is removed, not reported
/// and marked a second time: the DLQ keeps one copy of the item.
pub async fn reconcile_drops_a_parked_copy_of_a_recorded_failure(s: &Subject) {
    let run = fresh_run(s, 1).await;
    let body = WorkBody::new(run.clone(), item("t0", "null"), 0, s.work_max_receives);
    s.work.send(vec![body.encode()]).await.unwrap();
    let mut message_id = String::new();
    for n in 1..=s.work_max_receives {
        let got = receive_n(s.work.as_ref(), 1, VIS).await;
        assert_eq!(got.len(), 1, "receive {n}");
        message_id = got[0].message_id.clone();
        if n == 1 {
            // The worker's terminal failure: its dead letter, then its result.
            let dead = WorkBody {
                dead: Some(settle_core::message::DeadLetter {
                    error: "permanent failure".into(),
                    attempts: 1,
                }),
                ..body.clone()
            };
            s.dlq.send(vec![dead.encode()]).await.unwrap();
            let failed = AttemptOutcome::Failed {
                kind: settle_core::domain::ErrorKind::Permanent,
                error: "permanent failure".into(),
                terminal: true,
            };
            let res = result(&run, "t0", 1, &message_id, failed);
            reduce::reduce(s.ledger.as_ref(), &[res]).await;
        }
        // Its delete lost: the message comes back until the queue parks it.
        tokio::time::sleep(AFTER_VIS).await;
    }
    assert!(receive_n(s.work.as_ref(), 1, VIS).await.is_empty());

    let rep =
        reconcile::reconcile_parked(s.ledger.as_ref(), s.dlq.as_ref(), s.results.as_ref(), &run)
            .await
            .unwrap();
    assert_eq!((rep.failed, rep.dropped), (0, 1), "{message_id}");
    assert!(receive_n(s.results.as_ref(), 1, VIS).await.is_empty());
    let left = receive_n(s.dlq.as_ref(), 2, VIS).await;
    assert_eq!(left.len(), 1, "one copy of the failed item");
    let b = WorkBody::decode(&left[0].body).unwrap();
    assert_eq!(b.dead.map(|d| d.attempts), Some(1));
    let r = s.ledger.run(&run).await.unwrap().unwrap();
    assert_eq!((r.succeeded, r.failed, r.pending()), (0, 1, 0));
}

/// An attempt is a run of the processor, not a receive. The item's first
/// message is received and lost (nobody answers), then received again: with
/// no outcome known it is sent on afresh or waits, running nothing. Its
/// first attempt fails (retryable:1) and its retry is a new message,
/// attempt 2, which succeeds: two attempts in the ledger although the first
/// message was received three times, with `max_receives` 2. A leftover
/// copy of the first message is then acknowledged without running, and no
/// queue holds anything.
/// A scripted worker over the subject's queues that reads its ledger (the
/// gate), with the work queue's own receive limit.
fn gated_worker(s: &Subject, config: settle_core::work::WorkerConfig) -> settle_core::work::Worker {
    settle_core::work::Worker::new(
        std::sync::Arc::new(settle_core::Scripted),
        s.work.clone(),
        s.dlq.clone(),
        s.results.clone(),
        settle_core::work::WorkerConfig {
            receive_limit: Some(s.work_max_receives),
            ..config
        },
    )
    .reading(s.ledger.clone())
}

pub async fn a_redelivery_is_not_an_attempt(s: &Subject) {
    use settle_core::work::{delete_done, WorkerConfig};
    use std::time::Duration;
    let run = fresh_run(s, 1).await;
    let first = WorkBody::new(run.clone(), item("t0", r#"{"script":"retryable:1"}"#), 0, 2);
    s.work.send(vec![first.encode()]).await.unwrap();
    let worker = gated_worker(
        s,
        WorkerConfig {
            retry_delay: Duration::from_millis(10),
            ..WorkerConfig::default()
        },
    );
    let reduce_all = || async {
        let results = receive_n(s.results.as_ref(), 1, VIS).await;
        reduce::reduce(s.ledger.as_ref(), &results).await;
        delete_all(s.results.as_ref(), &results).await;
        results.len()
    };
    // Handles what the work queue gives within a few receives, deleting
    // what is done, until a message actually ran.
    let mut ran = 0;
    let mut receives = 0;
    while ran < 2 {
        receives += 1;
        assert!(receives < 20, "the item never ran twice");
        let got = receive_n(s.work.as_ref(), 1, VIS).await;
        let Some(d) = got.first() else {
            tokio::time::sleep(AFTER_VIS).await;
            continue;
        };
        if receives == 1 {
            // Received, and the answer lost: nobody handles it.
            tokio::time::sleep(AFTER_VIS).await;
            continue;
        }
        let resp = worker.handle(std::slice::from_ref(d), None).await;
        delete_done(s.work.as_ref(), std::slice::from_ref(d), &resp)
            .await
            .unwrap();
        ran += reduce_all().await;
        tokio::time::sleep(AFTER_VIS).await;
    }
    let rows = s
        .ledger
        .items(&[(run.clone(), settle_core::ItemId::new("t0").unwrap())])
        .await
        .unwrap();
    let rec = &rows.values().next().expect("t0's row").value;
    let attempts: Vec<u32> = rec.history.iter().map(|a| a.attempt).collect();
    assert_eq!(attempts, [1, 2], "{rec:?}");
    assert_eq!(rec.status, settle_core::domain::ItemStatus::Succeeded);

    // A leftover copy of the first message: acknowledged, nothing run.
    s.work.send(vec![first.encode()]).await.unwrap();
    let copy = receive_n(s.work.as_ref(), 1, VIS).await;
    let resp = worker.handle(&copy, None).await;
    assert!(resp.failures.is_empty());
    delete_done(s.work.as_ref(), &copy, &resp).await.unwrap();
    assert_eq!(
        reduce_all().await,
        0,
        "a copy of a settled item reports nothing"
    );
    for q in [&s.work, &s.results, &s.dlq] {
        assert_eq!(q.depth().await.unwrap().total(), 0, "{} is empty", q.name());
    }
}

/// A throttled answer is not an attempt: an item throttled more often than
/// its run's `max_receives` (here 1) still succeeds on its first attempt,
/// nothing reaches the DLQ, the throttles are counted apart on the item and
/// the run, and no queue holds anything once it is reduced.
pub async fn throttled_never_dead_letters(s: &Subject) {
    use settle_core::work::{delete_done, WorkerConfig};
    use std::time::Duration;
    let run = fresh_run(s, 1).await;
    let body = WorkBody::new(run.clone(), item("t0", r#"{"script":"throttled:3"}"#), 0, 1);
    s.work.send(vec![body.encode()]).await.unwrap();
    let worker = gated_worker(s, WorkerConfig::default());
    let mut handled = 0;
    let mut tries = 0;
    while handled < 4 {
        tries += 1;
        assert!(
            tries < 100,
            "the item did not settle in {handled} handlings"
        );
        let got = receive_n(s.work.as_ref(), 1, VIS).await;
        let Some(d) = got.first() else {
            // Sent round after its throttle's pause (100 ms).
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let resp = worker.handle(std::slice::from_ref(d), None).await;
        delete_done(s.work.as_ref(), std::slice::from_ref(d), &resp)
            .await
            .unwrap();
        let results = receive_n(s.results.as_ref(), 1, VIS).await;
        reduce::reduce(s.ledger.as_ref(), &results).await;
        delete_all(s.results.as_ref(), &results).await;
        handled += usize::from(!results.is_empty());
    }
    let rows = s
        .ledger
        .items(&[(run.clone(), settle_core::ItemId::new("t0").unwrap())])
        .await
        .unwrap();
    let rec = &rows.values().next().expect("t0's row").value;
    assert_eq!(
        rec.status,
        settle_core::domain::ItemStatus::Succeeded,
        "{rec:?}"
    );
    assert_eq!(
        (rec.attempts, rec.throttled, rec.history.len()),
        (1, 3, 1),
        "{rec:?}"
    );
    let tally = s.ledger.run(&run).await.unwrap().expect("the run");
    assert_eq!((tally.succeeded, tally.failed, tally.throttled), (1, 0, 3));
    for q in [&s.work, &s.results, &s.dlq] {
        assert_eq!(q.depth().await.unwrap().total(), 0, "{} is empty", q.name());
    }
}
