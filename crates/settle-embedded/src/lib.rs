//! Settle's embedded backend: everything in one SQLite file. It plays SQS
//! (work queue, DLQ, results queue and its DLQ) and DynamoDB's role (item
//! source and ledger) so that `settle run` needs no cloud account.

mod bloom;
mod db;
mod idempotency;
mod queue;
mod store;

pub use db::{Db, DbError, Refusal};
pub use idempotency::EmbeddedIdempotency;
pub use queue::EmbeddedQueue;
pub use store::EmbeddedStore;

use settle_core::ports::PortError;
use settle_core::Capabilities;
use std::path::Path;
use std::time::Duration;

/// Where `settle` keeps its database unless told otherwise.
pub const DEFAULT_PATH: &str = ".settle/settle.db";

/// Receives of a result message before it is parked in the results DLQ.
/// High on purpose: a result is the only record of its item's outcome, so
/// only a poison (undecodable) result should ever end up there.
pub const RESULTS_MAX_RECEIVES: u32 = 50;

/// Receives the work queue allows past a run's own limit before it
/// dead-letters a message by itself (see [`Embedded::set_max_receives`]).
pub const SAFETY_RECEIVES: u32 = settle_core::work::EXTRA_RECEIVES;

/// The embedded engine's tuning, as [`settle_core::Backend::capabilities`].
pub const CAPABILITIES: Capabilities = Capabilities {
    // Its queue counts are exact: an empty queue is empty.
    stall_after: Duration::from_secs(3),
    // Nothing beyond the work visibility, so that after a killed process
    // `resume` gets the results back soon.
    min_results_visibility: Duration::ZERO,
    // Its ledger commits are cheap, so a reducer commits at once.
    reducer_window: Duration::ZERO,
    // The work queue's limit follows each run's (`Embedded::set_max_receives`).
    fixed_max_receive_count: None,
    // A scan reads pages of one local file.
    cheap_dlq_scan: true,
};

/// The whole backend over one database file.
#[derive(Debug, Clone)]
pub struct Embedded {
    pub db: Db,
    pub store: EmbeddedStore,
    pub idempotency: EmbeddedIdempotency,
    pub work: EmbeddedQueue,
    pub dlq: EmbeddedQueue,
    pub results: EmbeddedQueue,
    pub results_dlq: EmbeddedQueue,
}

impl Embedded {
    /// Opens or creates the database at `path` with its four queues.
    pub async fn open(path: &Path) -> Result<Self, DbError> {
        Self::over(Db::open(path)?).await
    }

    /// Opens the database at `path` only if it exists ([`Db::open_existing`]).
    pub async fn open_existing(path: &Path) -> Result<Self, DbError> {
        Self::over(Db::open_existing(path)?).await
    }

    /// Opens the database with every call on the calling thread
    /// ([`Db::open_inline`]): for the deterministic simulation.
    pub async fn open_inline(path: &Path) -> Result<Self, DbError> {
        Self::over(Db::open_inline(path)?).await
    }

    async fn over(db: Db) -> Result<Self, DbError> {
        let work = EmbeddedQueue::open(&db, "work").await?;
        let dlq = EmbeddedQueue::open(&db, "work-dlq").await?;
        let results = EmbeddedQueue::open(&db, "results").await?;
        let results_dlq = EmbeddedQueue::open(&db, "results-dlq").await?;
        let me = Self {
            store: EmbeddedStore::new(db.clone()),
            idempotency: EmbeddedIdempotency::new(db.clone()),
            db,
            work,
            dlq,
            results,
            results_dlq,
        };
        if me.results.max_receives().await.ok().flatten() != Some(RESULTS_MAX_RECEIVES) {
            me.results
                .set_redrive(&me.results_dlq, RESULTS_MAX_RECEIVES)
                .await?;
        }
        Ok(me)
    }

    /// The backend behind the ports, for code that serves every backend.
    pub fn backend(&self) -> settle_core::Backend {
        settle_core::Backend {
            work: std::sync::Arc::new(self.work.clone()),
            dlq: std::sync::Arc::new(self.dlq.clone()),
            results: std::sync::Arc::new(self.results.clone()),
            results_dlq: std::sync::Arc::new(self.results_dlq.clone()),
            source: std::sync::Arc::new(self.store.clone()),
            ledger: std::sync::Arc::new(self.store.clone()),
            idempotency: std::sync::Arc::new(self.idempotency.clone()),
            capabilities: CAPABILITIES,
        }
    }

    /// Makes the work queue's redrive policy safe for runs of `max_receives`:
    /// [`SAFETY_RECEIVES`] receives more than the worker's limit, so that an
    /// attempt that never reported (a crash) is still recorded as terminal by
    /// the worker before the queue itself dead-letters the message (which
    /// the tally would not hear of). The limit only grows: the queue serves
    /// every run in the database, and a lower limit would cut short a run
    /// with a higher one.
    pub async fn set_max_receives(&self, max_receives: u32) -> Result<(), PortError> {
        let wanted = max_receives + SAFETY_RECEIVES;
        let current = self.work.max_receives().await?.unwrap_or(0);
        if wanted > current {
            self.work.set_redrive(&self.dlq, wanted).await?;
        }
        Ok(())
    }
}

impl Embedded {
    /// Runs `remove` if the database holds nothing (no run, no item), while
    /// holding its write lock, and says whether it ran: for a command that
    /// created the file and failed, to take it away again. Under the lock,
    /// another process's load into the same file is either committed and
    /// seen here (and nothing is removed) or not begun.
    pub async fn remove_if_empty(
        &self,
        remove: impl FnOnce() + Send + 'static,
    ) -> Result<bool, DbError> {
        self.db
            .write(move |c| {
                let used: bool = c.query_row(
                    "SELECT EXISTS (SELECT 1 FROM runs) OR EXISTS (SELECT 1 FROM items)",
                    [],
                    |r| r.get(0),
                )?;
                if !used {
                    remove();
                }
                Ok(!used)
            })
            .await
    }
}

/// Maps a database error to a port error naming the operation: a port's
/// own answer passes through as it is, anything else is the backend's
/// failure, kept as the source.
pub(crate) fn port_err(op: &'static str) -> impl Fn(DbError) -> PortError {
    move |e| match e {
        DbError::Refused(Refusal::Port(p)) => p,
        e => PortError::backend(op, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use settle_core::jsonl::JsonlItems;
    use settle_core::ports::Source;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn remove_if_empty_runs_only_on_a_database_with_nothing_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let e = Embedded::open(&dir.path().join("x.db")).await.unwrap();
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        assert!(e
            .remove_if_empty(move || r.store(true, Ordering::SeqCst))
            .await
            .unwrap());
        assert!(ran.load(Ordering::SeqCst));

        let items = JsonlItems::new(std::io::Cursor::new(b"{\"id\":\"a\"}\n".to_vec()));
        assert_eq!(e.store.load(Box::new(items)).await.unwrap(), 1);
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        assert!(!e
            .remove_if_empty(move || r.store(true, Ordering::SeqCst))
            .await
            .unwrap());
        assert!(!ran.load(Ordering::SeqCst), "a pending item keeps it");
    }
}
