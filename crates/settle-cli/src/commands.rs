//! One function per subcommand.

use crate::cli::{Cli, Command, ProcessArgs, RunArgs, RunSettings};
use crate::deployment::Deployment;
use crate::process::{process, Finish, Until};
use crate::report;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use settle_core::dispatch;
use settle_core::jsonl::JsonlItems;
use settle_core::ports::LoadError;
use settle_core::redrive::{self, RedriveError};
use settle_core::{ItemId, RunConfig, RunId, RunRecord};
use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::Path;
use std::process::ExitCode;

/// Bad input from the user: exits 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

pub fn input(msg: impl Into<String>) -> anyhow::Error {
    InputError(msg.into()).into()
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
    let d = &Deployment::open(&cli).await?;
    let writes = !cli.command.read_only();
    let code = command(d, cli.command).await;
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
    code
}

async fn command(d: &Deployment, command: Command) -> Result<ExitCode> {
    match command {
        Command::Run(args) => run(d, args).await,
        Command::Load { items, json } => {
            let n = load(d, &items).await?;
            emit(
                json,
                json!({ "loaded": n, "pending": d.backend.source.pending().await? }),
                || format!("Loaded {n} items from {}\n", items.display()),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Dispatch { run, json } => {
            if d.backend.source.pending().await? == 0 {
                return Err(input(
                    "nothing is pending: load items first (settle load --items FILE)",
                ));
            }
            let record = new_run(d, &run).await?;
            let b = &d.backend;
            dispatch::dispatch(
                b.source.as_ref(),
                b.ledger.as_ref(),
                b.work.as_ref(),
                &record.id,
                None,
            )
            .await?;
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
        } => {
            let run = resolve(d, run_id.as_deref()).await?;
            finish(
                d,
                process(d, &run.id, &p, Until::Settled).await?,
                json,
                None,
            )
            .await
        }
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
            let first = d
                .backend
                .ledger
                .failures(&run.id, None, report::FIRST_FAILURES)
                .await?;
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
        } => redrive_cmd(d, &run_id, items, dry_run, &p, json).await,
        Command::Show {
            run_id,
            item_id,
            json,
        } => {
            let run = resolve(d, Some(&run_id)).await?;
            let id = ItemId::new(item_id.clone())
                .map_err(|err| input(format!("item id {item_id:?}: {err}")))?;
            let rows = d
                .backend
                .ledger
                .items(&[(run.id.clone(), id.clone())])
                .await?;
            let rec = rows.into_values().next().ok_or_else(|| {
                input(format!(
                    "no record of item \"{id}\" in run {} (not in the run, or not attempted yet)",
                    run.id
                ))
            })?;
            emit(json, report::item_json(&run.id, &id, &rec.value), || {
                report::item_human(&run.id, &id, &rec.value)
            });
            Ok(ExitCode::SUCCESS)
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
        Command::Generate { .. } => unreachable!("handled above"),
    }
}

/// Prints `value` as the last line of stdout with `--json`, else the human text.
fn emit(json: bool, value: Value, human: impl FnOnce() -> String) {
    if json {
        println!("{value}");
    } else {
        print!("{}", human());
    }
}

async fn run(d: &Deployment, args: RunArgs) -> Result<ExitCode> {
    let before = d.backend.source.pending().await?;
    load(d, &args.items).await?;
    if before > 0 {
        eprintln!("note: {before} items loaded earlier were pending and join this run");
    }
    let record = new_run(d, &args.run).await?;
    eprintln!("Run {} started", record.id);
    let finished = process(d, &record.id, &args.process, Until::Settled).await?;
    finish(d, finished, args.json, None).await
}

async fn new_run(d: &Deployment, s: &RunSettings) -> Result<RunRecord> {
    d.prepare_for(s.max_receives).await?;
    let config = RunConfig {
        max_receives: s.max_receives,
        tolerated_failure_percent: s.tolerated_failure_percent,
    };
    Ok(dispatch::create_run(d.backend.ledger.as_ref(), config).await?)
}

/// Loads a JSONL file in one transaction; a bad line names the file and line.
async fn load(d: &Deployment, path: &Path) -> Result<u64> {
    let stdin = path == Path::new("-");
    let name = if stdin {
        "stdin".into()
    } else {
        path.display().to_string()
    };
    let reader: Box<dyn BufRead + Send> = if stdin {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        let f = std::fs::File::open(path)
            .map_err(|err| input(format!("cannot open items file {}: {err}", path.display())))?;
        Box::new(std::io::BufReader::with_capacity(1 << 16, f))
    };
    let spinner = indicatif::ProgressBar::new_spinner().with_message(format!("loading {name}"));
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let res = d
        .backend
        .source
        .load(Box::new(JsonlItems::new(reader)))
        .await;
    spinner.finish_and_clear();
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

async fn get_run(d: &Deployment, id: &RunId) -> Result<RunRecord> {
    d.backend
        .ledger
        .run(id)
        .await?
        .ok_or_else(|| input(format!("run {id} not found")))
}

/// The named run, or the latest one.
async fn resolve(d: &Deployment, id: Option<&str>) -> Result<RunRecord> {
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

async fn finish(
    d: &Deployment,
    f: Finish,
    json: bool,
    extra: Option<(&str, Value)>,
) -> Result<ExitCode> {
    match f {
        Finish::Done(run, took, count) => {
            let first = d
                .backend
                .ledger
                .failures(&run.id, None, report::FIRST_FAILURES)
                .await?;
            let mut value = report::run_json(&run);
            if let Some((k, v)) = extra {
                value[k] = v;
            }
            emit(json, value, || {
                report::run_human(&run, &first, Some((took, count)))
            });
            Ok(ExitCode::SUCCESS)
        }
        Finish::Interrupted(run) => {
            eprintln!(
                "interrupted: {} of {} items settled; continue with: settle resume {}",
                run.succeeded + run.failed,
                run.total,
                run.id
            );
            if json {
                println!("{}", report::run_json(&run));
            }
            Ok(ExitCode::from(130))
        }
    }
}

async fn redrive_cmd(
    d: &Deployment,
    run_id: &str,
    items: Vec<String>,
    dry_run: bool,
    p: &ProcessArgs,
    json: bool,
) -> Result<ExitCode> {
    let run = resolve(d, Some(run_id)).await?;
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
    let moved = redrive::redrive(
        d.backend.ledger.as_ref(),
        d.backend.dlq.as_ref(),
        d.backend.work.as_ref(),
        &run.id,
        only.as_ref(),
        dry_run,
    )
    .await
    .map_err(|err| match err {
        RedriveError::Port(p) => anyhow::Error::new(p).context("redrive failed"),
        other => input(other.to_string()),
    })?;
    if only.is_some() {
        for m in &moved.missing {
            eprintln!(
                "note: item \"{m}\" has no message in the dead-letter queue (already redriven?)"
            );
        }
    } else if !moved.missing.is_empty() {
        // Not an error: the rest moved. But say so, so that nobody takes
        // the redrive for complete.
        let shown: Vec<&str> = moved.missing.iter().take(5).map(ItemId::as_str).collect();
        let more = moved.missing.len().saturating_sub(shown.len());
        eprintln!(
            "note: {} failed items have no message in the dead-letter queue to move: {}{}. \
             They are in flight (already redriven), or hidden by another pass over the queue \
             for up to 2 minutes; run the redrive again later to move them.",
            moved.missing.len(),
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
    }
    let n = moved.items.len() as u64;
    if dry_run {
        let ids: Vec<&str> = moved.items.iter().map(ItemId::as_str).collect();
        let mut value = report::run_json(&run);
        value["redriven"] = json!(0);
        value["would_redrive"] = json!(n);
        value["items"] = json!(ids);
        emit(json, value, || report::dry_run_human(&run.id, &ids));
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("Redriving {n} items of run {}", run.id);
    let finished = if n == 0 {
        Finish::Done(run, std::time::Duration::ZERO, 0)
    } else {
        match process(d, &run.id, p, Until::Drained)
            .await
            .context("processing the redriven items")?
        {
            // A redrive moves items between buckets; what it processed is what it moved.
            Finish::Done(run, took, _) => Finish::Done(run, took, n),
            other => other,
        }
    };
    finish(d, finished, json, Some(("redriven", json!(n)))).await
}
