//! Redrive: move a run's dead-lettered messages (all, or named items) back
//! to the work queue. Only messages of the named run are touched; a message
//! that is in flight is invisible and so never duplicated.
//!
//! A redrive's scope is recorded with the run before anything moves
//! ([`Ledger::set_redrive`]) and stays recorded until the caller has seen
//! every item of it moved and processed ([`Ledger::clear_redrive`]): a
//! redrive cut off anywhere is finished by [`resume`], which moves the rest
//! of the same scope. The scope's id marks the messages it sends back, so
//! that a dead letter moved by this redrive and failed again is told apart
//! from one still waiting to be moved.

use crate::domain::ports::{Delivery, Ledger, PortError, Queue, MAX_QUEUE_BATCH};
use crate::domain::{ItemId, ItemStatus, RedriveScope, RunId, Selection};
use crate::wire::message::WorkBody;
use std::collections::BTreeSet;
use std::time::Duration;

/// How long scanned DLQ messages stay hidden while one redrive pass runs;
/// a pass cut off outright leaves what it held hidden for this long.
pub const SCAN_VISIBILITY: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    #[error("run {0} not found")]
    UnknownRun(RunId),
    #[error("item \"{item}\" is not in run {run}")]
    UnknownItem { run: RunId, item: ItemId },
    #[error("item \"{item}\" of run {run} has not failed (it is {status}); only failed items are redriven")]
    NotFailed {
        run: RunId,
        item: ItemId,
        status: &'static str,
    },
    #[error(transparent)]
    Port(#[from] PortError),
}

/// What one pass of a redrive moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedriveReport {
    /// The redrive's scope (recorded with the run unless this was a dry run).
    pub scope: RedriveScope,
    /// Items whose messages were moved (or would be, on a dry run).
    pub items: BTreeSet<ItemId>,
    /// Messages moved (or that would be): one per item.
    pub messages: u64,
    /// Extra copies of moved items' messages found in the DLQ and deleted.
    pub stale: u64,
    /// Items of the scope whose dead letter this redrive had sent back
    /// before (a pass that was cut off) and that failed again: done with.
    pub earlier: BTreeSet<ItemId>,
    /// Failed items of the scope with no message the scan could move:
    /// hidden by another scan of the DLQ (one still running, or one cut
    /// off) for up to its visibility timeout. Empty after a scan that was
    /// stopped, which looked at only part of the DLQ.
    pub missing: BTreeSet<ItemId>,
    /// The scan stopped early, when asked to: some of the run's DLQ
    /// messages may not have been looked at.
    pub stopped: bool,
}

impl RedriveReport {
    fn new(scope: RedriveScope) -> Self {
        Self {
            scope,
            items: BTreeSet::new(),
            messages: 0,
            stale: 0,
            earlier: BTreeSet::new(),
            missing: BTreeSet::new(),
            stopped: false,
        }
    }

    /// Every failed item of the scope was moved (or would be, on a dry run).
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty() && !self.stopped
    }
}

