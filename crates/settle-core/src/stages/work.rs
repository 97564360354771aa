//! The work stage: one batch of work-queue messages in, a partial batch
//! response out. Each message settles on its own: a processor error, a
//! panic, a timeout or an undecodable body affects only that message.

use crate::domain::ports::{send_batches, Delivery, PortError, Queue, MAX_QUEUE_BATCH};
use crate::domain::processor::{AttemptContext, BatchAttempt, BatchProcessor, Processor};
use crate::domain::{
    bounded_error, now_millis, Attempt, AttemptOutcome, ErrorKind, Output, ProcessError, RunId,
    MAX_OUTPUT_BYTES,
};
use crate::wire::message::{pack_results, DeadLetter, ResultBody, WorkBody};
use futures::FutureExt;
use std::cell::Cell;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument;

/// SQS's longest visibility timeout: the longest a retry can be put off.
pub const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 60 * 60);

/// The default cap on a retry's delay ([`WorkerConfig::max_retry_delay`]).
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// Tuning of the worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Delay before the first retry of a retryable failure; doubles per receive.
    pub retry_delay: Duration,
    /// Cap on the retry delay.
    pub max_retry_delay: Duration,
    /// An attempt running longer than this fails as retryable ("timed out").
    pub item_timeout: Option<Duration>,
    /// Items are not started when less than this remains before the deadline.
    pub deadline_margin: Duration,
    /// The work queue's visibility timeout, if known: while a batch is in
    /// hand its messages' visibility is extended (see `Worker::handle`).
    pub visibility: Option<Duration>,
    /// Items worked on at once across all of this worker's batches, if
    /// bounded (the local runner's `--concurrency`; a Lambda worker has one
    /// batch), and never more than the processor's own
    /// [`Processor::capacity`]. For a per-item processor only: a
    /// [`BatchProcessor`] gets its batch whole. An item waits for a place
    /// before its attempt starts, so the wait counts neither in its
    /// duration nor against its timeout; with `visibility` set, its message
    /// stays hidden meanwhile, with the rest of its batch.
    pub concurrency: Option<usize>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            retry_delay: Duration::from_secs(1),
            max_retry_delay: MAX_RETRY_DELAY,
            item_timeout: None,
            deadline_margin: Duration::from_secs(2),
            visibility: None,
            concurrency: None,
        }
    }
}

/// Which messages of a batch must be delivered again (SQS partial batch
/// response); every other message is done and may be deleted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchResponse {
    pub failures: Vec<String>,
    /// What the batch's attempts came to, per run: the worker's metrics.
    pub runs: BTreeMap<RunId, RunCounts>,
}

/// What one batch's attempts came to for one run. Counts only attempts
/// whose result was sent: one that could not be is retried, and counted
/// when it reports.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunCounts {
    /// Attempts that succeeded.
    pub succeeded: u64,
    /// Attempts that failed for good: their items are failed.
    pub failed: u64,
    /// Attempts that failed and will be retried.
    pub retried: u64,
    /// Dead letters sent (terminal failures).
    pub dead_lettered: u64,
    /// Attempts of items that a redrive sent back.
    pub redriven: u64,
    /// Each attempt's duration, in milliseconds.
    pub durations_ms: Vec<u64>,
}

/// The worker: decodes, processes and reports each message of a batch.
pub struct Worker {
    engine: Engine,
    work: Arc<dyn Queue>,
    dlq: Arc<dyn Queue>,
    results: Arc<dyn Queue>,
    config: WorkerConfig,
    /// Places for items at once, when `config.concurrency` bounds them.
    places: Option<Places>,
    seen: Mutex<Seen>,
}

/// Places for the items a worker works on at once: at most its bound, in
/// the order they ask (a FIFO semaphore), and at most what the processor
/// says it can take now ([`Processor::capacity`]).
#[derive(Debug)]
struct Places {
    bound: tokio::sync::Semaphore,
    /// Places taken, for the processor's own limit.
    taken: Mutex<usize>,
    freed: tokio::sync::Notify,
}

