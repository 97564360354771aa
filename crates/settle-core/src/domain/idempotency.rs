//! Idempotent side effects, in the spirit of AWS Powertools' idempotency
//! utility: a processor wraps a side effect (charge a card, send a webhook)
//! under its item's idempotency key, `(run id, item id)`, and a duplicate
//! delivery of the same item in the same run does not run it twice.
//!
//! - Before the side effect runs, an **in-progress record** is claimed. It
//!   expires at the attempt's deadline, so the claim of a crashed or
//!   cancelled attempt does not block the item for ever. A duplicate that
//!   finds an unexpired claim gets a retryable "already in progress" error
//!   and does not run the side effect.
//! - When the side effect succeeds, its result (JSON) replaces the claim as
//!   the **completed record**; a later duplicate gets that result back
//!   without running the side effect.
//! - Each record keeps a hash of the payload: the same key with another
//!   payload is a permanent error that says so.
//! - When the side effect fails (or panics), the claim is removed, so a
//!   retry may run it again.
//!
//! What it cannot promise: a side effect that outlives its claim (an attempt
//! that is neither finished nor cancelled by its deadline), or one that
//! finished while its completed record could not be written before the
//! deadline, may run again after the claim expires. Cancelling attempts at
//! their deadline (the worker's item timeout, Lambda's own limit) keeps the
//! first case out. See `docs/idempotency.md`.

use crate::domain::ports::PortError;
use crate::domain::processor::AttemptContext;
use crate::domain::{now_millis, ErrorKind, Item, ItemId, Millis, ProcessError, RunId};
use async_trait::async_trait;
use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

mod memory;
pub use memory::MemoryIdempotencyStore;

/// The key a side effect is made idempotent under: a duplicate delivery in
/// the same run has the same key, the same item in a later run a new one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey {
    pub run: RunId,
    pub item: ItemId,
}

impl IdempotencyKey {
    pub fn new(run: RunId, item: ItemId) -> Self {
        Self { run, item }
    }
}

impl fmt::Display for IdempotencyKey {
    /// The same text as [`AttemptContext::idempotency_key`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.run, self.item)
    }
}

/// A stored idempotency record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyRecord {
    /// A side effect was started under `token` and may still be running
    /// until `expires_at`.
    InProgress {
        payload_hash: String,
        token: String,
        expires_at: Millis,
    },
    /// The side effect finished; `result` is its JSON.
    Completed {
        payload_hash: String,
        token: String,
        result: String,
    },
}

impl IdempotencyRecord {
    pub fn payload_hash(&self) -> &str {
        match self {
            Self::InProgress { payload_hash, .. } | Self::Completed { payload_hash, .. } => {
                payload_hash
            }
        }
    }
    pub fn token(&self) -> &str {
        match self {
            Self::InProgress { token, .. } | Self::Completed { token, .. } => token,
        }
    }
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The caller holds the in-progress record now.
    Acquired,
    /// Another record stands (completed, unexpired in progress, or of
    /// another payload); nothing was written.
    Existing(IdempotencyRecord),
}

/// Where idempotency records live: one record per key.
///
/// The contract (the conformance suite checks it on every backend):
/// - Every operation on one key is atomic with respect to every other.
/// - Times are given by the caller ([`Millis`], wall clock), so the store
///   compares, and never reads a clock of its own.
/// - A `token` names one claim; operations that name it are idempotent, so
///   a caller may repeat any of them after an error whose effect is unknown.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + fmt::Debug {
    /// Writes `InProgress { payload_hash, token, expires_at }` and returns
    /// [`Claim::Acquired`] if the key has no record, or has an in-progress
    /// record with the same `payload_hash` that either has expired
    /// (`expires_at <= now`) or was claimed with this same `token`.
    /// Otherwise writes nothing and returns the record it found. Of many
    /// concurrent claims of a free key, exactly one is acquired.
    async fn claim(
        &self,
        key: &IdempotencyKey,
        payload_hash: &str,
        token: &str,
        now: Millis,
        expires_at: Millis,
    ) -> Result<Claim, PortError>;

    /// Turns the record claimed with `token` into `Completed` with `result`
    /// (keeping its payload hash). A record already completed with this
    /// token is left as it is. If the record is missing or holds another
    /// token (the claim expired and another attempt took it), nothing is
    /// written and the answer is [`PortError::Conflict`].
    async fn complete(
        &self,
        key: &IdempotencyKey,
        token: &str,
        result: &str,
    ) -> Result<(), PortError>;

    /// Deletes the record if it is in progress under `token`; otherwise
    /// (missing, completed, another token) does nothing. Never an error for
    /// a record that is not the caller's.
    async fn release(&self, key: &IdempotencyKey, token: &str) -> Result<(), PortError>;

    /// The record, read after every write acknowledged before the call.
    async fn get(&self, key: &IdempotencyKey) -> Result<Option<IdempotencyRecord>, PortError>;
}

