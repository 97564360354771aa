//! Clauses of the item source contract (`settle_core::ports::Source`):
//! atomic loads, exclusive claims, and ids that recur across runs.

use crate::{item, Subject};
use settle_core::domain::{Item, RunConfig};
use settle_core::ports::{LineError, LoadError};
use settle_core::{dispatch, RunId};
use std::collections::BTreeSet;

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
