//! [`Source`] on SQLite: the `items` table in load order, `source.claimed_upto`
//! (items at or below it are claimed) and the `claims` table (which run took
//! which range of items).

use super::ledger::insert_run;
use super::multi_insert::{MultiInsert, INSERT_ROWS};
use super::{corrupt, corrupt_id, EmbeddedStore};
use crate::bloom::Seen;
use crate::db::{DbError, Refusal};
use crate::port_err;
use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::value::RawValue;
use settle_core::domain::{Item, ItemId, RunId, RunRecord};
use settle_core::ports::{LineError, LoadError, LoadInput, PortError, Source};
use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

/// Items parsed per chunk handed to the writer, and chunks parsed ahead.
const PARSE_CHUNK: usize = 1024;
const PARSE_AHEAD: usize = 4;

/// One parsed line, and whether its id may have come earlier in the input.
type Parsed = Result<(u64, Item, bool), LineError>;

/// Runs the input (reading and parsing the items file) on a thread of its
/// own, a few chunks ahead of the consumer: a load is one transaction on the
/// writer thread, which every other write waits for, so it should only
/// insert. The same thread tells which ids may repeat an earlier one
/// ([`Seen`]), so that the writer looks up only those. The thread stops at
/// the input's first error or when the consumer goes away.
fn parse_aside(items: LoadInput) -> Box<dyn Iterator<Item = Parsed> + Send> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Parsed>>(PARSE_AHEAD);
    let spawned = std::thread::Builder::new()
        .name("settle-load-parse".into())
        .spawn(move || {
            let mut seen = Seen::new();
            let mut chunk = Vec::with_capacity(PARSE_CHUNK);
            for entry in items {
                let last = entry.is_err();
                chunk.push(entry.map(|(line, item)| {
                    let maybe = seen.insert(item.id.as_str());
                    (line, item, maybe)
                }));
                if chunk.len() == PARSE_CHUNK || last {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(PARSE_CHUNK));
                    if tx.send(full).is_err() || last {
                        return;
                    }
                }
            }
            let _ = tx.send(chunk);
        });
    match spawned {
        Ok(_) => Box::new(rx.into_iter().flatten()),
        Err(e) => Box::new(std::iter::once(Err(LineError {
            line: 0,
            reason: format!("cannot start the parsing thread: {e}"),
        }))),
    }
}

/// Ids that may repeat an earlier one, held until [`find_duplicate`]
/// checks them; a check runs when this many have gathered (and at the end
/// of the load), so that a file full of repeats cannot fill memory (at
/// most some 20 MiB of 256-character ids). A load of distinct ids raises
/// few false alarms (0.14% of 10M ids; the command is in
/// docs/performance.md), so it checks once, at its end.
const SUSPECTS_MAX: usize = 1 << 16;

/// Inserts a load's items, all or none (the caller's savepoint undoes the
/// inserts on an error). Items have no index on their id: an id is checked
/// against the ids before it only when a Bloom filter says it may repeat
/// one, by a scan of the pending items for all such suspects at once.
/// Errors come in file order: the first bad line or repeated id.
fn load_items(
    c: &Connection,
    items: impl Iterator<Item = Parsed>,
    suspects_max: usize,
) -> Result<u64, DbError> {
    let upto: i64 = c.query_row("SELECT claimed_upto FROM source", [], |r| r.get(0))?;
    // Items are never deleted, so this load's seqs are the ones above.
    let first_seq: i64 = c.query_row("SELECT coalesce(max(seq), 0) + 1 FROM items", [], |r| {
        r.get(0)
    })?;
    // Items still pending from an earlier load: any id may repeat one of
    // theirs, and the load's own filter knows nothing of them.
    let mut earlier: Option<Seen> = None;
    {
        let mut st = c.prepare("SELECT item_id FROM items WHERE seq > ?1")?;
        let mut rows = st.query(params![upto])?;
        while let Some(r) = rows.next()? {
            let id = r.get_ref(0)?.as_str().map_err(rusqlite::Error::from)?;
            earlier.get_or_insert_with(Seen::new).insert(id);
        }
    }
    let mut rows = Rows::default();
    let mut suspects: HashSet<String> = HashSet::new();
    let mut n = 0u64;
    for entry in items {
        let (line, item, maybe_seen) = match entry {
            Ok(parsed) => parsed,
            // A repeat on an earlier line is the first error.
            Err(bad) => {
                rows.insert(c)?;
                return Err(find_duplicate(c, upto, first_seq, &suspects)?
                    .unwrap_or(bad)
                    .into());
            }
        };
        n += 1;
        let suspect = maybe_seen
            || earlier
                .as_ref()
                .is_some_and(|e| e.contains(item.id.as_str()));
        if suspect {
            suspects.insert(item.id.as_str().to_owned());
        }
        rows.push(c, line, item)?;
        if suspect && suspects.len() >= suspects_max {
            rows.insert(c)?;
            if let Some(dup) = find_duplicate(c, upto, first_seq, &suspects)? {
                return Err(dup.into());
            }
            // None repeats an earlier id. A later repeat of one of them
            // is itself a suspect (the filter has no false negatives).
            suspects.clear();
        }
    }
    rows.insert(c)?;
    match find_duplicate(c, upto, first_seq, &suspects)? {
        Some(dup) => Err(dup.into()),
        None => Ok(n),
    }
}

