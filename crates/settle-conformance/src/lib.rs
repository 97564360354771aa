//! The conformance suite: one set of contract clauses that every backend
//! runs, object_store style. Each clause is a plain async function over a
//! [`Subject`]; [`conformance_tests!`] expands to one test per clause, so a
//! backend cannot skip one silently. Where backends differ, the difference
//! is a field of [`Subject`], not a skipped clause.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed clause.

pub mod faults;
mod idempotency;
pub mod sim;

pub use idempotency::*;

use serde_json::value::RawValue;
use settle_core::domain::{
    now_millis, Attempt, AttemptOutcome, ErrorKind, Item, ItemId, ItemRecord, ItemStatus,
    RunConfig, TallyDelta,
};
use settle_core::idempotency::IdempotencyStore;
use settle_core::message::{ResultBody, WorkBody, MAX_BODY_BYTES};
use settle_core::ports::{
    Delivery, ItemPut, Ledger, LedgerBatch, LineError, LoadError, PortError, Queue, Source,
};
use settle_core::{dispatch, reconcile, redrive, reduce, RunId};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// A backend under test, with fresh (empty) queues and store.
#[derive(Debug, Clone)]
pub struct Subject {
    pub work: Arc<dyn Queue>,
    /// The work queue's dead-letter queue.
    pub dlq: Arc<dyn Queue>,
    pub results: Arc<dyn Queue>,
    pub source: Arc<dyn Source>,
    pub ledger: Arc<dyn Ledger>,
    pub idempotency: Arc<dyn IdempotencyStore>,
    /// The work queue's redrive limit: receives before a message moves to `dlq`.
    pub work_max_receives: u32,
}

/// The visibility timeout the clauses use: SQS counts whole seconds.
pub const VIS: Duration = Duration::from_secs(1);
/// Long enough for a message hidden for [`VIS`] to be visible again.
const AFTER_VIS: Duration = Duration::from_millis(1300);

fn item(id: &str, payload: &str) -> Item {
    Item::new(
        ItemId::new(id).unwrap(),
        RawValue::from_string(payload.into()).unwrap(),
    )
}

