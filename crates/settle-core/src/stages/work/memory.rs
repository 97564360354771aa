//! What a worker remembers of the messages and items it handled.
//!
//! A queue delivers a message again once its visibility runs out, and so
//! it may while its attempt is still reporting (a queue call stalled
//! longer than the heartbeat's margin), or after it settled but before its
//! delete landed; a crash can leave two messages for one item (a dispatch
//! page sent again). Running such a copy would run the user's code twice
//! for one attempt, attempt a permanent failure again and dead-letter the
//! item twice. So a worker remembers:
//! - the messages it holds, each with its latest receipt: a copy of one is
//!   handed back, and its receipt replaces the holder's, which then keeps
//!   the message hidden and deletes it (a queue honours only the latest
//!   receipt);
//! - the items it holds: a second message for an item in hand is handed
//!   back, and by the time it returns the first one's outcome is known;
//! - the messages it settled: a copy is acknowledged without running;
//! - the items' outcomes it reported: merged with what the ledger says
//!   (which lags behind by the reducer's delay), they let the gate
//!   acknowledge a message whose attempt is already done;
//! - the outcomes it could not report (a send failed): when a message of
//!   that attempt comes back, the outcome is reported again rather than the
//!   processor run again.
//!
//! This covers one process; a copy that reaches another process is gated
//! by the ledger alone, and what gets past it (a copy that arrives before
//! the first attempt's result was reduced) is the at-least-once delivery
//! that the reducer and the idempotency keys absorb.

use super::Plan;
use crate::domain::{ItemId, ItemStatus, RunId};
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

/// How many settled messages, and items' outcomes, a worker remembers.
const MEMORY: usize = 4096;

/// What is known of an item's outcome, as far as the gate needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Known {
    pub status: ItemStatus,
    /// The highest attempt number recorded.
    pub attempts: u32,
}

impl Known {
    /// What both say: statuses only move up (pending, failed, succeeded),
    /// attempts only grow.
    pub fn merge(self, other: Known) -> Known {
        let rank = |s: ItemStatus| match s {
            ItemStatus::Pending => 0,
            ItemStatus::Failed => 1,
            ItemStatus::Succeeded => 2,
        };
        Known {
            status: if rank(other.status) > rank(self.status) {
                other.status
            } else {
                self.status
            },
            attempts: self.attempts.max(other.attempts),
        }
    }
}

pub(super) type ItemKey = (RunId, ItemId);

/// A bounded set that forgets its oldest entries.
#[derive(Debug)]
struct Recent<K, V> {
    map: HashMap<K, V>,
    order: VecDeque<K>,
}

