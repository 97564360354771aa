//! The reduce stage: results in, an exact tally out. Exactness is this
//! module's job, not the backend's: rows are read, each result is applied by
//! [`ItemRecord::apply`] (which recognises duplicates), and the rows and the
//! run tallies are committed together, conditional on the versions read.

use crate::domain::ports::{Delivery, ItemPut, Ledger, LedgerBatch, PortError, MAX_COMMIT_ACTIONS};
use crate::domain::{now_millis, ItemId, ItemRecord, RunId, RunRecord, TallyDelta};
use crate::stages::work::BatchResponse;
use crate::wire::message::{decode_results, ResultBody};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Conflicts are retried this many times before the batch is given back to the queue.
const MAX_CONFLICT_RETRIES: u32 = 16;
/// Failed ids named in a run's summary log line.
const SUMMARY_FAILED_IDS: usize = 20;

/// What a reduce call did.
#[derive(Debug, Default, Clone)]
pub struct ReduceReport {
    /// Messages to deliver again (undecodable, or their commit failed).
    pub response: BatchResponse,
    /// Results applied for the first time.
    pub applied: usize,
    /// Results that had been applied before (duplicate deliveries). On a
    /// ledger without [`Ledger::atomic_commit`], a commit retried after a
    /// conflict also counts here the rows its first try did write.
    pub duplicates: usize,
    /// Runs whose last pending item settled in this call.
    pub settled: Vec<RunRecord>,
}

