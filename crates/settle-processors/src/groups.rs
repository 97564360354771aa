//! The process groups Settle starts for attempts, and how every one of them
//! ends, whatever happens to Settle (invariant 10).
//!
//! - **While Settle runs**, an attempt's group is listed here from its start
//!   (`Groups::attempt`). When the attempt ends (its command exited, or it
//!   timed out and was dropped) its group is sent SIGTERM, and SIGKILL
//!   [`KILL_GRACE`] later unless it is gone by then; a reaper thread does
//!   the waiting, so a timed-out attempt's future need not.
//! - **When Settle exits** on any path it controls (done, an error, a signal,
//!   a second signal), [`end_all`] ends every group still listed the same
//!   way and waits for them: at most [`KILL_GRACE`], less when they go.
//! - **When Settle is killed** (SIGKILL, a crash, the OOM killer), a guard
//!   process ends them: a `sh` started with the first attempt, in a process
//!   group of its own (a terminal's Ctrl-C is not for it), that keeps the
//!   same list from lines Settle writes to its stdin. Its stdin reaches EOF
//!   when Settle's end of the pipe closes, however Settle ends; it then
//!   sends SIGKILL to the groups already sent SIGTERM (their grace was
//!   running), SIGTERM to the others, SIGKILL to those still there after
//!   [`KILL_GRACE`], and exits.
//!
//! An attempt's command starts only once the guard knows its group (see
//! `exec.rs`): without a guard, an attempt does not run, and fails
//! retryably saying why.
//!
//! A group leaves the list (and the guard's) once it is gone, or once it
//! was sent SIGKILL, which no process can ignore: a process group id is
//! free for reuse only when its group is empty, so a group listed is never
//! another program's.

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long a process group has between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// How often an ending group is looked at.
const POLL: Duration = Duration::from_millis(20);

/// Why an attempt's group cannot be made safe to run.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(
        "cannot start the guard process (`sh`) that ends attempts' processes if Settle is killed"
    )]
    Start(#[source] std::io::Error),
    #[error("cannot write {what:?} to the guard process's stdin")]
    Tell {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Settle is exiting: no more attempts start")]
    Exiting,
}

/// The guard: `$1` is the grace in whole seconds. Lines on stdin: `+G` a
/// live group, `!G` a group sent SIGTERM, `-G` a group gone.
const GUARD: &str = r#"
trap '' HUP INT
live= ending=
without() { kept=; for x in $1; do [ "$x" = "$2" ] || kept="$kept $x"; done; }
while IFS= read -r line; do
  g=${line#?}
  case $g in ''|*[!0-9]*|0|1) continue ;; esac
  without "$live" "$g"; live=$kept
  without "$ending" "$g"; ending=$kept
  case $line in
    +*) live="$live $g" ;;
    !*) ending="$ending $g" ;;
  esac
done
for g in $ending; do kill -s KILL -- "-$g" 2>/dev/null; done
for g in $live; do kill -s TERM -- "-$g" 2>/dev/null; done
if sleep 0.1 2>/dev/null; then tick=0.1 n=$(($1 * 10)); else tick=1 n=$1; fi
while [ -n "$live" ] && [ "$n" -gt 0 ]; do
  left=
  for g in $live; do kill -s 0 -- "-$g" 2>/dev/null && left="$left $g"; done
  live=$left
  [ -n "$live" ] || break
  sleep $tick
  n=$((n - 1))
done
for g in $live; do kill -s KILL -- "-$g" 2>/dev/null; done
"#;

/// The guard process and the write end of its stdin.
struct Guard {
    child: Child,
    stdin: ChildStdin,
}

impl Guard {
    fn start(grace: Duration) -> std::io::Result<Self> {
        let secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(GUARD)
            .arg("settle-guard")
            .arg(secs.to_string())
            .stdin(Stdio::piped())
            // Not Settle's stdout: a reader of Settle's output would wait
            // for the guard too.
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        Ok(Self { child, stdin })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Its stdin closes with `self`; with nothing listed it exits at once.
        // Reaped here if it has, so that it is not left a zombie.
        let _ = self.child.try_wait();
    }
}

