//! The pages and the small JSON endpoint behind the live tally.

use super::html::{bar, esc, page, url, url_decode};
use super::{PageError, Ui};
use crate::commands::{self, input, Moved};
use crate::process::Finish;
use crate::report;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use settle_core::domain::{now_millis, AttemptOutcome, ItemStatus};
use settle_core::{ItemId, ItemRecord, RunId, RunRecord};
use std::collections::BTreeSet;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

type S = State<Arc<Ui>>;

/// Runs on the runs page, newest first.
const RUNS_SHOWN: usize = 50;
/// Failed items per page of the run page.
const ITEMS_PAGE: usize = 50;
/// Failures read per ledger call.
const LEDGER_PAGE: usize = 1000;

/// "S succeeded / F failed / P pending of T".
fn tally(run: &RunRecord) -> String {
    format!(
        "{} succeeded / {} failed / {} pending of {}",
        run.succeeded,
        run.failed,
        run.pending(),
        run.total
    )
}

/// How long the run has taken: until it settled, or until now.
fn took(run: &RunRecord) -> Duration {
    let end = match run.settled_at {
        Some(at) if run.is_settled() => at,
        _ => now_millis(),
    };
    Duration::from_millis(end.saturating_sub(run.created_at))
}

fn seconds(d: Duration) -> String {
    if d < Duration::from_secs(60) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
    }
}

fn rate(run: &RunRecord) -> String {
    let secs = took(run).as_secs_f64();
    if secs <= 0.0 {
        return "-".into();
    }
    format!("{:.0}", (run.succeeded + run.failed) as f64 / secs)
}

/// The throughput-over-time chart that the page's script draws from the
/// live tally: items settled per second, sampled while the page is open.
/// A `hidden` one (a settled run's) shows once the run moves again.
fn chart(caption: bool, hidden: bool) -> String {
    let svg = "<svg class=\"chart\" data-field=\"chart\" data-points=\"0\" viewBox=\"0 0 300 60\" \
               preserveAspectRatio=\"none\" role=\"img\" aria-label=\"items settled per second\">\
               <polyline points=\"\"></polyline></svg>";
    if caption {
        format!(
            "<figure class=\"throughput\"{}>{svg}<figcaption class=\"muted\">\
             <span data-field=\"rate-now\">-</span> items/s now, peak <span data-field=\"rate-peak\">-</span> \
             (sampled while this page is open)</figcaption></figure>\n",
            if hidden { " hidden" } else { "" }
        )
    } else {
        format!("<span class=\"spark\">{svg}<span data-field=\"rate-now\"></span></span>")
    }
}

pub async fn runs(State(ui): S) -> Result<Html<String>, PageError> {
    let runs = ui.d.backend.ledger.runs(RUNS_SHOWN).await?;
    let mut body = format!(
        "<h1>Runs</h1>\n<p class=\"muted\">{}, newest first</p>\n",
        esc(&ui.d.describe())
    );
    if runs.is_empty() {
        body.push_str("<p>No runs yet.</p>\n");
    } else {
        body.push_str(
            "<table class=\"runs\"><tr><th>run</th><th>status</th><th>tally</th><th></th>\
             <th>started</th><th>duration</th><th>items/s</th><th>throughput</th></tr>\n",
        );
        for run in &runs {
            let status = run.status().as_str();
            // A run still settling follows its tally live, with its
            // throughput beside it.
            let (live, throughput) = if run.is_settled() {
                (String::new(), String::new())
            } else {
                (
                    format!(
                        " data-live-run=\"/api/runs/{}\" data-live-until-settled",
                        url(run.id.as_str())
                    ),
                    chart(false, false),
                )
            };
            let _ = writeln!(
                body,
                "<tr{live}><td><a href=\"/runs/{}\">{}</a></td>\
                 <td class=\"status {status}\" data-field=\"status\">{status}</td>\
                 <td class=\"tally\" data-field=\"tally\">{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{throughput}</td></tr>",
                url(run.id.as_str()),
                esc(run.id.as_str()),
                tally(run),
                bar(run.succeeded, run.failed, run.total),
                report::time(run.created_at),
                seconds(took(run)),
                rate(run)
            );
        }
        body.push_str("</table>\n");
    }
    Ok(Html(page("Runs", &body)))
}

#[derive(Debug, Deserialize)]
pub struct RunQuery {
    reason: Option<String>,
    /// The last item id of the previous page.
    after: Option<String>,
}

