//! `--exec CMD --protocol jsonl`: long-lived processes, one JSON line in and
//! one out per item. The protocol, for those who implement it, is
//! `docs/protocol-jsonl.md`; this is how Settle keeps its side.
//!
//! - A pool of at most `parallelism` processes (`sh -c CMD`, each in a
//!   process group of its own), started when an item needs one and none
//!   has room for it.
//! - A process has room for one item at a time, unless its first line is a
//!   *hello* announcing `max_in_flight`: then it takes up to that many at
//!   once, answers them in any order, and carries each item's log in its
//!   answer (its stderr is then no item's). The helpers of `sdk/` say hello.
//! - Until the pool's first process has spoken (or for its first
//!   200 ms), at most one process per core is started: a
//!   command that says hello needs few processes, and its first hello
//!   tells. Once one has answered without a hello, every
//!   process of the command takes one item at a time, and the pool grows
//!   to `parallelism` as items need.
//! - A reader task per process reads its stdout and hands each answer to
//!   the item it names. A process that dies, answers garbage, answers for
//!   an item it was not given, or writes when nothing is asked fails every
//!   item it has in flight, retryably, and is ended: its group gets
//!   SIGTERM, then SIGKILL after [`KILL_GRACE`]. An item whose attempt
//!   ends without an answer (the deadline, or the worker dropping it at its
//!   timeout) retires its process: it takes no more items and is ended once
//!   its other items are answered, so a late answer can never be read as
//!   another item's.
//!
//! # A one-at-a-time process's log, exactly
//!
//! A task per process reads its stderr continuously and routes what it
//! reads by time of arrival: to the item in flight, or, with none, to
//! `tracing` at debug level (it is no item's log). stderr and stdout are
//! separate pipes, so bytes a process wrote to stderr just before its
//! answer may still sit unread in the stderr pipe when Settle reads the
//! answer. Hence, around each item, Settle *drains* stderr: it reads what
//! the pipe holds at that instant, without waiting, before sending the item
//! (that goes to debug) and again after reading the answer (that goes to
//! the item). The guarantee, for an item that got an answer:
//!
//! - every byte the process wrote to stderr after it read the item's line
//!   and before it wrote the answer is in the item's log (as far as the
//!   attempt's log keeps, see [`settle_core::domain::MAX_LOG_BYTES`]), in
//!   order; "wrote" means the `write` call returned, so a process must
//!   flush its own stderr buffer before answering (the helpers do);
//! - nothing the process wrote before Settle's drain ahead of the item, or
//!   after Settle's drain behind its answer, is in the item's log.
//!
//! What a fresh process writes before it reads its first item (while it
//! starts) goes to that first item: it is the item that started it, and
//! the one that fails if starting fails. For a process that says hello,
//! that is what it writes before its hello.
//!
//! For an attempt that ends without an answer (the process died or
//! misbehaved), its log is what Settle had read by then, plus a drain.
//! For an attempt the worker drops at its timeout, it is what the routing
//! task had read from the pipe by then; the rest goes to debug.

use crate::exec::check_command;
use crate::groups::{Group, GROUPS, KILL_GRACE};
use crate::{deadline_epoch_ms, item_json, last_line, SpecError};
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::value::RawValue;
use settle_core::domain::{Item, Output, ProcessError, MAX_OUTPUT_BYTES};
use settle_core::{AttemptContext, Processor};
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::fd::AsFd;
use std::process::Stdio;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout};
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};

/// The longest answer line read in full. An answer carries an output of at
/// most [`MAX_OUTPUT_BYTES`] and a log, plus a little; a longer line is
/// read to its end (to name its size) but not kept.
const MAX_LINE_BYTES: usize = 4 * MAX_OUTPUT_BYTES;

/// How much of a bad answer line an error quotes.
const QUOTED_BYTES: usize = 200;

/// Bytes of an item's stderr kept aside for an error message (its last line).
const ERROR_TAIL: usize = 4096;

/// The most one drain reads: a process that writes stderr without pause
/// cannot keep a drain going.
const MAX_DRAIN_BYTES: usize = 1 << 20;

/// How long a process whose stdout ended has to exit before it is deemed
/// alive (it closed stdout but goes on) and ended by Settle.
const EXIT_WAIT: Duration = Duration::from_millis(500);

/// The most items one process may hold, whatever its hello says.
const MAX_IN_FLIGHT: usize = 1024;

/// How long items wait for the first wave of processes to say whether
/// they take several items at once, before more are started regardless: a
/// process that says hello does so as it starts, and an item kept waiting
/// for a slow starter would spend its own timeout on it.
const FIRST_WAVE_GRACE: Duration = Duration::from_millis(200);

/// What a process's first line says to take several items at once.
const HELLO: &str = "settle-jsonl";

