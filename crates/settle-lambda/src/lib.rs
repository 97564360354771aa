//! Settle's three AWS Lambda functions as a library: thin adapters from
//! Lambda events (`aws_lambda_events`) to the core stages over any
//! [`settle_core::Backend`]. The binaries in `src/bin` only read their
//! configuration, connect the AWS backend once at cold start and hand each
//! invocation to one of these handlers; the tests drive the same handlers
//! on the embedded backend with the fixtures in `infra/events/`.

pub mod dispatcher;
pub mod records;
pub mod reducer;
pub mod self_invoke;
pub mod settings;
pub mod telemetry;
pub mod worker;

pub use dispatcher::{
    Continuation, DispatchError, DispatchOutcome, DispatchRequest, DispatchSummary,
    DispatcherFunction,
};
pub use reducer::ReducerFunction;
pub use settings::{DispatcherSettings, SettingsError, WorkerSettings};
pub use worker::WorkerFunction;

use std::time::{Duration, Instant, SystemTime};

/// The Lambda event types the handlers take, re-exported for the binaries.
pub use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};

/// Converts the invocation's wall-clock deadline (what the Lambda context
/// carries) into the monotonic instant the core stages take.
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
