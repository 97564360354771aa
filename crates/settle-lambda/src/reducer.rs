//! The reducer function: an SQS batch of results in, the ledger updated
//! (item rows plus one tally write per run per commit), and a partial batch
//! response naming the results to deliver again. The core's `reduce` logs
//! the run's summary line when the batch settles it.

use crate::records::{batch_response, deliveries, UnidentifiedRecord};
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use settle_core::reduce::reduce;
use settle_core::{Backend, Ledger};
use std::sync::Arc;

/// The reducer's handler, built once at cold start.
#[derive(Debug)]
pub struct ReducerFunction {
    ledger: Arc<dyn Ledger>,
}

impl ReducerFunction {
    pub fn new(backend: &Backend) -> Self {
        Self {
            ledger: backend.ledger.clone(),
        }
    }

    pub async fn handle(&self, event: SqsEvent) -> Result<SqsBatchResponse, UnidentifiedRecord> {
        let records = deliveries(event)?;
        let report = reduce(self.ledger.as_ref(), &records.deliveries).await;
        tracing::info!(
            results = records.deliveries.len() + records.rejected.len(),
            applied = report.applied,
            duplicates = report.duplicates,
            retried = report.response.failures.len() + records.rejected.len(),
            settled_runs = report.settled.len(),
            "results batch reduced"
        );
        Ok(batch_response(report.response, records.rejected))
    }
}