/// How often a waiting item looks at the processor's capacity again,
/// which can grow without a place being freed (a process said hello).
const CAPACITY_RECHECK: Duration = Duration::from_millis(50);

impl Places {
    fn new(bound: usize) -> Self {
        Self {
            bound: tokio::sync::Semaphore::new(bound.max(1)),
            taken: Mutex::default(),
            freed: tokio::sync::Notify::new(),
        }
    }

    fn taken(&self) -> std::sync::MutexGuard<'_, usize> {
        // Held for a count's update: a panic cannot leave it half-written.
        self.taken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn take(&self, processor: &dyn Processor) -> Place<'_> {
        // Never closed: `ok()` only drops the Result.
        let permit = self.bound.acquire().await.ok();
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut taken = self.taken();
                if processor.capacity().is_none_or(|cap| *taken < cap.max(1)) {
                    *taken += 1;
                    return Place {
                        places: self,
                        _permit: permit,
                    };
                }
            }
            let _ = tokio::time::timeout(CAPACITY_RECHECK, freed).await;
        }
    }
}

/// A place taken; freed when dropped.
struct Place<'a> {
    places: &'a Places,
    _permit: Option<tokio::sync::SemaphorePermit<'a>>,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        *self.places.taken() -= 1;
        self.places.freed.notify_waiters();
    }
}

/// How many settled message ids a worker remembers.
const SETTLED_MEMORY: usize = 4096;

/// The messages this worker holds now, and the last ones it settled.
///
/// A queue delivers a message again once its visibility runs out, and so
/// it may while its attempt is still reporting (a queue call stalled
/// longer than the heartbeat's margin), or after it settled but before its
/// delete landed. Processing such a copy would run the user's code twice
/// for one attempt, retry a permanent failure and dead-letter the item
/// twice. A copy of a message held here is handed back for later; a copy
/// of a settled one is acknowledged (deleted with its new receipt, which
/// the first delete's stale receipt could not do) without running again.
/// This covers one process; a copy that reaches another process is the
/// at-least-once delivery that the reducer and the idempotency keys absorb.
#[derive(Debug, Default)]
struct Seen {
    held: HashSet<String>,
    settled: HashSet<String>,
    order: VecDeque<String>,
}

impl Seen {
    fn settle(&mut self, message_id: &str) {
        if self.settled.insert(message_id.to_owned()) {
            self.order.push_back(message_id.to_owned());
            if self.order.len() > SETTLED_MEMORY {
                if let Some(old) = self.order.pop_front() {
                    self.settled.remove(&old);
                }
            }
        }
    }
}

/// The messages a batch holds; let go when dropped.
struct Hold<'a> {
    seen: &'a Mutex<Seen>,
    held: Vec<String>,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for id in &self.held {
            seen.held.remove(id);
        }
    }
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("work", &self.work.name())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// How the worker runs the user's code.
enum Engine {
    /// One call per item, the batch's items concurrently.
    Each(Arc<dyn Processor>),
    /// One call for the batch's items (see [`BatchProcessor`]).
    Batch(Arc<dyn BatchProcessor>),
}

/// What a message gets before any processor runs.
enum Gate {
    /// An attempt (or the record that its item is out of attempts).
    Ready(Ready),
    /// Nothing of the processor's: settled as planned.
    Settled(Plan),
}

/// A message whose item will get an attempt (or be recorded as out of attempts).
struct Ready {
    body: WorkBody,
    attempt: u32,
    span: tracing::Span,
    /// Received past the run's limit: recorded as terminal, not run.
    exhausted: bool,
}