impl<K, V> Default for Recent<K, V> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone, V> Recent<K, V> {
    fn insert_with(&mut self, key: K, value: V, merge: impl FnOnce(&mut V, V)) {
        match self.map.get_mut(&key) {
            Some(old) => merge(old, value),
            None => {
                self.map.insert(key.clone(), value);
                self.order.push_back(key);
                if self.order.len() > MEMORY {
                    if let Some(old) = self.order.pop_front() {
                        self.map.remove(&old);
                    }
                }
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Held message ids, each with its latest receipt.
    held: HashMap<String, String>,
    /// Held items, each with the message that holds it.
    items: HashMap<ItemKey, String>,
    settled: Recent<String, ()>,
    outcomes: Recent<ItemKey, Known>,
    /// Outcomes whose report could not be sent, by item and attempt.
    unsent: HashMap<(ItemKey, u32), Plan>,
}

/// A worker's memory (see the module's docs).
#[derive(Debug, Default)]
pub(super) struct Memory(Mutex<State>);

/// What the memory says of a message received.
pub(super) enum Seen {
    /// Not seen before: now held.
    New,
    /// A copy of a message held or settled here, planned.
    Copy(Plan),
}

impl Memory {
    fn state(&self) -> MutexGuard<'_, State> {
        // Every update is a few map operations: a panic cannot leave one half-done.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Looks up each message of a batch, taking hold of those that are not
    /// copies until the returned [`Hold`] is dropped. `later` is how long
    /// a copy of a held message is handed back for.
    pub fn take(
        &self,
        batch: &[crate::domain::ports::Delivery],
        later: std::time::Duration,
    ) -> (Vec<Seen>, Hold<'_>) {
        let mut state = self.state();
        let mut hold = Hold {
            memory: self,
            messages: Vec::new(),
            items: Vec::new(),
        };
        let seen = batch
            .iter()
            .map(|d| {
                if state.settled.map.contains_key(&d.message_id) {
                    tracing::info!(message_id = %d.message_id, "delivered again after it settled; acknowledged");
                    return Seen::Copy(Plan::Settled);
                }
                if let Some(latest) = state.held.get_mut(&d.message_id) {
                    tracing::info!(message_id = %d.message_id, "delivered again while its attempt still runs; handed back");
                    latest.clone_from(&d.receipt);
                    return Seen::Copy(Plan::Retry { delay: later });
                }
                state.held.insert(d.message_id.clone(), d.receipt.clone());
                hold.messages.push(d.message_id.clone());
                Seen::New
            })
            .collect();
        (seen, hold)
    }

    /// Takes hold of `item` for the message `message_id` (held in `hold`);
    /// false if another message holds it.
    pub fn take_item(&self, hold: &mut Hold<'_>, item: &ItemKey, message_id: &str) -> bool {
        let mut state = self.state();
        match state.items.get(item) {
            Some(holder) => holder == message_id,
            None => {
                state.items.insert(item.clone(), message_id.to_owned());
                hold.items.push(item.clone());
                true
            }
        }
    }

    /// What this worker reported of the item.
    pub fn known(&self, item: &ItemKey) -> Option<Known> {
        self.state().outcomes.map.get(item).copied()
    }

    /// The latest receipt of a held message.
    pub fn receipt(&self, message_id: &str) -> Option<String> {
        self.state().held.get(message_id).cloned()
    }

    /// Remembers a message that settled for good (its outcome reported, or
    /// sent on, or parked as malformed).
    pub fn settled(&self, message_id: &str) {
        self.state()
            .settled
            .insert_with(message_id.to_owned(), (), |_, _| {});
    }

    /// Remembers an outcome reported for an item.
    pub fn reported(&self, item: ItemKey, known: Known) {
        self.state()
            .outcomes
            .insert_with(item, known, |old, new| *old = old.merge(new));
    }

    /// Keeps an outcome that could not be reported, for the return of a
    /// message of its attempt; false if the memory is full (then the
    /// attempt must run again when its message returns).
    pub fn unsent(&self, item: ItemKey, attempt: u32, plan: Plan) -> bool {
        let mut state = self.state();
        let room = state.unsent.len() < MEMORY;
        if room {
            state.unsent.insert((item, attempt), plan);
        }
        room
    }

    /// Takes the unreported outcome of the item's `attempt`, if any.
    pub fn take_unsent(&self, item: &ItemKey, attempt: u32) -> Option<Plan> {
        self.state().unsent.remove(&(item.clone(), attempt))
    }
}

/// The messages and items a batch holds; let go when dropped, also when
/// the batch's future is (a cut-off invocation).
pub(super) struct Hold<'a> {
    memory: &'a Memory,
    messages: Vec<String>,
    items: Vec<ItemKey>,
}

impl Hold<'_> {
    /// The held messages whose latest receipt is not the one they came with.
    pub fn renewed(&self, batch: &[crate::domain::ports::Delivery]) -> HashMap<String, String> {
        let state = self.memory.state();
        batch
            .iter()
            .filter(|d| self.messages.contains(&d.message_id))
            .filter_map(|d| {
                let latest = state.held.get(&d.message_id)?;
                (latest != &d.receipt).then(|| (d.message_id.clone(), latest.clone()))
            })
            .collect()
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut state = self.memory.state();
        for id in &self.messages {
            state.held.remove(id);
        }
        for item in &self.items {
            state.items.remove(item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_outcomes_only_move_up() {
        let k = |status, attempts| Known { status, attempts };
        assert_eq!(
            k(ItemStatus::Pending, 3).merge(k(ItemStatus::Failed, 1)),
            k(ItemStatus::Failed, 3)
        );
        assert_eq!(
            k(ItemStatus::Succeeded, 1).merge(k(ItemStatus::Failed, 2)),
            k(ItemStatus::Succeeded, 2)
        );
    }

    #[test]
    fn recent_forgets_the_oldest() {
        let mut r: Recent<u32, ()> = Recent::default();
        for i in 0..(MEMORY as u32 + 10) {
            r.insert_with(i, (), |_, _| {});
        }
        assert_eq!(r.map.len(), MEMORY);
        assert!(!r.map.contains_key(&0) && r.map.contains_key(&(MEMORY as u32 + 9)));
    }
}
