//! A user's own processor in Rust, with the whole `settle` CLI around it:
//!
//!     cargo run -p settle-example-renewals -- run --items renewals.jsonl
//!     renewals failures RUN; renewals show RUN ITEM; renewals redrive RUN
//!
//! The processor is in src/lib.rs.

use settle_example_renewals::Renewals;

fn main() -> std::process::ExitCode {
    settle_cli::Settle::new()
        .processor("renewals", Renewals)
        .main()
}
