//! The worker's side of flow control: the limits an item's message carries
//! and the wait for its run's (and key's) limiter before an attempt starts
//! (see [`crate::flow`]).

use super::{Worker, HOLD_IN_PLACE};
use crate::flow::{Admission, FlowLimits, Ticket};
use crate::wire::message::WorkBody;
use std::time::Duration;
use tokio::time::Instant;

impl Worker {
    /// The flow limits of `body`'s run: its own, and with a key and no
    /// `--key-concurrency`, half of this worker's places per key, so that
    /// the other half stays open to every other key.
    pub(super) fn limits(&self, body: &WorkBody) -> FlowLimits {
        let mut limits = match &body.flow {
            Some(f) => f.clone(),
            None => FlowLimits::default(),
        };
        if body.key.is_some() && limits.key_concurrency.is_none() {
            limits.key_concurrency = self.config.concurrency.map(|c| (c as u32 / 2).max(1));
        }
        limits
    }

    /// Waits for the flow control of `body`'s run (and key) to let its item
    /// start. A wait of the whole run is waited in place, its message kept
    /// hidden, up to [`HOLD_IN_PLACE`] and within the invocation's time;
    /// past that, or when the item's key must wait, the item is to be sent
    /// round after the returned delay, its attempt unused.
    pub(super) async fn admit(
        &self,
        body: &WorkBody,
        limits: &FlowLimits,
        deadline: Option<Instant>,
    ) -> Result<Ticket, Duration> {
        let held = Instant::now();
        loop {
            match self.limiter.admit(&body.run, body.key.as_deref(), limits) {
                Admission::Go { ticket, wait } => {
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    return Ok(ticket);
                }
                Admission::Later(after) => return Err(after),
                Admission::Wait(after) => {
                    let until = Instant::now() + after;
                    let in_time = deadline.is_none_or(|d| until + self.config.deadline_margin < d);
                    if !in_time || until > held + HOLD_IN_PLACE {
                        return Err(after);
                    }
                    // Asked again at least every second: a probe's answer
                    // may open the way sooner.
                    tokio::time::sleep(after.min(Duration::from_secs(1))).await;
                }
            }
        }
    }
}
