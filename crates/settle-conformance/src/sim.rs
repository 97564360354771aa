//! A seeded fault simulation over any backend: items with scripted outcomes
//! run through the real dispatch, worker, runner and reducer while every
//! queue and ledger call may fail, repeat, lose a delete or redeliver early.
//! At the end the invariants are checked; then, with faults off, a redrive of
//! every failure must bring the tally to the scripts' ground truth.
//!
//! The processor makes each item's work a side effect under the idempotency
//! utility (over a faulty idempotency store too) and counts, per item, how
//! often that side effect ran: never more than once, whatever the
//! duplicates, redeliveries and faults.

use crate::faults::{FaultTally, Faults, FaultyIdempotency, FaultyLedger, FaultyQueue, Trace};
use crate::{redrive_all, Subject};
use async_trait::async_trait;
use serde_json::value::RawValue;
use settle_core::dispatch::{self, Dispatched};
use settle_core::domain::{
    simulate_wall_clock, Item, ItemId, ItemStatus, Millis, ProcessError, RunConfig, RunId,
};
use settle_core::idempotency::{Idempotency, IdempotencyError};
use settle_core::ports::{Ledger, Queue};
use settle_core::reconcile;
use settle_core::runner::{Runner, RunnerConfig, RunnerStats};
use settle_core::work::{Worker, WorkerConfig};
use settle_core::{AttemptContext, Processor, Scripted};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// What one simulation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimReport {
    pub seed: u64,
    pub items: u64,
    /// Faults injected, all kinds.
    pub faults: u64,
    pub faults_by_kind: FaultTally,
    /// Side effects that ran to success under the idempotency utility.
    pub effects_executed: u64,
    /// Duplicates answered with a stored result, without running the effect.
    pub effects_replayed: u64,
    /// Duplicates refused because another attempt held the claim.
    pub effects_in_progress: u64,
    /// Items whose side effect ran more than once (checked to be 0).
    pub double_executions: u64,
    /// Items the faults alone failed ("no outcome"), all put right by the redrive.
    pub failed_by_faults: u64,
    /// Items whose message the queue's redrive policy parked without a
    /// result, reported failed by the reconciler (and among those redriven).
    pub reconciled: u64,
    pub redriven: u64,
    /// What the fault decorators saw, in order: equal on an exact replay.
    pub trace: Trace,
}

/// A hang: far past any item timeout, so every attempt is cut off (with
/// paused time, at no cost in real time).
const HANG: &str = "sleep:600000";

const SCRIPTS: [(&str, u32); 5] = [
    ("ok", 67),
    ("retryable:1", 15),
    ("permanent", 10),
    ("panic", 5),
    (HANG, 3),
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
        "permanent" | "panic" | HANG => ItemStatus::Failed,
        _ => ItemStatus::Succeeded,
    }
}

/// How often the simulated side effects ran, per item and in all.
#[derive(Debug, Default)]
struct EffectCounts {
    executions: Mutex<BTreeMap<ItemId, u64>>,
    executed: AtomicU64,
    replayed: AtomicU64,
    in_progress: AtomicU64,
}