/// A group's state in the list: running, or sent SIGTERM at this instant.
#[derive(Debug, Clone, Copy)]
enum State {
    Live,
    Ending(Instant),
}

#[derive(Default)]
struct List {
    groups: HashMap<i32, State>,
    guard: Option<Guard>,
    /// [`Groups::end_all`] has begun: no group is added any more.
    closed: bool,
    /// A reaper thread is running.
    reaping: bool,
}

impl List {
    /// Writes `line` to the guard; on failure (it died) starts another and
    /// gives it the whole list.
    fn tell(&mut self, line: &str, grace: Duration) -> Result<(), GuardError> {
        if let Some(g) = &mut self.guard {
            if writeln!(g.stdin, "{line}").is_ok() {
                return Ok(());
            }
            self.guard = None;
        }
        let mut guard = Guard::start(grace).map_err(GuardError::Start)?;
        let mut all = String::new();
        for (pgid, state) in &self.groups {
            let mark = match state {
                State::Live => '+',
                State::Ending(_) => '!',
            };
            all.push_str(&format!("{mark}{pgid}\n"));
        }
        all.push_str(line);
        all.push('\n');
        guard
            .stdin
            .write_all(all.as_bytes())
            .map_err(|source| GuardError::Tell {
                what: line.to_owned(),
                source,
            })?;
        self.guard = Some(guard);
        Ok(())
    }

    /// Tells an existing guard, if any; a guard that cannot be told is
    /// replaced, with the whole list, by the next attempt.
    fn tell_if_guarded(&mut self, line: &str) {
        if let Some(g) = &mut self.guard {
            if writeln!(g.stdin, "{line}").is_err() {
                self.guard = None;
            }
        }
    }

    fn forget(&mut self, pgid: i32) {
        if self.groups.remove(&pgid).is_some() {
            self.tell_if_guarded(&format!("-{pgid}"));
        }
    }

    /// Sends SIGTERM to a group that is not ending yet; forgets it if gone.
    fn terminate(&mut self, pgid: i32, now: Instant) {
        if matches!(self.groups.get(&pgid), Some(State::Ending(_))) {
            return;
        }
        match killpg(Pid::from_raw(pgid), Signal::SIGTERM) {
            // ESRCH: no member left (the usual end). EPERM: its members are
            // no longer Settle's to signal, which only a reused id can be.
            Err(_) => self.forget(pgid),
            Ok(()) => {
                self.groups.insert(pgid, State::Ending(now));
                self.tell_if_guarded(&format!("!{pgid}"));
            }
        }
    }

    /// Forgets the ending groups that are gone, SIGKILLs those whose grace
    /// is over; true while some are still ending.
    fn reap(&mut self, now: Instant, grace: Duration) -> bool {
        let ending: Vec<(i32, Instant)> = self
            .groups
            .iter()
            .filter_map(|(&g, s)| match s {
                State::Ending(since) => Some((g, *since)),
                State::Live => None,
            })
            .collect();
        if ending.is_empty() {
            return false;
        }
        let running = running_groups();
        let mut left = false;
        for (pgid, since) in ending {
            if !has_running_member(pgid, running.as_ref()) {
                self.forget(pgid);
            } else if now >= since + grace {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                self.forget(pgid);
            } else {
                left = true;
            }
        }
        left
    }
}

/// A list of attempt groups, with its guard. Settle has one ([`GROUPS`]);
/// tests make their own.
pub struct Groups {
    list: Arc<Mutex<List>>,
    grace: Duration,
}

impl std::fmt::Debug for Groups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Groups")
            .field("listed", &self.len())
            .field("grace", &self.grace)
            .finish()
    }
}

impl Groups {
    pub(crate) fn new(grace: Duration) -> Self {
        Self {
            list: Arc::default(),
            grace,
        }
    }

