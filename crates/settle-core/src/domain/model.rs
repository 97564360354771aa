//! The domain: items, runs, outcomes, the per-item ledger record and its
//! transitions, and the run tally. Pure data and pure functions.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; every timestamp Settle stores is one.
pub type Millis = u64;

/// The current wall-clock time in [`Millis`]; on a thread that runs a
/// simulation ([`simulate_wall_clock`](crate::testing::simulate_wall_clock)),
/// the simulated one.
pub fn now_millis() -> Millis {
    if let Some(now) = crate::testing::clock::simulated_now() {
        return now;
    }
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// The longest item id accepted, in characters.
pub const MAX_ITEM_ID_CHARS: usize = 256;

/// Why a string is not a valid [`ItemId`] or [`RunId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("id is empty")]
    Empty,
    #[error("id is {0} characters long; at most {MAX_ITEM_ID_CHARS} are allowed")]
    TooLong(usize),
    /// Ids are printed in summaries and listings: a newline would forge a
    /// line there, an escape sequence would drive the terminal.
    #[error("id {0:?} contains a control character (U+{code:04X})", code = u32::from(*.1))]
    Control(String, char),
    #[error("run id {0:?} is not a Settle run id (expected e.g. r20261123T235300Z-0a1b2c)")]
    BadRun(String),
}

/// An item's id: 1 to 256 characters, none of them a control character
/// (Unicode category Cc), unique within a run. The same id comes back in
/// later runs (tonight's renewals are last night's users).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ItemId(String);

impl ItemId {
    pub fn new(id: impl Into<String>) -> Result<Self, IdError> {
        let id = id.into();
        let chars = id.chars().count();
        if chars == 0 {
            Err(IdError::Empty)
        } else if chars > MAX_ITEM_ID_CHARS {
            Err(IdError::TooLong(chars))
        } else if let Some(c) = id.chars().find(|c| c.is_control()) {
            Err(IdError::Control(id, c))
        } else {
            Ok(Self(id))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ItemId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::new(s)
    }
}
impl From<ItemId> for String {
    fn from(id: ItemId) -> String {
        id.0
    }
}
impl fmt::Display for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A run's id: `r` + UTC creation time + random suffix, so ids sort by age
/// and two dispatchers starting in the same second still differ.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RunId(String);

impl RunId {
    pub fn generate(now: Millis) -> Self {
        let secs = now / 1000;
        let (y, mo, d, h, mi, s) = civil(secs);
        Self(format!(
            "r{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z-{:06x}",
            fastrand::u32(..0x0100_0000)
        ))
    }
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if Self::is_valid(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::BadRun(s.to_owned()))
        }
    }
    fn is_valid(s: &str) -> bool {
        s.len() == 24
            && s.starts_with('r')
            && s.as_bytes()[9] == b'T'
            && s.as_bytes()[16] == b'Z'
            && s.as_bytes()[17] == b'-'
            && s[1..9].bytes().all(|b| b.is_ascii_digit())
            && s[10..16].bytes().all(|b| b.is_ascii_digit())
            && s[18..].bytes().all(|b| b.is_ascii_hexdigit())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RunId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        // Keeps the decoded string: every result message carries run ids.
        if Self::is_valid(&s) {
            Ok(Self(s))
        } else {
            Err(IdError::BadRun(s))
        }
    }
}
impl From<RunId> for String {
    fn from(id: RunId) -> String {
        id.0
    }
}
impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Days-from-civil inverse (Howard Hinnant's algorithm): UTC calendar fields
/// without pulling in a date crate for one format string.
fn civil(secs: u64) -> (u64, u64, u64, u64, u64, u64) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y as u64,
        m as u64,
        d as u64,
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
    )
}

/// One unit of work: an id and an opaque JSON payload, kept as raw JSON so
/// that Settle never re-encodes (or logs) what user code owns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Item {
    pub id: ItemId,
    pub payload: Box<RawValue>,
}

impl Item {
    pub fn new(id: ItemId, payload: Box<RawValue>) -> Self {
        Self { id, payload }
    }
}

/// The JSON `null`, the payload of an item loaded without one.
pub fn null_payload() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).expect("null is valid JSON")
}

/// Whether a failed attempt may succeed if tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    /// Transient (timeout, throttling, a panic): retried until max receives.
    Retryable,
    /// Will fail the same way every time (card declined, bad payload): never retried.
    Permanent,
    /// The called service asked to slow down (HTTP 429, a rate limit): not
    /// a failure. The item goes round again without using an attempt, and
    /// the run (or its key) is slowed down; see docs/flow-control.md.
    Throttled,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retryable => "retryable",
            Self::Permanent => "permanent",
            Self::Throttled => "throttled",
        }
    }
}

