//! End-to-end tests of `settle redrive` on the real binary.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{json, Value};

/// Runs six items with max receives 3: two succeed, four fail.
fn failed_run(env: &Env) -> (String, Value) {
    let items = env.scripts(
        "i.jsonl",
        &[
            ("ok1", "ok"),
            ("r5", "retryable:5"),
            ("perm", "permanent"),
            ("panic", "panic"),
            ("fly", "fly"),
            ("ok2", "ok"),
        ],
    );
    let run = env.run(&items, &["--max-receives", "3"]);
    assert_run(&run, "partial", 6, 2, 4, 0);
    let id = run_id(&run);
    assert_eq!(env.failures(&id), initial_failures(&id));
    (id, run)
}

fn initial_failures(run: &str) -> Value {
    json!({"run_id": run, "failures": [
        failure("fly", 1, "unknown script \"fly\""),
        failure("panic", 3, "panic: scripted panic for item panic"),
        failure("perm", 1, "permanent failure (scripted)"),
        failure("r5", 3, "retryable failure 3 of 5 (scripted)"),
    ]})
}

fn redrive(env: &Env, run: &str, extra: &[&str]) -> Out {
    let mut args = vec!["redrive", run, "--json"];
    args.extend(FAST);
    args.extend(extra);
    env.settle(&args)
}

#[test]
fn redriving_one_item_moves_exactly_that_item() {
    let env = Env::new();
    let (id, _) = failed_run(&env);

    let out = redrive(&env, &id, &["--item", "r5"]);
    out.expect_code(0)
        .stderr_has(&format!("Redriving 1 items of run {id}"));
    let v = out.json();
    assert_run_extra(&v, &REDRIVE_KEYS, "partial", 6, 3, 3, 0);
    assert_eq!(v["redriven"], 1);
    assert_eq!(run_id(&v), id);

    // Attempts 4 and 5 fail, 6 succeeds: the round allows three receives.
    let r5 = env.show(&id, "r5");
    assert_eq!(r5["status"], "succeeded", "{r5}");
    assert_eq!(r5["attempts"], 6, "{r5}");
    assert_eq!(
        history(&r5),
        vec![
            h(1, "failed", Some("retryable"), false),
            h(2, "failed", Some("retryable"), false),
            h(3, "failed", Some("retryable"), true),
            h(4, "failed", Some("retryable"), false),
            h(5, "failed", Some("retryable"), false),
            h(6, "succeeded", None, false),
        ]
    );
    assert_eq!(
        r5["history"][3]["error"],
        "retryable failure 4 of 5 (scripted)"
    );

    // The other failed items are untouched.
    assert_eq!(
        env.failures(&id),
        json!({"run_id": id, "failures": [
            failure("fly", 1, "unknown script \"fly\""),
            failure("panic", 3, "panic: scripted panic for item panic"),
            failure("perm", 1, "permanent failure (scripted)"),
        ]})
    );
    assert_eq!(history(&env.show(&id, "perm")).len(), 1);
    let status = env.status(&id);
    assert_run(&status, "partial", 6, 3, 3, 0);

    // Now it has succeeded, it cannot be redriven again.
    redrive(&env, &id, &["--item", "r5"])
        .expect_code(2)
        .stderr_has("has not failed");
    assert_eq!(env.status(&id), status);
}

#[test]
fn redriving_all_moves_every_failed_item() {
    let env = Env::new();
    let (id, _) = failed_run(&env);

    let out = redrive(&env, &id, &[]);
    out.expect_code(0);
    let v = out.json();
    assert_run_extra(&v, &REDRIVE_KEYS, "partial", 6, 3, 3, 0);
    assert_eq!(v["redriven"], 4);

    // Permanent failures fail again on their one more attempt; the panic
    // gets three more; retryable:5 succeeds on attempt 6.
    assert_eq!(
        env.failures(&id),
        json!({"run_id": id, "failures": [
            failure("fly", 2, "unknown script \"fly\""),
            failure("panic", 6, "panic: scripted panic for item panic"),
            failure("perm", 2, "permanent failure (scripted)"),
        ]})
    );
    assert_eq!(
        history(&env.show(&id, "perm")),
        vec![
            h(1, "failed", Some("permanent"), true),
            h(2, "failed", Some("permanent"), true),
        ]
    );
    assert_eq!(env.show(&id, "r5")["status"], "succeeded");
    assert_eq!(
        env.show(&id, "ok1")["attempts"],
        1,
        "succeeded items stay put"
    );

    // A second redrive of all moves the three still failed, and no more.
    let again = redrive(&env, &id, &[]);
    again.expect_code(0);
    let v = again.json();
    assert_run_extra(&v, &REDRIVE_KEYS, "partial", 6, 3, 3, 0);
    assert_eq!(v["redriven"], 3);
    assert_eq!(
        env.failures(&id),
        json!({"run_id": id, "failures": [
            failure("fly", 3, "unknown script \"fly\""),
            failure("panic", 9, "panic: scripted panic for item panic"),
            failure("perm", 3, "permanent failure (scripted)"),
        ]})
    );
}

