//! Fault-injecting decorators over any backend's ports, in the style of
//! object_store's `ThrottledStore`: every call may fail before it takes
//! effect, or take effect and still report failure (the caller retries, so
//! this makes duplicates); deletes may be lost; a received message may be
//! made visible again at once, so a second worker gets it while the first is
//! still on it; a work queue also gets malformed bodies beside real sends.
//! One seeded generator drives every decision. Every fault is
//! counted by kind and by the port call it hit.

use async_trait::async_trait;
use settle_core::domain::{now_millis, ItemId, ItemRecord, Millis, RedriveScope, RunId, RunRecord};
use settle_core::idempotency::{Claim, IdempotencyKey, IdempotencyRecord, IdempotencyStore};
use settle_core::ports::{Delivery, Ledger, LedgerBatch, PortError, Queue, QueueDepth, Versioned};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the injected faults did, by kind.
#[derive(Debug, Default)]
pub struct FaultCounts {
    pub failed_before: AtomicU64,
    pub failed_after: AtomicU64,
    pub lost_deletes: AtomicU64,
    pub redeliveries: AtomicU64,
    pub malformed: AtomicU64,
    /// Per kind and port call, e.g. ("failed before", "ledger.commit").
    by_call: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl FaultCounts {
    pub fn total(&self) -> u64 {
        self.tally().total()
    }

    fn count(&self, counter: &AtomicU64, kind: &'static str, call: &'static str) {
        counter.fetch_add(1, Ordering::Relaxed);
        *self
            .by_call
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((kind, call))
            .or_default() += 1;
    }

    /// A snapshot.
    pub fn tally(&self) -> FaultTally {
        FaultTally {
            failed_before: self.failed_before.load(Ordering::Relaxed),
            failed_after: self.failed_after.load(Ordering::Relaxed),
            lost_deletes: self.lost_deletes.load(Ordering::Relaxed),
            redeliveries: self.redeliveries.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            by_call: self
                .by_call
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|((kind, call), n)| (format!("{kind} {call}"), *n))
                .collect(),
        }
    }
}

/// Injected faults, by kind, and by kind and port call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultTally {
    /// Calls that failed before taking effect.
    pub failed_before: u64,
    /// Calls that took effect and still reported failure.
    pub failed_after: u64,
    /// Deletes reported done and never done.
    pub lost_deletes: u64,
    /// Received messages made visible again at once (a duplicate delivery
    /// while the first receiver works).
    pub redeliveries: u64,
    /// Malformed bodies sent to the work queue beside real sends.
    pub malformed: u64,
    /// "`<kind> <port>.<call>`" → count.
    pub by_call: BTreeMap<String, u64>,
}

impl FaultTally {
    pub fn total(&self) -> u64 {
        self.failed_before
            + self.failed_after
            + self.lost_deletes
            + self.redeliveries
            + self.malformed
    }

    /// Adds another tally to this one.
    pub fn add(&mut self, other: &FaultTally) {
        self.failed_before += other.failed_before;
        self.failed_after += other.failed_after;
        self.lost_deletes += other.lost_deletes;
        self.redeliveries += other.redeliveries;
        self.malformed += other.malformed;
        for (k, n) in &other.by_call {
            *self.by_call.entry(k.clone()).or_default() += n;
        }
    }
}

impl fmt::Display for FaultTally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} failed before the call, {} failed after taking effect, {} lost deletes, \
             {} early redeliveries, {} malformed bodies",
            self.failed_before,
            self.failed_after,
            self.lost_deletes,
            self.redeliveries,
            self.malformed
        )
    }
}

/// The shared source of faults.
#[derive(Debug)]
pub struct Faults {
    rng: Mutex<fastrand::Rng>,
    /// Chance, per call, of each kind of fault.
    rate: f64,
    enabled: AtomicBool,
    pub counts: FaultCounts,
    trace: Mutex<Trace>,
    /// The malformed bodies sent, each unique.
    malformed: Mutex<Vec<String>>,
}

/// A digest of everything the decorators saw, in order: each decision with
/// its call and the time, each delivery with its message id and receive
/// count. Two runs with equal traces made the same calls in the same order
/// at the same (simulated) times and got the same answers: how a replay
/// shows it is exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trace {
    pub events: u64,
    pub digest: u64,
}

impl Default for Trace {
    fn default() -> Self {
        // FNV-1a's offset basis.
        Self {
            events: 0,
            digest: 0xcbf2_9ce4_8422_2325,
        }
    }
}

impl Trace {
    fn add(&mut self, parts: &[&[u8]]) {
        self.events += 1;
        for byte in parts.iter().flat_map(|p| p.iter().chain(&[0xff])) {
            self.digest = (self.digest ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} events, digest {:016x}", self.events, self.digest)
    }
}

impl Faults {
    pub fn new(seed: u64, rate: f64) -> Arc<Self> {
        Arc::new(Self {
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            rate,
            enabled: AtomicBool::new(true),
            counts: FaultCounts::default(),
            trace: Mutex::new(Trace::default()),
            malformed: Mutex::new(Vec::new()),
        })
    }

