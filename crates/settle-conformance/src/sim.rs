//! A seeded fault simulation over any backend: items with scripted outcomes
//! run through the real dispatch, worker, runner and reducer while every
//! queue and ledger call may fail, repeat, lose a delete or redeliver early.
//! At the end the invariants are checked; then, with faults off, a redrive of
//! every failure must bring the tally to the scripts' ground truth.

use crate::faults::{Faults, FaultyLedger, FaultyQueue};
use crate::Subject;
use serde_json::value::RawValue;
use settle_core::dispatch::{self, Dispatched};
use settle_core::domain::{Item, ItemId, ItemStatus, RunConfig, RunId};
use settle_core::ports::{Ledger, Queue};
use settle_core::redrive;
use settle_core::runner::{Runner, RunnerConfig, RunnerStats};
use settle_core::work::{Worker, WorkerConfig};
use settle_core::Scripted;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What one simulation did.
#[derive(Debug, Clone)]
pub struct SimReport {
    pub seed: u64,
    pub items: u64,
    pub faults: u64,
    /// Items the faults alone failed ("no outcome"), all put right by the redrive.
    pub failed_by_faults: u64,
    pub redriven: u64,
}

const SCRIPTS: [(&str, u32); 4] = [
    ("ok", 70),
    ("retryable:1", 15),
    ("permanent", 10),
    ("panic", 5),
];

fn pick_script(rng: &mut fastrand::Rng) -> &'static str {
    let mut roll = rng.u32(0..100);
    for (script, share) in SCRIPTS {
        if roll < share {
            return script;
        }
        roll -= share;
    }
    "ok"
}

/// The status a script must end in, given enough attempts.
fn truth(script: &str) -> ItemStatus {
    match script {
        "permanent" | "panic" => ItemStatus::Failed,
        _ => ItemStatus::Succeeded,
    }
}

fn runner(
    work: Arc<dyn Queue>,
    dlq: Arc<dyn Queue>,
    results: Arc<dyn Queue>,
    ledger: Arc<dyn Ledger>,
) -> Runner {
    let worker = Worker::new(
        Arc::new(Scripted),
        work.clone(),
        dlq,
        results.clone(),
        WorkerConfig {
            retry_delay: Duration::from_millis(5),
            item_timeout: Some(Duration::from_millis(500)),
            ..WorkerConfig::default()
        },
    );
    Runner {
        worker: Arc::new(worker),
        work,
        results,
        ledger,
        config: RunnerConfig {
            concurrency: 8,
            visibility: Duration::from_secs(1),
            // Short, so lost deletes come back within the simulation's time.
            results_visibility: Duration::from_secs(1),
            reducers: 2,
            ..RunnerConfig::default()
        },
        stats: Arc::new(RunnerStats::default()),
    }
}

