//! [`Ledger`] on SQLite: the `runs` table (one row per run, with its tally)
//! and the `ledger` table (one row per item of a run, versioned).

use super::multi_insert::MultiInsert;
use super::{corrupt, corrupt_id, EmbeddedStore};
use crate::db::{DbError, Refusal};
use crate::port_err;
use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Row};
use settle_core::domain::{ItemId, ItemRecord, RedriveScope, RunConfig, RunId, RunRecord};
use settle_core::ports::{Ledger, LedgerBatch, PortError, Versioned, MAX_COMMIT_ACTIONS};
use std::collections::HashMap;
use std::sync::LazyLock;

/// A run's row: the record, its config and its redrive scope as stored.
type RunRow = (RunRecord, String, Option<String>);

fn run_from_row(r: &Row<'_>) -> rusqlite::Result<RunRow> {
    let id: String = r.get(0)?;
    let config: String = r.get(2)?;
    let run = RunRecord {
        id: RunId::parse(&id).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })?,
        created_at: r.get::<_, i64>(1)? as u64,
        config: RunConfig::default(),
        total: r.get::<_, i64>(3)? as u64,
        enqueued: r.get::<_, i64>(4)? as u64,
        cursor: r.get(5)?,
        dispatched: r.get(6)?,
        succeeded: r.get::<_, i64>(7)? as u64,
        failed: r.get::<_, i64>(8)? as u64,
        settled_at: r.get::<_, Option<i64>>(9)?.map(|v| v as u64),
        redriving: r.get(10)?,
        redrive: None,
        throttled: r.get::<_, Option<i64>>(12)?.unwrap_or(0).max(0) as u64,
        waiting: r.get::<_, Option<i64>>(13)?.unwrap_or(0).max(0) as u64,
        waiting_until: r.get::<_, Option<i64>>(14)?.map(|v| v as u64),
    };
    Ok((run, config, r.get(11)?))
}

const RUN_COLUMNS: &str =
    "runs.run_id, created_at, config, total, enqueued, cursor, dispatched, succeeded, failed, settled_at, \
     EXISTS (SELECT 1 FROM redrives WHERE redrives.run_id = runs.run_id), \
     (SELECT scope FROM redrive_scopes WHERE redrive_scopes.run_id = runs.run_id), \
     f.throttled, f.waiting, f.waiting_until";

/// The runs table with each run's flow counts, as [`RUN_COLUMNS`] reads them.
const RUNS: &str = "runs LEFT JOIN run_flow f ON f.run_id = runs.run_id";

fn get_run(c: &Connection, id: &str) -> Result<Option<RunRecord>, DbError> {
    let row = c
        .prepare_cached(&format!(
            "SELECT {RUN_COLUMNS} FROM {RUNS} WHERE runs.run_id = ?1"
        ))?
        .query_row(params![id], run_from_row)
        .optional()?;
    row.map(finish_run).transpose()
}

fn finish_run((mut run, config, scope): RunRow) -> Result<RunRecord, DbError> {
    run.config = serde_json::from_str(&config).map_err(|e| corrupt("run config", e))?;
    run.redrive = scope
        .map(|s| RedriveScope::decode(&s))
        .transpose()
        .map_err(|e| corrupt("redrive scope of a run", e))?;
    Ok(run)
}

/// Inserts a new run's row; refused if the id exists.
pub(super) fn insert_run(c: &Connection, run: &RunRecord) -> Result<(), DbError> {
    let config = serde_json::to_string(&run.config).map_err(Refusal::Encode)?;
    let added = c.execute(
        "INSERT OR IGNORE INTO runs (run_id, created_at, config, total, enqueued, cursor, \
         dispatched, succeeded, failed, settled_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            run.id.as_str(), run.created_at as i64, config, run.total as i64,
            run.enqueued as i64, run.cursor, run.dispatched, run.succeeded as i64,
            run.failed as i64, run.settled_at.map(|v| v as i64)
        ],
    )?;
    if added == 0 {
        return Err(Refusal::RunExists(run.id.clone()).into());
    }
    Ok(())
}

/// New ledger rows go in [`INSERT_ROWS`](super::multi_insert::INSERT_ROWS) to a statement, as the load's
/// items do: a ledger commit is mostly inserts, and per statement SQLite
/// and rusqlite's statement cache cost as much as a row does.
static LEDGER_INSERT: LazyLock<MultiInsert> = LazyLock::new(|| {
    MultiInsert::new(
        "INSERT OR IGNORE INTO ledger (run_id, item_id, status, version, record) VALUES",
        "(?, ?, ?, 1, ?)",
    )
});

#[async_trait]
impl Ledger for EmbeddedStore {
    async fn create_run(&self, run: &RunRecord) -> Result<(), PortError> {
        let run = run.clone();
        self.db
            .write(move |c| insert_run(c, &run))
            .await
            .map_err(|e| match e {
                DbError::Refused(e) => PortError::Invalid(e.to_string()),
                e => port_err("create_run")(e),
            })
    }