/// Receives until `want` messages arrived or a few empty polls in a row:
/// SQS may answer a receive with fewer messages than are visible.
pub async fn receive_n(q: &dyn Queue, want: usize, vis: Duration) -> Vec<Delivery> {
    let mut got = Vec::new();
    let mut empty = 0;
    while got.len() < want && empty < 5 {
        let batch = q.receive((want - got.len()).min(10), vis).await.unwrap();
        if batch.is_empty() {
            empty += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        got.extend(batch);
    }
    got
}

async fn delete_all(q: &dyn Queue, ds: &[Delivery]) {
    for chunk in ds.chunks(10) {
        q.delete(chunk.iter().map(|d| d.receipt.clone()).collect())
            .await
            .unwrap();
    }
}

/// Sent messages arrive once each, hidden after receipt; deleted ones are gone.
pub async fn queue_send_receive_delete(s: &Subject) {
    let q = s.work.as_ref();
    q.send(vec!["a".into(), "b".into(), "c".into()])
        .await
        .unwrap();
    let got = receive_n(q, 3, VIS).await;
    let bodies: BTreeSet<_> = got.iter().map(|d| d.body.as_str()).collect();
    assert_eq!(bodies, BTreeSet::from(["a", "b", "c"]));
    assert!(got.iter().all(|d| d.receive_count == 1));
    let ids: BTreeSet<_> = got.iter().map(|d| &d.message_id).collect();
    assert_eq!(ids.len(), 3, "message ids are distinct");
    assert!(
        q.receive(10, VIS).await.unwrap().is_empty(),
        "received messages are hidden"
    );
    delete_all(q, &got).await;
    tokio::time::sleep(AFTER_VIS).await;
    assert!(
        receive_n(q, 1, VIS).await.is_empty(),
        "deleted messages never come back"
    );
    assert_eq!(q.depth().await.unwrap().total(), 0);
}

/// A message not deleted within its visibility timeout is delivered again,
/// with the same id, a higher receive count and a new receipt.
pub async fn queue_visibility_timeout_redelivers(s: &Subject) {
    let q = s.work.as_ref();
    q.send(vec!["x".into()]).await.unwrap();
    let received = std::time::Instant::now();
    let first = receive_n(q, 1, VIS).await.pop().unwrap();
    let depth = q.depth().await.unwrap();
    // Only meaningful while the timeout can still be running: on a loaded
    // machine the count may come back after it expired.
    if received.elapsed() < VIS {
        assert_eq!((depth.visible, depth.in_flight), (0, 1));
    }
    tokio::time::sleep(AFTER_VIS).await;
    let second = receive_n(q, 1, VIS).await.pop().unwrap();
    assert_eq!(second.message_id, first.message_id);
    assert_eq!(second.receive_count, 2);
    assert_ne!(second.receipt, first.receipt);
    q.delete(vec![second.receipt]).await.unwrap();
    tokio::time::sleep(AFTER_VIS).await;
    assert!(receive_n(q, 1, VIS).await.is_empty());
}

/// Changing the visibility to zero makes a message receivable at once;
/// a longer one keeps it hidden past the original timeout.
pub async fn queue_change_visibility(s: &Subject) {
    let q = s.work.as_ref();
    q.send(vec!["x".into()]).await.unwrap();
    let d = receive_n(q, 1, Duration::from_secs(30))
        .await
        .pop()
        .unwrap();
    q.change_visibility(&d.receipt, Duration::ZERO)
        .await
        .unwrap();
    let again = receive_n(q, 1, VIS)
        .await
        .pop()
        .expect("visible again at once");
    assert_eq!(again.message_id, d.message_id);
    q.change_visibility(&again.receipt, Duration::from_secs(3))
        .await
        .unwrap();
    tokio::time::sleep(AFTER_VIS).await;
    assert!(
        q.receive(10, VIS).await.unwrap().is_empty(),
        "still hidden by the longer timeout"
    );
    // A zero visibility timeout still returns a message once per receive call.
    q.send(vec!["zero".into()]).await.unwrap();
    let zero = q.receive(10, Duration::ZERO).await.unwrap();
    let zeros = zero.iter().filter(|d| d.body == "zero").count();
    assert!(
        zeros <= 1,
        "one receive returned the same message {zeros} times"
    );
}

/// Batches over 10 entries and bodies over 256 KiB are refused, and nothing is sent.
pub async fn queue_limits(s: &Subject) {
    let q = s.work.as_ref();
    let eleven: Vec<String> = (0..11).map(|i| i.to_string()).collect();
    assert!(q.send(eleven).await.is_err(), "11 entries are refused");
    assert!(
        q.receive(11, VIS).await.is_err(),
        "receive of 11 is refused"
    );
    let big = "x".repeat(MAX_BODY_BYTES + 1);
    assert!(
        q.send(vec![big]).await.is_err(),
        "an oversize body is refused"
    );
    assert_eq!(q.depth().await.unwrap().total(), 0, "nothing was sent");
}

/// After `work_max_receives` receives without a delete, the message moves to
/// the dead-letter queue, body intact.
pub async fn queue_redrive_to_dlq(s: &Subject) {
    let q = s.work.as_ref();
    q.send(vec!["poison".into()]).await.unwrap();
    for n in 1..=s.work_max_receives {
        let d = receive_n(q, 1, VIS)
            .await
            .pop()
            .unwrap_or_else(|| panic!("receive {n}"));
        assert_eq!(d.receive_count, n);
        tokio::time::sleep(AFTER_VIS).await;
    }
    assert!(
        receive_n(q, 1, VIS).await.is_empty(),
        "not delivered past the limit"
    );
    let dead = receive_n(s.dlq.as_ref(), 1, VIS).await;
    assert_eq!(dead.len(), 1, "moved to the DLQ");
    assert_eq!(dead[0].body, "poison");
}

/// Messages sent in one call are still separate messages: each has its own
/// visibility, receive count, receipt and redrive, and depth counts each.
pub async fn queue_messages_of_one_send_are_independent(s: &Subject) {
    let q = s.work.as_ref();
    let long = Duration::from_secs(30);
    q.send(vec!["a".into(), "b".into(), "c".into()])
        .await
        .unwrap();
    let first = receive_n(q, 1, VIS).await.pop().unwrap();
    let depth = q.depth().await.unwrap();
    assert_eq!((depth.visible, depth.in_flight), (2, 1));
    let rest = receive_n(q, 2, long).await;
    assert_eq!(rest.len(), 2);
    let mut bodies: BTreeSet<_> = rest.iter().map(|d| d.body.as_str()).collect();
    bodies.insert(first.body.as_str());
    assert_eq!(bodies, BTreeSet::from(["a", "b", "c"]));
    let (gone, kept) = (&rest[0], &rest[1]);
    q.delete(vec![gone.receipt.clone()]).await.unwrap();
    q.change_visibility(&kept.receipt, Duration::ZERO)
        .await
        .unwrap();
    let kept = receive_n(q, 1, long)
        .await
        .pop()
        .expect("visible again at once");
    assert_eq!(
        (kept.body.as_str(), kept.receive_count),
        (rest[1].body.as_str(), 2)
    );
    tokio::time::sleep(AFTER_VIS).await;
    let mut again = receive_n(q, 3, VIS).await;
    assert_eq!(
        again.len(),
        1,
        "one message lapsed, one is deleted, one hidden"
    );
    let mut last = again.pop().unwrap();
    assert_eq!(
        (&last.message_id, last.receive_count),
        (&first.message_id, 2)
    );
    while last.receive_count < s.work_max_receives {
        tokio::time::sleep(AFTER_VIS).await;
        let n = last.receive_count;
        last = receive_n(q, 1, VIS).await.pop().expect("redelivered");
        assert_eq!(
            (&last.message_id, last.receive_count),
            (&first.message_id, n + 1)
        );
    }
    // At its limit, only that message moves to the DLQ.
    tokio::time::sleep(AFTER_VIS).await;
    assert!(receive_n(q, 3, VIS).await.is_empty());
    let dead = receive_n(s.dlq.as_ref(), 3, VIS).await;
    assert_eq!(dead.len(), 1, "only the message at its limit moved");
    assert_eq!(dead[0].body, first.body);
    let depth = q.depth().await.unwrap();
    assert_eq!((depth.visible, depth.in_flight), (0, 1));
    q.delete(vec![kept.receipt.clone()]).await.unwrap();
    assert_eq!(q.depth().await.unwrap().total(), 0);
}

/// Loading is all or nothing, and an id repeated in the input names its line.
pub async fn source_load_is_atomic(s: &Subject) {
    let input = vec![
        Ok((1, item("a", "1"))),
        Ok((2, item("b", "2"))),
        Ok((4, item("a", "3"))),
    ];
    match s.source.load(Box::new(input.into_iter())).await {
        Err(LoadError::Line(e)) => {
            assert_eq!(e.line, 4);
            assert!(e.reason.contains("duplicate id \"a\""), "{}", e.reason);
        }
        other => panic!("expected a line error, got {other:?}"),
    }
    assert_eq!(s.source.pending().await.unwrap(), 0, "nothing loaded");
    let n = s
        .source
        .load(Box::new(
            vec![Ok((1, item("a", "1"))), Ok((2, item("b", "2")))].into_iter(),
        ))
        .await
        .unwrap();
    assert_eq!(n, 2);
    match s
        .source
        .load(Box::new(vec![Ok((1, item("b", "9")))].into_iter()))
        .await
    {
        Err(LoadError::Line(e)) => assert!(e.reason.contains("already pending"), "{}", e.reason),
        other => panic!("a pending id loaded twice must be refused, got {other:?}"),
    }
    assert_eq!(s.source.pending().await.unwrap(), 2);
}

/// Concurrent claims never hand one item to two runs; the claimed pages,
/// read with the cursor, return each item of a run exactly once.
pub async fn source_claims_are_exclusive(s: &Subject) {
    let items: Vec<_> = (0..250)
        .map(|i| Ok((i + 1, item(&format!("i{i:03}"), "null"))))
        .collect();
    s.source.load(Box::new(items.into_iter())).await.unwrap();
    let a = dispatch::create_run(s.ledger.as_ref(), RunConfig::default())
        .await
        .unwrap();
    let b = dispatch::create_run(s.ledger.as_ref(), RunConfig::default())
        .await
        .unwrap();
    let claim = |run: RunId| {
        let src = s.source.clone();
        async move {
            let mut n = 0;
            loop {
                let got = src.claim(&run, 7).await.unwrap();
                if got == 0 {
                    return n;
                }
                n += got;
            }
        }
    };
    let (na, nb) = tokio::join!(claim(a.id.clone()), claim(b.id.clone()));
    assert_eq!(na + nb, 250);
    assert_eq!(s.source.pending().await.unwrap(), 0);
    let mut seen = BTreeSet::new();
    for (run, n) in [(&a.id, na), (&b.id, nb)] {
        assert_eq!(
            s.ledger.run(run).await.unwrap().unwrap().total,
            n,
            "total follows claims"
        );
        let mut cursor: Option<String> = None;
        let mut count = 0;
        loop {
            let (page, next) = s.source.claimed(run, cursor.as_deref(), 16).await.unwrap();
            if page.is_empty() {
                break;
            }
            count += page.len() as u64;
            for it in page {
                assert!(seen.insert(it.id.clone()), "{} claimed twice", it.id);
            }
            cursor = next;
        }
        assert_eq!(count, n);
    }
    assert_eq!(seen.len(), 250);
}

/// A run claims only items loaded before its first claim: a later load, even
/// of an id the run already holds, waits for the next run.
pub async fn source_claims_stop_at_the_first_claims_bound(s: &Subject) {
    let first: Vec<_> = (0..5)
        .map(|i| Ok((i + 1, item(&format!("u{i}"), "null"))))
        .collect();
    s.source.load(Box::new(first.into_iter())).await.unwrap();
    let r1 = dispatch::create_run(s.ledger.as_ref(), RunConfig::default())
        .await
        .unwrap();
    assert_eq!(
        s.source.claim(&r1.id, 2).await.unwrap(),
        2,
        "r1 holds u0 and u1"
    );
    let later = vec![Ok((1, item("u0", "null"))), Ok((2, item("v", "null")))];
    s.source
        .load(Box::new(later.into_iter()))
        .await
        .expect("u0 is claimed, not pending: it may be loaded again");
    let mut n = 0;
    loop {
        let got = s.source.claim(&r1.id, 2).await.unwrap();
        if got == 0 {
            break;
        }
        n += got;
    }
    assert_eq!(n, 3, "r1 takes the rest of the first load only");
    assert_eq!(s.ledger.run(&r1.id).await.unwrap().unwrap().total, 5);
    assert_eq!(s.source.pending().await.unwrap(), 2, "the later load waits");
    let r2 = dispatch::create_run(s.ledger.as_ref(), RunConfig::default())
        .await
        .unwrap();
    assert_eq!(s.source.claim(&r2.id, 10).await.unwrap(), 2);
}

/// A run loaded with its items owns them, and the pending items before
/// them, from the moment the load returns; a failed or empty load leaves
/// no run and no items; what is loaded later is never that run's.
pub async fn source_load_run_owns_its_items(s: &Subject) {
    s.source
        .load(Box::new(
            vec![Ok((1, item("early-1", "1"))), Ok((2, item("early-2", "2")))].into_iter(),
        ))
        .await
        .unwrap();

    // A bad line: neither the run nor any item.
    let bad = dispatch::new_run(RunConfig::default());
    let input = vec![Ok((1, item("a", "1"))), Ok((2, item("a", "2")))];
    match s.source.load_run(&bad, Box::new(input.into_iter())).await {
        Err(LoadError::Line(e)) => assert_eq!(e.line, 2, "{}", e.reason),
        other => panic!("expected a line error, got {other:?}"),
    }
    assert!(s.ledger.run(&bad.id).await.unwrap().is_none(), "no run");
    assert_eq!(s.source.pending().await.unwrap(), 2, "nothing loaded");

    // Nothing to load: nothing created.
    let empty = dispatch::new_run(RunConfig::default());
    let none: Vec<Result<(u64, Item), LineError>> = Vec::new();
    assert_eq!(
        s.source
            .load_run(&empty, Box::new(none.into_iter()))
            .await
            .unwrap(),
        0
    );
    assert!(s.ledger.run(&empty.id).await.unwrap().is_none());

    let run = dispatch::new_run(RunConfig::default());
    let input = vec![
        Ok((1, item("a", "1"))),
        Ok((2, item("b", "2"))),
        Ok((3, item("c", "3"))),
    ];
    let n = s
        .source
        .load_run(&run, Box::new(input.into_iter()))
        .await
        .unwrap();
    assert_eq!(n, 3);
    let r = s
        .ledger
        .run(&run.id)
        .await
        .unwrap()
        .expect("the run exists");
    assert_eq!((r.total, r.dispatched), (5, false), "{r:?}");
    assert_eq!(s.source.pending().await.unwrap(), 0, "all claimed");

    // Tomorrow's file, loaded before the run dispatches: not the run's.
    s.source
        .load(Box::new(vec![Ok((1, item("a", "9")))].into_iter()))
        .await
        .unwrap();
    assert_eq!(s.source.claim(&run.id, 100).await.unwrap(), 0);
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let (page, next) = s
            .source
            .claimed(&run.id, cursor.as_deref(), 2)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        ids.extend(page.into_iter().map(|i| i.id.as_str().to_owned()));
        cursor = next;
    }
    assert_eq!(ids, ["early-1", "early-2", "a", "b", "c"]);
    assert_eq!(s.source.pending().await.unwrap(), 1);
    let other = dispatch::create_run(s.ledger.as_ref(), RunConfig::default())
        .await
        .unwrap();
    assert_eq!(s.source.claim(&other.id, 100).await.unwrap(), 1);
}

