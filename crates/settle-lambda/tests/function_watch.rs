//! The function processor through a real Lambda Invoke API: `cargo lambda
//! watch` serves the fixture function (`examples/function/rust`,
//! `settle-fixture-function`) and the worker's Lambda client reaches it
//! through `AWS_ENDPOINT_URL_LAMBDA` alone, as the offline stack does.
//! Needs cargo-lambda (`make venv`); without it the test fails and says so.
//! Needs no emulator.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test.

mod common;

use common::*;
use serde_json::value::RawValue;
use settle_core::domain::{ErrorKind, Item, ItemId};
use settle_core::{AttemptContext, BatchAttempt, BatchProcessor, RunId};
use settle_lambda::function::{FunctionProcessor, LambdaInvoker};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const FUNCTION: &str = "settle-fixture-function";
/// The first invoke compiles the function if nothing built it yet.
const READY_WITHIN: Duration = Duration::from_secs(600);

struct Watch(Child);

impl Drop for Watch {
    fn drop(&mut self) {
        // The watch runs in its own process group: end the whole group.
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let _ = self.0.wait();
    }
}

fn batch(scripts: &[(&str, &str)]) -> Vec<BatchAttempt> {
    let run = RunId::parse(FIXTURE_RUN).unwrap();
    scripts
        .iter()
        .map(|(id, script)| {
            let item = Item::new(
                ItemId::new(*id).unwrap(),
                RawValue::from_string(format!(r#"{{"script":"{script}"}}"#)).unwrap(),
            );
            let ctx = AttemptContext::new(run.clone(), &item, 1);
            BatchAttempt { item, ctx }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fixture_function_answers_through_the_invoke_api() {
    let cargo_lambda = repo_root().join(".venv/bin/cargo-lambda");
    assert!(
        cargo_lambda.exists(),
        "{} not found: this test serves the fixture function with `cargo lambda watch`; \
         install it with `make venv`",
        cargo_lambda.display()
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let log_path = std::env::temp_dir().join(format!("fw{}-watch.log", std::process::id()));
    let log = std::fs::File::create(&log_path).unwrap();
    let watch = {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(&cargo_lambda);
        // A plain cargo environment for the watch's own `cargo run` (see
        // lambda_watch.rs: inherited CARGO_* variables rebuild the SDK).
        for (k, _) in std::env::vars() {
            if k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR" {
                cmd.env_remove(k);
            }
        }
        let path = format!(
            "{}:{}",
            cargo_lambda.parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        cmd.args(["lambda", "watch", "--ignore-changes", "--quiet"])
            .args(["--invoke-address", "127.0.0.1", "--invoke-port", &port])
            .args(["--package", FUNCTION])
            .env("PATH", path)
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start cargo lambda watch")
    };
    let _watch = Watch(watch);

    // The only test in this binary: nothing else reads the environment.
    std::env::set_var(
        "AWS_ENDPOINT_URL_LAMBDA",
        format!("http://127.0.0.1:{port}"),
    );
    for (k, v) in [
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
    ] {
        if std::env::var(k).is_err() {
            std::env::set_var(k, v);
        }
    }
    // The stock worker's construction: the shared SDK config, a plain client.
    let sdk = settle_aws::sdk_config().await;
    let processor = FunctionProcessor::new(LambdaInvoker::new(
        aws_sdk_lambda::Client::new(&sdk),
        FUNCTION.to_owned(),
    ));

    // Until the watch answers (it may first compile the function).
    let started = Instant::now();
    loop {
        let warm = batch(&[("warm-up", "ok")]);
        if processor.process_batch(&warm).await[0].is_ok() {
            break;
        }
        assert!(
            started.elapsed() < READY_WITHIN,
            "the fixture function did not answer within {READY_WITHIN:?} (watch log: {})",
            log_path.display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let attempts = batch(&[
        ("sub-000001", "ok"),
        ("sub-000002", "permanent"),
        ("sub-000003", "retryable:1"),
    ]);
    let out = processor.process_batch(&attempts).await;
    assert!(out[0].is_ok(), "{:?}", out[0]);
    let e = out[1].as_ref().unwrap_err();
    assert_eq!(
        (e.kind, e.message.as_str()),
        (ErrorKind::Permanent, "permanent failure (scripted)")
    );
    assert_eq!(out[2].as_ref().unwrap_err().kind, ErrorKind::Retryable);
    let log = attempts[0].ctx.take_log().unwrap();
    assert!(
        log.starts_with(&format!("Invoke {FUNCTION} (3 items) -> 200 in ")),
        "{log}"
    );

    // `cargo lambda watch` returns no log tail (`LogResult`), so the log is
    // the invoke line alone; the tail's decoding is covered by the unit tests.
    assert_eq!(log.lines().count(), 1, "{log}");

    // A panic in the function fails the whole batch, retryably, with the
    // panic's message. AWS answers 200 with `FunctionError: Unhandled`;
    // `cargo lambda watch` answers a 500 with the message instead, which
    // reaches the worker as a failed invoke: the same outcome.
    let attempts = batch(&[("sub-000001", "ok"), ("sub-000003", "panic")]);
    let out = processor.process_batch(&attempts).await;
    for o in &out {
        let e = o.as_ref().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Retryable);
        assert!(
            e.message.starts_with(&format!("Invoke {FUNCTION}: "))
                && e.message.contains("scripted panic for item sub-000003"),
            "{}",
            e.message
        );
    }
}
