//! Kills and signals at the moments that matter, on the real CLI: a run
//! killed once it exists keeps its items from the next run; an interrupted
//! redrive is finished by one resume (or the next redrive) with a final
//! tally and empty queues; SIGINT and SIGTERM stop every long command
//! cleanly, saying how to continue, and a second signal still says it; no
//! process of an `--exec` attempt outlives Settle, however it ends.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::Child;
use std::sync::mpsc;
use std::time::Duration;

/// A running `settle` whose stderr is read line by line as it comes.
struct Watched {
    child: Child,
    args: Vec<String>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Watched {
    fn start(env: &Env, args: &[&str]) -> Self {
        Self::from_child(env.spawn(args), args)
    }

    fn from_child(mut child: Child, args: &[&str]) -> Self {
        let err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits until a line of stderr contains `needle`.
    fn wait_for(&mut self, needle: &str) {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => panic!(
                    "`settle {}` never said {needle:?}; it said:\n{}",
                    self.args.join(" "),
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn signal(&self, name: &str) {
        let sent = std::process::Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{name}");
    }

    fn finish(mut self) -> Out {
        let mut stdout = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        let status = self.child.wait().unwrap();
        self.seen.extend(self.lines.iter());
        Out {
            code: status.code().unwrap_or_else(|| {
                use std::os::unix::process::ExitStatusExt;
                128 + status.signal().unwrap_or(0)
            }),
            stdout,
            stderr: self.seen.join("\n"),
            args: self.args,
        }
    }
}

/// The work, results and dead-letter queues' message counts, hidden ones
/// included, read from the database while no command runs.
fn queues(env: &Env) -> (u64, u64, u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let e = settle_embedded::Embedded::open(&env.db()).await.unwrap();
        let b = e.backend();
        (
            b.work.depth().await.unwrap().total(),
            b.results.depth().await.unwrap().total(),
            b.dlq.depth().await.unwrap().total(),
        )
    })
}

/// `n` items, every second of which fails its first three attempts: with
/// the default 3 receives it fails, and a redrive makes it succeed.
fn half_retryable(env: &Env, n: usize) -> String {
    let text: String = (0..n)
        .map(|i| {
            let script = if i % 2 == 1 { "retryable:3" } else { "ok" };
            format!(
                "{}\n",
                json!({"id": format!("i{i:05}"), "payload": {"script": script}})
            )
        })
        .collect();
    env.write("items.jsonl", text)
}

/// One item at a time, so that a signal lands while work remains.
const SLOW: [&str; 4] = ["--concurrency", "1", "--batch-size", "1"];

#[test]
fn a_run_killed_once_it_exists_keeps_its_items_from_the_next_run() {
    const N: u64 = 20_000;
    let env = Env::new();
    let gen = env.settle(&["generate", "--count", &N.to_string(), "--mix", "bench"]);
    gen.expect_code(0);
    let failing = gen
        .stdout
        .lines()
        .filter(|l| l.contains("permanent"))
        .count() as u64;
    let items = env.write("items.jsonl", &gen.stdout);
    let mut args = vec!["run", "--items", items.as_str(), "--json"];
    args.extend(FAST);
    let mut first = Watched::start(&env, &args);
    // The run exists from this line on, with all its items; dispatch and
    // processing have barely begun.
    first.wait_for("started");
    first.signal("KILL");
    let killed = first.finish();
    assert_eq!(killed.code, 128 + 9, "{killed:?}");
    let run = env.runs()["runs"][0]["run_id"].as_str().unwrap().to_owned();
    let before = env.status(&run);
    assert_eq!(
        before["total"], N,
        "the killed run owns all its items: {before}"
    );

    // The next run counts its own file and nothing of the killed one's.
    let other = env.scripts("other.jsonl", &[("x1", "ok"), ("x2", "permanent")]);
    let second = env.run(&other, &[]);
    assert_run(&second, "partial", 2, 1, 1, 0);

    let mut resume = vec!["resume", run.as_str(), "--json"];
    resume.extend(FAST);
    let done = env.ok_json(&resume);
    assert_run(&done, "partial", N, N - failing, failing, 0);
    assert_eq!(
        queues(&env),
        (0, 0, failing + 1),
        "one dead letter per failed item"
    );
}

/// Redrives a run of half-failing items, stops the redrive with `signal`
/// while it processes, and returns the env, the run id and the stopped
/// redrive's output.
fn interrupted_redrive(signal: &str) -> (Env, String, Out) {
    const N: usize = 600;
    let env = Env::new();
    let items = half_retryable(&env, N);
    let run = env.run(&items, &[]);
    assert_run(&run, "partial", N as u64, N as u64 / 2, N as u64 / 2, 0);
    let id = run_id(&run);
    let mut args = vec!["redrive", id.as_str(), "--json"];
    args.extend(FAST);
    args.extend(SLOW);
    let mut redrive = Watched::start(&env, &args);
    redrive.wait_for("Redriving 300 items");
    std::thread::sleep(Duration::from_millis(300));
    redrive.signal(signal);
    let out = redrive.finish();

    // Cut off mid-way: the run is not settled while the redrive's messages
    // wait, whatever its tally says.
    let status = env.status(&id);
    assert_eq!(status["status"], "running", "{status}");
    assert_eq!(status["redriving"], true, "{status}");
    let human = env.settle(&["status", &id]);
    human.expect_code(0);
    assert!(
        human.stdout.contains(&format!("settle resume {id}")),
        "status must point to resume: {}",
        human.stdout
    );
    (env, id, out)
}

/// One resume finishes the cut-off redrive: a final tally, and nothing left
/// in any queue. A second resume changes nothing.
fn resume_finishes(env: &Env, id: &str) {
    let mut args = vec!["resume", id, "--json"];
    args.extend(FAST);
    let done = env.ok_json(&args);
    assert_run(&done, "succeeded", 600, 600, 0, 0);
    assert_eq!(done["redriving"], false);
    assert_eq!(queues(env), (0, 0, 0), "queues after the resume");
    assert_eq!(done["redrive"]["complete"], true, "{done}");
    let mut again = env.ok_json(&args);
    assert_eq!(again["redrive"], Value::Null, "no redrive left: {again}");
    again["redrive"] = done["redrive"].clone();
    assert_eq!(again, done, "a second resume moves nothing");
}

#[test]
fn a_redrive_stopped_by_sigint_is_finished_by_one_resume() {
    let (env, id, out) = interrupted_redrive("INT");
    out.expect_code(130)
        .stderr_has("interrupted by SIGINT")
        .stderr_has(&format!("continue with: settle resume {id}"));
    let v = out.json();
    assert_eq!(
        (v["status"].clone(), v["redriving"].clone()),
        (json!("running"), json!(true)),
        "{v}"
    );
    resume_finishes(&env, &id);
}

#[test]
fn a_redrive_stopped_by_sigterm_is_finished_by_one_resume() {
    let (env, id, out) = interrupted_redrive("TERM");
    out.expect_code(143)
        .stderr_has("interrupted by SIGTERM")
        .stderr_has(&format!("continue with: settle resume {id}"));
    resume_finishes(&env, &id);
}

#[test]
fn a_redrive_killed_outright_is_finished_by_one_resume() {
    let (env, id, out) = interrupted_redrive("KILL");
    assert_eq!(out.code, 128 + 9, "{out:?}");
    resume_finishes(&env, &id);
}

#[test]
fn a_redrive_after_a_killed_one_finishes_it_and_misses_nothing() {
    let (env, id, _) = interrupted_redrive("KILL");
    let mut args = vec!["redrive", id.as_str(), "--json"];
    args.extend(FAST);
    let out = env.settle(&args);
    out.expect_code(0)
        .stderr_has("Finishing an earlier redrive")
        .stderr_has("Redriving 0 items");
    assert!(
        !out.stderr.contains("no message in the dead-letter queue"),
        "nothing is missing: {}",
        out.stderr
    );
    let v = out.json();
    assert_run_extra(&v, &REDRIVE_KEYS, "succeeded", 600, 600, 0, 0);
    assert_eq!(
        (v["not_moved"].clone(), v["complete"].clone()),
        (json!(0), json!(true))
    );
    assert_eq!(queues(&env), (0, 0, 0));
}

/// Items of the big redrive: every second one fails its first three
/// attempts, so the run leaves half of them failed and a redrive makes each
/// of those succeed.
const BIG: usize = 10_000;

/// Runs [`BIG`] half-failing items, starts `settle redrive` of all the
/// failed ones and stops it with `signal` while it moves their dead letters
/// back (the move of 5,000 takes about a second). Returns the env, the run
/// id and the stopped redrive's output.
fn redrive_cut_while_it_moves(signal: &str) -> (Env, String, Out) {
    let env = Env::new();
    let items = half_retryable(&env, BIG);
    let run = env.run(&items, &[]);
    let failed = BIG as u64 / 2;
    assert_run(&run, "partial", BIG as u64, failed, failed, 0);
    let id = run_id(&run);
    let mut args = vec!["redrive", id.as_str(), "--json"];
    args.extend(FAST);
    let mut redrive = Watched::start(&env, &args);
    redrive.wait_for("Moving the failed items of run");
    std::thread::sleep(Duration::from_millis(250));
    redrive.signal(signal);
    let out = redrive.finish();
    let (work, results, dlq) = queues(&env);
    assert!(
        work > 0 && dlq > 0 && results == 0,
        "cut off part-way through the move: work {work}, dlq {dlq} ({out:?})"
    );
    // The scope stays with the run, and status gives the one way on.
    let status = env.status(&id);
    assert_eq!(status["status"], "running", "{status}");
    assert_eq!(
        status["redrive"],
        json!({"complete": false, "scope": [{}]}),
        "{status}"
    );
    let human = env.settle(&["status", &id]);
    human.expect_code(0);
    assert_eq!(
        human.stdout.matches("settle resume").count(),
        1,
        "{}",
        human.stdout
    );
    assert!(
        human
            .stdout
            .contains(&format!("finish it with: settle resume {id}")),
        "{}",
        human.stdout
    );
    assert!(!human.stdout.contains("settle redrive"), "{}", human.stdout);
    (env, id, out)
}

/// `settle resume` after a cut-off redrive: every item of the redrive's
/// scope moved back and processed (each succeeds now), the scope cleared,
/// exit 0, empty queues.
fn resume_finishes_the_redrive(env: &Env, id: &str) {
    let mut args = vec!["resume", id, "--json"];
    args.extend(FAST);
    // Not `env.settle`: after an outright kill the resume waits for the
    // dead letters the killed pass held hidden (up to 2 minutes).
    let out = Watched::start(env, &args).finish();
    out.expect_code(0)
        .stderr_has("Finishing the unfinished redrive");
    let done = out.json();
    assert_run(&done, "succeeded", BIG as u64, BIG as u64, 0, 0);
    assert_eq!(
        done["redrive"],
        json!({"complete": true, "scope": [{}]}),
        "{done}"
    );
    assert_eq!(queues(env), (0, 0, 0), "queues after the resume");
    // Each redriven item was attempted once more, and only once.
    let item = env.show(id, "i00001");
    assert_eq!(item["attempts"], 4, "{item}");
    let status = env.status(id);
    assert_eq!(status["redrive"], Value::Null, "{status}");
    assert_eq!(status["status"], "succeeded", "{status}");
}

#[test]
fn a_redrive_stopped_by_sigint_while_it_moves_is_finished_by_resume() {
    let (env, id, out) = redrive_cut_while_it_moves("INT");
    out.expect_code(130)
        .stderr_has(&format!("continue with: settle resume {id}"));
    // One instruction, the one that works.
    assert_eq!(
        out.stderr.matches("settle resume").count(),
        1,
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("redrive again"), "{}", out.stderr);
    let v = out.json();
    let moved = v["redriven"].as_u64().unwrap();
    assert!(moved > 0 && moved < BIG as u64 / 2, "{v}");
    assert_eq!(v["complete"], false, "{v}");
    assert_eq!(
        v["redrive"],
        json!({"complete": false, "scope": [{}]}),
        "{v}"
    );
    resume_finishes_the_redrive(&env, &id);
}

#[test]
fn a_redrive_killed_while_it_moves_is_finished_by_resume() {
    let (env, id, out) = redrive_cut_while_it_moves("KILL");
    assert_eq!(out.code, 128 + 9, "{out:?}");
    resume_finishes_the_redrive(&env, &id);
}

/// The same on the AWS backend (SQS and DynamoDB on the emulator): a
/// redrive stopped by `signal` while it moves is finished by `settle resume`.
fn aws_redrive_cut_while_it_moves(signal: &str) {
    // The emulator takes about 30 s for the run; the move of its 120
    // failed items, about a second.
    const N: usize = 240;
    let failed = N as u64 / 2;
    let env = Env::aws(6);
    let items = half_retryable(&env, N);
    let run = env.run(&items, &["--max-receives", "3"]);
    assert_run(&run, "partial", N as u64, failed, failed, 0);
    let id = run_id(&run);
    let mut args = vec!["redrive", id.as_str(), "--json"];
    args.extend(FAST);
    let mut redrive = Watched::start(&env, &args);
    redrive.wait_for("Moving the failed items of run");
    std::thread::sleep(Duration::from_millis(250));
    redrive.signal(signal);
    let out = redrive.finish();
    if signal == "KILL" {
        assert_eq!(out.code, 128 + 9, "{out:?}");
    } else {
        out.expect_code(130)
            .stderr_has(&format!("continue with: settle resume {id}"));
        let v = out.json();
        let moved = v["redriven"].as_u64().unwrap();
        assert!(moved > 0 && moved < failed, "cut off part-way: {v}");
    }
    let status = env.status(&id);
    assert_eq!(status["status"], "running", "{status}");
    assert_eq!(status["redrive"]["complete"], false, "{status}");

    let mut args = vec!["resume", id.as_str(), "--json"];
    args.extend(FAST);
    let out = Watched::start(&env, &args).finish();
    out.expect_code(0);
    let done = out.json();
    assert_run(&done, "succeeded", N as u64, N as u64, 0, 0);
    assert_eq!(done["redrive"]["complete"], true, "{done}");
    assert_eq!(env.status(&id)["redrive"], Value::Null);
    assert_eq!(env.show(&id, "i00001")["attempts"], 4);
}

/// One after the other: two runs at once would slow the emulator past the
/// commands' time limit.
#[test]
fn aws_a_redrive_stopped_or_killed_while_it_moves_is_finished_by_resume() {
    aws_redrive_cut_while_it_moves("INT");
    aws_redrive_cut_while_it_moves("KILL");
}

/// A redrive of named items cut off keeps exactly those items as its
/// scope: the resume moves the rest of them and no other failed item.
#[test]
fn a_resumed_redrive_of_named_items_moves_only_those() {
    let env = Env::new();
    let items = half_retryable(&env, 40);
    let id = run_id(&env.run(&items, &[]));
    let mut args = vec![
        "redrive",
        id.as_str(),
        "--json",
        "--item",
        "i00001",
        "--item",
        "i00003",
    ];
    args.extend(FAST);
    args.extend(SLOW);
    let mut redrive = Watched::start(&env, &args);
    redrive.wait_for("Redriving 2 items");
    redrive.signal("KILL");
    redrive.finish();
    let status = env.status(&id);
    assert_eq!(
        status["redrive"]["scope"],
        json!([{"items": ["i00001", "i00003"]}]),
        "{status}"
    );
    let mut args = vec!["resume", id.as_str(), "--json"];
    args.extend(FAST);
    let done = env.ok_json(&args);
    assert_run(&done, "partial", 40, 22, 18, 0);
    assert_eq!(done["redrive"]["complete"], true, "{done}");
    assert_eq!(env.show(&id, "i00001")["status"], "succeeded");
    assert_eq!(env.show(&id, "i00005")["attempts"], 3, "not in the scope");
}

#[test]
fn a_redrive_that_cannot_move_an_item_says_so_and_exits_3() {
    let env = Env::new();
    let items = env.scripts("i.jsonl", &[("a", "retryable:3"), ("b", "retryable:3")]);
    let id = run_id(&env.run(&items, &[]));
    // Another pass over the DLQ holds one of the two messages hidden.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let e = settle_embedded::Embedded::open(&env.db()).await.unwrap();
        let got = e
            .backend()
            .dlq
            .receive(1, Duration::from_secs(600))
            .await
            .unwrap();
        assert_eq!(got.len(), 1);
    });
    let mut args = vec!["redrive", id.as_str(), "--json"];
    args.extend(FAST);
    let out = env.settle(&args);
    out.expect_code(3)
        .stderr_has("1 failed item has no message in the dead-letter queue")
        .stderr_has(&format!("settle resume {id} waits for them"));
    let v = out.json();
    // The redrive stays unfinished, and so does the run, until a resume
    // has moved the hidden one too.
    assert_run_extra(&v, &REDRIVE_KEYS, "running", 2, 1, 1, 0);
    assert_eq!(
        v["redrive"],
        json!({"complete": false, "scope": [{}]}),
        "{v}"
    );
    assert_eq!(
        (
            v["redriven"].clone(),
            v["not_moved"].clone(),
            v["complete"].clone()
        ),
        (json!(1), json!(1), json!(false))
    );
}