/// An open redrive keeps a settled run from passing for settled until it
/// is closed; an unknown run is `NotFound`.
pub async fn ledger_redriving_keeps_a_run_open(s: &Subject) {
    let run = fresh_run(s, 0).await;
    let r = s.ledger.run(&run).await.unwrap().unwrap();
    assert!(r.is_settled() && !r.redriving, "{r:?}");
    s.ledger.set_redriving(&run, true).await.unwrap();
    let r = s.ledger.run(&run).await.unwrap().unwrap();
    assert!(r.redriving && !r.is_settled(), "{r:?}");
    assert_eq!(r.status(), settle_core::domain::RunStatus::Running);
    let listed = s.ledger.runs(10).await.unwrap();
    assert!(listed.iter().any(|l| l.id == run && l.redriving));
    s.ledger.set_redriving(&run, false).await.unwrap();
    let r = s.ledger.run(&run).await.unwrap().unwrap();
    assert!(r.is_settled() && !r.redriving, "{r:?}");
    let ghost = dispatch::new_run(RunConfig::default()).id;
    match s.ledger.set_redriving(&ghost, true).await {
        Err(PortError::NotFound(_)) => {}
        other => panic!("an unknown run must be NotFound, got {other:?}"),
    }
    assert!(s.ledger.run(&ghost).await.unwrap().is_none());
}