/// What became of one message, before anything is sent.
#[derive(Debug)]
enum Plan {
    /// Nothing to report (never started): deliver again.
    Retry { delay: Duration },
    /// Report the result; then retry after `retry` if set, else the message is done.
    Report {
        // Boxed: the other variants are a few words.
        result: Box<ResultBody>,
        dead_letter: Option<String>,
        retry: Option<Duration>,
        /// The message was sent back by a redrive.
        redriven: bool,
    },
    /// Undecodable: park the raw body in the DLQ so nothing is lost.
    Malformed,
    /// A copy of a message this worker already settled: acknowledge it.
    Settled,
}

impl Worker {
    pub fn new(
        processor: Arc<dyn Processor>,
        work: Arc<dyn Queue>,
        dlq: Arc<dyn Queue>,
        results: Arc<dyn Queue>,
        config: WorkerConfig,
    ) -> Self {
        Self::with(Engine::Each(processor), [work, dlq, results], config)
    }

    /// A worker whose user code takes a whole batch at once: each
    /// [`Worker::handle`] calls it once, with every message that gets an
    /// attempt.
    pub fn batched(
        processor: Arc<dyn BatchProcessor>,
        work: Arc<dyn Queue>,
        dlq: Arc<dyn Queue>,
        results: Arc<dyn Queue>,
        config: WorkerConfig,
    ) -> Self {
        Self::with(Engine::Batch(processor), [work, dlq, results], config)
    }

    fn with(engine: Engine, queues: [Arc<dyn Queue>; 3], config: WorkerConfig) -> Self {
        let [work, dlq, results] = queues;
        Self {
            engine,
            work,
            dlq,
            results,
            places: config.concurrency.map(Places::new),
            config,
            seen: Mutex::default(),
        }
    }

    /// Handles a batch. Items run concurrently. `deadline` is when the
    /// invocation ends (Lambda's remaining time); items not started by then
    /// minus the margin are reported for retry untouched.
    pub async fn handle(&self, batch: &[Delivery], deadline: Option<Instant>) -> BatchResponse {
        let (plans, mut failed) = self
            .with_heartbeat(batch, self.report(batch, deadline))
            .await;
        let runs = counts(&plans, &failed);
        for (i, plan) in plans.iter().enumerate() {
            let delay = match plan {
                Plan::Retry { delay } => Some(*delay),
                Plan::Report { retry, .. } => *retry,
                Plan::Malformed | Plan::Settled => None,
            };
            if let Some(delay) = delay {
                failed[i] = true;
                // Best effort: without it the visibility timeout paces the retry.
                if let Err(e) = self.work.change_visibility(&batch[i].receipt, delay).await {
                    tracing::debug!(error = %e, message_id = %batch[i].message_id, "could not set retry delay");
                }
            }
        }

        BatchResponse {
            failures: batch
                .iter()
                .zip(failed)
                .filter(|(_, f)| *f)
                .map(|(d, _)| d.message_id.clone())
                .collect(),
            runs,
        }
    }

    /// Runs `work` while keeping the batch's messages hidden: every third
    /// of [`WorkerConfig::visibility`] their visibility is extended by a
    /// whole one, so that a message is not delivered again (and its item
    /// processed twice, or dead-lettered twice) while its attempt, its dead
    /// letter or its result is still on its way. Stops before the retry
    /// delays are set, which it would otherwise undo.
    async fn with_heartbeat<T>(&self, batch: &[Delivery], work: impl Future<Output = T>) -> T {
        let Some(visibility) = self.config.visibility else {
            return work.await;
        };
        let beat = async {
            loop {
                tokio::time::sleep(visibility / 3).await;
                for d in batch {
                    if let Err(e) = self.work.change_visibility(&d.receipt, visibility).await {
                        tracing::debug!(error = %e, message_id = %d.message_id, "could not extend visibility");
                    }
                }
            }
        };
        tokio::pin!(work);
        tokio::select! {
            out = &mut work => out,
            never = beat => never,
        }
    }