/// Long-lived processes speaking JSON lines.
pub struct Jsonl {
    command: String,
    /// One permit per item the processor works on at once.
    slots: Semaphore,
    max_processes: usize,
    /// Processes started at once before the command is known to say hello
    /// or not.
    first_wave: usize,
    /// When the pool's first process started.
    first_start: std::sync::OnceLock<std::time::Instant>,
    pool: Mutex<Vec<Arc<Proc>>>,
    /// What the command's processes turned out to be, once one has spoken:
    /// [`UNKNOWN`], [`ONE_AT_A_TIME`] or [`SAYS_HELLO`].
    kind: Arc<AtomicU8>,
    /// Signalled when a process gains room, is ended, or says who it is.
    changed: Arc<Notify>,
}

const UNKNOWN: u8 = 0;
const ONE_AT_A_TIME: u8 = 1;
const SAYS_HELLO: u8 = 2;

impl std::fmt::Debug for Jsonl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jsonl")
            .field("command", &self.command)
            .field("processes", &lock(&self.pool).len())
            .finish_non_exhaustive()
    }
}

impl Drop for Jsonl {
    fn drop(&mut self) {
        for proc in lock(&self.pool).drain(..) {
            proc.end();
        }
    }
}

impl Jsonl {
    /// Refuses a command whose program cannot be found or executed (where
    /// that can be told without running it), as `--exec` does. No process
    /// is started before an item needs one. `parallelism` is the most items
    /// at once, and the most processes.
    pub fn new(command: &str, parallelism: usize) -> Result<Self, SpecError> {
        Self::with_limits(command, parallelism, parallelism)
    }

    /// At most `items` at once, on at most `processes` processes when each
    /// takes one at a time.
    pub fn with_limits(command: &str, items: usize, processes: usize) -> Result<Self, SpecError> {
        check_command(command)?;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let (items, processes) = (items.max(1), processes.clamp(1, items.max(1)));
        Ok(Self {
            command: command.to_owned(),
            slots: Semaphore::new(items),
            max_processes: processes,
            first_wave: cores.min(processes),
            first_start: std::sync::OnceLock::new(),
            pool: Mutex::default(),
            kind: Arc::new(AtomicU8::new(UNKNOWN)),
            changed: Arc::new(Notify::new()),
        })
    }

    /// A process with room for `id`, which now holds it: a running one, or
    /// one started for it. Waits while every process is full and no more
    /// may start.
    async fn checkout(&self, id: &str, ticket: Ticket) -> Result<Checkout, ProcessError> {
        let mut ticket = Some(ticket);
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut pool = lock(&self.pool);
                pool.retain(|p| p.state().open);
                let roomiest = pool
                    .iter()
                    .filter_map(|p| {
                        let st = p.state();
                        st.has_room_for(id).then(|| (st.held, p))
                    })
                    .min_by_key(|(load, _)| *load)
                    .map(|(_, p)| p.clone());
                if let Some(proc) = roomiest {
                    let Ticket { reply, log } = ticket.take().expect("taken once");
                    let mut st = proc.state();
                    let inline = st.inline_logs;
                    st.held += 1;
                    st.pending.insert(id.to_owned(), reply);
                    drop(st);
                    return Ok(Checkout {
                        proc,
                        fresh: false,
                        inline,
                        log: Some(log),
                    });
                }
                // Until a process has spoken, the command may be one that
                // takes many items per process: start the first wave only.
                // Once it is known to, start one more only when all are full
                // and none is still starting (it will have room).
                let cap = match self.kind.load(Ordering::Acquire) {
                    UNKNOWN if !self.first_wave_over() => self.first_wave,
                    SAYS_HELLO if pool.iter().any(|p| !p.state().heard) => 0,
                    _ => self.max_processes,
                };
                if pool.len() < cap {
                    let Ticket { reply, log } = ticket.take().expect("taken once");
                    let proc = self.start(id, reply, log)?;
                    pool.push(proc.clone());
                    return Ok(Checkout {
                        proc,
                        fresh: true,
                        inline: false,
                        log: None,
                    });
                }
            }
            // Past the first wave's grace, a process that has not spoken
            // is taken for one that takes one item at a time.
            let grace = self
                .first_start
                .get()
                .map(|t| FIRST_WAVE_GRACE.saturating_sub(t.elapsed()))
                .filter(|left| !left.is_zero());
            match grace {
                Some(left) => {
                    let _ = tokio::time::timeout(left, changed).await;
                }
                None => changed.await,
            }
        }
    }

    /// Whether the first wave has had its grace to say hello.
    fn first_wave_over(&self) -> bool {
        self.first_start
            .get()
            .is_some_and(|t| t.elapsed() >= FIRST_WAVE_GRACE)
    }

    /// Starts a process that holds `id`, whose stderr goes to `first` from
    /// the start: what a process says while starting (an import error,
    /// say) is about the item that started it.
    fn start(
        &self,
        id: &str,
        reply: oneshot::Sender<Reply>,
        first: mpsc::UnboundedSender<Vec<u8>>,
    ) -> Result<Arc<Proc>, ProcessError> {
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| {
                ProcessError::retryable(format!("cannot start `sh -c {}`: {e}", self.command))
            })?;
        // Known until the child is reaped, which only `wait` does.
        let pid = child.id().unwrap_or_default();
        // From here on, dropping `group` ends the process: also on the way
        // out of this function. (Never pid 0: that would be Settle's group.)
        let group = GROUPS.unlisted(child.id());
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(ProcessError::retryable("the process's pipes are missing"));
        };
        self.first_start.get_or_init(std::time::Instant::now);
        let route = Arc::new(Mutex::new(Some(first)));
        let (drains, drain_requests) = mpsc::unbounded_channel();
        tokio::spawn(pump(stderr, route.clone(), drain_requests, pid));
        tracing::debug!(pid, command = %self.command, "started a jsonl process");
        let proc = Arc::new(Proc {
            pid,
            stdin: tokio::sync::Mutex::new(stdin),
            state: Mutex::new(State {
                capacity: 1,
                heard: false,
                inline_logs: false,
                open: true,
                held: 1,
                pending: HashMap::from([(id.to_owned(), reply)]),
                abandoned: HashSet::new(),
            }),
            route,
            drains,
            group: Mutex::new(Some(group)),
            changed: self.changed.clone(),
            kind: self.kind.clone(),
        });
        tokio::spawn(read_answers(proc.clone(), BufReader::new(stdout), child));
        Ok(proc)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a process's stderr goes right now: the channel of the item in
