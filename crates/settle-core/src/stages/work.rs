//! The work stage: one batch of work-queue messages in, a partial batch
//! response out. Each message settles on its own: a processor error, a
//! panic, a timeout or an undecodable body affects only that message.

use crate::domain::ports::{
    send_batches, Delivery, Ledger, PortError, Queue, MAX_QUEUE_BATCH, MAX_SEND_DELAY,
};
use crate::domain::processor::{AttemptContext, BatchAttempt, BatchProcessor, Processor};
use crate::domain::{
    bounded_error, now_millis, Attempt, AttemptOutcome, ErrorKind, ItemId, ItemStatus, Output,
    ProcessError, RunId, MAX_OUTPUT_BYTES,
};
use crate::flow::{Limiter, Signal, DEFAULT_PAUSE};
use crate::wire::message::{pack_results, DeadLetter, DecodeError, ResultBody, WorkBody};
use futures::FutureExt;
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument;

mod admission;
mod memory;
mod places;

use memory::{Hold, ItemKey, Known, Memory, Seen};
use places::Places;

/// The longest a retry can be put off (SQS's longest visibility timeout):
/// a processor's longer retry-after is capped at it, and the attempt says so.
pub const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 60 * 60);

/// Receives a work queue should allow past a run's attempt limit before it
/// dead-letters a message by itself; the worker records a message received
/// that often with no outcome known as failed for good just before.
pub const EXTRA_RECEIVES: u32 = 3;

/// The longest an item waits in place for its run's flow control before
/// it is sent round instead: it holds its batch (and so keeps the worker
/// from taking more messages it could not start either), and a stopping
/// runner waits for it.
pub const HOLD_IN_PLACE: Duration = Duration::from_secs(5);

/// The default cap on a retry's delay ([`WorkerConfig::max_retry_delay`]).
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// Tuning of the worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Delay before the first retry of a retryable failure; doubles per attempt.
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
    /// How long a reported result may take to reach the ledger: the results
    /// queue's visibility timeout (a reducer that died holding a result
    /// makes it wait that long) plus the reducers' batching window. A
    /// message delivered again, or sent again by a resumed dispatch, with
    /// no outcome known waits this long once before it runs. Without it,
    /// the item timeout plus the visibility timeout.
    pub result_lag: Option<Duration>,
    /// The work queue's own receive limit (its redrive policy's
    /// maxReceiveCount), if known; else a run's `max_receives` plus
    /// [`EXTRA_RECEIVES`]. A message received that often with no outcome
    /// known anywhere is recorded as failed for good ("no outcome") on that
    /// last receive, before the queue parks it unrecorded.
    pub receive_limit: Option<u32>,
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
            result_lag: None,
            receive_limit: None,
        }
    }
}

/// Which messages of a batch must be delivered again (SQS partial batch
/// response); every other message is done and may be deleted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchResponse {
    pub failures: Vec<String>,
    /// The latest receipt of a message that was received again while this
    /// batch held it, by message id: only the latest receipt deletes it.
    pub receipts: HashMap<String, String>,
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
    /// Throttled answers: the items go round again, their attempts unused.
    pub throttled: u64,
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
    memory: Memory,
    /// Where the items' outcomes are read, if the worker may read them (see
    /// [`Worker::reading`]).
    ledger: Option<Arc<dyn Ledger>>,
    /// Flow control of the runs this worker works on, shared by its batches.
    limiter: Limiter,
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
#[derive(Debug, Clone)]
enum Plan {
    /// Nothing to report: deliver this message again after `delay`. Only
    /// for a copy of a message this worker holds, whose holder settles it.
    Retry { delay: Duration },
    /// Send `body` (this message's item, with its attempts so far) to the
    /// work queue after `delay`; then this message is done. How an item
    /// that got no attempt goes on without its receives counting.
    Requeue { body: String, delay: Duration },
    /// Report the result; then, if set, send the next attempt's message.
    Report {
        // Boxed: the other variants are a few words.
        result: Box<ResultBody>,
        dead_letter: Option<String>,
        /// The retry: its message and its delay.
        retry: Option<(String, Duration)>,
        /// The message was sent back by a redrive.
        redriven: bool,
    },
    /// Undecodable: park the raw body in the DLQ so nothing is lost.
    Malformed,
    /// A copy of a message whose attempt already settled: acknowledge it.
    Settled,
}