/// A processor's failure: its kind decides retry, its message is kept in the
/// ledger as the item's last error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ProcessError {
    pub kind: ErrorKind,
    pub message: String,
    /// For a retryable error: the earliest a retry can help (the worker
    /// waits at least this long, and at least its own backoff).
    pub retry_after: Option<Duration>,
}

/// Longest error message kept, in bytes: it travels in the dead-letter copy
/// of the item's message, which must stay within a queue message's size.
pub const MAX_ERROR_BYTES: usize = 1024;

/// Cuts `msg` to [`MAX_ERROR_BYTES`] on a character boundary, marking the cut.
pub fn bounded_error(mut msg: String) -> String {
    if msg.len() > MAX_ERROR_BYTES {
        let mut end = MAX_ERROR_BYTES - 3;
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        msg.truncate(end);
        msg.push_str("...");
    }
    msg
}

impl ProcessError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Retryable,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Permanent,
            message: message.into(),
            retry_after: None,
        }
    }
    /// The called service is throttling (an HTTP 429, "slow down"): the
    /// attempt is not used, the item is tried again once the run's limiter
    /// lets it, and the limiter lowers its rate. With
    /// [`ProcessError::with_retry_after`], everyone of the run (or of its
    /// key) pauses that long first.
    pub fn throttled(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Throttled,
            message: message.into(),
            retry_after: None,
        }
    }
    /// Asks the worker to retry no sooner than `after` from now.
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }
}

/// Where an item stands in its run's ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ItemStatus {
    Pending,
    Succeeded,
    Failed,
}

impl ItemStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Self::Pending),
            "succeeded" => Some(Self::Succeeded),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// What one attempt at an item came to, as the worker reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum AttemptOutcome {
    Succeeded,
    Failed {
        kind: ErrorKind,
        error: String,
        /// True when no further attempt will follow: the message was
        /// dead-lettered and the item counts as failed.
        terminal: bool,
    },
    /// The called service asked to slow down: not the end of an attempt.
    /// The item goes round again with the same attempt number; this was
    /// its `nth` throttled answer in the run.
    Throttled {
        nth: u32,
    },
}

/// The largest output a processor may return for one item, as JSON text:
/// it travels in a results message (SQS: 256 KiB, shared by a batch's
/// results) and is kept in the item's ledger row (DynamoDB: 400 KB). An
/// attempt whose output is larger fails permanently, naming both sizes.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// What a processor returns for an item that succeeded: any JSON value,
/// kept as its text.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Output(Box<RawValue>);

impl Output {
    /// JSON text, as it is.
    pub fn raw(json: Box<RawValue>) -> Self {
        Self(json)
    }