/// flight, or nowhere (debug) between items and once it has said hello.
type Route = Option<mpsc::UnboundedSender<Vec<u8>>>;

/// What an item waits on: its answer, and (one at a time) its stderr.
struct Ticket {
    reply: oneshot::Sender<Reply>,
    log: mpsc::UnboundedSender<Vec<u8>>,
}

/// A process that holds an item.
struct Checkout {
    proc: Arc<Proc>,
    /// Started for this item: its stderr already goes to the item.
    fresh: bool,
    /// The process said hello: the item's log comes in its answer.
    inline: bool,
    /// The item's stderr channel, to route to it (one-at-a-time processes).
    log: Option<mpsc::UnboundedSender<Vec<u8>>>,
}

/// What the reader task tells an item.
enum Reply {
    Answer(Answer),
    /// The answer line is longer than [`MAX_LINE_BYTES`]: its length.
    TooLarge(usize),
    /// The process ended with the item in flight: how. Its last words on
    /// stderr explain it.
    Died(String),
    /// The process broke the protocol: how, quoting it.
    Misbehaved(String),
}

/// One running process, shared by the items it holds and its reader task.
struct Proc {
    pid: u32,
    stdin: tokio::sync::Mutex<ChildStdin>,
    state: Mutex<State>,
    route: Arc<Mutex<Route>>,
    /// Asks the stderr task to drain the pipe; it answers when done.
    drains: mpsc::UnboundedSender<oneshot::Sender<()>>,
    /// Taken (and so dropped: SIGTERM, then SIGKILL) to end the process.
    group: Mutex<Option<Group<'static>>>,
    changed: Arc<Notify>,
    /// The pool's [`Jsonl::kind`], which the first process to speak sets.
    kind: Arc<AtomicU8>,
}

struct State {
    /// Items it may hold at once: 1 until a hello says more.
    capacity: usize,
    /// It has said something: a hello or an answer.
    heard: bool,
    /// It said hello: items' logs come in the answers.
    inline_logs: bool,
    /// It takes new items.
    open: bool,
    /// Items it holds: given to it and not yet done with (their answer
    /// may have come, their log is still being closed).
    held: usize,
    /// The items whose answers it owes, by id, and where they go.
    pending: HashMap<String, oneshot::Sender<Reply>>,
    /// Items given up on (deadline, timeout) whose answers may still come.
    abandoned: HashSet<String>,
}

impl State {
    fn has_room_for(&self, id: &str) -> bool {
        self.open && self.held < self.capacity && !self.pending.contains_key(id)
    }
}

impl Proc {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Ends the process: no more items, and its group is signalled.
    fn end(&self) {
        self.state().open = false;
        if let Some(group) = lock(&self.group).take() {
            tracing::debug!(pid = self.pid, "ending a jsonl process");
            drop(group);
        }
        self.changed.notify_waiters();
    }

    /// Records, if it is the pool's first to speak, what its processes are.
    fn learned(&self, kind: u8) {
        let _ = self
            .kind
            .compare_exchange(UNKNOWN, kind, Ordering::AcqRel, Ordering::Acquire);
        self.changed.notify_waiters();
    }