#[test]
fn sigterm_stops_run_and_resume_cleanly() {
    const N: usize = 600;
    let env = Env::new();
    let items = half_retryable(&env, N);
    let mut args = vec!["run", "--items", items.as_str(), "--json"];
    args.extend(FAST);
    args.extend(SLOW);
    let mut run = Watched::start(&env, &args);
    run.wait_for("started");
    std::thread::sleep(Duration::from_millis(300));
    run.signal("TERM");
    let out = run.finish();
    let v = out.json();
    let id = run_id(&v);
    out.expect_code(143)
        .stderr_has("interrupted by SIGTERM")
        .stderr_has(&format!("continue with: settle resume {id}"));
    assert_eq!(v["status"], "running", "{v}");

    let mut resume = vec!["resume", id.as_str(), "--json"];
    resume.extend(FAST);
    resume.extend(SLOW);
    let mut again = Watched::start(&env, &resume);
    again.wait_for("Resuming run");
    std::thread::sleep(Duration::from_millis(300));
    again.signal("TERM");
    let out = again.finish();
    out.expect_code(143)
        .stderr_has("interrupted by SIGTERM")
        .stderr_has(&format!("continue with: settle resume {id}"));
    assert_eq!(out.json()["status"], "running");

    let mut resume = vec!["resume", id.as_str(), "--json"];
    resume.extend(FAST);
    let done = env.ok_json(&resume);
    assert_run(&done, "partial", N as u64, N as u64 / 2, N as u64 / 2, 0);
    assert_eq!(queues(&env), (0, 0, N as u64 / 2));
}

