//! Helpers for the end-to-end tests: each test gets its own temp dir and
//! database, and runs the real `settle` binary.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code, clippy::unwrap_used)]

use serde_json::{json, Value};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Fast processing flags for every command that processes.
pub const FAST: [&str; 4] = ["--retry-delay-ms", "20", "--visibility-timeout", "5"];

/// The keys of a run's JSON (run, status, resume, dispatch).
pub const RUN_KEYS: [&str; 10] = [
    "failed",
    "pending",
    "redrive",
    "redriving",
    "run_id",
    "status",
    "succeeded",
    "throttled",
    "total",
    "waiting",
];

/// The keys `redrive` adds to a run's JSON (it also sets `redrive`).
pub const REDRIVE_KEYS: [&str; 3] = ["complete", "not_moved", "redriven"];

/// No single command of these tests may take longer than this.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// What one command did.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub args: Vec<String>,
}

impl Out {
    /// Asserts the exit code, with the whole output on failure.
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            code,
            "`settle {}` exited {} (expected {code})\nstdout:\n{}\nstderr:\n{}",
            self.args.join(" "),
            self.code,
            self.stdout,
            self.stderr
        );
        self
    }

    /// The last line of stdout, parsed as one JSON object.
    pub fn json(&self) -> Value {
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_else(|| {
                panic!(
                    "`settle {}` printed nothing on stdout\nstderr:\n{}",
                    self.args.join(" "),
                    self.stderr
                )
            });
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
            panic!(
                "`settle {}`: last stdout line is not JSON ({e}): {line:?}",
                self.args.join(" ")
            )
        });
        assert!(v.is_object(), "not a JSON object: {v}");
        v
    }

    /// Asserts that stdout is exactly the JSON error object of a failed
    /// `--json` command, of this kind ("input" or "operational"), and
    /// returns its message.
    pub fn json_error(&self, kind: &str) -> String {
        assert_eq!(
            self.stdout.lines().count(),
            1,
            "`settle {}`: one line on stdout: {:?}",
            self.args.join(" "),
            self.stdout
        );
        let v = self.json();
        assert_eq!(keys(&v), ["error", "kind"], "{v}");
        assert_eq!(v["kind"], kind, "{v}");
        let error = v["error"].as_str().unwrap().to_owned();
        assert!(
            self.stderr.contains(&format!("error: {error}")),
            "the same message on stderr: {error:?}\nstderr:\n{}",
            self.stderr
        );
        error
    }

    /// Asserts that stderr contains `needle`.
    pub fn stderr_has(&self, needle: &str) -> &Self {
        assert!(
            self.stderr.contains(needle),
            "`settle {}`: stderr does not contain {needle:?}\nstderr:\n{}",
            self.args.join(" "),
            self.stderr
        );
        self
    }
}

