//! A backend as the stages, the runner, the CLI and the Lambda functions see
//! it: its queues and stores behind the ports. Each backend crate
//! (`settle-embedded`, `settle-aws`) builds one of these.

use crate::domain::idempotency::IdempotencyStore;
use crate::domain::ports::{Ledger, Queue, Source};
use std::sync::Arc;

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
}
