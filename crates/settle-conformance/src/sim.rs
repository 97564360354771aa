//! A seeded fault simulation over any backend: items with scripted outcomes
//! run through the real dispatch, worker, runner and reducer while every
//! queue and ledger call may fail, repeat, lose a delete or redeliver early.
//! The whole process also crashes once mid-dispatch: the dispatch and the
//! runner beside it die where they stand, and a resume dispatches again
//! beside a fresh runner, as `settle resume` does. At the end the
//! invariants are checked; then, with faults off, a redrive of every
//! failure, itself cut off once (stopped as on SIGINT, or killed between a
//! send and its delete, the runner processing its messages dying too) and
//! resumed, must bring the tally to the scripts' ground truth.
//!
//! The processor makes each item's work a side effect under the idempotency
//! utility (over a faulty idempotency store too) and counts, per item, how
//! often that side effect ran: never more than once, whatever the
//! duplicates, redeliveries, crashes and faults.

use crate::faults::{FaultTally, Faults, FaultyIdempotency, FaultyLedger, FaultyQueue, Trace};
use crate::Subject;
use async_trait::async_trait;
use serde_json::value::RawValue;
use settle_core::dispatch::{self, Dispatched};
use settle_core::domain::{
    Item, ItemId, ItemRecord, ItemStatus, Millis, Output, ProcessError, RunConfig, RunId,
};
use settle_core::idempotency::{Idempotency, IdempotencyError};
use settle_core::message::WorkBody;
use settle_core::ports::{Delivery, Ledger, PortError, Queue, QueueDepth};
use settle_core::reconcile;
use settle_core::redrive::{self, RedriveReport};
use settle_core::runner::{Runner, RunnerConfig, RunnerError, RunnerStats};
use settle_core::testing::{simulate_wall_clock, Scripted};
use settle_core::work::{Worker, WorkerConfig};
use settle_core::{AttemptContext, Processor};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What one simulation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimReport {
    pub seed: u64,
    pub items: u64,
    /// Faults injected, all kinds.
    pub faults: u64,
    pub faults_by_kind: FaultTally,
    /// Where the process crashed.
    pub crashes: Crashes,
    /// Side effects that ran to success under the idempotency utility.
    pub effects_executed: u64,
    /// Duplicates answered with a stored result, without running the effect.
    pub effects_replayed: u64,
    /// Duplicates refused because another attempt held the claim.
    pub effects_in_progress: u64,
    /// Items whose side effect ran more than once (checked to be 0).
    pub double_executions: u64,
    /// Items whose processor answered "throttled" (once each): none failed for it.
    pub throttled_items: u64,
    /// Items the faults alone failed ("no outcome"), all put right by the redrive.
    pub failed_by_faults: u64,
    /// Items whose message the queue's redrive policy parked without a
    /// result, reported failed by the reconciler (and among those redriven).
    pub reconciled: u64,
    /// Items of the run with a message in the DLQ after the faulty run:
    /// what the redrive had to move.
    pub redriven: u64,
    /// Messages still in the work and results queues when the faulty run
    /// was first seen settled (duplicates, lost deletes, malformed bodies):
    /// why "settled" cannot promise empty queues at that moment (see the
    /// comment in the simulation). They drained afterwards, as checked.
    pub in_flight_at_settle: u64,
    /// Items whose outcome changed after the faulty run was first seen
    /// settled: a leftover duplicate succeeded where the faults had failed
    /// the item (success wins). The tally stays exact; its split moves.
    pub changed_after_settle: u64,
    /// Items scripted `permanent` with more than one attempt in their
    /// ledger history after the faulty run (before any redrive).
    pub permanent_attempted_again: u64,
    /// Items scripted `permanent` whose scripted work ran more than once in
    /// the faulty run, by the processor's own count, which also sees the
    /// attempts whose result never reached the ledger.
    pub permanent_run_again: u64,
    /// DLQ copies beyond one per failed item that the faulty run's workers
    /// left (a dead letter whose send failed after taking effect is sent
    /// again): deleted when the run settles where a DLQ scan is cheap
    /// ([`Subject::cheap_dlq_scan`]), else by the redrive.
    pub extra_dead_letters: u64,
    /// Failed items with more than one DLQ copy after the faulty run (and
    /// its settle-time sweep, where there is one: then asserted none).
    pub items_dead_lettered_twice: u64,
    /// DLQ copies of items that had succeeded, after the faulty run.
    pub dead_letters_of_succeeded: u64,
    /// What the fault decorators saw, in order: equal on an exact replay.
    pub trace: Trace,
}

/// Where the simulated process crashed, as it happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Crashes {
    /// The dispatch's send call at which the process died (1-based), and
    /// whether that send reached the queue; `None` if the dispatch
    /// finished first.
    pub dispatch: Option<(u64, bool)>,
    /// How the first redrive was cut off; `None` if it finished before its
    /// cut point came.
    pub redrive: Option<RedriveCut>,
    /// Redrive passes until every failure had been moved and processed.
    pub redrive_passes: u32,
}

/// How the first redrive of a simulation is cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedriveCut {
    /// Asked to stop, as on SIGINT, when it asks for the `at`-th time (0:
    /// before its first batch): it keeps what it moved and gives back the
    /// rest of what it hid.
    Stopped { at: u32 },
    /// Killed at its `at`-th send to the work queue (1-based), after that
    /// send landed or before: the batch's DLQ delete never happens, and the
    /// messages its scan hid stay hidden until their timeout.
    Killed { at: u64, landed: bool },
}

