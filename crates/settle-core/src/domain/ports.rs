//! The ports: what the stages need from a backend, as small traits whose
//! docs are the contract. Every backend passes the same conformance suite
//! (crate `settle-conformance`) against these words.

use crate::domain::{Item, ItemId, ItemRecord, RedriveScope, RunId, RunRecord, TallyDelta};
use async_trait::async_trait;
use std::collections::HashMap;
use std::time::Duration;

/// SQS's limit on entries per SendMessageBatch, DeleteMessageBatch and
/// ReceiveMessage call. Every backend enforces it, so code that works
/// locally works on AWS.
pub const MAX_QUEUE_BATCH: usize = 10;

/// SQS's longest delay of a sent message: a message sent with a delay is
/// received no sooner than that delay after the send.
pub const MAX_SEND_DELAY: Duration = Duration::from_secs(15 * 60);

/// Splits consecutive bodies into send batches that SQS accepts: at most
/// [`MAX_QUEUE_BATCH`] entries and at most
/// [`MAX_BODY_BYTES`](crate::wire::message::MAX_BODY_BYTES) in all. Returns index ranges.
pub fn send_batches(sizes: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, &size) in sizes.iter().enumerate() {
        if i > start
            && (i - start == MAX_QUEUE_BATCH || bytes + size > crate::wire::message::MAX_BODY_BYTES)
        {
            out.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_batches_respect_count_and_bytes() {
        assert_eq!(send_batches(&[]), vec![]);
        assert_eq!(send_batches(&[1; 25]), vec![0..10, 10..20, 20..25]);
        let big = crate::wire::message::MAX_BODY_BYTES / 2;
        assert_eq!(send_batches(&[big, big, 1, big]), vec![0..2, 2..4]);
        assert_eq!(send_batches(&[big + 1, big]), vec![0..1, 1..2]);
    }
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A port's failure.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// An optimistic write lost a race: read again and retry.
    #[error("conflict: the record changed since it was read")]
    Conflict,
    #[error("{0} not found")]
    NotFound(String),
    /// The request broke a limit of the port (batch size, body size).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The backend failed; `op` names the call.
    #[error("{op} failed: {source}")]
    Backend {
        op: &'static str,
        #[source]
        source: BoxError,
    },
}

impl PortError {
    pub fn backend(op: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Backend {
            op,
            source: source.into(),
        }
    }
}

/// One received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Stable across redeliveries of the same message.
    pub message_id: String,
    /// Names this receive; only the latest receive's handle deletes the message.
    pub receipt: String,
    pub body: String,
    /// Receives of this message so far, this one included (SQS ApproximateReceiveCount).
    pub receive_count: u32,
}

/// Approximate message counts, as SQS reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// Ready to be received.
    pub visible: u64,
    /// Received and not yet deleted, or delayed by a visibility change.
    pub in_flight: u64,
}

impl QueueDepth {
    pub fn total(&self) -> u64 {
        self.visible + self.in_flight
    }
}