    /// Stops injecting (to let a run finish cleanly, e.g. before a final check).
    pub fn disable(&self) {
        self.enabled.store(false, Ordering::Relaxed);
    }

    /// The malformed bodies sent so far.
    pub fn malformed(&self) -> Vec<String> {
        self.malformed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The trace so far.
    pub fn trace(&self) -> Trace {
        *self.trace.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, parts: &[&[u8]]) {
        self.trace
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(parts);
    }

    /// Decides whether `op` gets a fault, and traces the decision.
    fn roll(&self, op: &'static str) -> bool {
        let hit = self.enabled.load(Ordering::Relaxed)
            && self.rng.lock().unwrap_or_else(|p| p.into_inner()).f64() < self.rate;
        let now = now_millis().to_le_bytes();
        self.record(&[op.as_bytes(), &now, &[u8::from(hit)]]);
        hit
    }

    fn before(&self, op: &'static str) -> Result<(), PortError> {
        if self.roll(op) {
            self.counts
                .count(&self.counts.failed_before, "failed before", op);
            return Err(PortError::backend(op, "injected fault before the call"));
        }
        Ok(())
    }

    fn after<T>(&self, op: &'static str, res: Result<T, PortError>) -> Result<T, PortError> {
        if res.is_ok() && self.roll(op) {
            self.counts
                .count(&self.counts.failed_after, "failed after", op);
            return Err(PortError::backend(
                op,
                "injected fault after the call took effect",
            ));
        }
        res
    }
}

/// A queue whose calls fail, lose deletes and redeliver early.
#[derive(Debug)]
pub struct FaultyQueue {
    inner: Arc<dyn Queue>,
    faults: Arc<Faults>,
    /// Whether sends are joined by malformed bodies (a work queue's are).
    malformed: bool,
}

impl FaultyQueue {
    pub fn wrap(inner: Arc<dyn Queue>, faults: Arc<Faults>) -> Arc<dyn Queue> {
        Arc::new(Self {
            inner,
            faults,
            malformed: false,
        })
    }

    /// A work queue: besides the faults of [`FaultyQueue::wrap`], a send is
    /// sometimes joined by a malformed body of its own (not a work message,
    /// and unique), as a bug or another producer would write. The worker
    /// must dead-letter it alone and keep it.
    pub fn wrap_work(inner: Arc<dyn Queue>, faults: Arc<Faults>) -> Arc<dyn Queue> {
        Arc::new(Self {
            inner,
            faults,
            malformed: true,
        })
    }

    async fn send_malformed(&self) {
        if !(self.malformed && self.faults.roll("queue.send_malformed")) {
            return;
        }
        let n = self.faults.counts.malformed.load(Ordering::Relaxed) + 1;
        let body = format!("{{\"not a work message\": {n}");
        // Sent past the decorator: it must arrive, or the check would not know.
        self.inner
            .send(vec![body.clone()])
            .await
            .expect("sending a malformed body");
        // Recorded once sent: the caller may drop this future mid-send (the
        // dispatcher stops its other sends when one fails), and a body that
        // never reached the queue is not one the worker must have kept.
        self.faults.counts.count(
            &self.faults.counts.malformed,
            "sent malformed",
            "queue.send",
        );
        self.faults
            .malformed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(body);
    }
}

#[async_trait]
impl Queue for FaultyQueue {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn send(&self, bodies: Vec<String>) -> Result<(), PortError> {
        self.send_malformed().await;
        self.faults.before("queue.send")?;
        let res = self.inner.send(bodies).await;
        self.faults.after("queue.send", res)
    }

    async fn send_delayed(&self, messages: Vec<(String, Duration)>) -> Result<(), PortError> {
        self.send_malformed().await;
        self.faults.before("queue.send")?;
        let res = self.inner.send_delayed(messages).await;
        self.faults.after("queue.send", res)
    }

    async fn receive(&self, max: usize, visibility: Duration) -> Result<Vec<Delivery>, PortError> {
        self.faults.before("queue.receive")?;
        let got = self.inner.receive(max, visibility).await?;
        for d in &got {
            self.faults
                .record(&[d.message_id.as_bytes(), &d.receive_count.to_le_bytes()]);
            // At-least-once: the message shows up again while this receiver works.
            if self.faults.roll("queue.redeliver") {
                self.faults.counts.count(
                    &self.faults.counts.redeliveries,
                    "redelivered",
                    "queue.receive",
                );
                let _ = self
                    .inner
                    .change_visibility(&d.receipt, Duration::ZERO)
                    .await;
            }
        }
        Ok(got)
    }

    async fn delete(&self, receipts: Vec<String>) -> Result<(), PortError> {
        self.faults.before("queue.delete")?;
        if self.faults.roll("queue.lose_delete") {
            // Reported done, never done: the message comes back after its timeout.
            self.faults
                .counts
                .count(&self.faults.counts.lost_deletes, "lost", "queue.delete");
            return Ok(());
        }
        let res = self.inner.delete(receipts).await;
        self.faults.after("queue.delete", res)
    }