    /// Fails every item it holds, and ends it.
    fn fail_all(&self, reply: impl Fn() -> Reply) {
        let pending: Vec<_> = self.state().pending.drain().collect();
        for (_, to) in pending {
            let _ = to.send(reply());
        }
        self.end();
    }

    /// Fails every item it holds for breaking the protocol (`why`), and ends it.
    fn misbehaved(&self, why: String) {
        self.fail_all(|| Reply::Misbehaved(why.clone()));
    }

    /// Gives up on `id` (no answer in time): the process takes no more
    /// items, and is ended once it holds none.
    fn abandon(&self, id: &str) {
        let mut st = self.state();
        if st.pending.remove(id).is_some() {
            st.abandoned.insert(id.to_owned());
        }
        st.open = false;
    }

    /// Done with an item it held: room for another, or, retired and now
    /// holding none, ended.
    fn release(&self) {
        let mut st = self.state();
        st.held = st.held.saturating_sub(1);
        let retired = !st.open && st.held == 0;
        drop(st);
        if retired {
            self.end();
        } else {
            self.changed.notify_waiters();
        }
    }

    /// Routes what the stderr pipe holds at this instant, and returns once
    /// it is routed.
    async fn drain(&self) {
        let (done, wait) = oneshot::channel();
        if self.drains.send(done).is_ok() {
            let _ = wait.await;
        }
    }
}

/// Sends `bytes` where the process's stderr goes right now. Sent under the
/// lock, so that once an item's route is removed nothing more reaches it.
fn route_bytes(route: &Mutex<Route>, pid: u32, bytes: &[u8]) {
    let route = lock(route);
    if let Some(tx) = route.as_ref() {
        if tx.send(bytes.to_vec()).is_ok() {
            return;
        }
    }
    tracing::debug!(
        pid,
        stderr = %String::from_utf8_lossy(bytes).trim_end(),
        "a jsonl process wrote to stderr outside an item's log"
    );
}

/// Reads a process's stderr until its end, routing it as it arrives, and
/// drains the pipe when asked.
async fn pump(
    mut stderr: ChildStderr,
    route: Arc<Mutex<Route>>,
    mut requests: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    pid: u32,
) {
    // A second handle on the same pipe (tokio made it non-blocking), for
    // drains: a read on it asks the kernel now, where tokio's read waits
    // until its reactor has seen the pipe become readable.
    let now = stderr
        .as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .ok();
    let mut buf = vec![0u8; 8192];
    let mut open = true;
    loop {
        tokio::select! {
            // A drain asked for comes before more reading: the item that
            // asked waits for it.
            biased;
            request = requests.recv() => {
                let Some(done) = request else { break };
                if open {
                    if let Some(now) = &now {
                        open = drain_now(now, &route, pid);
                    }
                }
                let _ = done.send(());
            }
            n = stderr.read(&mut buf), if open => match n {
                Ok(0) | Err(_) => open = false,
                Ok(n) => route_bytes(&route, pid, &buf[..n]),
            },
        }
    }
    // The process is being ended: what it still writes (a traceback on
    // SIGTERM, say) goes to debug. Bounded in time, in case something
    // outside its group holds the pipe open.
    if open {
        let rest = async {
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                route_bytes(&route, pid, &buf[..n]);
            }
        };
        let _ = tokio::time::timeout(KILL_GRACE + Duration::from_secs(1), rest).await;
    }
}