/// A queue with SQS's semantics.
///
/// - Delivery is at least once: a message may be received more than once,
///   also while an earlier receive is still being processed.
/// - A received message is invisible for the visibility timeout, then
///   visible again unless deleted.
/// - Each receive increments the message's receive count. If the queue has a
///   dead-letter queue with a limit of `max_receives`, a message already
///   received that many times moves there instead of being delivered again.
/// - A message sent with a delay is not received before that delay has
///   passed (at most [`MAX_SEND_DELAY`]; SQS counts it in whole seconds,
///   rounded up).
/// - Send, receive and delete take at most [`MAX_QUEUE_BATCH`] entries.
/// - A body, and all bodies of one send together, are at most
///   [`crate::wire::message::MAX_BODY_BYTES`] bytes (see [`send_batches`]).
/// - Deleting with a receipt that is not the latest one's may leave the
///   message in place; deleting a deleted message is not an error.
#[async_trait]
pub trait Queue: Send + Sync + std::fmt::Debug {
    /// A name for messages and logs.
    fn name(&self) -> &str;
    /// Sends the bodies; all are stored when this returns `Ok`.
    async fn send(&self, bodies: Vec<String>) -> Result<(), PortError> {
        self.send_delayed(bodies.into_iter().map(|b| (b, Duration::ZERO)).collect())
            .await
    }
    /// Sends each body with its own delay (at most [`MAX_SEND_DELAY`];
    /// `PortError::Invalid` beyond); all are stored when this returns `Ok`.
    async fn send_delayed(&self, messages: Vec<(String, Duration)>) -> Result<(), PortError>;
    /// Receives up to `max` visible messages and hides them for `visibility`.
    /// May return fewer than are visible, or none.
    async fn receive(&self, max: usize, visibility: Duration) -> Result<Vec<Delivery>, PortError>;
    async fn delete(&self, receipts: Vec<String>) -> Result<(), PortError>;
    /// Makes a received message visible again after `timeout` from now.
    async fn change_visibility(&self, receipt: &str, timeout: Duration) -> Result<(), PortError>;
    /// [`Queue::change_visibility`] for up to [`MAX_QUEUE_BATCH`] received
    /// messages, best effort: a receipt that no longer acts is skipped.
    /// Fails only if the call as a whole failed.
    async fn change_visibility_batch(
        &self,
        receipts: Vec<String>,
        timeout: Duration,
    ) -> Result<(), PortError> {
        let calls = receipts.iter().map(|r| self.change_visibility(r, timeout));
        let failed = futures::future::join_all(calls)
            .await
            .into_iter()
            .filter_map(Result::err)
            .next();
        failed.map_or(Ok(()), Err)
    }
    async fn depth(&self) -> Result<QueueDepth, PortError>;
}

/// A line of an items file that could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct LineError {
    pub line: u64,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Line(#[from] LineError),
    #[error(transparent)]
    Port(#[from] PortError),
}

/// Items to load, each with its line number in the file, or that line's error.
pub type LoadInput = Box<dyn Iterator<Item = Result<(u64, Item), LineError>> + Send>;

/// The pending items, and their claim into runs.
#[async_trait]
pub trait Source: Send + Sync + std::fmt::Debug {
    /// Adds the items to the pending set, all or none: on the first bad line
    /// (a [`LineError`] from the input, or an id that is already pending
    /// or repeated within the input) nothing is added and that line is named.
    async fn load(&self, items: LoadInput) -> Result<u64, LoadError>;
    /// Loads the items as [`Source::load`] does and, in the same atomic
    /// step, creates `run` (as [`Ledger::create_run`] would, with nothing
    /// claimed yet) and claims for it every pending item: this load's and
    /// any left pending by earlier loads. The run's claims are then over:
    /// a later [`Source::claim`] for it claims nothing, and items loaded
    /// later are never its own. So a process killed at any moment leaves
    /// either nothing (no items, no run) or a run that owns all its items,
    /// never items that a later run could take. Returns the items loaded;
    /// with none, nothing is created.
    async fn load_run(&self, run: &RunRecord, items: LoadInput) -> Result<u64, LoadError>;
    /// How many items are pending (loaded and not yet claimed).
    async fn pending(&self) -> Result<u64, PortError>;
    /// Atomically claims up to `limit` pending items for `run` and adds their
    /// number to the run's `total`. An item is claimed by exactly one run,
    /// however many dispatchers claim at once. Returns how many were claimed:
    /// 0 when nothing is pending.
    async fn claim(&self, run: &RunId, limit: usize) -> Result<u64, PortError>;
    /// The run's claimed items in claim order, after the opaque `cursor`
    /// (from the start when `None`). Returns the items and the cursor after
    /// the last of them.
    async fn claimed(
        &self,
        run: &RunId,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Item>, Option<String>), PortError>;
}

/// A ledger row with the version a conditional write must match.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub version: u64,
}

/// A conditional write of one item row.
#[derive(Debug, Clone)]
pub struct ItemPut {
    pub run: RunId,
    pub item: ItemId,
    /// The item's position in the run's claim order ([`crate::wire::message::WorkBody::seq`]).
    pub seq: u64,
    /// The version read; `None` means the row must not exist yet.
    pub expected: Option<u64>,
    pub record: ItemRecord,
}

/// Item rows and the tally moves they cause, committed together.
#[derive(Debug, Clone, Default)]
pub struct LedgerBatch {
    pub puts: Vec<ItemPut>,
    pub tallies: Vec<(RunId, TallyDelta)>,
}

