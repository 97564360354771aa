//! What the CLI prints: a human summary by default, one JSON object as the
//! last line of stdout with `--json`.

use serde_json::{json, Value};
use settle_core::domain::RedriveScope;
use settle_core::domain::{now_millis, AttemptOutcome, ItemStatus, Millis};
use settle_core::{ItemId, ItemRecord, RunRecord};
use std::borrow::Cow;
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
        "throttled": run.throttled,
        // Items whose next try waits long (a retry-after): how many, and
        // until when at the latest.
        "waiting": run.waiting_at(now_millis()).map(|(items, until)| json!({
            "items": items,
            "until": time(until),
        })),
        "redriving": run.redriving,
        // The unfinished redrive, if any: `resume` finishes it.
        "redrive": run.redrive.as_ref().map(|scope| json!({
            "complete": false,
            "scope": scope_json(scope),
        })),
    })
}

/// A redrive's scope in JSON: its selections, any of which takes an item
/// (`{}` takes every failed item, `{"items": [...]}` the named ones).
pub fn scope_json(scope: &RedriveScope) -> Value {
    json!(scope.select)
}

/// A redrive's scope in words.
fn scope_human(scope: &RedriveScope) -> String {
    match scope.named_items() {
        None => "every failed item".to_owned(),
        Some(items) => {
            let shown: Vec<Cow<'_, str>> =
                items.iter().take(5).map(|i| clean(i.as_str())).collect();
            let more = items.len().saturating_sub(shown.len());
            format!(
                "{} {}{}",
                if items.len() == 1 { "item" } else { "items" },
                shown.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            )
        }
    }
}

/// Text from outside (a processor's error, an id) as it may reach a
/// terminal: each character [`hidden`] escaped as Rust writes it (`\n`,
/// `\u{1b}`, `\u{202e}`), so that a newline cannot forge a line of the
/// listing, an escape sequence cannot drive the terminal, and a bidi
/// override cannot show `\u{202e}gnp.exe` as `exe.png`. JSON output keeps
/// the text as it is; JSON escapes the control characters anyway.
pub fn clean(text: &str) -> Cow<'_, str> {
    escape(text, hidden)
}

/// Whether a character must not reach a terminal as it is: a control
/// character (Unicode category Cc), a format character (Cf: bidi controls,
/// zero-width characters, the soft hyphen) or a line or paragraph separator
/// (Zl, Zp). Each either moves or hides text, or breaks a line where a
/// reader sees none. Cf, Zl and Zp are listed by code point, as of Unicode
/// 16 (no crate of Unicode tables for a list this short); Cc is std's.
pub fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c as u32,
            0x00AD
                | 0x0600..=0x0605
                | 0x061C
                | 0x06DD
                | 0x070F
                | 0x0890..=0x0891
                | 0x08E2
                | 0x180E
                | 0x200B..=0x200F
                | 0x2028..=0x202E
                | 0x2060..=0x2064
                | 0x2066..=0x206F
                | 0xFEFF
                | 0xFFF9..=0xFFFB
                | 0x110BD
                | 0x110CD
                | 0x13430..=0x1343F
                | 0x1BCA0..=0x1BCA3
                | 0x1D173..=0x1D17A
                | 0xE0001
                | 0xE0020..=0xE007F
        )
}