/// Starts a redrive of the run's DLQ messages, or only those of `only`.
/// Named items are checked first: an unknown or not-failed item is an error
/// and nothing moves. Over an unfinished redrive of the run, the new one
/// takes the union of both scopes ([`RedriveScope::union`]). Before it moves
/// anything it records the scope ([`Ledger::set_redrive`]) and opens the
/// run's redrive ([`Ledger::set_redriving`]); processing what moved, closing
/// the run's redrive and clearing the scope once it is complete are the
/// caller's. `stop` is asked between DLQ batches: a redrive told to stop
/// keeps what it moved and gives back what it hid.
pub async fn redrive(
    ledger: &dyn Ledger,
    dlq: &dyn Queue,
    work: &dyn Queue,
    run: &RunId,
    only: Option<&BTreeSet<ItemId>>,
    dry_run: bool,
    stop: &(dyn Fn() -> bool + Send + Sync),
) -> Result<RedriveReport, RedriveError> {
    let Some(record) = ledger.run(run).await? else {
        return Err(RedriveError::UnknownRun(run.clone()));
    };
    if let Some(only) = only {
        let keys: Vec<_> = only.iter().map(|i| (run.clone(), i.clone())).collect();
        let rows = ledger.items(&keys).await?;
        for (r, item) in keys {
            match rows.get(&(r.clone(), item.clone())) {
                None => return Err(RedriveError::UnknownItem { run: r, item }),
                Some(v) if v.value.status != ItemStatus::Failed => {
                    return Err(RedriveError::NotFailed {
                        run: r,
                        item,
                        status: v.value.status.as_str(),
                    })
                }
                Some(_) => {}
            }
        }
    }
    let asked = RedriveScope::new(match only {
        Some(only) => Selection::items(only.clone()),
        None => Selection::all_failed(),
    });
    let scope = match &record.redrive {
        // The unfinished one was promised to the operator: keep its items.
        Some(unfinished) => unfinished.union(&asked),
        None => asked,
    };
    if !dry_run {
        ledger.set_redrive(run, &scope).await?;
        ledger.set_redriving(run, true).await?;
    }
    let after_cut = record.redrive.is_some() || record.redriving;
    pass(ledger, dlq, work, run, scope, dry_run, after_cut, stop).await
}

/// Continues the run's recorded, unfinished redrive
/// ([`RunRecord::redrive`](crate::domain::RunRecord::redrive)): moves the
/// scope's dead letters that it has not moved yet, as [`redrive`] does.
/// `None` when the run has no unfinished redrive.
pub async fn resume(
    ledger: &dyn Ledger,
    dlq: &dyn Queue,
    work: &dyn Queue,
    run: &RunId,
    stop: &(dyn Fn() -> bool + Send + Sync),
) -> Result<Option<RedriveReport>, RedriveError> {
    let Some(record) = ledger.run(run).await? else {
        return Err(RedriveError::UnknownRun(run.clone()));
    };
    let Some(scope) = record.redrive else {
        return Ok(None);
    };
    ledger.set_redriving(run, true).await?;
    Ok(Some(
        pass(ledger, dlq, work, run, scope, false, true, stop).await?,
    ))
}

/// One pass of the redrive of `scope` over the DLQ, then what it missed.
///
/// With `after_cut`, an earlier pass may have been cut off between sending
/// a message back and deleting its dead letter: the items about to move are
/// read from the ledger (one read per DLQ batch, no write) and the dead
/// letters of those that have succeeded since are deleted, not moved.
#[allow(clippy::too_many_arguments)]
async fn pass(
    ledger: &dyn Ledger,
    dlq: &dyn Queue,
    work: &dyn Queue,
    run: &RunId,
    scope: RedriveScope,
    dry_run: bool,
    after_cut: bool,
    stop: &(dyn Fn() -> bool + Send + Sync),
) -> Result<RedriveReport, RedriveError> {
    let mut report = RedriveReport::new(scope.clone());
    let mut hidden: Vec<String> = Vec::new();
    let scan = Scan {
        ledger: after_cut.then_some(ledger),
        dlq,
        work,
        run,
        scope: &scope,
        dry_run,
        stop,
    };
    let result = scan.run(&mut report, &mut hidden).await;
    // Whatever happened, give back what this pass hid and did not move.
    release(dlq, &hidden).await;
    result?;
    if report.stopped {
        return Ok(report);
    }
    // The scope's items that are failed now; the moved ones are among them
    // until they are processed.
    let failed: BTreeSet<ItemId> = match scope.named_items() {
        Some(named) => {
            let keys: Vec<_> = named.into_iter().map(|i| (run.clone(), i)).collect();
            ledger
                .items(&keys)
                .await?
                .into_iter()
                .filter(|(_, v)| v.value.status == ItemStatus::Failed)
                .map(|((_, item), _)| item)
                .collect()
        }
        None => {
            let mut failed = BTreeSet::new();
            let mut after: Option<ItemId> = None;
            loop {
                let page = ledger.failures(run, after.as_ref(), FAILURES_PAGE).await?;
                let full = page.len() == FAILURES_PAGE;
                after = page.last().map(|(id, _)| id.clone());
                failed.extend(
                    page.into_iter()
                        .map(|(id, _)| id)
                        .filter(|id| scope.admits(id)),
                );
                if !full {
                    break;
                }
            }
            failed
        }
    };
    report.missing = failed
        .into_iter()
        .filter(|i| !report.items.contains(i) && !report.earlier.contains(i))
        .collect();
    Ok(report)
}