#[test]
fn sigint_and_sigterm_stop_a_dispatch_cleanly() {
    // Enough that a dispatch takes a while: about 0.7 s in a debug build.
    const N: usize = 100_000;
    for signal in ["INT", "TERM"] {
        let env = Env::new();
        let text: String = (0..N).map(|i| format!("{{\"id\":\"d{i}\"}}\n")).collect();
        let items = env.write("items.jsonl", text);
        env.settle(&["load", "--items", &items]).expect_code(0);
        let args = ["dispatch", "--json"];
        let mut dispatch = Watched::start(&env, &args);
        dispatch.wait_for("Dispatching run");
        dispatch.signal(signal);
        let out = dispatch.finish();
        let v = out.json();
        let id = run_id(&v);
        let (code, name) = if signal == "INT" {
            (130, "SIGINT")
        } else {
            (143, "SIGTERM")
        };
        out.expect_code(code)
            .stderr_has(&format!("interrupted by {name}"))
            .stderr_has("dispatch unfinished")
            .stderr_has(&format!("continue with: settle resume {id}"));
        assert_eq!(v["status"], "running", "{v}");
        let mut resume = vec!["resume", id.as_str(), "--json"];
        resume.extend(FAST);
        let done = env.ok_json(&resume);
        assert_run(&done, "succeeded", N as u64, N as u64, 0, 0);
        assert_eq!(queues(&env), (0, 0, 0));
    }
}