#[test]
fn redriving_a_run_without_failures_moves_nothing() {
    let env = Env::new();
    let items = env.scripts("i.jsonl", &[("a", "ok"), ("b", "ok")]);
    let run = env.run(&items, &[]);
    let id = run_id(&run);
    let out = redrive(&env, &id, &[]);
    out.expect_code(0);
    let v = out.json();
    assert_run_extra(&v, &REDRIVE_KEYS, "succeeded", 2, 2, 0, 0);
    assert_eq!(v["redriven"], 0);
    assert_eq!(env.status(&id), run);
}

#[test]
fn redrive_errors_exit_2_and_move_nothing() {
    let env = Env::new();
    let (id, run) = failed_run(&env);
    let unchanged = |env: &Env| {
        assert_eq!(env.status(&id), run, "the tally did not move");
        assert_eq!(env.failures(&id), initial_failures(&id), "no failure moved");
    };

    let missing = "r20200101T000000Z-000000";
    let out = redrive(&env, missing, &[]);
    out.expect_code(2)
        .stderr_has(&format!("run {missing} not found"));
    out.json_error("input");
    unchanged(&env);

    redrive(&env, "r2020-bogus", &[])
        .expect_code(2)
        .stderr_has("not a Settle run id");
    unchanged(&env);

    redrive(&env, &id, &["--item", "ghost"])
        .expect_code(2)
        .stderr_has(&format!("item \"ghost\" is not in run {id}"));
    unchanged(&env);

    redrive(&env, &id, &["--item", "ok1"])
        .expect_code(2)
        .stderr_has("item \"ok1\"")
        .stderr_has("has not failed");
    unchanged(&env);

    // One bad name among good ones: nothing moves, not even the good ones.
    redrive(&env, &id, &["--item", "perm", "--item", "ok2"])
        .expect_code(2)
        .stderr_has("has not failed");
    unchanged(&env);
    redrive(&env, &id, &["--item", "perm", "--item", "ghost"])
        .expect_code(2)
        .stderr_has("\"ghost\"");
    unchanged(&env);

    redrive(&env, &id, &["--item", ""])
        .expect_code(2)
        .stderr_has("id is empty");
    unchanged(&env);

    // The failed items are all still in the dead-letter queue.
    let v = redrive(&env, &id, &[]).expect_code(0).json();
    assert_eq!(v["redriven"], 4, "{v}");
}

#[test]
fn dry_run_reports_and_moves_nothing() {
    let env = Env::new();
    let (id, run) = failed_run(&env);

    let out = redrive(&env, &id, &["--dry-run"]);
    out.expect_code(0);
    let v = out.json();
    assert_run_extra(
        &v,
        &[
            "complete",
            "not_moved",
            "redriven",
            "would_redrive",
            "items",
        ],
        "partial",
        6,
        2,
        4,
        0,
    );
    assert_eq!(v["redriven"], 0);
    assert_eq!(v["would_redrive"], 4);
    assert_eq!(v["items"], json!(["fly", "panic", "perm", "r5"]));
    assert_eq!(env.status(&id), run);
    assert_eq!(env.failures(&id), initial_failures(&id));

    let one = redrive(&env, &id, &["--dry-run", "--item", "perm"]);
    let v = one.expect_code(0).json();
    assert_eq!(v["would_redrive"], 1);
    assert_eq!(v["items"], json!(["perm"]));
    assert_eq!(env.failures(&id), initial_failures(&id));

    // A dry run checks the names as a real redrive does.
    redrive(&env, &id, &["--dry-run", "--item", "ok1"])
        .expect_code(2)
        .stderr_has("has not failed");

    // Dry runs left every message where it was: a real redrive moves them all.
    let v = redrive(&env, &id, &[]).expect_code(0).json();
    assert_eq!(v["redriven"], 4);
    assert_run_extra(&v, &REDRIVE_KEYS, "partial", 6, 3, 3, 0);
}

