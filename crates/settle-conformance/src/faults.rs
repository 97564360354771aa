//! Fault-injecting decorators over any backend's ports, in the style of
//! object_store's `ThrottledStore`: every call may fail before it takes
//! effect, or take effect and still report failure (the caller retries, so
//! this makes duplicates); deletes may be lost; a received message may be
//! made visible again at once, so a second worker gets it while the first is
//! still on it. One seeded generator drives every decision.

use async_trait::async_trait;
use settle_core::domain::{ItemId, ItemRecord, RunId, RunRecord};
use settle_core::ports::{Delivery, Ledger, LedgerBatch, PortError, Queue, QueueDepth, Versioned};
use std::collections::HashMap;
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
}

impl FaultCounts {
    pub fn total(&self) -> u64 {
        self.failed_before.load(Ordering::Relaxed)
            + self.failed_after.load(Ordering::Relaxed)
            + self.lost_deletes.load(Ordering::Relaxed)
            + self.redeliveries.load(Ordering::Relaxed)
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
}

impl Faults {
    pub fn new(seed: u64, rate: f64) -> Arc<Self> {
        Arc::new(Self {
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            rate,
            enabled: AtomicBool::new(true),
            counts: FaultCounts::default(),
        })
    }

    /// Stops injecting (to let a run finish cleanly, e.g. before a final check).
    pub fn disable(&self) {
        self.enabled.store(false, Ordering::Relaxed);
    }

    fn roll(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
            && self.rng.lock().unwrap_or_else(|p| p.into_inner()).f64() < self.rate
    }

    fn before(&self, op: &'static str) -> Result<(), PortError> {
        if self.roll() {
            self.counts.failed_before.fetch_add(1, Ordering::Relaxed);
            return Err(PortError::backend(op, "injected fault before the call"));
        }
        Ok(())
    }

    fn after<T>(&self, op: &'static str, res: Result<T, PortError>) -> Result<T, PortError> {
        if res.is_ok() && self.roll() {
            self.counts.failed_after.fetch_add(1, Ordering::Relaxed);
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
}

impl FaultyQueue {
    pub fn wrap(inner: Arc<dyn Queue>, faults: Arc<Faults>) -> Arc<dyn Queue> {
        Arc::new(Self { inner, faults })
    }
}

#[async_trait]
impl Queue for FaultyQueue {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn send(&self, bodies: Vec<String>) -> Result<(), PortError> {
        self.faults.before("send")?;
        let res = self.inner.send(bodies).await;
        self.faults.after("send", res)
    }

    async fn receive(&self, max: usize, visibility: Duration) -> Result<Vec<Delivery>, PortError> {
        self.faults.before("receive")?;
        let got = self.inner.receive(max, visibility).await?;
        for d in &got {
            // At-least-once: the message shows up again while this receiver works.
            if self.faults.roll() {
                self.faults
                    .counts
                    .redeliveries
                    .fetch_add(1, Ordering::Relaxed);
                let _ = self
                    .inner
                    .change_visibility(&d.receipt, Duration::ZERO)
                    .await;
            }
        }
        Ok(got)
    }

    async fn delete(&self, receipts: Vec<String>) -> Result<(), PortError> {
        self.faults.before("delete")?;
        if self.faults.roll() {
            // Reported done, never done: the message comes back after its timeout.
            self.faults
                .counts
                .lost_deletes
                .fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let res = self.inner.delete(receipts).await;
        self.faults.after("delete", res)
    }

    async fn change_visibility(&self, receipt: &str, timeout: Duration) -> Result<(), PortError> {
        self.faults.before("change_visibility")?;
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
        self.faults.before("items")?;
        self.inner.items(keys).await
    }
    async fn commit(&self, batch: LedgerBatch) -> Result<Vec<RunRecord>, PortError> {
        self.faults.before("commit")?;
        let res = self.inner.commit(batch).await;
        self.faults.after("commit", res)
    }
    fn atomic_commit(&self) -> bool {
        self.inner.atomic_commit()
    }
    async fn mark_settled(&self, id: &RunId, at: u64) -> Result<bool, PortError> {
        self.inner.mark_settled(id, at).await
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