    async fn run(&self, id: &RunId) -> Result<Option<RunRecord>, PortError> {
        let id = id.clone();
        self.db
            .read(move |c| get_run(c, id.as_str()))
            .await
            .map_err(port_err("run"))
    }

    async fn runs(&self, limit: usize) -> Result<Vec<RunRecord>, PortError> {
        self.db
            .read(move |c| {
                let rows: Vec<_> = c
                    .prepare_cached(&format!(
                        "SELECT {RUN_COLUMNS} FROM {RUNS} ORDER BY created_at DESC, runs.run_id DESC LIMIT ?1"
                    ))?
                    .query_map(params![limit as i64], run_from_row)?
                    .collect::<Result<_, _>>()?;
                rows.into_iter().map(finish_run).collect()
            })
            .await
            .map_err(port_err("runs"))
    }

    async fn record_dispatch(
        &self,
        id: &RunId,
        enqueued: u64,
        cursor: Option<&str>,
        dispatched: bool,
    ) -> Result<(), PortError> {
        let (id, cursor) = (id.clone(), cursor.map(str::to_owned));
        self.db
            .write(move |c| {
                let n = c
                    .prepare_cached(
                        "UPDATE runs SET enqueued = max(enqueued, ?2), \
                         cursor = CASE WHEN ?2 >= enqueued THEN ?3 ELSE cursor END, \
                         dispatched = dispatched OR ?4 WHERE run_id = ?1",
                    )?
                    .execute(params![id.as_str(), enqueued as i64, cursor, dispatched])?;
                if n == 0 {
                    return Err(Refusal::NoRun {
                        run: id,
                        why: "not found",
                    }
                    .into());
                }
                Ok(())
            })
            .await
            .map_err(port_err("record_dispatch"))
    }

