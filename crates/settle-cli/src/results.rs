//! `settle results`: every item's outcome as one JSON line, in the order
//! the run claimed its items (a `settle run`'s: the file's order).
//!
//! | status | line |
//! |---|---|
//! | succeeded | `{"id", "status": "succeeded", "attempts", "output"}` (`output` is null when there was none) |
//! | failed | `{"id", "status": "failed", "attempts", "error"}` |
//! | not settled yet | `{"id", "status": "pending", "attempts"}` |

use crate::cli::ResultStatus;
use crate::commands::Interrupted;
use crate::deployment::Deployment;
use crate::signals::Stop;
use anyhow::{Context, Result};
use serde_json::json;
use settle_core::domain::ItemStatus;
use settle_core::RunId;
use std::io::Write;
use std::path::Path;

/// Items read, and ledger rows looked up, per page.
const PAGE: usize = 100;

/// Writes the run's results to `to` (stdout if `None`); returns the lines
/// written. A file is written beside its place and renamed into it when
/// complete, so it is never seen half-written; a signal removes the
/// partial file and stops the command, and the temporaries of earlier
/// writes of the same file that died (see [`remove_stale`]) go first.
pub async fn export(
    d: &Deployment,
    run: &RunId,
    only: Option<ResultStatus>,
    to: Option<&Path>,
    stop: &Stop,
) -> Result<u64> {
    match to {
        None => {
            let stdout = std::io::stdout();
            let mut w = std::io::BufWriter::new(stdout.lock());
            let res = write(d, run, only, &mut w).await;
            let res = res.and_then(|n| Ok(w.flush().map(|_| n)?));
            match res {
                // A reader that has seen enough (`| head`) is not an error.
                Err(e)
                    if e.downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
                {
                    Ok(0)
                }
                other => other,
            }
        }
        Some(path) => {
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let name = file_name(path);
            remove_stale(dir, &name, live);
            let tmp = dir.join(partial_name(&name, std::process::id()));
            let mut w = std::io::BufWriter::new(
                std::fs::File::create(&tmp)
                    .with_context(|| format!("cannot write {}", tmp.display()))?,
            );
            let written = async {
                let n = write(d, run, only, &mut w).await?;
                w.flush()?;
                w.get_ref().sync_all()?;
                Ok(n)
            };
            let res = tokio::select! {
                res = written => res,
                signal = stop.stopped() => Err(Interrupted {
                    signal,
                    what: format!("{} was not written", path.display()),
                }
                .into()),
            };
            drop(w);
            match res {
                Ok(n) => {
                    std::fs::rename(&tmp, path).with_context(|| {
                        format!("cannot move {} to {}", tmp.display(), path.display())
                    })?;
                    Ok(n)
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    Err(e)
                }
            }
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "results".into())
}

/// The temporary file that process `pid` writes FILE (named `name`) in.
fn partial_name(name: &str, pid: u32) -> String {
    format!(".{name}.{pid}.partial")
}

/// Removes the temporaries of earlier writes of the file `name` in `dir`
/// whose process is gone (killed by SIGKILL, or the machine went down):
/// `.NAME.PID.partial` where `live(PID)` is false. A live process's is
/// its own write in progress, and stays. Best effort: a temporary that
/// cannot be removed does not stop this write.
fn remove_stale(dir: &Path, name: &str, live: impl Fn(u32) -> bool) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{name}.");
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|rest| rest.strip_suffix(".partial"))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !live(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Whether process `pid` is running, as /proc shows it. Where there is no
/// /proc (not Linux), every process counts as running, so that nothing is
/// removed that may be another write in progress.
fn live(pid: u32) -> bool {
    !Path::new("/proc/self").exists() || Path::new(&format!("/proc/{pid}")).exists()
}

async fn write(
    d: &Deployment,
    run: &RunId,
    only: Option<ResultStatus>,
    w: &mut impl Write,
) -> Result<u64> {
    let mut cursor: Option<String> = None;
    let mut n = 0;
    loop {
        let Some((lines, count, next)) = page(d, run, only, cursor.as_deref()).await? else {
            return Ok(n);
        };
        w.write_all(lines.as_bytes())?;
        n += count;
        cursor = next;
    }
}

/// The results of the run's next [`PAGE`] claimed items after `cursor`:
/// their JSON lines, how many, and the cursor after them; `None` at the
/// end. `settle ui` streams its download page by page with it.
pub(crate) async fn page(
    d: &Deployment,
    run: &RunId,
    only: Option<ResultStatus>,
    cursor: Option<&str>,
) -> Result<Option<(String, u64, Option<String>)>> {
    let b = &d.backend;
    let (items, next) = b.source.claimed(run, cursor, PAGE).await?;
    if items.is_empty() {
        return Ok(None);
    }
    let keys: Vec<_> = items.iter().map(|i| (run.clone(), i.id.clone())).collect();
    let rows = b.ledger.items(&keys).await?;
    let mut out = String::new();
    let mut n = 0;
    for key in &keys {
        let line = match rows.get(key).map(|v| &v.value) {
            Some(rec) if rec.status == ItemStatus::Succeeded => {
                if only == Some(ResultStatus::Failed) {
                    continue;
                }
                json!({"id": key.1, "status": "succeeded", "attempts": rec.attempts, "output": rec.output()})
            }
            Some(rec) if rec.status == ItemStatus::Failed => {
                if only == Some(ResultStatus::Succeeded) {
                    continue;
                }
                json!({"id": key.1, "status": "failed", "attempts": rec.attempts, "error": rec.last_error})
            }
            other => {
                if only.is_some() {
                    continue;
                }
                json!({"id": key.1, "status": "pending", "attempts": other.map_or(0, |r| r.attempts)})
            }
        };
        out.push_str(&line.to_string());
        out.push('\n');
        n += 1;
    }
    Ok(Some((out, n, next)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_dead_writers_temporaries_of_the_same_file_go() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let me = std::process::id();
        let files = [
            partial_name("out.jsonl", 12345),   // dead: goes
            partial_name("out.jsonl", 777),     // live: stays
            partial_name("out.jsonl", me),      // this process's own
            partial_name("other.jsonl", 12345), // another file's
            ".out.jsonl.x.partial".to_owned(),  // not a pid
            "out.jsonl".to_owned(),             // the file itself
        ];
        for f in &files {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        remove_stale(dir, "out.jsonl", |pid| pid == 777);
        let left: Vec<bool> = files.iter().map(|f| dir.join(f).exists()).collect();
        assert_eq!(left, [false, true, true, true, true, true]);
    }

    #[test]
    fn this_process_is_live() {
        assert!(live(std::process::id()));
    }
}