    /// Plans every message, then sends the dead letters and the results;
    /// returns the plans and which messages must come back.
    async fn report(
        &self,
        batch: &[Delivery],
        deadline: Option<Instant>,
    ) -> (Vec<Plan>, Vec<bool>) {
        let (known, hold) = self.copies(batch);
        let copy: Vec<bool> = known.iter().map(Option::is_some).collect();
        let plans = match &self.engine {
            Engine::Each(processor) => {
                futures::future::join_all(batch.iter().zip(known).map(|(d, known)| async {
                    match known {
                        Some(plan) => plan,
                        None => self.plan(processor, d, deadline).await,
                    }
                }))
                .await
            }
            Engine::Batch(processor) => {
                // The user's code sees only the messages this worker took hold of.
                let fresh: Vec<Delivery> = batch
                    .iter()
                    .zip(&copy)
                    .filter(|(_, c)| !**c)
                    .map(|(d, _)| d.clone())
                    .collect();
                let mut planned = self
                    .plan_batch(processor, &fresh, deadline)
                    .await
                    .into_iter();
                known
                    .into_iter()
                    .map(|k| {
                        k.or_else(|| planned.next())
                            .expect("one plan per fresh message")
                    })
                    .collect()
            }
        };
        let mut failed = vec![false; batch.len()];

        // Dead letters first, results second: once the tally counts an item
        // failed, its copy is already in the DLQ, so a redrive can always find
        // it. A message whose copy or result was not stored is retried (a
        // retry past the limit records "no outcome" and dead-letters again:
        // a duplicate copy, never a missing one).
        let dead: Vec<(String, Vec<usize>)> = (0..batch.len())
            .filter_map(|i| match &plans[i] {
                Plan::Report {
                    dead_letter: Some(body),
                    ..
                } => Some((body.clone(), vec![i])),
                Plan::Malformed => Some((batch[i].body.clone(), vec![i])),
                _ => None,
            })
            .collect();
        self.send_all(&self.dlq, dead, &mut failed, "dead-letter")
            .await;

        // The batch's results travel together, one message for the lot.
        let (members, encoded): (Vec<usize>, Vec<String>) = (0..batch.len())
            .filter(|&i| !failed[i])
            .filter_map(|i| match &plans[i] {
                Plan::Report { result, .. } => Some((i, result.encode())),
                _ => None,
            })
            .unzip();
        let reports = pack_results(&encoded)
            .into_iter()
            .map(|(body, of)| (body, of.into_iter().map(|j| members[j]).collect()))
            .collect();
        self.send_all(&self.results, reports, &mut failed, "send results")
            .await;
        self.remember(batch, &copy, &plans, &failed);
        drop(hold);
        (plans, failed)
    }

    /// Plans the copies of messages this worker holds or settled (see
    /// [`Seen`]) and takes hold of the others until the returned [`Hold`]
    /// is dropped, also when the batch's future is (a cut-off invocation).
    fn copies(&self, batch: &[Delivery]) -> (Vec<Option<Plan>>, Hold<'_>) {
        // The copy of a held message comes back once the holder is likely
        // done (its attempt is bounded by the item timeout, its report by a
        // visibility timeout; an item waiting for a place takes longer, and
        // a copy that comes back while it still waits is handed back
        // again): then it is settled (and acknowledged) or due for its
        // retry.
        let later = self.config.item_timeout.unwrap_or_default()
            + self.config.visibility.unwrap_or(self.config.retry_delay);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut held = Vec::new();
        let plans = batch
            .iter()
            .map(|d| {
                if seen.settled.contains(&d.message_id) {
                    tracing::info!(message_id = %d.message_id, "delivered again after it settled; acknowledged");
                    Some(Plan::Settled)
                } else if !seen.held.insert(d.message_id.clone()) {
                    tracing::info!(message_id = %d.message_id, "delivered again while its attempt still runs; handed back");
                    Some(Plan::Retry { delay: later })
                } else {
                    held.push(d.message_id.clone());
                    None
                }
            })
            .collect();
        (
            plans,
            Hold {
                seen: &self.seen,
                held,
            },
        )
    }

