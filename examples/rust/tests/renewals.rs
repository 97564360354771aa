//! The example binary is the whole CLI with its own processor: `run` needs
//! no processor flag, records `--processor renewals`, and `results`,
//! `show` and `redrive` work as with `settle`.
#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};
use std::process::Command;

fn renewals(db: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_renewals"))
        .arg("--db")
        .arg(db)
        .args(args)
        .env_remove("SETTLE_PROCESSOR")
        .env_remove("SETTLE_BACKEND")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_users_own_rust_processor_runs_with_the_whole_cli() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let items = dir.path().join("items.jsonl");
    let cards = ["4242424242424242", "4000000000000002", "4000000000000119"];
    let text: String = (0..9)
        .map(|i| {
            let p = json!({"user": format!("u{i}"), "plan": "pro", "card": cards[i % 3]});
            format!("{}\n", json!({"id": format!("s{i}"), "payload": p}))
        })
        .collect();
    std::fs::write(&items, text).unwrap();
    let (code, stdout, stderr) = renewals(
        &db,
        &[
            "run",
            "--items",
            items.to_str().unwrap(),
            "--json",
            "--retry-delay-ms",
            "10",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let run: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        (run["succeeded"].clone(), run["failed"].clone()),
        (json!(3), json!(6)),
        "{run}"
    );
    let id = run["run_id"].as_str().unwrap();

    let (code, stdout, _) = renewals(&db, &["results", id]);
    assert_eq!(code, 0);
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["output"]["charge"], format!("ch_{id}_s0"));
    assert_eq!(lines[1]["error"], "card ...0002 declined");
    assert_eq!(lines[2]["attempts"], 3);

    let (_, stdout, _) = renewals(&db, &["show", id, "s2", "--json"]);
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        v["history"][2]["log"],
        "renewing u2 on pro: charging 1500 cents to card ...0119 (attempt 3)\n"
    );
    // A processor name the binary does not have is refused.
    let (code, _, stderr) = renewals(&db, &["resume", id, "--processor", "other"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("`scripted` and `renewals`"), "{stderr}");
}