/// Reads the run's failures in id order after `after`, in ledger pages,
/// until `f` says stop or `budget` rows were read. Returns the id of the
/// last row read when more may follow.
async fn scan_failures(
    ui: &Ui,
    run: &RunId,
    after: Option<ItemId>,
    budget: usize,
    mut f: impl FnMut(&ItemId, &ItemRecord) -> bool,
) -> Result<Option<ItemId>, PageError> {
    let mut after = after;
    let mut read = 0;
    loop {
        let page =
            ui.d.backend
                .ledger
                .failures(run, after.as_ref(), LEDGER_PAGE.min(budget - read))
                .await?;
        let full = page.len() == LEDGER_PAGE.min(budget - read);
        for (id, rec) in &page {
            read += 1;
            after = Some(id.clone());
            if !f(id, rec) {
                return Ok(after);
            }
        }
        if !full {
            return Ok(None);
        }
        if read >= budget {
            return Ok(after);
        }
    }
}

/// Every failed item of the run whose reason is `reason`.
async fn with_reason(ui: &Ui, run: &RunId, reason: &str) -> Result<BTreeSet<ItemId>, PageError> {
    let mut ids = BTreeSet::new();
    scan_failures(ui, run, None, usize::MAX, |id, rec| {
        if report::reason(id, rec) == reason {
            ids.insert(id.clone());
        }
        true
    })
    .await?;
    Ok(ids)
}

fn run_link(run: &RunId) -> String {
    format!("/runs/{}", url(run.as_str()))
}

fn retry_link(run: &RunId, query: &str) -> String {
    format!("/runs/{}/retry?{query}", url(run.as_str()))
}

/// The run's throttled answers and long waits, if any: why a run that
/// makes no progress is not stuck.
fn flow(run: &RunRecord) -> String {
    let mut out = String::new();
    if run.throttled > 0 {
        let _ = writeln!(
            out,
            "<p class=\"muted\">throttled <span data-field=\"throttled\">{}</span> times by the service \
             called (not failures; no attempt used)</p>",
            run.throttled
        );
    }
    if let Some((items, until)) = run.waiting_at(now_millis()) {
        let _ = writeln!(
            out,
            "<p class=\"muted\" data-field=\"waiting\">{items} items wait for a later try, until {} at the latest</p>",
            esc(&report::time(until))
        );
    }
    out
}

