//! End-to-end tests of bad input to `settle run` and `settle load`: each
//! exits 2, names the line and the reason, and leaves nothing behind.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::json;

/// Runs `settle run` on `bytes`, which must be refused with exit 2 and a
/// stderr naming the file, `line` and `reason`; then checks nothing was
/// created and that a good run on the same database holds only its own items.
fn refused(bytes: &[u8], line: Option<u64>, reason: &str) {
    let env = Env::new();
    let bad = env.write("bad.jsonl", bytes);
    let mut args = vec!["run", "--items", &bad, "--json"];
    args.extend(FAST);
    let out = env.settle(&args);
    out.expect_code(2);
    assert!(
        out.stdout.is_empty(),
        "no JSON on a refusal: {}",
        out.stdout
    );
    let want = match line {
        Some(n) => format!("{bad} line {n}: {reason}"),
        None => format!("{bad}: {reason}"),
    };
    out.stderr_has(&want);
    if line.is_some() {
        out.stderr_has("nothing was loaded");
    }
    assert!(
        !out.stderr.contains("started"),
        "no run started: {}",
        out.stderr
    );
    env.assert_no_runs();

    // `load` refuses it the same way.
    let out = env.settle(&["load", "--items", &bad, "--json"]);
    out.expect_code(2).stderr_has(&want);
    env.assert_no_runs();

    // Nothing is pending: the good items of the bad file were not kept.
    let good = env.scripts("good.jsonl", &[("g1", "ok"), ("g2", "ok")]);
    let run = env.run(&good, &[]);
    assert_run(&run, "succeeded", 2, 2, 0, 0);
    assert_eq!(
        env.ok_json(&["runs", "--json"])["runs"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn invalid_json_line() {
    refused(
        b"{\"id\":\"a\"}\n{\"id\":\"b\",}\n{\"id\":\"c\"}\n",
        Some(2),
        "invalid JSON: trailing comma at column 11",
    );
}

#[test]
fn truncated_json_line() {
    refused(
        b"{\"id\":\"a\"}\n{\"id\":\"b\"\n",
        Some(2),
        "invalid JSON: EOF while parsing an object at column 9",
    );
}

#[test]
fn line_that_is_not_an_object() {
    let reason = "expected a JSON object like {\"id\": \"a1\", \"payload\": {...}}";
    refused(b"{\"id\":\"a\"}\n[\"b\"]\n", Some(2), reason);
    refused(b"\"just a string\"\n", Some(1), reason);
    refused(b"{\"id\":\"a\"}\n{\"id\":\"b\"}\n42\n", Some(3), reason);
}

#[test]
fn missing_id() {
    refused(
        b"{\"id\":\"a\"}\n{\"payload\":{\"script\":\"ok\"}}\n",
        Some(2),
        "missing \"id\"",
    );
}

#[test]
fn numeric_id() {
    refused(
        b"{\"id\":7,\"payload\":{}}\n",
        Some(1),
        "\"id\" must be a string, found a number",
    );
}

#[test]
fn null_id() {
    refused(
        b"{\"id\":\"a\"}\n{\"id\":null}\n",
        Some(2),
        "\"id\" must be a string, found null",
    );
}

#[test]
fn empty_id() {
    refused(b"{\"id\":\"a\"}\n{\"id\":\"\"}\n", Some(2), "id is empty");
}

#[test]
fn id_of_257_characters() {
    let line = format!("{{\"id\":\"a\"}}\n{}\n", json!({"id": "x".repeat(257)}));
    refused(
        line.as_bytes(),
        Some(2),
        "id is 257 characters long; at most 256 are allowed",
    );
}

#[test]
fn id_of_256_characters_is_accepted() {
    let env = Env::new();
    let long = "x".repeat(256);
    let wide = "é".repeat(256); // 512 bytes, 256 characters
    let items = env.scripts("i.jsonl", &[(&long, "ok"), (&wide, "permanent")]);
    let run = env.run(&items, &[]);
    assert_run(&run, "partial", 2, 1, 1, 0);
    let id = run_id(&run);
    assert_eq!(env.show(&id, &long)["status"], "succeeded");
    assert_eq!(
        env.failures(&id),
        json!({"run_id": id, "failures": [failure(&wide, 1, "permanent failure (scripted)")]})
    );
}

#[test]
fn duplicate_id_names_the_first_line() {
    refused(
        b"{\"id\":\"a\"}\n{\"id\":\"b\"}\n\n{\"id\":\"a\",\"payload\":{}}\n",
        Some(4),
        "duplicate id \"a\" (first on line 1)",
    );
}

#[test]
fn invalid_utf8() {
    refused(
        b"{\"id\":\"a\"}\n{\"id\":\"\xff\xfe\"}\n",
        Some(2),
        "not valid UTF-8 (at byte 8)",
    );
}

#[test]
fn unknown_field() {
    refused(
        b"{\"id\":\"a\",\"paylod\":{}}\n",
        Some(1),
        "invalid JSON: unknown field `paylod`",
    );
}

#[test]
fn empty_file() {
    refused(b"", None, "no items (the file is empty)");
}

#[test]
fn blank_lines_only() {
    refused(b"\n  \n\r\n", None, "no items");
}

#[test]
fn nonexistent_file() {
    let env = Env::new();
    let path = env.path("nope.jsonl");
    let path = path_str(&path);
    let mut args = vec!["run", "--items", path, "--json"];
    args.extend(FAST);
    env.settle(&args)
        .expect_code(2)
        .stderr_has(&format!("cannot open items file {path}"));
    env.assert_no_runs();
    let good = env.scripts("good.jsonl", &[("g1", "ok")]);
    assert_run(&env.run(&good, &[]), "succeeded", 1, 1, 0, 0);
}

#[test]
fn blank_lines_and_crlf_are_fine() {
    let env = Env::new();
    let items = env.write(
        "i.jsonl",
        b"\n{\"id\":\"a\"}\r\n\n   \n{\"id\":\"b\",\"payload\":{\"script\":\"permanent\"}}",
    );
    let run = env.run(&items, &[]);
    assert_run(&run, "partial", 2, 1, 1, 0);
}

#[test]
fn bad_flags_exit_2_and_create_nothing() {
    let env = Env::new();
    let good = env.scripts("good.jsonl", &[("g1", "ok"), ("g2", "ok")]);
    for flags in [
        &["--batch-size", "0"][..],
        &["--batch-size", "11"],
        &["--max-receives", "0"],
        &["--tolerated-failure-percent", "101"],
        &["--tolerated-failure-percent", "-1"],
        &["--tolerated-failure-percent", "lots"],
        &["--concurrency", "0"],
        &["--visibility-timeout", "0"],
    ] {
        let mut args = vec!["run", "--items", &good, "--json"];
        args.extend(flags);
        let out = env.settle(&args);
        out.expect_code(2);
        assert!(out.stdout.is_empty(), "{flags:?}: {}", out.stdout);
        assert!(out.stderr.contains("error"), "{flags:?}: {}", out.stderr);
    }
    for flags in [
        &["--max-receives", "0"][..],
        &["--tolerated-failure-percent", "101"],
    ] {
        let mut args = vec!["dispatch", "--json"];
        args.extend(flags);
        env.settle(&args).expect_code(2);
    }
    env.assert_no_runs();
    let run = env.run(&good, &[]);
    assert_run(&run, "succeeded", 2, 2, 0, 0);
}

#[test]
fn an_item_that_loads_can_be_dispatched() {
    // The size check at load counts the id's characters, but the queue
    // message JSON-escapes them: 256 control characters take 1536 bytes.
    // A line that fits the limit must either be refused at load or run.
    let env = Env::new();
    let id = "\u{1}".repeat(256);
    let base = json!({"id": id, "payload": ""}).to_string().len();
    let max_line = 256 * 1024;
    let line = json!({"id": id, "payload": "x".repeat(max_line - base)}).to_string();
    assert_eq!(line.len(), max_line);
    let items = env.write("edge.jsonl", format!("{line}\n{{\"id\":\"o\"}}\n"));
    let mut args = vec!["run", "--items", &items, "--json"];
    args.extend(FAST);
    let out = env.settle(&args);
    match out.code {
        2 => env.assert_no_runs(),
        0 => assert_run(&out.json(), "succeeded", 2, 2, 0, 0),
        _ => panic!(
            "an item accepted by load could not be dispatched (exit {}):\n{}\nruns: {}",
            out.code,
            out.stderr,
            env.runs()
        ),
    }
}

#[test]
fn dispatch_with_nothing_pending_is_refused() {
    let env = Env::new();
    let out = env.settle(&["dispatch", "--json"]);
    out.expect_code(2);
    assert!(out.stderr.contains("nothing is pending"), "{}", out.stderr);
    env.assert_no_runs();
}

#[test]
fn a_database_of_another_kind_is_refused_and_left_alone() {
    let env = Env::new();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "junk",
            (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect(),
            "not a Settle database",
        ),
        (
            "text",
            b"hello, not a database\n".to_vec(),
            "not a Settle database",
        ),
        ("other", Vec::new(), "of another program"),
    ];
    for (name, bytes, want) in cases {
        let path = env.dir.path().join(format!("{name}.db"));
        if name == "other" {
            // A real SQLite file of another program: one table, no Settle marks.
            let status = std::process::Command::new("python3")
                .args(["-c", "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('create table t(x)'); c.commit()"])
                .arg(&path)
                .status()
                .unwrap();
            assert!(status.success());
        } else {
            std::fs::write(&path, &bytes).unwrap();
        }
        let before = std::fs::read(&path).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_settle"))
            // The embedded backend, whatever the environment says.
            .env_remove("SETTLE_BACKEND")
            .env_remove("SETTLE_WORKERS")
            .arg("--db")
            .arg(&path)
            .args(["status", "--json"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "{name}: {stderr}");
        assert!(
            stderr.contains(&format!("{name}.db")),
            "names the file: {stderr}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "{name} is left as it was"
        );
        assert!(
            !env.dir.path().join(format!("{name}.db-wal")).exists(),
            "{name}: no WAL created"
        );
    }
}
