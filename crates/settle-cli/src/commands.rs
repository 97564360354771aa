//! One function per subcommand.

use crate::cli::{BackendKind, Cli, Command, ProcessArgs, RunArgs, RunSettings, Workers};
use crate::deployment::Deployment;
use crate::fresh::Fresh;
use crate::process::{process, Finish, Until};
use crate::processors;
use crate::report;
use crate::signals::{Signal, Stop};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use settle_core::domain::now_millis;
use settle_core::flow::FlowLimits;
use settle_core::jsonl::JsonlItems;
use settle_core::ports::LoadError;
use settle_core::redrive::{self, RedriveError};
use settle_core::{dispatch, reconcile};
use settle_core::{ItemId, ProcessorSpec, RunConfig, RunId, RunRecord};
use std::collections::BTreeSet;
use std::io::{BufRead, Read};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Bad input from the user: exits 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

pub fn input(msg: impl Into<String>) -> anyhow::Error {
    InputError(msg.into()).into()
}

/// A command stopped by a signal before it changed anything: exits 130
/// (SIGINT) or 143 (SIGTERM).
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {}: {what}", signal.name())]
pub struct Interrupted {
    pub signal: Signal,
    pub what: String,
}

pub async fn execute(cli: Cli) -> Result<ExitCode> {
    if let Command::Generate { count, mix, seed } = cli.command {
        let stdout = std::io::stdout();
        crate::generate::generate(
            &mut std::io::BufWriter::new(stdout.lock()),
            count,
            mix,
            seed,
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Run(args) = &cli.command {
        // A run's processor is checked before anything is created, the
        // database included.
        let local = cli.backend == BackendKind::Embedded || cli.workers == Some(Workers::Local);
        match processors::named(&args.process.processor)? {
            Some(spec) => {
                processors::build(&spec, &args.process)?;
            }
            None if local => return Err(input(processors::NO_PROCESSOR)),
            None => {}
        }
    }
    if matches!(cli.command, Command::Ui(_)) {
        let d = std::sync::Arc::new(Deployment::open(&cli).await?);
        let Command::Ui(args) = cli.command else {
            unreachable!("matched above")
        };
        let stop = Stop::install(false).context("cannot handle SIGINT and SIGTERM")?;
        let code = crate::ui::serve(d.clone(), args, stop).await;
        d.close().await;
        return code;
    }
    // A missing items file is refused before the database is created; it
    // is opened once (a named pipe cannot be opened twice).
    let items = match &cli.command {
        Command::Run(RunArgs { items, .. }) | Command::Load { items, .. } => {
            Some(Items::open(items)?)
        }
        _ => None,
    };
    // Removed again if the command fails with nothing in it (see `Fresh`).
    let fresh = if cli.backend == BackendKind::Embedded && cli.command.creates_database() {
        Fresh::before(&cli.db)
    } else {
        None
    };
    let d = match Deployment::open(&cli).await {
        Ok(d) => d,
        Err(e) => {
            if let Some(fresh) = fresh {
                fresh.remove_dirs();
            }
            return Err(e);
        }
    };
    // The commands that write take over SIGINT and SIGTERM to stop cleanly;
    // the others die of them as usual.
    let stop = match cli.command {
        Command::Run(_)
        | Command::Load { .. }
        | Command::Dispatch { .. }
        | Command::Resume { .. }
        | Command::Redrive { .. }
        // It removes its partial file before it goes.
        | Command::Results { output: Some(_), .. } => {
            Stop::install(cli.command.json()).context("cannot handle SIGINT and SIGTERM")?
        }
        _ => Stop::never(),
    };
    let writes = !cli.command.read_only();
    let code = command(&d, cli.command, items, &stop).await;
    if writes {
        // A read-only command's checkpoint would only take the write lock
        // from a run it is watching, for nothing of its own.
        d.close().await;
    }
    if let Some(path) = &cli.report_calls {
        let report = json!({
            "calls": d.call_counts(),
            "dynamodb_units": d.capacity(),
        });
        std::fs::write(path, format!("{report}\n"))
            .with_context(|| format!("cannot write the call report to {}", path.display()))?;
    }
    if let (Err(_), Some(fresh)) = (&code, fresh) {
        fresh.remove_if_empty(&d).await;
    }
    code
}

async fn command(
    d: &Deployment,
    command: Command,
    items: Option<Items>,
    stop: &Stop,
) -> Result<ExitCode> {
    let items = || items.ok_or_else(|| anyhow::anyhow!("the items were not opened"));
    match command {
        Command::Run(args) => run(d, args, items()?, stop).await,
        Command::Load { items: path, json } => {
            let n = load(d, items()?, None, stop).await?;
            emit(
                json,
                json!({ "loaded": n, "pending": d.backend.source.pending().await? }),
                || format!("Loaded {n} items from {}\n", path.display()),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Dispatch {
            run,
            processor,
            json,
        } => {
            let spec = processors::named(&processor)?;
            if d.backend.source.pending().await? == 0 {
                return Err(input(
                    "nothing is pending: load items first (settle load --items FILE)",
                ));
            }
            let record = new_run(d, &run, spec).await?;
            stop.set_run(&record.id);
            eprintln!("Dispatching run {}", record.id);
            let b = &d.backend;
            let dispatched = dispatch::dispatch(
                b.source.as_ref(),
                b.ledger.as_ref(),
                b.work.as_ref(),
                &record.id,
                None,
                false,
            );
            // Dispatch saves its progress page by page: cut off anywhere, a
            // resume goes on from the last page saved (a resent message is
            // counted once).
            tokio::select! {
                res = dispatched => { res?; }
                signal = stop.stopped() => {
                    return finish(d, Finish::Interrupted(get_run(d, &record.id).await?, signal), json, None).await;
                }
            }
            let record = get_run(d, &record.id).await?;
            emit(json, report::run_json(&record), || {
                format!("Dispatched run {} with {} items\n", record.id, record.total)
            });
            Ok(ExitCode::SUCCESS)
        }
        Command::Resume {
            run_id,
            process: p,
            json,
        } => resume(d, run_id.as_deref(), &p, json, stop).await,
        Command::Status { run_id, json } => {
            let run = resolve(d, run_id.as_deref()).await?;
            let parked = d.backend.results_dlq.depth().await?.total();
            if parked > 0 {
                // Only undecodable results should land there; any other is an
                // outcome the tally has not heard of.
                eprintln!(
                    "warning: {parked} messages are parked in the results dead-letter queue; \
                     their outcomes are not in any tally"
                );
            }
            let first = first_failures(d, &run, json).await?;
            emit(json, report::run_json(&run), || {
                report::run_human(&run, &first, None)
            });
            Ok(ExitCode::SUCCESS)
        }
        Command::Failures { run_id, json } => {
            let run = resolve(d, Some(&run_id)).await?;
            let all = all_failures(d, &run.id).await?;
            emit(json, report::failures_json(&run, &all), || {
                report::failures_human(&run, &all)
            });
            Ok(ExitCode::SUCCESS)
        }
        Command::Redrive {
            run_id,
            items,
            dry_run,
            process: p,
            json,
        } => redrive_cmd(d, &run_id, items, dry_run, &p, json, stop).await,
        Command::Show {
            run_id,
            item_id,
            json,
        } => {
            let run = resolve(d, Some(&run_id)).await?;
            let (id, rec) = item_record(d, &run, &item_id).await?;
            emit(json, report::item_json(&run.id, &id, &rec), || {
                report::item_human(&run.id, &id, &rec)
            });
            Ok(ExitCode::SUCCESS)
        }
        Command::Results {
            run_id,
            status,
            output,
        } => {
            let run = resolve(d, Some(&run_id)).await?;
            let n = crate::results::export(d, &run.id, status, output.as_deref(), stop).await?;
            if let Some(path) = &output {
                eprintln!("Wrote {n} results of run {} to {}", run.id, path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs {
            run_id,
            item_id,
            attempt,
            json,
        } => {
            let run = resolve(d, Some(&run_id)).await?;
            let (id, rec) = item_record(d, &run, &item_id).await?;
            if let Some(n) = attempt {
                if !rec.history.iter().any(|a| a.attempt == n) {
                    return Err(input(format!(
                        "item \"{id}\" of run {} has no attempt {n} (it has {})",
                        run.id, rec.attempts
                    )));
                }
            }
            let value = json!({
                "run_id": run.id,
                "item_id": id,
                "attempts": rec.history.iter()
                    .filter(|a| attempt.is_none_or(|n| a.attempt == n))
                    .map(|a| json!({"attempt": a.attempt, "log": a.log}))
                    .collect::<Vec<_>>(),
            });
            emit(json, value, || report::logs_human(&rec, attempt));
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay {
            run_id,
            item_id,
            processor,
            timeout,
            json,
        } => {
            let run = resolve(d, Some(&run_id)).await?;
            let r = crate::replay::replay(
                d,
                &run,
                &item_id,
                &processor,
                std::time::Duration::from_secs(timeout),
            )
            .await?;
            emit(json, r.value.clone(), || crate::replay::human(&r.value));
            // 4: the item failed again; documented beside the other codes.
            Ok(if r.succeeded {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(4)
            })
        }
        Command::Runs { limit, json } => {
            let runs = d.backend.ledger.runs(limit).await?;
            emit(
                json,
                json!({ "runs": runs.iter().map(report::run_json).collect::<Vec<_>>() }),
                || report::runs_human(&runs),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate { .. } | Command::Ui(_) => unreachable!("handled above"),
    }
}

/// Prints `value` as the last line of stdout with `--json`, else the human text.
fn emit(json: bool, value: Value, human: impl FnOnce() -> String) {
    crate::signals::report(|| {
        if json {
            println!("{value}");
        } else {
            print!("{}", human());
        }
    });
}

async fn run(d: &Deployment, args: RunArgs, items: Items, stop: &Stop) -> Result<ExitCode> {
    // The processor is checked before anything is created.
    let spec = processors::named(&args.process.processor)?;
    let chosen = match (&spec, d.workers) {
        (Some(spec), Workers::Local) => Some(processors::build(spec, &args.process)?),
        (None, Workers::Local) => return Err(input(processors::NO_PROCESSOR)),
        // The deployed worker function brings its own.
        (_, Workers::Deployed) => None,
    };
    let before = d.backend.source.pending().await?;
    d.prepare_for(args.run.max_receives).await?;
    // The run is created with its items, in one step: killed at any moment,
    // `settle run` leaves either nothing or a run that owns all its items.
    let record = dispatch::new_run(run_config(&args.run, spec));
    load(d, items, Some(&record), stop).await?;
    if before > 0 {
        eprintln!("note: {before} items loaded earlier were pending and join this run");
    }
    eprintln!("Run {} started", record.id);
    stop.set_run(&record.id);
    let finished = process(
        d,
        &record.id,
        &args.process,
        chosen.as_ref(),
        Until::Settled,
        false,
        stop,
    )
    .await?;
    if let Finish::Done(settled, ..) = &finished {
        drop_extra_dead_letters(d, settled).await?;
    }
    finish(d, finished, args.json, None).await
}

fn run_config(s: &RunSettings, processor: Option<ProcessorSpec>) -> RunConfig {
    RunConfig {
        max_receives: s.max_receives,
        tolerated_failure_percent: s.tolerated_failure_percent,
        processor,
        flow: FlowLimits {
            rate: s.rate,
            key_rate: s.key_rate,
            key_concurrency: s.key_concurrency,
        },
        key: s.key.clone(),
        max_throttle_wait_s: Some(s.max_throttle_wait.as_secs()),
    }
}

async fn new_run(
    d: &Deployment,
    s: &RunSettings,
    processor: Option<ProcessorSpec>,
) -> Result<RunRecord> {
    d.prepare_for(s.max_receives).await?;
    Ok(dispatch::create_run(d.backend.ledger.as_ref(), run_config(s, processor)).await?)
}

/// The processor for local work on `run`; none with deployed workers,
/// which bring their own.
pub(crate) fn local_processor(
    d: &Deployment,
    run: &RunRecord,
    p: &ProcessArgs,
) -> Result<Option<processors::Chosen>> {
    if d.workers != Workers::Local {
        return Ok(None);
    }
    let spec = processors::for_run(run, &p.processor)?;
    Ok(Some(processors::build(&spec, p)?))
}

/// Loads a JSONL file in one transaction (with `run`, creating that run
/// with its items); a bad line names the file and line.
///
/// A signal stops the reading, and with it the load: nothing is loaded.
async fn load(d: &Deployment, items: Items, run: Option<&RunRecord>, stop: &Stop) -> Result<u64> {
    let Items { name, stdin, raw } = items;
    let reader: Box<dyn BufRead + Send> = Box::new(std::io::BufReader::with_capacity(
        1 << 16,
        StopReader {
            inner: raw,
            stop: stop.clone(),
        },
    ));
    let spinner = indicatif::ProgressBar::new_spinner().with_message(format!("loading {name}"));
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let items = Box::new(JsonlItems::new(reader));
    let res = match run {
        Some(run) => d.backend.source.load_run(run, items).await,
        None => d.backend.source.load(items).await,
    };
    spinner.finish_and_clear();
    if res.is_err() {
        if let Some(signal) = stop.signal() {
            return Err(Interrupted {
                signal,
                what: format!("nothing of {name} was loaded"),
            }
            .into());
        }
    }
    match res {
        // Blank lines are skipped, so "empty" would not always be true.
        Ok(0) => Err(input(format!(
            "{name}: no items ({} has no item lines)",
            if stdin { "the input" } else { "the file" }
        ))),
        Ok(n) => Ok(n),
        Err(LoadError::Line(l)) => Err(input(format!(
            "{name} line {}: {}; nothing was loaded",
            l.line, l.reason
        ))),
        Err(LoadError::Port(p)) => {
            Err(anyhow::Error::new(p).context("loading failed; nothing was loaded"))
        }
    }
}

/// The items of `run` or `load`, opened.
pub(crate) struct Items {
    /// The file's path, or "stdin".
    name: String,
    stdin: bool,
    raw: Box<dyn Read + Send>,
}

impl std::fmt::Debug for Items {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Items").field("name", &self.name).finish()
    }
}

impl Items {
    /// Opens the items file, or stdin for `-`.
    fn open(path: &Path) -> Result<Self> {
        if path == Path::new("-") {
            return Ok(Self {
                name: "stdin".into(),
                stdin: true,
                raw: Box::new(std::io::stdin()),
            });
        }
        let f = std::fs::File::open(path)
            .map_err(|err| input(format!("cannot open items file {}: {err}", path.display())))?;
        Ok(Self {
            name: path.display().to_string(),
            stdin: false,
            raw: Box::new(f),
        })
    }
}

/// A reader that fails once a stop is asked for, which ends a load's
/// transaction with nothing written.
struct StopReader {
    inner: Box<dyn Read + Send>,
    stop: Stop,
}

impl Read for StopReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(signal) = self.stop.signal() {
            return Err(std::io::Error::other(format!(
                "stopped by {}",
                signal.name()
            )));
        }
        self.inner.read(buf)
    }
}

/// One item's ledger row in `run`.
pub(crate) async fn item_record(
    d: &Deployment,
    run: &RunRecord,
    item_id: &str,
) -> Result<(ItemId, settle_core::ItemRecord)> {
    let id = ItemId::new(item_id.to_owned())
        .map_err(|err| input(format!("item id {item_id:?}: {err}")))?;
    let rows = d
        .backend
        .ledger
        .items(&[(run.id.clone(), id.clone())])
        .await?;
    let rec = rows.into_values().next().ok_or_else(|| {
        input(format!(
            "no record of item \"{}\" in run {} (not in the run, or not attempted yet)",
            report::clean(id.as_str()),
            run.id
        ))
    })?;
    Ok((id, rec.value))
}

pub(crate) async fn get_run(d: &Deployment, id: &RunId) -> Result<RunRecord> {
    d.backend
        .ledger
        .run(id)
        .await?
        .ok_or_else(|| input(format!("run {id} not found")))
}

/// The named run, or the latest one.
pub(crate) async fn resolve(d: &Deployment, id: Option<&str>) -> Result<RunRecord> {
    match id {
        Some(s) => {
            let id = RunId::parse(s).map_err(|err| input(err.to_string()))?;
            get_run(d, &id).await
        }
        None => d
            .backend
            .ledger
            .runs(1)
            .await?
            .pop()
            .ok_or_else(|| input(format!("no runs yet in {}", d.describe()))),
    }
}

/// The failures a human summary shows and groups by reason (up to
/// [`report::REASONS_SAMPLE`]); none for `--json`, which does not show them.
async fn first_failures(
    d: &Deployment,
    run: &RunRecord,
    json: bool,
) -> Result<Vec<(ItemId, settle_core::ItemRecord)>> {
    let mut all = Vec::new();
    if json || run.failed == 0 {
        return Ok(all);
    }
    while all.len() < report::REASONS_SAMPLE {
        let page = d
            .backend
            .ledger
            .failures(
                &run.id,
                all.last().map(|(id, _)| id),
                (report::REASONS_SAMPLE - all.len()).min(1000),
            )
            .await?;
        if page.is_empty() {
            break;
        }
        all.extend(page);
    }
    Ok(all)
}

async fn all_failures(
    d: &Deployment,
    run: &RunId,
) -> Result<Vec<(ItemId, settle_core::ItemRecord)>> {
    let mut all = Vec::new();
    loop {
        let page = d
            .backend
            .ledger
            .failures(run, all.last().map(|(id, _)| id), 1000)
            .await?;
        if page.is_empty() {
            return Ok(all);
        }
        all.extend(page);
    }
}

/// An item may have been dead-lettered twice (a dead letter's send failed
/// after it had taken effect, or a killed process had sent it): keeps one
/// copy per failed item. Scans the DLQ only where scans are cheap
/// ([`settle_core::Capabilities::cheap_dlq_scan`]), and only when it holds more
/// messages than the run has failed items.
async fn drop_extra_dead_letters(d: &Deployment, run: &RunRecord) -> Result<()> {
    if !d.backend.capabilities.cheap_dlq_scan || d.backend.dlq.depth().await?.total() <= run.failed
    {
        return Ok(());
    }
    let n = reconcile::drop_extra_dead_letters(d.backend.dlq.as_ref(), &run.id).await?;
    if n > 0 {
        eprintln!(
            "note: deleted {n} extra dead letters of run {} (dead letters sent twice); \
             the DLQ holds one per failed item",
            run.id
        );
    }
    Ok(())
}

async fn finish(
    d: &Deployment,
    f: Finish,
    json: bool,
    extra: Option<serde_json::Map<String, Value>>,
) -> Result<ExitCode> {
    match f {
        Finish::Done(run, took, count) => {
            let first = first_failures(d, &run, json).await?;
            let mut value = report::run_json(&run);
            for (k, v) in extra.into_iter().flatten() {
                value[k] = v;
            }
            emit(json, value, || {
                report::run_human(&run, &first, Some((took, count)))
            });
            Ok(ExitCode::SUCCESS)
        }
        Finish::Interrupted(run, signal) => {
            let dispatching = if run.dispatched {
                ""
            } else {
                " (claimed so far; dispatch unfinished)"
            };
            if run.redrive.is_some() {
                eprintln!(
                    "interrupted by {}: the redrive of run {} is unfinished ({} items succeeded, \
                     {} failed so far); continue with: settle resume {}",
                    signal.name(),
                    run.id,
                    run.succeeded,
                    run.failed,
                    run.id
                );
            } else {
                eprintln!(
                    "interrupted by {}: {} of {} items{dispatching} settled; continue with: settle resume {}",
                    signal.name(),
                    run.succeeded + run.failed,
                    run.total,
                    run.id
                );
            }
            if json {
                let mut value = report::run_json(&run);
                for (k, v) in extra.into_iter().flatten() {
                    value[k] = v;
                }
                crate::signals::report(|| println!("{value}"));
            }
            Ok(signal.exit_code())
        }
        Finish::Throttled(run, waited) => {
            eprintln!(
                "stopped waiting: run {} was throttled for {} with no call answered                  (--max-throttle-wait); {} of {} items settled, the other {} are pending,                  none failed for it; continue with: settle resume {}",
                run.id,
                humantime::format_duration(Duration::from_secs(waited.as_secs())),
                run.succeeded + run.failed,
                run.total,
                run.pending(),
                run.id
            );
            if json {
                let mut value = report::run_json(&run);
                value["throttled_stop"] = serde_json::json!({
                    "waited_s": waited.as_secs(),
                    "resume": format!("settle resume {}", run.id),
                });
                println!("{value}");
            }
            Ok(ExitCode::from(EXIT_THROTTLED))
        }
    }
}

/// `run` or `resume` stopped waiting on a throttled run (EX_TEMPFAIL).
const EXIT_THROTTLED: u8 = 75;

async fn redrive_cmd(
    d: &Deployment,
    run_id: &str,
    items: Vec<String>,
    dry_run: bool,
    p: &ProcessArgs,
    json: bool,
    stop: &Stop,
) -> Result<ExitCode> {
    let run = resolve(d, Some(run_id)).await?;
    stop.set_run(&run.id);
    let only: Option<BTreeSet<ItemId>> = if items.is_empty() {
        None
    } else {
        Some(
            items
                .iter()
                .map(|s| {
                    ItemId::new(s.clone()).map_err(|err| input(format!("--item {s:?}: {err}")))
                })
                .collect::<Result<_>>()?,
        )
    };
    let chosen = if dry_run {
        None
    } else {
        local_processor(d, &run, p)?
    };
    let should_stop = || stop.signal().is_some();
    let moved = match redrive_move(
        d,
        &run,
        only.as_ref(),
        dry_run,
        p,
        chosen.as_ref(),
        stop,
        &should_stop,
    )
    .await?
    {
        Moved::Report(report) => report,
        Moved::Interrupted(finished) => return finish(d, *finished, json, None).await,
    };
    let n = moved.items.len() as u64;
    if !moved.missing.is_empty() {
        // Not an error: the rest moved. But say so, so that nobody takes
        // the redrive for complete.
        let shown: Vec<_> = moved
            .missing
            .iter()
            .take(5)
            .map(|id| report::clean(id.as_str()))
            .collect();
        let more = moved.missing.len().saturating_sub(shown.len());
        eprintln!(
            "note: {} failed {} no message in the dead-letter queue to move: {}{}. \
             Another pass over the queue (a redrive or reconciliation running now, or one \
             that was cut off) hides its messages for up to 2 minutes; {}",
            moved.missing.len(),
            if moved.missing.len() == 1 {
                "item has"
            } else {
                "items have"
            },
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            },
            if dry_run {
                "a redrive after that moves them.".to_owned()
            } else {
                format!(
                    "the redrive stays unfinished: settle resume {} waits for them and moves them.",
                    run.id
                )
            },
        );
    }
    if dry_run {
        let ids: Vec<&str> = moved.items.iter().map(ItemId::as_str).collect();
        let mut value = report::run_json(&run);
        value["redriven"] = json!(0);
        value["not_moved"] = json!(moved.missing.len());
        value["complete"] = json!(moved.is_complete());
        value["would_redrive"] = json!(n);
        value["items"] = json!(ids);
        emit(json, value, || report::dry_run_human(&run.id, &ids));
        return Ok(redrive_exit(&moved));
    }
    let finished = if moved.stopped {
        // Says what happened; `finish` says how to go on.
        eprintln!("Redrive of run {} stopped after moving {n} items", run.id);
        let signal = stop.signal().expect("a redrive stops only when signalled");
        Finish::Interrupted(get_run(d, &run.id).await?, signal)
    } else {
        eprintln!("Redriving {n} items of run {}", run.id);
        redrive_process(d, &run.id, p, chosen.as_ref(), &moved, stop).await?
    };
    let done = matches!(finished, Finish::Done(..));
    let mut extra = serde_json::Map::new();
    extra.insert("redriven".into(), json!(n));
    extra.insert("not_moved".into(), json!(moved.missing.len()));
    extra.insert("complete".into(), json!(done && moved.is_complete()));
    extra.insert("redrive".into(), redrive_json(&moved, done));
    let code = finish(d, finished, json, Some(extra)).await?;
    Ok(if code == ExitCode::SUCCESS {
        redrive_exit(&moved)
    } else {
        code
    })
}

/// `"redrive"` in the JSON of `redrive` and `resume`: whether the redrive
/// is complete (every item of its scope moved back and processed), and its
/// scope.
fn redrive_json(moved: &redrive::RedriveReport, processed: bool) -> Value {
    json!({
        "complete": processed && moved.is_complete(),
        "scope": report::scope_json(&moved.scope),
    })
}

/// `settle resume`: dispatches and processes what is left of the run, then
/// finishes its unfinished redrive, if any: moves the rest of that
/// redrive's scope back from the DLQ and processes it.
async fn resume(
    d: &Deployment,
    run_id: Option<&str>,
    p: &ProcessArgs,
    json: bool,
    stop: &Stop,
) -> Result<ExitCode> {
    let run = resolve(d, run_id).await?;
    stop.set_run(&run.id);
    eprintln!(
        "Resuming run {}: {} of {} items settled{}",
        run.id,
        run.succeeded + run.failed,
        run.total,
        if run.redrive.is_some() || run.redriving {
            ", a redrive unfinished"
        } else if !run.dispatched {
            ", dispatch unfinished"
        } else {
            ""
        }
    );
    let chosen = local_processor(d, &run, p)?;
    // What the run has in flight first, a cut-off redrive's moved messages
    // included: they are in no DLQ, so the redrive's next pass would find
    // no message for their items (still counted failed) and take them for
    // missing. Processed, each is done with or back in the DLQ carrying the
    // redrive's mark, which the next pass leaves where it is.
    let finished = process(d, &run.id, p, chosen.as_ref(), Until::Settled, true, stop).await?;
    let Finish::Done(settled, ..) = &finished else {
        return finish(d, finished, json, None).await;
    };
    if settled.redrive.is_none() {
        drop_extra_dead_letters(d, settled).await?;
        return finish(d, finished, json, None).await;
    }
    eprintln!(
        "Finishing the unfinished redrive of run {}: moving the rest of its items back to \
         the work queue",
        run.id
    );
    let moved = match resume_redrive(d, &run.id, stop).await? {
        Some(moved) => moved,
        // Finished by another command in the meantime.
        None => return finish(d, finished, json, None).await,
    };
    let n = moved.items.len() as u64;
    let finished = if moved.stopped {
        eprintln!(
            "Redrive of run {} stopped after moving {n} more items",
            run.id
        );
        let signal = stop.signal().expect("a redrive stops only when signalled");
        Finish::Interrupted(get_run(d, &run.id).await?, signal)
    } else {
        eprintln!(
            "Redriving {n} more items of run {} (the rest of its unfinished redrive)",
            run.id
        );
        redrive_process(d, &run.id, p, chosen.as_ref(), &moved, stop).await?
    };
    if let Finish::Done(settled, ..) = &finished {
        drop_extra_dead_letters(d, settled).await?;
    }
    if !moved.missing.is_empty() && !moved.stopped {
        eprintln!(
            "note: {} failed items of the redrive's scope still have no message in the \
             dead-letter queue to move (hidden by another pass over the queue); the redrive \
             stays unfinished: continue with: settle resume {}",
            moved.missing.len(),
            run.id
        );
    }
    let done = matches!(finished, Finish::Done(..));
    let mut extra = serde_json::Map::new();
    extra.insert("redrive".into(), redrive_json(&moved, done));
    let code = finish(d, finished, json, Some(extra)).await?;
    Ok(if code == ExitCode::SUCCESS {
        redrive_exit(&moved)
    } else {
        code
    })
}

/// How long `resume` waits, at most, for dead letters of its redrive that
/// another pass over the DLQ holds hidden: a pass cut off outright holds
/// what it had received for its visibility timeout.
const HIDDEN_WAIT: Duration = Duration::from_secs(redrive::SCAN_VISIBILITY.as_secs() + 10);

/// Moves the rest of the run's unfinished redrive back to the work queue
/// (`None` when it has none). Dead letters hidden by a pass that was cut
/// off are waited for, up to [`HIDDEN_WAIT`], and then moved (or, stale
/// copies of items that succeeded since, deleted): so one resume finishes
/// a redrive that was killed outright.
async fn resume_redrive(
    d: &Deployment,
    run: &RunId,
    stop: &Stop,
) -> Result<Option<redrive::RedriveReport>> {
    let b = &d.backend;
    let should_stop = || stop.signal().is_some();
    // Set when the wait begins.
    let mut deadline: Option<Instant> = None;
    let mut total: Option<redrive::RedriveReport> = None;
    loop {
        let Some(pass) = redrive::resume(
            b.ledger.as_ref(),
            b.dlq.as_ref(),
            b.work.as_ref(),
            run,
            &should_stop,
        )
        .await
        .map_err(|err| match err {
            RedriveError::Port(p) => anyhow::Error::new(p).context("redrive failed"),
            other => input(other.to_string()),
        })?
        else {
            return Ok(total);
        };
        let first = total.is_none();
        let t = total.get_or_insert_with(|| pass.clone());
        if !first {
            t.items.extend(pass.items);
            t.messages += pass.messages;
            t.stale += pass.stale;
            t.earlier.extend(pass.earlier);
            t.stopped = pass.stopped;
        }
        // Moved by an earlier pass of this resume and not processed yet:
        // still failed in the ledger, but not missing.
        t.missing = pass
            .missing
            .into_iter()
            .filter(|i| !t.items.contains(i))
            .collect();
        if t.stopped || deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(total);
        }
        // A pass cut off outright holds the dead letters it had received
        // hidden: items of the scope not moved yet, or stale copies of items
        // it had moved. Both reappear within the scan's visibility timeout.
        let hidden = b.dlq.depth().await?.in_flight;
        if t.missing.is_empty() && hidden == 0 {
            return Ok(total);
        }
        let deadline = *deadline.get_or_insert_with(|| {
            eprintln!(
                "Waiting up to {} s for {hidden} dead letters hidden by another pass over the \
                 dead-letter queue (one that was cut off holds them for up to 2 minutes){}",
                HIDDEN_WAIT.as_secs(),
                if t.missing.is_empty() {
                    String::new()
                } else {
                    format!(": {} items of the redrive are among them", t.missing.len())
                }
            );
            Instant::now() + HIDDEN_WAIT
        });
        // Until nothing in the DLQ is hidden any more: counting is cheap,
        // another pass over the queue is not.
        while b.dlq.depth().await?.in_flight > 0 && Instant::now() < deadline {
            tokio::select! {
                _ = stop.stopped() => {
                    t.stopped = true;
                    return Ok(total);
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// 0 when every failed item of the redrive's scope was moved, 3 when some
/// were not (documented: a script must not take a partial redrive for a
/// complete one).
fn redrive_exit(moved: &redrive::RedriveReport) -> ExitCode {
    if moved.is_complete() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    }
}

/// What [`redrive_move`] came to.
#[derive(Debug)]
pub(crate) enum Moved {
    /// The move was made (or, on a dry run, counted).
    Report(redrive::RedriveReport),
    /// A signal stopped the processing of an earlier, interrupted redrive
    /// before this one moved anything.
    Interrupted(Box<Finish>),
}

/// The moving half of a redrive, shared by `settle redrive` and `settle ui`:
/// first finishes an earlier redrive of the run that was cut off (its
/// messages are back in the work queue while their items still count as
/// failed; processing them first keeps this redrive from taking them for
/// missing), then moves the run's dead letters (all, or `only` those
/// items) back to the work queue. The caller then processes what moved
/// with [`redrive_process`], which also closes the run's redrive.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn redrive_move(
    d: &Deployment,
    run: &RunRecord,
    only: Option<&BTreeSet<ItemId>>,
    dry_run: bool,
    p: &ProcessArgs,
    chosen: Option<&processors::Chosen>,
    stop: &Stop,
    should_stop: &(dyn Fn() -> bool + Send + Sync),
) -> Result<Moved> {
    if run.redriving && !dry_run {
        eprintln!(
            "Finishing an earlier redrive of run {} first (it was interrupted)",
            run.id
        );
        if let Finish::Interrupted(run, signal) =
            process(d, &run.id, p, chosen, Until::Drained, true, stop)
                .await
                .context("processing an earlier redrive's items")?
        {
            return Ok(Moved::Interrupted(Box::new(Finish::Interrupted(
                run, signal,
            ))));
        }
    }
    if !dry_run {
        eprintln!(
            "Moving the {} of run {} back to the work queue",
            if only.is_some() {
                "named failed items"
            } else {
                "failed items"
            },
            run.id
        );
    }
    let moved = redrive::redrive(
        d.backend.ledger.as_ref(),
        d.backend.dlq.as_ref(),
        d.backend.work.as_ref(),
        &run.id,
        only,
        dry_run,
        should_stop,
    )
    .await
    .map_err(|err| match err {
        RedriveError::Port(p) => anyhow::Error::new(p).context("redrive failed"),
        other => input(other.to_string()),
    })?;
    Ok(Moved::Report(moved))
}

/// The processing half of a redrive: processes until the queues drain,
/// which closes the run's redrive, even with nothing moved (the redrive
/// was opened all the same). `moved` is what the redrive moved, reported
/// as what was processed; when it moved every item of its scope, the
/// redrive is complete once they are processed and its scope is cleared.
pub(crate) async fn redrive_process(
    d: &Deployment,
    run: &RunId,
    p: &ProcessArgs,
    chosen: Option<&processors::Chosen>,
    moved: &redrive::RedriveReport,
    stop: &Stop,
) -> Result<Finish> {
    let finished = match process(d, run, p, chosen, Until::Drained, true, stop)
        .await
        .context("processing the redriven items")?
    {
        // A redrive moves items between buckets; what it processed is what it moved.
        Finish::Done(run, took, _) => Finish::Done(run, took, moved.items.len() as u64),
        other => other,
    };
    let finished = match (finished, stop.signal()) {
        (Finish::Done(run, ..), Some(signal)) => Finish::Interrupted(run, signal),
        (other, _) => other,
    };
    let Finish::Done(_, took, count) = finished else {
        return Ok(finished);
    };
    if moved.is_complete() {
        // Cleared only if no newer redrive replaced this one meanwhile: that
        // one is not done.
        d.backend
            .ledger
            .clear_redrive(run, &moved.scope)
            .await
            .context("recording the redrive as complete")?;
    }
    let now = get_run(d, run).await?;
    if now.is_settled() && now.settled_at.is_none() {
        d.backend.ledger.mark_settled(run, now_millis()).await?;
    }
    Ok(Finish::Done(get_run(d, run).await?, took, count))
}
