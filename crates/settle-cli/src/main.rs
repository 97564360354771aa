//! `settle`: run a batch on this machine, inspect runs, redrive failures.

use std::process::ExitCode;

/// mimalloc rather than the system allocator: buffers allocated on one
/// thread (the runtime's) and freed on another (the database writer's) are
/// the common case here, and glibc's arenas make such frees costly.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    settle_cli::Settle::new().main()
}