/// Why an idempotent call did not return the side effect's result.
#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    /// Another attempt holds an unexpired claim: retryable.
    #[error(
        "{key}: already in progress in another attempt (its claim expires in {remaining_ms} ms)"
    )]
    InProgress { key: String, remaining_ms: u64 },
    /// The key was used with another payload: permanent.
    #[error("{key}: already used with a different payload (stored payload hash {stored}, this payload's {given})")]
    PayloadMismatch {
        key: String,
        stored: String,
        given: String,
    },
    /// The deadline had passed before the claim: retryable.
    #[error("{key}: not started, the attempt's deadline has passed")]
    DeadlinePassed { key: String },
    /// The store failed (after retries): retryable.
    #[error("{key}: the idempotency store failed: {source}")]
    Store {
        key: String,
        #[source]
        source: PortError,
    },
    /// The stored result, or the new one, does not (de)serialize as the
    /// caller's type: permanent, since retrying reads the same bytes.
    #[error("{key}: the side effect's result cannot be (de)serialized: {reason}")]
    Result { key: String, reason: String },
    /// The side effect itself failed; its claim was released.
    #[error(transparent)]
    Effect(ProcessError),
}

impl IdempotencyError {
    /// Whether trying again can help.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InProgress { .. } | Self::DeadlinePassed { .. } | Self::Store { .. } => {
                ErrorKind::Retryable
            }
            Self::PayloadMismatch { .. } | Self::Result { .. } => ErrorKind::Permanent,
            Self::Effect(e) => e.kind,
        }
    }
}

/// Added to a claim's remaining time in the retry hint of an "in progress"
/// error: the claim was stamped by another worker's clock.
pub const CLOCK_SKEW: Duration = Duration::from_millis(100);

impl From<IdempotencyError> for ProcessError {
    /// "In progress" asks the worker to retry once the claim has expired: by
    /// then its holder has finished (a retry gets the stored result) or was
    /// cut off (a retry takes the claim over). Retrying sooner would only
    /// spend the item's receives, and an orphaned claim (its holder's store
    /// calls failed) would get the item dead-lettered as "in progress".
    fn from(e: IdempotencyError) -> Self {
        match e {
            IdempotencyError::Effect(e) => e,
            IdempotencyError::InProgress { remaining_ms, .. } => {
                ProcessError::retryable(e.to_string())
                    .with_retry_after(Duration::from_millis(remaining_ms) + CLOCK_SKEW)
            }
            e => ProcessError {
                kind: e.kind(),
                message: e.to_string(),
                retry_after: None,
            },
        }
    }
}

/// Tuning of [`Idempotency`].
#[derive(Debug, Clone)]
pub struct IdempotencyConfig {
    /// How long a claim lasts when the attempt has no deadline. 15 minutes,
    /// Lambda's longest invocation: no attempt on Lambda outlives it.
    pub default_ttl: Duration,
    /// Tries of a claim or a release whose store call failed.
    pub store_tries: u32,
    /// Tries of writing the completed record. More than for the others: a
    /// side effect that ran without its record stored may run again once
    /// its claim expires.
    pub complete_tries: u32,
    /// Pause before the second try; doubles per try.
    pub backoff: Duration,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(15 * 60),
            store_tries: 3,
            complete_tries: 8,
            backoff: Duration::from_millis(10),
        }
    }
}

/// The utility: runs side effects at most once per key, over a store.
#[derive(Debug, Clone)]
pub struct Idempotency {
    store: Arc<dyn IdempotencyStore>,
    config: IdempotencyConfig,
}

