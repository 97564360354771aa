//! Crash and resume of the real CLI: `settle run` is killed with SIGKILL at
//! moments spread over its whole life (load, dispatch, work, reduce), and
//! sometimes `settle resume` is killed too. After the last resume the tally
//! must be exact, and a kill during the load must leave nothing half-loaded.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const ITEMS: u64 = 20_000;

/// The ids the bench mix fails (its only failures are permanent ones).
fn permanent_ids(jsonl: &str) -> BTreeSet<String> {
    jsonl
        .lines()
        .filter(|l| l.contains("permanent"))
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["id"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// Kills `settle ARGS` after `after` (or lets it finish first) and returns
/// its exit code.
fn kill_after(env: &Env, args: &[&str], after: Duration) -> i32 {
    let mut child = env.spawn(args);
    let started = Instant::now();
    while started.elapsed() < after {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.kill(); // SIGKILL: no handler runs, nothing is flushed.
    wait(child, args).code
}

fn latest_run(env: &Env) -> Option<String> {
    env.runs()["runs"].as_array().unwrap().first().map(run_id)
}

#[test]
fn sigkill_at_any_moment_then_resume_ends_with_the_exact_tally() {
    let base = Env::new();
    let gen = base.settle(&["generate", "--count", &ITEMS.to_string(), "--mix", "bench"]);
    gen.expect_code(0);
    let jsonl = gen.stdout;
    let failing = permanent_ids(&jsonl);
    assert!(!failing.is_empty());

    // One uncut run to learn how long a whole run takes on this machine.
    let items = base.write("items.jsonl", &jsonl);
    let started = Instant::now();
    let full = base.run(&items, &[]);
    let whole = started.elapsed();
    assert_run(
        &full,
        "partial",
        ITEMS,
        ITEMS - failing.len() as u64,
        failing.len() as u64,
        0,
    );

    // Kill points spread from the first milliseconds (the load) to the end.
    let fractions = [0.01, 0.05, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9];
    let mut phases = Vec::new();
    for (n, f) in fractions.iter().enumerate() {
        let env = Env::new();
        let items = env.write("items.jsonl", &jsonl);
        let mut args = vec!["run", "--items", items.as_str(), "--json"];
        args.extend(FAST);
        let code = kill_after(&env, &args, whole.mul_f64(*f));

        let run = match latest_run(&env) {
            Some(run) => {
                let status = env.status(&run);
                phases.push(format!(
                    "{f}: killed (exit {code}) with {} of {} items claimed, {} settled",
                    status["total"],
                    ITEMS,
                    status["succeeded"].as_u64().unwrap() + status["failed"].as_u64().unwrap(),
                ));
                run
            }
            None => {
                // Killed before the run existed: the load either committed
                // whole or left nothing. Nothing half-loaded means a
                // dispatch finds all items or none.
                let out = env.settle(&["dispatch", "--json"]);
                phases.push(format!(
                    "{f}: killed (exit {code}) before the run existed; load {}",
                    if out.code == 2 {
                        "left nothing"
                    } else {
                        "had committed whole"
                    }
                ));
                if out.code == 2 {
                    out.stderr_has("nothing is pending");
                    let again = env.run(&items, &[]);
                    assert_eq!(again["total"], ITEMS, "rerun after a kill in load");
                    run_id(&again)
                } else {
                    out.expect_code(0);
                    assert_eq!(out.json()["total"], ITEMS, "a load is all or nothing");
                    run_id(&out.json())
                }
            }
        };
        // Every other case kills the resume too before the final one.
        let mut resume = vec!["resume", run.as_str(), "--json"];
        resume.extend(FAST);
        if n % 2 == 1 {
            kill_after(&env, &resume, whole.mul_f64(0.3));
        }
        let done = env.ok_json(&resume);
        assert_run(
            &done,
            "partial",
            ITEMS,
            ITEMS - failing.len() as u64,
            failing.len() as u64,
            0,
        );
        let failed: BTreeSet<String> = env.failures(&run)["failures"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["item_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(failed, failing, "kill at {f} of the run: failed ids differ");
    }
    eprintln!(
        "uncut run took {whole:?}; kills:\n  {}",
        phases.join("\n  ")
    );
}
