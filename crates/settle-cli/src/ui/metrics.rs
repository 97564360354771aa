//! `/metrics`: Prometheus text. Per-run gauges for the recent runs (a run
//! id is a label: a handful of runs a day, not one per request) and
//! counters of the retries this server made.

use super::Ui;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Runs that get gauges, newest first.
const RUNS: usize = 20;

/// A label value as the text format wants it.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub async fn metrics(State(ui): State<Arc<Ui>>) -> Result<impl IntoResponse, super::PageError> {
    let runs = ui.d.backend.ledger.runs(RUNS).await?;
    let mut out = String::new();
    out.push_str(
        "# HELP settle_run_items Items of a recent run, by status.\n# TYPE settle_run_items gauge\n",
    );
    for run in &runs {
        let id = label(run.id.as_str());
        for (status, n) in [
            ("succeeded", run.succeeded),
            ("failed", run.failed),
            ("pending", run.pending()),
            ("total", run.total),
        ] {
            let _ = writeln!(
                out,
                "settle_run_items{{run=\"{id}\",status=\"{status}\"}} {n}"
            );
        }
    }
    out.push_str("# HELP settle_run_settled Whether a recent run has settled (1) or not (0).\n# TYPE settle_run_settled gauge\n");
    for run in &runs {
        let _ = writeln!(
            out,
            "settle_run_settled{{run=\"{}\"}} {}",
            label(run.id.as_str()),
            u8::from(run.is_settled())
        );
    }
    for (name, help, v) in [
        (
            "settle_ui_retries_total",
            "Retries this server made.",
            &ui.retries,
        ),
        (
            "settle_ui_retried_items_total",
            "Items its retries moved back to the work queue.",
            &ui.moved,
        ),
        (
            "settle_ui_retry_not_moved_total",
            "Failed items its retries asked for and could not move.",
            &ui.not_moved,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    ))
}
