//! Redrive: move a run's dead-lettered messages (all, or named items) back
//! to the work queue. Only messages of the named run are touched; a message
//! that is in flight is invisible and so never duplicated.

use crate::domain::ports::{Delivery, Ledger, PortError, Queue, MAX_QUEUE_BATCH};
use crate::domain::{ItemId, ItemStatus, RunId};
use crate::wire::message::WorkBody;
use std::collections::BTreeSet;
use std::time::Duration;

/// How long scanned DLQ messages stay hidden while one redrive pass runs.
const SCAN_VISIBILITY: Duration = Duration::from_secs(120);

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

/// What a redrive moved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedriveReport {
    /// Items whose messages were moved (or would be, on a dry run).
    pub items: BTreeSet<ItemId>,
    /// Messages moved (or that would be): one per item.
    pub messages: u64,
    /// Extra copies of moved items' messages found in the DLQ and deleted.
    pub stale: u64,
    /// Failed items (the named ones, or all of the run's) with no message
    /// the scan could move: hidden by another scan of the DLQ (one still
    /// running, or one cut off) for up to its visibility timeout. Empty
    /// after a scan that was stopped, which looked at only part of the DLQ.
    pub missing: BTreeSet<ItemId>,
    /// The scan stopped early, when asked to: some of the run's DLQ
    /// messages may not have been looked at.
    pub stopped: bool,
}

impl RedriveReport {
    /// Every failed item asked for was moved (or would be, on a dry run).
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty() && !self.stopped
    }
}

/// Moves the run's DLQ messages, or only those of `only`, to the work queue.
/// Named items are checked first: an unknown or not-failed item is an error
/// and nothing moves. Before it moves anything it opens the run's redrive
/// ([`Ledger::set_redriving`]); closing it, once the moved messages have
/// been processed, is the caller's. `stop` is asked between DLQ batches: a
/// redrive told to stop keeps what it moved and gives back what it hid.
pub async fn redrive(
    ledger: &dyn Ledger,
    dlq: &dyn Queue,
    work: &dyn Queue,
    run: &RunId,
    only: Option<&BTreeSet<ItemId>>,
    dry_run: bool,
    stop: &(dyn Fn() -> bool + Send + Sync),
) -> Result<RedriveReport, RedriveError> {
    if ledger.run(run).await?.is_none() {
        return Err(RedriveError::UnknownRun(run.clone()));
    }
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
    if !dry_run {
        ledger.set_redriving(run, true).await?;
    }
    let mut report = RedriveReport::default();
    let mut hidden: Vec<String> = Vec::new();
    let scan = Scan {
        dlq,
        work,
        run,
        only,
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
    report.missing = match only {
        Some(only) => only.difference(&report.items).cloned().collect(),
        None => {
            let mut failed = BTreeSet::new();
            let mut after: Option<ItemId> = None;
            loop {
                let page = ledger.failures(run, after.as_ref(), FAILURES_PAGE).await?;
                let full = page.len() == FAILURES_PAGE;
                after = page.last().map(|(id, _)| id.clone());
                failed.extend(page.into_iter().map(|(id, _)| id));
                if !full {
                    break;
                }
            }
            failed.difference(&report.items).cloned().collect()
        }
    };
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
    dlq: &'a dyn Queue,
    work: &'a dyn Queue,
    run: &'a RunId,
    only: Option<&'a BTreeSet<ItemId>>,
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
            dlq,
            work,
            run,
            only,
            dry_run,
            stop,
        } = *self;
        // Names this pass in the messages it sends back.
        let pass = format!("{:016x}", fastrand::u64(..));
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
                    // A second copy of an item this pass moved (a duplicate
                    // delivery that was dead-lettered too): one message per
                    // item goes back, the copies are dropped, so the item is
                    // processed once and the DLQ ends with at most one.
                    Ok(b)
                        if &b.run == run
                            && (report.items.contains(&b.item)
                                || moves.iter().any(|(_, m)| m.item == b.item)) =>
                    {
                        if dry_run {
                            hidden.push(d.receipt.clone());
                        } else {
                            stale.push(d.receipt.clone());
                        }
                    }
                    Ok(b) if &b.run == run && only.is_none_or(|o| o.contains(&b.item)) => {
                        moves.push((d, b))
                    }
                    // Other runs' messages, and bodies that belong to no run, stay.
                    _ => hidden.push(d.receipt.clone()),
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
