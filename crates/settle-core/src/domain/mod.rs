//! The domain and its ports: items, runs and their ledger records
//! (`model`, re-exported here), the processor a run uses, the
//! idempotency utility, and the traits every backend implements.

pub mod backend;
pub mod idempotency;
mod model;
pub mod ports;
pub mod processor;
mod redrive_scope;

pub use model::*;
pub use redrive_scope::{RedriveScope, Selection};
