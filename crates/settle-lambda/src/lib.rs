//! Settle's three AWS Lambda functions as a library: thin adapters from
//! Lambda events (`aws_lambda_events`) to the core stages over any
//! [`settle_core::Backend`]. The binaries in `src/bin` only read their
//! configuration, connect the AWS backend once at cold start and hand each
//! invocation to one of these handlers; the tests drive the same handlers
//! on the embedded backend with the fixtures in `infra/events/`.

pub mod dispatcher;
pub mod function;
pub mod metrics;
pub mod records;
pub mod reducer;
pub mod run;
pub mod secret;
pub mod self_invoke;
pub mod settings;
pub mod telemetry;
pub mod worker;

pub use dispatcher::{
    Continuation, DispatchError, DispatchOutcome, DispatchRequest, DispatchSummary,
    DispatcherFunction,
};
pub use reducer::ReducerFunction;
pub use run::{run_stock_worker, run_worker};
pub use settings::{
    DispatcherSettings, ProcessorSettings, SecretSource, SettingsError, WorkerSettings,
};
pub use worker::WorkerFunction;

use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// What a worker binary's `main` returns.
pub use lambda_runtime::Error;

/// The Lambda event types the handlers take, re-exported for the binaries.
pub use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};

/// A deadline this far in the past is not a real one: Lambda never hands
/// out an invocation that ended a day ago.
const IMPLAUSIBLY_PAST: Duration = Duration::from_secs(86_400);

/// The invocation's deadline from the Lambda context's `deadline` (epoch
/// milliseconds, from the `Lambda-Runtime-Deadline-Ms` header), or `None`
/// when it cannot be a real one. `cargo lambda watch` sends the function's
/// timeout there (600000, i.e. 1970), which would make every item look
/// out of time; without a deadline the worker still bounds each item by its
/// timeout, and the dispatcher runs until done.
pub fn invocation_deadline(deadline_ms: u64) -> Option<SystemTime> {
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(deadline_ms);
    if at + IMPLAUSIBLY_PAST < SystemTime::now() {
        tracing::warn!(
            deadline_ms,
            "the runtime's deadline is not an epoch time in reach; running without one"
        );
        return None;
    }
    Some(at)
}

/// Converts the invocation's wall-clock deadline into the monotonic instant
/// the core stages take.
pub fn deadline_instant(deadline: SystemTime) -> Instant {
    let left = deadline
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Instant::now() + left
}

/// Cold-start steps: logs a failure as one JSON line (what failed, and why)
/// and returns it as the error that ends the process, so Lambda reports an
/// init error instead of starting a function that cannot work.
pub fn cold_start<T, E: std::fmt::Display>(
    step: &'static str,
    result: Result<T, E>,
) -> Result<T, lambda_runtime::Error> {
    result.map_err(|e| {
        tracing::error!(step, error = %e, "cold start failed");
        format!("cold start failed: {step}: {e}").into()
    })
}

/// What Lambda records as a failed invocation's error: a stable type name
/// per variant and the error's full message (which names what and where;
/// never a payload). The messages already include their sources.
fn diagnostic(error_type: &str, error: &dyn std::error::Error) -> lambda_runtime::Diagnostic {
    lambda_runtime::Diagnostic {
        error_type: error_type.to_owned(),
        error_message: error.to_string(),
    }
}

impl From<records::UnidentifiedRecord> for lambda_runtime::Diagnostic {
    fn from(e: records::UnidentifiedRecord) -> Self {
        diagnostic("Settle.UnidentifiedRecord", &e)
    }
}

impl From<DispatchError> for lambda_runtime::Diagnostic {
    fn from(e: DispatchError) -> Self {
        let kind = match &e {
            DispatchError::BadRequest(_) => "Settle.BadRequest",
            DispatchError::MaxReceives { .. } | DispatchError::NoRedrivePolicy { .. } => {
                "Settle.BadConfig"
            }
            DispatchError::UnknownRun(_) => "Settle.UnknownRun",
            DispatchError::TooLittleTime { .. } => "Settle.TooLittleTime",
            DispatchError::Port { .. } | DispatchError::Dispatch { .. } => "Settle.Backend",
            DispatchError::Continue { .. } => "Settle.Continue",
        };
        diagnostic(kind, &e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_deadlines_are_kept_and_implausible_ones_dropped() {
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        let soon = invocation_deadline(now_ms + 30_000);
        assert!(soon.is_some());
        let left = deadline_instant(soon.unwrap_or(SystemTime::now()))
            .saturating_duration_since(Instant::now());
        assert!(left > Duration::from_secs(29) && left <= Duration::from_secs(30));
        // Just passed (a slow start): still a deadline, with nothing left.
        assert!(invocation_deadline(now_ms - 5).is_some());
        // What `cargo lambda watch` sends: the timeout, not an epoch time.
        assert_eq!(invocation_deadline(600_000), None);
    }
}