pub async fn run(
    State(ui): S,
    Path(run): Path<String>,
    Query(q): Query<RunQuery>,
) -> Result<Html<String>, PageError> {
    let run = commands::resolve(&ui.d, Some(&run)).await?;
    let link = run_link(&run.id);
    let status = run.status().as_str();
    let mut body = format!(
        "<h1>Run <code>{}</code></h1>\n<section class=\"live\" data-live-run=\"/api/runs/{}\">\n\
         <p class=\"big\"><span class=\"status {status}\" data-field=\"status\">{status}</span> \
         <span data-field=\"succeeded\">{}</span> succeeded / <span data-field=\"failed\">{}</span> failed / \
         <span data-field=\"pending\">{}</span> pending of <span data-field=\"total\">{}</span>\
         <span class=\"muted\" data-field=\"busy\"></span></p>\n{}\n\
         <p class=\"muted\">started {}, {}, {} items/s; max receives {}</p>\n{}{}</section>\n",
        esc(run.id.as_str()),
        url(run.id.as_str()),
        run.succeeded,
        run.failed,
        run.pending(),
        run.total,
        bar(run.succeeded, run.failed, run.total),
        report::time(run.created_at),
        seconds(took(&run)),
        rate(&run),
        run.config.max_receives,
        flow(&run),
        chart(true, run.is_settled()),
    );
    let _ = write!(
        body,
        "<p class=\"actions\"><a href=\"/runs/{}/results.jsonl\">Download results (JSONL)</a>",
        url(run.id.as_str())
    );
    if !ui.read_only && run.failed > 0 {
        let _ = write!(
            body,
            " <a class=\"button\" href=\"{}\">Retry all failed</a>",
            retry_link(&run.id, "scope=all")
        );
    }
    body.push_str("</p>\n");

    // Failures by reason, from at most the first REASONS_SAMPLE failures.
    let mut sample = Vec::new();
    let more = scan_failures(&ui, &run.id, None, report::REASONS_SAMPLE, |id, rec| {
        sample.push((id.clone(), rec.clone()));
        true
    })
    .await?;
    let reasons = report::reasons(&sample);
    if !reasons.is_empty() {
        let of = if more.is_some() {
            format!(" (of the first {})", sample.len())
        } else {
            String::new()
        };
        let _ = writeln!(
            body,
            "<h2>Failures by reason{of}</h2>\n<table class=\"reasons\"><tr><th>items</th><th>reason</th><th></th></tr>"
        );
        for (reason, n) in &reasons {
            let retry = if ui.read_only {
                String::new()
            } else {
                format!(
                    "<a class=\"button\" href=\"{}\">Retry these</a>",
                    esc(&retry_link(
                        &run.id,
                        &format!("scope=reason&reason={}", url(reason))
                    ))
                )
            };
            let _ = writeln!(
                body,
                "<tr><td class=\"count\">{n}</td><td class=\"reason\"><a href=\"{}?reason={}\">{}</a></td><td>{retry}</td></tr>",
                link,
                url(reason),
                esc(reason)
            );
        }
        body.push_str("</table>\n");
    }
    drop(sample);

    // One page of failed items, filtered by reason.
    if run.failed > 0 {
        let after = match &q.after {
            Some(a) => Some(ItemId::new(a.clone()).map_err(|e| input(format!("after: {e}")))?),
            None => None,
        };
        // One more than a page: a next-page link only when there is one.
        let mut shown = Vec::new();
        let mut next = scan_failures(&ui, &run.id, after, report::REASONS_SAMPLE, |id, rec| {
            if q.reason
                .as_deref()
                .is_none_or(|r| report::reason(id, rec) == r)
            {
                shown.push((id.clone(), rec.clone()));
            }
            shown.len() <= ITEMS_PAGE
        })
        .await?;
        if shown.len() > ITEMS_PAGE {
            shown.truncate(ITEMS_PAGE);
            next = shown.last().map(|(id, _)| id.clone());
        }
        match &q.reason {
            Some(r) => {
                let _ = writeln!(
                    body,
                    "<h2>Failed items: {}</h2>\n<p><a href=\"{link}\">all reasons</a></p>",
                    esc(r)
                );
            }
            None => body.push_str("<h2>Failed items</h2>\n"),
        }
        // The selected items go to the confirm page, which asks first.
        let select = !ui.read_only;
        if select {
            let _ = writeln!(
                body,
                "<form class=\"select\" method=\"get\" action=\"/runs/{}/retry\">\
                 <input type=\"hidden\" name=\"scope\" value=\"selected\">",
                url(run.id.as_str())
            );
        }
        body.push_str("<table class=\"items\"><tr>");
        if select {
            body.push_str(
                "<th><input type=\"checkbox\" data-select-all aria-label=\"select every item on this page\"></th>",
            );
        }
        body.push_str("<th>item</th><th>attempts</th><th>last error</th><th></th></tr>\n");
        for (id, rec) in &shown {
            let (check, retry) = if select {
                (
                    format!(
                        "<td><input type=\"checkbox\" name=\"item\" value=\"{}\" aria-label=\"select {}\"></td>",
                        esc(id.as_str()),
                        esc(id.as_str())
                    ),
                    format!(
                        "<a class=\"button\" href=\"{}\">Retry</a>",
                        esc(&retry_link(
                            &run.id,
                            &format!("scope=item&item={}", url(id.as_str()))
                        ))
                    ),
                )
            } else {
                (String::new(), String::new())
            };
            let _ = writeln!(
                body,
                "<tr>{check}<td class=\"item\"><a href=\"{link}/item?id={}\">{}</a></td><td>{}</td>\
                 <td class=\"error\">{}</td><td>{retry}</td></tr>",
                url(id.as_str()),
                esc(id.as_str()),
                rec.attempts,
                esc(rec.last_error.as_deref().unwrap_or(""))
            );
        }
        body.push_str("</table>\n");
        if select {
            body.push_str(
                "<p><button type=\"submit\" data-retry-selected>Retry selected</button></p></form>\n",
            );
        }
        if let Some(next) = next {
            let reason = q
                .reason
                .as_deref()
                .map(|r| format!("reason={}&", url(r)))
                .unwrap_or_default();
            let _ = writeln!(
                body,
                "<p><a href=\"{link}?{}after={}\">next page</a></p>",
                esc(&reason),
                url(next.as_str())
            );
        }
    }
    Ok(Html(page(&format!("Run {}", run.id), &body)))
}