    async fn change_visibility(&self, receipt: &str, timeout: Duration) -> Result<(), PortError> {
        self.faults.before("queue.change_visibility")?;
        self.inner.change_visibility(receipt, timeout).await
    }

    async fn depth(&self) -> Result<QueueDepth, PortError> {
        self.inner.depth().await
    }
}

/// A ledger whose reads and commits fail, commits sometimes after taking effect.
#[derive(Debug)]
pub struct FaultyLedger {
    inner: Arc<dyn Ledger>,
    faults: Arc<Faults>,
}

impl FaultyLedger {
    pub fn wrap(inner: Arc<dyn Ledger>, faults: Arc<Faults>) -> Arc<dyn Ledger> {
        Arc::new(Self { inner, faults })
    }
}

#[async_trait]
impl Ledger for FaultyLedger {
    async fn create_run(&self, run: &RunRecord) -> Result<(), PortError> {
        self.inner.create_run(run).await
    }
    async fn run(&self, id: &RunId) -> Result<Option<RunRecord>, PortError> {
        self.inner.run(id).await
    }
    async fn runs(&self, limit: usize) -> Result<Vec<RunRecord>, PortError> {
        self.inner.runs(limit).await
    }
    async fn record_dispatch(
        &self,
        id: &RunId,
        enqueued: u64,
        cursor: Option<&str>,
        dispatched: bool,
    ) -> Result<(), PortError> {
        self.inner
            .record_dispatch(id, enqueued, cursor, dispatched)
            .await
    }
    async fn items(
        &self,
        keys: &[(RunId, ItemId)],
    ) -> Result<HashMap<(RunId, ItemId), Versioned<ItemRecord>>, PortError> {
        self.faults.before("ledger.items")?;
        self.inner.items(keys).await
    }
    async fn commit(&self, batch: LedgerBatch) -> Result<Vec<RunRecord>, PortError> {
        self.faults.before("ledger.commit")?;
        let res = self.inner.commit(batch).await;
        self.faults.after("ledger.commit", res)
    }
    fn atomic_commit(&self) -> bool {
        self.inner.atomic_commit()
    }
    async fn set_redriving(&self, id: &RunId, open: bool) -> Result<(), PortError> {
        self.inner.set_redriving(id, open).await
    }
    async fn set_redrive(&self, id: &RunId, scope: &RedriveScope) -> Result<(), PortError> {
        self.inner.set_redrive(id, scope).await
    }
    async fn clear_redrive(&self, id: &RunId, scope: &RedriveScope) -> Result<bool, PortError> {
        self.inner.clear_redrive(id, scope).await
    }
    async fn mark_settled(&self, id: &RunId, at: u64) -> Result<bool, PortError> {
        self.inner.mark_settled(id, at).await
    }
    async fn set_flow(
        &self,
        id: &RunId,
        state: &settle_core::flow::FlowState,
    ) -> Result<(), PortError> {
        self.inner.set_flow(id, state).await
    }
    async fn failures(
        &self,
        run: &RunId,
        after: Option<&ItemId>,
        limit: usize,
    ) -> Result<Vec<(ItemId, ItemRecord)>, PortError> {
        self.inner.failures(run, after, limit).await
    }
}

/// An idempotency store whose claims, completions and releases fail,
/// before or after taking effect.
#[derive(Debug)]
pub struct FaultyIdempotency {
    inner: Arc<dyn IdempotencyStore>,
    faults: Arc<Faults>,
}

impl FaultyIdempotency {
    pub fn wrap(
        inner: Arc<dyn IdempotencyStore>,
        faults: Arc<Faults>,
    ) -> Arc<dyn IdempotencyStore> {
        Arc::new(Self { inner, faults })
    }
}

#[async_trait]
impl IdempotencyStore for FaultyIdempotency {
    async fn claim(
        &self,
        key: &IdempotencyKey,
        payload_hash: &str,
        token: &str,
        now: Millis,
        expires_at: Millis,
    ) -> Result<Claim, PortError> {
        let op = "idempotency.claim";
        self.faults.before(op)?;
        let res = self
            .inner
            .claim(key, payload_hash, token, now, expires_at)
            .await;
        self.faults.after(op, res)
    }
    async fn complete(
        &self,
        key: &IdempotencyKey,
        token: &str,
        result: &str,
    ) -> Result<(), PortError> {
        let op = "idempotency.complete";
        self.faults.before(op)?;
        let res = self.inner.complete(key, token, result).await;
        self.faults.after(op, res)
    }
    async fn release(&self, key: &IdempotencyKey, token: &str) -> Result<(), PortError> {
        let op = "idempotency.release";
        self.faults.before(op)?;
        let res = self.inner.release(key, token).await;
        self.faults.after(op, res)
    }
    async fn get(&self, key: &IdempotencyKey) -> Result<Option<IdempotencyRecord>, PortError> {
        self.inner.get(key).await
    }
}