/// Dispatch progress never moves backwards, and a finished dispatch stays finished.
pub async fn ledger_dispatch_progress_only_moves_forward(s: &Subject) {
    let run = dispatch::create_run(s.ledger.as_ref(), RunConfig::default())
        .await
        .unwrap();
    s.ledger
        .record_dispatch(&run.id, 20, Some("c20"), true)
        .await
        .unwrap();
    // A slower second dispatcher reports stale progress.
    s.ledger
        .record_dispatch(&run.id, 10, Some("c10"), false)
        .await
        .unwrap();
    let r = s.ledger.run(&run.id).await.unwrap().unwrap();
    assert_eq!(
        (r.enqueued, r.cursor.as_deref(), r.dispatched),
        (20, Some("c20"), true)
    );
}

/// The same ids loaded again after a dispatch make new work, not a conflict.
pub async fn source_ids_recur_across_runs(s: &Subject) {
    let load = || {
        s.source
            .load(Box::new(vec![Ok((1, item("user-1", "null")))].into_iter()))
    };
    load().await.unwrap();
    let r1 = dispatch::create_run(s.ledger.as_ref(), RunConfig::default())
        .await
        .unwrap();
    assert_eq!(s.source.claim(&r1.id, 10).await.unwrap(), 1);
    load()
        .await
        .expect("an id claimed by an earlier run may be loaded again");
    let r2 = dispatch::create_run(s.ledger.as_ref(), RunConfig::default())
        .await
        .unwrap();
    assert_eq!(s.source.claim(&r2.id, 10).await.unwrap(), 1);
}

