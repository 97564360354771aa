//! Settle's core, in layers: the domain and its ports ([`domain`]: small
//! traits every backend implements), the wire formats ([`wire`]), the
//! stages ([`stages`]: dispatch, work, reduce, redrive, reconcile) as plain
//! async code over the ports, and the local [`runner`] that drives them.
//! [`testing`] holds the scripted processor and the simulated clock. No AWS
//! and no Lambda types live here.

pub mod domain;
pub mod flow;
pub mod runner;
pub mod stages;
pub mod testing;
pub mod wire;

// Each module is also reachable from the crate's root, where the other
// crates name it (`settle_core::ports::Queue`).
pub use domain::{backend, idempotency, ports, processor};
pub use stages::{dispatch, reconcile, redrive, reduce, work};
pub use wire::{jsonl, message};

pub use domain::backend::{Backend, Capabilities};
pub use domain::idempotency::{Idempotency, IdempotencyKey, IdempotencyStore};
pub use domain::ports::{Ledger, PortError, Queue, Source};
pub use domain::processor::{
    AttemptContext, BatchAttempt, BatchProcessor, ExecProtocol, Processor, ProcessorSpec,
};
pub use domain::{
    Item, ItemId, ItemRecord, ItemStatus, ProcessError, RunConfig, RunId, RunRecord, RunStatus,
};
pub use testing::Scripted;
