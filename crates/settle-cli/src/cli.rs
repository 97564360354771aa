//! The command line, as clap sees it.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// The worker's cap on a retry's delay: a first delay beyond it would not
/// be honoured.
const MAX_RETRY_DELAY_MS: u64 = settle_core::work::MAX_RETRY_DELAY.as_millis() as u64;

#[derive(Debug, Parser)]
#[command(
    name = "settle",
    version,
    about = "Fan out a batch of items, settle each on its own, tally exactly."
)]
pub struct Cli {
    /// Where runs live: the embedded database file, or an AWS stack named by
    /// the SETTLE_* variables (see `infra/emulator.sh up` and the stack's Outputs).
    #[arg(long, global = true, env = "SETTLE_BACKEND", value_enum, default_value_t = BackendKind::Embedded)]
    pub backend: BackendKind,
    /// Who processes the work: this process (local), or the deployed Lambda
    /// functions, which the CLI then follows. Default: local on the embedded
    /// backend, deployed on AWS.
    #[arg(long, global = true, env = "SETTLE_WORKERS", value_enum)]
    pub workers: Option<Workers>,
    /// With --backend aws: write the AWS calls made, per operation, and the
    /// DynamoDB capacity consumed to this JSON file when the command ends
    /// (for cost figures; see scripts/cost.py).
    #[arg(long, global = true, value_name = "FILE")]
    pub report_calls: Option<PathBuf>,
    /// The embedded database file.
    #[arg(long, global = true, env = "SETTLE_DB", default_value = settle_embedded::DEFAULT_PATH)]
    pub db: PathBuf,
    /// More logging on stderr (-v: per item, -vv: debug). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load items, dispatch them as a new run, and process until every item settles.
    Run(RunArgs),
    /// Load items as pending, for a later `dispatch`.
    Load {
        /// JSONL file, one {"id": "...", "payload": ...} per line ("-" for stdin).
        #[arg(long)]
        items: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Claim all pending items into a new run and enqueue them, without processing.
    Dispatch {
        #[command(flatten)]
        run: RunSettings,
        /// The processor `resume` will use (recorded with the run).
        #[command(flatten)]
        processor: ProcessorArgs,
        #[arg(long)]
        json: bool,
    },
    /// Continue a run (dispatch and processing) until it settles, e.g. after a crash.
    Resume {
        /// The run; the latest if omitted.
        run_id: Option<String>,
        #[command(flatten)]
        process: ProcessArgs,
        #[arg(long)]
        json: bool,
    },
    /// A run's tally and status.
    Status {
        /// The run; the latest if omitted.
        run_id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The failed items of a run, with their attempts and last error.
    Failures {
        run_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Move a run's dead-lettered items back to the work queue and process them until they settle.
    Redrive {
        run_id: String,
        /// Only this item (repeatable); all of the run's failed items if omitted.
        #[arg(long = "item", value_name = "ID")]
        items: Vec<String>,
        /// Say what would be redriven; move nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        process: ProcessArgs,
        #[arg(long)]
        json: bool,
    },
    /// One item's history in a run, attempt by attempt.
    Show {
        run_id: String,
        item_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Every item's outcome as JSON lines, in the input's order: its output,
    /// or its error.
    Results {
        run_id: String,
        /// Only the items that ended so.
        #[arg(long, value_enum)]
        status: Option<ResultStatus>,
        /// Write to FILE rather than stdout.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// What the processor wrote while working on one item, attempt by attempt.
    Logs {
        run_id: String,
        item_id: String,
        /// Only this attempt.
        #[arg(long)]
        attempt: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Runs one item of a run through a processor here and now, and prints
    /// its output and log; changes nothing in the run. With processor
    /// flags, that processor (a fixed version, say); else the run's own.
    Replay {
        run_id: String,
        item_id: String,
        #[command(flatten)]
        processor: ProcessorArgs,
        /// Seconds the attempt may take.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=43200))]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Recent runs, newest first.
    Runs {
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// The operator's dashboard: runs, failures by reason, items, retries,
    /// served over HTTP (docs/ui.md).
    Ui(UiArgs),
    /// Write a JSONL file of scripted demo or benchmark items to stdout.
    Generate {
        #[arg(long)]
        count: u64,
        #[arg(long, value_enum, default_value_t = Mix::Demo)]
        mix: Mix,
        /// Seed for the mix; the same seed writes the same file.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

impl Command {
    /// Whether the command was given `--json`: then even its error is one
    /// JSON object on stdout.
    pub fn json(&self) -> bool {
        match self {
            Command::Run(args) => args.json,
            Command::Load { json, .. }
            | Command::Dispatch { json, .. }
            | Command::Resume { json, .. }
            | Command::Status { json, .. }
            | Command::Failures { json, .. }
            | Command::Redrive { json, .. }
            | Command::Show { json, .. }
            | Command::Logs { json, .. }
            | Command::Replay { json, .. }
            | Command::Runs { json, .. } => *json,
            Command::Generate { .. } | Command::Results { .. } | Command::Ui(_) => false,
        }
    }

    /// Whether the command only reads: it leaves nothing in the database's
    /// WAL to checkpoint on exit (see `Deployment::close`).
    pub fn read_only(&self) -> bool {
        matches!(
            self,
            Command::Status { .. }
                | Command::Failures { .. }
                | Command::Show { .. }
                | Command::Logs { .. }
                | Command::Replay { .. }
                | Command::Results { .. }
                | Command::Runs { .. }
                | Command::Redrive { dry_run: true, .. }
        )
    }

    /// Whether the command may create the embedded database. Those that
    /// look at runs, or continue one, have nothing to do without one, and
    /// run in the wrong directory they must not leave an empty database
    /// behind. Those that create it remove it again when they fail with
    /// nothing in it (`fresh::Fresh`).
    pub fn creates_database(&self) -> bool {
        matches!(
            self,
            Command::Run(_) | Command::Load { .. } | Command::Dispatch { .. }
        )
    }
}

/// `settle ui`'s flags.
#[derive(Debug, Args)]
pub struct UiArgs {
    /// The address to serve on: IP:PORT, or HOST:PORT with a name
    /// (localhost:8080). Anything but loopback addresses needs --token.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: crate::ui::Listen,
    /// A secret every request must carry: `Authorization: Bearer TOKEN`, or
    /// the cookie that opening any page with `?token=TOKEN` sets. Prefer
    /// SETTLE_UI_TOKEN: a command line is visible to every user in `ps`.
    #[arg(long, env = "SETTLE_UI_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Another Host header value to accept (a name the server is reached
    /// by, as `name` or `name:port`; repeatable). The listen address and
    /// localhost, 127.0.0.1 and [::1] with its port are always accepted.
    #[arg(long = "allow-host", value_name = "HOST")]
    pub allow_hosts: Vec<String>,
    /// Show runs and items only: no retry buttons, and every action is
    /// refused (403).
    #[arg(long)]
    pub read_only: bool,
    /// How the items a retry moves are processed here (embedded backend,
    /// or --workers local).
    #[command(flatten)]
    pub process: ProcessArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ResultStatus {
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// One SQLite file on this machine.
    Embedded,
    /// SQS and DynamoDB (AWS_ENDPOINT_URL points at an emulator).
    Aws,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workers {
    /// The local runner in this process plays the event source mapping.
    Local,
    /// The deployed worker and reducer functions process; the CLI follows.
    Deployed,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Mix {
    /// A realistic mix: mostly ok, some retried, some declined, a few panics and slow items.
    Demo,
    /// 10% permanent failures, the rest ok.
    Bench,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// JSONL file, one {"id": "...", "payload": ...} per line ("-" for stdin).
    #[arg(long)]
    pub items: PathBuf,
    #[command(flatten)]
    pub run: RunSettings,
    #[command(flatten)]
    pub process: ProcessArgs,
    #[arg(long)]
    pub json: bool,
}

/// Settings fixed when a run is created.
#[derive(Debug, Args)]
pub struct RunSettings {
    /// Receives of an item's message before its failure is terminal and it is dead-lettered.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_receives: u32,
    /// The run ends `partial` rather than `failed` while failures stay at or under this percentage.
    #[arg(long, default_value_t = 100.0, value_parser = percent)]
    pub tolerated_failure_percent: f64,
    /// The most calls per second the run makes, shared by all its workers:
    /// `200/s`, `90/min` or a number per second. The run slows down below
    /// it by itself when its calls are throttled (docs/flow-control.md).
    #[arg(long, value_name = "N/s", value_parser = rate)]
    pub rate: Option<f64>,
    /// A JSON pointer into each item's payload (e.g. /customer): each key
    /// gets its own flow control, and a busy key never holds the others back.
    #[arg(long, value_name = "/POINTER", value_parser = pointer)]
    pub key: Option<String>,
    /// Items of one key in flight at once at most (with --key).
    #[arg(long, requires = "key", value_parser = clap::value_parser!(u32).range(1..=100000))]
    pub key_concurrency: Option<u32>,
    /// The most calls per second for each key (with --key): as --rate.
    #[arg(long, value_name = "N/s", requires = "key", value_parser = rate)]
    pub key_rate: Option<f64>,
    /// How long a run throttled with no call answered waits before it stops,
    /// its items left pending for `settle resume` (e.g. 30m, 2h).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = wait)]
    pub max_throttle_wait: std::time::Duration,
}

/// A rate: `N/s`, `N/min`, `N/h` or `N` per second, above 0.
fn rate(s: &str) -> Result<f64, String> {
    let (n, per) = match s.split_once('/') {
        Some((n, unit)) => {
            let per = match unit.trim() {
                "s" | "sec" | "second" => 1.0,
                "m" | "min" | "minute" => 60.0,
                "h" | "hour" => 3600.0,
                other => return Err(format!("unknown unit {other:?}: want N/s, N/min or N/h")),
            };
            (n, per)
        }
        None => (s, 1.0),
    };
    match n.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v / per),
        _ => Err(format!(
            "want a number above 0 before the unit, as in 200/s; got {n:?}"
        )),
    }
}

/// A JSON pointer (RFC 6901): empty or starting with `/`.
fn pointer(s: &str) -> Result<String, String> {
    if s.starts_with('/') {
        Ok(s.to_owned())
    } else {
        Err("want a JSON pointer starting with /, as in /customer".into())
    }
}

fn wait(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("want a duration such as 30m or 2h: {e}"))
}

/// How the local runner processes.
#[derive(Debug, Args, Clone)]
pub struct ProcessArgs {
    #[command(flatten)]
    pub processor: ProcessorArgs,
    /// Items the processor works on at once. Default: 4 per core for
    /// --exec (a process each; most per-item commands wait on the network),
    /// 64 requests for --http, and 640 for the scripted processor.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=40960))]
    pub concurrency: Option<u64>,
    /// Messages per worker batch.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10))]
    pub batch_size: u64,
    /// Seconds a received message stays hidden. An item's attempt times out
    /// (and is retried) after half of it: the other half is for the rest of
    /// its batch, its result and its delete.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=43200))]
    pub visibility_timeout: u64,
    /// Delay before the first retry of a retryable failure, in ms. It
    /// doubles per receive, up to the worker's cap of 60 s (so at most 60000).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(0..=MAX_RETRY_DELAY_MS))]
    pub retry_delay_ms: u64,
}

/// Which processor does the work; the run records it, so that `resume`
/// and `redrive` use it again without these flags.
#[derive(Debug, Args, Clone, Default)]
pub struct ProcessorArgs {
    /// A processor by name: `scripted`, the built-in one that follows each
    /// item's payload.script (for tests and benchmarks), or the Rust
    /// processor this binary was built with (the default when it has one).
    #[arg(long, env = "SETTLE_PROCESSOR", value_name = "NAME", conflicts_with_all = ["exec", "http"])]
    pub processor: Option<String>,
    /// Run CMD (with `sh -c`) for each item: the item as JSON on stdin, its
    /// output on stdout, its log on stderr; exit 0 succeeds, 65 fails for
    /// good, anything else is retried. See docs/processors.md.
    #[arg(long, value_name = "CMD", conflicts_with = "http")]
    pub exec: Option<String>,
    /// How --exec runs CMD: a process per item, or long-lived processes
    /// answering one JSON line per item (docs/protocol-jsonl.md).
    #[arg(long, value_enum, requires = "exec")]
    pub protocol: Option<Protocol>,
    /// Exit codes of --exec that fail an item for good, comma-separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',', requires = "exec")]
    pub permanent_exit_codes: Option<Vec<i32>>,
    /// POST each item to URL: 2xx succeeds; 429 and 503 are throttled (the
    /// run slows down; no attempt used); 408, 425 and other 5xx are retried
    /// (after Retry-After); any other status fails for good.
    #[arg(long, value_name = "URL")]
    pub http: Option<String>,
    /// A header for --http, as 'Name: value' (repeatable; values are never shown).
    #[arg(long = "http-header", value_name = "HEADER", requires = "http")]
    pub http_headers: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// One process per attempt (the default).
    PerItem,
    /// Long-lived processes, one JSON line in and one out per item.
    Jsonl,
}

fn percent(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0 and 100"))
    }
}
