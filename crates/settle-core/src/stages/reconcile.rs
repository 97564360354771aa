//! The reconciler: settles items whose work message the queue dead-lettered
//! by itself.
//!
//! The worker records a terminal failure on an item's last receive
//! (`max_receives`, below the queue's maxReceiveCount), so normally the
//! ledger learns of every dead-lettered item. But if the worker reports
//! nothing on the remaining receives either (it crashed, or the processor
//! hung past the visibility timeout, every time), the queue's redrive
//! policy parks the message in the DLQ unmarked and the item stays pending:
//! its run would never settle. The reconciler finds such messages and turns
//! each into what the worker would have reported: a terminal failure result
//! for the reducer, and a marked copy in the DLQ that `redrive` moves back
//! like any other.

use crate::domain::backend::Backend;
use crate::domain::ports::{send_batches, Delivery, Ledger, PortError, Queue, MAX_QUEUE_BATCH};
use crate::domain::{now_millis, Attempt, AttemptOutcome, ErrorKind, ItemId, ItemStatus, RunId};
use crate::stages::redrive::{next_scan_batch, release};
use crate::wire::message::{pack_results, DeadLetter, ResultBody, WorkBody};
use std::collections::hash_map::Entry;
use std::time::Duration;

/// How long scanned DLQ messages stay hidden while one pass runs.
const SCAN_VISIBILITY: Duration = Duration::from_secs(120);

/// What a reconcile pass found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Parked messages reported as terminal failures (and marked in the DLQ).
    pub failed: u64,
    /// Parked messages of items that had succeeded after all (a result that
    /// arrived late), or whose terminal failure a worker had recorded and
    /// dead-lettered already: removed from the DLQ, as the item is settled
    /// and, if failed, has its dead letter.
    pub dropped: u64,
}

/// Reports the run's unmarked DLQ messages as terminal failures. Other
/// runs' messages, marked ones and undecodable ones are left as they were.
pub async fn reconcile_parked(
    ledger: &dyn Ledger,
    dlq: &dyn Queue,
    results: &dyn Queue,
    run: &RunId,
) -> Result<ReconcileReport, PortError> {
    let mut report = ReconcileReport::default();
    let mut hidden: Vec<String> = Vec::new();
    let outcome = scan(ledger, dlq, results, run, &mut report, &mut hidden).await;
    // Give back what this pass hid and did not replace.
    release(dlq, &hidden).await;
    outcome?;
    if report.failed + report.dropped > 0 {
        tracing::warn!(run = %run, failed = report.failed, dropped = report.dropped,
            "reconciled work messages the queue dead-lettered without a result");
    }
    Ok(report)
}

/// The scheduled form, for a deployment with no operator watching: when
/// nothing is in flight anywhere (work and results queues empty), any of
/// the `recent` newest runs that finished dispatching and still has pending
/// items can only be waiting for messages the queue parked; reconcile those.
/// While anything is in flight it does nothing, so a busy deployment's
/// running items are never mistaken for parked ones.
pub async fn sweep_when_quiet(b: &Backend, recent: usize) -> Result<ReconcileReport, PortError> {
    let mut total = ReconcileReport::default();
    if b.work.depth().await?.total() > 0 || b.results.depth().await?.total() > 0 {
        return Ok(total);
    }
    for run in b.ledger.runs(recent).await? {
        if run.dispatched && run.pending() > 0 {
            let r = reconcile_parked(
                b.ledger.as_ref(),
                b.dlq.as_ref(),
                b.results.as_ref(),
                &run.id,
            )
            .await?;
            total.failed += r.failed;
            total.dropped += r.dropped;
        }
    }
    Ok(total)
}

