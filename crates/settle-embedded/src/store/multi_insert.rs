//! Multi-row INSERT statements, shared by the source's items and the
//! ledger's rows.

use crate::db::DbError;
use rusqlite::Connection;

/// Rows one INSERT statement writes. SQLite's per-statement work (step,
/// reset, halt) then comes once per this many items rather than once per
/// item (docs/performance.md has the figures).
///
/// These INSERTs say OR IGNORE, and their callers count the rows written
/// instead: under the default ABORT, a NOT NULL column makes SQLite keep a
/// statement journal for a multi-row INSERT (a copy of every page it
/// touches, in case a later row fails), a cost to the writer on every
/// insert. Nothing bound here is ever NULL, so a row is ignored only
/// for an existing key, and a short count is an error or a conflict.
pub(super) const INSERT_ROWS: usize = 16;

/// A multi-row INSERT OR IGNORE of one table (see [`INSERT_ROWS`]).
pub(super) struct MultiInsert {
    /// The statement for [`INSERT_ROWS`] rows, and the one for a single row.
    full: String,
    one: String,
    /// Parameters per row.
    params: usize,
}

impl MultiInsert {
    /// `head` is `INSERT OR IGNORE INTO t (cols) VALUES`, `row` one row's `(?, ...)`.
    pub(super) fn new(head: &str, row: &str) -> Self {
        Self {
            full: format!("{head} {}", vec![row; INSERT_ROWS].join(", ")),
            one: format!("{head} {row}"),
            params: row.matches('?').count(),
        }
    }

    /// Inserts `rows` in order, full statements while they fill and then one
    /// row at a time; `bind` binds a row from parameter index `first` on.
    /// Returns the rows written.
    pub(super) fn run<T>(
        &self,
        c: &Connection,
        rows: &[T],
        bind: impl Fn(&mut rusqlite::Statement<'_>, usize, &T) -> rusqlite::Result<()>,
    ) -> Result<usize, DbError> {
        let mut written = 0;
        let mut at = 0;
        while at < rows.len() {
            let n = if rows.len() - at >= INSERT_ROWS {
                INSERT_ROWS
            } else {
                1
            };
            let mut st = c.prepare_cached(if n == INSERT_ROWS {
                &self.full
            } else {
                &self.one
            })?;
            for (i, row) in rows[at..at + n].iter().enumerate() {
                bind(&mut st, self.params * i + 1, row)?;
            }
            written += st.raw_execute()?;
            at += n;
        }
        Ok(written)
    }
}
