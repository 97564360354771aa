//! `settle`: run a batch on this machine, inspect runs, redrive failures.

mod cli;
mod commands;
mod deployment;
mod generate;
mod process;
mod report;

use clap::Parser;
use std::process::ExitCode;

/// mimalloc rather than the system allocator: buffers allocated on one
/// thread (the runtime's) and freed on another (the database writer's) are
/// the common case here, and glibc's arenas make such frees costly.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_tracing(cli.verbose);
    quiet_contained_panics();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(commands::execute(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            // Bad input (a file, a flag, an unknown id) exits 2; anything else 1.
            if e.downcast_ref::<commands::InputError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "warn,settle_core=info,settle_embedded=info,settle=info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// A panic inside a processor is caught and recorded as that item's error;
/// printing it too would bury the progress bar. Other panics print as usual.
fn quiet_contained_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if settle_core::work::in_processor() {
            tracing::debug!(%info, "processor panicked; contained to its item");
        } else {
            default(info);
        }
    }));
}