/// Where the process crashes, drawn from the seed by a generator of its
/// own, so that a seed's scripts and faults are the same with crashes as
/// without.
#[derive(Debug, Clone, Copy)]
struct CrashPlan {
    /// The dispatch's send call at which the process dies (1-based).
    dispatch_at: u64,
    /// Whether that send reaches the queue first.
    dispatch_lands: bool,
    /// How long the process hangs at that send before it is gone: the
    /// runner beside the dispatch works on meanwhile.
    dispatch_hang: Duration,
    redrive: RedriveCut,
    /// How long the runner processing the redriven messages lives on after
    /// the redrive was cut off.
    redrive_runner_life: Duration,
}

impl CrashPlan {
    fn draw(seed: u64, n: u64, time: Time) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed ^ 0xc4a5_4c4a_5400_0001);
        // Within the first pass's sends (one per 10 items), so that the
        // dispatch always dies before it is done.
        let dispatch_at = rng.u64(1..=n.div_ceil(10).max(1));
        let dispatch_lands = rng.bool();
        let dispatch_hang = Duration::from_millis(rng.u64(0..=2000));
        // The redrive makes one send per DLQ batch it moves something from
        // (five or more for 300 items) and is asked to stop before each: a
        // cut point past the last comes too late, the redrive finishes, and
        // the report says so.
        let redrive = if rng.bool() {
            RedriveCut::Stopped { at: rng.u32(0..8) }
        } else {
            RedriveCut::Killed {
                at: rng.u64(1..=8),
                landed: rng.bool(),
            }
        };
        // A killed redrive's scan leaves what it hid hidden for its
        // timeout (2 minutes) before another pass can move it: free with
        // paused time, two minutes of waiting in real time. There the
        // redrive is stopped instead, at the batch the kill would have hit.
        let redrive = match redrive {
            RedriveCut::Killed { at, .. } if time == Time::Real => RedriveCut::Stopped {
                at: (at - 1) as u32,
            },
            cut => cut,
        };
        let redrive_runner_life = Duration::from_millis(rng.u64(0..=1500));
        Self {
            dispatch_at,
            dispatch_lands,
            dispatch_hang,
            redrive,
            redrive_runner_life,
        }
    }
}

/// A queue in a process that dies at its `at`-th send call: that send is
/// let through to the inner queue or not (`lands`; in real time the crash
/// may still cut it short), and neither it nor any later send ever
/// returns, so the caller hangs where the crash took it until the one
/// playing the crash drops it. [`CrashingSends::died`] wakes that one.
#[derive(Debug)]
struct CrashingSends {
    inner: Arc<dyn Queue>,
    at: u64,
    lands: bool,
    sends: AtomicU64,
    died: Notify,
}

impl CrashingSends {
    fn new(inner: Arc<dyn Queue>, at: u64, lands: bool) -> Self {
        Self {
            inner,
            at,
            lands,
            sends: AtomicU64::new(0),
            died: Notify::new(),
        }
    }

    /// Resolves once the crash point has been reached.
    async fn died(&self) {
        self.died.notified().await
    }
}

#[async_trait]
impl Queue for CrashingSends {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn send(&self, bodies: Vec<String>) -> Result<(), PortError> {
        let n = self.sends.fetch_add(1, Ordering::Relaxed) + 1;
        if n < self.at {
            return self.inner.send(bodies).await;
        }
        // Dead from here on; said before the landing send, and by every
        // later send too: a send in flight can be dropped before it returns
        // (the dispatcher gives up its other sends when one fails), and the
        // crash must be played all the same. Stored as a permit if nobody
        // waits yet.
        self.died.notify_one();
        if n == self.at && self.lands {
            // What the queue answers no longer matters: nobody hears it.
            let _ = self.inner.send(bodies).await;
        }
        std::future::pending().await
    }

    /// Not the dispatch's: passed through.
    async fn send_delayed(&self, messages: Vec<(String, Duration)>) -> Result<(), PortError> {
        self.inner.send_delayed(messages).await
    }

    async fn receive(&self, max: usize, visibility: Duration) -> Result<Vec<Delivery>, PortError> {
        self.inner.receive(max, visibility).await
    }

    async fn delete(&self, receipts: Vec<String>) -> Result<(), PortError> {
        self.inner.delete(receipts).await
    }

    async fn change_visibility(&self, receipt: &str, timeout: Duration) -> Result<(), PortError> {
        self.inner.change_visibility(receipt, timeout).await
    }

    async fn depth(&self) -> Result<QueueDepth, PortError> {
        self.inner.depth().await
    }
}

/// A hang: far past any item timeout, so every attempt is cut off (with
/// paused time, at no cost in real time).
const HANG: &str = "sleep:600000";

