//! The processor: the user code that does one item's work, and the spec
//! that names which one a run uses.

use crate::domain::{Item, LogBuf, Output, ProcessError, RunId};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// What a processor knows about the attempt it is making, and where it
/// writes the attempt's own log.
#[derive(Debug)]
pub struct AttemptContext {
    pub run: RunId,
    /// 1 for the first attempt; counts across redeliveries and redrives.
    pub attempt: u32,
    /// Throttled answers the item got before this attempt (they are not
    /// attempts: see [`crate::domain::ErrorKind::Throttled`]).
    pub throttled: u32,
    /// `(run id, item id)`: the key under which a side effect must be made
    /// idempotent. A duplicate delivery in the same run carries the same
    /// key; the same item in a later run carries a new one.
    pub idempotency_key: String,
    /// When this attempt will be cut off (the worker's item timeout or the
    /// invocation's end, whichever is first), if it will be. A side effect
    /// wrapped by [`crate::domain::idempotency::Idempotency`] holds its claim until then.
    pub deadline: Option<Instant>,
    log: std::sync::Mutex<LogBuf>,
}

impl AttemptContext {
    pub fn new(run: RunId, item: &Item, attempt: u32) -> Self {
        // Run ids never contain ':', so the key splits back unambiguously.
        // Concatenated, not format!ted: this runs once per item.
        let idempotency_key = [run.as_str(), item.id.as_str()].join(":");
        Self {
            run,
            attempt,
            throttled: 0,
            idempotency_key,
            deadline: None,
            log: std::sync::Mutex::default(),
        }
    }

    /// Adds to this attempt's log, which is kept with the attempt (its last
    /// [`crate::domain::MAX_LOG_BYTES`]) and shown by `settle show` and
    /// `settle logs`: what went wrong with this item, apart from every other.
    pub fn log(&self, text: impl AsRef<[u8]>) {
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(text.as_ref());
    }

    /// The log written so far, as it is kept; leaves it empty.
    pub fn take_log(&self) -> Option<String> {
        std::mem::take(
            &mut *self
                .log
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .finish()
    }
}

/// Does one item's work. A side effect that must not happen twice for one
/// item of a run (a duplicate delivery is always possible) goes through
/// [`crate::domain::idempotency::Idempotency::run_for`].
///
/// Return the item's output (any JSON value, at most
/// [`crate::domain::MAX_OUTPUT_BYTES`]; `None` for none), or `Err` with a
/// [`ProcessError`] whose kind says whether trying again can help (and,
/// optionally, not before when). A panic is caught and counts as
/// retryable. What the attempt should keep as its log goes to
/// [`AttemptContext::log`].
#[async_trait]
pub trait Processor: Send + Sync + 'static {
    async fn process(
        &self,
        item: &Item,
        ctx: &AttemptContext,
    ) -> Result<Option<Output>, ProcessError>;

    /// How many items it can work on at once right now without keeping one
    /// waiting inside [`Processor::process`], when it knows better than the
    /// worker's bound: a pool of processes that turned out to take one item
    /// each. A worker with a bound
    /// ([`crate::stages::work::WorkerConfig::concurrency`]) starts no more
    /// attempts at once than this, so that an attempt's start, duration
    /// and timeout begin when the item can really start. `None` (the
    /// default): no limit of its own.
    fn capacity(&self) -> Option<usize> {
        None
    }
}

/// One attempt of a batch handed to a [`BatchProcessor`].
#[derive(Debug)]
pub struct BatchAttempt {
    pub item: Item,
    pub ctx: AttemptContext,
}

/// Does the work of a worker batch's items in one call, for user code
/// whose unit of work is a batch: on AWS, the user's own Lambda function,
/// invoked once per worker batch.
///
/// Return one outcome per attempt, in the order given (a missing one
/// counts as a retryable failure, an extra one is ignored); each outcome
/// means what [`Processor::process`]'s does, and what an attempt should
/// keep as its log goes to its own [`AttemptContext::log`]. The worker
/// gives the whole call the item timeout: a call that runs past it, or
/// panics, fails every attempt of the batch, retryably. Everything else
/// stays per item: a bad answer for one item fails only that item.
#[async_trait]
pub trait BatchProcessor: Send + Sync + 'static {
    async fn process_batch(
        &self,
        batch: &[BatchAttempt],
    ) -> Vec<Result<Option<Output>, ProcessError>>;
}

/// Which processor a run uses, recorded with the run so that `resume` and
/// `redrive` use the same one. Data only: the processors themselves live
/// in the `settle-processors` crate. Header values are kept (a resume needs
/// them) but never shown: see [`ProcessorSpec::describe`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ProcessorSpec {
    /// The built-in [`Scripted`](crate::testing::Scripted) processor, for tests and benchmarks.
    Scripted,
    /// A Rust processor compiled into the binary (`settle_cli::Settle::processor`).
    Library { name: String },
    /// The user's command, run by `sh -c`.
    Exec {
        command: String,
        #[serde(default)]
        protocol: ExecProtocol,
        /// Exit codes that fail an item permanently (per-item protocol).
        #[serde(default = "default_permanent_exit_codes")]
        permanent_exit_codes: Vec<i32>,
    },
    /// One POST per attempt to the user's endpoint.
    Http {
        url: String,
        /// `(name, value)` pairs sent with every request.
        #[serde(default)]
        headers: Vec<(String, String)>,
    },
}

/// How an [`ProcessorSpec::Exec`] command is run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecProtocol {
    /// A process per attempt: the item on stdin, the output on stdout.
    #[default]
    #[serde(rename = "per-item")]
    PerItem,
    /// Long-lived processes, one JSON line in and one out per item.
    Jsonl,
}

/// EX_DATAERR from sysexits.h: "the input data was incorrect".
pub const EXIT_PERMANENT: i32 = 65;

fn default_permanent_exit_codes() -> Vec<i32> {
    vec![EXIT_PERMANENT]
}

impl ProcessorSpec {
    /// How the processor is named to people: never a header's value.
    pub fn describe(&self) -> String {
        match self {
            Self::Scripted => "--processor scripted".into(),
            Self::Library { name } => format!("--processor {name}"),
            Self::Exec {
                command,
                protocol: ExecProtocol::PerItem,
                ..
            } => format!("--exec {command:?}"),
            Self::Exec {
                command,
                protocol: ExecProtocol::Jsonl,
                ..
            } => format!("--exec {command:?} --protocol jsonl"),
            Self::Http { url, headers } => {
                let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
                if names.is_empty() {
                    format!("--http {url}")
                } else {
                    format!("--http {url} (headers: {})", names.join(", "))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::item;

    #[test]
    fn idempotency_key_is_run_and_item() {
        let run = RunId::generate(0);
        let ctx = AttemptContext::new(run.clone(), &item("null"), 1);
        assert_eq!(ctx.idempotency_key, format!("{run}:i"));
    }
}