/// The items' outcomes read for one batch, by run and item.
type Outcomes = HashMap<ItemKey, Known>;

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
            memory: Memory::default(),
            ledger: None,
            limiter: Limiter::default(),
        }
    }

    /// The flow control of this worker's runs: their rates and throttles now.
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// Lets the worker read the items' outcomes before it runs them: one
    /// [`Ledger::items`] call per batch. A message whose item already
    /// succeeded, or already failed for good (until a redrive sends it
    /// back), or whose attempt is already recorded (so its retry, if any,
    /// was sent) is acknowledged without running the processor: a
    /// leftover duplicate never runs an item again, and a permanent
    /// failure is not attempted again before a redrive.
    pub fn reading(mut self, ledger: Arc<dyn Ledger>) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// Handles a batch. Items run concurrently. `deadline` is when the
    /// invocation ends (Lambda's remaining time); items not started by then
    /// minus the margin are sent again untouched, their attempt not used.
    pub async fn handle(&self, batch: &[Delivery], deadline: Option<Instant>) -> BatchResponse {
        let (plans, mut failed, receipts) = self
            .with_heartbeat(batch, self.report(batch, deadline))
            .await;
        let runs = counts(&plans, &failed);
        for (i, plan) in plans.iter().enumerate() {
            if let Plan::Retry { delay } = plan {
                failed[i] = true;
                let receipt = receipts
                    .get(&batch[i].message_id)
                    .unwrap_or(&batch[i].receipt);
                // Best effort: without it the visibility timeout paces it.
                if let Err(e) = self.work.change_visibility(receipt, *delay).await {
                    tracing::debug!(error = %e, message_id = %batch[i].message_id, "could not set the delay");
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
            receipts,
            runs,
        }
    }

    /// Deletes the messages of `batch` that `response` says are done, as
    /// the event source mapping does after the handler returns (see
    /// [`delete_done`]), keeping them hidden meanwhile: on a slow queue a
    /// delete that lands after the visibility ran out finds a newer receive
    /// of the message and leaves it in place, and the message comes back
    /// until the queue parks it.
    pub async fn acknowledge(
        &self,
        batch: &[Delivery],
        response: &BatchResponse,
    ) -> Result<usize, PortError> {
        let done: Vec<Delivery> = batch
            .iter()
            .filter(|d| !response.failures.contains(&d.message_id))
            .map(|d| Delivery {
                receipt: response
                    .receipts
                    .get(&d.message_id)
                    .unwrap_or(&d.receipt)
                    .clone(),
                ..d.clone()
            })
            .collect();
        let all_done = BatchResponse::default();
        self.with_heartbeat(&done, delete_done(self.work.as_ref(), &done, &all_done))
            .await
    }

    /// Runs `work` while keeping the batch's messages hidden: every third
    /// of [`WorkerConfig::visibility`] their visibility is extended by a
    /// whole one, with each message's latest receipt, so that a message is
    /// not delivered again (and its item processed twice, or dead-lettered
    /// twice) while its attempt, its dead letter or its result is still on
    /// its way. Stops before the retry delays are set, which it would
    /// otherwise undo.
    async fn with_heartbeat<T>(&self, batch: &[Delivery], work: impl Future<Output = T>) -> T {
        let Some(visibility) = self.config.visibility else {
            return work.await;
        };
        let beat = async {
            loop {
                tokio::time::sleep(visibility / 3).await;
                // One call per 10 messages: one call each, a slow queue's
                // calls add up to more than the visibility timeout.
                let receipts: Vec<String> = batch
                    .iter()
                    .map(|d| {
                        self.memory
                            .receipt(&d.message_id)
                            .unwrap_or_else(|| d.receipt.clone())
                    })
                    .collect();
                for chunk in receipts.chunks(MAX_QUEUE_BATCH) {
                    if let Err(e) = self
                        .work
                        .change_visibility_batch(chunk.to_vec(), visibility)
                        .await
                    {
                        tracing::debug!(error = %e, "could not extend visibility");
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

    /// Plans every message, then sends the dead letters, the next
    /// attempts' messages and the results; returns the plans, which
    /// messages must come back, and the latest receipts of those received
    /// again meanwhile.
    async fn report(
        &self,
        batch: &[Delivery],
        deadline: Option<Instant>,
    ) -> (Vec<Plan>, Vec<bool>, HashMap<String, String>) {
        // The copy of a held message comes back once the holder is likely
        // done (its attempt is bounded by the item timeout, its report by a
        // visibility timeout; an item waiting for a place takes longer, and
        // a copy that comes back while it still waits is handed back
        // again): by then the holder has deleted it with this copy's
        // receipt, or it is settled here and acknowledged.
        let later = self.config.item_timeout.unwrap_or_default()
            + self.config.visibility.unwrap_or(self.config.retry_delay);
        let (seen, mut hold) = self.memory.take(batch, later);
        let copy: Vec<bool> = seen.iter().map(|s| matches!(s, Seen::Copy(_))).collect();
        let bodies: Vec<Option<Result<WorkBody, DecodeError>>> = batch
            .iter()
            .zip(&seen)
            .map(|(d, s)| matches!(s, Seen::New).then(|| WorkBody::decode(&d.body)))
            .collect();
        let outcomes = self.outcomes(batch, &bodies).await;
        let mut gates: Vec<Option<Gate>> = batch
            .iter()
            .zip(seen)
            .zip(bodies)
            .map(|((d, seen), body)| match (seen, body) {
                (Seen::Copy(plan), _) => Some(Gate::Settled(plan)),
                (Seen::New, Some(body)) => {
                    Some(self.gate(d, body, deadline, outcomes.as_ref(), &mut hold, later))
                }
                (Seen::New, None) => None,
            })
            .collect();
        let plans = match &self.engine {
            Engine::Each(processor) => {
                futures::future::join_all(batch.iter().zip(gates.iter_mut()).map(|(d, gate)| {
                    let gate = gate.take().expect("one gate per message");
                    async move {
                        match gate {
                            Gate::Settled(plan) => plan,
                            Gate::Ready(ready) => self.plan(processor, d, ready, deadline).await,
                        }
                    }
                }))
                .await
            }
            Engine::Batch(processor) => {
                let gates: Vec<Gate> = gates
                    .into_iter()
                    .map(|g| g.expect("one gate per message"))
                    .collect();
                self.plan_batch(processor, batch, gates, deadline).await
            }
        };
        let mut failed = vec![false; batch.len()];

        // Dead letters first, results last: once the tally counts an item
        // failed, its copy is already in the DLQ, so a redrive can always
        // find it; and once an attempt is recorded, its retry is already
        // queued, so the gate may acknowledge a copy of its message (see
        // [`Worker::reading`]). A message whose copy, retry or result was
        // not stored comes back and runs its attempt again (counted once).
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

        let next: Vec<((String, Duration), Vec<usize>)> = (0..batch.len())
            .filter(|&i| !failed[i])
            .filter_map(|i| match &plans[i] {
                Plan::Report {
                    retry: Some(next), ..
                } => Some((next.clone(), vec![i])),
                Plan::Requeue { body, delay } => Some(((body.clone(), *delay), vec![i])),
                _ => None,
            })
            .collect();
        self.send_delayed_all(&self.work, next, &mut failed).await;

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
        let receipts = hold.renewed(batch);
        drop(hold);
        (plans, failed, receipts)
    }

    /// Reads the outcomes of the decoded messages' items, if this worker
    /// reads the ledger; `None` if the read failed.
    async fn outcomes(
        &self,
        batch: &[Delivery],
        bodies: &[Option<Result<WorkBody, DecodeError>>],
    ) -> Option<Outcomes> {
        let Some(ledger) = &self.ledger else {
            return Some(Outcomes::new());
        };
        // Only for messages that may have a copy: a dispatch's first message
        // of an item, received once, has nothing to be gated against but
        // this worker's memory, and reading for it would cost a ledger read
        // per item on the happy path.
        let mut keys: Vec<(RunId, ItemId)> = batch
            .iter()
            .zip(bodies)
            .filter_map(|(d, b)| match b {
                Some(Ok(b)) if b.may_have_a_copy(d.receive_count) => {
                    Some((b.run.clone(), b.item.clone()))
                }
                _ => None,
            })
            .collect();
        keys.sort();
        keys.dedup();
        if keys.is_empty() {
            return Some(Outcomes::new());
        }
        match ledger.items(&keys).await {
            Ok(rows) => Some(
                rows.into_iter()
                    .map(|(k, v)| {
                        let known = Known {
                            status: v.value.status,
                            attempts: v.value.attempts,
                        };
                        (k, known)
                    })
                    .collect(),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "could not read the items' outcomes; their messages go round again");
                None
            }
        }
    }

    /// Remembers what the batch's messages came to: those that settled
    /// for good (reported, sent on, or parked as malformed), the items'
    /// outcomes reported, and the outcomes that could not be reported.
    fn remember(&self, batch: &[Delivery], copy: &[bool], plans: &[Plan], failed: &[bool]) {
        for (i, d) in batch.iter().enumerate() {
            if copy[i] {
                continue;
            }
            match &plans[i] {
                Plan::Report { result, .. } => {
                    // Known here also when its report failed: a message of
                    // its attempt comes back and reports it, so no message
                    // of the item may run the attempt again meanwhile.
                    let key = (result.run.clone(), result.item.clone());
                    if failed[i] {
                        let kept =
                            self.memory
                                .unsent(key, result.attempt.attempt, plans[i].clone());
                        if !kept {
                            continue;
                        }
                    } else {
                        self.memory.settled(&d.message_id);
                    }
                    let (status, attempts) = match &result.attempt.outcome {
                        AttemptOutcome::Succeeded => {
                            (ItemStatus::Succeeded, result.attempt.attempt)
                        }
                        AttemptOutcome::Failed { terminal: true, .. } => {
                            (ItemStatus::Failed, result.attempt.attempt)
                        }
                        AttemptOutcome::Failed { .. } => {
                            (ItemStatus::Pending, result.attempt.attempt)
                        }
                        // Its attempt was not used: the next message runs it.
                        AttemptOutcome::Throttled { .. } => {
                            (ItemStatus::Pending, result.attempt.attempt - 1)
                        }
                    };
                    let known = Known { status, attempts };
                    self.memory
                        .reported((result.run.clone(), result.item.clone()), known);
                }
                Plan::Requeue { .. } | Plan::Malformed if !failed[i] => {
                    self.memory.settled(&d.message_id)
                }
                _ => {}
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

    /// [`Worker::send_all`] for messages with a delay each.
    async fn send_delayed_all(
        &self,
        queue: &Arc<dyn Queue>,
        messages: Vec<((String, Duration), Vec<usize>)>,
        failed: &mut [bool],
    ) {
        let sizes: Vec<usize> = messages.iter().map(|((b, _), _)| b.len()).collect();
        for range in send_batches(&sizes) {
            let chunk = &messages[range];
            if let Err(e) = queue
                .send_delayed(chunk.iter().map(|(m, _)| m.clone()).collect())
                .await
            {
                tracing::error!(error = %e, "could not send the next attempts; the messages will be retried");
                chunk
                    .iter()
                    .flat_map(|(_, of)| of)
                    .for_each(|&i| failed[i] = true);
            }
        }
    }

    /// Decides whether a decoded message's item gets an attempt now.
    fn gate(
        &self,
        d: &Delivery,
        body: Result<WorkBody, DecodeError>,
        deadline: Option<Instant>,
        outcomes: Option<&Outcomes>,
        hold: &mut Hold<'_>,
        later: Duration,
    ) -> Gate {
        let mut body = match body {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(message_id = %d.message_id, error = %e, "undecodable message; dead-lettering it");
                return Gate::Settled(Plan::Malformed);
            }
        };
        let key = (body.run.clone(), body.item.clone());
        if let Some(plan) = self.memory.take_unsent(&key, body.attempt()) {
            tracing::info!(run = %body.run, item = %body.item, message_id = %d.message_id,
                "its attempt's report failed; reporting it again");
            return Gate::Settled(plan);
        }
        let known = match (
            outcomes.map(|o| o.get(&key).copied()),
            self.memory.known(&key),
        ) {
            (Some(Some(a)), Some(b)) => Some(a.merge(b)),
            (Some(a), b) => a.or(b),
            // The ledger could not say: the message goes round again, its
            // attempt unused, rather than risk running a settled item.
            (None, None) => {
                return Gate::Settled(Self::requeue(&body, self.config.retry_delay));
            }
            (None, b) => b,
        };
        if let Some(known) = known {
            match known.status {
                ItemStatus::Succeeded => {
                    tracing::info!(run = %body.run, item = %body.item, message_id = %d.message_id,
                        "the item already succeeded; acknowledged");
                    return Gate::Settled(Plan::Settled);
                }
                // A redrive's message runs the next attempt after the
                // recorded ones (a duplicate chain may have gone further
                // than the dead letter it was sent from).
                ItemStatus::Failed if body.redrive.is_some() => {
                    if body.prior_attempts == body.round {
                        body.prior_attempts = body.prior_attempts.max(known.attempts);
                        body.round = body.prior_attempts;
                    }
                }
                ItemStatus::Failed => {
                    tracing::info!(run = %body.run, item = %body.item, message_id = %d.message_id,
                        "the item already failed for good; acknowledged (a redrive runs it again)");
                    return Gate::Settled(Plan::Settled);
                }
                ItemStatus::Pending if known.attempts >= body.attempt() => {
                    tracing::info!(run = %body.run, item = %body.item, message_id = %d.message_id,
                        attempt = body.attempt(), "this attempt is already recorded; acknowledged");
                    return Gate::Settled(Plan::Settled);
                }
                ItemStatus::Pending => {}
            }
        }
        // A dispatch that resumed may have sent this item twice: with no
        // attempt known, the first message goes first.
        if body.resent {
            tracing::info!(run = %body.run, item = %body.item, message_id = %d.message_id,
                "sent again by a resumed dispatch with no outcome known; waiting for a copy");
            body.resent = false;
            return Gate::Settled(Self::requeue(&body, self.result_lag(later)));
        }
        // Receives of this attempt that ended with no outcome known: a
        // worker that died on it, a copy that ran into a stall, a receive
        // whose answer was lost on the way (an SDK retry of a receive that
        // had taken effect). Twice the queue's limit of them means the
        // attempt kills its worker (a poison message): it is recorded as
        // failed for good rather than run again.
        let limit = self.receive_limit(&body);
        let lost = body.lost_receives.saturating_add(d.receive_count - 1);
        let exhausted = lost >= 2 * limit;
        if !exhausted && d.receive_count > 1 {
            // Before the queue would park the message by itself,
            // unrecorded, the attempt goes on in a fresh message that
            // carries the count.
            if d.receive_count + 1 >= limit {
                tracing::info!(run = %body.run, item = %body.item, message_id = %d.message_id,
                    lost, "near the queue's receive limit with no outcome known; sent on afresh");
                body.lost_receives = lost;
                return Gate::Settled(Self::requeue(&body, self.result_lag(later)));
            }
            // Delivered again, and neither this worker nor the ledger knows
            // of its attempt: its holder may still be on it (in another
            // process), or have reported just before it died, the result
            // not yet reduced. Waiting once lets the ledger catch up, so
            // that the copy is then acknowledged instead of run again.
            if d.receive_count == 2 {
                tracing::info!(run = %body.run, item = %body.item, message_id = %d.message_id,
                    "delivered again with no outcome known; waiting for it");
                return Gate::Settled(Plan::Retry {
                    delay: self.result_lag(later),
                });
            }
        }
        if !self.memory.take_item(hold, &key, &d.message_id) {
            tracing::info!(run = %body.run, item = %body.item, message_id = %d.message_id,
                "another message of this item is in hand; handed back");
            return Gate::Settled(Plan::Retry { delay: later });
        }
        let attempt = body.attempt();
        let span = tracing::info_span!("item", run = %body.run, item = %body.item,
            message_id = %d.message_id, attempt);
        if let Some(deadline) = deadline {
            if deadline.saturating_duration_since(Instant::now()) < self.config.deadline_margin {
                span.in_scope(|| tracing::info!("not started: the invocation is about to end"));
                return Gate::Settled(Self::requeue(&body, Duration::ZERO));
            }
        }
        if let Some(at) = body.not_before {
            let now = now_millis();
            if at > now {
                return Gate::Settled(Self::requeue(&body, Duration::from_millis(at - now)));
            }
        }
        Gate::Ready(Ready {
            body,
            attempt,
            span,
            exhausted,
        })
    }

    /// The work queue's receive limit for `body`'s run.
    fn receive_limit(&self, body: &WorkBody) -> u32 {
        self.config
            .receive_limit
            .unwrap_or(body.max_receives.saturating_add(EXTRA_RECEIVES))
            .max(1)
    }

    /// How long a message with no outcome known waits once.
    fn result_lag(&self, later: Duration) -> Duration {
        self.config.result_lag.unwrap_or(later).max(later)
    }

    /// The message that carries `body`'s item on after `delay`, its
    /// attempts unchanged; a delay longer than a queue allows is reached in
    /// steps ([`WorkBody::not_before`]).
    fn requeue(body: &WorkBody, delay: Duration) -> Plan {
        let mut next = body.clone();
        next.requeued = true;
        if delay > MAX_SEND_DELAY {
            next.not_before = Some(now_millis() + delay.as_millis() as u64);
        }
        Plan::Requeue {
            body: next.encode(),
            delay: delay.min(MAX_SEND_DELAY),
        }
    }

    fn no_outcome(body: &WorkBody, d: &Delivery) -> ProcessError {
        ProcessError::retryable(format!(
            "no outcome after {} receives (the worker crashed or timed out)",
            body.lost_receives + d.receive_count.saturating_sub(1)
        ))
    }

    async fn plan(
        &self,
        processor: &Arc<dyn Processor>,
        d: &Delivery,
        ready: Ready,
        deadline: Option<Instant>,
    ) -> Plan {
        let span = ready.span.clone();
        async {
            // The run's (and the key's) flow control first, holding
            // nothing: an item that would wait long goes round again. Off
            // the path (and out of this future, boxed) where not needed.
            let admitted = !ready.exhausted
                && self
                    .limiter
                    .needed(ready.body.key.as_deref(), &self.limits(&ready.body));
            let ticket = if !admitted {
                None
            } else {
                let limits = self.limits(&ready.body);
                match Box::pin(self.admit(&ready.body, &limits, deadline)).await {
                    Ok(ticket) => Some(Box::new(ticket)),
                    Err(after) => {
                        tracing::debug!(
                            after_ms = after.as_millis() as u64,
                            "held back by flow control"
                        );
                        return Self::requeue(&ready.body, after);
                    }
                }
            };
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
                    if let Some(ticket) = ticket {
                        self.limiter.done(*ticket, Signal::NotRun, Duration::ZERO);
                    }
                    return Self::requeue(&ready.body, Duration::ZERO);
                }
            }
            let started_at = now_millis();
            let clock = Instant::now();
            let (outcome, log) = if ready.exhausted {
                (Err(Self::no_outcome(&ready.body, d)), None)
            } else {
                self.run_processor(processor, &ready.body, ready.attempt, deadline)
                    .await
            };
            let signal = match &outcome {
                Err(e) if e.kind == ErrorKind::Throttled => Signal::Throttled(e.retry_after),
                _ => Signal::Answered,
            };
            match (ticket, signal) {
                (Some(ticket), signal) => self.limiter.done(*ticket, signal, clock.elapsed()),
                (None, Signal::Throttled(after)) if !ready.exhausted => {
                    let (key, limits) = (ready.body.key.as_deref(), self.limits(&ready.body));
                    self.limiter.throttled(&ready.body.run, key, &limits, after);
                }
                _ => {}
            }
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
        gates: Vec<Gate>,
        deadline: Option<Instant>,
    ) -> Vec<Plan> {
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
                        (Err(Self::no_outcome(&ready.body, d)), None)
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
        let last = body.last_of_round() || ready.exhausted;
        let mut output = None;
        let mut retry_at = None;
        let (outcome, dead_letter, retry) = match outcome {
            // Not a failure: the item goes round again with the same
            // attempt, once the service is likely to take it.
            Err(e) if e.kind == ErrorKind::Throttled => {
                let nth = body.throttled.saturating_add(1);
                let delay = e.retry_after.unwrap_or(DEFAULT_PAUSE).min(MAX_VISIBILITY);
                tracing::info!(error = %e.message, nth, delay_ms = delay.as_millis() as u64, "throttled; will try again");
                let next = WorkBody {
                    throttled: nth,
                    lost_receives: 0,
                    not_before: None,
                    ..body.clone()
                };
                retry_at = Some(now_millis() + delay.as_millis() as u64);
                let retry = match Self::requeue(&next, delay) {
                    Plan::Requeue { body, delay } => (body, delay),
                    _ => unreachable!("requeue plans a requeue"),
                };
                (AttemptOutcome::Throttled { nth }, None, Some(retry))
            }
            Ok(out) => {
                tracing::info!(duration_ms, "succeeded");
                output = out;
                (AttemptOutcome::Succeeded, None, None)
            }
            Err(mut e) => {
                let terminal = e.kind == ErrorKind::Permanent || last;
                // A processor's hint (an idempotency claim that another
                // attempt holds until its deadline, a rate limit's
                // Retry-After) can only lengthen the delay.
                let mut delay = self.retry_delay(attempt);
                if let Some(after) = e.retry_after.filter(|_| !terminal) {
                    if after > MAX_VISIBILITY {
                        cap_warning(after);
                        e.message = format!(
                            "{} (retry-after {} s capped at {} s)",
                            e.message,
                            after.as_secs(),
                            MAX_VISIBILITY.as_secs()
                        );
                    }
                    delay = delay.max(after.min(MAX_VISIBILITY));
                }
                e.message = bounded_error(e.message);
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
                        not_before: None,
                        ..body.clone()
                    }
                    .encode()
                });
                if !terminal {
                    retry_at = Some(now_millis() + delay.as_millis() as u64);
                }
                let retry = (!terminal).then(|| {
                    let next = WorkBody {
                        prior_attempts: attempt,
                        lost_receives: 0,
                        not_before: None,
                        ..body.clone()
                    };
                    match Self::requeue(&next, delay) {
                        Plan::Requeue { body, delay } => (body, delay),
                        _ => unreachable!("requeue plans a requeue"),
                    }
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
                    retry_at,
                    throttled: body.throttled,
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
        ctx.throttled = body.throttled;
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

    /// The delay before the attempt after `attempt`.
    fn retry_delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(16);
        let base = self.config.retry_delay.saturating_mul(1 << exp);
        let capped = base.min(self.config.max_retry_delay);
        // Up to 25% jitter, so a burst of failures does not retry in lockstep.
        capped + capped.mul_f64(fastrand::f64() * 0.25)
    }
}

/// Says once per process that a processor asked for a retry later than
/// [`MAX_VISIBILITY`]; each such attempt's error says it too.
fn cap_warning(after: Duration) {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            "a processor asked to retry after {} s; retries are put off by at most {} s (12 h)",
            after.as_secs(),
            MAX_VISIBILITY.as_secs()
        );
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
            AttemptOutcome::Throttled { .. } => c.throttled += 1,
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
        .map(|d| {
            response
                .receipts
                .get(&d.message_id)
                .unwrap_or(&d.receipt)
                .clone()
        })
        .collect();
    let calls = done
        .chunks(MAX_QUEUE_BATCH)
        .map(|c| queue.delete(c.to_vec()));
    for r in futures::future::join_all(calls).await {
        r?;
    }
    Ok(done.len())
}