    /// Any serializable value.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        serde_json::value::to_raw_value(value).map(Self)
    }

    /// Text that is JSON stays JSON; anything else becomes a JSON string,
    /// without its final line break (what a program's `print` adds).
    pub fn from_text(text: &str) -> Self {
        let trimmed = text.trim();
        match RawValue::from_string(trimmed.to_owned()) {
            Ok(raw) if !trimmed.is_empty() => Self(raw),
            _ => {
                let line = text.strip_suffix('\n').unwrap_or(text);
                let line = line.strip_suffix('\r').unwrap_or(line);
                Self::json(line).expect("a string always serializes")
            }
        }
    }

    pub fn get(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for Output {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for Output {}

/// The most of an attempt's log that is kept: its last this many bytes,
/// after a line saying how many were cut before them.
pub const MAX_LOG_BYTES: usize = 8 * 1024;

/// Attempts of one item that keep their logs: the latest ones. An item
/// retried hundreds of times must still fit one ledger row.
pub const LOGGED_ATTEMPTS: usize = 16;

/// An attempt's log while it is written: the tail of what the processor
/// wrote, within [`MAX_LOG_BYTES`] once finished, and how much was cut
/// before it. Memory stays bounded however much a processor writes.
#[derive(Debug, Default)]
pub struct LogBuf {
    cut: usize,
    buf: Vec<u8>,
}

impl LogBuf {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > 2 * MAX_LOG_BYTES {
            let over = self.buf.len() - MAX_LOG_BYTES;
            self.buf.drain(..over);
            self.cut += over;
        }
    }

    /// The log as it is kept, behind a marker if anything was cut; `None`
    /// if nothing was written.
    pub fn finish(mut self) -> Option<String> {
        if self.buf.len() > MAX_LOG_BYTES {
            let over = self.buf.len() - MAX_LOG_BYTES;
            self.buf.drain(..over);
            self.cut += over;
        }
        if self.cut > 0 {
            // Start on a character (UTF-8 continuation bytes are 0b10xxxxxx).
            let skip = self.buf.iter().take_while(|&&b| b & 0xC0 == 0x80).count();
            self.buf.drain(..skip);
            self.cut += skip;
        }
        if self.buf.is_empty() && self.cut == 0 {
            return None;
        }
        let text = String::from_utf8_lossy(&self.buf);
        Some(if self.cut > 0 {
            format!(
                "[settle: {} earlier bytes of this attempt's log were cut]\n{text}",
                self.cut
            )
        } else {
            text.into_owned()
        })
    }
}

/// One attempt, as reported by a worker and kept in the item's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// Counted over the item's whole life in the run, across redeliveries and redrives.
    pub attempt: u32,
    /// The queue message that carried this attempt: with `attempt`, the
    /// identity of a result, so a duplicate result is recognised.
    pub message_id: String,
    pub started_at: Millis,
    pub duration_ms: u64,
    #[serde(flatten)]
    pub outcome: AttemptOutcome,
    /// What the processor returned, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Output>,
    /// What the processor wrote while working on this item and nothing
    /// else, its last [`MAX_LOG_BYTES`]; `None` if it wrote nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    /// When the item's next try is due, for an attempt that failed and will
    /// be retried, or that was throttled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<Millis>,
    /// Throttled answers the item got before this attempt: every result
    /// carries the count on, so a lost throttle's report is made good by
    /// the next result of the item.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub throttled: u32,
}

/// A wait before an item's next try at least this long makes the item
/// count as waiting ([`ItemRecord::waiting_until`]): what `settle status`
/// reports, where a run would otherwise look stuck.
pub const LONG_WAIT_MS: Millis = 60_000;

/// How a result changed a run's tally.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TallyDelta {
    pub succeeded: i64,
    pub failed: i64,
    /// Throttled answers newly counted.
    pub throttled: i64,
    /// Items that began (+) or stopped (-) waiting long for their next try.
    pub waiting: i64,
    /// The latest a newly waiting item waits until.
    pub waiting_until: Option<Millis>,
}

impl TallyDelta {
    pub fn add(&mut self, other: TallyDelta) {
        self.succeeded += other.succeeded;
        self.failed += other.failed;
        self.throttled += other.throttled;
        self.waiting += other.waiting;
        self.waiting_until = self.waiting_until.max(other.waiting_until);
    }
    pub fn is_zero(&self) -> bool {
        self.succeeded == 0 && self.failed == 0 && !self.moves_flow()
    }
    /// Whether it moves the run's throttled or waiting counts.
    pub fn moves_flow(&self) -> bool {
        self.throttled != 0 || self.waiting != 0 || self.waiting_until.is_some()
    }
}

/// The ledger's row for one item of one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemRecord {
    pub status: ItemStatus,
    /// The highest attempt number reported.
    pub attempts: u32,
    pub last_error: Option<String>,
    /// Every attempt reported, in attempt order.
    pub history: Vec<Attempt>,
    pub updated_at: Millis,
    /// Throttled answers the item got (not attempts: see
    /// [`AttemptOutcome::Throttled`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub throttled: u32,
    /// A pending item whose next try waits at least [`LONG_WAIT_MS`]: until when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_until: Option<Millis>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl ItemRecord {
    /// The record's JSON, as serde_json writes it (only faster).
    pub fn encode(&self) -> String {
        crate::wire::json::item_record(self)
    }

    /// The output of the item's success (the first, if duplicates succeeded too).
    pub fn output(&self) -> Option<&Output> {
        self.history
            .iter()
            .find(|a| a.outcome == AttemptOutcome::Succeeded)
            .and_then(|a| a.output.as_ref())
    }
}

impl Default for ItemRecord {
    fn default() -> Self {
        Self {
            status: ItemStatus::Pending,
            attempts: 0,
            last_error: None,
            history: Vec::new(),
            updated_at: 0,
            throttled: 0,
            waiting_until: None,
        }
    }
}