/// Routes what `pipe` holds now, without waiting; false once it has ended.
fn drain_now(pipe: &std::fs::File, route: &Mutex<Route>, pid: u32) -> bool {
    let mut buf = [0u8; 8192];
    let mut read = 0;
    while read < MAX_DRAIN_BYTES {
        match (&*pipe).read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => {
                read += n;
                route_bytes(route, pid, &buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
    true
}

/// Reads a process's answers and hands each to the item it names, until
/// the process ends or misbehaves.
async fn read_answers(proc: Arc<Proc>, mut stdout: BufReader<ChildStdout>, mut child: Child) {
    let pid = proc.pid;
    loop {
        let (kept, total) = match read_line(&mut stdout, MAX_LINE_BYTES).await {
            Heard::Line {
                kept,
                total,
                complete: true,
            } => (kept, total),
            heard => {
                let why = format!(
                    "the process (pid {pid}) {}",
                    ended(&mut child, &heard).await
                );
                proc.fail_all(|| Reply::Died(why.clone()));
                return;
            }
        };
        if total > MAX_LINE_BYTES {
            // Not read in full, so not known to be whose: with one item in
            // hand it is that item's, and too large either way.
            let mut st = proc.state();
            if st.pending.len() == 1 {
                let (_, reply) = st.pending.drain().next().expect("one");
                drop(st);
                let _ = reply.send(Reply::TooLarge(total));
                proc.end();
            } else {
                drop(st);
                proc.misbehaved(format!(
                    "the process (pid {pid}) answered a line of {total} bytes, more than \
                     {MAX_LINE_BYTES}; it cannot be told which item it answers"
                ));
            }
            return;
        }
        match serde_json::from_slice::<Said>(&kept) {
            Ok(said) if said.hello.is_some() => {
                let first = !proc.state().heard;
                if !first || said.hello.as_deref() != Some(HELLO) {
                    proc.misbehaved(format!(
                        "the process (pid {pid}) said a hello that is not the first line or \
                         not {HELLO:?}: {}",
                        quote(&kept)
                    ));
                    return;
                }
                // What it wrote before its hello is the first item's; its
                // items' logs come in its answers from now on.
                proc.drain().await;
                *lock(&proc.route) = None;
                {
                    let mut st = proc.state();
                    st.heard = true;
                    st.inline_logs = true;
                    st.capacity = said.max_in_flight.unwrap_or(1).clamp(1, MAX_IN_FLIGHT);
                }
                proc.learned(SAYS_HELLO);
            }
            Ok(said) => match said.into_answer() {
                Ok(answer) => {
                    if !deliver(&proc, answer, &kept) {
                        return;
                    }
                }
                Err(e) => {
                    proc.misbehaved(format!(
                        "the process (pid {pid}) answered a line that is not an answer ({e}): {}",
                        quote(&kept)
                    ));
                    return;
                }
            },
            Err(e) => {
                proc.misbehaved(format!(
                    "the process (pid {pid}) answered a line that is not an answer ({e}): {}",
                    quote(&kept)
                ));
                return;
            }
        }
    }
}

/// Hands `answer` to its item; false if it was for none (the process is
/// then ended).
fn deliver(proc: &Proc, answer: Answer, line: &[u8]) -> bool {
    let pid = proc.pid;
    let mut st = proc.state();
    if !st.heard {
        st.heard = true;
        proc.learned(ONE_AT_A_TIME);
    }
    if let Some(reply) = st.pending.remove(&answer.id) {
        drop(st);
        let _ = reply.send(Reply::Answer(answer));
        return true;
    }
    if st.abandoned.remove(&answer.id) {
        tracing::debug!(pid, id = %answer.id, "a late answer, for an item given up on");
        return true;
    }
    let held: Vec<String> = st.pending.keys().cloned().collect();
    drop(st);
    match held.as_slice() {
        [] => {
            tracing::debug!(pid, line = %quote(line), "a jsonl process wrote to stdout with no item in flight: replaced");
            proc.end();
        }
        [one] => proc.misbehaved(format!(
            "the process (pid {pid}) answered for item {:?} while item {one:?} was in flight: {}",
            answer.id,
            quote(line)
        )),
        _ => proc.misbehaved(format!(
            "the process (pid {pid}) answered for item {:?}, which it was not given: {}",
            answer.id,
            quote(line)
        )),
    }
    false
}

/// How a process whose stdout ended went: its exit, if it exits soon.
async fn ended(child: &mut Child, heard: &Heard) -> String {
    let exited = match tokio::time::timeout(EXIT_WAIT, child.wait()).await {
        Ok(Ok(status)) => {
            use std::os::unix::process::ExitStatusExt;
            Some(match (status.code(), status.signal()) {
                (Some(code), _) => format!("exited with {code}"),
                (None, Some(signal)) => format!("was killed by signal {signal}"),
                _ => format!("ended ({status})"),
            })
        }
        _ => None,
    };
    match (exited, heard) {
        (Some(how), Heard::Line { kept, .. }) if !kept.is_empty() => format!(
            "{how} before answering, leaving an unfinished line: {}",
            quote(kept)
        ),
        (Some(how), _) => format!("{how} before answering"),
        (None, Heard::Io(e)) => format!("cannot be talked to ({e})"),
        (None, _) => "closed its stdout before answering".to_owned(),
    }
}

/// An item held by a process. Dropped (also when the worker drops the
/// attempt at its timeout), it closes the item's log and, if no answer
/// came, gives up on the item and retires the process.
struct InFlight<'a> {
    ctx: &'a AttemptContext,
    proc: Arc<Proc>,
    id: &'a str,
    inline: bool,
    log: mpsc::UnboundedReceiver<Vec<u8>>,
    /// The end of what this item's stderr said, for an error message.
    tail: Vec<u8>,
    answered: bool,
}

fn forward(ctx: &AttemptContext, tail: &mut Vec<u8>, chunk: &[u8]) {
    ctx.log(chunk);
    tail.extend_from_slice(chunk);
    if tail.len() > 2 * ERROR_TAIL {
        tail.drain(..tail.len() - ERROR_TAIL);
    }
}

impl InFlight<'_> {
    /// Stops routing stderr to this item and logs what was on its way.
    fn close_log(&mut self) {
        if !self.inline {
            *lock(&self.proc.route) = None;
        }
        while let Ok(chunk) = self.log.try_recv() {
            forward(self.ctx, &mut self.tail, &chunk);
        }
    }

    /// Routes what stderr holds now to this item, then stops routing it
    /// here (one-at-a-time processes).
    async fn finish_log(&mut self) {
        if !self.inline {
            self.proc.drain().await;
        }
        self.close_log();
    }

    /// `what`, with the last line the item's stderr said.
    fn why(&self, what: String) -> String {
        let tail = String::from_utf8_lossy(&self.tail);
        match last_line(&tail) {
            Some(line) => format!("{what}: {line}"),
            None => what,
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.close_log();
        if !self.answered {
            self.proc.abandon(self.id);
        }
        self.proc.release();
    }
}

/// What an item's wait for its answer came to.
enum Waited {
    /// The reader's reply; `None` if none came (it stopped, or the
    /// process could not be written to and never said how it ended).
    Reply(Option<Reply>),
    Deadline,
}

/// What came of reading a line.
enum Heard {
    /// A line, complete or cut by the end of stdout; at most
    /// [`MAX_LINE_BYTES`] of it kept, `total` its length.
    Line {
        kept: Vec<u8>,
        total: usize,
        complete: bool,
    },
    Io(std::io::Error),
}

/// Reads one line from `r`, keeping at most `limit` bytes of it.
async fn read_line(r: &mut BufReader<ChildStdout>, limit: usize) -> Heard {
    let mut kept = Vec::new();
    let mut total = 0;
    loop {
        let buf = match r.fill_buf().await {
            Ok(buf) => buf,
            Err(e) => return Heard::Io(e),
        };
        if buf.is_empty() {
            return Heard::Line {
                kept,
                total,
                complete: false,
            };
        }
        let (chunk, complete) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], true),
            None => (buf, false),
        };
        total += chunk.len();
        let room = limit.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = chunk.len() + usize::from(complete);
        r.consume(used);
        if complete {
            return Heard::Line {
                kept,
                total,
                complete,
            };
        }
    }
}

