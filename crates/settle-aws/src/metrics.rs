//! API call counting for the cost report: an SDK interceptor that counts
//! every request sent, per operation, and the DynamoDB capacity that the
//! backend asked the service to report.

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Counters shared by the clients of one [`crate::AwsBackend`].
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    calls: Arc<Mutex<BTreeMap<String, u64>>>,
    capacity: Arc<Mutex<BTreeMap<String, f64>>>,
}

impl Metrics {
    /// Requests sent per operation ("SQS.SendMessageBatch"), retries included:
    /// AWS bills every request it receives.
    pub fn call_counts(&self) -> BTreeMap<String, u64> {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// DynamoDB capacity units (reads and writes) per operation, as reported
    /// by the service for the calls that asked for it.
    pub fn consumed_capacity(&self) -> BTreeMap<String, f64> {
        self.capacity
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn add_capacity(&self, op: &str, units: f64) {
        if units > 0.0 {
            *self
                .capacity
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(op.to_owned())
                .or_default() += units;
        }
    }

    /// The interceptor to install on an SDK client.
    pub(crate) fn interceptor(&self) -> CallCounter {
        CallCounter {
            calls: self.calls.clone(),
        }
    }
}

/// Counts each request as it is about to be sent: once per attempt, so a
/// retried call counts as often as AWS bills it.
#[derive(Debug)]
pub(crate) struct CallCounter {
    calls: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Intercept for CallCounter {
    fn name(&self) -> &'static str {
        "SettleCallCounter"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let op = match cfg.load::<Metadata>() {
            Some(m) => format!("{}.{}", m.service(), m.name()),
            None => "unknown".to_owned(),
        };
        *self
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(op)
            .or_default() += 1;
        Ok(())
    }
}