/// Runs `r` until `done` holds (checked every 20 ms), or panics after `limit`.
async fn run_until<F, Fut>(r: Runner, limit: Duration, what: &str, done: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(async move { r.run(rx).await });
    let started = Instant::now();
    while !done().await {
        assert!(
            started.elapsed() < limit,
            "{what}: not done after {limit:?}"
        );
        assert!(!task.is_finished(), "{what}: the runner stopped early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(true);
    task.await.expect("runner task").expect("runner");
}

/// Simulates `n` items under fault `rate` with `seed`, checks every
/// invariant, and panics with the seed in the message on any violation.
pub async fn simulate(s: &Subject, seed: u64, n: u64, rate: f64) -> SimReport {
    let mut rng = fastrand::Rng::with_seed(seed);
    let scripts: BTreeMap<ItemId, &str> = (0..n)
        .map(|i| {
            (
                ItemId::new(format!("s{seed}-{i:05}")).expect("id"),
                pick_script(&mut rng),
            )
        })
        .collect();
    let input: Vec<_> = scripts
        .iter()
        .enumerate()
        .map(|(i, (id, script))| {
            let payload =
                RawValue::from_string(format!(r#"{{"script":"{script}"}}"#)).expect("json");
            Ok((i as u64 + 1, Item::new(id.clone(), payload)))
        })
        .collect();
    s.source
        .load(Box::new(input.into_iter()))
        .await
        .expect("load");
    let config = RunConfig {
        max_receives: 4,
        ..RunConfig::default()
    };
    let run = dispatch::create_run(s.ledger.as_ref(), config)
        .await
        .expect("create run")
        .id;

    let faults = Faults::new(seed, rate);
    let work = FaultyQueue::wrap(s.work.clone(), faults.clone());
    let dlq = FaultyQueue::wrap(s.dlq.clone(), faults.clone());
    let results = FaultyQueue::wrap(s.results.clone(), faults.clone());
    let ledger = FaultyLedger::wrap(s.ledger.clone(), faults.clone());

    // Dispatch is resumable: a failed call is simply run again.
    let mut tries = 0;
    loop {
        tries += 1;
        assert!(tries < 1000, "seed {seed}: dispatch never finished");
        if let Ok(Dispatched::Done { .. }) = dispatch::dispatch(
            s.source.as_ref(),
            s.ledger.as_ref(),
            work.as_ref(),
            &run,
            None,
        )
        .await
        {
            break;
        }
    }

    let settled = {
        let l = s.ledger.clone();
        let run = run.clone();
        move || {
            let (l, run) = (l.clone(), run.clone());
            async move {
                l.run(&run)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|r| r.is_settled())
            }
        }
    };
    let r = runner(work, dlq, results, ledger);
    run_until(
        r,
        Duration::from_secs(120),
        &format!("seed {seed}: the faulty run"),
        &settled,
    )
    .await;
    let injected = faults.counts.total();
    faults.disable();

    // Invariant 1: one bucket per item, the tally agrees with the rows.
    let rec = s.ledger.run(&run).await.expect("run").expect("run row");
    assert_eq!((rec.total, rec.pending()), (n, 0), "seed {seed}: {rec:?}");
    assert_eq!(rec.succeeded + rec.failed, n, "seed {seed}: {rec:?}");
    let rows = rows(s, &run, &scripts).await;
    let count = |st| rows.values().filter(|(status, _)| *status == st).count() as u64;
    assert_eq!(
        (count(ItemStatus::Succeeded), count(ItemStatus::Failed)),
        (rec.succeeded, rec.failed),
        "seed {seed}: the tally disagrees with the item rows"
    );

    // Invariant 3 and 4: outcomes follow the scripts; a fault can only fail an
    // item by starving it of receives, and says so.
    let mut failed_by_faults = 0;
    for (id, script) in &scripts {
        let (status, error) = &rows[id];
        match (truth(script), status) {
            (ItemStatus::Failed, ItemStatus::Succeeded) => {
                panic!("seed {seed}: {id} ({script}) succeeded")
            }
            (ItemStatus::Succeeded, ItemStatus::Failed) => {
                assert!(
                    error.starts_with("no outcome after"),
                    "seed {seed}: {id} ({script}) failed: {error}"
                );
                failed_by_faults += 1;
            }
            (ItemStatus::Failed, ItemStatus::Failed) => {
                let want = if *script == "panic" {
                    "panic: "
                } else {
                    "permanent failure"
                };
                assert!(
                    error.starts_with(want) || error.starts_with("no outcome after"),
                    "seed {seed}: {id} ({script}): {error}"
                );
            }
            _ => {}
        }
    }

    // Invariant 5: redriving every failure (faults off) moves exactly the
    // failed items and ends at the ground truth.
    let moved = redrive::redrive(
        s.ledger.as_ref(),
        s.dlq.as_ref(),
        s.work.as_ref(),
        &run,
        None,
        false,
    )
    .await
    .expect("redrive");
    let failed: std::collections::BTreeSet<ItemId> = rows
        .iter()
        .filter(|(_, (st, _))| *st == ItemStatus::Failed)
        .map(|(id, _)| id.clone())
        .collect();
    // Every failed item is in the DLQ. A succeeded item may have a leftover
    // copy there too (a duplicate delivery that ran out of receives): moving
    // it is harmless, success wins.
    let missing: Vec<_> = failed.difference(&moved.items).collect();
    if !missing.is_empty() {
        let keys: Vec<_> = missing
            .iter()
            .map(|id| (run.clone(), (*id).clone()))
            .collect();
        let detail = s.ledger.items(&keys).await.expect("items");
        panic!("seed {seed}: failed items missing from the DLQ: {detail:#?}");
    }
    let drained = {
        let (w, res) = (s.work.clone(), s.results.clone());
        move || {
            let (w, res) = (w.clone(), res.clone());
            async move {
                w.depth().await.is_ok_and(|d| d.total() == 0)
                    && res.depth().await.is_ok_and(|d| d.total() == 0)
            }
        }
    };
    let r = runner(
        s.work.clone(),
        s.dlq.clone(),
        s.results.clone(),
        s.ledger.clone(),
    );
    run_until(
        r,
        Duration::from_secs(120),
        &format!("seed {seed}: the redrive"),
        &drained,
    )
    .await;
    let rows = self::rows(s, &run, &scripts).await;
    for (id, script) in &scripts {
        assert_eq!(
            rows[id].0,
            truth(script),
            "seed {seed}: {id} ({script}) after the redrive"
        );
    }
    let want_failed = scripts
        .values()
        .filter(|s| truth(s) == ItemStatus::Failed)
        .count() as u64;
    let rec = s.ledger.run(&run).await.expect("run").expect("run row");
    assert_eq!(
        (rec.succeeded, rec.failed),
        (n - want_failed, want_failed),
        "seed {seed}: final tally"
    );
    SimReport {
        seed,
        items: n,
        faults: injected,
        failed_by_faults,
        redriven: moved.items.len() as u64,
    }
}

async fn rows(
    s: &Subject,
    run: &RunId,
    scripts: &BTreeMap<ItemId, &str>,
) -> BTreeMap<ItemId, (ItemStatus, String)> {
    let keys: Vec<_> = scripts.keys().map(|id| (run.clone(), id.clone())).collect();
    let mut out = BTreeMap::new();
    for chunk in keys.chunks(100) {
        for ((_, id), v) in s.ledger.items(chunk).await.expect("items") {
            out.insert(id, (v.value.status, v.value.last_error.unwrap_or_default()));
        }
    }
    assert_eq!(out.len(), scripts.len(), "every item has a ledger row");
    out
}