/// The live tally: the run's JSON as `settle status --json` prints it,
/// and whether this server is still processing a retry.
pub async fn run_json(State(ui): S, Path(run): Path<String>) -> Result<Response, PageError> {
    let run = commands::resolve(&ui.d, Some(&run)).await?;
    let mut v = report::run_json(&run);
    v["busy"] = serde_json::json!(ui.retrying().as_ref() == Some(&run.id));
    Ok(Json(v).into_response())
}

#[derive(Debug, Deserialize)]
pub struct ItemQuery {
    id: String,
}

fn outcome(o: &AttemptOutcome) -> (String, String) {
    match o {
        AttemptOutcome::Succeeded => ("succeeded".into(), String::new()),
        AttemptOutcome::Failed {
            kind,
            error,
            terminal,
        } => (
            format!(
                "failed ({}{})",
                kind.as_str(),
                if *terminal { ", terminal" } else { "" }
            ),
            error.clone(),
        ),
        AttemptOutcome::Throttled { .. } => ("throttled".into(), String::new()),
    }
}

pub async fn item(
    State(ui): S,
    Path(run): Path<String>,
    Query(q): Query<ItemQuery>,
) -> Result<Html<String>, PageError> {
    let run = commands::resolve(&ui.d, Some(&run)).await?;
    let (id, rec) = commands::item_record(&ui.d, &run, &q.id).await?;
    let link = run_link(&run.id);
    let mut body = format!(
        "<p><a href=\"{link}\">run {}</a></p>\n<h1>Item <code>{}</code></h1>\n\
         <p class=\"big\"><span class=\"status {st}\">{st}</span> after {} attempts</p>\n",
        esc(run.id.as_str()),
        esc(id.as_str()),
        rec.attempts,
        st = rec.status.as_str(),
    );
    if let Some(e) = &rec.last_error {
        let _ = writeln!(body, "<p class=\"error\">last error: {}</p>", esc(e));
    }
    if rec.status == ItemStatus::Failed && !ui.read_only {
        let _ = writeln!(
            body,
            "<p class=\"actions\"><a class=\"button\" href=\"{}\">Retry this item</a></p>",
            esc(&retry_link(
                &run.id,
                &format!("scope=item&item={}", url(id.as_str()))
            ))
        );
    }
    if let Some(out) = rec.output() {
        let _ = writeln!(
            body,
            "<h2>Output</h2>\n<pre class=\"output\">{}</pre>",
            esc(out.get())
        );
    }
    body.push_str(
        "<h2>Attempts</h2>\n<table class=\"attempts\"><tr><th>#</th><th>started</th><th>duration</th>\
         <th>outcome</th><th>error</th></tr>\n",
    );
    for a in &rec.history {
        let (what, error) = outcome(&a.outcome);
        let _ = writeln!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{} ms</td><td class=\"outcome\">{}</td><td class=\"error\">{}</td></tr>",
            a.attempt,
            report::time(a.started_at),
            a.duration_ms,
            esc(&what),
            esc(&error)
        );
    }
    body.push_str("</table>\n");
    for a in &rec.history {
        let _ = writeln!(
            body,
            "<details><summary>attempt {}: log and output</summary>",
            a.attempt
        );
        match &a.log {
            Some(log) => {
                let _ = writeln!(body, "<h3>log</h3><pre class=\"log\">{}</pre>", esc(log));
            }
            None => body.push_str("<p class=\"muted\">no log</p>\n"),
        }
        if let Some(out) = &a.output {
            let _ = writeln!(
                body,
                "<h3>output</h3><pre class=\"output\">{}</pre>",
                esc(out.get())
            );
        }
        body.push_str("</details>\n");
    }
    Ok(Html(page(&format!("Item {}", id.as_str()), &body)))
}

/// Items one retry may name: a page of failed items is 50.
const SELECTED_MAX: usize = 1000;

/// What a retry is for: the confirm page's query, and the same fields as
/// the retry's form. `item` repeats for the items selected on a run page.
#[derive(Debug, Default)]
pub struct Target {
    scope: String,
    reason: Option<String>,
    items: Vec<String>,
}