const SCRIPTS: [(&str, u32); 6] = [
    ("ok", 66),
    ("retryable:1", 15),
    // Throttled once, then succeeds: never an attempt, never a failure.
    // Rare, as a service's throttles are: each one slows the whole run.
    ("throttled:1", 1),
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
    /// Items whose processor ran while the ledger already held their
    /// outcome (succeeded, or failed for good before a redrive): what the
    /// worker's gate exists to prevent. Checked to be none.
    ran_settled: Mutex<BTreeSet<ItemId>>,
    executions: Mutex<BTreeMap<ItemId, u64>>,
    /// Times the scripted work started, per item: the processor's own
    /// count of attempts, those whose result never reached the ledger too.
    runs: Mutex<BTreeMap<ItemId, u64>>,
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

    fn runs(&self) -> BTreeMap<ItemId, u64> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The simulated processor: the scripted work, then a counted side effect,
/// both wrapped by the idempotency utility. A script's failure or panic
/// happens before the effect, so only a success counts as an execution.
#[derive(Debug)]
struct CountedEffects {
    idem: Idempotency,
    counts: Arc<EffectCounts>,
    /// The ledger as it is (no faults), read at each attempt's start.
    ledger: Arc<dyn Ledger>,
    /// Whether a failed item may run: a redrive sends it back.
    redriving: bool,
}

impl CountedEffects {
    /// Notes an attempt of an item whose outcome the ledger already holds.
    async fn check_not_settled(&self, item: &Item, ctx: &AttemptContext) {
        let key = (ctx.run.clone(), item.id.clone());
        let Ok(rows) = self.ledger.items(std::slice::from_ref(&key)).await else {
            return;
        };
        let settled = rows.get(&key).is_some_and(|v| match v.value.status {
            ItemStatus::Succeeded => true,
            ItemStatus::Failed => !self.redriving,
            ItemStatus::Pending => false,
        });
        if settled {
            self.counts
                .ran_settled
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(item.id.clone());
        }
    }
}

#[async_trait]
impl Processor for CountedEffects {
    async fn process(
        &self,
        item: &Item,
        ctx: &AttemptContext,
    ) -> Result<Option<Output>, ProcessError> {
        self.check_not_settled(item, ctx).await;
        let ran = AtomicBool::new(false);
        let res = self
            .idem
            .run_for(ctx, item, || async {
                *self
                    .counts
                    .runs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(item.id.clone())
                    .or_default() += 1;
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
        res.map(|effect: String| Output::json(&effect).ok())
            .map_err(ProcessError::from)
    }
}

/// The work queue's visibility timeout in the simulation: short, so that
/// what a crash or a lost delete leaves comes back soon.
const WORK_VISIBILITY: Duration = Duration::from_secs(1);
/// The results queue's, short too, so that lost deletes come back within
/// the simulation's time.
const RESULTS_VISIBILITY: Duration = Duration::from_secs(1);

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
            // As `settle run` does: a batch in hand keeps its messages
            // hidden, also when an attempt outlasts the visibility timeout
            // (the AWS simulation's item timeout does).
            visibility: Some(WORK_VISIBILITY),
            result_lag: Some(RESULTS_VISIBILITY),
            ..WorkerConfig::default()
        },
    )
    .reading(ledger.clone());
    Runner {
        worker: Arc::new(worker),
        work,
        results,
        ledger,
        config: RunnerConfig {
            concurrency: 8,
            visibility: WORK_VISIBILITY,
            // Short, so lost deletes come back within the simulation's time.
            results_visibility: RESULTS_VISIBILITY,
            reducers: 2,
            ..RunnerConfig::default()
        },
        stats: Arc::new(RunnerStats::default()),
    }
}

/// A runner on a task of its own, as a process runs it.
struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), RunnerError>>,
}

impl Running {
    fn start(r: Runner) -> Self {
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(async move { r.run(rx).await });
        Self { stop, task }
    }

    /// A clean stop: in-flight batches finish and delete what they did.
    async fn stop(self, what: &str) {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{what}: the runner failed: {e}"),
            Err(e) => panic!("{what}: the runner task failed: {e}"),
        }
    }

    /// A crash: the runner's task and its pollers are dropped where they
    /// stand, and with them the in-flight batches. Their received messages
    /// come back after their visibility timeout, results and dead letters
    /// already sent stay sent, idempotency claims held stay until they
    /// expire. (A completion record the idempotency utility is writing on
    /// a task of its own survives: a real crash would lose it too, and the
    /// effect could run again once the claim expired, the limit
    /// docs/idempotency.md states.)
    async fn crash(self, what: &str) {
        self.task.abort();
        match self.task.await {
            Ok(Err(e)) => panic!("{what}: the runner had failed before the crash: {e}"),
            Err(e) if !e.is_cancelled() => panic!("{what}: the runner task failed: {e}"),
            _ => {}
        }
    }
}