    fn lock(&self) -> MutexGuard<'_, List> {
        // The list stays consistent between statements: a panic elsewhere
        // while it was held leaves nothing half-done.
        self.list.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lists the group of a process just started with `process_group(0)`
    /// (`pid` is its leader, and so the group's id), and has the guard list
    /// it too, starting the guard if there is none. On an error the group
    /// is not listed and its process must not be let run.
    pub(crate) fn attempt(&self, pid: u32) -> Result<Group<'_>, GuardError> {
        let pgid = pgid_of(pid);
        let mut list = self.lock();
        if list.closed {
            return Err(GuardError::Exiting);
        }
        list.groups.insert(pgid, State::Live);
        if let Err(e) = list.tell(&format!("+{pgid}"), self.grace) {
            list.groups.remove(&pgid);
            return Err(e);
        }
        Ok(Group {
            groups: self,
            pgid: Some(pgid),
        })
    }

    /// A group that is not listed while it runs (a jsonl process, which
    /// ends when its stdin closes) but is ended like an attempt's once
    /// dropped.
    pub(crate) fn unlisted(&self, pid: Option<u32>) -> Group<'_> {
        Group {
            groups: self,
            pgid: pid.map(pgid_of),
        }
    }

    /// Sends `pgid` SIGTERM, and SIGKILL after the grace unless it is gone.
    fn end(&self, pgid: i32) {
        let mut list = self.lock();
        list.terminate(pgid, Instant::now());
        if list.groups.contains_key(&pgid) && !list.reaping {
            list.reaping = true;
            let (list_ref, grace) = (self.list.clone(), self.grace);
            let started = std::thread::Builder::new()
                .name("settle-groups".into())
                .spawn(move || reaper(&list_ref, grace));
            if started.is_err() {
                // No thread: SIGKILL at once rather than never.
                list.reaping = false;
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                list.forget(pgid);
            }
        }
    }

    /// Ends every group listed (SIGTERM, then SIGKILL after the grace) and
    /// waits until they are gone, at most the grace; afterwards no attempt
    /// starts. For a process about to exit. Returns how many groups were
    /// still running.
    pub fn end_all(&self) -> usize {
        let now = Instant::now();
        let mut list = self.lock();
        list.closed = true;
        let live: Vec<i32> = list
            .groups
            .iter()
            .filter(|(_, s)| matches!(s, State::Live))
            .map(|(&g, _)| g)
            .collect();
        for &pgid in &live {
            list.terminate(pgid, now);
        }
        let running = list.groups.len();
        while list.reap(Instant::now(), self.grace) {
            drop(list);
            std::thread::sleep(POLL);
            list = self.lock();
        }
        // Nothing is listed: the guard, its stdin closed, exits at once.
        list.guard = None;
        running
    }

    /// How many groups are listed (running or ending).
    pub fn len(&self) -> usize {
        self.lock().groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn reaper(list: &Mutex<List>, grace: Duration) {
    loop {
        std::thread::sleep(POLL);
        let mut l = list.lock().unwrap_or_else(PoisonError::into_inner);
        if !l.reap(Instant::now(), grace) {
            l.reaping = false;
            return;
        }
    }
}

/// Whether `pgid` has a member that is not a zombie. A zombie member
/// (one its parent has not reaped yet, as may happen to a grandchild
/// reparented to an init that reaps lazily) makes a group look alive to
/// kill(2) but runs nothing; `running` (see [`running_groups`]) tells them
/// apart where /proc is there to ask.
fn has_running_member(pgid: i32, running: Option<&HashSet<i32>>) -> bool {
    if killpg(Pid::from_raw(pgid), None).is_err() {
        return false;
    }
    running.is_none_or(|r| r.contains(&pgid))
}

/// The process groups with a member that is not a zombie, from
/// /proc/PID/stat (Linux); `None` without /proc.
fn running_groups() -> Option<HashSet<i32>> {
    let mut groups = HashSet::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        if !name
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        // A process that has exited since the listing has no stat: skip.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "PID (COMM) STATE PPID PGRP ...": COMM may hold spaces and ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let (Some(state), Some(_ppid), Some(pgrp)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if state != "Z" && state != "X" {
            if let Ok(g) = pgrp.parse() {
                groups.insert(g);
            }
        }
    }
    (!groups.is_empty()).then_some(groups)
}

fn pgid_of(pid: u32) -> i32 {
    let pgid = i32::try_from(pid).unwrap_or(0);
    // Never 0 (Settle's own group) or 1 (to kill(2), every process).
    assert!(pgid > 1, "process id {pid} cannot be an attempt's group");
    pgid
}