impl Target {
    /// From `application/x-www-form-urlencoded` text (a query or a form
    /// body); unknown fields are ignored.
    fn parse(form: &str) -> Self {
        let mut t = Self::default();
        for pair in form.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = url_decode(v);
            match url_decode(k).as_str() {
                "scope" => t.scope = v,
                "reason" => t.reason = Some(v),
                "item" => t.items.push(v),
                _ => {}
            }
        }
        t
    }
}

/// What a retry would move.
struct Targets {
    /// `None` for all of the run's failed items.
    only: Option<BTreeSet<ItemId>>,
    n: u64,
    /// What they are, as HTML.
    what: String,
    /// Selected items that have not failed (any more), as HTML: left as
    /// they are.
    left: Vec<String>,
}

/// The items a retry would move, and how to say so.
async fn targets(ui: &Ui, run: &RunRecord, t: &Target) -> Result<Targets, PageError> {
    let mut left = Vec::new();
    let (only, n, what) = match (t.scope.as_str(), &t.reason, t.items.as_slice()) {
        ("all", ..) => (None, run.failed, "every failed item".to_owned()),
        ("reason", Some(reason), _) => {
            let ids = with_reason(ui, &run.id, reason).await?;
            let n = ids.len() as u64;
            let what = format!("the failed items whose reason is “{}”", esc(reason));
            (Some(ids), n, what)
        }
        ("item", _, [item]) => {
            let (id, rec) = commands::item_record(&ui.d, run, item).await?;
            if rec.status != ItemStatus::Failed {
                return Err(not_failed(&id, rec.status));
            }
            let what = format!("item <code>{}</code>", esc(id.as_str()));
            (Some(BTreeSet::from([id])), 1, what)
        }
        ("item", ..) => {
            return Err(PageError::new(
                StatusCode::BAD_REQUEST,
                "scope=item takes exactly one item=; scope=selected takes several",
            ))
        }
        ("selected", _, []) => {
            return Err(PageError::new(
                StatusCode::BAD_REQUEST,
                "no items selected: tick the failed items to retry, then Retry selected",
            ))
        }
        ("selected", _, items) => {
            let mut ids = BTreeSet::new();
            for item in items {
                ids.insert(
                    ItemId::new(item.clone())
                        .map_err(|e| input(format!("item id {item:?}: {e}")))?,
                );
            }
            if ids.len() > SELECTED_MAX {
                return Err(PageError::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "{} items selected: one retry takes at most {SELECTED_MAX}; \
                         retry by reason or all failed items instead",
                        ids.len()
                    ),
                ));
            }
            // One ledger read for the whole selection.
            let keys: Vec<(RunId, ItemId)> =
                ids.iter().map(|i| (run.id.clone(), i.clone())).collect();
            let rows = ui.d.backend.ledger.items(&keys).await?;
            let mut failed = BTreeSet::new();
            let mut not = Vec::new();
            for key in keys {
                match rows.get(&key) {
                    Some(row) if row.value.status == ItemStatus::Failed => {
                        failed.insert(key.1);
                    }
                    Some(row) => not.push((key.1, row.value.status)),
                    None => {
                        return Err(input(format!(
                            "no record of item \"{}\" in run {} (not in the run, or not attempted yet)",
                            report::clean(key.1.as_str()),
                            run.id
                        ))
                        .into())
                    }
                }
            }
            // Those that no longer have failed (the page was read before
            // another retry) are left as they are, and said so; if none
            // has, there is nothing to confirm.
            if failed.is_empty() {
                if let Some((id, status)) = not.first() {
                    return Err(not_failed(id, *status));
                }
            }
            left = not
                .iter()
                .map(|(id, status)| format!("<code>{}</code> ({})", esc(id.as_str()), status.as_str()))
                .collect();
            let n = failed.len() as u64;
            let what = if n == 1 {
                "the 1 selected item that has failed".to_owned()
            } else {
                format!("the {n} selected items that have failed")
            };
            (Some(failed), n, what)
        }
        _ => {
            return Err(PageError::new(
                StatusCode::BAD_REQUEST,
                "scope must be all, reason (with reason=), item (with one item=) or selected (with item= for each)",
            ))
        }
    };
    Ok(Targets {
        only,
        n,
        what,
        left,
    })
}

fn not_failed(id: &ItemId, status: ItemStatus) -> PageError {
    PageError::new(
        StatusCode::CONFLICT,
        format!(
            "item \"{}\" has not failed (it is {}); only failed items are retried",
            id.as_str(),
            status.as_str()
        ),
    )
}

