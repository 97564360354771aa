//! The Node and Python handler examples of `examples/function/` (the user's
//! own Lambda function, on the SDKs' Lambda adapters) answer a batch
//! request with one result per item in the worker's contract.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test.

mod common;

use common::repo_root;
use serde_json::{json, Value};
use std::process::Command;

fn request() -> Value {
    let item = |id: &str, card: &str, attempt: u32| {
        json!({
            "id": id,
            "payload": {"user": id, "plan": "pro", "card": card},
            "run_id": "r20261124T020000Z-5e771e",
            "attempt": attempt,
            "idempotency_key": format!("r20261124T020000Z-5e771e:{id}"),
            "deadline_ms": 1_795_485_630_000u64,
        })
    };
    json!({"items": [
        item("u-1", "4242424242424242", 1),
        item("u-2", "4000000000000002", 1),
        item("u-3", "4000000000000119", 2),
        {"id": "u-4", "payload": {"user": "u-4", "plan": "gold", "card": "4242"},
         "run_id": "r20261124T020000Z-5e771e", "attempt": 1,
         "idempotency_key": "r20261124T020000Z-5e771e:u-4"},
        item("u-5", "4000000000000429", 1),
    ]})
}

/// Checks the response against the contract and the renewals' rules.
fn check(response: &Value) {
    let results = response["results"].as_array().unwrap();
    let ids: Vec<&str> = results.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["u-1", "u-2", "u-3", "u-4", "u-5"], "{response}");
    assert_eq!(results[0]["status"], "ok");
    assert_eq!(
        results[0]["output"],
        json!({"user": "u-1", "amount_cents": 1500, "charge": "ch_r20261124T020000Z-5e771e_u-1"})
    );
    assert_eq!(results[1]["status"], "fail");
    assert_eq!(results[1]["error"], "card ...0002 declined");
    assert_eq!(results[2]["status"], "retry");
    assert_eq!(results[2]["error"], "gateway timeout");
    assert_eq!(results[2]["retry_after_ms"], 5000);
    assert_eq!(results[3]["status"], "fail");
    assert_eq!(results[4]["status"], "throttled");
    assert_eq!(results[4]["error"], "gateway rate limit (429)");
    assert_eq!(results[4]["retry_after_ms"], 1000);
    // Each item's log is its own line, and no other item's.
    let log = results[2]["log"].as_str().unwrap();
    assert_eq!(
        log,
        "renewing u-3 on pro: 1500 cents to card ...0119 (attempt 2)\n"
    );
    for r in results {
        for key in r.as_object().unwrap().keys() {
            assert!(
                ["id", "status", "output", "error", "retry_after_ms", "log"]
                    .contains(&key.as_str()),
                "unexpected field {key} in {r}"
            );
        }
    }
}

/// The response: the last line of stdout (what the handler prints goes to
/// the function's log, stdout or stderr, before it).
fn run(mut cmd: Command) -> Value {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"))
}

#[test]
fn the_node_function_answers_each_item() {
    // Deployed as on Lambda: the SDK file beside the handler.
    let dir = tempfile::tempdir().unwrap();
    let root = repo_root();
    std::fs::copy(
        root.join("examples/function/node/index.js"),
        dir.path().join("index.js"),
    )
    .unwrap();
    std::fs::copy(
        root.join("sdk/node/settle.js"),
        dir.path().join("settle.js"),
    )
    .unwrap();
    // settle.js sends stdout to stderr (the jsonl protocol owns stdout), so
    // the response goes to fd 1 directly.
    let script = "const fs = require('fs');\
        require('./index.js').handler(JSON.parse(process.argv[1]))\
        .then((r) => fs.writeSync(1, JSON.stringify(r)), (e) => { fs.writeSync(2, String(e.stack)); process.exit(1); });";
    let mut cmd = Command::new("node");
    cmd.current_dir(dir.path())
        .args(["-e", script, &request().to_string()]);
    check(&run(cmd));

    // Another shape of event is an error of the invocation.
    let mut cmd = Command::new("node");
    cmd.current_dir(dir.path())
        .args(["-e", script, r#"{"Records": []}"#]);
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a Settle batch"));
}

#[test]
fn the_python_function_answers_each_item() {
    let root = repo_root();
    let script = "import json, sys, handler\n\
        sys.__stdout__.write('\\n' + json.dumps(handler.handler(json.loads(sys.argv[1]), None)))";
    let mut cmd = Command::new("python3");
    cmd.env(
        "PYTHONPATH",
        format!(
            "{}:{}",
            root.join("examples/function/python").display(),
            root.join("sdk/python").display()
        ),
    )
    .args(["-c", script, &request().to_string()]);
    check(&run(cmd));

    let mut cmd = Command::new("python3");
    cmd.env("PYTHONPATH", root.join("sdk/python")).args([
        "-c",
        "import settle; settle.lambda_handler(print)({'Records': []})",
    ]);
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a Settle batch"));
}