/// Settle's process groups: every attempt's, in this process.
pub static GROUPS: LazyLock<Groups> = LazyLock::new(|| Groups::new(KILL_GRACE));

/// [`Groups::end_all`] on Settle's groups: what a process that ran
/// `--exec` attempts does on its way out.
pub fn end_all() -> usize {
    GROUPS.end_all()
}

/// A listed process group, ended when this is dropped: on the way out of an
/// attempt, also when the attempt timed out and its future was dropped.
pub struct Group<'a> {
    groups: &'a Groups,
    pgid: Option<i32>,
}

impl Drop for Group<'_> {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            self.groups.end(pgid);
        }
    }
}

impl std::fmt::Debug for Group<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group").field("pgid", &self.pgid).finish()
    }
}

/// Whether `pgid` still has a member that runs (for tests).
#[cfg(test)]
fn alive(pgid: i32) -> bool {
    has_running_member(pgid, running_groups().as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process group that ignores SIGTERM: a shell and a `sleep` child,
    /// returned once the shell ignores it.
    fn stubborn() -> Child {
        use std::io::Read;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("trap '' TERM; sleep 60 & echo ready; exec >&-; wait")
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let mut ready = [0u8; 6];
        child.stdout.take().unwrap().read_exact(&mut ready).unwrap();
        child
    }

    /// Reaps `child` in the background, as tokio does for an attempt.
    fn reaped(mut child: Child) -> u32 {
        let pid = child.id();
        std::thread::spawn(move || child.wait());
        pid
    }

    #[test]
    fn a_group_that_ignores_sigterm_is_killed_after_the_grace() {
        let groups = Groups::new(Duration::from_millis(300));
        let pid = reaped(stubborn());
        let group = groups.attempt(pid).unwrap();
        assert_eq!(groups.len(), 1);
        let started = Instant::now();
        drop(group);
        while !groups.is_empty() {
            assert!(started.elapsed() < Duration::from_secs(5), "still listed");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(started.elapsed() >= Duration::from_millis(300));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!alive(pgid_of(pid)), "SIGKILL was sent");
    }

    #[test]
    fn end_all_waits_the_grace_at_most_and_less_when_groups_go() {
        let groups = Groups::new(Duration::from_millis(500));
        let stubborn = reaped(stubborn());
        let _a = groups.attempt(stubborn).unwrap();
        let started = Instant::now();
        assert_eq!(groups.end_all(), 1);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(500), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        std::thread::sleep(Duration::from_millis(100));
        assert!(!alive(pgid_of(stubborn)));
        assert!(matches!(
            groups.attempt(std::process::id()),
            Err(GuardError::Exiting)
        ));

        let groups = Groups::new(Duration::from_secs(5));
        let sleeper = Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .unwrap();
        let _b = groups.attempt(reaped(sleeper)).unwrap();
        let started = Instant::now();
        assert_eq!(groups.end_all(), 1);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "SIGTERM was enough"
        );
    }

    #[test]
    fn the_guard_ends_the_groups_when_its_stdin_closes() {
        let groups = Groups::new(Duration::from_millis(300));
        let (a, b) = (reaped(stubborn()), reaped(stubborn()));
        let ga = groups.attempt(a).unwrap();
        let gb = groups.attempt(b).unwrap();
        // As if Settle were killed: nobody ends them but the guard.
        std::mem::forget(ga);
        std::mem::forget(gb);
        let guard = groups.lock().guard.take().unwrap();
        let started = Instant::now();
        drop(guard);
        while alive(pgid_of(a)) || alive(pgid_of(b)) {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the guard left them running"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_dead_guard_is_replaced_with_the_whole_list() {
        let groups = Groups::new(Duration::from_millis(300));
        let a = reaped(stubborn());
        let ga = groups.attempt(a).unwrap();
        {
            let mut list = groups.lock();
            let g = list.guard.as_mut().unwrap();
            g.child.kill().unwrap();
            g.child.wait().unwrap();
        }
        let b = reaped(stubborn());
        let gb = groups.attempt(b).unwrap();
        std::mem::forget(ga);
        std::mem::forget(gb);
        drop(groups.lock().guard.take());
        let started = Instant::now();
        while alive(pgid_of(a)) || alive(pgid_of(b)) {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the new guard does not know both"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