impl EffectCounts {
    fn executions(&self) -> BTreeMap<ItemId, u64> {
        self.executions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The simulated processor: the scripted work, then a counted side effect,
/// both wrapped by the idempotency utility. A script's failure or panic
/// happens before the effect, so only a success counts as an execution.
#[derive(Debug)]
struct CountedEffects {
    idem: Idempotency,
    counts: Arc<EffectCounts>,
}

#[async_trait]
impl Processor for CountedEffects {
    async fn process(
        &self,
        item: &Item,
        ctx: &AttemptContext,
    ) -> Result<Option<settle_core::domain::Output>, ProcessError> {
        let ran = AtomicBool::new(false);
        let res = self
            .idem
            .run_for(ctx, item, || async {
                Scripted.process(item, ctx).await?;
                ran.store(true, Ordering::Relaxed);
                let n = {
                    let mut map = self
                        .counts
                        .executions
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    let n = map.entry(item.id.clone()).or_default();
                    *n += 1;
                    *n
                };
                self.counts.executed.fetch_add(1, Ordering::Relaxed);
                Ok(format!("effect {} #{n}", item.id))
            })
            .await;
        match &res {
            Ok(_) if !ran.load(Ordering::Relaxed) => {
                self.counts.replayed.fetch_add(1, Ordering::Relaxed);
            }
            Err(IdempotencyError::InProgress { .. }) => {
                self.counts.in_progress.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        // The effect's stored result is the item's output: a duplicate
        // answered from the store returns what the first execution did.
        res.map(|effect: String| settle_core::domain::Output::json(&effect).ok())
            .map_err(ProcessError::from)
    }
}

fn runner(
    item_timeout: Duration,
    processor: Arc<CountedEffects>,
    work: Arc<dyn Queue>,
    dlq: Arc<dyn Queue>,
    results: Arc<dyn Queue>,
    ledger: Arc<dyn Ledger>,
) -> Runner {
    let worker = Worker::new(
        processor,
        work.clone(),
        dlq,
        results.clone(),
        WorkerConfig {
            retry_delay: Duration::from_millis(5),
            item_timeout: Some(item_timeout),
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

/// Runs `r` until `done` holds (checked every 20 ms), or panics after
/// `limit` with what `state` says of the subject.
async fn run_until<F, Fut>(r: Runner, limit: Duration, what: &str, done: F, state: &Described<'_>)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(async move { r.run(rx).await });
    let started = Instant::now();
    while !done().await {
        if started.elapsed() >= limit {
            panic!(
                "{what}: not done after {limit:?}; {}",
                state.describe().await
            );
        }
        assert!(!task.is_finished(), "{what}: the runner stopped early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(true);
    task.await.expect("runner task").expect("runner");
}

/// What a simulation is over, to describe it when it gets stuck.
struct Described<'a> {
    s: &'a Subject,
    run: &'a RunId,
    scripts: &'a BTreeMap<ItemId, &'static str>,
}

impl Described<'_> {
    /// The run row, the queues' depths, and the items not settled yet.
    async fn describe(&self) -> String {
        let run = self.s.ledger.run(self.run).await;
        let depth = |q: &Arc<dyn Queue>| {
            let q = q.clone();
            async move { q.depth().await }
        };
        let (work, dlq, results) = (
            depth(&self.s.work).await,
            depth(&self.s.dlq).await,
            depth(&self.s.results).await,
        );
        let keys: Vec<_> = self
            .scripts
            .keys()
            .map(|id| (self.run.clone(), id.clone()))
            .collect();
        let mut unsettled = Vec::new();
        for chunk in keys.chunks(100) {
            if let Ok(rows) = self.s.ledger.items(chunk).await {
                for (_, id) in chunk {
                    match rows.get(&(self.run.clone(), id.clone())) {
                        Some(v) if v.value.status != ItemStatus::Pending => {}
                        row => unsettled.push(format!(
                            "{id} ({}): {:?}",
                            self.scripts[id],
                            row.map(|v| &v.value)
                        )),
                    }
                }
            }
        }
        format!(
            "run {run:?}; work queue {work:?}, DLQ {dlq:?}, results {results:?}; \
             {} items not settled: {unsettled:#?}",
            unsettled.len()
        )
    }
}

/// The simulated clock's start (2026-01-01T00:00:00Z): run ids and
/// timestamps replay too.
const SIM_EPOCH: Millis = 1_767_225_600_000;

/// Runs [`simulate`] so that the seed alone decides everything: on a
/// current-thread runtime with paused time (tokio advances it whenever
/// every task waits on a timer, so timeouts cost no real time), with this
/// thread's random numbers (jitter, run ids, claim tokens) seeded by `seed`
/// and its wall clock ([`simulate_wall_clock`]) following tokio's. `open`
/// builds the subject inside that runtime, and every call it makes must
/// complete on this thread (the embedded engine opened inline does); then
/// the same seed replays exactly, [`SimReport::trace`] included. Not for a
/// backend behind a network: its answers come back at the network's pace.
pub fn simulate_deterministic<F, Fut>(seed: u64, n: u64, rate: f64, open: F) -> SimReport
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Subject>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    fastrand::seed(seed);
    rt.block_on(async {
        let _clock = simulate_wall_clock(SIM_EPOCH);
        let subject = open().await;
        simulate(&subject, seed, n, rate).await
    })
}

/// The item timeout of [`simulate`]: an attempt's deadline, and so how long
/// its idempotency claim lasts.
pub const ITEM_TIMEOUT: Duration = Duration::from_millis(500);

/// Simulates `n` items under fault `rate` with `seed`, checks every
/// invariant, and panics with the seed in the message on any violation.
/// Attempts time out after [`ITEM_TIMEOUT`].
pub async fn simulate(s: &Subject, seed: u64, n: u64, rate: f64) -> SimReport {
    simulate_with(s, seed, n, rate, ITEM_TIMEOUT).await
}

/// [`simulate`] with another item timeout, for a backend whose calls are
/// slower: each attempt makes idempotency store calls, and an attempt that
/// times out fails for a reason the scripts do not foresee.
pub async fn simulate_with(
    s: &Subject,
    seed: u64,
    n: u64,
    rate: f64,
    item_timeout: Duration,
) -> SimReport {
    let mut rng = fastrand::Rng::with_seed(seed);
    let scripts: BTreeMap<ItemId, &'static str> = (0..n)
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
    let work = FaultyQueue::wrap_work(s.work.clone(), faults.clone());
    let dlq = FaultyQueue::wrap(s.dlq.clone(), faults.clone());
    let results = FaultyQueue::wrap(s.results.clone(), faults.clone());
    let ledger = FaultyLedger::wrap(s.ledger.clone(), faults.clone());
    let counts = Arc::new(EffectCounts::default());
    let effects = Arc::new(CountedEffects {
        idem: Idempotency::new(FaultyIdempotency::wrap(
            s.idempotency.clone(),
            faults.clone(),
        )),
        counts: counts.clone(),
    });

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

    // Settled, or else, once nothing is in flight, reconciled as `settle run`
    // does when a run stalls: enough faults in a row on one message (four
    // failed reports of its terminal outcome, say) let the queue's own
    // redrive policy park it in the DLQ without a result.
    let reconciled = Arc::new(AtomicU64::new(0));
    let settled = {
        let (work, results) = (s.work.clone(), s.results.clone());
        let (f_ledger, f_dlq, f_results) = (ledger.clone(), dlq.clone(), results.clone());
        let (run, reconciled) = (run.clone(), reconciled.clone());
        let l = s.ledger.clone();
        move || {
            let (work, results, l, run) = (work.clone(), results.clone(), l.clone(), run.clone());
            let (f_ledger, f_dlq, f_results) = (f_ledger.clone(), f_dlq.clone(), f_results.clone());
            let reconciled = reconciled.clone();
            async move {
                if l.run(&run)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|r| r.is_settled())
                {
                    return true;
                }
                let quiet = work.depth().await.is_ok_and(|d| d.total() == 0)
                    && results.depth().await.is_ok_and(|d| d.total() == 0);
                if quiet {
                    if let Ok(r) = reconcile::reconcile_parked(
                        f_ledger.as_ref(),
                        f_dlq.as_ref(),
                        f_results.as_ref(),
                        &run,
                    )
                    .await
                    {
                        reconciled.fetch_add(r.failed, Ordering::Relaxed);
                    }
                }
                false
            }
        }
    };
    let r = runner(item_timeout, effects.clone(), work, dlq, results, ledger);
    run_until(
        r,
        Duration::from_secs(120),
        &format!("seed {seed}: the faulty run"),
        &settled,
        &Described {
            s,
            run: &run,
            scripts: &scripts,
        },
    )
    .await;
    let injected = faults.counts.tally();
    let trace = faults.trace();
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
    // Besides starving an item of receives, a fault can leave its last
    // receive a duplicate that found the claim of another delivery still in
    // progress, or an idempotency store that failed every try.
    let by_faults = |error: &str| {
        error.starts_with("no outcome after")
            || error.starts_with("no result after")
            || error.contains("already in progress in another attempt")
            || error.contains("the idempotency store failed")
    };
    let mut failed_by_faults = 0;
    for (id, script) in &scripts {
        let (status, error) = &rows[id];
        match (truth(script), status) {
            (ItemStatus::Failed, ItemStatus::Succeeded) => {
                panic!("seed {seed}: {id} ({script}) succeeded")
            }
            (ItemStatus::Succeeded, ItemStatus::Failed) => {
                assert!(
                    by_faults(error),
                    "seed {seed}: {id} ({script}) failed: {error}"
                );
                failed_by_faults += 1;
            }
            (ItemStatus::Failed, ItemStatus::Failed) => {
                let want = match *script {
                    "panic" => "panic: ",
                    HANG => "timed out after",
                    _ => "permanent failure",
                };
                assert!(
                    error.starts_with(want) || by_faults(error),
                    "seed {seed}: {id} ({script}): {error}"
                );
            }
            _ => {}
        }
    }

    // Invariant 5: redriving every failure (faults off) moves exactly the
    // failed items and ends at the ground truth.
    let mut moved = redrive_all(s, &run).await.expect("redrive");
    // A scan of the DLQ (the reconciler's) whose release failed every try
    // leaves messages hidden until their timeout: the redrive reports them
    // missing, and going again later moves them, as the CLI tells an
    // operator to. A message still missing after that is lost.
    let waiting = Instant::now();
    while !moved.missing.is_empty() && waiting.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let again = redrive_all(s, &run).await.expect("redrive");
        moved.messages += again.messages;
        moved.items.extend(again.items);
        moved.missing = again.missing.difference(&moved.items).cloned().collect();
    }
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
    // The same counts, over the store without faults.
    let effects = Arc::new(CountedEffects {
        idem: Idempotency::new(s.idempotency.clone()),
        counts: counts.clone(),
    });
    let r = runner(
        item_timeout,
        effects.clone(),
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
        &Described {
            s,
            run: &run,
            scripts: &scripts,
        },
    )
    .await;
    let rows = self::rows(s, &run, &scripts).await;
    for (id, script) in &scripts {
        assert_eq!(
            rows[id].0,
            truth(script),
            "seed {seed}: {id} ({script}) after the redrive; last error: {}",
            rows[id].1
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

    // Invariant 4 for malformed messages: each was dead-lettered as it was,
    // alone (the items' outcomes above are the scripts'), and kept there:
    // the redrive moves only the run's own messages.
    let mut dead_bodies = std::collections::BTreeSet::new();
    loop {
        let got = s
            .dlq
            .receive(10, Duration::from_secs(3600))
            .await
            .expect("receive from the DLQ");
        if got.is_empty() {
            // SQS may answer empty while messages are visible: done only
            // when the queue agrees.
            if s.dlq.depth().await.expect("DLQ depth").visible == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        dead_bodies.extend(got.into_iter().map(|d| d.body));
    }
    for body in faults.malformed() {
        assert!(
            dead_bodies.contains(&body),
            "seed {seed}: the malformed body {body:?} is not in the DLQ ({} bodies there)",
            dead_bodies.len()
        );
    }

    // Idempotent side effects: an item that succeeded ran its effect exactly
    // once, one that failed never completed it.
    let executions = counts.executions();
    let doubles: Vec<_> = executions.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        doubles.is_empty(),
        "seed {seed}: side effects executed more than once: {doubles:?}"
    );
    for (id, script) in &scripts {
        let ran = executions.get(id).copied().unwrap_or(0);
        let want = u64::from(truth(script) == ItemStatus::Succeeded);
        assert_eq!(
            ran, want,
            "seed {seed}: {id} ({script}) ran its effect {ran} times"
        );
    }
    SimReport {
        seed,
        items: n,
        faults: injected.total(),
        faults_by_kind: injected,
        effects_executed: counts.executed.load(Ordering::Relaxed),
        effects_replayed: counts.replayed.load(Ordering::Relaxed),
        effects_in_progress: counts.in_progress.load(Ordering::Relaxed),
        double_executions: doubles.len() as u64,
        failed_by_faults,
        redriven: moved.items.len() as u64,
        reconciled: reconciled.load(Ordering::Relaxed),
        trace,
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

impl std::fmt::Display for SimReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {}: {} items, {} faults ({}), side effects {} executed, {} replayed, \
             {} refused in progress, {} double-executed; {} failed by faults ({} reconciled), \
             {} redriven; trace {}",
            self.seed,
            self.items,
            self.faults,
            self.faults_by_kind,
            self.effects_executed,
            self.effects_replayed,
            self.effects_in_progress,
            self.double_executions,
            self.failed_by_faults,
            self.reconciled,
            self.redriven,
            self.trace
        )
    }
}

/// The sum of many seeds' reports, as `make soak` prints it. Items lost and
/// double-counted, and double executions, are asserted to be 0 by every
/// [`simulate`] that returns: a seed that breaks one panics instead.
#[derive(Debug, Clone, Default)]
pub struct SimTotals {
    pub seeds: Vec<u64>,
    pub items: u64,
    pub faults: FaultTally,
    pub failed_by_faults: u64,
    pub reconciled: u64,
    pub redriven: u64,
    pub effects_executed: u64,
    pub effects_replayed: u64,
    pub effects_in_progress: u64,
    pub double_executions: u64,
}

impl SimTotals {
    pub fn add(&mut self, r: &SimReport) {
        self.seeds.push(r.seed);
        self.items += r.items;
        self.faults.add(&r.faults_by_kind);
        self.failed_by_faults += r.failed_by_faults;
        self.reconciled += r.reconciled;
        self.redriven += r.redriven;
        self.effects_executed += r.effects_executed;
        self.effects_replayed += r.effects_replayed;
        self.effects_in_progress += r.effects_in_progress;
        self.double_executions += r.double_executions;
    }
}

impl std::fmt::Display for SimTotals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seeds = match (self.seeds.first(), self.seeds.last()) {
            (Some(a), Some(b)) if self.seeds.len() > 1 => {
                format!("{} seeds ({a} to {b})", self.seeds.len())
            }
            (Some(a), _) => format!("1 seed ({a})"),
            _ => "0 seeds".to_owned(),
        };
        writeln!(f, "{seeds}, {} items", self.items)?;
        writeln!(
            f,
            "faults injected: {} ({})",
            self.faults.total(),
            self.faults
        )?;
        let calls: Vec<String> = self
            .faults
            .by_call
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        writeln!(f, "faults by call: {}", calls.join(", "))?;
        writeln!(
            f,
            "items lost: 0; items double-counted: 0; items failed by faults alone and put right by the redrive: {}; \
             messages the queue parked without a result, reported failed by the reconciler: {}",
            self.failed_by_faults, self.reconciled
        )?;
        write!(
            f,
            "idempotent side effects: {} executed, {} duplicates answered from the stored result, \
             {} duplicates refused as in progress; side effects double-executed: {}",
            self.effects_executed,
            self.effects_replayed,
            self.effects_in_progress,
            self.double_executions
        )
    }
}