impl ItemRecord {
    /// Applies one attempt's result. Returns `None` when that result was
    /// already applied (a duplicate delivery), else how the tally moves.
    ///
    /// The rules make the final status independent of arrival order: any
    /// success wins (the side effect happened), else a terminal failure
    /// fails the item, else it stays pending.
    pub fn apply(&mut self, a: &Attempt, now: Millis) -> Option<TallyDelta> {
        let (waited, until) = (self.waiting(), self.waiting_until);
        let mut delta = self.apply_outcome(a, now)?;
        if self.status != ItemStatus::Pending {
            self.waiting_until = None;
        }
        delta.waiting = i64::from(self.waiting()) - i64::from(waited);
        if self.waiting() && self.waiting_until != until {
            delta.waiting_until = self.waiting_until;
        }
        Some(delta)
    }

    /// Whether the item waits long for its next try.
    pub fn waiting(&self) -> bool {
        self.status == ItemStatus::Pending && self.waiting_until.is_some()
    }

    /// The wait a result announces, if long ([`LONG_WAIT_MS`]).
    fn long_wait(a: &Attempt) -> Option<Millis> {
        let ended = a.started_at + a.duration_ms;
        a.retry_at
            .filter(|at| at.saturating_sub(ended) >= LONG_WAIT_MS)
    }

    /// Counts the throttles `a` reports (its own, or those before it) that
    /// were not counted yet.
    fn count_throttles(&mut self, seen: u32) -> i64 {
        let new = i64::from(seen.saturating_sub(self.throttled));
        self.throttled = self.throttled.max(seen);
        new
    }

    fn apply_outcome(&mut self, a: &Attempt, now: Millis) -> Option<TallyDelta> {
        if let AttemptOutcome::Throttled { nth } = a.outcome {
            // Not an attempt: kept as a count, not in the history. A later
            // answer counts; an earlier or repeated one changes nothing.
            if nth <= self.throttled {
                return None;
            }
            let delta = TallyDelta {
                throttled: self.count_throttles(nth),
                ..TallyDelta::default()
            };
            self.updated_at = now;
            // Its wait is the item's latest unless a result of the attempt
            // it held back is in already.
            if a.attempt > self.attempts {
                self.waiting_until = Self::long_wait(a);
            }
            return Some(delta);
        }
        if self
            .history
            .iter()
            .any(|h| h.attempt == a.attempt && h.message_id == a.message_id)
        {
            return None;
        }
        let carried = self.count_throttles(a.throttled);
        let pos = self.history.partition_point(|h| h.attempt <= a.attempt);
        self.history.insert(pos, a.clone());
        // Only the latest attempts keep their logs, so the row stays bounded.
        let logged = self.history.iter().filter(|h| h.log.is_some()).count();
        for h in self
            .history
            .iter_mut()
            .filter(|h| h.log.is_some())
            .take(logged.saturating_sub(LOGGED_ATTEMPTS))
        {
            h.log = None;
        }
        self.attempts = self.attempts.max(a.attempt);
        self.updated_at = now;
        let mut delta = TallyDelta {
            throttled: carried,
            ..TallyDelta::default()
        };
        match &a.outcome {
            AttemptOutcome::Succeeded => match self.status {
                ItemStatus::Succeeded => {}
                ItemStatus::Failed => {
                    delta.failed = -1;
                    delta.succeeded = 1;
                    self.status = ItemStatus::Succeeded;
                }
                ItemStatus::Pending => {
                    delta.succeeded = 1;
                    self.status = ItemStatus::Succeeded;
                }
            },
            AttemptOutcome::Failed { terminal, .. } => {
                // The latest failed attempt's error, in whatever order the
                // results arrive (a queue need not keep theirs).
                self.last_error = self.history.iter().rev().find_map(|h| match &h.outcome {
                    AttemptOutcome::Failed { error, .. } => Some(error.clone()),
                    AttemptOutcome::Succeeded | AttemptOutcome::Throttled { .. } => None,
                });
                if *terminal && self.status == ItemStatus::Pending {
                    delta.failed = 1;
                    self.status = ItemStatus::Failed;
                }
                if a.attempt == self.attempts {
                    self.waiting_until = Self::long_wait(a);
                }
            }
            AttemptOutcome::Throttled { .. } => unreachable!("handled above"),
        }
        Some(delta)
    }
}