#[test]
fn sigint_stops_a_load_with_nothing_loaded() {
    let env = Env::new();
    let args = ["load", "--items", "-", "--json"];
    let mut child = env
        .command(&args)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for i in 0..100 {
        writeln!(stdin, "{{\"id\":\"l{i}\"}}").unwrap();
    }
    stdin.flush().unwrap();
    let load = Watched::from_child(child, &args);
    // The load now waits for more input, its signal handlers in place.
    std::thread::sleep(Duration::from_millis(500));
    load.signal("INT");
    std::thread::sleep(Duration::from_millis(200));
    writeln!(stdin, "{{\"id\":\"last\"}}").unwrap();
    drop(stdin);
    let out = load.finish();
    out.expect_code(130)
        .stderr_has("interrupted by SIGINT: nothing of stdin was loaded");
    env.settle(&["dispatch", "--json"])
        .expect_code(2)
        .stderr_has("nothing is pending");
}

/// A run's JSON says whether a redrive is in flight, and a settled run's
/// human summary points to redrive, an unsettled one's to resume.
#[test]
fn a_settled_run_points_to_redrive_and_not_to_resume() {
    let env = Env::new();
    let items = env.scripts("i.jsonl", &[("a", "ok"), ("b", "permanent")]);
    let id = run_id(&env.run(&items, &[]));
    let out = env.settle(&["status", &id]);
    out.expect_code(0);
    assert!(out
        .stdout
        .contains(&format!("Retry them: settle redrive {id}")));
    assert!(!out.stdout.contains("settle resume"), "{}", out.stdout);
    let v: Value = env.status(&id);
    assert_eq!(v["redriving"], false);
}

