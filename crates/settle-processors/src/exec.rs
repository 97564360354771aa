//! `--exec CMD`: one process per attempt, as nextest runs a test.
//!
//! | what | contract |
//! |---|---|
//! | command | `sh -c CMD`, in a process group of its own, started once the group is listed (see [`crate::groups`]) |
//! | stdin | the item: `{"id", "payload", "run_id", "attempt", "idempotency_key"}` and a newline |
//! | environment | `SETTLE_RUN_ID`, `SETTLE_ITEM_ID`, `SETTLE_ATTEMPT`, `SETTLE_IDEMPOTENCY_KEY`, `SETTLE_DEADLINE_MS` (Unix epoch ms; absent without a deadline) |
//! | stdout | the item's output: JSON if it parses, else kept as a string; nothing is no output |
//! | stderr | the attempt's log |
//! | exit 0 | succeeded |
//! | exit 65 (EX_DATAERR), or a code of `--permanent-exit-codes` | failed permanently |
//! | exit 75 ([`EXIT_THROTTLED`], EX_TEMPFAIL), unless `--permanent-exit-codes` names it | throttled: not a failure, no attempt used; the run slows down. stdout may be `{"retry_after_ms": N}`: the run waits that long first |
//! | any other exit, death by a signal (or the shell's exit 128 + N for a command killed by signal N) | failed, retryable |
//! | the item timeout | the whole process group is sent SIGTERM, then SIGKILL after [`KILL_GRACE`]; retryable |
//! | Settle exits or is killed | the same, see [`crate::groups`] |
//!
//! The error is the last non-empty line of stderr, else the exit status.
//! Only an exit 0's stdout is an output; an exit 75's is read for its
//! retry-after alone, and any other exit's is dropped.

use crate::groups::{GuardError, GROUPS};
use crate::{deadline_epoch_ms, item_json, last_line, SpecError};
use async_trait::async_trait;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use settle_core::domain::{Item, Output, ProcessError, MAX_OUTPUT_BYTES};
use settle_core::{AttemptContext, Processor};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

pub use crate::groups::KILL_GRACE;

/// What the attempt's group runs first: it waits for a line on stdin, which
/// Settle writes once the group is listed and the guard knows it, and then
/// becomes `sh -c CMD` (the same process). A Settle killed before that
/// closes the pipe, and the user's command never starts.
const AFTER_GO: &str = r#"IFS= read -r go || exit 125; exec sh -c "$1""#;

/// Bytes of stderr kept aside for the error message (its last line).
const ERROR_TAIL: usize = 4096;

/// The exit code that says "slow down": the called service is rate
/// limiting (an HTTP 429 to a `curl` in the script, say). It is
/// `EX_TEMPFAIL` of sysexits.h, "a temporary failure; the user is invited
/// to retry later", which mail agents already use for the same purpose.
/// The attempt is no failure and uses none of the item's attempts.
pub const EXIT_THROTTLED: i32 = 75;

/// Runs the user's command once per attempt.
#[derive(Debug)]
pub struct Exec {
    command: String,
    permanent: Vec<i32>,
    slots: Semaphore,
}

impl Exec {
    /// Refuses a command whose program cannot be found or executed (where
    /// that can be told without running it).
    pub fn new(command: &str, permanent: Vec<i32>, parallelism: usize) -> Result<Self, SpecError> {
        check_command(command)?;
        Ok(Self {
            command: command.to_owned(),
            permanent,
            slots: Semaphore::new(parallelism.max(1)),
        })
    }
}

/// Shell words that are not programs on the PATH.
const SHELL_WORDS: &[&str] = &[
    "!", "{", "(", "[", "[[", ".", ":", "alias", "case", "cd", "command", "echo", "eval", "exec",
    "exit", "export", "false", "for", "if", "printf", "read", "set", "test", "true", "ulimit",
    "umask", "unset", "until", "wait", "while",
];

pub(crate) fn check_command(command: &str) -> Result<(), SpecError> {
    let refuse = |reason: String| SpecError::Command {
        command: command.to_owned(),
        reason,
    };
    let Some(program) = command
        .split_whitespace()
        .find(|w| !w.contains('=') || w.starts_with('='))
    else {
        return Err(refuse("the command is empty".into()));
    };
    if SHELL_WORDS.contains(&program)
        || program.contains(['$', '`', '"', '\'', '(', '\\', '~', '*', '?'])
    {
        // The shell decides what this is; running it will tell.
        return Ok(());
    }
    let executable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let p = Path::new(program);
        if !p.exists() {
            return Err(refuse(format!("{program} does not exist")));
        }
        if !executable(p) {
            return Err(refuse(format!("{program} is not an executable file")));
        }
        return Ok(());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| executable(&dir.join(program))) {
        Ok(())
    } else {
        Err(refuse(format!("{program} is not found on the PATH")))
    }
}

