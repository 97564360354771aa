//! End to end through a real Lambda Runtime API: `cargo lambda watch
//! --only-lambda-apis` serves it to this build's worker binary,
//! `cargo lambda invoke` sends it `infra/events/worker-sqs.json`, and the
//! worker talks to the AWS emulator
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

/// The worker's cold start, on a loaded machine.
const READY_WITHIN: Duration = Duration::from_secs(60);

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

/// Stops `cargo lambda watch`, or the worker, when the test ends.
struct Watch(Child);

impl Drop for Watch {
    fn drop(&mut self) {
        // Each runs in its own process group: end the whole group.
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
    let log_path = std::env::temp_dir().join(format!("{prefix}watch.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    // The watch serves only the Lambda APIs; the worker is this test
    // build's own binary. Letting the watch `cargo run` it would build it
    // with other features than `cargo test --workspace` unifies, and so
    // compile the AWS SDK a second time.
    let spawn = |cmd: &mut Command| {
        use std::os::unix::process::CommandExt;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log.try_clone().unwrap())
            .process_group(0)
            .spawn()
            .expect("start a process of the watch")
    };
    let _watch = Watch(spawn(
        Command::new(&cargo_lambda)
            .args(["lambda", "watch", "--only-lambda-apis"])
            .args(["--invoke-address", "127.0.0.1", "--invoke-port", &port])
            .env("PATH", &path)
            .current_dir(repo_root()),
    ));
    // A worker started before the Runtime API listens exits at once, and
    // the invokes would then wait for it forever.
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).is_err() {
        assert!(
            started.elapsed() < READY_WITHIN,
            "cargo lambda watch did not listen within {READY_WITHIN:?} (log: {})",
            log_path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _worker = Watch(spawn(
        Command::new(env!("CARGO_BIN_EXE_worker"))
            .envs(cfg.to_env())
            .env(
                "AWS_LAMBDA_RUNTIME_API",
                format!("http://127.0.0.1:{port}/.rt/worker"),
            )
            .env("AWS_LAMBDA_FUNCTION_NAME", "worker")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
            .env("RUST_LOG", "info"),
    ));

    // `cargo lambda invoke` waits as long as no worker takes the request:
    // bound it, so that a worker that died says so instead of hanging.
    let invoke = |data: &[&str]| {
        let mut child = Command::new(&cargo_lambda)
            .args(["lambda", "invoke", "worker", "--output-format", "json"])
            .args(["--invoke-address", "127.0.0.1", "--invoke-port", &port])
            .args(data)
            .current_dir(repo_root())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let asked = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if asked.elapsed() > READY_WITHIN {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "cargo lambda invoke got no answer within {READY_WITHIN:?} (watch and worker log: {})",
                    log_path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    };
    // Warm up with an empty batch: the worker answers once its cold start
    // is done, and the fixture must not be the request that waits for it.
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
            "cargo lambda invoke kept failing for {READY_WITHIN:?}: {}\n(watch and worker log: {})",
            String::from_utf8_lossy(&out.stderr),
            log_path.display()
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
        serde_json::json!({"batchItemFailures": []}),
        "no record comes back: the panicked item's retry is a new message"
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
    // The retry: the panicked item, attempt 2, after its delay.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let retried: Vec<(String, u32)> = drain(aws.work())
        .await
        .iter()
        .map(|d| {
            let b = WorkBody::decode(&d.body).unwrap();
            (b.item.to_string(), b.attempt())
        })
        .collect();
    assert_eq!(retried, vec![("sub-000003".to_string(), 2)]);
    let dead = drain(aws.dlq()).await;
    assert_eq!(dead.len(), 2);
    assert_eq!(
        dead.iter()
            .filter(|d| WorkBody::decode(&d.body).is_ok_and(|b| b.dead.is_some()))
            .count(),
        1
    );
}