#[test]
fn redrive_touches_only_the_named_run() {
    let env = Env::new();
    // The same ids in two runs.
    let items = env.scripts(
        "i.jsonl",
        &[("a", "ok"), ("p", "permanent"), ("r", "retryable:3")],
    );
    let first = env.run(&items, &[]);
    let second = env.run(&items, &[]);
    assert_run(&first, "partial", 3, 1, 2, 0);
    assert_run(&second, "partial", 3, 1, 2, 0);
    let (a, b) = (run_id(&first), run_id(&second));
    let b_failures = env.failures(&b);
    assert_eq!(
        b_failures,
        json!({"run_id": b, "failures": [
            failure("p", 1, "permanent failure (scripted)"),
            failure("r", 3, "retryable failure 3 of 3 (scripted)"),
        ]})
    );

    let v = redrive(&env, &a, &[]).expect_code(0).json();
    assert_run_extra(&v, &REDRIVE_KEYS, "partial", 3, 2, 1, 0);
    assert_eq!(v["redriven"], 2);
    assert_eq!(
        env.failures(&a),
        json!({"run_id": a, "failures": [failure("p", 2, "permanent failure (scripted)")]})
    );
    assert_eq!(env.show(&a, "r")["attempts"], 4);

    // The other run is untouched, and its messages are still there to redrive.
    assert_eq!(env.status(&b), second);
    assert_eq!(env.failures(&b), b_failures);
    let v = redrive(&env, &b, &["--item", "r"]).expect_code(0).json();
    assert_eq!(v["redriven"], 1);
    assert_run_extra(&v, &REDRIVE_KEYS, "partial", 3, 2, 1, 0);
    assert_eq!(env.status(&a)["succeeded"], 2);
}

#[test]
fn redrive_after_max_receives_one_counts_attempts_on() {
    let env = Env::new();
    let items = env.scripts("i.jsonl", &[("r", "retryable:2"), ("o", "ok")]);
    let run = env.run(&items, &["--max-receives", "1"]);
    assert_run(&run, "partial", 2, 1, 1, 0);
    let id = run_id(&run);
    // One receive per round: attempt 2 fails, attempt 3 succeeds.
    let v = redrive(&env, &id, &["--item", "r"]).expect_code(0).json();
    assert_run_extra(&v, &REDRIVE_KEYS, "partial", 2, 1, 1, 0);
    assert_eq!(v["redriven"], 1);
    assert_eq!(
        env.failures(&id),
        json!({"run_id": id, "failures": [failure("r", 2, "retryable failure 2 of 2 (scripted)")]})
    );
    let v = redrive(&env, &id, &["--item", "r"]).expect_code(0).json();
    assert_run_extra(&v, &REDRIVE_KEYS, "succeeded", 2, 2, 0, 0);
    assert_eq!(
        history(&env.show(&id, "r")),
        vec![
            h(1, "failed", Some("retryable"), true),
            h(2, "failed", Some("retryable"), true),
            h(3, "succeeded", None, false),
        ]
    );
}

#[test]
fn failed_item_with_a_long_error_is_dead_lettered_and_can_be_redriven() {
    // A 150 KB unknown script: the line is well within the message limit,
    // and its error (`unknown script "xxx…"`) echoes the script. The DLQ copy
    // carries the payload and the error, and must still fit in a message.
    let env = Env::new();
    let script = "x".repeat(150_000);
    let items = env.scripts("i.jsonl", &[("big", &script), ("o", "ok")]);
    let run = env.run(&items, &[]);
    assert_run(&run, "partial", 2, 1, 1, 0);
    let id = run_id(&run);
    let f = env.failures(&id);
    assert_eq!(f["failures"][0]["item_id"], "big");
    assert_eq!(f["failures"][0]["attempts"], 1);

    let dry = redrive(&env, &id, &["--dry-run"]).expect_code(0).json();
    assert_eq!(
        (dry["would_redrive"].clone(), dry["items"].clone()),
        (json!(1), json!(["big"])),
        "the failed item's message is in the dead-letter queue: {dry}"
    );
    let v = redrive(&env, &id, &[]).expect_code(0).json();
    assert_eq!(v["redriven"], 1, "{v}");
    assert_eq!(env.failures(&id)["failures"][0]["attempts"], 2);
}