static ITEMS_INSERT: LazyLock<MultiInsert> = LazyLock::new(|| {
    MultiInsert::new(
        "INSERT OR IGNORE INTO items (item_id, payload, line) VALUES",
        "(?, ?, ?)",
    )
});

/// Items held back until a multi-row INSERT of [`INSERT_ROWS`] takes them.
#[derive(Default)]
struct Rows(Vec<(u64, Item)>);

impl Rows {
    fn push(&mut self, c: &Connection, line: u64, item: Item) -> Result<(), DbError> {
        self.0.push((line, item));
        if self.0.len() == INSERT_ROWS {
            self.insert(c)?;
        }
        Ok(())
    }

    /// Inserts the rows held, in order (so their seqs follow file order).
    fn insert(&mut self, c: &Connection) -> Result<(), DbError> {
        // A full set in one statement; the load's last few one by one.
        let written = ITEMS_INSERT.run(c, &self.0, |st, first, (line, item)| {
            st.raw_bind_parameter(first, item.id.as_str())?;
            st.raw_bind_parameter(first + 1, item.payload.get())?;
            st.raw_bind_parameter(first + 2, *line as i64)
        })?;
        if written != self.0.len() {
            return Err(Refusal::ShortInsert {
                given: self.0.len(),
                written,
            }
            .into());
        }
        self.0.clear();
        Ok(())
    }
}

/// The first pending item, in load order, whose id is among `suspects` and
/// repeats an earlier pending item's. One pass over the pending items
/// (`seq > upto`); the current load's items are those from `first_seq` on.
fn find_duplicate(
    c: &Connection,
    upto: i64,
    first_seq: i64,
    suspects: &HashSet<String>,
) -> Result<Option<LineError>, DbError> {
    if suspects.is_empty() {
        return Ok(None);
    }
    // Each suspect id's first occurrence: seq and line.
    let mut firsts: HashMap<&str, (i64, i64)> = HashMap::with_capacity(suspects.len());
    let mut st =
        c.prepare_cached("SELECT seq, item_id, line FROM items WHERE seq > ?1 ORDER BY seq")?;
    let mut rows = st.query(params![upto])?;
    while let Some(r) = rows.next()? {
        let id = r.get_ref(1)?.as_str().map_err(rusqlite::Error::from)?;
        let Some(id) = suspects.get(id) else { continue };
        let (seq, line): (i64, i64) = (r.get(0)?, r.get(2)?);
        match firsts.get(id.as_str()) {
            None => {
                firsts.insert(id, (seq, line));
            }
            Some(&(first, first_line)) => {
                let reason = if first >= first_seq {
                    format!("duplicate id {id:?} (first on line {first_line})")
                } else {
                    format!("id {id:?} is already pending from an earlier load; dispatch them first (settle dispatch), or remove this line")
                };
                return Ok(Some(LineError {
                    line: line as u64,
                    reason,
                }));
            }
        }
    }
    Ok(None)
}