async fn fresh_run(s: &Subject, total: u64) -> RunId {
    let items: Vec<_> = (0..total)
        .map(|i| Ok((i + 1, item(&format!("t{i}"), "null"))))
        .collect();
    if total > 0 {
        s.source.load(Box::new(items.into_iter())).await.unwrap();
    }
    let run = dispatch::create_run(s.ledger.as_ref(), RunConfig::default())
        .await
        .unwrap();
    while s.source.claim(&run.id, 1000).await.unwrap() > 0 {}
    s.ledger
        .record_dispatch(&run.id, total, None, true)
        .await
        .unwrap();
    run.id
}

/// A put whose expected version is stale is not written, and the tally
/// moves by exactly the rows written: nothing at all if the ledger's commit
/// is atomic, else the rows whose versions held.
pub async fn ledger_commit_is_conditional_and_atomic(s: &Subject) {
    let run = fresh_run(s, 24).await;
    let id = |n: &str| ItemId::new(n).unwrap();
    let rec = |status| ItemRecord {
        status,
        ..ItemRecord::default()
    };
    let put = |item: &str, expected, status| ItemPut {
        run: run.clone(),
        item: id(item),
        seq: item[1..].parse().unwrap(),
        expected,
        record: rec(status),
    };
    let ok = LedgerBatch {
        puts: vec![put("t0", None, ItemStatus::Succeeded)],
        tallies: vec![(
            run.clone(),
            TallyDelta {
                succeeded: 1,
                failed: 0,
            },
        )],
    };
    let runs = s.ledger.commit(ok.clone()).await.unwrap();
    assert_eq!(runs[0].succeeded, 1);
    // Same batch again: `expected: None` no longer holds.
    assert!(matches!(
        s.ledger.commit(ok).await,
        Err(PortError::Conflict)
    ));
    let mixed = LedgerBatch {
        puts: vec![
            put("t1", None, ItemStatus::Failed),
            put("t0", Some(99), ItemStatus::Failed),
        ],
        tallies: vec![(
            run.clone(),
            TallyDelta {
                succeeded: -1,
                failed: 2,
            },
        )],
    };
    assert!(matches!(
        s.ledger.commit(mixed).await,
        Err(PortError::Conflict)
    ));
    let r = s.ledger.run(&run).await.unwrap().unwrap();
    let rows = s
        .ledger
        .items(&[(run.clone(), id("t0")), (run.clone(), id("t1"))])
        .await
        .unwrap();
    if s.ledger.atomic_commit() {
        assert_eq!(
            (r.succeeded, r.failed),
            (1, 0),
            "a refused commit moves no tally"
        );
        assert_eq!(rows.len(), 1, "and writes no row");
    } else {
        assert_eq!(
            (r.succeeded, r.failed),
            (1, 1),
            "the row whose version held is written and counted, the stale one neither"
        );
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[&(run.clone(), id("t1"))].value.status,
            ItemStatus::Failed
        );
    }
    assert_eq!(
        rows[&(run.clone(), id("t0"))].value.status,
        ItemStatus::Succeeded
    );
    let v = rows[&(run.clone(), id("t0"))].version;
    let next = LedgerBatch {
        puts: vec![put("t0", Some(v), ItemStatus::Succeeded)],
        tallies: vec![],
    };
    s.ledger.commit(next).await.unwrap();
    let after = s.ledger.items(&[(run.clone(), id("t0"))]).await.unwrap();
    assert_ne!(
        after[&(run.clone(), id("t0"))].version,
        v,
        "a write moves the version"
    );

    // A larger commit, as a reducer's are: twenty new rows, and an existing
    // row among them refuses it all the same.
    let fresh: Vec<String> = (2..22).map(|i| format!("t{i}")).collect();
    let keys: Vec<_> = fresh.iter().map(|n| (run.clone(), id(n))).collect();
    let mut puts: Vec<ItemPut> = fresh
        .iter()
        .map(|n| put(n, None, ItemStatus::Succeeded))
        .collect();
    puts.insert(9, put("t0", None, ItemStatus::Succeeded));
    let tally = |succeeded| {
        vec![(
            run.clone(),
            TallyDelta {
                succeeded,
                failed: 0,
            },
        )]
    };
    let refused = LedgerBatch {
        puts,
        tallies: tally(21),
    };
    assert!(matches!(
        s.ledger.commit(refused).await,
        Err(PortError::Conflict)
    ));
    if s.ledger.atomic_commit() {
        assert!(
            s.ledger.items(&keys).await.unwrap().is_empty(),
            "a refused commit writes none of its new rows"
        );
    }
    // Without the existing row it goes through (on a non-atomic ledger the
    // refused try has written these rows already).
    let before = s.ledger.run(&run).await.unwrap().unwrap().succeeded;
    if s.ledger.atomic_commit() {
        let puts: Vec<ItemPut> = fresh
            .iter()
            .map(|n| put(n, None, ItemStatus::Succeeded))
            .collect();
        s.ledger
            .commit(LedgerBatch {
                puts,
                tallies: tally(20),
            })
            .await
            .unwrap();
        let after = s.ledger.run(&run).await.unwrap().unwrap().succeeded;
        assert_eq!(after, before + 20);
    }
    let rows = s.ledger.items(&keys).await.unwrap();
    assert_eq!(rows.len(), 20, "every new row of a commit is written");
    assert!(rows
        .values()
        .all(|r| r.value.status == ItemStatus::Succeeded && r.version == 1));
}

