//! One SQLite file, one writer thread. Writes from every task are queued to
//! the writer, which runs as many as are waiting inside one transaction
//! (group commit), each in its own savepoint so one failing write does not
//! undo the others, and answers every caller only after the COMMIT. Reads
//! use a separate connection: WAL lets them run beside the writer.

use rusqlite::{Connection, ErrorCode, OpenFlags};
use settle_core::domain::{IdError, RunId};
use settle_core::ports::{LineError, PortError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// 'SETL': marks a SQLite file as Settle's.
pub const APPLICATION_ID: i32 = 0x5345_544c;
/// The schema this build writes.
pub const SCHEMA_VERSION: i32 = 1;
/// Writes grouped into one transaction at most.
const MAX_GROUP: usize = 4096;
/// How long a group transaction stays open for more writes. Every commit
/// rewrites its hot pages to the WAL, so fewer, larger commits are what makes
/// the embedded engine fast; a millisecond is invisible to a caller.
const LINGER: Duration = Duration::from_millis(1);
/// ... but only while writes keep coming: a gap this long between two
/// writes means the callers are waiting on this commit, so lingering on
/// would only delay them.
const LINGER_GAP: Duration = Duration::from_micros(200);
/// The writer's page cache. Small on purpose: the hot pages (the queues'
/// tails, the B-trees' upper levels) fit easily, the OS caches the rest, and
/// SQLite's per-commit work on its page cache grows with the cache
/// (docs/performance.md has the figures at 64 MiB).
const WRITER_CACHE_KIB: i64 = 4 * 1024;
/// How often the checkpointer copies the WAL into the database file.
///
/// Checkpoints run on a connection and thread of their own, never on the
/// writer: a checkpoint ends in two fsyncs (the WAL, then the database),
/// each as long as the data it flushes, and on the writer thread every
/// caller would wait through them. A passive checkpoint does not block the
/// writer, which goes on appending to the WAL. Only the last, short pass
/// that lets SQLite restart the WAL from its start runs on the writer (see
/// [`checkpoint_loop`]), once per round: a second between rounds keeps
/// those passes few, for a larger WAL (at most about 1.4 GiB in a 10M-item
/// run, half of it the load's single transaction). The figures are in
/// docs/performance.md.
/// Durability is unchanged: a commit is durable against a killed process
/// once it is in the WAL, checkpointed or not.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// After a transaction that took longer than this (a load), the writer
/// skips the catch-up pass the checkpointer asked for: the checkpointer had
/// none of that transaction to copy, so the writer would copy all of it
/// itself. The checkpointer's next round asks again. (Dropping requests by
/// their age instead would starve a writer whose transactions are far apart.)
const LONG_GROUP: Duration = Duration::from_millis(100);
/// How long the checkpoint at exit waits for the database's other users:
/// this process's checkpointer may be in a pass, and another process's
/// writer would be held up while it waits.
const EXIT_CHECKPOINT_WAIT: Duration = Duration::from_millis(250);
/// The reader's page cache. SQLite empties a connection's cache whenever a
/// read transaction starts after another connection's commit, which with
/// the writer always committing is nearly every read: a large cache only
/// makes that emptying slower (visible in profiles at 8 MiB).
const READER_CACHE_KIB: i64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{path}: {reason}")]
    Open {
        path: PathBuf,
        reason: String,
        /// SQLite's code when SQLite refused the open, so that callers tell
        /// a busy file from a broken one by kind, not by message.
        code: Option<rusqlite::ErrorCode>,
    },
    /// [`Db::open_existing`] found no file there.
    #[error("no database at {}", .0.display())]
    Missing(PathBuf),
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("the database writer has stopped")]
    Closed,
    /// A job refused by its own logic, passed through to the caller.
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// Why a job refused to go on. Callers map these to the port's answers.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The port's own answer (a conflict, a missing run), passed on as it is.
    #[error(transparent)]
    Port(#[from] PortError),
    /// A line of a load that cannot be loaded.
    #[error(transparent)]
    Line(#[from] LineError),
    #[error("run {0} already exists")]
    RunExists(RunId),
    /// The run is not there, or (for a claim) takes no more items;
    /// `why` says which.
    #[error("run {run} {why}")]
    NoRun { run: RunId, why: &'static str },
    /// A receipt that no longer names the message's latest receive.
    #[error("receipt {receipt} is stale: {why}")]
    StaleReceipt { receipt: String, why: &'static str },
    /// A stored value that does not decode.
    #[error("stored {what} is unreadable: {source}")]
    Unreadable {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// A stored item id that is no longer a valid one.
    #[error("stored {what} is unreadable: {source}")]
    BadId {
        what: &'static str,
        #[source]
        source: IdError,
    },
    /// A stored idempotency record in no state it can be in.
    #[error("stored idempotency record {key} is unreadable (state {state:?})")]
    BadIdempotencyState { key: String, state: String },
    /// An idempotency record gone between a write and the read after it.
    #[error("idempotency record {0} vanished")]
    Vanished(String),
    /// A value that could not be encoded for storage.
    #[error(transparent)]
    Encode(serde_json::Error),
    /// A multi-row INSERT that wrote fewer rows than it was given.
    #[error("an insert of {given} items wrote {written}")]
    ShortInsert { given: usize, written: usize },
}

impl From<PortError> for DbError {
    fn from(e: PortError) -> Self {
        Self::Refused(Refusal::Port(e))
    }
}

impl From<LineError> for DbError {
    fn from(e: LineError) -> Self {
        Self::Refused(Refusal::Line(e))
    }
}

type Completion = Box<dyn FnOnce(Option<&str>) + Send>;
/// A write: given the connection (or why no transaction could begin), it
/// runs and returns what to do once the commit's fate is known, and whether
/// it failed in a way that spoils the whole transaction.
type Job = Box<dyn FnOnce(Result<&Connection, &str>) -> (Completion, bool) + Send>;

/// Where writes run.
#[derive(Debug, Clone)]
enum Writer {
    /// On the writer thread, in group transactions.
    Thread(mpsc::Sender<Job>),
    /// On the caller's thread, one write a transaction: see [`Db::open_inline`].
    Inline(Arc<Mutex<Connection>>),
}

/// A handle to the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Db {
    writer: Writer,
    reader: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl Db {
    /// Opens (creating if needed) the database at `path`, checks that it is a
    /// Settle database of a schema this build knows, and starts the writer.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        Self::open_retrying(path, false, true)
    }

    /// Like [`Db::open`], but only an existing file: creates neither the
    /// file nor its directory, and answers [`DbError::Missing`] instead.
    /// For commands that only look at what is there: run in the wrong
    /// directory, they must not leave an empty database behind.
    pub fn open_existing(path: &Path) -> Result<Self, DbError> {
        Self::open_retrying(path, false, false)
    }

    /// Like [`Db::open`], but every write and read runs on the calling
    /// thread, each write in a transaction of its own, and no other thread
    /// is involved. Slower; for the deterministic simulation, where a
    /// current-thread runtime with paused time must see every call complete
    /// in the same order on every replay (a writer thread would finish at
    /// the OS scheduler's whim, and tokio would advance its paused clock
    /// while waiting on it).
    pub fn open_inline(path: &Path) -> Result<Self, DbError> {
        Self::open_retrying(path, true, true)
    }

    /// Processes that open a new file at the same moment (a `settle run`
    /// and the `settle status` polling it) race to switch it to WAL and to
    /// create the schema, and SQLite answers one of them SQLITE_BUSY
    /// ("database is locked") at once instead of waiting (a lock upgrade
    /// that could deadlock): without this retry, such a `settle run` would
    /// fail to open. Opening again finds the file finished. Only BUSY is
    /// retried: it is what another connection's lock gives, whereas
    /// SQLITE_LOCKED comes from a shared cache, which Settle does not use.
    fn open_retrying(path: &Path, inline: bool, create: bool) -> Result<Self, DbError> {
        let give_up = Instant::now() + Duration::from_secs(30);
        loop {
            match Self::open_as(path, inline, create) {
                Err(DbError::Open {
                    code: Some(ErrorCode::DatabaseBusy),
                    ..
                }) if Instant::now() < give_up => {
                    // Staggered by process, so two openers do not collide again.
                    let ms = 5 + u64::from(std::process::id() % 40);
                    std::thread::sleep(Duration::from_millis(ms));
                }
                res => return res,
            }
        }
    }

    fn open_as(path: &Path, inline: bool, create: bool) -> Result<Self, DbError> {
        let open_err = |reason: String| DbError::Open {
            path: path.to_owned(),
            reason,
            code: None,
        };
        // SQLite's refusal, in the words of the file (see `describe`) or
        // its own, with its code kept.
        let sqlite_err =
            |e: rusqlite::Error, reason: fn(&rusqlite::Error) -> String| DbError::Open {
                path: path.to_owned(),
                reason: reason(&e),
                code: e.sqlite_error_code(),
            };
        let own_words = |e: &rusqlite::Error| e.to_string();
        let mut flags = OpenFlags::default();
        if create {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| {
                    open_err(format!("cannot create directory {}: {e}", dir.display()))
                })?;
            }
        } else {
            if !path.exists() {
                return Err(DbError::Missing(path.to_owned()));
            }
            // Should the file go between the check and the open.
            flags.remove(OpenFlags::SQLITE_OPEN_CREATE);
        }
        let writer =
            Connection::open_with_flags(path, flags).map_err(|e| sqlite_err(e, own_words))?;
        // Identify the file before changing anything: switching a file to WAL
        // rewrites its header, and another program's file must stay as it was.
        check_identity(&writer).map_err(|e| match e {
            DbError::Sqlite(e) => sqlite_err(e, describe),
            DbError::Open { reason, .. } => open_err(reason),
            other => other,
        })?;
        configure(&writer, WRITER_CACHE_KIB).map_err(|e| sqlite_err(e, describe))?;
        init_schema(&writer).map_err(|e| match e {
            DbError::Sqlite(e) => sqlite_err(e, describe),
            DbError::Open { reason, .. } => open_err(reason),
            other => other,
        })?;
        let reader = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| sqlite_err(e, own_words))?;
        configure(&reader, READER_CACHE_KIB).map_err(|e| sqlite_err(e, describe))?;
        let writer = if inline {
            // No checkpointer thread: SQLite checkpoints on the writer, by
            // its default (every 1,000 WAL pages).
            Writer::Inline(Arc::new(Mutex::new(writer)))
        } else {
            // The checkpointer below does the checkpoints.
            writer
                .pragma_update(None, "wal_autocheckpoint", 0)
                .map_err(|e| sqlite_err(e, describe))?;
            let checkpointer = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|e| sqlite_err(e, own_words))?;
            configure(&checkpointer, 256).map_err(|e| sqlite_err(e, describe))?;
            let (jobs, rx) = mpsc::channel::<Job>();
            let (ticks, ticked) = mpsc::sync_channel::<()>(1);
            let catch_up = Arc::new(AtomicBool::new(false));
            let caught = catch_up.clone();
            let files = [wal_path(path), path.to_owned()];
            std::thread::Builder::new()
                .name("settle-db-ckpt".into())
                .spawn(move || checkpoint_loop(checkpointer, ticked, caught, files))
                .map_err(|e| open_err(format!("cannot start the checkpoint thread: {e}")))?;
            std::thread::Builder::new()
                .name("settle-db-writer".into())
                .spawn(move || writer_loop(writer, rx, ticks, catch_up))
                .map_err(|e| open_err(format!("cannot start the writer thread: {e}")))?;
            Writer::Thread(jobs)
        };
        Ok(Self {
            writer,
            reader: Arc::new(Mutex::new(reader)),
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Copies the whole WAL into the database file and empties the WAL, so
    /// that the database file alone holds every commit: for a process about
    /// to exit, whose connections are not closed (which would do the same).
    /// Best effort, waiting at most 250 ms: while another
    /// process keeps writing, or reads an older snapshot, it does nothing
    /// (that process's own checkpoints and exit take care of it).
    pub async fn checkpoint_on_exit(&self) {
        let reader = self.reader.clone();
        let truncate = move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            // SQLite answers "busy" at once, without its busy handler, while
            // another connection checkpoints (this process's checkpointer
            // among them): ask again until the wait is over.
            let until = Instant::now() + EXIT_CHECKPOINT_WAIT;
            let _ = conn.busy_timeout(EXIT_CHECKPOINT_WAIT);
            loop {
                match conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                    r.get::<_, i64>(0)
                }) {
                    Ok(0) => break,
                    Ok(_) if Instant::now() < until => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Ok(_) => {
                        tracing::debug!("WAL busy at exit; left to its checkpoints");
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "WAL checkpoint at exit failed");
                        break;
                    }
                }
            }
            let _ = conn.busy_timeout(Duration::from_secs(30));
        };
        match self.writer {
            Writer::Inline(_) => truncate(),
            Writer::Thread(_) => {
                let _ = tokio::task::spawn_blocking(truncate).await;
            }
        }
    }

    /// Runs `f` in the next group transaction; returns once it is committed.
    ///
    /// Contract: `f` returns `Err(DbError::Refused)` only before it has
    /// written anything. A SQLite error from `f` rolls back the whole group
    /// (every caller in it gets an error), since `f` may have half-written.
    /// Use [`Db::write_atomic`] when `f` may refuse after writing.
    pub async fn write<R, F>(&self, f: F) -> Result<R, DbError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, DbError> + Send + 'static,
    {
        self.submit(false, f).await
    }

    /// Like [`Db::write`], but `f` runs in its own savepoint: if it fails,
    /// its changes alone are undone. Costlier (SQLite journals every page the
    /// savepoint touches), so kept for writes that can refuse midway.
    pub async fn write_atomic<R, F>(&self, f: F) -> Result<R, DbError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, DbError> + Send + 'static,
    {
        self.submit(true, f).await
    }

    async fn submit<R, F>(&self, atomic: bool, f: F) -> Result<R, DbError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, DbError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let res = match conn {
                Ok(conn) if atomic => in_savepoint(conn, f),
                Ok(conn) => f(conn),
                Err(e) => Err(DbError::Commit(format!("could not begin: {e}"))),
            };
            let poisons = !atomic && matches!(res, Err(DbError::Sqlite(_)));
            let done: Completion = Box::new(move |commit_err: Option<&str>| {
                let res = match (res, commit_err) {
                    (Ok(_), Some(e)) => Err(DbError::Commit(e.to_owned())),
                    (res, _) => res,
                };
                let _ = tx.send(res);
            });
            (done, poisons)
        });
        match &self.writer {
            Writer::Thread(jobs) => jobs.send(job).map_err(|_| DbError::Closed)?,
            Writer::Inline(conn) => {
                let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
                run_group(&conn, job, || None);
            }
        }
        rx.await.map_err(|_| DbError::Closed)?
    }

    /// Runs `f` on the read connection inside one read transaction, so it
    /// sees a single committed snapshot.
    pub async fn read<R, F>(&self, f: F) -> Result<R, DbError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, DbError> + Send + 'static,
    {
        let reader = self.reader.clone();
        let read = move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            let tx = conn.unchecked_transaction()?;
            let r = f(&tx)?;
            tx.finish()?;
            Ok(r)
        };
        match self.writer {
            Writer::Inline(_) => read(),
            Writer::Thread(_) => tokio::task::spawn_blocking(read)
                .await
                .map_err(|_| DbError::Closed)?,
        }
    }
}

