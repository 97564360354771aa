//! The `settle` CLI, as a library: the stock binary is this with no
//! processor of its own, and a user's crate gets the whole CLI with its
//! own Rust processor in a few lines:
//!
//! ```no_run
//! # use settle_core::{AttemptContext, Processor, domain::{Item, Output, ProcessError}};
//! # #[derive(Debug)] struct Renewals;
//! # #[async_trait::async_trait]
//! # impl Processor for Renewals {
//! #     async fn process(&self, _: &Item, _: &AttemptContext) -> Result<Option<Output>, ProcessError> { Ok(None) }
//! # }
//! fn main() -> std::process::ExitCode {
//!     settle_cli::Settle::new().processor("renewals", Renewals).main()
//! }
//! ```
//!
//! `renewals run --items FILE` then processes with `Renewals` (and records
//! it with the run as `--processor renewals`); every other processor flag
//! still works.

mod cli;
mod commands;
mod deployment;
mod fresh;
mod generate;
mod process;
mod processors;
mod replay;
mod report;
mod results;
mod signals;
mod ui;

use clap::Parser;
use settle_core::Processor;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

/// The processor a binary was built with, named for `--processor NAME`.
pub(crate) struct Library {
    pub name: String,
    pub processor: Arc<dyn Processor>,
    /// Items at once when `--concurrency` is not given.
    pub concurrency: usize,
}

/// Set once, by [`Settle::main`].
pub(crate) static LIBRARY: OnceLock<Library> = OnceLock::new();

/// The `settle` CLI, optionally with a processor of the binary's own.
#[derive(Default)]
pub struct Settle {
    library: Option<Library>,
}

impl std::fmt::Debug for Settle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settle")
            .field("processor", &self.library.as_ref().map(|l| &l.name))
            .finish()
    }
}