fn result(run: &RunId, item: &str, attempt: u32, msg: &str, outcome: AttemptOutcome) -> Delivery {
    let body = ResultBody {
        run: run.clone(),
        item: ItemId::new(item).unwrap(),
        // The clauses name items t0, t1, ... in claim order.
        seq: item[1..].parse().unwrap(),
        attempt: Attempt {
            attempt,
            message_id: msg.into(),
            started_at: now_millis(),
            duration_ms: 1,
            outcome,
            output: None,
            log: None,
        },
    };
    Delivery {
        message_id: format!("res-{item}-{attempt}-{msg}"),
        receipt: String::new(),
        body: body.encode(),
        receive_count: 1,
    }
}

fn failed(terminal: bool) -> AttemptOutcome {
    AttemptOutcome::Failed {
        kind: ErrorKind::Retryable,
        error: "declined".into(),
        terminal,
    }
}

/// Results delivered many times, in one batch and across concurrent
/// reducers, count once; the run settles exactly once.
pub async fn ledger_duplicate_results_count_once(s: &Subject) {
    let run = fresh_run(s, 20).await;
    let mut all = Vec::new();
    for i in 0..20 {
        let outcome = if i % 4 == 0 {
            failed(true)
        } else {
            AttemptOutcome::Succeeded
        };
        all.push(result(&run, &format!("t{i}"), 1, &format!("m{i}"), outcome));
    }
    // Each result three times, split over concurrent reducer calls.
    let mut copies: Vec<Delivery> = all.iter().chain(&all).chain(&all).cloned().collect();
    copies.reverse();
    let chunks: Vec<Vec<Delivery>> = copies.chunks(13).map(<[Delivery]>::to_vec).collect();
    let reports =
        futures::future::join_all(chunks.iter().map(|c| reduce::reduce(s.ledger.as_ref(), c)))
            .await;
    assert!(reports.iter().all(|r| r.response.failures.is_empty()));
    let applied: usize = reports.iter().map(|r| r.applied).sum();
    let dupes: usize = reports.iter().map(|r| r.duplicates).sum();
    assert_eq!(applied + dupes, 60);
    if s.ledger.atomic_commit() {
        assert_eq!((applied, dupes), (20, 40));
    } else {
        // A commit that lost a race on one row wrote others; its retry
        // finds those applied and reports them as duplicates.
        assert!((1..=20).contains(&applied), "{applied} applied");
    }
    let settled: usize = reports.iter().map(|r| r.settled.len()).sum();
    assert_eq!(settled, 1, "the run settles once");
    let r = s.ledger.run(&run).await.unwrap().unwrap();
    assert_eq!((r.succeeded, r.failed, r.pending()), (15, 5, 0));
    assert!(r.settled_at.is_some());
    let f = s.ledger.failures(&run, None, 100).await.unwrap();
    assert_eq!(f.len(), 5);
    assert_eq!(f[0].1.last_error.as_deref(), Some("declined"));
}

