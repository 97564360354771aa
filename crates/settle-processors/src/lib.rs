//! The user's processors, in any language: a command run once per attempt
//! ([`exec`]), long-lived processes speaking JSON lines ([`jsonl`]), and an
//! HTTP endpoint ([`http`]). Each turns one attempt into the item's output,
//! a retryable or permanent failure, or a request to slow down (a throttle,
//! which is no failure), and keeps what the user's code wrote about that
//! item, and nothing else, as the attempt's log.

pub mod exec;
pub mod groups;
pub mod http;
pub mod jsonl;

pub use exec::EXIT_THROTTLED;
pub use http::parse_header;

use settle_core::{ProcessorSpec, Scripted};
use std::sync::Arc;

/// Why a processor cannot be set up: said before anything is created.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("--exec {command:?}: {reason}")]
    Command { command: String, reason: String },
    #[error("--http {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("--http-header {header:?}: {reason}")]
    Header { header: String, reason: String },
    /// A Rust processor compiled into another binary.
    #[error("--processor {0}: this binary has no processor of that name (it is the one built into another binary; run that binary, or name another processor)")]
    NotInThisBinary(String),
    #[error("--http {url:?}: cannot set up the HTTP client")]
    Client {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

/// How many items the processor works on at once, and how many processes
/// it may run for them when each takes one item at a time (`--exec
/// --protocol jsonl` without a hello).
#[derive(Debug, Clone, Copy)]
pub struct Parallelism {
    pub items: usize,
    pub processes: usize,
}

impl Parallelism {
    /// `n` items at once, and as many processes if need be.
    pub fn of(n: usize) -> Self {
        Self {
            items: n,
            processes: n,
        }
    }
}

/// Builds the processor `spec` names, checking what can be checked now (a
/// command that does not exist, a malformed URL or header).
pub fn build(
    spec: &ProcessorSpec,
    parallelism: Parallelism,
) -> Result<Arc<dyn settle_core::Processor>, SpecError> {
    Ok(match spec {
        ProcessorSpec::Scripted => Arc::new(Scripted),
        ProcessorSpec::Library { name } => return Err(SpecError::NotInThisBinary(name.clone())),
        ProcessorSpec::Exec {
            command,
            protocol: settle_core::ExecProtocol::PerItem,
            permanent_exit_codes,
        } => Arc::new(exec::Exec::new(
            command,
            permanent_exit_codes.clone(),
            parallelism.items,
        )?),
        ProcessorSpec::Http { url, headers } => {
            Arc::new(http::Http::new(url, headers, parallelism.items)?)
        }
        ProcessorSpec::Exec {
            command,
            protocol: settle_core::ExecProtocol::Jsonl,
            ..
        } => Arc::new(jsonl::Jsonl::with_limits(
            command,
            parallelism.items,
            parallelism.processes,
        )?),
    })
}

/// The item as a processor process receives it: one JSON object.
pub(crate) fn item_json(
    item: &settle_core::domain::Item,
    ctx: &settle_core::AttemptContext,
    deadline_ms: Option<u64>,
) -> String {
    let mut v = serde_json::json!({
        "id": item.id.as_str(),
        "payload": item.payload,
        "run_id": ctx.run.as_str(),
        "attempt": ctx.attempt,
        "idempotency_key": ctx.idempotency_key,
    });
    if let Some(ms) = deadline_ms {
        v["deadline_ms"] = ms.into();
    }
    v.to_string()
}

/// The attempt's deadline as Unix epoch milliseconds, if it has one.
pub(crate) fn deadline_epoch_ms(ctx: &settle_core::AttemptContext) -> Option<u64> {
    ctx.deadline.map(|d| {
        let left = d.saturating_duration_since(tokio::time::Instant::now());
        settle_core::domain::now_millis() + left.as_millis() as u64
    })
}

/// A place among the items a processor works on at once.
pub(crate) async fn slot(
    slots: &tokio::sync::Semaphore,
) -> Result<tokio::sync::SemaphorePermit<'_>, settle_core::domain::ProcessError> {
    slots
        .acquire()
        .await
        .map_err(|_| settle_core::domain::ProcessError::retryable("the processor is shutting down"))
}

/// The last non-empty line of `text`, for an error message.
pub(crate) fn last_line(text: &str) -> Option<&str> {
    text.lines().rev().map(str::trim).find(|l| !l.is_empty())
}