/// The selected items a retry leaves as they are, as a paragraph.
fn left_as_they_are(left: &[String]) -> String {
    if left.is_empty() {
        return String::new();
    }
    format!(
        "<p class=\"left\">Not failed, so left as they are: {}.</p>\n",
        left.join(", ")
    )
}

fn hidden(t: &Target) -> String {
    let mut out = format!(
        "<input type=\"hidden\" name=\"scope\" value=\"{}\">",
        esc(&t.scope)
    );
    if let Some(r) = &t.reason {
        let _ = write!(
            out,
            "<input type=\"hidden\" name=\"reason\" value=\"{}\">",
            esc(r)
        );
    }
    for i in &t.items {
        let _ = write!(
            out,
            "<input type=\"hidden\" name=\"item\" value=\"{}\">",
            esc(i)
        );
    }
    out
}

fn items(n: u64) -> String {
    if n == 1 {
        "1 item".into()
    } else {
        format!("{n} items")
    }
}

/// The confirm step: how many items a retry will move, and the button.
pub async fn confirm(
    State(ui): S,
    Path(run): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Html<String>, PageError> {
    if ui.read_only {
        return Err(PageError::new(
            StatusCode::FORBIDDEN,
            "read-only: actions are refused",
        ));
    }
    let t = Target::parse(query.as_deref().unwrap_or(""));
    let run = commands::resolve(&ui.d, Some(&run)).await?;
    let Targets { n, what, left, .. } = targets(&ui, &run, &t).await?;
    let link = run_link(&run.id);
    let mut body = format!(
        "<p><a href=\"{link}\">run {}</a></p>\n<h1>Retry {} of run <code>{}</code>?</h1>\n",
        esc(run.id.as_str()),
        items(n),
        esc(run.id.as_str())
    );
    if n == 0 {
        let _ = writeln!(
            body,
            "<p>Nothing to retry: no failed items match ({what}).</p>"
        );
    } else {
        let _ = writeln!(
            body,
            "<p class=\"confirm\">This will move <strong data-field=\"will-move\">{n}</strong> \
             {} ({what}) from the dead-letter queue back to the work queue, as \
             <code>settle redrive</code> does; each is attempted again with the run's processor \
             and the tally follows.</p>\n{}<form method=\"post\" action=\"/runs/{}/retry\">{}\
             <button type=\"submit\" class=\"danger\">Retry {}</button> <a href=\"{link}\">Cancel</a></form>",
            if n == 1 { "item" } else { "items" },
            left_as_they_are(&left),
            url(run.id.as_str()),
            hidden(&t),
            items(n)
        );
    }
    Ok(Html(page("Retry", &body)))
}

/// The retry itself: `settle redrive`'s move, then its processing in the
/// background (on the embedded backend, or with local workers, the local
/// runner here; with deployed workers it only follows the tally).
pub async fn retry(
    State(ui): S,
    Path(run): Path<String>,
    headers: HeaderMap,
    form: String,
) -> Result<Html<String>, PageError> {
    let form_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !form_type {
        return Err(PageError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a retry is a form: Content-Type application/x-www-form-urlencoded",
        ));
    }
    let t = Target::parse(&form);
    let run = commands::resolve(&ui.d, Some(&run)).await?;
    let Targets {
        only,
        n,
        what,
        left,
    } = targets(&ui, &run, &t).await?;
    if n == 0 {
        return Err(PageError::new(
            StatusCode::CONFLICT,
            "nothing to retry: no failed items match",
        ));
    }
    let Ok(busy) = ui.busy.clone().try_lock_owned() else {
        return Err(PageError::new(
            StatusCode::CONFLICT,
            "a retry is still being processed by this server; try again once its items have settled",
        ));
    };
    let chosen = commands::local_processor(&ui.d, &run, &ui.process)?;
    let stop = ui.stop.clone();
    let should_stop = move || stop.signal().is_some();
    let moved = commands::redrive_move(
        &ui.d,
        &run,
        only.as_ref(),
        false,
        &ui.process,
        chosen.as_ref(),
        &ui.stop,
        &should_stop,
    )
    .await?;
    let report = match moved {
        Moved::Report(r) => r,
        Moved::Interrupted(_) => {
            return Err(PageError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "stopping: the server is shutting down",
            ))
        }
    };
    let n = report.items.len() as u64;
    let not_moved = report.missing.len() as u64;
    ui.retries.fetch_add(1, Ordering::Relaxed);
    ui.moved.fetch_add(n, Ordering::Relaxed);
    ui.not_moved.fetch_add(not_moved, Ordering::Relaxed);
    tracing::info!(run = %run.id, moved = n, not_moved, "retry from the ui");
    let bg = ui.clone();
    let run_id = run.id.clone();
    *ui.retrying() = Some(run.id.clone());
    let moved = report.clone();
    tokio::spawn(async move {
        // Dropped in this order, also if processing panics: the run's page
        // stops saying "processing a retry", then the next retry may start.
        let _busy = busy;
        let _retrying = super::Retrying(bg.clone());
        match commands::redrive_process(&bg.d, &run_id, &bg.process, chosen.as_ref(), &moved, &bg.stop).await {
            Ok(Finish::Done(..)) => {}
            Ok(Finish::Interrupted(..)) => eprintln!(
                "settle ui: stopped while processing retried items of run {run_id}; `settle resume {run_id}` finishes them"
            ),
            Ok(Finish::Throttled(..)) => eprintln!(
                "settle ui: the retried items of run {run_id} were throttled past the run's --max-throttle-wait; `settle resume {run_id}` finishes them"
            ),
            Err(e) => eprintln!(
                "error: processing the retried items of run {run_id}: {}; `settle resume {run_id}` finishes them",
                report::clean(&format!("{e:#}"))
            ),
        }
    });
    let link = run_link(&run.id);
    let mut body = format!(
        "<p><a href=\"{link}\">run {}</a></p>\n<h1>Retried {what}</h1>\n\
         <p class=\"result\">Moved <strong data-field=\"moved\">{n}</strong> {}; not moved: \
         <strong data-field=\"not-moved\">{not_moved}</strong>.</p>\n{}",
        esc(run.id.as_str()),
        if n == 1 { "item" } else { "items" },
        left_as_they_are(&left),
    );
    if not_moved > 0 {
        let shown: Vec<String> = report
            .missing
            .iter()
            .take(5)
            .map(|i| esc(i.as_str()))
            .collect();
        let _ =
            writeln!(
            body,
            "<p>Not moved: {}{}. Their messages were hidden by another pass over the dead-letter \
             queue (a redrive or reconciliation running now, or one that was cut off) for up to \
             2 minutes; retry again after that.</p>",
            shown.join(", "),
            if report.missing.len() > 5 { ", …" } else { "" }
        );
    }
    let _ = writeln!(
        body,
        "<p><a class=\"button\" href=\"{link}\">Follow the tally</a></p>"
    );
    Ok(Html(page("Retried", &body)))
}

