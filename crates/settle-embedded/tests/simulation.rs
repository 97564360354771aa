//! The fault simulation on the embedded backend. Deterministic runs (the
//! engine inline, a current-thread runtime with paused time) cover many
//! seeds and replay exactly; a few real-time runs on the writer thread and a
//! multi-threaded runtime cover the interleavings those cannot produce.
//! `make soak` runs 1,000 deterministic seeds.
//!
//! Environment: SETTLE_SIM_SEED=N replays one seed; SETTLE_SIM_SEEDS=N runs
//! seeds 1 to N; SETTLE_SIM_ITEMS sets the items per seed (300).

mod common;

use settle_conformance::sim::{self, SimReport, SimTotals};
use settle_embedded::SAFETY_RECEIVES;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

/// The fault rate per call, of each kind.
const RATE: f64 = 0.03;

/// The simulated runs use max receives 4; the queue's own limit sits above
/// it by the safety margin, as `settle run` sets it.
const WORK_MAX_RECEIVES: u32 = 4 + SAFETY_RECEIVES;

fn quiet_contained_panics() {
    std::panic::set_hook(Box::new(|info| {
        if !settle_core::work::in_processor() {
            eprintln!("{info}");
        }
    }));
}

fn env_u64(name: &str) -> Option<u64> {
    // Empty is unset: `make soak` passes SEED through as it is.
    std::env::var(name).ok().filter(|v| !v.is_empty()).map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}"))
    })
}

fn seeds(default: &[u64]) -> Vec<u64> {
    match (env_u64("SETTLE_SIM_SEED"), env_u64("SETTLE_SIM_SEEDS")) {
        (Some(one), _) => vec![one],
        (None, Some(n)) => (1..=n).collect(),
        (None, None) => default.to_vec(),
    }
}

fn items() -> u64 {
    env_u64("SETTLE_SIM_ITEMS").unwrap_or(300)
}

/// One deterministic seed; a failure says how to replay it.
fn deterministic(seed: u64, items: u64) -> SimReport {
    let run = || {
        sim::simulate_deterministic(seed, items, RATE, || {
            common::fresh_with(WORK_MAX_RECEIVES, true)
        })
    };
    catch_unwind(AssertUnwindSafe(run)).unwrap_or_else(|panic| {
        eprintln!(
            "seed {seed} failed; replay it exactly with:\n  \
             SETTLE_SIM_SEED={seed} SETTLE_SIM_ITEMS={items} \
             cargo test -p settle-embedded --test simulation faults_never -- --nocapture"
        );
        resume_unwind(panic)
    })
}

#[test]
fn faults_never_lose_or_double_count_an_item() {
    quiet_contained_panics();
    let items = items();
    let mut totals = SimTotals::default();
    for seed in seeds(&(1..=8).collect::<Vec<_>>()) {
        let report = deterministic(seed, items);
        eprintln!("{report}");
        totals.add(&report);
    }
    eprintln!("simulation (embedded, deterministic): {totals}");
}

#[test]
fn a_seed_replays_exactly() {
    quiet_contained_panics();
    let first = deterministic(11, 150);
    let again = deterministic(11, 150);
    assert_eq!(first, again, "the same seed must replay exactly");
    // Not equal by being empty: the trace holds every call and delivery.
    assert!(first.trace.events > 1_000, "{first}");
    assert!(first.faults > 0, "{first}");
    let other = deterministic(12, 150);
    assert_ne!(first.trace, other.trace, "another seed, another run");
}

/// Real time: group commits on the writer thread, two runtime threads, and
/// so interleavings the deterministic runs cannot produce. Not replayable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_under_real_concurrency_never_lose_or_double_count_an_item() {
    quiet_contained_panics();
    let mut totals = SimTotals::default();
    for seed in [101, 102] {
        let subject = common::fresh(WORK_MAX_RECEIVES).await;
        let report = sim::simulate(&subject, seed, items(), RATE).await;
        eprintln!("{report}");
        totals.add(&report);
    }
    eprintln!("simulation (embedded, real time): {totals}");
}