    /// Remembers the batch's messages that settled for good: reported with
    /// no retry to come, or parked as malformed.
    fn remember(&self, batch: &[Delivery], copy: &[bool], plans: &[Plan], failed: &[bool]) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for (i, d) in batch.iter().enumerate() {
            let done = match &plans[i] {
                Plan::Report { retry, .. } => retry.is_none(),
                Plan::Malformed => true,
                Plan::Retry { .. } | Plan::Settled => false,
            };
            if done && !copy[i] && !failed[i] {
                seen.settle(&d.message_id);
            }
        }
    }

    /// Sends `(body, indices of the messages it speaks for)` pairs in
    /// SQS-sized batches; marks the messages of a failed batch for retry.
    async fn send_all(
        &self,
        queue: &Arc<dyn Queue>,
        bodies: Vec<(String, Vec<usize>)>,
        failed: &mut [bool],
        what: &str,
    ) {
        let sizes: Vec<usize> = bodies.iter().map(|(b, _)| b.len()).collect();
        for range in send_batches(&sizes) {
            let chunk = &bodies[range];
            if let Err(e) = queue
                .send(chunk.iter().map(|(b, _)| b.clone()).collect())
                .await
            {
                tracing::error!(error = %e, "could not {what}; the messages will be retried");
                chunk
                    .iter()
                    .flat_map(|(_, of)| of)
                    .for_each(|&i| failed[i] = true);
            }
        }
    }

    /// Decodes a message and decides whether its item gets an attempt now.
    fn gate(&self, d: &Delivery, deadline: Option<Instant>) -> Gate {
        let body = match WorkBody::decode(&d.body) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(message_id = %d.message_id, error = %e, "undecodable message; dead-lettering it");
                return Gate::Settled(Plan::Malformed);
            }
        };
        let attempt = body.prior_attempts + d.receive_count;
        let span = tracing::info_span!("item", run = %body.run, item = %body.item,
            message_id = %d.message_id, attempt);
        if let Some(deadline) = deadline {
            if deadline.saturating_duration_since(Instant::now()) < self.config.deadline_margin {
                span.in_scope(|| tracing::info!("not started: the invocation is about to end"));
                return Gate::Settled(Plan::Retry {
                    delay: Duration::ZERO,
                });
            }
        }
        // A receive past the limit means the last attempt never reported
        // (a crash or a kill); record that as terminal rather than run again.
        let exhausted = d.receive_count > body.max_receives;
        Gate::Ready(Ready {
            body,
            attempt,
            span,
            exhausted,
        })
    }

    fn no_outcome(body: &WorkBody) -> ProcessError {
        ProcessError::retryable(format!(
            "no outcome after {} receives (the worker crashed or timed out)",
            body.max_receives
        ))
    }

    async fn plan(
        &self,
        processor: &Arc<dyn Processor>,
        d: &Delivery,
        deadline: Option<Instant>,
    ) -> Plan {
        let ready = match self.gate(d, deadline) {
            Gate::Ready(ready) => ready,
            Gate::Settled(plan) => return plan,
        };
        let span = ready.span.clone();
        async {
            // A place among the items at once, for an attempt that runs.
            let _place = match (&self.places, ready.exhausted) {
                (Some(places), false) => Some(places.take(processor.as_ref()).await),
                _ => None,
            };
            // The wait may have run into the invocation's end.
            if let Some(deadline) = deadline {
                if deadline.saturating_duration_since(Instant::now()) < self.config.deadline_margin
                {
                    tracing::info!("not started: the invocation is about to end");
                    return Plan::Retry {
                        delay: Duration::ZERO,
                    };
                }
            }
            let started_at = now_millis();
            let clock = Instant::now();
            let (outcome, log) = if ready.exhausted {
                (Err(Self::no_outcome(&ready.body)), None)
            } else {
                self.run_processor(processor, &ready.body, ready.attempt, deadline)
                    .await
            };
            self.finish(d, &ready, started_at, clock.elapsed(), outcome, log)
        }
        .instrument(span)
        .await
    }

    /// Plans a batch whose items one [`BatchProcessor`] call works on.
    ///
    /// Why the isolation of items still holds: the call gets only the
    /// messages that decoded and are due an attempt (a malformed body, a
    /// late start or an exhausted item is settled alone, as for a
    /// per-item processor); its answer is one outcome per item, each
    /// checked and reported on its own (an oversized or missing outcome
    /// fails its item only); and each attempt keeps its own log. Only what
    /// befalls the call itself (a panic, the timeout) befalls all of its
    /// items, and retryably: the batch is the user code's unit of work.
    async fn plan_batch(
        &self,
        processor: &Arc<dyn BatchProcessor>,
        batch: &[Delivery],
        deadline: Option<Instant>,
    ) -> Vec<Plan> {
        let gates: Vec<Gate> = batch.iter().map(|d| self.gate(d, deadline)).collect();
        let started_at = now_millis();
        let clock = Instant::now();
        let timeout_at = self.config.item_timeout.map(|t| clock + t);
        let attempts: Vec<BatchAttempt> = gates
            .iter()
            .filter_map(|g| match g {
                Gate::Ready(r) if !r.exhausted => Some(r),
                _ => None,
            })
            .map(|r| BatchAttempt {
                item: r.body.item(),
                ctx: self.context(&r.body, r.attempt, timeout_at, deadline),
            })
            .collect();
        let mut outcomes = self
            .run_batch(processor, attempts, timeout_at)
            .await
            .into_iter();
        let elapsed = clock.elapsed();
        batch
            .iter()
            .zip(gates)
            .map(|(d, gate)| match gate {
                Gate::Settled(plan) => plan,
                Gate::Ready(ready) => {
                    let (outcome, log) = if ready.exhausted {
                        (Err(Self::no_outcome(&ready.body)), None)
                    } else {
                        outcomes.next().unwrap_or_else(|| {
                            (
                                Err(ProcessError::retryable("no outcome for this item")),
                                None,
                            )
                        })
                    };
                    let span = ready.span.clone();
                    span.in_scope(|| self.finish(d, &ready, started_at, elapsed, outcome, log))
                }
            })
            .collect()
    }

    /// Turns an attempt's outcome into what to report.
    fn finish(
        &self,
        d: &Delivery,
        ready: &Ready,
        started_at: u64,
        elapsed: Duration,
        outcome: Result<Option<Output>, ProcessError>,
        log: Option<String>,
    ) -> Plan {
        let (body, attempt) = (&ready.body, ready.attempt);
        let outcome = outcome.and_then(|output| match output {
            Some(o) if o.get().len() > MAX_OUTPUT_BYTES => Err(ProcessError::permanent(format!(
                "the output is {} bytes; an item's output may be at most {MAX_OUTPUT_BYTES}",
                o.get().len()
            ))),
            // JSON null reads back as no output: say so from the start.
            Some(o) if o.get() == "null" => Ok(None),
            other => Ok(other),
        });
        let duration_ms = elapsed.as_millis() as u64;
        let last = d.receive_count >= body.max_receives;
        let mut output = None;
        let (outcome, dead_letter, retry) = match outcome {
            Ok(out) => {
                tracing::info!(duration_ms, "succeeded");
                output = out;
                (AttemptOutcome::Succeeded, None, None)
            }
            Err(mut e) => {
                e.message = bounded_error(e.message);
                let terminal = e.kind == ErrorKind::Permanent || last;
                if terminal {
                    tracing::info!(error = %e.message, kind = ?e.kind, "failed for good; dead-lettering");
                } else {
                    tracing::info!(error = %e.message, "failed; will retry");
                }
                let dead_letter = terminal.then(|| {
                    WorkBody {
                        dead: Some(DeadLetter {
                            error: e.message.clone(),
                            attempts: attempt,
                        }),
                        ..body.clone()
                    }
                    .encode()
                });
                // A processor's hint (an idempotency claim that another
                // attempt holds until its deadline) can only lengthen it.
                let retry = (!terminal).then(|| {
                    let delay = self.retry_delay(d.receive_count);
                    e.retry_after
                        .map_or(delay, |after| delay.max(after.min(MAX_VISIBILITY)))
                });
                let outcome = AttemptOutcome::Failed {
                    kind: e.kind,
                    error: e.message,
                    terminal,
                };
                (outcome, dead_letter, retry)
            }
        };
        Plan::Report {
            result: Box::new(ResultBody {
                run: body.run.clone(),
                item: body.item.clone(),
                seq: body.seq,
                attempt: Attempt {
                    attempt,
                    message_id: d.message_id.clone(),
                    started_at,
                    duration_ms,
                    outcome,
                    output,
                    log,
                },
            }),
            dead_letter,
            retry,
            redriven: body.redrive.is_some(),
        }
    }

    /// The attempt's context: its deadline is the item timeout or the
    /// invocation's end, whichever is first.
    fn context(
        &self,
        body: &WorkBody,
        attempt: u32,
        timeout_at: Option<Instant>,
        deadline: Option<Instant>,
    ) -> AttemptContext {
        let mut ctx = AttemptContext::new(body.run.clone(), &body.item(), attempt);
        ctx.deadline = match (timeout_at, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        ctx
    }

    /// Runs one [`BatchProcessor`] call; returns each attempt's outcome and log.
    async fn run_batch(
        &self,
        processor: &Arc<dyn BatchProcessor>,
        attempts: Vec<BatchAttempt>,
        timeout_at: Option<Instant>,
    ) -> Vec<(Result<Option<Output>, ProcessError>, Option<String>)> {
        if attempts.is_empty() {
            return Vec::new();
        }
        let n = attempts.len();
        let attempts = Arc::new(attempts);
        let (processor, in_call) = (processor.clone(), attempts.clone());
        let fut = PanicScope(Box::pin(
            async move { processor.process_batch(&in_call).await },
        ));
        let caught = AssertUnwindSafe(fut).catch_unwind();
        let res = match self.config.item_timeout.zip(timeout_at) {
            Some((t, at)) => match tokio::time::timeout_at(at, caught).await {
                Ok(r) => r.map_err(panic_error),
                Err(_) => Err(ProcessError::retryable(format!(
                    "timed out after {} ms",
                    t.as_millis()
                ))),
            },
            None => caught.await.map_err(panic_error),
        };
        let mut outcomes: Vec<_> = match res {
            Ok(outcomes) => outcomes.into_iter().take(n).collect(),
            Err(e) => vec![Err(e); n],
        };
        outcomes.resize_with(n, || {
            Err(ProcessError::retryable(
                "the batch processor gave no outcome for this item",
            ))
        });
        outcomes
            .into_iter()
            .zip(attempts.iter())
            .map(|(outcome, a)| (outcome, a.ctx.take_log()))
            .collect()
    }

    /// Runs the processor on one item; returns its outcome and the log the
    /// attempt wrote (also when it timed out or panicked).
    async fn run_processor(
        &self,
        processor: &Arc<dyn Processor>,
        body: &WorkBody,
        attempt: u32,
        deadline: Option<Instant>,
    ) -> (Result<Option<Output>, ProcessError>, Option<String>) {
        let item = body.item();
        // The attempt is cut off at the item timeout; the invocation ends at
        // `deadline` (by then Lambda has stopped the process).
        let timeout_at = self.config.item_timeout.map(|t| Instant::now() + t);
        let ctx = Arc::new(self.context(body, attempt, timeout_at, deadline));
        let processor = processor.clone();
        let in_attempt = ctx.clone();
        let fut = PanicScope(Box::pin(async move {
            processor.process(&item, &in_attempt).await
        }));
        let caught = AssertUnwindSafe(fut).catch_unwind();
        let res = match self.config.item_timeout.zip(timeout_at) {
            // The same instant as the context's deadline: an idempotency
            // claim never expires while its attempt still runs.
            Some((t, at)) => match tokio::time::timeout_at(at, caught).await {
                Ok(r) => r,
                Err(_) => {
                    let e =
                        ProcessError::retryable(format!("timed out after {} ms", t.as_millis()));
                    return (Err(e), ctx.take_log());
                }
            },
            None => caught.await,
        };
        let res = res.unwrap_or_else(|panic| Err(panic_error(panic)));
        (res, ctx.take_log())
    }

    fn retry_delay(&self, receive_count: u32) -> Duration {
        let exp = receive_count.saturating_sub(1).min(16);
        let base = self.config.retry_delay.saturating_mul(1 << exp);
        let capped = base.min(self.config.max_retry_delay);
        // Up to 25% jitter, so a burst of failures does not retry in lockstep.
        capped + capped.mul_f64(fastrand::f64() * 0.25)
    }
}