/// `text` with every character `escaped` says escaped (`char::escape_debug`
/// writes each of them as `\u{..}` or a short escape).
pub(crate) fn escape(text: &str, escaped: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !text.chars().any(&escaped) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if escaped(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

pub fn time(ms: Millis) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// `HH:MM UTC`, with the date in front when it is not today's.
fn clock_time(ms: Millis) -> String {
    let (at, today) = (time(ms), time(now_millis()));
    if at[..10] == today[..10] {
        format!("{} UTC", &at[11..16])
    } else {
        format!("{} {} UTC", &at[..10], &at[11..16])
    }
}

fn plural(n: u64, one: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {one}s")
    }
}

/// Failures read to group them by reason: enough for the causes of any
/// run, bounded for a run with millions of failures.
pub const REASONS_SAMPLE: usize = 10_000;

/// Reasons listed under a summary before "and N other reasons".
const REASONS_SHOWN: usize = 5;

/// A failed item's reason: its last error, with the item's own id read as
/// `<id>` (see [`reasons`]).
pub fn reason(id: &ItemId, rec: &ItemRecord) -> String {
    let error = rec.last_error.as_deref().unwrap_or("(no error recorded)");
    if id.as_str().len() > 2 && error.contains(id.as_str()) {
        error.replace(id.as_str(), "<id>")
    } else {
        error.to_owned()
    }
}

/// A run's failures counted by reason, most frequent first. The item's own
/// id in an error reads `<id>`, so "card declined for sub-7" and "... for
/// sub-9" are one reason.
pub fn reasons(failures: &[(ItemId, ItemRecord)]) -> Vec<(String, u64)> {
    let mut counts: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for (id, rec) in failures {
        *counts.entry(reason(id, rec)).or_default() += 1;
    }
    let mut out: Vec<(String, u64)> = counts.into_iter().collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out
}

/// "Failures by reason", from the failures that were read (`sampled` of
/// the run's `failed`).
fn reasons_human(out: &mut String, reasons: &[(String, u64)], sampled: u64, failed: u64) {
    if reasons.is_empty() {
        return;
    }
    let of = if sampled < failed {
        format!(" (of the first {sampled})")
    } else {
        String::new()
    };
    out.push_str(&format!("Failures by reason{of}:\n"));
    for (reason, n) in reasons.iter().take(REASONS_SHOWN) {
        out.push_str(&format!("  {n:>6} x {}\n", clean(reason)));
    }
    if reasons.len() > REASONS_SHOWN {
        out.push_str(&format!(
            "  ... and {} other reasons\n",
            reasons.len() - REASONS_SHOWN
        ));
    }
}

/// The run summary: status, the "Processed N items…" line, the failures
/// by reason, and the first failures. `failures` are the first ones in id
/// order (up to [`REASONS_SAMPLE`]). `took` is how long this command
/// processed, and how many items it settled in that time.
pub fn run_human(
    run: &RunRecord,
    failures: &[(ItemId, ItemRecord)],
    took: Option<(Duration, u64)>,
) -> String {
    let first_failures = &failures[..failures.len().min(FIRST_FAILURES)];
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
    if let Some((items, until)) = run.waiting_at(now_millis()) {
        out.push_str(&format!(
            "Waiting until {} for {} (a retry-after asked for a later try)\n",
            clock_time(until),
            plural(items, "item")
        ));
    }
    if run.throttled > 0 {
        out.push_str(&format!(
            "Throttled {} by the service called (not failures; no attempt used)\n",
            plural(run.throttled, "time")
        ));
    }
    if run.failed > 0 {
        reasons_human(
            &mut out,
            &reasons(failures),
            failures.len() as u64,
            run.failed,
        );
        out.push_str(&format!(
            "Failed items (first {} of {}):\n",
            first_failures.len(),
            run.failed
        ));
        for (id, rec) in first_failures {
            out.push_str(&format!(
                "  {}  after {}: {}\n",
                clean(id.as_str()),
                plural(u64::from(rec.attempts), "attempt"),
                clean(rec.last_error.as_deref().unwrap_or("(no error recorded)"))
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
    if let Some(scope) = &run.redrive {
        out.push_str(&format!(
            "A redrive of this run ({}) is unfinished: its items count as failed until \
             they are moved back and processed. If no settle command is processing it now \
             (it was stopped), finish it with: settle resume {}\n",
            scope_human(scope),
            run.id
        ));
    } else if run.redriving {
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
        .map(|(id, _)| clean(id.as_str()).chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    let n = failures.len() as u64;
    reasons_human(&mut out, &reasons(failures), n, n);
    if !failures.is_empty() {
        out.push_str(&format!("{:width$}  attempts  last error\n", "item"));
    }
    for (id, r) in failures {
        out.push_str(&format!(
            "{:width$}  {:>8}  {}\n",
            clean(id.as_str()),
            r.attempts,
            clean(r.last_error.as_deref().unwrap_or(""))
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
        } => (
            "failed",
            Some(kind.as_str()),
            Some(error.as_str()),
            *terminal,
        ),
        // Throttled answers are counted on the item, not kept as attempts.
        AttemptOutcome::Throttled { .. } => ("throttled", None, None, false),
    }
}

pub fn item_json(run: &RunId, id: &ItemId, rec: &ItemRecord) -> Value {
    json!({
        "run_id": run,
        "item_id": id,
        "status": rec.status,
        "attempts": rec.attempts,
        "throttled": rec.throttled,
        "waiting_until": rec.waiting_until.map(time),
        "last_error": rec.last_error,
        "output": rec.output(),
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
                "output": a.output,
                "log": a.log,
            })
        }).collect::<Vec<_>>(),
    })
}

/// An attempt's log as it may reach a terminal: lines stay lines, but
/// every other character [`hidden`] is escaped (see [`clean`]).
pub fn clean_log(text: &str) -> Cow<'_, str> {
    escape(text, |c| hidden(c) && c != '\n' && c != '\t')
}

/// Each attempt's log under a line naming the attempt.
pub fn logs_human(rec: &ItemRecord, only: Option<u32>) -> String {
    let mut out = String::new();
    for a in rec
        .history
        .iter()
        .filter(|a| only.is_none_or(|n| a.attempt == n))
    {
        let (outcome, ..) = outcome_parts(&a.outcome);
        out.push_str(&format!(
            "== attempt {} ({outcome}, {} ms) ==\n",
            a.attempt, a.duration_ms
        ));
        match &a.log {
            Some(log) => {
                out.push_str(&clean_log(log));
                if !log.ends_with('\n') {
                    out.push('\n');
                }
            }
            None => out.push_str("(nothing written)\n"),
        }
    }
    out
}

use settle_core::RunId;

pub fn item_human(run: &RunId, id: &ItemId, rec: &ItemRecord) -> String {
    let mut out = format!(
        "Item {} of run {run}: {} after {}\n",
        clean(id.as_str()),
        rec.status.as_str(),
        plural(u64::from(rec.attempts), "attempt")
    );
    // Only a failed item's last error says why it is where it is; a
    // succeeded item's earlier errors stay in the history below.
    if let (ItemStatus::Failed, Some(e)) = (rec.status, &rec.last_error) {
        out.push_str(&format!("Last error: {}\n", clean(e)));
    }
    out.push_str("attempt  started (UTC)             took       outcome\n");
    for a in &rec.history {
        let (outcome, kind, error, terminal) = outcome_parts(&a.outcome);
        let mut what = match (kind, error) {
            (Some(k), Some(e)) => format!("{outcome} ({k}): {}", clean(e)),
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
    if let Some(o) = rec.output() {
        out.push_str(&format!("Output: {}\n", clean(o.get())));
    }
    if rec.history.iter().any(|a| a.log.is_some()) {
        out.push('\n');
        out.push_str(&logs_human(rec, None));
    }
    out
}

/// Ids listed by a human dry-run redrive before "... and N more".
pub const DRY_RUN_IDS: usize = 20;

/// What a dry-run redrive would move: the first [`DRY_RUN_IDS`] ids, as a
/// run may have thousands of failed items.
pub fn dry_run_human(run: &RunId, ids: &[&str]) -> String {
    let shown: Vec<Cow<'_, str>> = ids.iter().take(DRY_RUN_IDS).map(|id| clean(id)).collect();
    let more = ids.len() - shown.len();
    let mut out = format!("Dry run: would redrive {} items of run {run}", ids.len());
    if !shown.is_empty() {
        out.push_str(&format!(": {}", shown.join(", ")));
    }
    if more > 0 {
        out.push_str(&format!(" ... and {more} more (--json lists them all)"));
    }
    out.push('\n');
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use settle_core::domain::{Attempt, ErrorKind};
    use settle_core::RunConfig;

    fn run(failed: u64) -> RunRecord {
        let mut run = RunRecord::new(
            RunId::parse("r20261123T235300Z-0a1b2c").unwrap(),
            RunConfig::default(),
            0,
        );
        run.dispatched = true;
        run.total = 2 + failed;
        run.succeeded = 2;
        run.failed = failed;
        run
    }

    fn failed(error: &str) -> Attempt {
        Attempt {
            attempt: 1,
            message_id: "m1".into(),
            started_at: 0,
            duration_ms: 3,
            outcome: AttemptOutcome::Failed {
                kind: ErrorKind::Retryable,
                error: error.into(),
                terminal: false,
            },
            output: None,
            log: None,
            retry_at: None,
        }
    }

    #[test]
    fn failures_group_by_reason_with_the_items_own_id_folded() {
        let f = |id: &str, e: &str| {
            (
                ItemId::new(id).unwrap(),
                record(ItemStatus::Failed, e, vec![failed(e)]),
            )
        };
        let failures = vec![
            f("sub-1", "HTTP 402: card_declined"),
            f("sub-2", "card declined for sub-2"),
            f("sub-3", "HTTP 402: card_declined"),
            f("sub-4", "card declined for sub-4"),
            f("sub-5", "card declined for sub-5"),
            f("sub-6", "timed out after 30000 ms"),
        ];
        assert_eq!(
            reasons(&failures),
            vec![
                ("card declined for <id>".to_owned(), 3),
                ("HTTP 402: card_declined".to_owned(), 2),
                ("timed out after 30000 ms".to_owned(), 1),
            ]
        );
        let mut out = String::new();
        reasons_human(&mut out, &reasons(&failures), 6, 600);
        assert!(
            out.starts_with("Failures by reason (of the first 6):\n"),
            "{out}"
        );
        assert!(out.contains("     3 x card declined for <id>\n"), "{out}");
    }

    fn record(status: ItemStatus, error: &str, history: Vec<Attempt>) -> ItemRecord {
        ItemRecord {
            status,
            attempts: history.len() as u32,
            last_error: Some(error.into()),
            history,
            updated_at: 0,
            throttled: 0,
            waiting_until: None,
        }
    }

    const FORGED: &str = "boom\nRun r20261123T235300Z-0a1b2c: succeeded\u{1b}[31m";
    const ESCAPED: &str = "boom\\nRun r20261123T235300Z-0a1b2c: succeeded\\u{1b}[31m";

    #[test]
    fn clean_escapes_control_characters_only() {
        assert!(matches!(clean("plain é ✓"), Cow::Borrowed("plain é ✓")));
        assert_eq!(clean(FORGED), ESCAPED);
        assert_eq!(clean("a\tb\r\0\u{7f}\u{9f}"), "a\\tb\\r\\0\\u{7f}\\u{9f}");
    }

    #[test]
    fn format_characters_and_separators_are_escaped_too() {
        // A bidi override would show this id as "exe.png".
        assert_eq!(clean("\u{202e}gnp.exe"), "\\u{202e}gnp.exe");
        assert_eq!(
            clean("a\u{2028}b\u{2029}c\u{200b}d\u{ad}e\u{feff}"),
            "a\\u{2028}b\\u{2029}c\\u{200b}d\\u{ad}e\\u{feff}"
        );
        assert_eq!(clean_log("l1\n\u{2066}l2\t"), "l1\n\\u{2066}l2\t");
        // Each range's ends are in, its neighbours out.
        for (lo, hi) in [
            (0x00AD, 0x00AD),
            (0x0600, 0x0605),
            (0x061C, 0x061C),
            (0x06DD, 0x06DD),
            (0x070F, 0x070F),
            (0x0890, 0x0891),
            (0x08E2, 0x08E2),
            (0x180E, 0x180E),
            (0x200B, 0x200F),
            (0x2028, 0x202E),
            (0x2060, 0x2064),
            (0x2066, 0x206F),
            (0xFEFF, 0xFEFF),
            (0xFFF9, 0xFFFB),
            (0x110BD, 0x110BD),
            (0x110CD, 0x110CD),
            (0x13430, 0x1343F),
            (0x1BCA0, 0x1BCA3),
            (0x1D173, 0x1D17A),
            (0xE0001, 0xE0001),
            (0xE0020, 0xE007F),
        ] {
            let ch = |cp: u32| char::from_u32(cp).unwrap();
            assert!(hidden(ch(lo)) && hidden(ch(hi)), "U+{lo:04X}..U+{hi:04X}");
            assert!(!hidden(ch(hi + 1)), "U+{:04X}", hi + 1);
            assert!(!hidden(ch(lo - 1)), "U+{:04X}", lo - 1);
        }
        // Letters of the scripts those ranges sit in stay as they are.
        for text in ["plain é ✓", "مرحبا", "שלום", "日本語", "a\u{200}b", " "] {
            assert!(matches!(clean(text), Cow::Borrowed(_)), "{text:?}");
        }
    }

    #[test]
    fn processor_errors_print_on_one_line_without_escapes() {
        let rec = record(ItemStatus::Failed, FORGED, vec![failed(FORGED)]);
        let id = ItemId::new("a1").unwrap();
        let one = [(id.clone(), rec.clone())];
        let texts = [
            run_human(&run(1), &one, None),
            failures_human(&run(1), &one),
            item_human(&run(1).id, &id, &rec),
        ];
        for text in texts {
            assert!(!text.contains('\u{1b}'), "{text}");
            let lines: Vec<&str> = text.lines().filter(|l| l.contains("boom")).collect();
            assert!(!lines.is_empty(), "{text}");
            for line in lines {
                assert!(line.ends_with(ESCAPED), "{line:?} in\n{text}");
            }
            assert_eq!(
                text.lines().filter(|l| l.starts_with("Run ")).count(),
                usize::from(!text.starts_with("Item ")),
                "no forged line: {text}"
            );
        }
    }

    #[test]
    fn show_prints_the_last_error_of_a_failed_item_only() {
        let id = ItemId::new("a1").unwrap();
        let history = vec![failed("flaky"), {
            let mut ok = failed("");
            ok.attempt = 2;
            ok.outcome = AttemptOutcome::Succeeded;
            ok
        }];
        let succeeded = item_human(
            &run(0).id,
            &id,
            &record(ItemStatus::Succeeded, "flaky", history.clone()),
        );
        assert!(!succeeded.contains("Last error"), "{succeeded}");
        assert!(
            succeeded.contains("failed (retryable): flaky"),
            "the history keeps it: {succeeded}"
        );
        let failed = item_human(
            &run(1).id,
            &id,
            &record(ItemStatus::Failed, "flaky", history),
        );
        assert!(failed.contains("Last error: flaky\n"), "{failed}");
    }

    #[test]
    fn a_dry_run_lists_at_most_20_ids() {
        let id = run(0).id;
        let few = dry_run_human(&id, &["a", "b"]);
        assert_eq!(
            few,
            "Dry run: would redrive 2 items of run r20261123T235300Z-0a1b2c: a, b\n"
        );
        let names: Vec<String> = (0..2500).map(|i| format!("i{i}")).collect();
        let many: Vec<&str> = names.iter().map(String::as_str).collect();
        let text = dry_run_human(&id, &many);
        assert!(text.contains(": i0, i1, "), "{text}");
        assert!(
            text.contains(", i19 ... and 2480 more (--json lists them all)\n"),
            "{text}"
        );
        assert!(!text.contains("i20"), "{text}");
        assert_eq!(
            dry_run_human(&id, &[]),
            "Dry run: would redrive 0 items of run r20261123T235300Z-0a1b2c\n"
        );
    }
}