/// An `--exec` processor that ignores SIGTERM, leaves a grandchild behind
/// (a `sleep` whose argument is a token unique to the test, its marker in
/// /proc) and hangs: only SIGKILL of its whole group ends it. Returns the
/// items file, the `--exec` command and the marker.
fn stubborn_exec(env: &Env) -> (String, String, String) {
    let marker = format!(
        "300.{}{:09}",
        std::process::id(),
        fastrand::u32(..1_000_000_000)
    );
    let script = env.write(
        "stubborn.sh",
        format!("trap '' TERM\nsleep {marker} &\necho started >&2\nsleep 30\n"),
    );
    let items = env.scripts("items.jsonl", &[("a", "ok")]);
    (items, format!("sh {script}"), marker)
}

/// The processes whose command line holds `marker` (zombies have none).
fn marked(marker: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(marker) {
            pids.push(pid);
        }
    }
    pids
}

/// Waits until a process holding `marker` runs: the attempt has started.
fn wait_marked(marker: &str) {
    for _ in 0..600 {
        if !marked(marker).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the attempt never started its grandchild");
}

/// Asserts that no process holding `marker` is alive within `within`.
fn assert_none_marked(marker: &str, within: Duration, when: &str) {
    let started = std::time::Instant::now();
    loop {
        let left = marked(marker);
        if left.is_empty() {
            return;
        }
        if started.elapsed() >= within {
            // Not left behind for the next test run.
            for pid in &left {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            panic!("{when}: processes of an attempt outlived Settle: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stubborn_run<'a>(items: &'a str, exec: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run", "--items", items, "--exec", exec, "--json"];
    args.extend(FAST);
    args.extend(extra);
    args
}

#[test]
fn an_attempt_that_timed_out_does_not_outlive_the_run() {
    let env = Env::new();
    let (items, exec, marker) = stubborn_exec(&env);
    // One receive: the run ends right after the attempt's timeout.
    let out = env.settle(&stubborn_run(&items, &exec, &["--max-receives", "1"]));
    out.expect_code(0);
    assert_run(&out.json(), "failed", 1, 0, 1, 0);
    assert_none_marked(&marker, Duration::ZERO, "after the run");
}

#[test]
fn sigint_ends_the_attempts_processes_before_settle_exits() {
    let env = Env::new();
    let (items, exec, marker) = stubborn_exec(&env);
    let args = stubborn_run(&items, &exec, &[]);
    let mut run = Watched::start(&env, &args);
    run.wait_for("started");
    wait_marked(&marker);
    run.signal("INT");
    let out = run.finish();
    out.expect_code(130).stderr_has("interrupted by SIGINT");
    assert_none_marked(&marker, Duration::ZERO, "after SIGINT");
}

#[test]
fn a_second_sigint_reports_once_and_ends_the_attempts_processes() {
    let env = Env::new();
    let (items, exec, marker) = stubborn_exec(&env);
    let args = stubborn_run(&items, &exec, &[]);
    let mut run = Watched::start(&env, &args);
    run.wait_for("started");
    wait_marked(&marker);
    run.signal("INT");
    // The clean stop waits for the attempt in flight (its timeout is 2.5 s).
    run.wait_for("stopping cleanly");
    run.signal("INT");
    let out = run.finish();
    out.expect_code(130).stderr_has("SIGINT: stopping now");
    let lines: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one JSON object on stdout: {:?}",
        out.stdout
    );
    let v = out.json();
    let id = run_id(&v);
    assert_eq!(
        v,
        json!({
            "interrupted": true,
            "forced": true,
            "run_id": id,
            "resume": format!("settle resume {id}"),
        })
    );
    out.stderr_has(&format!("continue with: settle resume {id}"));
    assert_none_marked(&marker, Duration::ZERO, "after a second SIGINT");
}

#[test]
fn a_second_sigint_without_json_says_how_to_resume() {
    let env = Env::new();
    let (items, exec, marker) = stubborn_exec(&env);
    let mut args = stubborn_run(&items, &exec, &[]);
    args.retain(|a| *a != "--json");
    let mut run = Watched::start(&env, &args);
    run.wait_for("started");
    wait_marked(&marker);
    run.signal("INT");
    run.wait_for("stopping cleanly");
    run.signal("INT");
    let out = run.finish();
    out.expect_code(130)
        .stderr_has("SIGINT: stopping now; continue with: settle resume r");
    assert_eq!(out.stdout, "", "nothing on stdout");
    assert_none_marked(&marker, Duration::ZERO, "after a second SIGINT");
}

#[test]
fn the_attempts_processes_end_within_5_s_of_a_sigkill_of_settle() {
    let env = Env::new();
    let (items, exec, marker) = stubborn_exec(&env);
    let args = stubborn_run(&items, &exec, &[]);
    let mut run = Watched::start(&env, &args);
    run.wait_for("started");
    wait_marked(&marker);
    run.signal("KILL");
    let out = run.finish();
    assert_eq!(out.code, 128 + 9, "{out:?}");
    assert_none_marked(&marker, Duration::from_secs(5), "after SIGKILL");
}

/// SIGTERM during `results -o FILE` removes the partial file and leaves
/// FILE as it was.
#[test]
fn a_stopped_results_export_leaves_no_partial_file() {
    let env = Env::new();
    // Enough items that the export takes a while (some 100 ms per 5,000).
    let n = 60_000;
    let lines: String = (0..n).map(|i| format!("{{\"id\":\"i{i}\"}}\n")).collect();
    let items = env.write("i.jsonl", lines);
    let run = run_id(&env.run(&items, &[]));
    let out = env.path("out.jsonl");
    std::fs::write(&out, "old\n").unwrap();
    let args = ["results", run.as_str(), "-o", "out.jsonl"];
    let child = env.spawn(&args);
    let partial = env.path(&format!(".out.jsonl.{}.partial", child.id()));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !partial.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no partial file appeared"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let done = wait(child, &args);
    done.expect_code(143)
        .stderr_has("interrupted by SIGTERM: out.jsonl was not written");
    assert!(!partial.exists(), "{} is left", partial.display());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "old\n");
}