fn configure(conn: &Connection, cache_kib: i64) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    conn.set_prepared_statement_cache_capacity(64);
    // WAL + synchronous=NORMAL: a killed process loses nothing committed; only
    // a power cut can lose the last transactions (the usual SQLite trade-off).
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "cache_size", -cache_kib)?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    // Savepoint journals in memory: otherwise a load's or a ledger commit's
    // journal spills to a temporary file past 64 KiB, one write(2) per page.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(())
}

/// Says "not a database" in the words of the file, not of SQLite's internals.
fn describe(e: &rusqlite::Error) -> String {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => {
            "not a Settle database (not an SQLite file, or a corrupted one)".into()
        }
        Some(rusqlite::ErrorCode::DatabaseCorrupt) => "the database file is corrupted".into(),
        _ => e.to_string(),
    }
}

/// Refuses a file that is not Settle's, or is from a newer Settle. Reads only.
fn check_identity(conn: &Connection) -> Result<(), DbError> {
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    // One statement, so one snapshot: read apart, another process's schema
    // commit could fall in between (no application id yet, but its tables).
    let (app, version, tables): (i32, i32, i64) = conn.query_row(
        "SELECT (SELECT application_id FROM pragma_application_id), \
         (SELECT user_version FROM pragma_user_version), \
         (SELECT count(*) FROM sqlite_master)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let refuse = |reason: String| {
        Err(DbError::Open {
            path: PathBuf::new(),
            reason,
            code: None,
        })
    };
    if app != APPLICATION_ID && (app != 0 || tables > 0) {
        return refuse(format!(
            "not a Settle database (application id {app:#x}, {tables} schema objects of another program)"
        ));
    }
    if version > SCHEMA_VERSION {
        return refuse(format!(
            "written by a newer Settle (schema {version}; this build knows {SCHEMA_VERSION})"
        ));
    }
    Ok(())
}

