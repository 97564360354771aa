//! The fault simulation on the embedded backend: a few seeds in the test
//! suite (`make soak` runs many more).

mod common;

use settle_conformance::sim;
use settle_embedded::SAFETY_RECEIVES;

/// The simulated runs use max receives 4; the queue's own limit sits above
/// it by the safety margin, as `settle run` sets it.
async fn fresh() -> settle_conformance::Subject {
    common::fresh(4 + SAFETY_RECEIVES).await
}

fn quiet_contained_panics() {
    std::panic::set_hook(Box::new(|info| {
        if !settle_core::work::in_processor() {
            eprintln!("{info}");
        }
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_never_lose_or_double_count_an_item() {
    quiet_contained_panics();
    let seeds: Vec<u64> = if let Ok(one) = std::env::var("SETTLE_SIM_SEED") {
        vec![one.parse().expect("SETTLE_SIM_SEED is a number")]
    } else {
        match std::env::var("SETTLE_SIM_SEEDS") {
            Ok(v) => {
                let n: u64 = v.parse().expect("SETTLE_SIM_SEEDS is a number");
                (1..=n).collect()
            }
            Err(_) => vec![1, 2, 3],
        }
    };
    let items: u64 = std::env::var("SETTLE_SIM_ITEMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut totals = sim::SimTotals::default();
    for seed in &seeds {
        let report = sim::simulate(&fresh().await, *seed, items, 0.03).await;
        eprintln!("{report}");
        totals.add(&report);
    }
    eprintln!("simulation (embedded): {totals}");
}