#[async_trait]
impl Processor for Exec {
    async fn process(
        &self,
        item: &Item,
        ctx: &AttemptContext,
    ) -> Result<Option<Output>, ProcessError> {
        let _slot = crate::slot(&self.slots).await?;
        let deadline = deadline_epoch_ms(ctx);
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(AFTER_GO)
            .arg("settle-exec")
            .arg(&self.command)
            .env("SETTLE_RUN_ID", ctx.run.as_str())
            .env("SETTLE_ITEM_ID", item.id.as_str())
            .env("SETTLE_ATTEMPT", ctx.attempt.to_string())
            .env("SETTLE_IDEMPOTENCY_KEY", &ctx.idempotency_key)
            .env_remove("SETTLE_DEADLINE_MS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(ms) = deadline {
            cmd.env("SETTLE_DEADLINE_MS", ms.to_string());
        }
        let mut child = cmd.spawn().map_err(|e| {
            ProcessError::retryable(format!("cannot start `sh -c {}`: {e}", self.command))
        })?;
        let pid = child.id().expect("not yet waited for");
        let pgid = Pid::from_raw(pid as i32);
        // Dropping `child` kills the waiting shell: the command never ran.
        let _group = match GROUPS.attempt(pid) {
            Ok(group) => group,
            // No outcome for an attempt that never ran: the process is
            // about to exit, and the item's message comes back.
            Err(GuardError::Exiting) => std::future::pending().await,
            Err(e) => {
                return Err(ProcessError::retryable(format!(
                    "not started: {}",
                    crate::http::causes(&e)
                )))
            }
        };
        // The go-ahead line, then the item.
        let input = format!("\n{}", item_json(item, ctx, deadline));
        let mut stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        // A command that does not read its stdin closes the pipe: fine.
        let feed = async move {
            let _ = stdin.write_all(input.as_bytes()).await;
            let _ = stdin.write_all(b"\n").await;
        };
        let out = read_bounded(stdout, MAX_OUTPUT_BYTES);
        let err = async {
            let mut stderr = stderr;
            let mut tail: Vec<u8> = Vec::new();
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                ctx.log(&buf[..n]);
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * ERROR_TAIL {
                    tail.drain(..tail.len() - ERROR_TAIL);
                }
            }
            tail
        };
        let waited = async {
            let status = child.wait().await;
            // What the command left behind in its group would hold the
            // pipes open: the attempt is over, so is its group.
            let _ = killpg(pgid, Signal::SIGTERM);
            status
        };
        let (_, (stdout, total), tail, status) = tokio::join!(feed, out, err, waited);
        let status = status
            .map_err(|e| ProcessError::retryable(format!("waiting for the command failed: {e}")))?;
        let tail = String::from_utf8_lossy(&tail);
        let why = |what: String| match last_line(&tail) {
            Some(line) => format!("{what}: {line}"),
            None => what,
        };
        match status.code() {
            Some(0) if total > MAX_OUTPUT_BYTES => Err(ProcessError::permanent(format!(
                "the output is {total} bytes; an item's output may be at most {MAX_OUTPUT_BYTES}"
            ))),
            Some(0) => {
                let text = String::from_utf8_lossy(&stdout);
                Ok((!text.trim().is_empty()).then(|| Output::from_text(&text)))
            }
            Some(code) if self.permanent.contains(&code) => {
                Err(ProcessError::permanent(why(format!("exit {code}"))))
            }
            Some(EXIT_THROTTLED) => {
                let e = ProcessError::throttled(why(format!("exit {EXIT_THROTTLED}")));
                Err(match throttle_retry_after(&stdout) {
                    Ok(Some(after)) => e.with_retry_after(after),
                    Ok(None) => e,
                    Err(why) => {
                        ctx.log(format!(
                            "[settle: exit {EXIT_THROTTLED} with {why}; no retry-after taken]\n"
                        ));
                        e
                    }
                })
            }
            // The shell reports a command killed by signal N as 128 + N.
            Some(code) if (129..=128 + 64).contains(&code) => Err(ProcessError::retryable(why(
                format!("killed by signal {}", code - 128),
            ))),
            Some(code) => Err(ProcessError::retryable(why(format!("exit {code}")))),
            None => {
                use std::os::unix::process::ExitStatusExt;
                let signal = status.signal().unwrap_or(0);
                Err(ProcessError::retryable(why(format!(
                    "killed by signal {signal}"
                ))))
            }
        }
    }
}

/// The retry-after a throttled command wrote to stdout: nothing, or
/// `{"retry_after_ms": N}`. Anything else is said (as an `Err`) but does not
/// change that the command asked to slow down.
fn throttle_retry_after(stdout: &[u8]) -> Result<Option<Duration>, String> {
    if stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let not_it = |why: String| format!("a stdout that is not {{\"retry_after_ms\": N}} ({why})");
    let object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(stdout).map_err(|e| not_it(e.to_string()))?;
    match object.get("retry_after_ms") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(ms) => ms
            .as_u64()
            .map(|ms| Some(Duration::from_millis(ms)))
            .ok_or_else(|| not_it(format!("retry_after_ms is {ms}, not a whole number of ms"))),
    }
}

/// Reads `r` to its end, keeping at most `limit + 1` bytes; returns them
/// and how many there were in all.
async fn read_bounded(mut r: impl AsyncRead + Unpin, limit: usize) -> (Vec<u8>, usize) {
    let mut kept = Vec::new();
    let mut total = 0;
    let mut buf = vec![0u8; 8192];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        total += n;
        let room = (limit + 1).saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    (kept, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_checked_where_that_can_be_told() {
        assert!(check_command("sh -c true").is_ok());
        assert!(check_command("FOO=1 cat").is_ok());
        assert!(check_command("echo hi | cat").is_ok());
        assert!(check_command("$HOME/bin/x").is_ok(), "the shell decides");
        let e = check_command("no-such-program-settle --x").unwrap_err();
        assert!(e.to_string().contains("not found on the PATH"), "{e}");
        let e = check_command("/no/such/file").unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        // A file of our own: /etc/hostname is mode 755 on some machines.
        let plain = tempfile::NamedTempFile::new().unwrap();
        let e = check_command(&plain.path().display().to_string()).unwrap_err();
        assert!(e.to_string().contains("not an executable"), "{e}");
        assert!(check_command("   ").is_err());
    }
}
