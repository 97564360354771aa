//! The simulated wall clock: a simulation runs on a current-thread runtime
//! with paused time, and [`now_millis`](crate::domain::now_millis) on its thread follows tokio's clock
//! instead of the system's.

use crate::domain::Millis;
use std::cell::Cell;

thread_local! {
    /// This thread's simulated wall clock, if any: the epoch it started at,
    /// and tokio's instant at that moment.
    static SIMULATED: Cell<Option<(Millis, tokio::time::Instant)>> = const { Cell::new(None) };
}

/// This thread's simulated time, if it runs a simulation.
pub(crate) fn simulated_now() -> Option<Millis> {
    SIMULATED
        .with(Cell::get)
        .map(|(epoch, start)| epoch + start.elapsed().as_millis() as Millis)
}

/// Makes [`now_millis`](crate::domain::now_millis) on this thread advance with tokio's clock from
/// `epoch` until the guard drops. A simulation runs on a current-thread
/// runtime with paused time: every timestamp the stages and the embedded
/// engine take (visibility timeouts, claim expiries) then follows the same
/// virtual clock as their sleeps and timeouts, and a replay sees the same
/// times.
pub fn simulate_wall_clock(epoch: Millis) -> SimulatedWallClock {
    let previous = SIMULATED.with(|c| c.replace(Some((epoch, tokio::time::Instant::now()))));
    SimulatedWallClock { previous }
}

/// Restores the thread's previous clock when dropped.
#[derive(Debug)]
#[must_use = "the simulated clock ends when this guard drops"]
pub struct SimulatedWallClock {
    previous: Option<(Millis, tokio::time::Instant)>,
}

impl Drop for SimulatedWallClock {
    fn drop(&mut self) {
        SIMULATED.with(|c| c.set(self.previous));
    }
}