async fn scan(
    ledger: &dyn Ledger,
    dlq: &dyn Queue,
    results: &dyn Queue,
    run: &RunId,
    report: &mut ReconcileReport,
    hidden: &mut Vec<String>,
) -> Result<(), PortError> {
    while let Some(batch) = next_scan_batch(dlq, SCAN_VISIBILITY).await? {
        let mut parked: Vec<(&Delivery, WorkBody)> = Vec::new();
        for d in &batch {
            match WorkBody::decode(&d.body) {
                Ok(b) if &b.run == run && b.dead.is_none() => parked.push((d, b)),
                _ => hidden.push(d.receipt.clone()),
            }
        }
        if parked.is_empty() {
            continue;
        }
        let keys: Vec<_> = parked
            .iter()
            .map(|(_, b)| (run.clone(), b.item.clone()))
            .collect();
        let rows = ledger.items(&keys).await?;
        // Nothing to report for an item that succeeded, or whose worker
        // recorded this very message's terminal failure (and so sent its
        // dead letter) before the queue parked a copy of it too.
        let settled = |d: &Delivery, b: &WorkBody| {
            rows.get(&(run.clone(), b.item.clone())).is_some_and(|v| {
                v.value.status == ItemStatus::Succeeded
                    || v.value.history.iter().any(|a| {
                        a.message_id == d.message_id
                            && matches!(a.outcome, AttemptOutcome::Failed { terminal: true, .. })
                    })
            })
        };
        let now = now_millis();
        let mut reports = Vec::new();
        let mut marked = Vec::new();
        for (d, b) in parked.iter().filter(|(d, b)| !settled(d, b)) {
            let attempts = b.attempt();
            let error = format!(
                "no result after attempt {attempts}: the work queue dead-lettered the message \
                 (the worker crashed or timed out on each receive)"
            );
            reports.push(
                ResultBody {
                    run: run.clone(),
                    item: b.item.clone(),
                    seq: b.seq,
                    attempt: Attempt {
                        attempt: attempts,
                        message_id: d.message_id.clone(),
                        started_at: now,
                        duration_ms: 0,
                        retry_at: None,
                        outcome: AttemptOutcome::Failed {
                            kind: ErrorKind::Retryable,
                            error: error.clone(),
                            terminal: true,
                        },
                        output: None,
                        log: None,
                    },
                }
                .encode(),
            );
            marked.push(
                WorkBody {
                    dead: Some(DeadLetter { error, attempts }),
                    ..b.clone()
                }
                .encode(),
            );
        }
        // Result, then the marked copy, then the delete: a crash between
        // any two repeats a step on the next pass (the reducer counts a
        // repeated result once), never skips one.
        let packed: Vec<String> = pack_results(&reports).into_iter().map(|(b, _)| b).collect();
        send_all(results, packed).await?;
        send_all(dlq, marked.clone()).await?;
        dlq.delete(parked.iter().map(|(d, _)| d.receipt.clone()).collect())
            .await?;
        report.failed += marked.len() as u64;
        report.dropped += (parked.len() - marked.len()) as u64;
    }
    Ok(())
}

async fn send_all(q: &dyn Queue, bodies: Vec<String>) -> Result<(), PortError> {
    let sizes: Vec<usize> = bodies.iter().map(String::len).collect();
    for range in send_batches(&sizes) {
        q.send(bodies[range].to_vec()).await?;
    }
    Ok(())
}

/// Deletes the run's extra dead letters, keeping one per item: a copy the
/// worker marked before one the queue parked by itself (a message whose
/// deletes were lost until it ran out of receives), and of those the one
/// that counts the most attempts. A process killed after an item's dead
/// letter was sent but before its work message was deleted leaves that
/// message to be delivered, attempted and dead-lettered again; `resume`
/// calls this once the run has settled, so the DLQ ends as it would have
/// without the crash. Other runs' and undecodable messages stay, and so
/// does an item's only copy, parked or not (the reconciler counts a parked
/// one). Returns how many copies were deleted.
pub async fn drop_extra_dead_letters(dlq: &dyn Queue, run: &RunId) -> Result<u64, PortError> {
    let mut hidden: Vec<String> = Vec::new();
    // Per item, the copy to keep: a marked one before one the queue parked
    // by itself, then the one that counts the most attempts.
    let mut best: std::collections::HashMap<ItemId, ((bool, u32), String)> = Default::default();
    let mut extra: Vec<String> = Vec::new();
    let scanned = async {
        while let Some(batch) = next_scan_batch(dlq, SCAN_VISIBILITY).await? {
            for d in batch {
                let Ok(b) = WorkBody::decode(&d.body) else {
                    hidden.push(d.receipt);
                    continue;
                };
                if &b.run != run {
                    hidden.push(d.receipt);
                    continue;
                }
                let rank = match &b.dead {
                    Some(dead) => (true, dead.attempts),
                    None => (false, b.attempt()),
                };
                match best.entry(b.item) {
                    Entry::Vacant(v) => {
                        v.insert((rank, d.receipt));
                    }
                    Entry::Occupied(mut o) if o.get().0 < rank => {
                        let (_, older) = o.insert((rank, d.receipt));
                        extra.push(older);
                    }
                    Entry::Occupied(_) => extra.push(d.receipt),
                }
            }
        }
        Ok::<_, PortError>(())
    }
    .await;
    let deleted = match scanned {
        Ok(()) => {
            let mut n = 0;
            let mut failed = None;
            for chunk in extra.chunks(MAX_QUEUE_BATCH) {
                match dlq.delete(chunk.to_vec()).await {
                    Ok(()) => n += chunk.len() as u64,
                    Err(e) => {
                        // The rest reappear after their visibility timeout.
                        failed = Some(e);
                        break;
                    }
                }
            }
            failed.map_or(Ok(n), Err)
        }
        // Nothing deleted: every copy comes back.
        Err(e) => {
            hidden.extend(extra);
            Err(e)
        }
    };
    hidden.extend(best.into_values().map(|(_, receipt)| receipt));
    release(dlq, &hidden).await;
    let deleted = deleted?;
    if deleted > 0 {
        tracing::info!(run = %run, deleted, "deleted extra dead letters left by an interrupted attempt");
    }
    Ok(deleted)
}