/// Lets `running` work until `done` holds (checked every 20 ms), or panics
/// after `limit` with what `state` says of the subject.
async fn run_until<F, Fut>(
    running: &Running,
    limit: Duration,
    what: &str,
    done: F,
    state: &Described<'_>,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !done().await {
        if started.elapsed() >= limit {
            panic!(
                "{what}: not done after {limit:?}; {}",
                state.describe().await
            );
        }
        assert!(
            !running.task.is_finished(),
            "{what}: the runner stopped early"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Messages in the work and results queues, hidden or not; `None` if a
/// count failed. The simulation has one run per subject, so these are its
/// own (and the malformed bodies the faults add to the work queue).
async fn in_queues(s: &Subject) -> Option<u64> {
    let work = s.work.depth().await.ok()?;
    let results = s.results.depth().await.ok()?;
    Some(work.total() + results.total())
}

/// Dispatches `run` to the end through `work`. Dispatch is resumable: a
/// call failed by a fault is simply run again, from the last saved page.
async fn dispatch_all(s: &Subject, work: &dyn Queue, run: &RunId, seed: u64, resumed: bool) {
    let mut tries = 0;
    loop {
        tries += 1;
        assert!(tries < 1000, "seed {seed}: dispatch never finished");
        if let Ok(Dispatched::Done { .. }) = dispatch::dispatch(
            s.source.as_ref(),
            s.ledger.as_ref(),
            work,
            run,
            None,
            resumed || tries > 1,
        )
        .await
        {
            return;
        }
    }
}

/// Waits (up to 5 minutes) until no message of `q` is hidden: a scan of
/// the DLQ that was killed, or whose release failed every try, hides its
/// messages for up to its own timeout (2 minutes).
async fn wait_until_nothing_hidden(q: &dyn Queue) {
    let waiting = Instant::now();
    while q.depth().await.is_ok_and(|d| d.in_flight > 0)
        && waiting.elapsed() < Duration::from_secs(300)
    {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Receives every message of `q` once, hiding each for an hour, after
/// waiting out the messages other scans hid. SQS may answer a receive
/// empty while messages are visible: done only when the queue agrees.
async fn receive_all(q: &dyn Queue) -> Vec<Delivery> {
    wait_until_nothing_hidden(q).await;
    let mut all = Vec::new();
    loop {
        let got = q
            .receive(10, Duration::from_secs(3600))
            .await
            .expect("receive from the DLQ");
        if got.is_empty() {
            if q.depth().await.expect("DLQ depth").visible == 0 {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        all.extend(got);
    }
}

/// DLQ copies per item of `run`. Bodies that are no work message (the
/// malformed ones the faults inject) or of another run are not counted.
fn dead_letters(dead: &[Delivery], run: &RunId) -> BTreeMap<ItemId, u64> {
    let mut per_item = BTreeMap::new();
    for d in dead {
        if let Ok(b) = WorkBody::decode(&d.body) {
            if &b.run == run {
                *per_item.entry(b.item).or_default() += 1;
            }
        }
    }
    per_item
}

/// Checks the DLQ against the failed items: every failed item has a copy
/// there, and, if `only_one`, no more than one. Returns the copies beyond
/// one, and the items that have them.
fn check_dead_letters(
    seed: u64,
    when: &str,
    per_item: &BTreeMap<ItemId, u64>,
    failed: &BTreeSet<ItemId>,
    scripts: &BTreeMap<ItemId, &'static str>,
    only_one: bool,
) -> (u64, u64) {
    let missing: Vec<_> = failed
        .iter()
        .filter(|id| !per_item.contains_key(*id))
        .map(|id| format!("{id} ({})", scripts[id]))
        .collect();
    assert!(
        missing.is_empty(),
        "seed {seed}: {when}: failed items missing from the DLQ: {missing:?}"
    );
    let twice: Vec<_> = failed
        .iter()
        .filter_map(|id| {
            let n = per_item[id];
            (n > 1).then(|| (id, scripts[id], n))
        })
        .collect();
    if only_one {
        assert!(
            twice.is_empty(),
            "seed {seed}: {when}: failed items with more than one DLQ copy: {twice:?}"
        );
    }
    let extra = twice.iter().map(|(_, _, n)| n - 1).sum();
    (extra, twice.len() as u64)
}

/// The check of a run seen settled where no duplicate can be left behind
/// (faults off, every message processed or the redrive just closed): the
/// work and results queues hold nothing.
async fn assert_settled_and_empty(s: &Subject, run: &RunId, seed: u64, when: &str) {
    let rec = s.ledger.run(run).await.expect("run").expect("run row");
    assert!(
        rec.is_settled(),
        "seed {seed}: {when}: not settled: {rec:?}"
    );
    if in_queues(s).await == Some(0) {
        return;
    }
    // Say what is left, and what it is: a visible message is shown (and
    // hidden a minute: the simulation fails here anyway).
    let mut left = Vec::new();
    for (name, q) in [("work", &s.work), ("results", &s.results)] {
        let depth = q.depth().await;
        let bodies: Vec<String> = match q.receive(10, Duration::from_secs(60)).await {
            Ok(got) => got
                .iter()
                .map(|d| {
                    let body: String = d.body.chars().take(300).collect();
                    format!("receive {}: {body}", d.receive_count)
                })
                .collect(),
            Err(e) => vec![format!("receive failed: {e}")],
        };
        left.push(format!("{name} queue {depth:?}: {bodies:#?}"));
    }
    panic!(
        "seed {seed}: {when}: the run reads settled ({rec:?}) with messages still in \
         the work or results queue: {}",
        left.join("; ")
    );
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

/// Redrive passes a simulation allows: the one cut off, and one after what
/// it hid has come back (a spare for a release that failed).
const MAX_REDRIVE_PASSES: u32 = 3;

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
        simulate_in(&subject, seed, n, rate, ITEM_TIMEOUT, Time::Paused).await
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
    simulate_in(s, seed, n, rate, item_timeout, Time::Real).await
}

/// The clock a simulation runs by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Time {
    /// Tokio's paused clock ([`simulate_deterministic`]): waiting is free.
    Paused,
    /// Real time: every wait is waited.
    Real,
}

async fn simulate_in(
    s: &Subject,
    seed: u64,
    n: u64,
    rate: f64,
    item_timeout: Duration,
    time: Time,
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
    let plan = CrashPlan::draw(seed, n, time);
    let mut crashes = Crashes::default();

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
        ledger: s.ledger.clone(),
        redriving: false,
    });

    let faulty_runner = || {
        runner(
            item_timeout,
            effects.clone(),
            work.clone(),
            dlq.clone(),
            results.clone(),
            ledger.clone(),
        )
    };
    let described = Described {
        s,
        run: &run,
        scripts: &scripts,
    };

    // The process dies mid-dispatch, at a send of the seed's choosing (that
    // send landed or not), after hanging there a while with the runner
    // beside it still at work; the runner dies with it, and its in-flight
    // batches. The page being sent was not saved, so the resume sends it
    // again: second copies of what had landed.
    {
        let dying = CrashingSends::new(work.clone(), plan.dispatch_at, plan.dispatch_lands);
        let beside = Running::start(faulty_runner());
        // Biased: the dispatch is polled first, so it reaches the crash
        // point before the crash is looked for, the same way on every replay.
        let died = tokio::select! {
            biased;
            () = dispatch_all(s, &dying, &run, seed, false) => false,
            () = async {
                dying.died().await;
                tokio::time::sleep(plan.dispatch_hang).await;
            } => true,
        };
        beside
            .crash(&format!(
                "seed {seed}: the runner beside the first dispatch"
            ))
            .await;
        crashes.dispatch = died.then_some((plan.dispatch_at, plan.dispatch_lands));
    }
    // The resume, as `settle resume` does it: a fresh runner, and the
    // dispatch again to the end beside it.
    let running = Running::start(faulty_runner());
    dispatch_all(s, work.as_ref(), &run, seed, true).await;

    // Settled, or else, once nothing is in flight, reconciled as `settle run`
    // does when a run stalls: enough faults in a row on one message (four
    // failed reports of its terminal outcome, say) let the queue's own
    // redrive policy park it in the DLQ without a result.
    let reconciled = AtomicU64::new(0);
    // The run as first seen settled, and the messages then in the queues.
    let seen_settled = Mutex::new(None);
    let settled = {
        let (run, reconciled, seen_settled) = (&run, &reconciled, &seen_settled);
        let (f_ledger, f_dlq, f_results) = (ledger.as_ref(), dlq.as_ref(), results.as_ref());
        move || async move {
            let rec = s.ledger.run(run).await.ok().flatten();
            let left = in_queues(s).await;
            if let Some(rec) = rec.filter(|r| r.is_settled()) {
                *seen_settled.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((rec, left.unwrap_or(0)));
                return true;
            }
            if left == Some(0) {
                if let Ok(r) = reconcile::reconcile_parked(f_ledger, f_dlq, f_results, run).await {
                    reconciled.fetch_add(r.failed, Ordering::Relaxed);
                }
            }
            false
        }
    };
    run_until(
        &running,
        Duration::from_secs(120),
        &format!("seed {seed}: the faulty run"),
        &settled,
        &described,
    )
    .await;
    let (at_settle, in_flight_at_settle) = seen_settled
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .expect("seen settled");

    // What a settled run promises, checked for what it is. The tally
    // settles when each item's first terminal result is reduced; at that
    // moment the queues may still hold, legitimately, what at-least-once
    // delivery and the crash left behind: a second copy of an item's
    // message (the page the dispatch resent after the crash, a send that
    // failed after taking effect), a message whose delete was lost or that
    // came back early, the results of such copies, malformed bodies. So
    // "settled means empty queues" would be false here, and is not
    // asserted; `in_flight_at_settle` counts what was there. What is
    // asserted instead: while the runner works through those leftovers,
    // the run stays settled and its tally exact (a duplicate is counted
    // once), and they drain within the limit, leaving nothing of the run in
    // flight: no message circulates for ever. Where no copy can be left
    // behind (faults off, every moved message processed), the strong form
    // is asserted: see `assert_settled_and_empty`. And the run with an open
    // redrive is checked never to read settled (below, around the redrive).
    let leftovers = {
        let run = &run;
        move || async move {
            if let Ok(Some(rec)) = s.ledger.run(run).await {
                assert!(
                    rec.is_settled() && rec.succeeded + rec.failed == n,
                    "seed {seed}: the run stopped being settled, or exact, while its \
                     leftover messages drained: {rec:?}"
                );
            }
            in_queues(s).await == Some(0)
        }
    };
    run_until(
        &running,
        Duration::from_secs(120),
        &format!("seed {seed}: the settled run's leftover messages"),
        &leftovers,
        &described,
    )
    .await;
    running
        .stop(&format!("seed {seed}: the faulty run's runner"))
        .await;
    let injected = faults.counts.tally();
    let trace = faults.trace();
    faults.disable();

    // Invariant 1: one bucket per item, the tally agrees with the rows.
    let rec = s.ledger.run(&run).await.expect("run").expect("run row");
    assert_eq!((rec.total, rec.pending()), (n, 0), "seed {seed}: {rec:?}");
    assert_eq!(rec.succeeded + rec.failed, n, "seed {seed}: {rec:?}");
    let changed_after_settle = rec.succeeded.abs_diff(at_settle.succeeded);
    let rows = rows(s, &run, &scripts).await;
    let count = |st| rows.values().filter(|r| r.status == st).count() as u64;
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
        let row = &rows[id];
        let error = row.last_error.as_deref().unwrap_or_default();
        match (truth(script), row.status) {
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

    // Invariant 7, counted (issue 16): a permanent failure attempted again,
    // by the ledger's history and by the processor's own count.
    let runs = counts.runs();
    let permanent = || scripts.iter().filter(|(_, s)| **s == "permanent");
    let permanent_attempted_again = permanent()
        .filter(|(id, _)| rows[*id].history.len() > 1)
        .count() as u64;
    let permanent_run_again = permanent()
        .filter(|(id, _)| runs.get(*id).is_some_and(|n| *n > 1))
        .count() as u64;

    // Invariant 5, first half: the DLQ as the faulty run left it holds every
    // failed item (exactly once, where the run's settle keeps one per item). The scan receives each message once and gives it back: one
    // receive more in its count, as every scan of the DLQ makes (the
    // reconciler's, the redrive's).
    let failed: BTreeSet<ItemId> = rows
        .iter()
        .filter(|(_, r)| r.status == ItemStatus::Failed)
        .map(|(id, _)| id.clone())
        .collect();
    // A dead letter sent twice (its send failed after taking effect, or a
    // crash came between it and the message's delete) is one too many:
    // where a scan of the DLQ is cheap, the CLI keeps one per failed item
    // once the run settles, and so does this.
    let swept = if s.cheap_dlq_scan {
        // A scan cut off by a fault leaves what it hid hidden for a while:
        // the sweep sees what a later `resume` would.
        wait_until_nothing_hidden(s.dlq.as_ref()).await;
        reconcile::drop_extra_dead_letters(s.dlq.as_ref(), &run)
            .await
            .expect("drop the extra dead letters")
    } else {
        0
    };
    let dead = receive_all(s.dlq.as_ref()).await;
    for d in &dead {
        s.dlq
            .change_visibility(&d.receipt, Duration::ZERO)
            .await
            .expect("give back a DLQ message");
    }
    let per_item = dead_letters(&dead, &run);
    let (extra_after_sweep, items_dead_lettered_twice) = check_dead_letters(
        seed,
        "after the faulty run",
        &per_item,
        &failed,
        &scripts,
        s.cheap_dlq_scan,
    );
    // A succeeded item may have a leftover copy there too (a duplicate
    // delivery that ran out of receives): moving it is harmless, success wins.
    let dead_letters_of_succeeded = per_item
        .iter()
        .filter(|(id, _)| !failed.contains(*id))
        .map(|(_, n)| n)
        .sum();

    // Invariant 5, second half: redriving every failure (faults off) ends at
    // the ground truth, though the first redrive is cut off, stopped or
    // killed, and the runner processing what it moved dies with it.
    let clean = Arc::new(CountedEffects {
        idem: Idempotency::new(s.idempotency.clone()),
        counts: counts.clone(),
        ledger: s.ledger.clone(),
        redriving: true,
    });
    let clean_runner = || {
        runner(
            item_timeout,
            clean.clone(),
            s.work.clone(),
            s.dlq.clone(),
            s.results.clone(),
            s.ledger.clone(),
        )
    };
    let beside = Running::start(clean_runner());
    let life = plan.redrive_runner_life;
    let mut last: Option<RedriveReport> = match plan.redrive {
        RedriveCut::Stopped { at } => {
            let asked = AtomicU32::new(0);
            let stop = || asked.fetch_add(1, Ordering::Relaxed) >= at;
            let report = redrive::redrive(
                s.ledger.as_ref(),
                s.dlq.as_ref(),
                s.work.as_ref(),
                &run,
                None,
                false,
                &stop,
            )
            .await
            .expect("redrive");
            if report.stopped {
                crashes.redrive = Some(plan.redrive);
            }
            tokio::time::sleep(life).await;
            Some(report)
        }
        RedriveCut::Killed { at, landed } => {
            let dying = CrashingSends::new(s.work.clone(), at, landed);
            tokio::select! {
                biased;
                report = redrive::redrive(
                    s.ledger.as_ref(),
                    s.dlq.as_ref(),
                    &dying,
                    &run,
                    None,
                    false,
                    &|| false,
                ) => {
                    tokio::time::sleep(life).await;
                    Some(report.expect("redrive"))
                }
                () = async {
                    dying.died().await;
                    tokio::time::sleep(life).await;
                } => {
                    crashes.redrive = Some(plan.redrive);
                    None
                }
            }
        }
    };
    beside
        .crash(&format!("seed {seed}: the runner of the first redrive"))
        .await;
    let rec = s.ledger.run(&run).await.expect("run").expect("run row");
    assert!(
        rec.redriving && !rec.is_settled(),
        "seed {seed}: after the first redrive ({:?}) the run reads {rec:?}: \
         what it moved would pass for settled",
        crashes.redrive
    );
    // The resume: a fresh runner processes until the queues are empty, the
    // redrive is closed, and a redrive cut off (or one that missed messages
    // another scan hid) is continued, as `settle resume` does.
    let resumed = Running::start(clean_runner());
    let drained_while_open = {
        let run = &run;
        move || async move {
            // An open redrive keeps the run unsettled (issue 14): this fails
            // if the flag is lost (a reducer's commit writing the run row
            // without it, say), which would let the moved messages pass
            // for done.
            if let Ok(Some(rec)) = s.ledger.run(run).await {
                assert!(
                    rec.redriving && !rec.is_settled(),
                    "seed {seed}: while the redrive's messages were processed the \
                     run read {rec:?}"
                );
            }
            // Empty twice, a second apart, as the CLI waits for queue
            // counts to settle: on the emulator a send cut off by a crash
            // can still land (moto answers late under load).
            if in_queues(s).await != Some(0) {
                return false;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            in_queues(s).await == Some(0)
        }
    };
    crashes.redrive_passes = 1;
    loop {
        run_until(
            &resumed,
            Duration::from_secs(120),
            &format!("seed {seed}: redrive pass {}", crashes.redrive_passes),
            &drained_while_open,
            &described,
        )
        .await;
        s.ledger
            .set_redriving(&run, false)
            .await
            .expect("close the redrive");
        if let Some(done) = last.as_ref().filter(|r| r.is_complete()) {
            // Every item of its scope moved and now processed: the redrive
            // is complete, as the CLI then records it.
            assert!(
                s.ledger
                    .clear_redrive(&run, &done.scope)
                    .await
                    .expect("clear the redrive"),
                "seed {seed}: the redrive's scope was replaced"
            );
            assert_settled_and_empty(s, &run, seed, "the redrive just completed").await;
            break;
        }
        // Unfinished, it keeps its scope, and the run stays unsettled.
        let rec = s.ledger.run(&run).await.expect("run").expect("run row");
        assert!(
            rec.redrive.is_some() && !rec.is_settled(),
            "seed {seed}: an unfinished redrive was lost: {rec:?}"
        );
        assert_eq!(
            in_queues(s).await,
            Some(0),
            "seed {seed}: the redrive's messages were processed"
        );
        // The cut pass, then one after what it hid came back: a failed
        // item a later pass still finds no message for has lost it.
        assert!(
            crashes.redrive_passes < MAX_REDRIVE_PASSES,
            "seed {seed}: after {} redrive passes, failed items have no message in the \
             DLQ to move (the last pass missed {:?}): lost from the DLQ",
            crashes.redrive_passes,
            last.as_ref().map(|r| &r.missing)
        );
        // What a killed scan hid stays hidden until its timeout, and a
        // redrive does not see it before.
        wait_until_nothing_hidden(s.dlq.as_ref()).await;
        // `settle resume`: the rest of the same redrive.
        last = Some(
            redrive::resume(
                s.ledger.as_ref(),
                s.dlq.as_ref(),
                s.work.as_ref(),
                &run,
                &|| false,
            )
            .await
            .expect("redrive")
            .expect("the unfinished redrive is recorded"),
        );
        crashes.redrive_passes += 1;
    }
    resumed
        .stop(&format!("seed {seed}: the redrive's runner"))
        .await;

    let rows = self::rows(s, &run, &scripts).await;
    for (id, script) in &scripts {
        assert_eq!(
            rows[id].status,
            truth(script),
            "seed {seed}: {id} ({script}) after the redrive; last error: {:?}",
            rows[id].last_error
        );
    }
    let want_failed: BTreeSet<ItemId> = scripts
        .iter()
        .filter(|(_, s)| truth(s) == ItemStatus::Failed)
        .map(|(id, _)| id.clone())
        .collect();
    let rec = s.ledger.run(&run).await.expect("run").expect("run row");
    let nf = want_failed.len() as u64;
    assert_eq!(
        (rec.succeeded, rec.failed),
        (n - nf, nf),
        "seed {seed}: final tally"
    );
    // Each throttled item was throttled once, never for an attempt: its
    // row counts it, whatever redeliveries the faults made.
    let throttled_items = scripts
        .values()
        .filter(|s| s.starts_with("throttled:"))
        .count() as u64;
    for (id, script) in scripts.iter().filter(|(_, s)| s.starts_with("throttled:")) {
        assert_eq!(
            rows[id].throttled, 1,
            "seed {seed}: {id} ({script}) throttles"
        );
    }
    assert_settled_and_empty(s, &run, seed, "at the end").await;

    // Invariant 4 for malformed messages: each was dead-lettered as it was,
    // alone (the items' outcomes above are the scripts'), and kept there:
    // the redrive moves only the run's own messages. And invariant 5 once
    // more: after a redrive, each failed item is in the DLQ exactly once.
    let dead = receive_all(s.dlq.as_ref()).await;
    let dead_bodies: BTreeSet<&str> = dead.iter().map(|d| d.body.as_str()).collect();
    for body in faults.malformed() {
        assert!(
            dead_bodies.contains(body.as_str()),
            "seed {seed}: the malformed body {body:?} is not in the DLQ ({} bodies there)",
            dead_bodies.len()
        );
    }
    check_dead_letters(
        seed,
        "at the end",
        &dead_letters(&dead, &run),
        &want_failed,
        &scripts,
        true,
    );

    // Invariant 7, and "a settled item is never run again": no attempt
    // started while the ledger held its item's outcome (a success, or a
    // failure for good before the redrive), whatever the leftover copies,
    // duplicates and redeliveries. What remains of "attempted again" (the
    // counts in the report) are attempts whose outcome a crash lost before
    // it reached the ledger.
    let ran_settled = counts
        .ran_settled
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    assert!(
        ran_settled.is_empty(),
        "seed {seed}: the processor ran for items whose outcome the ledger already held: {ran_settled:?}"
    );

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
        crashes,
        effects_executed: counts.executed.load(Ordering::Relaxed),
        effects_replayed: counts.replayed.load(Ordering::Relaxed),
        effects_in_progress: counts.in_progress.load(Ordering::Relaxed),
        double_executions: doubles.len() as u64,
        failed_by_faults,
        reconciled: reconciled.load(Ordering::Relaxed),
        redriven: per_item.len() as u64,
        in_flight_at_settle,
        changed_after_settle,
        permanent_attempted_again,
        permanent_run_again,
        extra_dead_letters: swept + extra_after_sweep,
        items_dead_lettered_twice,
        dead_letters_of_succeeded,
        throttled_items,
        trace,
    }
}

async fn rows(
    s: &Subject,
    run: &RunId,
    scripts: &BTreeMap<ItemId, &str>,
) -> BTreeMap<ItemId, ItemRecord> {
    let keys: Vec<_> = scripts.keys().map(|id| (run.clone(), id.clone())).collect();
    let mut out = BTreeMap::new();
    for chunk in keys.chunks(100) {
        for ((_, id), v) in s.ledger.items(chunk).await.expect("items") {
            out.insert(id, v.value);
        }
    }
    assert_eq!(out.len(), scripts.len(), "every item has a ledger row");
    out
}

impl fmt::Display for RedriveCut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stopped { at } => write!(f, "stopped at its batch {}", at + 1),
            Self::Killed { at, landed } => write!(
                f,
                "killed at its send {at} ({})",
                if *landed { "landed" } else { "lost" }
            ),
        }
    }
}

impl fmt::Display for Crashes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.dispatch {
            Some((at, landed)) => write!(
                f,
                "dispatch died at its send {at} ({})",
                if landed { "landed" } else { "lost" }
            )?,
            None => write!(f, "dispatch finished before its crash point")?,
        }
        match self.redrive {
            Some(cut) => write!(f, ", first redrive {cut}")?,
            None => write!(f, ", first redrive finished before its cut")?,
        }
        write!(f, ", {} redrive passes", self.redrive_passes)
    }
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {}: {} items, {} faults ({}); crashes: {}; side effects {} executed, \
             {} replayed, {} refused in progress, {} double-executed; {} failed by faults \
             ({} reconciled), {} redriven; {} messages in flight at settle, {} outcomes \
             changed after; permanent failures attempted again: {} by the ledger, {} by the \
             processor; dead letters beyond one per failed item before the redrive: {} (on {} \
             items); {} dead letters of succeeded items; {} items throttled, none failed for it; \
             trace {}",
            self.seed,
            self.items,
            self.faults,
            self.faults_by_kind,
            self.crashes,
            self.effects_executed,
            self.effects_replayed,
            self.effects_in_progress,
            self.double_executions,
            self.failed_by_faults,
            self.reconciled,
            self.redriven,
            self.in_flight_at_settle,
            self.changed_after_settle,
            self.permanent_attempted_again,
            self.permanent_run_again,
            self.extra_dead_letters,
            self.items_dead_lettered_twice,
            self.dead_letters_of_succeeded,
            self.throttled_items,
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
    pub dispatch_crashes: u64,
    pub redrives_stopped: u64,
    pub redrives_killed: u64,
    pub in_flight_at_settle: u64,
    /// Seeds whose run was first seen settled with messages still queued.
    pub seeds_in_flight_at_settle: u64,
    pub changed_after_settle: u64,
    pub permanent_attempted_again: u64,
    pub permanent_run_again: u64,
    pub extra_dead_letters: u64,
    pub items_dead_lettered_twice: u64,
    pub dead_letters_of_succeeded: u64,
    /// Seeds with a failed item dead-lettered more than once after the
    /// faulty run: where "exactly one" fails before a redrive.
    pub seeds_with_extra_dead_letters: Vec<u64>,
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
        self.dispatch_crashes += u64::from(r.crashes.dispatch.is_some());
        match r.crashes.redrive {
            Some(RedriveCut::Stopped { .. }) => self.redrives_stopped += 1,
            Some(RedriveCut::Killed { .. }) => self.redrives_killed += 1,
            None => {}
        }
        self.in_flight_at_settle += r.in_flight_at_settle;
        self.seeds_in_flight_at_settle += u64::from(r.in_flight_at_settle > 0);
        self.changed_after_settle += r.changed_after_settle;
        self.permanent_attempted_again += r.permanent_attempted_again;
        self.permanent_run_again += r.permanent_run_again;
        self.extra_dead_letters += r.extra_dead_letters;
        self.items_dead_lettered_twice += r.items_dead_lettered_twice;
        self.dead_letters_of_succeeded += r.dead_letters_of_succeeded;
        if r.extra_dead_letters > 0 {
            self.seeds_with_extra_dead_letters.push(r.seed);
        }
    }
}

