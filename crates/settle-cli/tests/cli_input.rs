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
    let want = match line {
        Some(n) => format!("{bad} line {n}: {reason}"),
        None => format!("{bad}: {reason}"),
    };
    out.stderr_has(&want);
    assert!(
        out.json_error("input").starts_with(&want),
        "the JSON error says the same"
    );
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
    refused(b"", None, "no items (the file has no item lines)");
}

#[test]
fn blank_lines_only() {
    refused(b"\n  \n\r\n", None, "no items (the file has no item lines)");
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
    // message JSON-escapes them: 256 quotes take 512 bytes.
    // A line that fits the limit must either be refused at load or run.
    let env = Env::new();
    let id = "\"".repeat(256);
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

#[test]
fn ids_with_control_characters_are_refused() {
    refused(
        b"{\"id\":\"a\"}\n{\"id\":\"a\\nb\"}\n",
        Some(2),
        "id \"a\\nb\" contains a control character (U+000A); nothing was loaded",
    );
    refused(
        b"{\"id\":\"a\"}\n{\"id\":\"b\"}\n{\"id\":\"\\u001b[31m\"}\n",
        Some(3),
        "id \"\\u{1b}[31m\" contains a control character (U+001B); nothing was loaded",
    );
}

#[test]
fn a_byte_order_mark_is_skipped() {
    let env = Env::new();
    let items = env.write(
        "bom.jsonl",
        b"\xEF\xBB\xBF{\"id\":\"a\"}\n{\"id\":\"b\",\"payload\":{\"script\":\"permanent\"}}\n",
    );
    let run = env.run(&items, &[]);
    assert_run(&run, "partial", 2, 1, 1, 0);
    assert_eq!(env.show(&run_id(&run), "a")["status"], "succeeded");
}

#[test]
fn empty_stdin_has_no_items() {
    let env = Env::new();
    let out = env.settle(&["load", "--items", "-", "--json"]);
    out.expect_code(2)
        .stderr_has("stdin: no items (the input has no item lines)");
    out.json_error("input");
}

#[test]
fn read_only_commands_create_no_database() {
    let env = Env::new();
    let run = "r20200101T000000Z-000000";
    // Not through `env.settle`, which passes a --db of its own.
    for (dir, cmd) in [
        ("a", &["status"][..]),
        ("b", &["status", run, "--json"]),
        ("c", &["runs"]),
        ("d", &["failures", run]),
        ("e", &["show", run, "x", "--json"]),
        ("f", &["resume", run]),
        ("g", &["redrive", run, "--dry-run"]),
    ] {
        let top = env.path(dir);
        let db = top.join("no/such/x.db");
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_settle"));
        c.arg("--db").arg(&db).args(cmd).current_dir(env.dir.path());
        for var in ["RUST_LOG", "SETTLE_DB", "SETTLE_BACKEND", "SETTLE_WORKERS"] {
            c.env_remove(var);
        }
        let out = c.output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(2), "{cmd:?}: {stderr}");
        let want = format!(
            "no database at {} (nothing has run here yet; `settle run --items FILE` creates it)",
            db.display()
        );
        assert!(stderr.contains(&want), "{cmd:?}: {stderr}");
        if cmd.contains(&"--json") {
            assert!(stdout.contains("\"kind\":\"input\""), "{cmd:?}: {stdout}");
        }
        assert!(!top.exists(), "{cmd:?} created {}", top.display());
    }
    // Nor the default one, in the working directory.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_settle"))
        .arg("status")
        .current_dir(env.dir.path())
        .env_remove("SETTLE_DB")
        .env_remove("SETTLE_BACKEND")
        .env_remove("SETTLE_WORKERS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no database at .settle/settle.db"));
    assert!(!env.path(".settle").exists());
}

#[test]
fn a_retry_delay_beyond_the_workers_cap_is_refused() {
    let env = Env::new();
    let good = env.scripts("good.jsonl", &[("g1", "ok")]);
    let out = env.settle(&["run", "--items", &good, "--retry-delay-ms", "3600000"]);
    out.expect_code(2).stderr_has("0..=60000");
    assert!(!env.db().exists(), "refused before anything was opened");
    let out = env.settle(&["run", "--items", &good, "--retry-delay-ms", "60000"]);
    out.expect_code(0);
}

#[test]
fn json_errors_are_one_object_on_stdout() {
    let env = Env::new();
    let items = env.scripts("i.jsonl", &[("a", "ok")]);
    env.run(&items, &[]);
    let out = env.settle(&["status", "NOPE", "--json"]);
    out.expect_code(2);
    assert!(
        out.json_error("input").contains("\"NOPE\""),
        "{}",
        out.stdout
    );
    // Without --json, stdout stays empty.
    let out = env.settle(&["status", "NOPE"]);
    out.expect_code(2);
    assert_eq!(out.stdout, "");
}

