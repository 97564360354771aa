//! The local runner: plays the Lambda event source mapping over any
//! backend's queues. Pollers receive batches from the work queue and call
//! the same [`Worker`] the Lambda worker calls, then delete what succeeded
//! and leave reported failures for redelivery; reducer pollers do the same
//! with the results queue and [`reduce`].

use crate::domain::ports::{Delivery, Ledger, PortError, Queue, MAX_QUEUE_BATCH};
use crate::stages::reduce::reduce;
use crate::stages::work::{delete_done, Worker};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How the runner polls.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Worker batches processed at once (the event source's MaximumConcurrency).
    pub concurrency: usize,
    /// Messages per worker batch, 1 to 10.
    pub batch_size: usize,
    /// Visibility timeout of a received work message.
    pub visibility: Duration,
    /// Visibility timeout of a received results message: a reducer batch
    /// that takes longer is delivered again and applied twice (exact, but
    /// paid twice). The event source mapping uses the queue's own setting.
    pub results_visibility: Duration,
    /// Reducer pollers.
    pub reducers: usize,
    /// Results messages per reducer batch (filled by several receives of up
    /// to 10). Each message holds up to a worker batch of results, so 9
    /// messages fill about one ledger commit of 100 actions.
    pub reducer_batch: usize,
    /// How long a reducer batch may wait to fill once its first message
    /// arrived: the event source mapping's MaximumBatchingWindowInSeconds.
    /// Zero reduces whatever the first receives return.
    pub reducer_window: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            batch_size: MAX_QUEUE_BATCH,
            visibility: Duration::from_secs(30),
            results_visibility: Duration::from_secs(30),
            reducers: 8,
            reducer_batch: 9,
            reducer_window: Duration::ZERO,
        }
    }
}

/// Counters the runner keeps, for progress and for tests.
#[derive(Debug, Default)]
pub struct RunnerStats {
    pub work_received: AtomicU64,
    pub work_retried: AtomicU64,
    pub results_applied: AtomicU64,
    pub results_duplicate: AtomicU64,
    pub poll_errors: AtomicU64,
}

/// The queues and code a runner drives.
#[derive(Debug, Clone)]
pub struct Runner {
    pub worker: Arc<Worker>,
    pub work: Arc<dyn Queue>,
    pub results: Arc<dyn Queue>,
    pub ledger: Arc<dyn Ledger>,
    pub config: RunnerConfig,
    pub stats: Arc<RunnerStats>,
}

/// Why the runner stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("polling failed {0} times in a row; last error: {1}")]
    Polling(u32, PortError),
    #[error("a poller task failed: {0}")]
    Task(String),
}

/// A batch's delete, run while the poller goes on (see [`Runner::poll`]).
type Tail = futures::future::BoxFuture<'static, Result<(), PortError>>;

/// Consecutive poll errors after which the runner gives up.
const MAX_POLL_ERRORS: u32 = 20;
const IDLE_MIN: Duration = Duration::from_millis(2);
const IDLE_MAX: Duration = Duration::from_millis(100);

