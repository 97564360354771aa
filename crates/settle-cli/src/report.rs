//! What the CLI prints: a human summary by default, one JSON object as the
//! last line of stdout with `--json`.

use serde_json::{json, Value};
use settle_core::domain::{AttemptOutcome, Millis};
use settle_core::{ItemId, ItemRecord, RunRecord};
use std::time::{Duration, UNIX_EPOCH};

/// Failed items listed under a human summary before "and N more".
pub const FIRST_FAILURES: usize = 10;

pub fn run_json(run: &RunRecord) -> Value {
    json!({
        "run_id": run.id,
        "status": run.status(),
        "total": run.total,
        "succeeded": run.succeeded,
        "failed": run.failed,
        "pending": run.pending(),
        "redriving": run.redriving,
    })
}

/// Ids a dry run lists before it points to `--json` for the rest.
const DRY_RUN_SHOWN: usize = 20;

pub fn dry_run_human(run: &settle_core::RunId, ids: &[&str]) -> String {
    let shown = &ids[..ids.len().min(DRY_RUN_SHOWN)];
    let mut out = format!("Dry run: would redrive {} items of run {run}", ids.len());
    if !shown.is_empty() {
        out.push_str(": ");
        out.push_str(&shown.join(", "));
    }
    if ids.len() > shown.len() {
        out.push_str(&format!(
            " ... and {} more (--json lists them all)",
            ids.len() - shown.len()
        ));
    }
    out.push('\n');
    out
}

pub fn time(ms: Millis) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn plural(n: u64, one: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {one}s")
    }
}

/// The run summary: status, the "Processed N items…" line, and the first
/// failures. `took` is how long this command processed, and how many items
/// it settled in that time.
pub fn run_human(
    run: &RunRecord,
    first_failures: &[(ItemId, ItemRecord)],
    took: Option<(Duration, u64)>,
) -> String {
    let mut out = String::new();
    let rate = took
        .filter(|(t, n)| t.as_secs_f64() > 0.0 && *n > 0)
        .map(|(t, n)| {
            let secs = t.as_secs_f64();
            format!(
                " ({n} items processed in {secs:.1} s, {:.0} items/s)",
                n as f64 / secs
            )
        })
        .unwrap_or_default();
    out.push_str(&format!("Run {}: {}{rate}\n", run.id, run.status()));
    out.push_str(&run.summary());
    if run.pending() > 0 || !run.dispatched {
        let of = if run.dispatched {
            String::new()
        } else {
            " so far (still dispatching)".into()
        };
        out.push_str(&format!("; {} pending of {}{of}", run.pending(), run.total));
    }
    out.push('\n');
    if run.failed > 0 {
        out.push_str(&format!(
            "Failed items (first {} of {}):\n",
            first_failures.len(),
            run.failed
        ));
        for (id, rec) in first_failures {
            out.push_str(&format!(
                "  {id}  after {}: {}\n",
                plural(u64::from(rec.attempts), "attempt"),
                rec.last_error.as_deref().unwrap_or("(no error recorded)")
            ));
        }
        if run.failed > first_failures.len() as u64 {
            out.push_str(&format!(
                "  ... and {} more: settle failures {}\n",
                run.failed - first_failures.len() as u64,
                run.id
            ));
        }
        if run.is_settled() {
            out.push_str(&format!(
                "Retry them: settle redrive {} [--item ID]\n",
                run.id
            ));
        }
    }
    if run.redriving {
        out.push_str(&format!(
            "A redrive of this run is still in flight: its items count as failed until \
             they are processed. If no settle command is processing it now (it was \
             stopped), finish it with: settle resume {}\n",
            run.id
        ));
    } else if !run.is_settled() {
        out.push_str(&format!(
            "Not settled yet. If no settle command is processing it now (it was stopped), \
             continue with: settle resume {}\n",
            run.id
        ));
    }
    out
}

