//! The item source and the ledger on SQLite: one handle, [`EmbeddedStore`],
//! implements both ports over the same database. The source (items, their
//! loads and claims) is in [`source`], the ledger (runs and item rows) in
//! [`ledger`]; both write rows in multi-row INSERTs ([`multi_insert`]).

mod ledger;
mod multi_insert;
mod source;

use crate::db::{Db, DbError, Refusal};
use settle_core::domain::IdError;

/// The source and ledger of one database.
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    db: Db,
}

impl EmbeddedStore {
    pub(crate) fn new(db: Db) -> Self {
        Self { db }
    }
}

/// A stored value that does not decode.
fn corrupt(what: &'static str, source: serde_json::Error) -> DbError {
    Refusal::Unreadable { what, source }.into()
}

/// A stored item id that is no longer valid.
fn corrupt_id(source: IdError) -> DbError {
    Refusal::BadId {
        what: "item id",
        source,
    }
    .into()
}
