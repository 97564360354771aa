//! A backend as the stages, the runner, the CLI and the Lambda functions see
//! it: its queues and stores behind the ports. Each backend crate
//! (`settle-embedded`, `settle-aws`) builds one of these.

use crate::domain::idempotency::IdempotencyStore;
use crate::domain::ports::{Ledger, Queue, Source};
use std::sync::Arc;
use std::time::Duration;

/// The queues and stores of one deployment (a database file, or an AWS stack).
#[derive(Debug, Clone)]
pub struct Backend {
    /// Work messages, one per item and attempt.
    pub work: Arc<dyn Queue>,
    /// The work queue's dead-letter queue: what `redrive` moves back.
    pub dlq: Arc<dyn Queue>,
    /// Results, from the workers to the reducer.
    pub results: Arc<dyn Queue>,
    /// Where the results queue parks a result that no reducer could apply.
    pub results_dlq: Arc<dyn Queue>,
    pub source: Arc<dyn Source>,
    pub ledger: Arc<dyn Ledger>,
    /// Idempotency records of processors' side effects (see
    /// [`crate::domain::idempotency::Idempotency`]), kept beside the ledger.
    pub idempotency: Arc<dyn IdempotencyStore>,
    /// What code that serves every backend tunes to this one.
    pub capabilities: Capabilities,
}

/// Values a backend reports about its queues and stores, so that the CLI
/// and the local runner read them instead of asking which backend they
/// have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// How long the queues may look empty while items are still pending
    /// before a run is called stalled: at least as long as the queues'
    /// counts may lag behind.
    pub stall_after: Duration,
    /// The least time the local runner's reducers hide the results they
    /// took; the work visibility is used when it is longer.
    pub min_results_visibility: Duration,
    /// The local runner's reducer batching window: how long a reducer
    /// waits to fill a batch before it commits.
    pub reducer_window: Duration,
    /// The work queue's maxReceiveCount when the backend cannot change it
    /// for a run: a run's `max_receives` must stay below it. `None` when
    /// the backend sets it for each run, or does not know it.
    pub fixed_max_receive_count: Option<u32>,
    /// Whether a whole scan of the DLQ is cheap enough to make after every
    /// `resume`, to delete the extra dead letters an interruption can leave.
    /// Not on SQS: its DLQ keeps every run's failures for days, and each
    /// message scanned is a billed receive and a billed release; there the
    /// next redrive deletes the extra copies.
    pub cheap_dlq_scan: bool,
}