/// Applies a batch of results-queue messages to the ledger.
pub async fn reduce(ledger: &dyn Ledger, batch: &[Delivery]) -> ReduceReport {
    let mut report = ReduceReport::default();
    let mut decoded: Vec<(String, ResultBody)> = Vec::with_capacity(batch.len());
    for d in batch {
        match decode_results(&d.body) {
            Ok(rs) => decoded.extend(rs.into_iter().map(|r| (d.message_id.clone(), r))),
            Err(e) => {
                // Retried, then parked in the results DLQ by its redrive policy.
                tracing::error!(message_id = %d.message_id, error = %e, "undecodable result");
                report.response.failures.push(d.message_id.clone());
            }
        }
    }
    for chunk in chunks(&decoded) {
        match commit_chunk(ledger, chunk).await {
            Ok(done) => {
                report.applied += done.applied;
                report.duplicates += done.duplicates;
                for run in done.runs {
                    if run.is_settled() && run.settled_at.is_none() {
                        match ledger.mark_settled(&run.id, now_millis()).await {
                            Ok(true) => {
                                log_summary(ledger, &run).await;
                                report.settled.push(run);
                            }
                            Ok(false) => {}
                            Err(e) => {
                                tracing::warn!(run = %run.id, error = %e, "could not mark the run settled")
                            }
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, results = chunk.len(), "could not commit results; they will be retried");
                // A message whose results span two chunks is retried whole;
                // the results already applied then count as duplicates.
                for (m, _) in chunk {
                    if !report.response.failures.contains(m) {
                        report.response.failures.push(m.clone());
                    }
                }
            }
        }
    }
    report
}

/// Splits results so that each commit's item rows plus run rows fit one transaction.
fn chunks(results: &[(String, ResultBody)]) -> Vec<&[(String, ResultBody)]> {
    // The usual case, without hashing every key: a batch of fewer results
    // than a commit holds, from a run or two (each result is at most one
    // item row, each distinct run one tally row).
    const FEW_RUNS: usize = 4;
    let mut runs: Vec<&RunId> = Vec::new();
    for (_, r) in results {
        if !runs.contains(&&r.run) {
            runs.push(&r.run);
            if runs.len() > FEW_RUNS {
                break;
            }
        }
    }
    if runs.len() <= FEW_RUNS && results.len() + runs.len() <= MAX_COMMIT_ACTIONS {
        return if results.is_empty() {
            Vec::new()
        } else {
            vec![results]
        };
    }
    let mut out = Vec::new();
    let mut start = 0;
    let mut items = std::collections::HashSet::new();
    let mut runs = std::collections::HashSet::new();
    for (i, (_, r)) in results.iter().enumerate() {
        let new_item = !items.contains(&(&r.run, &r.item));
        let new_run = !runs.contains(&r.run);
        if items.len() + runs.len() + usize::from(new_item) + usize::from(new_run)
            > MAX_COMMIT_ACTIONS
        {
            out.push(&results[start..i]);
            start = i;
            items.clear();
            runs.clear();
        }
        items.insert((&r.run, &r.item));
        runs.insert(&r.run);
    }
    if start < results.len() {
        out.push(&results[start..]);
    }
    out
}

struct Committed {
    applied: usize,
    duplicates: usize,
    runs: Vec<RunRecord>,
}

async fn commit_chunk(
    ledger: &dyn Ledger,
    chunk: &[(String, ResultBody)],
) -> Result<Committed, PortError> {
    let mut tries = 0;
    loop {
        // An item's first attempt is nearly always the first result for it,
        // so on an atomic ledger the first try does not read those rows: it
        // inserts them if absent. A row that exists after all (a duplicate
        // delivery, or a later attempt reduced first) fails the whole commit
        // with a conflict, and the retry reads every row. The read skipped is
        // most of the reducer's reads.
        let guess = tries == 0 && ledger.atomic_commit();
        let keys: Vec<(RunId, ItemId)> = chunk
            .iter()
            .filter(|(_, r)| !(guess && r.attempt.attempt == 1))
            .map(|(_, r)| (r.run.clone(), r.item.clone()))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let existing = if keys.is_empty() {
            HashMap::new()
        } else {
            ledger.items(&keys).await?
        };
        let seqs: HashMap<(RunId, ItemId), u64> = chunk
            .iter()
            .map(|(_, r)| ((r.run.clone(), r.item.clone()), r.seq))
            .collect();
        let now = now_millis();
        let mut rows: BTreeMap<(RunId, ItemId), (Option<u64>, ItemRecord)> = BTreeMap::new();
        // Ordered, so that the commit's actions come in the same order on every replay.
        let mut tallies: BTreeMap<RunId, TallyDelta> = BTreeMap::new();
        let (mut applied, mut duplicates) = (0, 0);
        for (_, r) in chunk {
            let key = (r.run.clone(), r.item.clone());
            let (_, record) = rows
                .entry(key.clone())
                .or_insert_with(|| match existing.get(&key) {
                    Some(v) => (Some(v.version), v.value.clone()),
                    None => (None, ItemRecord::default()),
                });
            match record.apply(&r.attempt, now) {
                Some(delta) => {
                    applied += 1;
                    if delta.failed < 0 {
                        tracing::info!(run = %r.run, item = %r.item, attempt = r.attempt.attempt,
                            "item moved from failed to succeeded");
                    }
                    tallies.entry(r.run.clone()).or_default().add(delta);
                }
                None => duplicates += 1,
            }
        }
        if applied == 0 {
            // Nothing new: no write at all, the cheapest duplicate. But the
            // runs are read for the settle check: the try that applied these
            // results may have stopped before it (a crash, or a conflict
            // after a non-atomic commit had counted them).
            let mut runs = Vec::new();
            for run in rows
                .keys()
                .map(|(run, _)| run)
                .collect::<std::collections::BTreeSet<_>>()
            {
                runs.extend(ledger.run(run).await?);
            }
            return Ok(Committed {
                applied,
                duplicates,
                runs,
            });
        }
        let batch = LedgerBatch {
            puts: rows
                .into_iter()
                .filter(|(k, (expected, record))| {
                    // Rows the chunk left as they were need no write.
                    expected.is_none() || existing.get(k).map(|v| &v.value) != Some(record)
                })
                .map(|((run, item), (expected, record))| ItemPut {
                    seq: seqs[&(run.clone(), item.clone())],
                    run,
                    item,
                    expected,
                    record,
                })
                .collect(),
            tallies: tallies.into_iter().collect(),
        };
        match ledger.commit(batch).await {
            Ok(runs) => {
                return Ok(Committed {
                    applied,
                    duplicates,
                    runs,
                })
            }
            Err(PortError::Conflict) if tries < MAX_CONFLICT_RETRIES => {
                tries += 1;
                // Another reducer wrote one of these rows: back off, re-read,
                // re-apply. A wrong guess needs no back-off, only the read.
                if !guess {
                    let ms = fastrand::u64(1..=(5 << tries.min(6)));
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            }
            Err(e) => return Err(e),
        }
    }
}

async fn log_summary(ledger: &dyn Ledger, run: &RunRecord) {
    let failed: Vec<String> = match ledger.failures(&run.id, None, SUMMARY_FAILED_IDS).await {
        Ok(f) => f.into_iter().map(|(id, _)| id.to_string()).collect(),
        Err(e) => vec![format!("(could not list: {e})")],
    };
    tracing::info!(run = %run.id, status = %run.status(), total = run.total,
        succeeded = run.succeeded, failed = run.failed, failed_ids = ?failed,
        "{}", run.summary());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Attempt, AttemptOutcome};

    fn results(run: &RunId, items: impl IntoIterator<Item = usize>) -> Vec<(String, ResultBody)> {
        items
            .into_iter()
            .map(|i| {
                let r = ResultBody {
                    run: run.clone(),
                    item: ItemId::new(format!("i{i}")).unwrap(),
                    seq: i as u64,
                    attempt: Attempt {
                        attempt: 1,
                        message_id: format!("m{i}"),
                        started_at: 0,
                        duration_ms: 0,
                        outcome: AttemptOutcome::Succeeded,
                        output: None,
                        log: None,
                        retry_at: None,
                    },
                };
                (r.attempt.message_id.clone(), r)
            })
            .collect()
    }

    /// Item rows plus run rows of a chunk.
    fn actions(chunk: &[(String, ResultBody)]) -> usize {
        let items: std::collections::HashSet<_> =
            chunk.iter().map(|(_, r)| (&r.run, &r.item)).collect();
        let runs: std::collections::HashSet<_> = chunk.iter().map(|(_, r)| &r.run).collect();
        items.len() + runs.len()
    }

    #[test]
    fn chunks_fit_a_commit_and_keep_every_result_in_order() {
        let (a, b) = (RunId::generate(0), RunId::generate(1000));
        let many_runs: Vec<_> = (0..8)
            .flat_map(|k| {
                results(
                    &RunId::generate(k * 1000),
                    k as usize * 20..k as usize * 20 + 20,
                )
            })
            .collect();
        let cases = [
            results(&a, 0..90),
            results(&a, 0..99),
            results(&a, 0..100),
            results(&a, 0..250),
            [results(&a, 0..60), results(&b, 0..60)].concat(),
            // Repeats of one item take one row: 120 results, 61 actions.
            [results(&a, 0..60), results(&a, 0..60)].concat(),
            many_runs,
            Vec::new(),
        ];
        let expected_chunks = [1, 1, 2, 3, 2, 1, 2, 0];
        for (input, expected) in cases.iter().zip(expected_chunks) {
            let out = chunks(input);
            assert_eq!(out.len(), expected, "{} results", input.len());
            assert!(out
                .iter()
                .all(|c| !c.is_empty() && actions(c) <= MAX_COMMIT_ACTIONS));
            let rejoined: Vec<_> = out.concat();
            assert_eq!(&rejoined, input);
        }
    }
}
