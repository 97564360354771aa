//! The worker function: an SQS batch of work messages in, a partial batch
//! response out. The core's [`Worker`] does the work and keeps every
//! message on its own: an error, a panic, a timeout or an undecodable body
//! affects only its message, and items not started before the deadline are
//! handed back for retry. Its per-item span carries run id, item id,
//! message id and attempt; this adapter adds only what precedes it.

use crate::records::{batch_response, deliveries, UnidentifiedRecord};
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use settle_core::domain::now_millis;
use settle_core::work::{Worker, WorkerConfig};
use settle_core::{Backend, BatchProcessor, Processor};
use std::sync::Arc;
use tokio::time::Instant;

/// The worker's handler, built once at cold start.
#[derive(Debug)]
pub struct WorkerFunction {
    worker: Worker,
    /// The metrics' dimension: Lambda's name for this function.
    name: String,
}

fn function_name() -> String {
    std::env::var(crate::self_invoke::FUNCTION_NAME_VAR).unwrap_or_else(|_| "worker".into())
}

impl WorkerFunction {
    pub fn new(backend: &Backend, processor: Arc<dyn Processor>, config: WorkerConfig) -> Self {
        Self {
            worker: Worker::new(
                processor,
                backend.work.clone(),
                backend.dlq.clone(),
                backend.results.clone(),
                config,
            )
            .reading(backend.ledger.clone()),
            name: function_name(),
        }
    }

    /// A worker whose processor takes each batch in one call (the user's
    /// own Lambda function: [`crate::function`]).
    pub fn batched(
        backend: &Backend,
        processor: Arc<dyn BatchProcessor>,
        config: WorkerConfig,
    ) -> Self {
        Self {
            worker: Worker::batched(
                processor,
                backend.work.clone(),
                backend.dlq.clone(),
                backend.results.clone(),
                config,
            )
            .reading(backend.ledger.clone()),
            name: function_name(),
        }
    }

    /// Handles one invocation. `deadline` is when the invocation ends.
    ///
    /// Only a record without a message id fails the whole event (Lambda
    /// could not be told which one to return); see [`UnidentifiedRecord`].
    pub async fn handle(
        &self,
        event: SqsEvent,
        deadline: Option<Instant>,
    ) -> Result<SqsBatchResponse, UnidentifiedRecord> {
        let records = deliveries(event)?;
        let core = self.worker.handle(&records.deliveries, deadline).await;
        // CloudWatch Logs reads these lines as metrics (crate::metrics).
        for line in crate::metrics::emf_lines(&self.name, &core.runs, now_millis()) {
            println!("{line}");
        }
        let retried = core.failures.len() + records.rejected.len();
        tracing::info!(
            messages = records.deliveries.len() + records.rejected.len(),
            retried,
            "work batch handled"
        );
        Ok(batch_response(core, records.rejected))
    }
}
