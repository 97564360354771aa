//! Which processor does a run's work: the one named on the command line,
//! else the one the run recorded when it started; and how many items it
//! works on at once by default.

use crate::cli::{ProcessArgs, ProcessorArgs, Protocol};
use crate::commands::input;
use anyhow::Result;
use settle_core::processor::EXIT_PERMANENT;
use settle_core::{ExecProtocol, Processor, ProcessorSpec, RunRecord};
use std::sync::Arc;

/// What a run is refused with when nothing names its processor.
pub const NO_PROCESSOR: &str = "no processor: name what does each item's work with \
    --exec CMD (a command per item), --exec CMD --protocol jsonl (long-lived processes \
    answering JSON lines), --http URL (an endpoint), or --processor scripted (the built-in \
    test processor, which follows payload.script)";

/// The processor named by the flags; else the binary's own, if it has one.
pub fn named(args: &ProcessorArgs) -> Result<Option<ProcessorSpec>> {
    let library = crate::LIBRARY.get().map(|l| l.name.as_str());
    if let Some(name) = &args.processor {
        return match name.as_str() {
            "scripted" => Ok(Some(ProcessorSpec::Scripted)),
            n if Some(n) == library => Ok(Some(ProcessorSpec::Library { name: n.to_owned() })),
            n => Err(input(format!(
                "--processor {n:?}: no such processor; this binary has {}",
                match library {
                    Some(l) => format!("`scripted` and `{l}`"),
                    None => "only `scripted` (use --exec or --http for your own)".into(),
                }
            ))),
        };
    }
    if let Some(command) = &args.exec {
        return Ok(Some(ProcessorSpec::Exec {
            command: command.clone(),
            protocol: match args.protocol {
                Some(Protocol::Jsonl) => ExecProtocol::Jsonl,
                Some(Protocol::PerItem) | None => ExecProtocol::PerItem,
            },
            permanent_exit_codes: args
                .permanent_exit_codes
                .clone()
                .unwrap_or_else(|| vec![EXIT_PERMANENT]),
        }));
    }
    if let Some(url) = &args.http {
        let headers = args
            .http_headers
            .iter()
            .map(|h| settle_processors::parse_header(h).map_err(|e| input(e.to_string())))
            .collect::<Result<_>>()?;
        return Ok(Some(ProcessorSpec::Http {
            url: url.clone(),
            headers,
        }));
    }
    Ok(library.map(|name| ProcessorSpec::Library {
        name: name.to_owned(),
    }))
}

/// The processor that continues `run`: the one named, else the run's own.
/// Naming another than the run's is allowed (a fixed version, say) and
/// said on stderr.
pub fn for_run(run: &RunRecord, args: &ProcessorArgs) -> Result<ProcessorSpec> {
    let recorded = run.config.processor.as_ref();
    match (named(args)?, recorded) {
        (Some(spec), Some(own)) if &spec != own => {
            eprintln!(
                "note: processing run {} with {} rather than its own {}",
                run.id,
                spec.describe(),
                own.describe()
            );
            Ok(spec)
        }
        (Some(spec), _) => Ok(spec),
        (None, Some(own)) => Ok(own.clone()),
        (None, None) => Err(input(format!(
            "run {} has no recorded processor; {NO_PROCESSOR}",
            run.id
        ))),
    }
}

/// A processor ready to run, and the worker batches to keep in flight for it.
pub struct Chosen {
    pub processor: Arc<dyn Processor>,
    /// Worker batches the local runner processes at once.
    pub batches: usize,
    /// Items worked on at once across those batches (`--concurrency`).
    pub items: usize,
}

impl std::fmt::Debug for Chosen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chosen")
            .field("batches", &self.batches)
            .field("items", &self.items)
            .finish_non_exhaustive()
    }
}

/// Items at once when `--concurrency` is not given.
fn default_items(spec: &ProcessorSpec) -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    match spec {
        // The scripted processor costs nothing: enough batches in flight
        // to keep the embedded engine's writer busy (make bench).
        ProcessorSpec::Scripted => 640,
        // A process per item in flight: user commands mostly wait on the
        // network, so more than one per core, but not so many that a
        // CPU-bound command thrashes.
        ProcessorSpec::Exec {
            protocol: ExecProtocol::PerItem,
            ..
        } => 4 * cores,
        // Processes that say hello take many items each (the helpers: an
        // event loop, a thread pool), and enough items in flight hide the
        // pipe round trips of a fast handler (make bench-jsonl: 26k items/s
        // at 64, 35k at 256, 32k at 512); those that take one at a time are
        // held to `default_processes`.
        ProcessorSpec::Exec {
            protocol: ExecProtocol::Jsonl,
            ..
        } => 256,
        // Requests in flight over a keep-alive pool.
        ProcessorSpec::Http { .. } => 64,
        ProcessorSpec::Library { .. } => crate::LIBRARY.get().map_or(64, |l| l.concurrency),
    }
}

/// Processes at once for one-at-a-time jsonl processes when `--concurrency`
/// is not given: as many as `--exec` runs, for the same reason.
fn default_processes() -> usize {
    4 * std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Builds the processor, refusing a bad command, URL or header as input.
pub fn build(spec: &ProcessorSpec, args: &ProcessArgs) -> Result<Chosen> {
    let items = args
        .concurrency
        .map_or_else(|| default_items(spec), |n| n as usize);
    let parallelism = settle_processors::Parallelism {
        items,
        processes: args
            .concurrency
            .map_or_else(default_processes, |n| n as usize),
    };
    let processor = match (spec, crate::LIBRARY.get()) {
        (ProcessorSpec::Library { name }, Some(l)) if *name == l.name => l.processor.clone(),
        _ => settle_processors::build(spec, parallelism).map_err(|e| input(e.to_string()))?,
    };
    let batch = args.batch_size.max(1) as usize;
    // Every item of the batches in flight can run at once; a batch beyond
    // that keeps the processor busy while finished batches are reported.
    let mut batches = items.div_ceil(batch);
    if !matches!(spec, ProcessorSpec::Scripted) {
        batches += 1;
    }
    Ok(Chosen {
        processor,
        batches: batches.max(1),
        items,
    })
}
