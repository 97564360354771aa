//! `--exec CMD --protocol jsonl`: long-lived processes, one JSON line in and
//! one out per item. The protocol, for those who implement it, is
//! `docs/protocol-jsonl.md`; this is how Settle keeps its side.
//!
//! - A pool of at most `parallelism` processes (`sh -c CMD`, each in a
//!   process group of its own), started when an item needs one and none is
//!   idle. Each has at most one item in flight.
//! - A process that dies, answers garbage or for another item, or is still
//!   working when its attempt ends (the deadline passes, or the worker drops
//!   the attempt at its timeout) fails that item, retryably, and is never
//!   given another: its group gets SIGTERM, then SIGKILL after
//!   [`KILL_GRACE`]. The next item starts a fresh one. A process is reused
//!   only after a well-formed answer for the item it was given, so no answer
//!   can be pending when it gets the next.
//!
//! # The attempt's log, exactly
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
//! the one that fails if starting fails.
//!
//! So a process that writes to stderr only while it works on an item (the
//! helpers' handlers run one item at a time) gets exact logs. Bytes written
//! *between* items by something running on its own (a background thread)
//! land in no item's log, except those written in the instants between the
//! answer and Settle's drain (they go to the item that was answered) or
//! between the drain ahead of the next item and the process reading it
//! (they go to that item).
//!
//! For an attempt that ends without an answer (the process died or
//! misbehaved), its log is what Settle had read by then, plus a drain.
//! For an attempt the worker drops at its timeout, it is what the routing
//! task had read from the pipe by then; the rest goes to debug.

use crate::exec::{check_command, Group, KILL_GRACE};
use crate::{deadline_epoch_ms, item_json, last_line, SpecError};
use async_trait::async_trait;
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::value::RawValue;
use settle_core::domain::{Item, Output, ProcessError, MAX_OUTPUT_BYTES};
use settle_core::{AttemptContext, Processor};
use std::io::Read;
use std::os::fd::AsFd;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// The longest answer line read in full. An answer carries an output of at
/// most [`MAX_OUTPUT_BYTES`], plus a little; a longer line is read to its
/// end (to name its size) but not kept.
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

/// Long-lived processes speaking JSON lines, one item in flight each.
pub struct Jsonl {
    command: String,
    /// One permit per process the pool may hold.
    slots: Semaphore,
    /// Processes that answered their last item well and wait for the next.
    idle: Mutex<Vec<Proc>>,
}

impl std::fmt::Debug for Jsonl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jsonl")
            .field("command", &self.command)
            .field("idle", &lock(&self.idle).len())
            .finish_non_exhaustive()
    }
}

impl Jsonl {
    /// Refuses a command whose program cannot be found or executed (where
    /// that can be told without running it), as `--exec` does. No process
    /// is started before an item needs one.
    pub fn new(command: &str, parallelism: usize) -> Result<Self, SpecError> {
        check_command(command)?;
        Ok(Self {
            command: command.to_owned(),
            slots: Semaphore::new(parallelism.max(1)),
            idle: Mutex::default(),
        })
    }

    /// An idle process that is still alive, if there is one.
    fn idle_process(&self) -> Option<Proc> {
        loop {
            let mut proc = lock(&self.idle).pop()?;
            match proc.child.try_wait() {
                // Anything on stdout now was written after its last answer
                // (or is its end): it would be read as the next item's
                // answer. A replacement costs no item; a wrong answer would.
                Ok(None) if proc.stdout_is_quiet() => return Some(proc),
                Ok(None) => tracing::debug!(
                    pid = proc.pid,
                    "a jsonl process wrote to stdout after its answer, or closed it: replaced"
                ),
                // Died while idle: dropping it ends what is left of its group.
                Ok(Some(status)) => {
                    tracing::debug!(pid = proc.pid, %status, "a jsonl process exited while idle")
                }
                Err(e) => tracing::debug!(pid = proc.pid, error = %e, "a jsonl process is lost"),
            }
        }
    }

