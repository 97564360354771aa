//! SIGINT and SIGTERM for the long commands (`run`, `resume`, `redrive`,
//! `dispatch`, `load`) and for `results -o FILE` (which removes its
//! partial file): the first signal asks the command to stop cleanly
//! (what it did is saved, and it says how to continue); a second one ends
//! the process at once, which loses nothing either (every step is
//! committed or not at all): it says how to continue (one JSON object on
//! stdout under `--json`), ends the processes of the attempts in flight
//! (within [`KILL_GRACE`]), and exits.

use serde_json::json;
use settle_processors::groups::{self, KILL_GRACE};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::watch;

/// The signal that asked a command to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT (Ctrl-C): exit code 130.
    Interrupt,
    /// SIGTERM (systemd, docker, CI, `kill`): exit code 143.
    Terminate,
}

impl Signal {
    /// 128 + the signal's number, as shells report a death by that signal.
    pub fn exit_code(self) -> ExitCode {
        ExitCode::from(self.code())
    }

    fn code(self) -> u8 {
        match self {
            Self::Interrupt => 130,
            Self::Terminate => 143,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Interrupt => "SIGINT",
            Self::Terminate => "SIGTERM",
        }
    }
}

/// Whether the command's final report is on stdout: once it is, a forced
/// stop prints none (a script reads exactly one). Held while printing one.
static REPORTED: Mutex<bool> = Mutex::new(false);

/// Prints the command's final report with `print`, unless one is out
/// already (a forced stop's, or the command's); true if it printed.
pub fn report(print: impl FnOnce()) -> bool {
    let mut reported = REPORTED.lock().unwrap_or_else(PoisonError::into_inner);
    let first = !*reported;
    if first {
        print();
        *reported = true;
    }
    first
}

/// Whether a stop was asked for, readable from any thread.
#[derive(Debug, Clone)]
pub struct Stop {
    signal: watch::Receiver<Option<Signal>>,
    /// The run the command works on, once there is one: a forced stop
    /// names it.
    run: Arc<Mutex<Option<String>>>,
}

impl Stop {
    /// Takes over SIGINT and SIGTERM for the rest of the process; `json`:
    /// a forced stop reports on stdout as JSON.
    pub fn install(json: bool) -> std::io::Result<Self> {
        let (tx, rx) = watch::channel(None);
        let run: Arc<Mutex<Option<String>>> = Arc::default();
        let forced_run = run.clone();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut int = signal(SignalKind::interrupt())?;
            let mut term = signal(SignalKind::terminate())?;
            tokio::spawn(async move {
                loop {
                    let got = tokio::select! {
                        _ = int.recv() => Signal::Interrupt,
                        _ = term.recv() => Signal::Terminate,
                    };
                    if tx.borrow().is_some() {
                        let run = forced_run
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .clone();
                        forced(got, run.as_deref(), json).await;
                    }
                    eprintln!(
                        "{}: stopping cleanly (send it again to stop at once)",
                        got.name()
                    );
                    let _ = tx.send(Some(got));
                }
            });
        }
        #[cfg(not(unix))]
        tokio::spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                if tx.borrow().is_some() {
                    let run = forced_run
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone();
                    forced(Signal::Interrupt, run.as_deref(), json).await;
                }
                let _ = tx.send(Some(Signal::Interrupt));
            }
        });
        Ok(Self { signal: rx, run })
    }

    /// A stop that never comes (for tests and the commands that ignore it).
    pub fn never() -> Self {
        // With its sender gone, `stopped` waits forever.
        Self {
            signal: watch::channel(None).1,
            run: Arc::default(),
        }
    }

    /// Names the run the command works on, for a forced stop to report.
    pub fn set_run(&self, run: &impl std::fmt::Display) {
        *self.run.lock().unwrap_or_else(PoisonError::into_inner) = Some(run.to_string());
    }

    /// The signal received, if any.
    pub fn signal(&self) -> Option<Signal> {
        *self.signal.borrow()
    }

    /// Waits for a signal.
    pub async fn stopped(&self) -> Signal {
        let mut rx = self.signal.clone();
        loop {
            if let Some(s) = *rx.borrow_and_update() {
                return s;
            }
            if rx.changed().await.is_err() {
                // The sender is gone: no signal will ever come.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// A second signal: says how to continue (unless the command has reported
/// already), ends the attempts' processes, and exits with the signal's code.
async fn forced(got: Signal, run: Option<&str>, json: bool) -> ! {
    let reported = report(|| {
        if json {
            println!("{}", forced_json(run));
        }
        match run {
            Some(r) => eprintln!(
                "{}: stopping now; continue with: settle resume {r}",
                got.name()
            ),
            None => eprintln!("{}: stopping now", got.name()),
        }
    });
    if !reported {
        // The command has said how it ended; it is only ending processes.
        eprintln!("{}: stopping now", got.name());
    }
    if !groups::GROUPS.is_empty() {
        eprintln!(
            "ending the processes of the attempts in flight (at most {} s)",
            KILL_GRACE.as_secs()
        );
    }
    // Off the runtime: its threads go on reaping the processes that end.
    let _ = tokio::task::spawn_blocking(groups::end_all).await;
    std::process::exit(i32::from(got.code()))
}

/// What a forced stop prints under `--json`.
fn forced_json(run: Option<&str>) -> serde_json::Value {
    let mut v = json!({ "interrupted": true, "forced": true });
    if let Some(run) = run {
        v["run_id"] = json!(run);
        v["resume"] = json!(format!("settle resume {run}"));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forced_stop_names_the_run_and_how_to_resume_it() {
        assert_eq!(
            forced_json(Some("r1")),
            json!({"interrupted": true, "forced": true, "run_id": "r1", "resume": "settle resume r1"})
        );
        assert_eq!(
            forced_json(None),
            json!({"interrupted": true, "forced": true})
        );
    }
}