impl Runner {
    /// Polls until `stop` turns true, then lets in-flight batches finish.
    pub async fn run(&self, mut stop: watch::Receiver<bool>) -> Result<(), RunnerError> {
        let mut tasks = JoinSet::new();
        for _ in 0..self.config.concurrency.max(1) {
            let me = self.clone();
            let stop = stop.clone();
            tasks.spawn(async move { me.poll_work(stop).await });
        }
        for _ in 0..self.config.reducers.max(1) {
            let me = self.clone();
            let stop = stop.clone();
            tasks.spawn(async move { me.poll_results(stop).await });
        }
        let mut result = Ok(());
        loop {
            tokio::select! {
                // Biased (polled in order), here and below: tokio's random
                // branch order would make a simulation's replay differ.
                biased;
                joined = tasks.join_next() => match joined {
                    None => break,
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(e))) => { result = result.and(Err(e)); let _ = stop.borrow_and_update(); tasks.abort_all(); }
                    Some(Err(e)) if e.is_cancelled() => {}
                    Some(Err(e)) => { result = result.and(Err(RunnerError::Task(e.to_string()))); tasks.abort_all(); }
                },
            }
        }
        result
    }

    async fn poll_work(&self, stop: watch::Receiver<bool>) -> Result<(), RunnerError> {
        let size = self.config.batch_size.clamp(1, MAX_QUEUE_BATCH);
        self.poll(stop, |me| async move {
            let batch = me.work.receive(size, me.config.visibility).await?;
            if batch.is_empty() {
                return Ok(None);
            }
            me.stats
                .work_received
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            let response = me.worker.handle(&batch, None).await;
            me.stats
                .work_retried
                .fetch_add(response.failures.len() as u64, Ordering::Relaxed);
            let delete: Tail = Box::pin(async move {
                me.worker.acknowledge(&batch, &response).await?;
                Ok(())
            });
            Ok(Some(delete))
        })
        .await
    }

    async fn poll_results(&self, stop: watch::Receiver<bool>) -> Result<(), RunnerError> {
        self.poll(stop, |me| async move {
            let batch = me.fill_results_batch().await?;
            if batch.is_empty() {
                return Ok(None);
            }
            let report = reduce(me.ledger.as_ref(), &batch).await;
            me.stats
                .results_applied
                .fetch_add(report.applied as u64, Ordering::Relaxed);
            me.stats
                .results_duplicate
                .fetch_add(report.duplicates as u64, Ordering::Relaxed);
            let delete: Tail = Box::pin(async move {
                delete_done(me.results.as_ref(), &batch, &report.response).await?;
                Ok(())
            });
            Ok(Some(delete))
        })
        .await
    }

    /// Receives up to `reducer_batch` results, as an event source with a
    /// batch size above 10 does; past the first receive, the receives of 10
    /// run concurrently, since each is a round trip.
    async fn fill_results_batch(&self) -> Result<Vec<Delivery>, PortError> {
        // One receive first: only a full one suggests a backlog worth the
        // concurrent receives (each is a round trip, and empty ones add up).
        let mut batch = self
            .results
            .receive(
                MAX_QUEUE_BATCH.min(self.config.reducer_batch),
                self.config.results_visibility,
            )
            .await?;
        if !batch.is_empty() && !self.config.reducer_window.is_zero() {
            // The batching window: keep gathering until the batch is full or
            // the window closes, as the event source mapping does. Fuller
            // batches mean fewer ledger commits.
            let closes = tokio::time::Instant::now() + self.config.reducer_window;
            while batch.len() < self.config.reducer_batch {
                let left = closes.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                let want = (self.config.reducer_batch - batch.len()).min(MAX_QUEUE_BATCH);
                match self
                    .results
                    .receive(want, self.config.results_visibility)
                    .await
                {
                    Ok(got) if got.is_empty() => {
                        tokio::time::sleep(left.min(Duration::from_millis(50))).await
                    }
                    Ok(got) => batch.extend(got),
                    Err(e) => {
                        tracing::warn!(error = %e, "receive failed; reducing what arrived");
                        break;
                    }
                }
            }
            return Ok(batch);
        }
        if batch.len() < MAX_QUEUE_BATCH || self.config.reducer_batch <= MAX_QUEUE_BATCH {
            return Ok(batch);
        }
        let calls = (self.config.reducer_batch - MAX_QUEUE_BATCH).div_ceil(MAX_QUEUE_BATCH);
        let got = futures::future::join_all((0..calls).map(|_| {
            self.results
                .receive(MAX_QUEUE_BATCH, self.config.results_visibility)
        }))
        .await;
        for r in got {
            match r {
                Ok(d) => batch.extend(d),
                // What arrived stays hidden until its timeout: reduce it rather than waste it.
                Err(e) => tracing::warn!(error = %e, "receive failed; reducing what arrived"),
            }
        }
        Ok(batch)
    }

    /// Runs `step` until `stop`; backs off while idle, gives up after many
    /// consecutive errors. A step that got work returns its batch's delete,
    /// which runs while the next step receives and processes: the event
    /// source mapping, too, deletes after the handler has returned. Nothing
    /// waits on a delete but the poller's next delete, so this saves a round
    /// trip per batch; a delete lost to a crash means a redelivery, which
    /// at-least-once delivery allows and the reducer counts once.
    async fn poll<F, Fut>(
        &self,
        mut stop: watch::Receiver<bool>,
        step: F,
    ) -> Result<(), RunnerError>
    where
        F: Fn(Runner) -> Fut,
        Fut: std::future::Future<Output = Result<Option<Tail>, PortError>>,
    {
        let mut idle = IDLE_MIN;
        let mut errors = 0;
        let mut tail: Option<Tail> = None;
        let failed = |e: PortError, errors: &mut u32| {
            *errors += 1;
            self.stats.poll_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, errors = *errors, "poll failed");
            (*errors >= MAX_POLL_ERRORS).then(|| RunnerError::Polling(*errors, e))
        };
        while !*stop.borrow_and_update() {
            let previous = async {
                match tail.take() {
                    Some(t) => t.await,
                    None => Ok(()),
                }
            };
            let (stepped, deleted) = futures::join!(step(self.clone()), previous);
            let deleted = match deleted {
                Ok(()) => true,
                Err(e) => match failed(e, &mut errors) {
                    Some(fatal) => return Err(fatal),
                    None => false,
                },
            };
            match stepped {
                Ok(Some(delete)) => {
                    tail = Some(delete);
                    idle = IDLE_MIN;
                    if deleted {
                        errors = 0;
                    }
                    continue;
                }
                Ok(None) if deleted => errors = 0,
                Ok(None) => {}
                Err(e) => {
                    if let Some(fatal) = failed(e, &mut errors) {
                        return Err(fatal);
                    }
                }
            }
            tokio::select! {
                biased;
                _ = tokio::time::sleep(idle) => {}
                _ = stop.changed() => {}
            }
            idle = (idle * 2).min(IDLE_MAX);
        }
        if let Some(t) = tail {
            if let Err(e) = t.await {
                self.stats.poll_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "delete failed");
            }
        }
        Ok(())
    }
}
