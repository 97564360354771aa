//! The seeded fault simulation on the AWS backend (moto), with the same
//! fault-injecting decorators as on the embedded one. The emulator is slow,
//! so the suite runs one seed of 100 items; `SETTLE_SIM_SEEDS=N` and
//! `SETTLE_SIM_ITEMS=N` run more.

mod common;

use settle_conformance::sim;
use std::time::Duration;

/// Runs use max receives 4; the queue dead-letters 3 receives later, as
/// the template's defaults do (3 attempts, maxReceiveCount 6).
const QUEUE_LIMIT: u32 = 4 + 3;

/// Each attempt makes idempotency store calls, which on the emulator wait
/// behind this process's transactions (see `ddb::emulator_lock`): 500 ms,
/// the embedded simulation's timeout, would time attempts out there.
const ITEM_TIMEOUT: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_never_lose_or_double_count_an_item_on_aws() {
    std::panic::set_hook(Box::new(|info| {
        if !settle_core::work::in_processor() {
            eprintln!("{info}");
        }
    }));
    let seeds: Vec<u64> = match std::env::var("SETTLE_SIM_SEED") {
        Ok(one) => vec![one.parse().expect("SETTLE_SIM_SEED is a number")],
        Err(_) => {
            let n: u64 = std::env::var("SETTLE_SIM_SEEDS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            (1..=n).collect()
        }
    };
    let items: u64 = std::env::var("SETTLE_SIM_ITEMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let mut totals = sim::SimTotals::default();
    for &seed in &seeds {
        let report = sim::simulate_with(
            &common::fresh(QUEUE_LIMIT).await,
            seed,
            items,
            0.03,
            ITEM_TIMEOUT,
        )
        .await;
        eprintln!("{report}");
        totals.add(&report);
    }
    eprintln!("simulation on AWS (moto): {totals}");
}