impl Settle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `processor` this binary's own, under `name`: the default of
    /// `run` (no flag needed), recorded with its runs, and chosen again by
    /// `--processor NAME`. A name must not be `scripted`.
    pub fn processor(mut self, name: &str, processor: impl Processor) -> Self {
        assert_ne!(
            name, "scripted",
            "`scripted` is the built-in processor's name"
        );
        self.library = Some(Library {
            name: name.to_owned(),
            processor: Arc::new(processor),
            concurrency: 64,
        });
        self
    }

    /// Items the binary's own processor works on at once by default (64).
    pub fn concurrency(mut self, items: usize) -> Self {
        if let Some(l) = &mut self.library {
            l.concurrency = items.max(1);
        }
        self
    }

    /// Parses the command line, runs the command, and returns its exit code.
    pub fn main(self) -> ExitCode {
        if let Some(library) = self.library {
            if LIBRARY.set(library).is_err() {
                eprintln!("error: Settle::main ran twice in one process");
                return ExitCode::FAILURE;
            }
        }
        main()
    }
}

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_tracing(cli.verbose);
    quiet_contained_panics();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    // tokio's own variable wins when set; otherwise leave a core to the
    // embedded database's writer thread (see `runtime_threads`).
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        rt.worker_threads(runtime_threads());
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = cli.command.json();
    // Dropped before the runtime (declared after it), whose threads reap
    // the processes as they end; on every way out of here, panics included.
    let _attempts = EndAttempts;
    match rt.block_on(commands::execute(cli)) {
        Ok(code) => code,
        Err(e) => {
            // Escaped for the terminal (an id or a processor's error may
            // be in it); the JSON line below keeps it exact.
            eprintln!("error: {}", report::clean(&chain(&e)));
            if json {
                // A script reading stdout learns of the failure there too.
                signals::report(|| println!("{}", json_error(&e)));
            }
            // Bad input (a file, a flag, an unknown id) exits 2; anything else 1.
            if is_input(&e) {
                ExitCode::from(2)
            } else if let Some(i) = e.downcast_ref::<commands::Interrupted>() {
                i.signal.exit_code()
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Ends the process groups of the `--exec` attempts still running (SIGTERM,
/// then SIGKILL after the grace) when dropped: no attempt's process outlives
/// Settle (invariant 10).
struct EndAttempts;

impl Drop for EndAttempts {
    fn drop(&mut self) {
        let groups = &settle_processors::groups::GROUPS;
        if !groups.is_empty() {
            eprintln!(
                "ending the processes of the attempts still running (at most {} s)",
                settle_processors::groups::KILL_GRACE.as_secs()
            );
        }
        groups.end_all();
    }
}

fn is_input(e: &anyhow::Error) -> bool {
    e.downcast_ref::<commands::InputError>().is_some()
}

/// A failed command's error as `--json` prints it: the message with its
/// causes, and whether it was bad input (exit 2) or an operational failure.
fn json_error(e: &anyhow::Error) -> serde_json::Value {
    let kind = if is_input(e) { "input" } else { "operational" };
    serde_json::json!({ "error": chain(e), "kind": kind })
}

/// The error and its causes, `: `-joined, each cause said once: an error
/// whose message already quotes its source (as a port error quotes the AWS
/// call's) does not repeat it.
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// The runtime's worker threads: one fewer than the cores, at least one.
/// A local run's throughput is the embedded database's single writer
/// thread, busy most of the run; with a worker per core beside it, on two
/// cores three threads contend and the writer waits, runnable, for a core
/// about twice as long as with one worker (docs/performance.md has the
/// figures, from /proc's schedstat).
fn runtime_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .saturating_sub(1)
        .max(1)
}

fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "warn,settle_core=info,settle_embedded=info,settle=info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| Unhidden(std::io::stderr()))
        // Colour codes only for a terminal: in a log file or a pipe they
        // are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Log lines on their way to stderr, with the characters of
/// [`report::hidden`] escaped: `-v` logs carry ids and processors' errors,
/// whose newlines would forge log lines. Two pass: the newline that ends
/// the line, and ESC, which starts the colours (tracing-subscriber escapes
/// an ESC in a value itself, so any left is its own).
struct Unhidden<W>(W);

impl<W: std::io::Write> std::io::Write for Unhidden<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A line comes whole; bytes that are not UTF-8 pass as they are.
        let Ok(text) = std::str::from_utf8(buf) else {
            return self.0.write(buf);
        };
        let (line, end) = match text.strip_suffix('\n') {
            Some(line) => (line, "\n"),
            None => (text, ""),
        };
        match report::escape(line, |c| report::hidden(c) && c != '\u{1b}') {
            std::borrow::Cow::Borrowed(_) => self.0.write(buf),
            std::borrow::Cow::Owned(escaped) => {
                self.0.write_all(escaped.as_bytes())?;
                self.0.write_all(end.as_bytes())?;
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// A panic inside a processor is caught and recorded as that item's error;
/// printing it too would bury the progress bar. Other panics print as usual.
fn quiet_contained_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if settle_core::work::in_processor() {
            tracing::debug!(%info, "processor panicked; contained to its item");
        } else {
            default(info);
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_escape_hidden_characters_and_keep_their_end_and_colours() {
        use std::io::Write;
        let mut w = Unhidden(Vec::new());
        let line = "\u{1b}[2mINFO\u{1b}[0m item=\u{202e}gnp.exe error=a\u{2028}b\nc\n";
        assert_eq!(w.write(line.as_bytes()).unwrap(), line.len());
        assert_eq!(
            String::from_utf8(w.0).unwrap(),
            "\u{1b}[2mINFO\u{1b}[0m item=\\u{202e}gnp.exe error=a\\u{2028}b\\nc\n"
        );
    }

    #[test]
    fn a_cause_already_quoted_is_said_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("queue q: timed out")]
        struct Inner;
        #[derive(Debug, thiserror::Error)]
        #[error("SQS.SendMessageBatch failed: {0}")]
        struct Outer(#[source] Inner);
        let e = anyhow::Error::new(Outer(Inner)).context("dispatch failed");
        assert_eq!(
            chain(&e),
            "dispatch failed: SQS.SendMessageBatch failed: queue q: timed out"
        );
    }

    #[test]
    fn json_errors_name_their_kind_and_keep_their_causes() {
        let input = commands::input("run r1 not found");
        assert_eq!(
            json_error(&input),
            serde_json::json!({"error": "run r1 not found", "kind": "input"})
        );
        let io = std::io::Error::other("disk full");
        let operational = anyhow::Error::new(io).context("loading failed");
        assert_eq!(
            json_error(&operational),
            serde_json::json!({"error": "loading failed: disk full", "kind": "operational"})
        );
    }
}