/// A fresh temp dir with its own database, or (see [`Env::aws`]) its own
/// stack on the AWS emulator.
#[derive(Debug)]
pub struct Env {
    pub dir: tempfile::TempDir,
    /// Variables set for every command (the AWS stack's names).
    pub vars: Vec<(String, String)>,
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

impl Env {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            vars: Vec::new(),
        }
    }

    /// A fresh stack of queues and tables on the emulator at
    /// `AWS_ENDPOINT_URL`, with the work queue dead-lettering after
    /// `max_receive_count`; commands run with `--backend aws` and local workers.
    pub fn aws(max_receive_count: u32) -> Self {
        if std::env::var("AWS_ENDPOINT_URL").map_or(true, |v| v.trim().is_empty()) {
            panic!(
                "AWS_ENDPOINT_URL is not set: this test runs against the local emulator. \
                 Start it with eval \"$(infra/emulator.sh up)\", or run make test"
            );
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let cfg = rt.block_on(async {
            let sdk = settle_aws::sdk_config().await;
            let stack = settle_aws::provision::Stack::default_stack().unwrap();
            let prefix = format!("cli{:08x}-", fastrand::u32(..));
            settle_aws::provision::create_stack(&sdk, &stack, &prefix, Some(max_receive_count))
                .await
                .unwrap()
        });
        let mut env = Self::new();
        env.vars = cfg
            .to_env()
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        env.vars.push(("SETTLE_BACKEND".into(), "aws".into()));
        env.vars.push(("SETTLE_WORKERS".into(), "local".into()));
        env
    }

    pub fn db(&self) -> PathBuf {
        self.dir.path().join("settle.db")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a file into the temp dir and returns its path as a string.
    pub fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> String {
        let p = self.path(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_owned()
    }

    /// Writes a JSONL file of `{"id": id, "payload": {"script": script}}` lines.
    pub fn scripts(&self, name: &str, items: &[(&str, &str)]) -> String {
        let text: String = items
            .iter()
            .map(|(id, script)| format!("{}\n", json!({"id": id, "payload": {"script": script}})))
            .collect();
        self.write(name, text)
    }

    /// A `settle` command with `--db` set, not yet started.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_settle"));
        c.arg("--db")
            .arg(self.db())
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("RUST_LOG")
            .env_remove("SETTLE_DB")
            .env_remove("SETTLE_BACKEND")
            .env_remove("SETTLE_WORKERS")
            .env_remove("SETTLE_PROCESSOR")
            .envs(self.vars.iter().map(|(k, v)| (k, v)))
            // Runs start with the scripted processor unless the command
            // names one; `resume` and `redrive` then use the run's own.
            .envs(
                (args
                    .iter()
                    .find(|a| !a.starts_with('-'))
                    .is_some_and(|a| matches!(*a, "run" | "dispatch"))
                    && !args
                        .iter()
                        .any(|a| matches!(*a, "--exec" | "--http" | "--processor")))
                .then_some(("SETTLE_PROCESSOR", "scripted")),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Starts `settle` in the background.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args).spawn().unwrap()
    }

    /// Runs `settle` (with `--db`) to completion.
    pub fn settle(&self, args: &[&str]) -> Out {
        let child = self.spawn(args);
        wait(child, args)
    }

    /// Runs `settle`, asserts exit 0, and returns the JSON last line.
    pub fn ok_json(&self, args: &[&str]) -> Value {
        let out = self.settle(args);
        out.expect_code(0);
        out.json()
    }

    /// `settle run --items FILE --json` with the fast flags and `extra`.
    pub fn run(&self, items: &str, extra: &[&str]) -> Value {
        let mut args = vec!["run", "--items", items, "--json"];
        args.extend(FAST);
        args.extend(extra);
        self.ok_json(&args)
    }

    pub fn status(&self, run: &str) -> Value {
        self.ok_json(&["status", run, "--json"])
    }

    pub fn failures(&self, run: &str) -> Value {
        self.ok_json(&["failures", run, "--json"])
    }

    pub fn show(&self, run: &str, item: &str) -> Value {
        self.ok_json(&["show", run, item, "--json"])
    }

    /// The runs, `{"runs": []}` while there is no database at all (which
    /// `runs` does not create).
    pub fn runs(&self) -> Value {
        if !self.vars.is_empty() || self.db().exists() {
            return self.ok_json(&["runs", "--json"]);
        }
        self.settle(&["runs", "--json"])
            .expect_code(2)
            .stderr_has("no database at");
        assert!(!self.db().exists(), "`runs` created the database");
        json!({ "runs": [] })
    }

    /// Asserts the database holds no run at all.
    pub fn assert_no_runs(&self) {
        assert_eq!(self.runs(), json!({ "runs": [] }));
    }
}

/// Waits for `child` (killing it after [`COMMAND_TIMEOUT`]) and collects its output.
pub fn wait(child: Child, args: &[&str]) -> Out {
    wait_within(child, args, COMMAND_TIMEOUT)
}

/// [`wait`], killing the child after `limit`.
pub fn wait_within(mut child: Child, args: &[&str], limit: Duration) -> Out {
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        so.read_to_end(&mut s).unwrap();
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        se.read_to_end(&mut s).unwrap();
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`settle {}` did not finish in {limit:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap()).into_owned();
    Out {
        // A signal death has no code; report it as 128 + signal like a shell.
        code: status.code().unwrap_or_else(|| 128 + signal_of(&status)),
        stdout,
        stderr,
        args: args.iter().map(|s| (*s).to_owned()).collect(),
    }
}

#[cfg(unix)]
fn signal_of(status: &std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.signal().unwrap_or(0)
}

#[cfg(not(unix))]
fn signal_of(_: &std::process::ExitStatus) -> i32 {
    0
}

/// The sorted keys of a JSON object.
pub fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}

pub fn run_id(v: &Value) -> String {
    v["run_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no run_id in {v}"))
        .to_owned()
}

/// Asserts a run's JSON has exactly the run keys (plus `extra`) and this tally.
pub fn assert_run_extra(
    v: &Value,
    extra: &[&str],
    status: &str,
    total: u64,
    succeeded: u64,
    failed: u64,
    pending: u64,
) {
    let mut want: Vec<String> = RUN_KEYS
        .iter()
        .chain(extra)
        .map(|s| (*s).to_owned())
        .collect();
    want.sort();
    assert_eq!(keys(v), want, "keys of {v}");
    let id = run_id(v);
    assert!(
        id.len() == 24 && id.starts_with('r') && id.as_bytes()[17] == b'-',
        "run id {id:?}"
    );
    let got = (
        v["status"].as_str().unwrap_or("?"),
        v["total"].as_u64(),
        v["succeeded"].as_u64(),
        v["failed"].as_u64(),
        v["pending"].as_u64(),
    );
    assert_eq!(
        got,
        (
            status,
            Some(total),
            Some(succeeded),
            Some(failed),
            Some(pending)
        ),
        "(status, total, succeeded, failed, pending) of {v}"
    );
}

/// Asserts a run's JSON has exactly the run keys and this tally.
pub fn assert_run(v: &Value, status: &str, total: u64, succeeded: u64, failed: u64, pending: u64) {
    assert_run_extra(v, &[], status, total, succeeded, failed, pending);
}

/// One history entry's `(attempt, outcome, kind, terminal)`.
pub fn history(item: &Value) -> Vec<(u64, String, Option<String>, bool)> {
    item["history"]
        .as_array()
        .unwrap_or_else(|| panic!("no history in {item}"))
        .iter()
        .map(|h| {
            (
                h["attempt"].as_u64().unwrap(),
                h["outcome"].as_str().unwrap().to_owned(),
                h["kind"].as_str().map(str::to_owned),
                h["terminal"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// A `(attempt, outcome, kind, terminal)` entry, for comparing with [`history`].
pub fn h(
    attempt: u64,
    outcome: &str,
    kind: Option<&str>,
    terminal: bool,
) -> (u64, String, Option<String>, bool) {
    (
        attempt,
        outcome.to_owned(),
        kind.map(str::to_owned),
        terminal,
    )
}

/// A failures entry as `settle failures --json` prints it.
pub fn failure(item: &str, attempts: u64, error: &str) -> Value {
    json!({ "item_id": item, "attempts": attempts, "error": error })
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}