/// Failed items read per ledger call when redrive lists a run's failures.
const FAILURES_PAGE: usize = 1000;

/// Tries each release this many times: a message left hidden is invisible
/// to the next scan (a redrive would miss it) until its timeout runs out.
const RELEASE_TRIES: u32 = 3;

/// Makes the DLQ messages a scan hid and did not take visible again.
pub(crate) async fn release(dlq: &dyn Queue, hidden: &[String]) {
    for receipt in hidden {
        let mut tries = 0;
        while let Err(e) = dlq.change_visibility(receipt, Duration::ZERO).await {
            tries += 1;
            if tries >= RELEASE_TRIES {
                tracing::warn!(error = %e, "could not release a DLQ message; it reappears after its visibility timeout");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50 << tries)).await;
        }
    }
}

/// One pass over the DLQ.
struct Scan<'a> {
    /// Set when stale copies may be in the DLQ (see [`pass`]).
    ledger: Option<&'a dyn Ledger>,
    dlq: &'a dyn Queue,
    work: &'a dyn Queue,
    run: &'a RunId,
    scope: &'a RedriveScope,
    dry_run: bool,
    stop: &'a (dyn Fn() -> bool + Send + Sync),
}

impl Scan<'_> {
    async fn run(
        &self,
        report: &mut RedriveReport,
        hidden: &mut Vec<String>,
    ) -> Result<(), PortError> {
        let Self {
            ledger,
            dlq,
            work,
            run,
            scope,
            dry_run,
            stop,
        } = *self;
        // Marks what this pass sends back: the redrive's id, then the pass's.
        let earlier_mark = format!("{}/", scope.id);
        let pass = format!("{earlier_mark}{:016x}", fastrand::u64(..));
        while let Some(batch) = next_scan_batch(dlq, SCAN_VISIBILITY).await? {
            if stop() {
                // Not taken: given back with the rest of what this pass hid.
                hidden.extend(batch.into_iter().map(|d| d.receipt));
                report.stopped = true;
                break;
            }
            let mut moves: Vec<(&Delivery, WorkBody)> = Vec::new();
            let mut stale: Vec<String> = Vec::new();
            for d in &batch {
                match WorkBody::decode(&d.body) {
                    // Sent back by this pass and dead-lettered again already
                    // (workers run while it scans): a failure of its own,
                    // to keep, not an older copy.
                    Ok(b) if b.redrive.as_deref() == Some(pass.as_str()) => {
                        hidden.push(d.receipt.clone())
                    }
                    // Sent back by an earlier pass of this redrive (one that
                    // was cut off) and failed again: done with, unless this
                    // pass moved another copy of the item (one the cut-off
                    // pass had not reached), whose outcome replaces it.
                    Ok(b)
                        if &b.run == run
                            && b.redrive
                                .as_deref()
                                .is_some_and(|m| m.starts_with(&earlier_mark)) =>
                    {
                        if report.items.contains(&b.item)
                            || moves.iter().any(|(_, m)| m.item == b.item)
                        {
                            if dry_run {
                                hidden.push(d.receipt.clone());
                            } else {
                                stale.push(d.receipt.clone());
                            }
                        } else {
                            report.earlier.insert(b.item);
                            hidden.push(d.receipt.clone());
                        }
                    }
                    // A second copy of an item this redrive moved (a
                    // duplicate delivery that was dead-lettered too, or the
                    // copy left by a pass cut off between its send and its
                    // delete): one message per item goes back, the copies
                    // are dropped, so the item is processed once and the
                    // DLQ ends with at most one.
                    Ok(b)
                        if &b.run == run
                            && (report.items.contains(&b.item)
                                || report.earlier.contains(&b.item)
                                || moves.iter().any(|(_, m)| m.item == b.item)) =>
                    {
                        if dry_run {
                            hidden.push(d.receipt.clone());
                        } else {
                            stale.push(d.receipt.clone());
                        }
                    }
                    Ok(b) if &b.run == run && scope.admits(&b.item) => moves.push((d, b)),
                    // Other runs' messages, and bodies that belong to no run, stay.
                    _ => hidden.push(d.receipt.clone()),
                }
            }
            if let Some(ledger) = ledger.filter(|_| !moves.is_empty()) {
                // A dead letter of an item that has succeeded since is a
                // copy left by a pass cut off between its send and its
                // delete: processing it again would attempt a settled item.
                let keys: Vec<_> = moves
                    .iter()
                    .map(|(_, b)| (run.clone(), b.item.clone()))
                    .collect();
                let rows = ledger.items(&keys).await?;
                let succeeded = |b: &WorkBody| {
                    rows.get(&(run.clone(), b.item.clone()))
                        .is_some_and(|v| v.value.status == ItemStatus::Succeeded)
                };
                let (done, rest): (Vec<_>, Vec<_>) =
                    moves.into_iter().partition(|(_, b)| succeeded(b));
                moves = rest;
                for (d, _) in done {
                    if dry_run {
                        hidden.push(d.receipt.clone());
                    } else {
                        stale.push(d.receipt.clone());
                    }
                }
            }
            for (d, b) in &moves {
                report.items.insert(b.item.clone());
                report.messages += 1;
                if dry_run {
                    hidden.push(d.receipt.clone());
                }
            }
            if !stale.is_empty() {
                report.stale += stale.len() as u64;
                dlq.delete(stale).await?;
            }
            if dry_run || moves.is_empty() {
                continue;
            }
            let bodies: Vec<String> = moves
                .iter()
                .map(|(_, b)| {
                    // Attempts keep counting across the redrive. A message
                    // the queue parked by itself made its attempt (it died
                    // on each receive).
                    let prior = match &b.dead {
                        Some(dead) => dead.attempts,
                        None => b.attempt(),
                    };
                    WorkBody {
                        prior_attempts: prior,
                        round: prior,
                        dead: None,
                        lost_receives: 0,
                        resent: false,
                        not_before: None,
                        redrive: Some(pass.clone()),
                        ..b.clone()
                    }
                    .encode()
                })
                .collect();
            // Send before delete: a crash between them leaves a duplicate, never a loss.
            let sizes: Vec<usize> = bodies.iter().map(String::len).collect();
            for range in crate::domain::ports::send_batches(&sizes) {
                work.send(bodies[range].to_vec()).await?;
            }
            dlq.delete(moves.iter().map(|(d, _)| d.receipt.clone()).collect())
                .await?;
        }
        Ok(())
    }
}

/// The next batch of a DLQ scan, hidden for `visibility`; `None` once the
/// scan is over. SQS may answer empty while messages are visible, so a scan
/// stops only when the queue agrees that nothing visible is left.
pub(crate) async fn next_scan_batch(
    dlq: &dyn Queue,
    visibility: Duration,
) -> Result<Option<Vec<Delivery>>, PortError> {
    loop {
        let batch = dlq.receive(MAX_QUEUE_BATCH, visibility).await?;
        if !batch.is_empty() {
            return Ok(Some(batch));
        }
        if dlq.depth().await?.visible == 0 {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