/// A line as an error quotes it: its first [`QUOTED_BYTES`], and its length
/// if it is longer.
fn quote(line: &[u8]) -> String {
    let shown = String::from_utf8_lossy(&line[..line.len().min(QUOTED_BYTES)]);
    if line.len() > QUOTED_BYTES {
        format!("{shown:?}... ({} bytes)", line.len())
    } else {
        format!("{shown:?}")
    }
}

/// A line a process writes: a hello, or an answer.
#[derive(Deserialize)]
struct Said {
    #[serde(default)]
    hello: Option<String>,
    #[serde(default)]
    max_in_flight: Option<usize>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    status: Option<Status>,
    #[serde(default)]
    output: Option<Box<RawValue>>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    retry_after_ms: Option<u64>,
    #[serde(default)]
    throttled: Option<bool>,
    #[serde(default)]
    log: Option<String>,
}

impl Said {
    fn into_answer(self) -> Result<Answer, &'static str> {
        let id = self.id.ok_or("missing field `id`")?;
        let status = match (self.status, self.throttled) {
            (None | Some(Status::Throttled), Some(true)) => Status::Throttled,
            // Two answers in one: no guess is safe.
            (Some(_), Some(true)) => return Err("`\"throttled\": true` with another status"),
            (Some(status), _) => status,
            // A retry-after with nothing else to say is a request to wait:
            // the processor did no work on the item, and said no error.
            (None, None)
                if self.retry_after_ms.is_some()
                    && self.error.is_none()
                    && self.output.is_none() =>
            {
                Status::Throttled
            }
            (None, _) => return Err("missing field `status`"),
        };
        Ok(Answer {
            id,
            status,
            output: self.output,
            error: self.error,
            retry_after_ms: self.retry_after_ms,
            log: self.log,
        })
    }
}

struct Answer {
    id: String,
    status: Status,
    output: Option<Box<RawValue>>,
    error: Option<String>,
    retry_after_ms: Option<u64>,
    log: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Retry,
    Fail,
    /// The processor asks to slow down: no failure of the item.
    Throttled,
}

#[async_trait]
impl Processor for Jsonl {
    /// Until the command is known to say hello, as many items as the
    /// processes that may start take one each: the first wave while it has
    /// its grace, then every process. A command that says hello has no
    /// limit of its own beyond `items`.
    fn capacity(&self) -> Option<usize> {
        match self.kind.load(Ordering::Acquire) {
            SAYS_HELLO => None,
            UNKNOWN if !self.first_wave_over() => Some(self.first_wave),
            _ => Some(self.max_processes),
        }
    }