/// A success after a terminal failure (a redrive) moves the item from failed
/// to succeeded; a retryable non-terminal failure moves nothing.
pub async fn ledger_redrive_success_moves_failed_to_succeeded(s: &Subject) {
    let run = fresh_run(s, 1).await;
    let steps = [
        (result(&run, "t0", 1, "m1", failed(false)), (0, 0)),
        (result(&run, "t0", 2, "m1", failed(true)), (0, 1)),
        (
            result(&run, "t0", 3, "m2", AttemptOutcome::Succeeded),
            (1, 0),
        ),
        (result(&run, "t0", 2, "m1", failed(true)), (1, 0)),
    ];
    for (d, want) in steps {
        let rep = reduce::reduce(s.ledger.as_ref(), std::slice::from_ref(&d)).await;
        assert!(rep.response.failures.is_empty());
        let r = s.ledger.run(&run).await.unwrap().unwrap();
        assert_eq!((r.succeeded, r.failed), want);
    }
    let rows = s
        .ledger
        .items(&[(run.clone(), ItemId::new("t0").unwrap())])
        .await
        .unwrap();
    let rec = &rows.values().next().unwrap().value;
    assert_eq!(rec.attempts, 3);
    assert_eq!(
        rec.history.len(),
        3,
        "the replayed result is not in the history twice"
    );
}

