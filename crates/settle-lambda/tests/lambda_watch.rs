//! End to end through a real Lambda Runtime API: `cargo lambda watch` runs
//! the worker binary, `cargo lambda invoke` sends it
//! `infra/events/worker-sqs.json`, and the worker talks to the AWS emulator
//! (moto_server) through the AWS backend. Needs the emulator's environment
//! (`eval "$(infra/emulator.sh up)"`, which `make test` does) and
//! cargo-lambda (`make venv`); without them it fails and says so.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test.

mod common;

use common::*;
use settle_aws::provision::{create_stack, Stack};
use settle_core::message::{decode_results, WorkBody};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PANIC: &str = "7b2c1d3e-4f50-4a61-8b72-9c83d4e5f603";
/// The first invoke compiles the worker if the test build did not already.
const READY_WITHIN: Duration = Duration::from_secs(600);

fn require_emulator() {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    assert!(
        set("AWS_ENDPOINT_URL"),
        "AWS_ENDPOINT_URL is not set: this test runs the worker Lambda against the local AWS \
         emulator. Start it with `eval \"$(infra/emulator.sh up)\"` (or run `make test`, which does)"
    );
}

fn cargo_lambda() -> PathBuf {
    let venv = repo_root().join(".venv/bin/cargo-lambda");
    assert!(
        venv.exists(),
        "{} not found: this test runs `cargo lambda watch`; install it with `make venv`",
        venv.display()
    );
    venv
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Stops `cargo lambda watch` and the function processes it started.
struct Watch(Child);

impl Drop for Watch {
    fn drop(&mut self) {
        // The watch runs in its own process group: end the whole group.
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_fixture_through_cargo_lambda_watch() {
    require_emulator();
    let cargo_lambda = cargo_lambda();

    // Fresh queues and tables for this test alone.
    let sdk = settle_aws::sdk_config().await;
    let prefix = format!("lw{}-", std::process::id());
    let cfg = create_stack(&sdk, &Stack::default_stack().unwrap(), &prefix, None)
        .await
        .unwrap();
    let aws = settle_aws::connect_with(&sdk, &cfg).await.unwrap();

    let port = free_port().to_string();
    let bin_dir = cargo_lambda.parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log =
        std::fs::File::create(std::env::temp_dir().join(format!("{prefix}watch.log"))).unwrap();
    let watch = {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(&cargo_lambda);
        // cargo sets CARGO_MANIFEST_DIR, CARGO_PKG_* etc. for this test; the
        // watch's own `cargo run` would inherit them, and ring's build script
        // reruns when CARGO_MANIFEST_DIR changes, rebuilding the whole AWS
        // SDK (minutes). Hand it a plain cargo environment.
        for (k, _) in std::env::vars() {
            if k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR" {
                cmd.env_remove(k);
            }
        }
        cmd.args(["lambda", "watch", "--ignore-changes", "--quiet"])
            .args(["--invoke-address", "127.0.0.1", "--invoke-port", &port])
            .args(["--package", "settle-lambda"])
            .envs(cfg.to_env())
            .env("PATH", &path)
            .env("RUST_LOG", "info")
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start cargo lambda watch")
    };
    let _watch = Watch(watch);

    let invoke = |data: &[&str]| {
        Command::new(&cargo_lambda)
            .args(["lambda", "invoke", "worker", "--output-format", "json"])
            .args(["--invoke-address", "127.0.0.1", "--invoke-port", &port])
            .args(data)
            .current_dir(repo_root())
            .output()
            .unwrap()
    };
    // Warm up with an empty batch: the first invoke starts (and may first
    // compile) the worker, and its deadline is counted from the invoke, so
    // the fixture must not be the request that waits for the compiler.
    let started = Instant::now();
    loop {
        let out = invoke(&["--data-ascii", r#"{"Records": []}"#]);
        if out.status.success() {
            let empty: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(empty, serde_json::json!({"batchItemFailures": []}));
            break;
        }
        assert!(
            started.elapsed() < READY_WITHIN,
            "cargo lambda invoke kept failing for {READY_WITHIN:?}: {}\n(watch log: {})",
            String::from_utf8_lossy(&out.stderr),
            std::env::temp_dir()
                .join(format!("{prefix}watch.log"))
                .display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let data = repo_root().join("infra/events/worker-sqs.json");
    let out = invoke(&["--data-file", data.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "cargo lambda invoke --data-file {}: {}",
        data.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let response = String::from_utf8(out.stdout).unwrap();

    let json: serde_json::Value = serde_json::from_str(response.trim())
        .unwrap_or_else(|e| panic!("worker response is not JSON ({e}): {response}"));
    assert_eq!(
        json,
        serde_json::json!({"batchItemFailures": [{"itemIdentifier": PANIC}]}),
        "only the panicked item comes back for retry"
    );

    // What the worker sent through the emulator's SQS: a result per
    // processed item, and two dead letters (the permanent failure's copy,
    // the undecodable body).
    let mut items: Vec<String> = drain(aws.results())
        .await
        .iter()
        .flat_map(|d| decode_results(&d.body).unwrap())
        .map(|r| {
            assert_eq!(r.run.as_str(), FIXTURE_RUN);
            r.item.to_string()
        })
        .collect();
    items.sort();
    assert_eq!(items, ["sub-000001", "sub-000002", "sub-000003"]);
    let dead = drain(aws.dlq()).await;
    assert_eq!(dead.len(), 2);
    assert_eq!(
        dead.iter()
            .filter(|d| WorkBody::decode(&d.body).is_ok_and(|b| b.dead.is_some()))
            .count(),
        1
    );
}