/// A caught panic as the retryable failure of the attempts it interrupted.
fn panic_error(panic: Box<dyn std::any::Any + Send>) -> ProcessError {
    let msg = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned());
    ProcessError::retryable(format!("panic: {msg}"))
}

/// Per run, what the reported attempts came to (`unsent[i]`: message i's
/// report could not be sent).
fn counts(plans: &[Plan], unsent: &[bool]) -> BTreeMap<RunId, RunCounts> {
    let mut runs: BTreeMap<RunId, RunCounts> = BTreeMap::new();
    for (plan, unsent) in plans.iter().zip(unsent) {
        let Plan::Report {
            result,
            dead_letter,
            redriven,
            ..
        } = plan
        else {
            continue;
        };
        if *unsent {
            continue;
        }
        let c = runs.entry(result.run.clone()).or_default();
        match &result.attempt.outcome {
            AttemptOutcome::Succeeded => c.succeeded += 1,
            AttemptOutcome::Failed { terminal: true, .. } => c.failed += 1,
            AttemptOutcome::Failed { .. } => c.retried += 1,
        }
        c.dead_lettered += u64::from(dead_letter.is_some());
        c.redriven += u64::from(*redriven);
        c.durations_ms.push(result.attempt.duration_ms);
    }
    runs
}

