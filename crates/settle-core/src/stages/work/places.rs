//! Places for the items a worker works on at once.

use crate::domain::processor::Processor;
use std::sync::Mutex;
use std::time::Duration;

/// Places for the items a worker works on at once: at most its bound, in
/// the order they ask (a FIFO semaphore), and at most what the processor
/// says it can take now ([`Processor::capacity`]).
#[derive(Debug)]
pub(super) struct Places {
    bound: tokio::sync::Semaphore,
    /// Places taken, for the processor's own limit.
    taken: Mutex<usize>,
    freed: tokio::sync::Notify,
}

/// How often a waiting item looks at the processor's capacity again,
/// which can grow without a place being freed (a process said hello).
const CAPACITY_RECHECK: Duration = Duration::from_millis(50);

impl Places {
    pub(super) fn new(bound: usize) -> Self {
        Self {
            bound: tokio::sync::Semaphore::new(bound.max(1)),
            taken: Mutex::default(),
            freed: tokio::sync::Notify::new(),
        }
    }

    fn taken(&self) -> std::sync::MutexGuard<'_, usize> {
        // Held for a count's update: a panic cannot leave it half-written.
        self.taken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) async fn take(&self, processor: &dyn Processor) -> Place<'_> {
        // Never closed: `ok()` only drops the Result.
        let permit = self.bound.acquire().await.ok();
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut taken = self.taken();
                if processor.capacity().is_none_or(|cap| *taken < cap.max(1)) {
                    *taken += 1;
                    return Place {
                        places: self,
                        _permit: permit,
                    };
                }
            }
            let _ = tokio::time::timeout(CAPACITY_RECHECK, freed).await;
        }
    }
}

/// A place taken; freed when dropped.
pub(super) struct Place<'a> {
    places: &'a Places,
    _permit: Option<tokio::sync::SemaphorePermit<'a>>,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        *self.places.taken() -= 1;
        self.places.freed.notify_waiters();
    }
}