/// Claims up to `limit` pending items for `run` (see [`Source::claim`]).
fn claim_in(c: &Connection, run: &RunId, limit: u64) -> Result<u64, DbError> {
    let upto: i64 = c.query_row("SELECT claimed_upto FROM source", [], |r| r.get(0))?;
    // A run claims only what was loaded before its first claim: an
    // item loaded later (tomorrow's file, with the same ids) is
    // another run's work, and could repeat an id this run has.
    c.execute(
        "UPDATE runs SET claim_bound = (SELECT coalesce(max(seq), 0) FROM items) \
             WHERE run_id = ?1 AND claim_bound IS NULL",
        params![run.as_str()],
    )?;
    let bound: Option<i64> = c
        .query_row(
            "SELECT claim_bound FROM runs WHERE run_id = ?1",
            params![run.as_str()],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    let Some(bound) = bound else {
        return Err(Refusal::NoRun {
            run: run.clone(),
            why: "does not exist",
        }
        .into());
    };
    let hi: Option<i64> = c
            .query_row(
                "SELECT max(seq) FROM (SELECT seq FROM items WHERE seq > ?1 AND seq <= ?3 ORDER BY seq LIMIT ?2)",
                params![upto, limit.min(i64::MAX as u64) as i64, bound],
                |r| r.get(0),
            )?;
    let Some(hi) = hi else { return Ok(0) };
    let n: i64 = c.query_row(
        "SELECT count(*) FROM items WHERE seq > ?1 AND seq <= ?2",
        params![upto, hi],
        |r| r.get(0),
    )?;
    let changed = c.execute(
        "UPDATE runs SET total = total + ?2 WHERE run_id = ?1 AND dispatched = 0",
        params![run.as_str(), n],
    )?;
    if changed == 0 {
        return Err(Refusal::NoRun {
            run: run.clone(),
            why: "does not exist or has finished dispatching",
        }
        .into());
    }
    // Extend the run's last segment when it ends where this claim
    // starts (one dispatcher: one segment), so reading stays cheap.
    let extended = c.execute(
        "UPDATE claims SET hi = ?3 WHERE run_id = ?1 AND hi = ?2",
        params![run.as_str(), upto, hi],
    )?;
    if extended == 0 {
        c.execute(
            "INSERT INTO claims (run_id, lo, hi) VALUES (?1, ?2, ?3)",
            params![run.as_str(), upto + 1, hi],
        )?;
    }
    c.execute("UPDATE source SET claimed_upto = ?1", params![hi])?;
    Ok(n as u64)
}

/// A load's refusal of a line, or the database's failure.
fn load_err(e: DbError) -> LoadError {
    match e {
        DbError::Refused(Refusal::Line(line)) => LoadError::Line(line),
        e => LoadError::Port(port_err("load")(e)),
    }
}

#[async_trait]
impl Source for EmbeddedStore {
    async fn load(&self, items: LoadInput) -> Result<u64, LoadError> {
        let items = parse_aside(items);
        self.db
            .write_atomic(move |c| load_items(c, items, SUSPECTS_MAX))
            .await
            .map_err(load_err)
    }

    async fn load_run(&self, run: &RunRecord, items: LoadInput) -> Result<u64, LoadError> {
        let items = parse_aside(items);
        let run = run.clone();
        self.db
            .write_atomic(move |c| {
                let n = load_items(c, items, SUSPECTS_MAX)?;
                if n > 0 {
                    insert_run(c, &run)?;
                    claim_in(c, &run.id, u64::MAX)?;
                }
                Ok(n)
            })
            .await
            .map_err(load_err)
    }

    async fn pending(&self) -> Result<u64, PortError> {
        self.db
            .read(|c| {
                Ok(c.query_row(
                    "SELECT count(*) FROM items WHERE seq > (SELECT claimed_upto FROM source)",
                    [],
                    |r| r.get::<_, i64>(0),
                )? as u64)
            })
            .await
            .map_err(port_err("pending"))
    }

    async fn claim(&self, run: &RunId, limit: usize) -> Result<u64, PortError> {
        let run = run.clone();
        self.db
            .write(move |c| claim_in(c, &run, limit as u64))
            .await
            .map_err(port_err("claim"))
    }

    async fn claimed(
        &self,
        run: &RunId,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Item>, Option<String>), PortError> {
        let after: i64 = match cursor {
            None => 0,
            Some(c) => c.parse().map_err(|_| {
                PortError::Invalid(format!("cursor {c:?} is not an embedded cursor"))
            })?,
        };
        let run = run.clone();
        self.db
            .read(move |c| {
                // Segment by segment: one ORDER BY over a join would sort the whole run.
                let segments: Vec<(i64, i64)> = c
                    .prepare_cached("SELECT lo, hi FROM claims WHERE run_id = ?1 AND hi > ?2 ORDER BY lo")?
                    .query_map(params![run.as_str(), after], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                let mut page = c.prepare_cached(
                    "SELECT seq, item_id, payload FROM items WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
                )?;
                let mut items = Vec::new();
                let mut last = after;
                for (lo, hi) in segments {
                    if items.len() >= limit {
                        break;
                    }
                    let from = after.max(lo - 1);
                    let rows = page.query_map(params![from, hi, (limit - items.len()) as i64], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
                    })?;
                    for row in rows {
                        let (seq, id, payload) = row?;
                        let id = ItemId::new(id).map_err(corrupt_id)?;
                        let payload = RawValue::from_string(payload).map_err(|e| corrupt("payload", e))?;
                        items.push(Item::new(id, payload));
                        last = seq;
                    }
                }
                let next = (!items.is_empty()).then(|| last.to_string());
                let next = next.or_else(|| (after > 0).then(|| after.to_string()));
                Ok((items, next))
            })
            .await
            .map_err(port_err("claimed"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::db::Db;

    fn parsed(line: u64, id: &str, maybe_seen: bool) -> Parsed {
        let item = Item::new(
            ItemId::new(id.to_owned()).unwrap(),
            RawValue::from_string("{}".into()).unwrap(),
        );
        Ok((line, item, maybe_seen))
    }

    fn bad(line: u64) -> Parsed {
        Err(LineError {
            line,
            reason: "not JSON".into(),
        })
    }

    /// Loads `input` with at most `cap` suspects held; the line error if any.
    async fn load(db: &Db, input: Vec<Parsed>, cap: usize) -> Result<u64, LineError> {
        match db
            .write_atomic(move |c| load_items(c, input.into_iter(), cap))
            .await
        {
            Ok(n) => Ok(n),
            Err(DbError::Refused(Refusal::Line(e))) => Err(e),
            Err(e) => panic!("{e}"),
        }
    }

    fn open() -> Db {
        let dir = tempfile::tempdir().unwrap().keep();
        Db::open(&dir.join("settle.db")).unwrap()
    }

    #[tokio::test]
    async fn the_first_error_in_the_file_wins_whether_repeat_or_bad_line() {
        let db = open();
        let input = vec![
            parsed(1, "a", false),
            parsed(2, "b", false),
            parsed(3, "a", true),
            bad(5),
        ];
        let e = load(&db, input, SUSPECTS_MAX).await.unwrap_err();
        assert_eq!(e.line, 3);
        assert_eq!(e.reason, "duplicate id \"a\" (first on line 1)");
        let input = vec![parsed(1, "a", false), bad(2), parsed(3, "a", true)];
        assert_eq!(load(&db, input, SUSPECTS_MAX).await.unwrap_err().line, 2);
        let count: i64 = db
            .read(|c| Ok(c.query_row("SELECT count(*) FROM items", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(count, 0, "nothing of a refused load is kept");
    }

    /// Items go in by sets of INSERT_ROWS and a tail one by one: all of
    /// them, in file order, and a repeat across sets is still found.
    #[tokio::test]
    async fn multi_row_inserts_keep_every_item_in_file_order() {
        let db = open();
        let count = 2 * INSERT_ROWS + 5;
        let ids = |from: usize| (from..from + count).map(|i| format!("id-{i}"));
        let input = ids(0)
            .enumerate()
            .map(|(i, id)| parsed(i as u64 + 1, &id, false));
        assert_eq!(
            load(&db, input.collect(), SUSPECTS_MAX).await.unwrap(),
            count as u64
        );
        let rows: Vec<(String, i64)> = db
            .read(|c| {
                let mut st = c.prepare("SELECT item_id, line FROM items ORDER BY seq")?;
                let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
            .await
            .unwrap();
        let expected: Vec<(String, i64)> = ids(0).zip(1..).collect();
        assert_eq!(rows, expected);

        // A second load, whose last line repeats its third: caught once
        // both are in, whichever statement took them.
        let mut input: Vec<Parsed> = ids(count)
            .enumerate()
            .map(|(i, id)| parsed(i as u64 + 1, &id, false))
            .collect();
        input.push(parsed(count as u64 + 1, &format!("id-{}", count + 2), true));
        let e = load(&db, input, SUSPECTS_MAX).await.unwrap_err();
        assert_eq!(e.line, count as u64 + 1);
        assert_eq!(
            e.reason,
            format!("duplicate id \"id-{}\" (first on line 3)", count + 2)
        );
    }

    /// With the suspects checked and let go every two, a repeat of a let-go
    /// suspect is still found: it is a suspect itself.
    #[tokio::test]
    async fn repeats_are_found_across_checks_of_a_full_suspect_set() {
        let db = open();
        let unique: Vec<Parsed> = ["a", "b", "c", "d", "e"]
            .iter()
            .enumerate()
            .map(|(i, id)| parsed(i as u64 + 1, id, true))
            .collect();
        assert_eq!(load(&db, unique, 2).await.unwrap(), 5, "false alarms load");
        let input = vec![
            parsed(1, "f", true),
            parsed(2, "g", true),
            parsed(3, "h", true),
            parsed(4, "f", true),
        ];
        let e = load(&db, input, 2).await.unwrap_err();
        assert_eq!(
            (e.line, e.reason.as_str()),
            (4, "duplicate id \"f\" (first on line 1)")
        );
        // An id pending from the first load.
        let input = vec![parsed(1, "x", false), parsed(2, "c", false)];
        let e = load(&db, input, 2).await.unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.reason.contains("already pending"), "{}", e.reason);
    }
}
