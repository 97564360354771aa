//! What tests, simulations and demos drive the pipeline with, kept out of
//! the domain: the `scripted` processor (which the CLI's
//! `--processor scripted` also runs) and the simulated wall clock.

pub mod clock;
pub mod scripted;

pub use clock::{simulate_wall_clock, SimulatedWallClock};
pub use scripted::{Script, Scripted};

/// An item with the id `i` and this payload, for the unit tests.
#[cfg(test)]
pub(crate) fn item(payload: &str) -> crate::domain::Item {
    crate::domain::Item::new(
        crate::domain::ItemId::new("i").unwrap(),
        serde_json::value::RawValue::from_string(payload.into()).unwrap(),
    )
}