#[test]
fn show_prints_no_last_error_for_a_succeeded_item() {
    let env = Env::new();
    let items = env.scripts("i.jsonl", &[("r1", "retryable:1"), ("p", "permanent")]);
    let run = env.run(&items, &[]);
    let id = run_id(&run);
    let out = env.settle(&["show", &id, "r1"]);
    out.expect_code(0);
    assert!(
        out.stdout.contains("succeeded after 2 attempts"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("Last error"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains("failed (retryable): retryable failure 1 of 1"),
        "the history keeps the attempt's error: {}",
        out.stdout
    );
    let out = env.settle(&["show", &id, "p"]);
    out.expect_code(0);
    assert!(
        out.stdout
            .contains("Last error: permanent failure (scripted)\n"),
        "{}",
        out.stdout
    );
}

#[test]
fn a_dry_run_lists_20_ids_and_counts_the_rest() {
    let env = Env::new();
    let names: Vec<String> = (0..25).map(|i| format!("p{i:02}")).collect();
    let failing: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "permanent")).collect();
    let items = env.scripts("i.jsonl", &failing);
    let id = run_id(&env.run(&items, &[]));
    let out = env.settle(&["redrive", &id, "--dry-run"]);
    out.expect_code(0);
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);
    assert!(
        out.stdout.contains("would redrive 25 items")
            && out
                .stdout
                .contains(" ... and 5 more (--json lists them all)"),
        "{}",
        out.stdout
    );
    assert_eq!(out.stdout.matches(", ").count(), 19, "{}", out.stdout);
    let all = env.ok_json(&["redrive", &id, "--dry-run", "--json"]);
    assert_eq!(all["items"].as_array().unwrap().len(), 25);
}

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let env = Env::new();
    let items = env.scripts("i.jsonl", &[("a", "ok"), ("b", "permanent")]);
    let mut args = vec!["-v", "run", "--items", &items];
    args.extend(FAST);
    let out = env.settle(&args);
    out.expect_code(0).stderr_has("INFO");
    assert!(!out.stderr.contains('\u{1b}'), "{:?}", out.stderr);
}

#[test]
fn the_database_file_alone_holds_everything_after_a_command() {
    let env = Env::new();
    let items = env.scripts("i.jsonl", &[("a", "ok"), ("b", "permanent")]);
    let run = env.run(&items, &[]);
    let wal = env.path("settle.db-wal");
    let wal_bytes = std::fs::metadata(&wal).map_or(0, |m| m.len());
    assert_eq!(wal_bytes, 0, "the WAL was checkpointed into the file");
    // A copy of the main file alone shows the run.
    let copy = Env::new();
    std::fs::copy(env.db(), copy.db()).unwrap();
    assert_eq!(copy.status(&run_id(&run)), run);
}

/// A refused `run` or `load` into a new database leaves no database, no
/// `-wal` or `-shm` file and no directory behind: exit 2 means nothing was
/// created. Covers the refusals before the load (a missing file), of the
/// load itself (a repeated id, a bad line, no items), and of stdin, which
/// cannot be read twice.
#[test]
fn a_refused_load_into_a_new_database_leaves_nothing() {
    use std::io::Write;
    let env = Env::new();
    let dup = env.write(
        "dup.jsonl",
        b"{\"id\":\"a\"}\n{\"id\":\"b\"}\n{\"id\":\"a\"}\n",
    );
    let bad = env.write("bad.jsonl", b"{\"id\":\"a\"}\n{\"id\":\n");
    let empty = env.write("empty.jsonl", b"\n");
    let missing = path_str(&env.path("missing.jsonl")).to_owned();
    let cases: [(&str, &str, &[u8], &str); 7] = [
        ("run", &missing, b"", "cannot open items file"),
        (
            "run",
            &dup,
            b"",
            "line 3: duplicate id \"a\" (first on line 1)",
        ),
        ("run", &bad, b"", "line 2: "),
        ("load", &dup, b"", "line 3: duplicate id"),
        ("load", &empty, b"", "no items"),
        (
            "run",
            "-",
            b"{\"id\":\"x\"}\n{\"id\":\"x\"}\n",
            "stdin line 2: duplicate id",
        ),
        ("load", "-", b"not json\n", "stdin line 1: "),
    ];
    for (i, (cmd, items, stdin, want)) in cases.into_iter().enumerate() {
        let top = env.path(&format!("new{i}"));
        let db = top.join("dir/x.db");
        let mut args = vec![cmd, "--items", items];
        if cmd == "run" {
            args.extend(["--processor", "scripted"]);
        }
        // Not through `env.settle`, which passes a --db of its own.
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_settle"));
        c.arg("--db")
            .arg(&db)
            .args(&args)
            .current_dir(env.dir.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        for var in [
            "RUST_LOG",
            "SETTLE_DB",
            "SETTLE_BACKEND",
            "SETTLE_WORKERS",
            "SETTLE_PROCESSOR",
        ] {
            c.env_remove(var);
        }
        let mut child = c.spawn().unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd} {items}: {stderr}");
        assert!(stderr.contains(want), "{cmd} {items}: {stderr}");
        assert!(!top.exists(), "{cmd} {items} left {} behind", top.display());
    }

    // A database that was there stays, refused load or not; and a good
    // load into a new one keeps it.
    let db = env.path("kept/x.db");
    let good = env.scripts("good.jsonl", &[("g1", "ok")]);
    for (items, code) in [(good.as_str(), 0), (dup.as_str(), 2)] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_settle"))
            .arg("--db")
            .arg(&db)
            .args(["load", "--items", items])
            .env_remove("SETTLE_DB")
            .env_remove("SETTLE_BACKEND")
            .env_remove("SETTLE_WORKERS")
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(code),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(db.exists(), "load {items} removed the database");
    }
}
