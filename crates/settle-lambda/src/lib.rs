//! Settle's three AWS Lambda functions as a library: thin adapters from
//! Lambda events (`aws_lambda_events`) to the core stages over any
//! [`settle_core::Backend`]. The binaries in `src/bin` only read their
//! configuration, connect the AWS backend once at cold start and hand each
//! invocation to one of these handlers; the tests drive the same handlers
//! on the embedded backend with the fixtures in `infra/events/`.

pub mod dispatcher;
pub mod records;
pub mod reducer;
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

/// Converts the invocation's wall-clock deadline (what the Lambda context
/// carries) into the monotonic instant the core stages take.
pub fn deadline_instant(deadline: SystemTime) -> Instant {
    let left = deadline
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Instant::now() + left
}