/// SHA-256 of the payload, in hex.
pub fn payload_hash(payload: &str) -> String {
    Sha256::digest(payload.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Idempotency {
    pub fn new(store: Arc<dyn IdempotencyStore>) -> Self {
        Self::with_config(store, IdempotencyConfig::default())
    }

    pub fn with_config(store: Arc<dyn IdempotencyStore>, config: IdempotencyConfig) -> Self {
        Self { store, config }
    }

    pub fn store(&self) -> &Arc<dyn IdempotencyStore> {
        &self.store
    }

    /// [`Idempotency::run`] for a processor: the key is the attempt's run and
    /// the item's id, the payload is the item's, and the deadline is the
    /// attempt's (or [`IdempotencyConfig::default_ttl`] from now).
    pub async fn run_for<T, F, Fut>(
        &self,
        ctx: &AttemptContext,
        item: &Item,
        effect: F,
    ) -> Result<T, IdempotencyError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, ProcessError>>,
    {
        let key = IdempotencyKey::new(ctx.run.clone(), item.id.clone());
        let deadline = ctx
            .deadline
            .unwrap_or_else(|| Instant::now() + self.config.default_ttl);
        self.run(&key, item.payload.get(), deadline, effect).await
    }

    /// Runs `effect` unless a record for `key` says it ran (then returns its
    /// stored result) or is running (then [`IdempotencyError::InProgress`]).
    /// The claim expires at `deadline`: the caller must not let the effect
    /// run past it. `payload` is the text whose hash is kept with the record.
    ///
    /// If the effect succeeds but its result cannot be stored even after
    /// retries, the result is still returned (the effect did happen) and the
    /// claim is left to expire; that case is logged.
    pub async fn run<T, F, Fut>(
        &self,
        key: &IdempotencyKey,
        payload: &str,
        deadline: Instant,
        effect: F,
    ) -> Result<T, IdempotencyError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, ProcessError>>,
    {
        let hash = payload_hash(payload);
        let token = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let now = now_millis();
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(IdempotencyError::DeadlinePassed {
                key: key.to_string(),
            });
        }
        // Rounded up, plus the millisecond `now` may lag: a claim never
        // expires before its deadline.
        let expires_at = now + left.as_micros().div_ceil(1000) as u64 + 1;

        let claim = self
            .retry(self.config.store_tries, || {
                self.store.claim(key, &hash, &token, now, expires_at)
            })
            .await
            .map_err(|source| IdempotencyError::Store {
                key: key.to_string(),
                source,
            })?;
        match claim {
            Claim::Acquired => {}
            Claim::Existing(record) if record.payload_hash() != hash => {
                return Err(IdempotencyError::PayloadMismatch {
                    key: key.to_string(),
                    stored: record.payload_hash().to_owned(),
                    given: hash,
                })
            }
            Claim::Existing(IdempotencyRecord::Completed { result, .. }) => {
                tracing::debug!(%key, "duplicate: returning the stored result");
                return serde_json::from_str(&result).map_err(|e| IdempotencyError::Result {
                    key: key.to_string(),
                    reason: format!("stored result: {e}"),
                });
            }
            Claim::Existing(IdempotencyRecord::InProgress { expires_at, .. }) => {
                return Err(IdempotencyError::InProgress {
                    key: key.to_string(),
                    remaining_ms: expires_at.saturating_sub(now_millis()),
                })
            }
        }

        // A panic is a failure too: release the claim, then let it unwind on.
        let outcome = AssertUnwindSafe(effect()).catch_unwind().await;
        let value = match outcome {
            Ok(Ok(value)) => value,
            Ok(Err(e)) => {
                self.release(key, &token).await;
                return Err(IdempotencyError::Effect(e));
            }
            Err(panic) => {
                self.release(key, &token).await;
                std::panic::resume_unwind(panic);
            }
        };
        let result = match serde_json::to_string(&value) {
            Ok(r) => r,
            Err(e) => {
                // The effect ran, but nothing can be stored for a duplicate:
                // keep the claim until it expires rather than invite a rerun.
                return Err(IdempotencyError::Result {
                    key: key.to_string(),
                    reason: format!("result: {e}"),
                });
            }
        };
        // The completion runs as its own task: if the attempt is cancelled
        // at its deadline now (the worker's item timeout), the record of an
        // effect that did happen is still written, rather than abandoned to
        // a rerun once the claim expires.
        let me = self.clone();
        let (k, t) = (key.clone(), token);
        let stored = tokio::spawn(async move {
            me.retry(me.config.complete_tries, || {
                me.store.complete(&k, &t, &result)
            })
            .await
        })
        .await;
        match stored {
            Ok(Ok(())) => {}
            Ok(Err(PortError::Conflict)) => {
                tracing::warn!(%key, "the side effect finished after its claim expired and was taken by another attempt");
            }
            Ok(Err(e)) => {
                tracing::error!(%key, error = %e, "the side effect finished but its result could not be stored; \
                    its claim stays until it expires");
            }
            Err(e) => {
                tracing::error!(%key, error = %e, "the task storing the side effect's result failed");
            }
        }
        Ok(value)
    }

    async fn release(&self, key: &IdempotencyKey, token: &str) {
        if let Err(e) = self
            .retry(self.config.store_tries, || self.store.release(key, token))
            .await
        {
            tracing::warn!(%key, error = %e, "could not release the claim; it stays until it expires");
        }
    }

    /// Repeats `call` on a backend failure (an effect unknown: every store
    /// call is idempotent per token), up to `tries` times in all.
    async fn retry<R, C, Fut>(&self, tries: u32, call: C) -> Result<R, PortError>
    where
        C: Fn() -> Fut,
        Fut: Future<Output = Result<R, PortError>>,
    {
        let mut pause = self.config.backoff;
        let mut tried = 1;
        loop {
            match call().await {
                Err(PortError::Backend { op, source }) if tried < tries.max(1) => {
                    tracing::debug!(op, error = %source, tried, "idempotency store call failed; trying again");
                    tokio::time::sleep(pause).await;
                    pause = pause.saturating_mul(2);
                    tried += 1;
                }
                res => return res,
            }
        }
    }
}

#[cfg(test)]
mod tests;
