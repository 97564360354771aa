//! The work stage: one batch of work-queue messages in, a partial batch
//! response out. Each message settles on its own: a processor error, a
//! panic, a timeout or an undecodable body affects only that message.

use crate::domain::ports::{send_batches, Delivery, PortError, Queue, MAX_QUEUE_BATCH};
use crate::domain::processor::{AttemptContext, Processor};
use crate::domain::{
    bounded_error, now_millis, Attempt, AttemptOutcome, ErrorKind, Output, ProcessError,
    MAX_OUTPUT_BYTES,
};
use crate::wire::message::{pack_results, DeadLetter, ResultBody, WorkBody};
use futures::FutureExt;
use std::cell::Cell;
use std::collections::{HashSet, VecDeque};
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
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            retry_delay: Duration::from_secs(1),
            max_retry_delay: MAX_RETRY_DELAY,
            item_timeout: None,
            deadline_margin: Duration::from_secs(2),
            visibility: None,
        }
    }
}

/// Which messages of a batch must be delivered again (SQS partial batch
/// response); every other message is done and may be deleted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchResponse {
    pub failures: Vec<String>,
}

/// The worker: decodes, processes and reports each message of a batch.
pub struct Worker {
    processor: Arc<dyn Processor>,
    work: Arc<dyn Queue>,
    dlq: Arc<dyn Queue>,
    results: Arc<dyn Queue>,
    config: WorkerConfig,
    seen: Mutex<Seen>,
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

/// What became of one message, before anything is sent.
#[derive(Debug)]
enum Plan {
    /// Nothing to report (never started): deliver again.
    Retry { delay: Duration },
    /// Report the result; then retry after `retry` if set, else the message is done.
    Report {
        result: ResultBody,
        dead_letter: Option<String>,
        retry: Option<Duration>,
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
        Self {
            processor,
            work,
            dlq,
            results,
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
        let plans = futures::future::join_all(batch.iter().zip(known).map(|(d, known)| async {
            match known {
                Some(plan) => plan,
                None => self.plan(d, deadline).await,
            }
        }))
        .await;
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
        // The copy of a held message comes back once the holder is done
        // (its attempt is bounded by the item timeout, its report by a
        // visibility timeout): then it is settled (and acknowledged) or due
        // for its retry.
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

    async fn plan(&self, d: &Delivery, deadline: Option<Instant>) -> Plan {
        let body = match WorkBody::decode(&d.body) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(message_id = %d.message_id, error = %e, "undecodable message; dead-lettering it");
                return Plan::Malformed;
            }
        };
        let attempt = body.prior_attempts + d.receive_count;
        let span = tracing::info_span!("item", run = %body.run, item = %body.item,
            message_id = %d.message_id, attempt);
        async {
            if let Some(deadline) = deadline {
                if deadline.saturating_duration_since(Instant::now()) < self.config.deadline_margin {
                    tracing::info!("not started: the invocation is about to end");
                    return Plan::Retry {
                        delay: Duration::ZERO,
                    };
                }
            }
            let started_at = now_millis();
            let clock = Instant::now();
            // A receive past the limit means the last attempt never reported
            // (a crash or a kill); record that as terminal rather than run again.
            let (outcome, log) = if d.receive_count > body.max_receives {
                let e = ProcessError::retryable(format!(
                    "no outcome after {} receives (the worker crashed or timed out)",
                    body.max_receives
                ));
                (Err(e), None)
            } else {
                self.run_processor(&body, attempt, deadline).await
            };
            let outcome = outcome.and_then(|output| match output {
                Some(o) if o.get().len() > MAX_OUTPUT_BYTES => Err(ProcessError::permanent(format!(
                    "the output is {} bytes; an item's output may be at most {MAX_OUTPUT_BYTES}",
                    o.get().len()
                ))),
                // JSON null reads back as no output: say so from the start.
                Some(o) if o.get() == "null" => Ok(None),
                other => Ok(other),
            });
            let duration_ms = clock.elapsed().as_millis() as u64;
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
                result: ResultBody {
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
                },
                dead_letter,
                retry,
            }
        }
        .instrument(span)
        .await
    }

    /// Runs the processor on one item; returns its outcome and the log the
    /// attempt wrote (also when it timed out or panicked).
    async fn run_processor(
        &self,
        body: &WorkBody,
        attempt: u32,
        deadline: Option<Instant>,
    ) -> (Result<Option<Output>, ProcessError>, Option<String>) {
        let item = body.item();
        let mut ctx = AttemptContext::new(body.run.clone(), &item, attempt);
        // The attempt is cut off at the item timeout; the invocation ends at
        // `deadline` (by then Lambda has stopped the process).
        let timeout_at = self.config.item_timeout.map(|t| Instant::now() + t);
        ctx.deadline = match (timeout_at, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let ctx = Arc::new(ctx);
        let processor = self.processor.clone();
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
        let res = res.unwrap_or_else(|panic| {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_owned());
            Err(ProcessError::retryable(format!("panic: {msg}")))
        });
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