/// Per-run settings, fixed when the run is created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// Receives of a message before its failure is terminal.
    pub max_receives: u32,
    /// The run is `partial` (not `failed`) while failures stay at or under this share of items.
    pub tolerated_failure_percent: f64,
    /// The processor that does the run's work, where the run was started
    /// with one (a run dispatched for deployed workers uses theirs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processor: Option<crate::domain::processor::ProcessorSpec>,
    /// The run's rate limits (see [`crate::flow`]).
    #[serde(default, skip_serializing_if = "crate::flow::FlowLimits::is_empty")]
    pub flow: crate::flow::FlowLimits,
    /// The JSON pointer into an item's payload that names its key (`--key`):
    /// each key has its own flow scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// How long the local runner waits while the run is throttled with no
    /// call answered before it stops, the items left pending (`--max-throttle-wait`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_throttle_wait_s: Option<u64>,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            max_receives: 3,
            tolerated_failure_percent: 100.0,
            processor: None,
            flow: crate::flow::FlowLimits::default(),
            key: None,
            max_throttle_wait_s: None,
        }
    }
}

impl RunConfig {
    /// The key an item has under this run's `key` pointer: the pointed
    /// value's text if a string, else its JSON; `None` without a pointer,
    /// and "" where the payload has nothing there.
    pub fn key_of(&self, payload: &RawValue) -> Option<String> {
        let pointer = self.key.as_deref()?;
        let value: serde_json::Value = serde_json::from_str(payload.get()).unwrap_or_default();
        Some(match value.pointer(pointer) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        })
    }
}

/// A run's status, derived from its tally (never stored, so never stale).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Items still pending, the dispatcher has not finished claiming, or a
    /// redrive is unfinished (items to move, or moved ones to process).
    Running,
    /// Every item succeeded.
    Succeeded,
    /// Some items failed, no more than the tolerated share, and some succeeded.
    Partial,
    /// Every item failed, or more than the tolerated share did.
    Failed,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Partial => "partial",
            Self::Failed => "failed",
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The ledger's row for one run: its dispatch progress and its tally.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: RunId,
    pub created_at: Millis,
    pub config: RunConfig,
    /// Items claimed into the run so far; the run's total once `dispatched`.
    pub total: u64,
    /// Items sent to the work queue so far.
    pub enqueued: u64,
    /// Where the dispatcher resumes reading the run's claimed items.
    pub cursor: Option<String>,
    /// Claiming is over: `total` is final.
    pub dispatched: bool,
    pub succeeded: u64,
    pub failed: u64,
    /// When pending first reached 0 after dispatch.
    pub settled_at: Option<Millis>,
    /// A redrive moved failed items' messages back to the work queue and
    /// has not yet seen them all processed: their items still count as
    /// failed, so the tally alone would call the run settled.
    #[serde(default)]
    pub redriving: bool,
    /// The redrive asked for and not yet finished: every item of its scope
    /// moved back from the DLQ and processed. Kept across interruptions, so
    /// that `resume` finishes what was asked for; cleared when it is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redrive: Option<crate::domain::RedriveScope>,
    /// Throttled answers the run's items got (not attempts, not failures).
    #[serde(default)]
    pub throttled: u64,
    /// Pending items whose next try waits at least [`LONG_WAIT_MS`].
    #[serde(default)]
    pub waiting: u64,
    /// The latest such a wait ends, if any item waited so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_until: Option<Millis>,
    /// Its flow control as the runner processing it last recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<crate::flow::FlowState>,
}

impl RunRecord {
    /// Items waiting for a later try, and until when at the latest, when
    /// that is still ahead of `now`: what `settle status` says of a run
    /// that would otherwise look stuck.
    pub fn waiting_at(&self, now: Millis) -> Option<(u64, Millis)> {
        let until = self.waiting_until.filter(|u| *u > now)?;
        (self.waiting > 0 && self.pending() > 0)
            .then_some((self.waiting.min(self.pending()), until))
    }

    pub fn new(id: RunId, config: RunConfig, now: Millis) -> Self {
        Self {
            id,
            created_at: now,
            config,
            total: 0,
            enqueued: 0,
            cursor: None,
            dispatched: false,
            succeeded: 0,
            failed: 0,
            settled_at: None,
            redriving: false,
            redrive: None,
            throttled: 0,
            waiting: 0,
            waiting_until: None,
            flow: None,
        }
    }

    pub fn pending(&self) -> u64 {
        self.total.saturating_sub(self.succeeded + self.failed)
    }

    /// Every item of a fully dispatched run has an outcome, and no redrive
    /// of it has messages left to process or items left to move.
    pub fn is_settled(&self) -> bool {
        self.dispatched && self.pending() == 0 && !self.redriving && self.redrive.is_none()
    }

