//! The conformance suite: one set of contract clauses that every backend
//! runs, object_store style. Each clause is a plain async function over a
//! [`Subject`]; [`conformance_tests!`] expands to one test per clause, so a
//! backend cannot skip one silently. Where backends differ, the difference
//! is a field of [`Subject`], not a skipped clause.
//!
//! The clauses live in one file per port (`queue`, `source`, `ledger`,
//! `idempotency`) and one for the stages that span ports (`stages`); this
//! file holds the [`Subject`], the helpers they share, and the one list
//! of clauses.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed clause.

pub mod faults;
mod idempotency;
mod ledger;
pub mod processors;
mod queue;
pub mod sim;
mod source;
mod stages;

pub use idempotency::*;
pub use ledger::*;
pub use queue::*;
pub use source::*;
pub use stages::*;

use serde_json::value::RawValue;
use settle_core::domain::{
    now_millis, Attempt, AttemptOutcome, ErrorKind, Item, ItemId, RunConfig,
};
use settle_core::idempotency::IdempotencyStore;
use settle_core::message::ResultBody;
use settle_core::ports::{Delivery, Ledger, Queue, Source};
use settle_core::{dispatch, redrive, RunId};
use std::sync::Arc;
use std::time::Duration;

/// A backend under test, with fresh (empty) queues and store.
#[derive(Debug, Clone)]
pub struct Subject {
    pub work: Arc<dyn Queue>,
    /// The work queue's dead-letter queue.
    pub dlq: Arc<dyn Queue>,
    pub results: Arc<dyn Queue>,
    pub source: Arc<dyn Source>,
    pub ledger: Arc<dyn Ledger>,
    pub idempotency: Arc<dyn IdempotencyStore>,
    /// The work queue's redrive limit: receives before a message moves to `dlq`.
    pub work_max_receives: u32,
    /// Whether the CLI keeps one dead letter per failed item when a run
    /// settles ([`settle_core::Capabilities::cheap_dlq_scan`]): then the
    /// simulation does the same and asserts exactly one.
    pub cheap_dlq_scan: bool,
}

/// The visibility timeout the clauses use: SQS counts whole seconds.
pub const VIS: Duration = Duration::from_secs(1);
/// Long enough for a message hidden for [`VIS`] to be visible again.
pub(crate) const AFTER_VIS: Duration = Duration::from_millis(1300);

pub(crate) fn item(id: &str, payload: &str) -> Item {
    Item::new(
        ItemId::new(id).unwrap(),
        RawValue::from_string(payload.into()).unwrap(),
    )
}

