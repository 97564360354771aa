//! [`IdempotencyStore`] on SQLite: table `idempotency` in the same file as
//! the ledger, one row per key. Each operation is one write job on the
//! single writer, so it is atomic with respect to every other.

use crate::db::{Db, DbError, Refusal};
use crate::port_err;
use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use settle_core::domain::Millis;
use settle_core::idempotency::{Claim, IdempotencyKey, IdempotencyRecord, IdempotencyStore};
use settle_core::ports::PortError;

/// The idempotency records of one database.
#[derive(Debug, Clone)]
pub struct EmbeddedIdempotency {
    db: Db,
}

impl EmbeddedIdempotency {
    pub(crate) fn new(db: Db) -> Self {
        Self { db }
    }
}

const IN_PROGRESS: &str = "in_progress";
const COMPLETED: &str = "completed";

/// A row: state, payload hash, token, expires_at, result.
type RawRecord = (String, String, String, Option<i64>, Option<String>);

fn read(c: &Connection, run: &str, item: &str) -> Result<Option<IdempotencyRecord>, DbError> {
    let row: Option<RawRecord> = c
        .prepare_cached(
            "SELECT state, payload_hash, token, expires_at, result FROM idempotency \
             WHERE run_id = ?1 AND item_id = ?2",
        )?
        .query_row(params![run, item], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .optional()?;
    let Some((state, payload_hash, token, expires_at, result)) = row else {
        return Ok(None);
    };
    let record = match (state.as_str(), expires_at, result) {
        (IN_PROGRESS, Some(expires_at), _) => IdempotencyRecord::InProgress {
            payload_hash,
            token,
            expires_at: expires_at as Millis,
        },
        (COMPLETED, _, Some(result)) => IdempotencyRecord::Completed {
            payload_hash,
            token,
            result,
        },
        _ => {
            return Err(Refusal::BadIdempotencyState {
                key: format!("{run}:{item}"),
                state,
            }
            .into())
        }
    };
    Ok(Some(record))
}

#[async_trait]
impl IdempotencyStore for EmbeddedIdempotency {
    async fn claim(
        &self,
        key: &IdempotencyKey,
        payload_hash: &str,
        token: &str,
        now: Millis,
        expires_at: Millis,
    ) -> Result<Claim, PortError> {
        let (run, item) = (key.run.to_string(), key.item.to_string());
        let (hash, token) = (payload_hash.to_owned(), token.to_owned());
        self.db
            .write(move |c| {
                // Insert, or take over an in-progress row of the same payload
                // that expired or is this claim's own (a repeated call).
                let changed = c
                    .prepare_cached(
                        "INSERT INTO idempotency (run_id, item_id, state, payload_hash, token, expires_at) \
                         VALUES (?1, ?2, 'in_progress', ?3, ?4, ?6) \
                         ON CONFLICT (run_id, item_id) DO UPDATE \
                         SET token = excluded.token, expires_at = excluded.expires_at \
                         WHERE state = 'in_progress' AND payload_hash = excluded.payload_hash \
                         AND (expires_at <= ?5 OR token = excluded.token)",
                    )?
                    .execute(params![run, item, hash, token, now as i64, expires_at as i64])?;
                if changed == 1 {
                    return Ok(Claim::Acquired);
                }
                let found = read(c, &run, &item)?.ok_or_else(|| {
                    DbError::from(Refusal::Vanished(format!("{run}:{item}")))
                })?;
                Ok(Claim::Existing(found))
            })
            .await
            .map_err(port_err("idempotency claim"))
    }

    async fn complete(
        &self,
        key: &IdempotencyKey,
        token: &str,
        result: &str,
    ) -> Result<(), PortError> {
        let (run, item) = (key.run.to_string(), key.item.to_string());
        let (token, result) = (token.to_owned(), result.to_owned());
        self.db
            .write(move |c| {
                let changed = c
                    .prepare_cached(
                        "UPDATE idempotency SET state = 'completed', result = ?4, expires_at = NULL \
                         WHERE run_id = ?1 AND item_id = ?2 AND token = ?3 AND state = 'in_progress'",
                    )?
                    .execute(params![run, item, token, result])?;
                if changed == 1 {
                    return Ok(());
                }
                match read(c, &run, &item)? {
                    Some(IdempotencyRecord::Completed { token: t, .. }) if t == token => Ok(()),
                    _ => Err(PortError::Conflict.into()),
                }
            })
            .await
            .map_err(port_err("idempotency complete"))
    }

    async fn release(&self, key: &IdempotencyKey, token: &str) -> Result<(), PortError> {
        let (run, item, token) = (key.run.to_string(), key.item.to_string(), token.to_owned());
        self.db
            .write(move |c| {
                c.prepare_cached(
                    "DELETE FROM idempotency WHERE run_id = ?1 AND item_id = ?2 AND token = ?3 \
                     AND state = 'in_progress'",
                )?
                .execute(params![run, item, token])?;
                Ok(())
            })
            .await
            .map_err(port_err("idempotency release"))
    }

    async fn get(&self, key: &IdempotencyKey) -> Result<Option<IdempotencyRecord>, PortError> {
        let (run, item) = (key.run.to_string(), key.item.to_string());
        self.db
            .read(move |c| read(c, &run, &item))
            .await
            .map_err(port_err("idempotency get"))
    }
}