    async fn process(
        &self,
        item: &Item,
        ctx: &AttemptContext,
    ) -> Result<Option<Output>, ProcessError> {
        let _slot = crate::slot(&self.slots).await?;
        let id = item.id.as_str();
        let (log_tx, log) = mpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        let Checkout {
            proc,
            fresh,
            inline,
            log: route,
        } = self.checkout(id, Ticket { reply, log: log_tx }).await?;
        let mut flight = InFlight {
            ctx,
            proc,
            id,
            inline,
            log,
            tail: Vec::new(),
            answered: false,
        };
        if !fresh && !inline {
            // What the process wrote since its last answer is no item's.
            flight.proc.drain().await;
            *lock(&flight.proc.route) = route;
        }
        let mut line = item_json(item, ctx, deadline_epoch_ms(ctx));
        line.push('\n');
        let pid = flight.proc.pid;

        // A process that died before reading shows as a failed write; its
        // reader then tells how it ended. The write is raced with the
        // deadline too: a process that stops reading fills its pipe.
        let mut written: Option<std::io::Result<()>> = None;
        let reply = {
            let proc = flight.proc.clone();
            let write = async move { proc.stdin.lock().await.write_all(line.as_bytes()).await };
            let InFlight { log, tail, .. } = &mut flight;
            let deadline = ctx.deadline;
            let cutoff = async move {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            // Set once a write fails: how long the reader has to say why.
            let broken = tokio::time::sleep(Duration::from_secs(86_400));
            tokio::pin!(write, answer, cutoff, broken);
            loop {
                tokio::select! {
                    w = &mut write, if written.is_none() => {
                        if w.is_err() {
                            broken.as_mut().reset(tokio::time::Instant::now() + EXIT_WAIT * 2);
                        }
                        written = Some(w);
                    }
                    reply = &mut answer => break Waited::Reply(reply.ok()),
                    Some(chunk) = log.recv() => forward(ctx, tail, &chunk),
                    () = &mut cutoff => break Waited::Deadline,
                    () = &mut broken => break Waited::Reply(None),
                }
            }
        };
        let reply = match reply {
            Waited::Reply(reply) => reply,
            Waited::Deadline => {
                flight.proc.abandon(id);
                flight.answered = true;
                flight.finish_log().await;
                let what = if inline {
                    "takes no more items and is ended once its others are answered"
                } else {
                    "is ended"
                };
                return Err(ProcessError::retryable(flight.why(format!(
                    "no answer by the deadline; the process (pid {pid}) {what}"
                ))));
            }
        };
        flight.answered = true;
        flight.finish_log().await;
        let answer = match reply {
            Some(Reply::Answer(answer)) => answer,
            Some(Reply::TooLarge(total)) => {
                // Not read, so not checked to be this item's: the process is
                // ended, but this item's answer was too large either way.
                return Err(ProcessError::permanent(format!(
                    "the answer is {total} bytes; an item's output may be at most {MAX_OUTPUT_BYTES}"
                )));
            }
            Some(Reply::Died(why)) => return Err(ProcessError::retryable(flight.why(why))),
            Some(Reply::Misbehaved(why)) => return Err(ProcessError::retryable(why)),
            None => {
                flight.proc.abandon(id);
                let why = match &written {
                    Some(Err(e)) => format!("the process (pid {pid}) cannot be talked to ({e})"),
                    _ => format!("the process (pid {pid}) stopped answering"),
                };
                return Err(ProcessError::retryable(flight.why(why)));
            }
        };
        if let Some(text) = answer.log.as_deref().filter(|t| !t.is_empty()) {
            ctx.log(text);
        }
        let error = || {
            answer
                .error
                .clone()
                .filter(|e| !e.trim().is_empty())
                .unwrap_or_else(|| "(the processor gave no error message)".to_owned())
        };
        match answer.status {
            Status::Ok => match answer.output {
                Some(raw) if raw.get().len() > MAX_OUTPUT_BYTES => {
                    Err(ProcessError::permanent(format!(
                        "the output is {} bytes; an item's output may be at most {MAX_OUTPUT_BYTES}",
                        raw.get().len()
                    )))
                }
                Some(raw) => Ok(Some(Output::raw(raw))),
                None => Ok(None),
            },
            Status::Retry => {
                let e = ProcessError::retryable(error());
                Err(match answer.retry_after_ms {
                    Some(ms) => e.with_retry_after(Duration::from_millis(ms)),
                    None => e,
                })
            }
            Status::Fail => Err(ProcessError::permanent(error())),
            Status::Throttled => {
                let message = answer
                    .error
                    .clone()
                    .filter(|e| !e.trim().is_empty())
                    .unwrap_or_else(|| "the processor asked to slow down".to_owned());
                let e = ProcessError::throttled(message);
                Err(match answer.retry_after_ms {
                    Some(ms) => e.with_retry_after(Duration::from_millis(ms)),
                    None => e,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_bounded() {
        assert_eq!(quote(b"oops"), "\"oops\"");
        let long = vec![b'x'; 500];
        let q = quote(&long);
        assert!(q.ends_with("... (500 bytes)"), "{q}");
        assert!(q.len() < 230, "{q}");
    }

    /// A line as the reader takes it: a hello, or an answer.
    fn heard(line: &str) -> Result<Result<Answer, &'static str>, String> {
        let said: Said = serde_json::from_str(line).map_err(|e| e.to_string())?;
        assert!(said.hello.is_none(), "{line} is a hello");
        Ok(said.into_answer())
    }

    fn status(line: &str) -> Status {
        match heard(line) {
            Ok(Ok(answer)) => answer.status,
            other => panic!("{line}: {:?}", other.map(|a| a.map(|a| a.status))),
        }
    }

    fn refused(line: &str) -> String {
        match heard(line) {
            Ok(Ok(answer)) => panic!("{line}: taken as {:?}", answer.status),
            Ok(Err(why)) => why.to_owned(),
            Err(why) => why,
        }
    }

    #[test]
    fn a_hello_is_read_apart_from_answers() {
        let said: Said =
            serde_json::from_str(r#"{"hello":"settle-jsonl","max_in_flight":64}"#).unwrap();
        assert_eq!(said.hello.as_deref(), Some(HELLO));
        assert_eq!(said.max_in_flight, Some(64));
        let said: Said = serde_json::from_str(r#"{"id":"a","status":"ok"}"#).unwrap();
        assert!(said.hello.is_none());
    }

    #[test]
    fn answers_are_read_by_their_status() {
        assert_eq!(
            status(r#"{"id":"a","status":"ok","output":{"n":1}}"#),
            Status::Ok
        );
        assert_eq!(
            status(r#"{"id":"a","status":"retry","error":"busy"}"#),
            Status::Retry
        );
        // An error with a retry-after is a retryable failure that waits.
        let a = heard(r#"{"id":"a","status":"retry","error":"busy","retry_after_ms":20}"#);
        let a = a.unwrap().unwrap();
        assert_eq!((a.status, a.retry_after_ms), (Status::Retry, Some(20)));
        assert_eq!(
            status(r#"{"id":"a","status":"fail","error":"no"}"#),
            Status::Fail
        );
        assert_eq!(
            status(r#"{"id":"a","status":"throttled"}"#),
            Status::Throttled
        );
        let why = refused(r#"{"id":"a","status":"maybe"}"#);
        assert!(why.contains("unknown variant"), "{why}");
        assert_eq!(refused(r#"{"status":"ok"}"#), "missing field `id`");
        assert_eq!(refused(r#"{"id":"a"}"#), "missing field `status`");
    }

    #[test]
    fn throttled_true_or_a_bare_retry_after_asks_to_slow_down() {
        for line in [
            r#"{"id":"a","throttled":true}"#,
            r#"{"id":"a","throttled":true,"status":"throttled"}"#,
            r#"{"id":"a","throttled":true,"retry_after_ms":1500,"error":"slow down"}"#,
            r#"{"id":"a","retry_after_ms":1500}"#,
            r#"{"id":"a","retry_after_ms":0,"output":null,"log":"waiting"}"#,
        ] {
            assert_eq!(status(line), Status::Throttled, "{line}");
        }
        let a = heard(r#"{"id":"a","throttled":true,"retry_after_ms":1500,"error":"slow down"}"#);
        let a = a.unwrap().unwrap();
        assert_eq!(a.retry_after_ms, Some(1500));
        assert_eq!(a.error.as_deref(), Some("slow down"));
        // `throttled: false` says nothing: a status is still needed.
        assert_eq!(
            status(r#"{"id":"a","throttled":false,"status":"ok"}"#),
            Status::Ok
        );
        for (line, why) in [
            (
                r#"{"id":"a","throttled":true,"status":"ok"}"#,
                "with another status",
            ),
            (
                r#"{"id":"a","throttled":true,"status":"retry"}"#,
                "with another status",
            ),
            (
                r#"{"id":"a","throttled":false,"retry_after_ms":5}"#,
                "missing field `status`",
            ),
            // With an error or an output, a retry-after alone does not say
            // whether the item failed, succeeded or waits.
            (
                r#"{"id":"a","retry_after_ms":5,"error":"busy"}"#,
                "missing field `status`",
            ),
            (
                r#"{"id":"a","retry_after_ms":5,"output":1}"#,
                "missing field `status`",
            ),
            (r#"{"id":"a","retry_after_ms":-5}"#, "invalid value"),
            (r#"{"id":"a","throttled":"yes"}"#, "invalid type"),
        ] {
            let refused = refused(line);
            assert!(refused.contains(why), "{line}: {refused}");
        }
    }

    #[test]
    fn commands_are_checked() {
        let e = Jsonl::new("no-such-program-settle", 1).unwrap_err();
        assert!(e.to_string().contains("not found on the PATH"), "{e}");
        assert!(Jsonl::new("python3 -u x.py", 1).is_ok());
    }
}