/// An undecodable result is handed back for retry and touches nothing else.
pub async fn ledger_bad_result_fails_alone(s: &Subject) {
    let run = fresh_run(s, 1).await;
    let good = result(&run, "t0", 1, "m", AttemptOutcome::Succeeded);
    let bad = Delivery {
        message_id: "junk".into(),
        receipt: String::new(),
        body: "{not json".into(),
        receive_count: 1,
    };
    let rep = reduce::reduce(s.ledger.as_ref(), &[bad, good]).await;
    assert_eq!(rep.response.failures, vec!["junk".to_string()]);
    assert_eq!(s.ledger.run(&run).await.unwrap().unwrap().succeeded, 1);
}

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

/// Redrives every dead-lettered message of `run` on `s`.
pub async fn redrive_all(
    s: &Subject,
    run: &RunId,
) -> Result<redrive::RedriveReport, redrive::RedriveError> {
    redrive::redrive(
        s.ledger.as_ref(),
        s.dlq.as_ref(),
        s.work.as_ref(),
        run,
        None,
        false,
        &|| false,
    )
    .await
}

/// Every clause, by name: a backend's test module must run all of them.
pub const CLAUSES: &[&str] = &[
    "queue_send_receive_delete",
    "queue_visibility_timeout_redelivers",
    "queue_change_visibility",
    "queue_limits",
    "queue_redrive_to_dlq",
    "queue_messages_of_one_send_are_independent",
    "source_load_is_atomic",
    "source_claims_are_exclusive",
    "source_ids_recur_across_runs",
    "source_claims_stop_at_the_first_claims_bound",
    "source_load_run_owns_its_items",
    "ledger_commit_is_conditional_and_atomic",
    "ledger_dispatch_progress_only_moves_forward",
    "ledger_redriving_keeps_a_run_open",
    "ledger_duplicate_results_count_once",
    "ledger_redrive_success_moves_failed_to_succeeded",
    "ledger_bad_result_fails_alone",
    "reconcile_settles_messages_the_queue_parked",
    "redrive_moves_one_message_per_item",
    "idempotency_first_execution_stores_result",
    "idempotency_duplicate_returns_stored_result",
    "idempotency_different_payload_is_refused",
    "idempotency_expired_claim_is_reclaimed",
    "idempotency_unexpired_claim_is_in_progress",
    "idempotency_failure_releases_the_claim",
    "idempotency_concurrent_claimers_execute_once",
];

/// Expands to one `#[tokio::test]` per clause, each on a fresh subject from
/// `$fresh` (an async expression yielding a [`Subject`]).
#[macro_export]
macro_rules! conformance_tests {
    ($fresh:expr) => {
        $crate::conformance_tests!(@each $fresh;
            queue_send_receive_delete,
            queue_visibility_timeout_redelivers,
            queue_change_visibility,
            queue_limits,
            queue_redrive_to_dlq,
            queue_messages_of_one_send_are_independent,
            source_load_is_atomic,
            source_claims_are_exclusive,
            source_ids_recur_across_runs,
            source_claims_stop_at_the_first_claims_bound,
            source_load_run_owns_its_items,
            ledger_commit_is_conditional_and_atomic,
            ledger_dispatch_progress_only_moves_forward,
            ledger_redriving_keeps_a_run_open,
            ledger_duplicate_results_count_once,
            ledger_redrive_success_moves_failed_to_succeeded,
            ledger_bad_result_fails_alone,
            reconcile_settles_messages_the_queue_parked,
            redrive_moves_one_message_per_item,
            idempotency_first_execution_stores_result,
            idempotency_duplicate_returns_stored_result,
            idempotency_different_payload_is_refused,
            idempotency_expired_claim_is_reclaimed,
            idempotency_unexpired_claim_is_in_progress,
            idempotency_failure_releases_the_claim,
            idempotency_concurrent_claimers_execute_once
        );
    };
    (@each $fresh:expr; $($clause:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $clause() {
                let subject = $fresh.await;
                $crate::$clause(&subject).await;
            }
        )*
        #[test]
        fn clause_list_is_complete() {
            let expanded: &[&str] = &[$(stringify!($clause)),*];
            assert_eq!(expanded, $crate::CLAUSES, "the macro and CLAUSES disagree");
        }
    };
}