fn init_schema(conn: &Connection) -> Result<(), DbError> {
    if !schema_is_current(conn)? {
        conn.execute_batch(SCHEMA)?;
    }
    Ok(())
}

/// Whether the file already has every object [`SCHEMA`] creates, and none
/// it drops, at this schema version. Then opening takes no write lock: a
/// `settle status` polled beside a running `settle run` would otherwise
/// wait for the run's writer at every open, and hold the run's writer up
/// in turn.
fn schema_is_current(conn: &Connection) -> rusqlite::Result<bool> {
    let app: i32 = conn.query_row("PRAGMA application_id", [], |r| r.get(0))?;
    let version: i32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if app != APPLICATION_ID || version != SCHEMA_VERSION {
        return Ok(false);
    }
    let mut exists = conn.prepare("SELECT 1 FROM sqlite_master WHERE name = ?1")?;
    if exists.exists(["items_by_id"])? {
        return Ok(false);
    }
    for name in SCHEMA
        .split("IF NOT EXISTS ")
        .skip(1)
        .filter_map(|s| s.split_whitespace().next())
    {
        if !exists.exists([name])? {
            return Ok(false);
        }
    }
    Ok(true)
}

const SCHEMA: &str = r#"
BEGIN IMMEDIATE;
PRAGMA application_id = 1397052492;
PRAGMA user_version = 1;
-- Pending and claimed items, in load order. Claimed ones are those at or
-- below source.claimed_upto; claims says which run took which seq range.
-- No index on item_id: a load finds repeated ids without one (see
-- store::source::load_items), and its upkeep was a third of a load's time.
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY,
    item_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    line INTEGER NOT NULL
);
-- Dropped from files of earlier builds (see schema_is_current).
DROP INDEX IF EXISTS items_by_id;
CREATE TABLE IF NOT EXISTS source (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    claimed_upto INTEGER NOT NULL
);
INSERT OR IGNORE INTO source VALUES (1, 0);
CREATE TABLE IF NOT EXISTS claims (
    run_id TEXT NOT NULL,
    lo INTEGER NOT NULL,
    hi INTEGER NOT NULL,
    PRIMARY KEY (run_id, lo)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    config TEXT NOT NULL,
    total INTEGER NOT NULL,
    enqueued INTEGER NOT NULL,
    cursor TEXT,
    dispatched INTEGER NOT NULL,
    succeeded INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    settled_at INTEGER,
    -- The highest item seq the run may claim, fixed at its first claim.
    claim_bound INTEGER
) WITHOUT ROWID;
-- Runs with an open redrive (RunRecord::redriving): messages moved back to
-- the work queue that nobody has yet seen processed. Added without a schema
-- version change: older builds ignore the table.
CREATE TABLE IF NOT EXISTS redrives (
    run_id TEXT PRIMARY KEY,
    opened_at INTEGER NOT NULL
) WITHOUT ROWID;
-- The unfinished redrive of a run (RunRecord::redrive): its scope as
-- settle_core::domain::RedriveScope::encode writes it, until every item of
-- it has been moved back and processed. Added without a schema version
-- change: older builds ignore the table.
CREATE TABLE IF NOT EXISTS redrive_scopes (
    run_id TEXT PRIMARY KEY,
    scope TEXT NOT NULL
) WITHOUT ROWID;
-- A run's flow counts (RunRecord::throttled, waiting, waiting_until),
-- moved with its tally in the same transaction. Added without a schema
-- version change: older builds ignore the table.
CREATE TABLE IF NOT EXISTS run_flow (
    run_id TEXT PRIMARY KEY,
    throttled INTEGER NOT NULL,
    waiting INTEGER NOT NULL,
    waiting_until INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ledger (
    run_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    status TEXT NOT NULL,
    version INTEGER NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (run_id, item_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ledger_failed ON ledger (run_id, item_id) WHERE status = 'failed';
CREATE TABLE IF NOT EXISTS queues (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    dlq INTEGER,
    max_receives INTEGER
);
-- Message pages: one row per send call's batch (at most 16 messages), with
-- each message's state (visible_at and receive count, or deleted) in `slots`
-- and the earliest visible_at of its live messages in `next_visible_at`.
-- AUTOINCREMENT: a message id (page * 16 + slot) is never reused, since
-- results are told apart by it.
CREATE TABLE IF NOT EXISTS pages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue INTEGER NOT NULL,
    next_visible_at INTEGER NOT NULL,
    slots BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS pages_ready ON pages (queue, next_visible_at);
-- The bodies of a page, written once; `ids` keeps the ids of messages the
-- redrive policy moved here from another queue.
CREATE TABLE IF NOT EXISTS page_bodies (
    page INTEGER PRIMARY KEY,
    bodies BLOB NOT NULL,
    ids BLOB
);
-- Idempotency records of processors' side effects (settle_core::idempotency):
-- state 'in_progress' (until expires_at) or 'completed' (with result JSON).
-- Added without a schema version change: older builds ignore the table.
CREATE TABLE IF NOT EXISTS idempotency (
    run_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    state TEXT NOT NULL,
    payload_hash TEXT NOT NULL,
    token TEXT NOT NULL,
    expires_at INTEGER,
    result TEXT,
    PRIMARY KEY (run_id, item_id)
) WITHOUT ROWID;
COMMIT;
"#;

/// Runs a statement without parameters from the statement cache: the
/// writer runs its BEGIN, COMMIT and savepoint statements thousands of times
/// a second, and `execute_batch` would parse them every time.
fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

fn in_savepoint<R>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<R, DbError>,
) -> Result<R, DbError> {
    exec(conn, "SAVEPOINT job")?;
    let res = f(conn);
    if res.is_err() {
        exec(conn, "ROLLBACK TO job")?;
    }
    exec(conn, "RELEASE job")?;
    res
}

/// Checkpoint passes that copy fewer WAL frames than this have caught up
/// with the writer: the writer's own catch-up pass after it is short.
const CAUGHT_UP_FRAMES: i64 = 2_000;
/// Passes per round at most before the writer's catch-up pass.
const MAX_PASSES: usize = 8;

fn wal_path(db: &Path) -> PathBuf {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    wal.into()
}

/// Copies the WAL into the database file beside the writer. Passes run back
/// to back while each still has a lot to copy (the writer appends during a
/// pass), then ask the writer for a last short pass: SQLite restarts the
/// WAL from its start only once a checkpoint has caught up completely,
/// which a writer that never pauses gives this thread no chance to see, and
/// the WAL would grow without end. Ends with the writer.
///
/// That last pass ends in an fsync of the WAL and one of the database file,
/// which take as long as the data they flush: fsyncing both files here
/// first (an fsync flushes a file whichever descriptor asks) leaves the
/// writer's fsyncs only what was written after, which shortens the
/// writer's passes.
///
/// The files are opened once and held until the writer has stopped: closing
/// any descriptor of the database file drops every POSIX lock this process
/// holds on it, SQLite's included. Were they opened and closed each round,
/// another process's closing connection could take the file for its own,
/// checkpoint, and delete the WAL under this process's writer, whose later
/// commits would go to the deleted file: a `settle run` beside
/// `settle status` calls would lose its new run ("run ... not found").
fn checkpoint_loop(
    conn: Connection,
    ticked: mpsc::Receiver<()>,
    catch_up: Arc<AtomicBool>,
    files: [PathBuf; 2],
) {
    // Frames of the WAL copied into the database so far (SQLite's count).
    let backfilled = || -> Option<i64> {
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(2))
            .map_err(|e| tracing::warn!(error = %e, "WAL checkpoint failed; the next one retries"))
            .ok()
    };
    let held: Vec<(std::fs::File, &PathBuf)> = files
        .iter()
        .filter_map(|path| match std::fs::File::open(path) {
            Ok(f) => Some((f, path)),
            Err(e) => {
                tracing::debug!(error = %e, file = %path.display(), "cannot flush ahead of checkpoints");
                None
            }
        })
        .collect();
    let mut before = 0;
    while ticked.recv().is_ok() {
        // A bounded number of passes: on a disk slower than the writer they
        // might never get under CAUGHT_UP_FRAMES, and the WAL must restart.
        for _ in 0..MAX_PASSES {
            let Some(now) = backfilled() else { break };
            // Fewer frames than before: the WAL restarted in between.
            let copied = if now >= before { now - before } else { now };
            before = now;
            if copied < CAUGHT_UP_FRAMES {
                break;
            }
        }
        for (file, path) in &held {
            // Only an optimisation: SQLite fsyncs what it needs itself.
            if let Err(e) = file.sync_data() {
                tracing::debug!(error = %e, file = %path.display(), "could not flush ahead of the checkpoint");
            }
        }
        catch_up.store(true, Ordering::Relaxed);
        std::thread::sleep(CHECKPOINT_EVERY);
    }
}

fn writer_loop(
    conn: Connection,
    rx: mpsc::Receiver<Job>,
    ticks: mpsc::SyncSender<()>,
    catch_up: Arc<AtomicBool>,
) {
    while let Ok(first) = rx.recv() {
        let opened = Instant::now();
        run_group(&conn, first, || match rx.try_recv() {
            Ok(j) => Some(j),
            Err(_) => rx
                .recv_timeout(LINGER.saturating_sub(opened.elapsed()).min(LINGER_GAP))
                .ok(),
        });
        if catch_up.swap(false, Ordering::Relaxed) && opened.elapsed() < LONG_GROUP {
            // Short: the checkpointer has just copied all but the latest frames.
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::warn!(error = %e, "WAL checkpoint failed; the next one retries");
            }
        }
        // A full channel means a tick is already waiting: nothing to add.
        let _ = ticks.try_send(());
    }
}