impl fmt::Display for SimTotals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
            "crashes: {} mid-dispatch (the runner beside it too); first redrive cut off {} \
             times ({} stopped, {} killed), its runner crashed every time",
            self.dispatch_crashes,
            self.redrives_stopped + self.redrives_killed,
            self.redrives_stopped,
            self.redrives_killed
        )?;
        writeln!(
            f,
            "items lost: 0; items double-counted: 0; items failed by faults alone and put right by the redrive: {}; \
             messages the queue parked without a result, reported failed by the reconciler: {}",
            self.failed_by_faults, self.reconciled
        )?;
        writeln!(
            f,
            "settled runs: {} messages still queued when first seen settled (on {} seeds), \
             all drained after with the tally exact, none of them running the processor \
             (asserted); {} outcomes changed after settling (a leftover duplicate's success); \
             a run with an open redrive never read settled",
            self.in_flight_at_settle, self.seeds_in_flight_at_settle, self.changed_after_settle
        )?;
        writeln!(
            f,
            "attempts started while the ledger held the item's outcome (invariant 7, a settled \
             item never run again): 0, asserted; permanent failures attempted again because a \
             crash lost the first attempt's outcome before the ledger had it: {} items by the \
             ledger's history, {} by the processor's own count",
            self.permanent_attempted_again, self.permanent_run_again
        )?;
        writeln!(
            f,
            "dead letters: every failed item in the DLQ, and exactly once after the redrive; \
             before it, copies beyond one per failed item left by the workers: {}, on seeds {} \
             (deleted as the run settled where a DLQ scan is cheap, exactly one then asserted; \
             items with more than one after that: {}); copies of succeeded items: {}",
            self.extra_dead_letters,
            seed_list(&self.seeds_with_extra_dead_letters),
            self.items_dead_lettered_twice,
            self.dead_letters_of_succeeded
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

/// At most 20 seeds, then how many more.
fn seed_list(seeds: &[u64]) -> String {
    let shown: Vec<String> = seeds.iter().take(20).map(u64::to_string).collect();
    match seeds.len() {
        0 => "none".to_owned(),
        n if n > 20 => format!("{} and {} more", shown.join(", "), n - 20),
        _ => shown.join(", "),
    }
}
