//! The item source and the ledger on SQLite: one handle, [`EmbeddedStore`],
//! implements both ports over the same database. The source (items, their
//! loads and claims) is in [`source`], the ledger (runs and item rows) in
//! [`ledger`]; both write rows in multi-row INSERTs ([`multi_insert`]).

mod ledger;
mod multi_insert;
mod source;

use crate::db::{Db, DbError};

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

fn corrupt(what: &str, e: impl std::fmt::Display) -> DbError {
    DbError::Refused(format!("stored {what} is unreadable: {e}").into())
}