/// Runs `first` and the jobs `next` hands out (until it returns `None`)
/// in one transaction, then answers each once the commit's fate is known.
fn run_group(conn: &Connection, first: Job, mut next_job: impl FnMut() -> Option<Job>) {
    if let Err(e) = exec(conn, "BEGIN IMMEDIATE") {
        let msg = e.to_string();
        first(Err(&msg)).0(None);
        return;
    }
    let mut completions: Vec<Completion> = Vec::new();
    let mut poisoned = false;
    let mut next = Some(first);
    while let Some(job) = next.take() {
        let (done, poisons) = job(Ok(conn));
        completions.push(done);
        poisoned |= poisons;
        // After an I/O or out-of-memory error SQLite may have rolled the
        // whole transaction back itself; running more jobs would then
        // commit each statement on its own.
        if conn.is_autocommit() {
            poisoned = true;
            break;
        }
        if completions.len() >= MAX_GROUP || poisoned {
            break;
        }
        next = next_job();
    }
    let outcome = if poisoned {
        let _ = conn.execute_batch("ROLLBACK");
        Err("rolled back: a write in the same transaction failed".to_owned())
    } else {
        exec(conn, "COMMIT").map_err(|e| {
            let _ = conn.execute_batch("ROLLBACK");
            e.to_string()
        })
    };
    for done in completions {
        done(outcome.as_ref().err().map(String::as_str));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The WAL header's salt-1, which SQLite changes each time it restarts the WAL.
    fn wal_salt(db: &Path) -> Option<[u8; 4]> {
        let header = std::fs::read(wal_path(db)).ok()?;
        header.get(16..20)?.try_into().ok()
    }

    /// A file from a build that indexed item ids loses the index on open:
    /// kept, it would cost every load its upkeep for nothing.
    #[tokio::test]
    async fn opening_drops_the_item_id_index_of_earlier_builds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("settle.db");
        let index = |c: &Connection| -> bool {
            c.prepare("SELECT 1 FROM sqlite_master WHERE name = 'items_by_id'")
                .unwrap()
                .exists([])
                .unwrap()
        };
        {
            let db = Db::open(&path).unwrap();
            let had = db
                .write(move |c| {
                    c.execute_batch("CREATE INDEX items_by_id ON items (item_id, seq)")?;
                    Ok(index(c))
                })
                .await
                .unwrap();
            assert!(had);
        }
        let db = Db::open(&path).unwrap();
        assert!(!db.read(move |c| Ok(index(c))).await.unwrap());
    }

    #[tokio::test]
    async fn open_existing_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/settle.db");
        match Db::open_existing(&path) {
            Err(DbError::Missing(p)) => assert_eq!(p, path),
            other => panic!("expected Missing, got {other:?}"),
        }
        assert!(!dir.path().join("no").exists());
        drop(Db::open(&path).unwrap());
        Db::open_existing(&path).unwrap();
    }

    #[tokio::test]
    async fn the_checkpoint_on_exit_empties_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("settle.db");
        let db = Db::open(&path).unwrap();
        db.write(|c| {
            c.execute_batch("CREATE TABLE t (v BLOB); INSERT INTO t VALUES (zeroblob(100000))")?;
            Ok(())
        })
        .await
        .unwrap();
        let wal = || std::fs::metadata(wal_path(&path)).map_or(0, |m| m.len());
        assert!(wal() > 0, "the write is in the WAL");
        db.checkpoint_on_exit().await;
        assert_eq!(wal(), 0);
        // The file alone now has it, read by a connection of its own.
        let copy = dir.path().join("copy.db");
        std::fs::copy(&path, &copy).unwrap();
        let n: i64 = Connection::open(&copy)
            .unwrap()
            .query_row("SELECT length(v) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 100_000);
    }

    /// Writes far apart (a slow processor's results) must still let the
    /// WAL restart: the writer's catch-up pass may not depend on a write
    /// following the checkpointer's request closely.
    #[tokio::test]
    async fn the_wal_restarts_under_writes_far_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("settle.db");
        let db = Db::open(&path).unwrap();
        db.write(|c| {
            c.execute_batch("CREATE TABLE IF NOT EXISTS t (v BLOB)")?;
            Ok(())
        })
        .await
        .unwrap();
        let first = wal_salt(&path).expect("a WAL after a write");
        let mut restarted = false;
        // Up to 5 checkpoint rounds, a write every 150 ms.
        for _ in 0..(5 * CHECKPOINT_EVERY.as_millis() / 150) {
            tokio::time::sleep(Duration::from_millis(150)).await;
            db.write(|c| {
                c.execute("INSERT INTO t VALUES (zeroblob(8000))", [])?;
                Ok(())
            })
            .await
            .unwrap();
            if wal_salt(&path).is_some_and(|s| s != first) {
                restarted = true;
                break;
            }
        }
        assert!(restarted, "the WAL never restarted");
    }
}
