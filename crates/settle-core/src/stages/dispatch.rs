//! The dispatch stage: claim pending items into a run and enqueue one
//! message per item. Resumable: progress is saved with the run after every
//! page, so a dispatch cut off (a 15-minute Lambda, a killed process) picks
//! up where it stopped. A resend after a cut-off can duplicate a message;
//! the reducer counts each item once regardless.

use crate::domain::ports::{send_batches, Ledger, PortError, Queue, Source};
use crate::domain::{now_millis, RunConfig, RunId, RunRecord};
use crate::wire::message::WorkBody;
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use tokio::time::Instant;

/// Items claimed per claim call. A claim is one conditional write whatever
/// its size, and each one costs the dispatch loop a pause (a claim, then a
/// read of what it claimed): ten pages per claim keeps those pauses rare.
pub const CLAIM_CHUNK: usize = 10 * PAGE;
/// Items read and enqueued between two progress saves.
const PAGE: usize = 1000;
/// Send calls in flight at once: a whole page. On the embedded engine the
/// sends of a page then share one group commit instead of queueing behind
/// each other for several; on SQS they are independent HTTP calls.
const SEND_CONCURRENCY: usize = PAGE / crate::domain::ports::MAX_QUEUE_BATCH;

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("run {0} not found")]
    UnknownRun(RunId),
    #[error(transparent)]
    Port(#[from] PortError),
}

/// A new run's record, with a fresh id and nothing claimed yet.
pub fn new_run(config: RunConfig) -> RunRecord {
    let now = now_millis();
    RunRecord::new(RunId::generate(now), config, now)
}

/// Creates a new run (nothing claimed yet).
pub async fn create_run(ledger: &dyn Ledger, config: RunConfig) -> Result<RunRecord, PortError> {
    let run = new_run(config);
    ledger.create_run(&run).await?;
    Ok(run)
}

/// Whether dispatch finished, or stopped at the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatched {
    Done { total: u64 },
    Unfinished { enqueued: u64 },
}

/// Claims and enqueues until nothing is pending, or until `deadline`.
/// `resumed`: an earlier dispatch of this run may have been cut off after
/// it sent more than it saved (a crash, a kill, a retried invocation).
pub async fn dispatch(
    source: &dyn Source,
    ledger: &dyn Ledger,
    queue: &dyn Queue,
    run_id: &RunId,
    deadline: Option<Instant>,
    resumed: bool,
) -> Result<Dispatched, DispatchError> {
    let run = ledger
        .run(run_id)
        .await?
        .ok_or_else(|| DispatchError::UnknownRun(run_id.clone()))?;
    let mut cursor = run.cursor.clone();
    let mut enqueued = run.enqueued;
    let mut dispatched = run.dispatched;
    // The loop is pipelined, since each step is a round trip: while a page's
    // messages are sent, the next page is read and the previous page's
    // progress is saved. A save still follows its own page's sends.
    let mut page = source.claimed(run_id, cursor.as_deref(), PAGE).await?;
    let mut saved: Option<BoxFuture<'_, Result<(), PortError>>> = None;
    // After an interruption, what a dead dispatch may have sent past its
    // last saved page: the page it was sending and the next one, sent
    // while that save was on its way. Marked, so that workers wait for a
    // copy already queued instead of running the item twice.
    let mut resent_pages: u8 = if resumed { 2 } else { 0 };
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            if let Some(save) = saved.take() {
                save.await?;
            }
            return Ok(Dispatched::Unfinished { enqueued });
        }
        let (items, next) = page;
        if items.is_empty() {
            if let Some(save) = saved.take() {
                save.await?;
            }
            if dispatched {
                break;
            }
            if source.claim(run_id, CLAIM_CHUNK).await? == 0 {
                dispatched = true;
                ledger
                    .record_dispatch(run_id, enqueued, cursor.as_deref(), true)
                    .await?;
            }
            page = source.claimed(run_id, cursor.as_deref(), PAGE).await?;
            continue;
        }
        let n = items.len() as u64;
        let resent = resent_pages > 0;
        resent_pages -= u8::from(resent);
        let bodies: Vec<String> = items
            .into_iter()
            .enumerate()
            // `enqueued` counts the items before `cursor`, so an item's seq
            // is the same however often a resumed dispatch resends it.
            .map(|(i, item)| {
                let mut body = WorkBody::new(
                    run_id.clone(),
                    item,
                    enqueued + i as u64,
                    run.config.max_receives,
                );
                body.resent = resent;
                body.key = run.config.key_of(&body.payload);
                if !run.config.flow.is_empty() {
                    body.flow = Some(run.config.flow.clone());
                }
                body.encode()
            })
            .collect();
        // Owned chunks: borrowing ones trip a higher-ranked lifetime error in tokio::spawn.
        let sizes: Vec<usize> = bodies.iter().map(String::len).collect();
        let chunks: Vec<Vec<String>> = send_batches(&sizes)
            .into_iter()
            .map(|r| bodies[r].to_vec())
            .collect();
        let send = futures::stream::iter(chunks)
            .map(|chunk| queue.send(chunk))
            .buffer_unordered(SEND_CONCURRENCY)
            .try_collect::<Vec<()>>();
        let read = source.claimed(run_id, next.as_deref(), PAGE);
        let previous = async {
            match saved.take() {
                Some(save) => save.await,
                None => Ok(()),
            }
        };
        let (sent, read, previous) = futures::join!(send, read, previous);
        sent?;
        previous?;
        enqueued += n;
        cursor = next;
        page = read?;
        let at = cursor.clone();
        saved = Some(Box::pin(async move {
            ledger
                .record_dispatch(run_id, enqueued, at.as_deref(), dispatched)
                .await
        }));
    }
    let run = ledger
        .run(run_id)
        .await?
        .ok_or_else(|| DispatchError::UnknownRun(run_id.clone()))?;
    tracing::info!(run = %run_id, total = run.total, "dispatched");
    Ok(Dispatched::Done { total: run.total })
}
