//! Clauses of the ledger contract (`settle_core::ports::Ledger`), alone
//! and under the reducer: conditional commits, exact tallies, runs kept
//! open while a redrive is.

use crate::{failed, fresh_run, result, Subject};
use settle_core::domain::{
    AttemptOutcome, ItemId, ItemRecord, ItemStatus, RedriveScope, RunConfig, Selection, TallyDelta,
};
use settle_core::ports::{Delivery, ItemPut, LedgerBatch, PortError};
use settle_core::{dispatch, reduce};
use std::collections::BTreeSet;

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

/// A redrive's scope is recorded with its run and read back as written (by
/// `run` and `runs`); it keeps the run from passing for settled; a newer
/// scope replaces it; it is cleared only while it is still the recorded
/// one; an unknown run is `NotFound`.
pub async fn ledger_redrive_scope_round_trips(s: &Subject) {
    let run = fresh_run(s, 0).await;
    assert_eq!(s.ledger.run(&run).await.unwrap().unwrap().redrive, None);
    let ids = |names: &[&str]| -> BTreeSet<ItemId> {
        names.iter().map(|n| ItemId::new(*n).unwrap()).collect()
    };
    // Ids that JSON and the stores must keep as they are.
    let named = RedriveScope::new(Selection::items(ids(&["a", "é \"q\"", "z\\ \u{263a}"])));
    s.ledger.set_redrive(&run, &named).await.unwrap();
    let r = s.ledger.run(&run).await.unwrap().unwrap();
    assert_eq!(r.redrive.as_ref(), Some(&named), "{r:?}");
    assert!(!r.is_settled() && !r.redriving, "{r:?}");
    assert_eq!(r.status(), settle_core::domain::RunStatus::Running);
    let listed = s.ledger.runs(10).await.unwrap();
    let l = listed.iter().find(|l| l.id == run).unwrap();
    assert_eq!(l.redrive.as_ref(), Some(&named));

    let all = named.union(&RedriveScope::new(Selection::all_failed()));
    s.ledger.set_redrive(&run, &all).await.unwrap();
    let r = s.ledger.run(&run).await.unwrap().unwrap();
    assert_eq!(r.redrive.as_ref(), Some(&all), "replaced");
    assert!(
        !s.ledger.clear_redrive(&run, &named).await.unwrap(),
        "the replaced scope does not clear the newer one"
    );
    assert_eq!(
        s.ledger.run(&run).await.unwrap().unwrap().redrive,
        Some(all.clone())
    );
    assert!(s.ledger.clear_redrive(&run, &all).await.unwrap());
    let r = s.ledger.run(&run).await.unwrap().unwrap();
    assert!(r.redrive.is_none() && r.is_settled(), "{r:?}");
    assert!(
        !s.ledger.clear_redrive(&run, &all).await.unwrap(),
        "already clear"
    );

    let ghost = dispatch::new_run(RunConfig::default()).id;
    match s.ledger.set_redrive(&ghost, &all).await {
        Err(PortError::NotFound(_)) => {}
        other => panic!("an unknown run must be NotFound, got {other:?}"),
    }
    match s.ledger.clear_redrive(&ghost, &all).await {
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
                ..TallyDelta::default()
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
                ..TallyDelta::default()
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
                ..TallyDelta::default()
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