pub fn failures_json(run: &RunRecord, failures: &[(ItemId, ItemRecord)]) -> Value {
    json!({
        "run_id": run.id,
        "failures": failures.iter().map(|(id, r)| json!({
            "item_id": id,
            "attempts": r.attempts,
            "error": r.last_error.clone().unwrap_or_default(),
        })).collect::<Vec<_>>(),
    })
}

pub fn failures_human(run: &RunRecord, failures: &[(ItemId, ItemRecord)]) -> String {
    let mut out = format!(
        "Run {}: {} failed of {} items\n",
        run.id,
        failures.len(),
        run.total
    );
    let width = failures
        .iter()
        .map(|(id, _)| id.as_str().len())
        .max()
        .unwrap_or(4)
        .max(4);
    if !failures.is_empty() {
        out.push_str(&format!("{:width$}  attempts  last error\n", "item"));
    }
    for (id, r) in failures {
        out.push_str(&format!(
            "{:width$}  {:>8}  {}\n",
            id.as_str(),
            r.attempts,
            r.last_error.as_deref().unwrap_or("")
        ));
    }
    out
}

fn outcome_parts(o: &AttemptOutcome) -> (&'static str, Option<&'static str>, Option<&str>, bool) {
    match o {
        AttemptOutcome::Succeeded => ("succeeded", None, None, false),
        AttemptOutcome::Failed {
            kind,
            error,
            terminal,
        } => {
            let kind = match kind {
                settle_core::domain::ErrorKind::Retryable => "retryable",
                settle_core::domain::ErrorKind::Permanent => "permanent",
            };
            ("failed", Some(kind), Some(error.as_str()), *terminal)
        }
    }
}

pub fn item_json(run: &RunId, id: &ItemId, rec: &ItemRecord) -> Value {
    json!({
        "run_id": run,
        "item_id": id,
        "status": rec.status,
        "attempts": rec.attempts,
        "last_error": rec.last_error,
        "history": rec.history.iter().map(|a| {
            let (outcome, kind, error, terminal) = outcome_parts(&a.outcome);
            json!({
                "attempt": a.attempt,
                "message_id": a.message_id,
                "started_at": time(a.started_at),
                "duration_ms": a.duration_ms,
                "outcome": outcome,
                "kind": kind,
                "error": error,
                "terminal": terminal,
            })
        }).collect::<Vec<_>>(),
    })
}

use settle_core::RunId;

pub fn item_human(run: &RunId, id: &ItemId, rec: &ItemRecord) -> String {
    let mut out = format!(
        "Item {id} of run {run}: {} after {}\n",
        rec.status.as_str(),
        plural(u64::from(rec.attempts), "attempt")
    );
    if let Some(e) = &rec.last_error {
        out.push_str(&format!("Last error: {e}\n"));
    }
    out.push_str("attempt  started (UTC)             took       outcome\n");
    for a in &rec.history {
        let (outcome, kind, error, terminal) = outcome_parts(&a.outcome);
        let mut what = match (kind, error) {
            (Some(k), Some(e)) => format!("{outcome} ({k}): {e}"),
            _ => outcome.to_owned(),
        };
        if terminal {
            what.push_str(" [dead-lettered]");
        }
        out.push_str(&format!(
            "{:>7}  {}  {:>7} ms  {what}\n",
            a.attempt,
            time(a.started_at),
            a.duration_ms
        ));
    }
    out
}

pub fn runs_human(runs: &[RunRecord]) -> String {
    let mut out = String::from(
        "run                       status     total   succeeded  failed  pending  created (UTC)\n",
    );
    for r in runs {
        out.push_str(&format!(
            "{}  {:<9} {:>7} {:>11} {:>7} {:>8}  {}\n",
            r.id,
            r.status().as_str(),
            r.total,
            r.succeeded,
            r.failed,
            r.pending(),
            time(r.created_at)
        ));
    }
    out
}