    pub fn status(&self) -> RunStatus {
        if !self.is_settled() {
            return RunStatus::Running;
        }
        if self.failed == 0 {
            return RunStatus::Succeeded;
        }
        let percent = self.failed as f64 * 100.0 / self.total as f64;
        if self.succeeded == 0 || percent > self.config.tolerated_failure_percent {
            RunStatus::Failed
        } else {
            RunStatus::Partial
        }
    }

    /// Its flow state, if its runner recorded one in the last 15 s and the
    /// run is not settled: an older one describes a runner that is gone.
    pub fn live_flow(&self, now: Millis) -> Option<&crate::flow::FlowState> {
        self.flow
            .as_ref()
            .filter(|f| !self.is_settled() && now.saturating_sub(f.at) <= 15_000)
    }

    /// The summary line, in the words operators look for.
    pub fn summary(&self) -> String {
        format!(
            "Processed {} items with {} successes and {} errors",
            self.succeeded + self.failed,
            self.succeeded,
            self.failed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(n: u32, msg: &str, outcome: AttemptOutcome) -> Attempt {
        Attempt {
            attempt: n,
            message_id: msg.into(),
            started_at: 0,
            duration_ms: 1,
            outcome,
            output: None,
            log: None,
            retry_at: None,
            throttled: 0,
        }
    }
    fn fail(terminal: bool) -> AttemptOutcome {
        AttemptOutcome::Failed {
            kind: ErrorKind::Retryable,
            error: "boom".into(),
            terminal,
        }
    }

    #[test]
    fn item_ids_are_1_to_256_characters() {
        assert_eq!(ItemId::new(""), Err(IdError::Empty));
        assert!(
            ItemId::new("é".repeat(256)).is_ok(),
            "counts characters, not bytes"
        );
        assert_eq!(ItemId::new("x".repeat(257)), Err(IdError::TooLong(257)));
        let err = serde_json::from_str::<ItemId>("\"\"").unwrap_err();
        assert!(err.to_string().contains("id is empty"), "{err}");
    }

    #[test]
    fn item_ids_refuse_control_characters() {
        for (id, code) in [
            ("a\nb", "U+000A"),
            ("\u{1b}[31mred", "U+001B"),
            ("nul\0", "U+0000"),
            ("del\u{7f}", "U+007F"),
            ("c1\u{9f}", "U+009F"),
        ] {
            let err = ItemId::new(id).unwrap_err();
            let first = id.chars().find(|c| c.is_control()).unwrap();
            assert_eq!(err, IdError::Control(id.into(), first));
            assert!(err.to_string().contains(code), "{err}");
        }
        assert_eq!(
            ItemId::new("a\nb").unwrap_err().to_string(),
            "id \"a\\nb\" contains a control character (U+000A)"
        );
        // Only category Cc: a no-break space, a zero-width space and a line
        // separator are not control characters.
        assert!(ItemId::new("\u{a0}\u{200b}\u{2028}é").is_ok());
    }

    #[test]
    fn errors_are_bounded_on_a_char_boundary() {
        assert_eq!(bounded_error("short".into()), "short");
        let long = bounded_error("é".repeat(MAX_ERROR_BYTES));
        assert!(long.len() <= MAX_ERROR_BYTES, "{}", long.len());
        assert!(long.ends_with("..."));
    }

    #[test]
    fn run_ids_sort_by_time_and_round_trip() {
        let a = RunId::generate(1_763_942_400_000);
        assert!(a.as_str().starts_with("r20251124T000000Z-"), "{a}");
        assert_eq!(RunId::parse(a.as_str()), Ok(a.clone()));
        let b = RunId::generate(1_763_942_401_000);
        assert!(a < b);
        assert!(RunId::parse("r1").is_err());
        assert!(RunId::parse("x20251124T000000Z-00000g").is_err());
    }

    #[test]
    fn duplicate_result_changes_nothing() {
        let mut r = ItemRecord::default();
        let a = attempt(1, "m1", AttemptOutcome::Succeeded);
        assert_eq!(
            r.apply(&a, 5),
            Some(TallyDelta {
                succeeded: 1,
                failed: 0,
                ..TallyDelta::default()
            })
        );
        let before = r.clone();
        assert_eq!(r.apply(&a, 6), None);
        assert_eq!(r, before);
    }

    #[test]
    fn second_success_of_another_delivery_counts_once() {
        let mut r = ItemRecord::default();
        let mut total = TallyDelta::default();
        total.add(
            r.apply(&attempt(1, "m1", AttemptOutcome::Succeeded), 1)
                .unwrap(),
        );
        total.add(
            r.apply(&attempt(1, "m2", AttemptOutcome::Succeeded), 1)
                .unwrap(),
        );
        assert_eq!(
            total,
            TallyDelta {
                succeeded: 1,
                failed: 0,
                ..TallyDelta::default()
            }
        );
        assert_eq!(r.history.len(), 2, "both deliveries are in the history");
    }

    #[test]
    fn non_terminal_failure_keeps_item_pending() {
        let mut r = ItemRecord::default();
        assert_eq!(
            r.apply(&attempt(1, "m", fail(false)), 1),
            Some(TallyDelta::default())
        );
        assert_eq!(r.status, ItemStatus::Pending);
        assert_eq!(r.last_error.as_deref(), Some("boom"));
    }

    #[test]
    fn the_last_error_is_the_latest_attempts_in_any_order() {
        let failed = |n: u32, terminal: bool| {
            let mut a = attempt(n, &format!("m{n}"), fail(terminal));
            if let AttemptOutcome::Failed { error, .. } = &mut a.outcome {
                *error = format!("failure {n} of 3");
            }
            a
        };
        for order in [[1, 2, 3], [3, 2, 1], [2, 3, 1], [1, 3, 2]] {
            let mut r = ItemRecord::default();
            let mut total = TallyDelta::default();
            for n in order {
                total.add(r.apply(&failed(n, n == 3), 1).unwrap());
            }
            assert_eq!(r.last_error.as_deref(), Some("failure 3 of 3"), "{order:?}");
            assert_eq!((r.status, r.attempts), (ItemStatus::Failed, 3), "{order:?}");
            assert_eq!(
                total,
                TallyDelta {
                    succeeded: 0,
                    failed: 1,
                    ..TallyDelta::default()
                },
                "{order:?}"
            );
        }
    }

    #[test]
    fn a_throttle_is_counted_apart_once_and_is_no_attempt() {
        let mut r = ItemRecord::default();
        let throttle = |nth, msg: &str| attempt(1, msg, AttemptOutcome::Throttled { nth });
        let d = r.apply(&throttle(2, "m2"), 1).unwrap();
        assert_eq!((d.throttled, d.succeeded, d.failed), (2, 0, 0));
        // An earlier or repeated throttle changes nothing.
        assert_eq!(r.apply(&throttle(1, "m1"), 2), None);
        assert_eq!(r.apply(&throttle(2, "m2"), 2), None);
        assert_eq!((r.attempts, r.history.len(), r.throttled), (0, 0, 2));
        assert_eq!(r.status, ItemStatus::Pending);
        r.apply(&attempt(1, "m3", AttemptOutcome::Succeeded), 3)
            .unwrap();
        assert_eq!((r.attempts, r.history.len(), r.throttled), (1, 1, 2));
    }

    #[test]
    fn a_lost_throttle_report_is_made_good_by_the_next_result() {
        let mut r = ItemRecord::default();
        // Two throttles whose reports were lost; the success carries them.
        let mut ok = attempt(1, "m3", AttemptOutcome::Succeeded);
        ok.throttled = 2;
        let d = r.apply(&ok, 1).unwrap();
        assert_eq!((d.succeeded, d.throttled, r.throttled), (1, 2, 2));
        // A late report of one of them counts nothing more.
        let late = attempt(1, "m1", AttemptOutcome::Throttled { nth: 1 });
        assert_eq!(r.apply(&late, 2), None);
        assert_eq!(r.throttled, 2);
    }

    #[test]
    fn an_item_waits_long_until_its_next_result() {
        let mut r = ItemRecord::default();
        let mut a = attempt(1, "m1", fail(false));
        // A short wait is not waiting.
        a.retry_at = Some(1 + LONG_WAIT_MS - 1);
        assert_eq!(r.apply(&a, 1).unwrap().waiting, 0);
        assert!(!r.waiting());
        let mut b = attempt(2, "m2", fail(false));
        b.retry_at = Some(10 * LONG_WAIT_MS);
        let d = r.apply(&b, 2).unwrap();
        assert_eq!((d.waiting, d.waiting_until), (1, Some(10 * LONG_WAIT_MS)));
        // An older attempt's result, arriving late, leaves the wait.
        let mut late = attempt(1, "m0", fail(false));
        late.retry_at = None;
        assert_eq!(r.apply(&late, 3).unwrap().waiting, 0);
        assert!(r.waiting());
        let d = r
            .apply(&attempt(3, "m3", AttemptOutcome::Succeeded), 4)
            .unwrap();
        assert_eq!((d.waiting, r.waiting_until), (-1, None));
    }

    #[test]
    fn a_run_says_it_waits_only_while_the_wait_is_ahead() {
        let mut run = RunRecord::new(RunId::generate(0), RunConfig::default(), 0);
        (run.total, run.dispatched, run.waiting) = (5, true, 2);
        run.waiting_until = Some(1_000);
        assert_eq!(run.waiting_at(999), Some((2, 1_000)));
        assert_eq!(run.waiting_at(1_000), None);
        run.succeeded = 5;
        assert_eq!(run.waiting_at(0), None, "nothing pending");
    }

    #[test]
    fn a_key_is_read_by_its_pointer() {
        let config = RunConfig {
            key: Some("/customer/id".into()),
            ..RunConfig::default()
        };
        let key = |json: &str| config.key_of(&RawValue::from_string(json.into()).unwrap());
        assert_eq!(key(r#"{"customer":{"id":"c-1"}}"#).as_deref(), Some("c-1"));
        assert_eq!(key(r#"{"customer":{"id":42}}"#).as_deref(), Some("42"));
        assert_eq!(key(r#"{"other":1}"#).as_deref(), Some(""));
        assert_eq!(key("[1,2]").as_deref(), Some(""));
        assert_eq!(RunConfig::default().key_of(&null_payload()), None);
    }

    #[test]
    fn redrive_success_moves_failed_to_succeeded() {
        let mut r = ItemRecord::default();
        let d = r.apply(&attempt(3, "m", fail(true)), 1).unwrap();
        assert_eq!(
            d,
            TallyDelta {
                succeeded: 0,
                failed: 1,
                ..TallyDelta::default()
            }
        );
        assert_eq!(r.status, ItemStatus::Failed);
        let d = r
            .apply(&attempt(4, "m2", AttemptOutcome::Succeeded), 2)
            .unwrap();
        assert_eq!(
            d,
            TallyDelta {
                succeeded: 1,
                failed: -1,
                ..TallyDelta::default()
            }
        );
        assert_eq!(r.status, ItemStatus::Succeeded);
        assert_eq!(r.attempts, 4);
    }

    #[test]
    fn late_terminal_failure_never_undoes_a_success() {
        // Order-independence: the same two results in either order end the same.
        for flip in [false, true] {
            let mut r = ItemRecord::default();
            let ok = attempt(2, "a", AttemptOutcome::Succeeded);
            let bad = attempt(3, "b", fail(true));
            let mut total = TallyDelta::default();
            let (x, y) = if flip { (&bad, &ok) } else { (&ok, &bad) };
            total.add(r.apply(x, 1).unwrap());
            total.add(r.apply(y, 2).unwrap());
            assert_eq!(r.status, ItemStatus::Succeeded);
            assert_eq!(
                total,
                TallyDelta {
                    succeeded: 1,
                    failed: 0,
                    ..TallyDelta::default()
                }
            );
            assert_eq!(
                r.history.iter().map(|h| h.attempt).collect::<Vec<_>>(),
                vec![2, 3],
                "history stays in attempt order"
            );
        }
    }

    #[test]
    fn run_status_follows_tolerance() {
        let mut run = RunRecord::new(RunId::generate(0), RunConfig::default(), 0);
        run.total = 10;
        assert_eq!(run.status(), RunStatus::Running, "not dispatched yet");
        run.dispatched = true;
        run.succeeded = 9;
        assert_eq!(run.status(), RunStatus::Running);
        assert_eq!(run.pending(), 1);
        run.failed = 1;
        assert_eq!(run.status(), RunStatus::Partial);
        run.config.tolerated_failure_percent = 5.0;
        assert_eq!(run.status(), RunStatus::Failed);
        run.config.tolerated_failure_percent = 10.0;
        assert_eq!(
            run.status(),
            RunStatus::Partial,
            "at the threshold is tolerated"
        );
        run.succeeded = 0;
        run.failed = 10;
        run.config.tolerated_failure_percent = 100.0;
        assert_eq!(run.status(), RunStatus::Failed, "nothing succeeded");
        run.succeeded = 10;
        run.failed = 0;
        assert_eq!(run.status(), RunStatus::Succeeded);
        assert_eq!(
            run.summary(),
            "Processed 10 items with 10 successes and 0 errors"
        );
        let empty = RunRecord {
            dispatched: true,
            ..RunRecord::new(RunId::generate(0), RunConfig::default(), 0)
        };
        assert_eq!(empty.status(), RunStatus::Succeeded);
    }
}
