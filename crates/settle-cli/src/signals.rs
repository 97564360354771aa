//! SIGINT and SIGTERM for the long commands (`run`, `resume`, `redrive`,
//! `dispatch`, `load`) and for `results -o FILE` (which removes its
//! partial file): the first signal asks the command to stop cleanly
//! (what it did is saved, and it says how to continue); a second one ends
//! the process at once, which loses nothing either (every step is
//! committed or not at all), but says less.

use std::process::ExitCode;
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

/// Whether a stop was asked for, readable from any thread.
#[derive(Debug, Clone)]
pub struct Stop(watch::Receiver<Option<Signal>>);

impl Stop {
    /// Takes over SIGINT and SIGTERM for the rest of the process.
    pub fn install() -> std::io::Result<Self> {
        let (tx, rx) = watch::channel(None);
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
                        eprintln!("{}: stopping now", got.name());
                        std::process::exit(i32::from(got.code()));
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
                    std::process::exit(130);
                }
                let _ = tx.send(Some(Signal::Interrupt));
            }
        });
        Ok(Self(rx))
    }

    /// A stop that never comes (for tests and the commands that ignore it).
    pub fn never() -> Self {
        // With its sender gone, `stopped` waits forever.
        Self(watch::channel(None).1)
    }

    /// The signal received, if any.
    pub fn signal(&self) -> Option<Signal> {
        *self.0.borrow()
    }

    /// Waits for a signal.
    pub async fn stopped(&self) -> Signal {
        let mut rx = self.0.clone();
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