/// The run's results as `settle results` writes them, streamed page by
/// page (a run may have millions of items). A failure part-way ends the
/// response early, so the download is seen to be incomplete.
pub async fn results(State(ui): S, Path(run): Path<String>) -> Result<Response, PageError> {
    let run = commands::resolve(&ui.d, Some(&run)).await?;
    let name = format!("attachment; filename=\"{}.jsonl\"", run.id.as_str());
    // The cursor after the last page sent; `None` once the end was read.
    let start: Option<Option<String>> = Some(None);
    let lines = futures::stream::try_unfold(start, move |cursor| {
        let (ui, run) = (ui.clone(), run.id.clone());
        async move {
            let Some(cursor) = cursor else {
                return Ok(None);
            };
            Ok::<_, anyhow::Error>(
                crate::results::page(&ui.d, &run, None, cursor.as_deref())
                    .await?
                    .map(|(lines, _, next)| (lines, next.map(Some))),
            )
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson".to_owned()),
            (header::CONTENT_DISPOSITION, name),
        ],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::Target;

    #[test]
    fn a_target_keeps_every_selected_item_decoded() {
        let t = Target::parse("scope=selected&item=a+b&item=%3Cp%26%221%3E&x=1&item=&reason");
        assert_eq!(t.scope, "selected");
        assert_eq!(t.items, ["a b", "<p&\"1>", ""]);
        assert_eq!(t.reason.as_deref(), Some(""));
        let t = Target::parse("");
        assert!(t.scope.is_empty() && t.items.is_empty() && t.reason.is_none());
    }
}