/// Receives until `want` messages arrived or a few empty polls in a row:
/// SQS may answer a receive with fewer messages than are visible.
pub async fn receive_n(q: &dyn Queue, want: usize, vis: Duration) -> Vec<Delivery> {
    let mut got = Vec::new();
    let mut empty = 0;
    while got.len() < want && empty < 5 {
        let batch = q.receive((want - got.len()).min(10), vis).await.unwrap();
        if batch.is_empty() {
            empty += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        got.extend(batch);
    }
    got
}

pub(crate) async fn delete_all(q: &dyn Queue, ds: &[Delivery]) {
    for chunk in ds.chunks(10) {
        q.delete(chunk.iter().map(|d| d.receipt.clone()).collect())
            .await
            .unwrap();
    }
}

pub(crate) async fn fresh_run(s: &Subject, total: u64) -> RunId {
    let items: Vec<_> = (0..total)
        .map(|i| Ok((i + 1, item(&format!("t{i}"), "null"))))
        .collect();
    if total > 0 {
        s.source.load(Box::new(items.into_iter())).await.unwrap();
    }
    let run = dispatch::create_run(s.ledger.as_ref(), RunConfig::default())
        .await
        .unwrap();
    while s.source.claim(&run.id, 1000).await.unwrap() > 0 {}
    s.ledger
        .record_dispatch(&run.id, total, None, true)
        .await
        .unwrap();
    run.id
}

pub(crate) fn result(
    run: &RunId,
    item: &str,
    attempt: u32,
    msg: &str,
    outcome: AttemptOutcome,
) -> Delivery {
    let body = ResultBody {
        run: run.clone(),
        item: ItemId::new(item).unwrap(),
        // The clauses name items t0, t1, ... in claim order.
        seq: item[1..].parse().unwrap(),
        attempt: Attempt {
            attempt,
            message_id: msg.into(),
            started_at: now_millis(),
            duration_ms: 1,
            outcome,
            output: None,
            log: None,
            retry_at: None,
        },
    };
    Delivery {
        message_id: format!("res-{item}-{attempt}-{msg}"),
        receipt: String::new(),
        body: body.encode(),
        receive_count: 1,
    }
}

pub(crate) fn failed(terminal: bool) -> AttemptOutcome {
    AttemptOutcome::Failed {
        kind: ErrorKind::Retryable,
        error: "declined".into(),
        terminal,
    }
}

/// Redrives every dead-lettered message of `run` on `s`.
pub async fn redrive_all(
    s: &Subject,
    run: &RunId,
) -> Result<redrive::RedriveReport, redrive::RedriveError> {
    redrive::redrive(
        s.ledger.as_ref(),
        s.dlq.as_ref(),
        s.work.as_ref(),
        run,
        None,
        false,
        &|| false,
    )
    .await
}

/// Expands to one `#[tokio::test]` per clause, each on a fresh subject from
/// `$fresh` (an async expression yielding a [`Subject`]).
///
/// The `@list` arm is the one list of clauses, each named once with its
/// port's module: both these tests and [`CLAUSES`] expand from it, so a
/// clause is in both or in neither, and `every_clause_is_listed` below
/// fails for a clause function missing from it.
#[macro_export]
macro_rules! conformance_tests {
    ($fresh:expr) => {
        $crate::conformance_tests!(@list tests $fresh);
    };
    (@list $then:ident $($args:expr)?) => {
        $crate::conformance_tests! { @$then $($args)?;
            queue::queue_send_receive_delete,
            queue::queue_visibility_timeout_redelivers,
            queue::queue_change_visibility,
            queue::queue_limits,
            queue::queue_redrive_to_dlq,
            queue::queue_messages_of_one_send_are_independent,
            queue::queue_delayed_send_and_batch_visibility,
            source::source_load_is_atomic,
            source::source_claims_are_exclusive,
            source::source_ids_recur_across_runs,
            source::source_claims_stop_at_the_first_claims_bound,
            source::source_load_run_owns_its_items,
            ledger::ledger_commit_is_conditional_and_atomic,
            ledger::ledger_dispatch_progress_only_moves_forward,
            ledger::ledger_redriving_keeps_a_run_open,
            ledger::ledger_redrive_scope_round_trips,
            ledger::ledger_duplicate_results_count_once,
            ledger::ledger_redrive_success_moves_failed_to_succeeded,
            ledger::ledger_bad_result_fails_alone,
            stages::reconcile_settles_messages_the_queue_parked,
            stages::redrive_moves_one_message_per_item,
            stages::redrive_cut_off_is_finished_by_resume,
            stages::a_redelivery_is_not_an_attempt,
            stages::throttled_never_dead_letters,
            stages::reconcile_drops_a_parked_copy_of_a_recorded_failure,
            stages::extra_dead_letters_are_dropped_one_per_item_kept,
            idempotency::idempotency_first_execution_stores_result,
            idempotency::idempotency_duplicate_returns_stored_result,
            idempotency::idempotency_different_payload_is_refused,
            idempotency::idempotency_expired_claim_is_reclaimed,
            idempotency::idempotency_unexpired_claim_is_in_progress,
            idempotency::idempotency_failure_releases_the_claim,
            idempotency::idempotency_concurrent_claimers_execute_once
        }
    };
    (@names; $($port:ident :: $clause:ident),*) => {
        &[$(stringify!($clause)),*]
    };
    (@tests $fresh:expr; $($port:ident :: $clause:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $clause() {
                let subject = $fresh.await;
                $crate::$clause(&subject).await;
            }
        )*
        #[test]
        fn clause_list_is_complete() {
            let expanded: &[&str] = &[$(stringify!($clause)),*];
            assert_eq!(expanded, $crate::CLAUSES, "the macro and CLAUSES disagree");
        }
    };
}

/// Every clause, by name, in the order of [`conformance_tests!`]'s list.
pub const CLAUSES: &[&str] = conformance_tests!(@list names);

#[cfg(test)]
mod tests {
    /// Every clause function of a port's file, by name: a public async
    /// function taking the [`crate::Subject`] alone.
    fn clause_functions() -> Vec<&'static str> {
        [
            include_str!("queue.rs"),
            include_str!("source.rs"),
            include_str!("ledger.rs"),
            include_str!("stages.rs"),
            include_str!("idempotency.rs"),
        ]
        .iter()
        .flat_map(|file| file.lines())
        .filter_map(|line| line.strip_prefix("pub async fn "))
        .filter_map(|rest| rest.strip_suffix("(s: &Subject) {"))
        .collect()
    }

    #[test]
    fn every_clause_is_listed() {
        let mut defined = clause_functions();
        let mut listed = crate::CLAUSES.to_vec();
        defined.sort_unstable();
        listed.sort_unstable();
        assert_eq!(
            defined, listed,
            "a clause function is missing from the list"
        );
    }
}