    async fn items(
        &self,
        keys: &[(RunId, ItemId)],
    ) -> Result<HashMap<(RunId, ItemId), Versioned<ItemRecord>>, PortError> {
        let keys = keys.to_vec();
        self.db
            .read(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT version, record FROM ledger WHERE run_id = ?1 AND item_id = ?2",
                )?;
                let mut out = HashMap::with_capacity(keys.len());
                for (run, item) in keys {
                    let row: Option<(i64, String)> = st
                        .query_row(params![run.as_str(), item.as_str()], |r| {
                            Ok((r.get(0)?, r.get(1)?))
                        })
                        .optional()?;
                    if let Some((version, record)) = row {
                        let value =
                            serde_json::from_str(&record).map_err(|e| corrupt("item record", e))?;
                        out.insert(
                            (run, item),
                            Versioned {
                                value,
                                version: version as u64,
                            },
                        );
                    }
                }
                Ok(out)
            })
            .await
            .map_err(port_err("items"))
    }

    async fn commit(&self, batch: LedgerBatch) -> Result<Vec<RunRecord>, PortError> {
        if batch.puts.len() + batch.tallies.len() > MAX_COMMIT_ACTIONS {
            return Err(PortError::Invalid(format!(
                "a commit holds at most {MAX_COMMIT_ACTIONS} rows, got {}",
                batch.puts.len() + batch.tallies.len()
            )));
        }
        // Serialized here, not on the writer thread that every caller waits for.
        let rows: Vec<(String, String, &'static str, Option<u64>, String)> = batch
            .puts
            .iter()
            .map(|p| {
                let record = p.record.encode();
                (
                    p.run.to_string(),
                    p.item.to_string(),
                    p.record.status.as_str(),
                    p.expected,
                    record,
                )
            })
            .collect();
        let tallies = batch.tallies;
        let res = self
            .db
            .write_atomic(move |c| {
                // Each put is conditional: insert-if-absent, or
                // update-if-version-matches; a row left unchanged means
                // someone else won, and the whole commit is refused.
                let (inserts, updates): (Vec<_>, Vec<_>) =
                    rows.iter().partition(|(.., expected, _)| expected.is_none());
                let written = LEDGER_INSERT.run(c, &inserts, |st, first, row| {
                    let (run, item, status, _, record) = row;
                    st.raw_bind_parameter(first, run.as_str())?;
                    st.raw_bind_parameter(first + 1, item.as_str())?;
                    st.raw_bind_parameter(first + 2, *status)?;
                    st.raw_bind_parameter(first + 3, record.as_str())
                })?;
                if written < inserts.len() {
                    return Err(PortError::Conflict.into());
                }
                let mut update = c.prepare_cached(
                    "UPDATE ledger SET status = ?3, version = version + 1, record = ?4 \
                     WHERE run_id = ?1 AND item_id = ?2 AND version = ?5",
                )?;
                for (run, item, status, expected, record) in updates {
                    let v = expected.unwrap_or_default() as i64;
                    if update.execute(params![run, item, status, record, v])? == 0 {
                        return Err(PortError::Conflict.into());
                    }
                }
                let mut tally = c.prepare_cached(
                    "UPDATE runs SET succeeded = succeeded + ?2, failed = failed + ?3 WHERE run_id = ?1",
                )?;
                let mut flow = c.prepare_cached(
                    "INSERT INTO run_flow (run_id, throttled, waiting, waiting_until) \
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT (run_id) DO UPDATE SET \
                     throttled = throttled + excluded.throttled, \
                     waiting = waiting + excluded.waiting, \
                     waiting_until = MAX(COALESCE(waiting_until, 0), COALESCE(excluded.waiting_until, 0))",
                )?;
                let mut runs = Vec::new();
                for (run, d) in &tallies {
                    if d.moves_flow() {
                        let until = d.waiting_until.map(|u| u as i64);
                        flow.execute(params![run.as_str(), d.throttled, d.waiting, until])?;
                    }
                    if tally.execute(params![run.as_str(), d.succeeded, d.failed])? == 0 {
                        return Err(Refusal::NoRun {
                            run: run.clone(),
                            why: "not found",
                        }
                        .into());
                    }
                    runs.extend(get_run(c, run.as_str())?);
                }
                Ok(runs)
            })
            .await;
        res.map_err(port_err("commit"))
    }

    async fn set_redriving(&self, id: &RunId, open: bool) -> Result<(), PortError> {
        let id = id.clone();
        self.db
            .write(move |c| {
                if get_run(c, id.as_str())?.is_none() {
                    return Err(PortError::NotFound(format!("run {id}")).into());
                }
                if open {
                    c.execute(
                        "INSERT OR IGNORE INTO redrives (run_id, opened_at) VALUES (?1, ?2)",
                        params![id.as_str(), settle_core::domain::now_millis() as i64],
                    )?;
                } else {
                    c.execute(
                        "DELETE FROM redrives WHERE run_id = ?1",
                        params![id.as_str()],
                    )?;
                }
                Ok(())
            })
            .await
            .map_err(port_err("set_redriving"))
    }

    async fn set_redrive(&self, id: &RunId, scope: &RedriveScope) -> Result<(), PortError> {
        let (id, scope) = (id.clone(), scope.encode());
        self.db
            .write(move |c| {
                if get_run(c, id.as_str())?.is_none() {
                    return Err(PortError::NotFound(format!("run {id}")).into());
                }
                c.execute(
                    "INSERT OR REPLACE INTO redrive_scopes (run_id, scope) VALUES (?1, ?2)",
                    params![id.as_str(), scope],
                )?;
                Ok(())
            })
            .await
            .map_err(port_err("set_redrive"))
    }

    async fn clear_redrive(&self, id: &RunId, scope: &RedriveScope) -> Result<bool, PortError> {
        let (id, scope) = (id.clone(), scope.encode());
        self.db
            .write(move |c| {
                if get_run(c, id.as_str())?.is_none() {
                    return Err(PortError::NotFound(format!("run {id}")).into());
                }
                Ok(c.execute(
                    "DELETE FROM redrive_scopes WHERE run_id = ?1 AND scope = ?2",
                    params![id.as_str(), scope],
                )? == 1)
            })
            .await
            .map_err(port_err("clear_redrive"))
    }

    async fn mark_settled(&self, id: &RunId, at: u64) -> Result<bool, PortError> {
        let id = id.clone();
        self.db
            .write(move |c| {
                Ok(c.execute(
                    "UPDATE runs SET settled_at = ?2 WHERE run_id = ?1 AND settled_at IS NULL",
                    params![id.as_str(), at as i64],
                )? == 1)
            })
            .await
            .map_err(port_err("mark_settled"))
    }

    async fn failures(
        &self,
        run: &RunId,
        after: Option<&ItemId>,
        limit: usize,
    ) -> Result<Vec<(ItemId, ItemRecord)>, PortError> {
        let (run, after) = (
            run.clone(),
            after.map(|a| a.as_str().to_owned()).unwrap_or_default(),
        );
        self.db
            .read(move |c| {
                let rows: Vec<(String, String)> = c
                    .prepare_cached(
                        "SELECT item_id, record FROM ledger WHERE run_id = ?1 AND status = 'failed' \
                         AND item_id > ?2 ORDER BY item_id LIMIT ?3",
                    )?
                    .query_map(params![run.as_str(), after, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                rows.into_iter()
                    .map(|(id, rec)| {
                        Ok((
                            ItemId::new(id).map_err(corrupt_id)?,
                            serde_json::from_str(&rec).map_err(|e| corrupt("item record", e))?,
                        ))
                    })
                    .collect()
            })
            .await
            .map_err(port_err("failures"))
    }
}
