//! The stages of a run, as plain async code over the ports: `dispatch`
//! (items to work messages), `work` (a processor per item, results out),
//! `reduce` (results into the ledger), `redrive` (dead letters back to
//! work) and `reconcile` (dead letters whose result never arrived).

pub mod dispatch;
pub mod reconcile;
pub mod redrive;
pub mod reduce;
pub mod work;