    /// Starts a process whose stderr goes to `first` from the start: what
    /// a process says while starting (an import error, say) is about the
    /// item that started it.
    fn start(&self, first: Route) -> Result<Proc, ProcessError> {
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
        let group = Group(child.id().map(|id| Pid::from_raw(id as i32)));
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(ProcessError::retryable("the process's pipes are missing"));
        };
        let route = Arc::new(Mutex::new(first));
        let (drains, drain_requests) = mpsc::unbounded_channel();
        tokio::spawn(pump(stderr, route.clone(), drain_requests, pid));
        tracing::debug!(pid, command = %self.command, "started a jsonl process");
        let stdout_now = stdout
            .as_fd()
            .try_clone_to_owned()
            .map(std::fs::File::from)
            .ok();
        Ok(Proc {
            pid,
            stdin,
            stdout: BufReader::new(stdout),
            stdout_now,
            child,
            route,
            drains,
            _group: group,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a process's stderr goes right now: the channel of the item in
/// flight, or nowhere (debug) between items.
type Route = Option<mpsc::UnboundedSender<Vec<u8>>>;

/// One running process. Dropping it closes its stdin, then ends its group
/// (SIGTERM, SIGKILL after [`KILL_GRACE`]); fields drop in this order.
struct Proc {
    pid: u32,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// Not killed on drop: `_group` does that, SIGTERM first. Tokio reaps
    /// it once it exits.
    child: Child,
    /// A second handle on stdout's pipe (non-blocking), to look for
    /// unasked-for output without waiting.
    stdout_now: Option<std::fs::File>,
    route: Arc<Mutex<Route>>,
    /// Asks the stderr task to drain the pipe; it answers when done.
    drains: mpsc::UnboundedSender<oneshot::Sender<()>>,
    _group: Group,
}

impl Proc {
    /// Whether stdout holds nothing to read right now, and has not ended.
    fn stdout_is_quiet(&self) -> bool {
        if !self.stdout.buffer().is_empty() {
            return false;
        }
        let Some(now) = &self.stdout_now else {
            return true;
        };
        let mut byte = [0u8; 1];
        loop {
            match (&*now).read(&mut byte) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                _ => return false,
            }
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
        "a jsonl process wrote to stderr with no item in flight"
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

/// An item in flight on a process. Dropped (also when the worker drops the
/// attempt at its timeout), it closes the item's log and gives the process
/// back to the pool only if it answered well, else ends it.
struct InFlight<'a> {
    pool: &'a Jsonl,
    ctx: &'a AttemptContext,
    proc: Option<Proc>,
    log: mpsc::UnboundedReceiver<Vec<u8>>,
    /// The end of what this item's stderr said, for an error message.
    tail: Vec<u8>,
    reusable: bool,
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
        if let Some(proc) = &self.proc {
            *lock(&proc.route) = None;
        }
        while let Ok(chunk) = self.log.try_recv() {
            forward(self.ctx, &mut self.tail, &chunk);
        }
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
        if let Some(proc) = self.proc.take() {
            if self.reusable {
                lock(&self.pool.idle).push(proc);
            } else {
                tracing::debug!(pid = proc.pid, "ending a jsonl process");
            }
        }
    }
}

/// What came of sending the item.
enum Heard {
    /// A line, complete or cut by the end of stdout; at most
    /// [`MAX_LINE_BYTES`] of it kept, `total` its length.
    Line {
        kept: Vec<u8>,
        total: usize,
        complete: bool,
    },
    Io(std::io::Error),
    Deadline,
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

#[derive(Deserialize)]
struct Answer {
    id: String,
    status: Status,
    #[serde(default)]
    output: Option<Box<RawValue>>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    retry_after_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Retry,
    Fail,
}

#[async_trait]
impl Processor for Jsonl {
    async fn process(
        &self,
        item: &Item,
        ctx: &AttemptContext,
    ) -> Result<Option<Output>, ProcessError> {
        // Declared before the item in flight, so released after it: a
        // process is back in the pool before its permit is.
        let _slot = crate::slot(&self.slots).await?;
        let (tx, log) = mpsc::unbounded_channel();
        let proc = match self.idle_process() {
            Some(proc) => {
                // What the process wrote since its last answer is no item's.
                proc.drain().await;
                *lock(&proc.route) = Some(tx);
                proc
            }
            None => self.start(Some(tx))?,
        };
        let mut flight = InFlight {
            pool: self,
            ctx,
            proc: Some(proc),
            log,
            tail: Vec::new(),
            reusable: false,
        };
        let mut line = item_json(item, ctx, deadline_epoch_ms(ctx));
        line.push('\n');

        let heard = {
            let InFlight {
                proc, log, tail, ..
            } = &mut flight;
            let Some(proc) = proc.as_mut() else {
                unreachable!("set above")
            };
            let talk = async {
                // A process that died before reading shows as a failed write.
                if let Err(e) = proc.stdin.write_all(line.as_bytes()).await {
                    return Heard::Io(e);
                }
                read_line(&mut proc.stdout, MAX_LINE_BYTES).await
            };
            let deadline = ctx.deadline;
            let cutoff = async move {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(talk, cutoff);
            loop {
                tokio::select! {
                    heard = &mut talk => break heard,
                    Some(chunk) = log.recv() => forward(ctx, tail, &chunk),
                    () = &mut cutoff => break Heard::Deadline,
                }
            }
        };
        let Some(proc) = flight.proc.as_mut() else {
            unreachable!("set above")
        };
        let pid = proc.pid;

        let (kept, total) = match heard {
            Heard::Line {
                kept,
                total,
                complete: true,
            } => (kept, total),
            Heard::Deadline => {
                proc.drain().await;
                flight.close_log();
                return Err(ProcessError::retryable(flight.why(format!(
                    "no answer by the deadline; the process (pid {pid}) is ended"
                ))));
            }
            Heard::Line { .. } | Heard::Io(_) => {
                let exited = match tokio::time::timeout(EXIT_WAIT, proc.child.wait()).await {
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
                // A failed write or read says less than the exit status.
                let what = match (exited, &heard) {
                    (Some(how), Heard::Line { kept, .. }) if !kept.is_empty() => format!(
                        "{how} before answering, leaving an unfinished line: {}",
                        quote(kept)
                    ),
                    (Some(how), _) => format!("{how} before answering"),
                    (None, Heard::Io(e)) => format!("cannot be talked to ({e})"),
                    (None, _) => "closed its stdout before answering".to_owned(),
                };
                // Its last words (a traceback) are this item's.
                proc.drain().await;
                flight.close_log();
                return Err(ProcessError::retryable(
                    flight.why(format!("the process (pid {pid}) {what}")),
                ));
            }
        };
        proc.drain().await;
        flight.close_log();

        if total > MAX_LINE_BYTES {
            // Not read, so not checked to be this item's: the process is
            // ended, but this item's answer was too large either way.
            return Err(ProcessError::permanent(format!(
                "the answer is {total} bytes; an item's output may be at most {MAX_OUTPUT_BYTES}"
            )));
        }
        let answer: Answer = serde_json::from_slice(&kept).map_err(|e| {
            ProcessError::retryable(format!(
                "the process (pid {pid}) answered a line that is not an answer ({e}): {}",
                quote(&kept)
            ))
        })?;
        if answer.id != item.id.as_str() {
            return Err(ProcessError::retryable(format!(
                "the process (pid {pid}) answered for item {:?} while item {:?} was in flight: {}",
                answer.id,
                item.id.as_str(),
                quote(&kept)
            )));
        }
        // Answered well, for this item: nothing is pending on it.
        flight.reusable = true;
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

    #[test]
    fn commands_are_checked() {
        let e = Jsonl::new("no-such-program-settle", 1).unwrap_err();
        assert!(e.to_string().contains("not found on the PATH"), "{e}");
        assert!(Jsonl::new("python3 -u x.py", 1).is_ok());
    }
}
