//! `settle generate`: scripted items for the demo and the benchmark.

use crate::cli::Mix;
use std::io::Write;

/// Writes `count` items of `mix` to `out`, the same file for the same seed.
pub fn generate(out: &mut impl Write, count: u64, mix: Mix, seed: u64) -> std::io::Result<()> {
    let mut rng = fastrand::Rng::with_seed(seed);
    for i in 1..=count {
        let roll = rng.u32(0..1000);
        match mix {
            Mix::Bench => {
                let script = if roll < 100 { "permanent" } else { "ok" };
                writeln!(
                    out,
                    r#"{{"id":"item-{i:08}","payload":{{"script":"{script}"}}}}"#
                )?;
            }
            Mix::Demo => {
                // Subscription renewals: most succeed; some cards decline (permanent),
                // some gateways time out and recover on retry, a few items crash the
                // processor, a few are slow, and a handful outlast every retry.
                let script = match roll {
                    0..=879 => "ok",
                    880..=929 => "retryable:1",
                    930..=949 => "retryable:2",
                    950..=979 => "permanent",
                    980..=984 => "panic",
                    985..=989 => "retryable:4",
                    990..=997 => "sleep:50",
                    _ => "teleport",
                };
                let cents = 499 + rng.u32(0..50) * 100;
                writeln!(
                    out,
                    r#"{{"id":"sub-{i:06}","payload":{{"user":"user-{i:06}","plan":"monthly","amount_cents":{cents},"script":"{script}"}}}}"#
                )?;
            }
        }
    }
    out.flush()
}