thread_local! {
    static IN_PROCESSOR: Cell<bool> = const { Cell::new(false) };
}

/// True while the current thread is polling user processor code; a panic
/// hook uses it to keep contained panics out of the terminal.
pub fn in_processor() -> bool {
    IN_PROCESSOR.with(Cell::get)
}

struct PanicScope<F>(Pin<Box<F>>);

impl<F: Future> Future for PanicScope<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Restored by a guard: a panic unwinds through this poll to the
        // worker's catch_unwind, and a flag left set would silence every
        // later panic on this thread, bugs included.
        struct Restore(bool);
        impl Drop for Restore {
            fn drop(&mut self) {
                IN_PROCESSOR.with(|f| f.set(self.0));
            }
        }
        let _restore = Restore(IN_PROCESSOR.with(|f| f.replace(true)));
        self.0.as_mut().poll(cx)
    }
}

/// Deletes the messages of `batch` not listed in `response`, as the Lambda
/// event source mapping does after the handler returns.
pub async fn delete_done(
    queue: &dyn Queue,
    batch: &[Delivery],
    response: &BatchResponse,
) -> Result<usize, PortError> {
    let done: Vec<String> = batch
        .iter()
        .filter(|d| !response.failures.contains(&d.message_id))
        .map(|d| d.receipt.clone())
        .collect();
    let calls = done
        .chunks(MAX_QUEUE_BATCH)
        .map(|c| queue.delete(c.to_vec()));
    for r in futures::future::join_all(calls).await {
        r?;
    }
    Ok(done.len())
}
