//! Settle's core: the domain, the ports (small traits every backend
//! implements), and the stages (dispatch, work, reduce, redrive) as plain
//! async code over the ports. No AWS and no Lambda types live here.

pub mod backend;
pub mod dispatch;
pub mod domain;
pub mod idempotency;
mod json;
pub mod jsonl;
pub mod message;
pub mod ports;
pub mod processor;
pub mod reconcile;
pub mod redrive;
pub mod reduce;
pub mod runner;
pub mod work;

pub use backend::Backend;
pub use domain::{
    Item, ItemId, ItemRecord, ItemStatus, ProcessError, RunConfig, RunId, RunRecord, RunStatus,
};
pub use idempotency::{Idempotency, IdempotencyKey, IdempotencyStore};
pub use ports::{Ledger, PortError, Queue, Source};
pub use processor::{AttemptContext, ExecProtocol, Processor, ProcessorSpec, Scripted};