/// The actions one atomic commit may hold (DynamoDB TransactWriteItems).
pub const MAX_COMMIT_ACTIONS: usize = 100;

/// Runs and their per-item rows.
#[async_trait]
pub trait Ledger: Send + Sync + std::fmt::Debug {
    /// Creates the run row; `PortError::Invalid` if the id exists.
    async fn create_run(&self, run: &RunRecord) -> Result<(), PortError>;
    async fn run(&self, id: &RunId) -> Result<Option<RunRecord>, PortError>;
    /// Newest first.
    async fn runs(&self, limit: usize) -> Result<Vec<RunRecord>, PortError>;
    /// Saves dispatch progress: items enqueued so far, the source cursor, and
    /// whether claiming has finished (which freezes `total`).
    async fn record_dispatch(
        &self,
        id: &RunId,
        enqueued: u64,
        cursor: Option<&str>,
        dispatched: bool,
    ) -> Result<(), PortError>;
    /// The item rows that exist among `keys`, with their versions.
    async fn items(
        &self,
        keys: &[(RunId, ItemId)],
    ) -> Result<HashMap<(RunId, ItemId), Versioned<ItemRecord>>, PortError>;
    /// Writes every put whose `expected` version matches, and moves each
    /// run's tally by exactly the status changes written; `PortError::Conflict`
    /// if any put's version did not match. `tallies` must be those status
    /// changes (what [`ItemRecord::apply`] returned). At most
    /// [`MAX_COMMIT_ACTIONS`] puts plus tally rows. Returns the touched runs
    /// as committed.
    ///
    /// If [`Ledger::atomic_commit`], a conflict writes nothing at all.
    /// Otherwise the puts that matched are written and counted, and the
    /// caller re-reads and re-applies the rest, as it does after any
    /// conflict. Either way a status change is counted once: statuses only
    /// move up (pending, failed, succeeded), so a ledger may count an item
    /// by the highest status it has seen for it, whatever the order of writes.
    async fn commit(&self, batch: LedgerBatch) -> Result<Vec<RunRecord>, PortError>;
    /// Whether [`Ledger::commit`] is all or nothing. A ledger on a store
    /// whose transactions cost more per row (DynamoDB bills a transactional
    /// write twice) may write rows one by one and keep the tally exact by
    /// other means.
    fn atomic_commit(&self) -> bool {
        true
    }
    /// Opens or closes the run's redrive ([`RunRecord::redriving`]): a
    /// redrive opens it before it moves the first message back to the work
    /// queue, and whoever then sees the queues drained closes it. A redrive
    /// cut off in between leaves it open, so the run does not pass for
    /// settled until a resume has processed what was moved.
    /// `PortError::NotFound` if the run does not exist.
    async fn set_redriving(&self, id: &RunId, open: bool) -> Result<(), PortError>;
    /// Records `scope` as the run's redrive ([`RunRecord::redrive`]),
    /// replacing any recorded one: a redrive records its scope before it
    /// opens the run's redrive and moves anything, so a redrive cut off at
    /// any point is finished with what was asked for. One field of the run's
    /// row, written once per redrive. `PortError::NotFound` if the run does
    /// not exist.
    async fn set_redrive(&self, id: &RunId, scope: &RedriveScope) -> Result<(), PortError>;
    /// Clears the run's recorded redrive if it is still `scope` (the same
    /// id and selections); true if this call cleared it, false if none is
    /// recorded or another redrive has replaced it since (that one is not
    /// finished). `PortError::NotFound` if the run does not exist.
    async fn clear_redrive(&self, id: &RunId, scope: &RedriveScope) -> Result<bool, PortError>;
    /// Sets `settled_at` if unset; true if this call set it.
    async fn mark_settled(&self, id: &RunId, at: u64) -> Result<bool, PortError>;
    /// Records the run's flow control as its runner sees it (replacing the
    /// last one); [`RunRecord::flow`] reads it back.
    async fn set_flow(&self, id: &RunId, state: &crate::flow::FlowState) -> Result<(), PortError>;
    /// The run's failed items in id order, after `after`.
    async fn failures(
        &self,
        run: &RunId,
        after: Option<&ItemId>,
        limit: usize,
    ) -> Result<Vec<(ItemId, ItemRecord)>, PortError>;
}
