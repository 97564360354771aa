//! The dispatcher function: a schedule tick (EventBridge) or a manual
//! invoke creates a run, claims the pending items into it and enqueues
//! them, until the invocation's time runs short; then a fresh invocation
//! continues the run from the cursor saved with it.
//!
//! **Overlapping invocations never dispatch an item twice.** Each new run
//! takes items only through `Source::claim`, which is atomic and exclusive
//! (an item is claimed by exactly one run, however many dispatchers claim
//! at once), and a dispatcher only reads back and enqueues its own run's
//! claimed items. So two schedule ticks that overlap split the pending
//! items between their runs. The one case where a page can be sent twice is
//! the same run resumed by two invocations at once (a retry racing a
//! continuation): both send the page after the saved cursor. That is a
//! duplicate delivery of the same (run, item), which the reducer counts
//! once and the processor sees under the same idempotency key.
//!
//! **A retried schedule tick resumes its run instead of starting another.**
//! The run id of a tick is derived from the EventBridge event (its time and
//! id), so when Lambda retries a failed tick with the same event the
//! dispatcher finds the run it created and carries on with it, rather than
//! leaving a half-dispatched run behind and starting a second one. A manual
//! invoke's run id takes its time part from the clock (only its suffix comes
//! from the request id), so a retry of a failed *asynchronous* manual invoke
//! starts a new run; the failed attempt's error names the first run and the
//! `{"resume": ...}` that finishes it. Invoke by hand synchronously (the
//! default of `aws lambda invoke`), which Lambda does not retry.

use async_trait::async_trait;
use aws_lambda_events::event::eventbridge::EventBridgeEvent;
use serde::{Deserialize, Serialize};
use settle_core::dispatch::{self, Dispatched};
use settle_core::domain::now_millis;
use settle_core::ports::BoxError;
use settle_core::reconcile;
use settle_core::{Backend, PortError, RunConfig, RunId, RunRecord};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// The `detail-type` of an EventBridge schedule tick.
pub const SCHEDULED_EVENT: &str = "Scheduled Event";

/// The newest runs a scheduled tick checks for parked work messages.
pub const RECONCILE_RECENT_RUNS: usize = 20;

/// Dispatching needs at least this much time once the margin is set aside;
/// less, and a chain of continuations could go on without making progress.
pub const MIN_DISPATCH_WINDOW: Duration = Duration::from_secs(5);

/// What an invocation asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum DispatchRequest {
    /// An EventBridge schedule tick: a new run with the default config.
    Scheduled { event_id: String, time_ms: u64 },
    /// A manual invoke (`{}`, or `{"max_receives": 3, "tolerated_failure_percent": 10}`):
    /// a new run, with the given settings in place of the defaults.
    NewRun {
        max_receives: Option<u32>,
        tolerated_failure_percent: Option<f64>,
    },
    /// `{"resume": "RUN_ID"}`: continue dispatching an existing run.
    Resume(RunId),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Manual {
    resume: Option<String>,
    max_receives: Option<u32>,
    tolerated_failure_percent: Option<f64>,
}

impl DispatchRequest {
    /// Reads an invocation payload. The error says what is wrong with it.
    pub fn parse(payload: &serde_json::Value) -> Result<Self, DispatchError> {
        let bad = |why: String| DispatchError::BadRequest(why);
        let obj = payload
            .as_object()
            .ok_or_else(|| bad(format!("want a JSON object, got {}", kind(payload))))?;
        if obj.contains_key("detail-type") {
            let event: EventBridgeEvent<serde_json::Value> =
                serde_json::from_value(payload.clone())
                    .map_err(|e| bad(format!("EventBridge event: {e}")))?;
            if event.detail_type != SCHEDULED_EVENT {
                return Err(bad(format!(
                    "EventBridge event of detail-type {:?} from {:?}; the dispatcher \
                     only takes {SCHEDULED_EVENT:?}",
                    event.detail_type, event.source
                )));
            }
            let event_id = event
                .id
                .filter(|id| !id.is_empty())
                .ok_or_else(|| bad("scheduled event has no id".into()))?;
            let time_ms = event
                .time
                .map(|t| t.timestamp_millis())
                .and_then(|t| u64::try_from(t).ok())
                .ok_or_else(|| bad("scheduled event has no time".into()))?;
            return Ok(Self::Scheduled { event_id, time_ms });
        }
        let manual: Manual = serde_json::from_value(payload.clone()).map_err(|e| {
            bad(format!(
                "{e}; want {{\"resume\": \"RUN_ID\"}}, or \
                 {{\"max_receives\": N, \"tolerated_failure_percent\": P}} (both optional)"
            ))
        })?;
        match manual {
            Manual {
                resume: Some(run),
                max_receives: None,
                tolerated_failure_percent: None,
            } => Ok(Self::Resume(
                RunId::parse(&run).map_err(|e| bad(format!("resume: {e}")))?,
            )),
            Manual {
                resume: Some(_), ..
            } => Err(bad(
                "resume takes no settings: a run keeps the ones it was created with".into(),
            )),
            Manual {
                resume: None,
                max_receives,
                tolerated_failure_percent,
            } => {
                if max_receives == Some(0) {
                    return Err(bad("max_receives: want a whole number from 1".into()));
                }
                if tolerated_failure_percent.is_some_and(|p| !(0.0..=100.0).contains(&p)) {
                    return Err(bad(
                        "tolerated_failure_percent: want a number from 0 to 100".into(),
                    ));
                }
                Ok(Self::NewRun {
                    max_receives,
                    tolerated_failure_percent,
                })
            }
        }
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// How an unfinished run gets a fresh invocation.
#[async_trait]
pub trait Continuation: Send + Sync + std::fmt::Debug {
    /// Arranges for `{"resume": run}` to be dispatched soon, by another
    /// invocation. Returns once that is durably requested.
    async fn resume_later(&self, run: &RunId) -> Result<(), BoxError>;
}

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("bad dispatcher payload: {0}")]
    BadRequest(String),
    #[error(
        "a run's max_receives ({run_max}) must be below the work queue's maxReceiveCount \
         ({queue_max}): the worker records an item's terminal failure on the run's last \
         receive, and the queue's extra receives let a crashed last attempt still be \
         recorded before the queue parks the message. Lower max_receives (the template's \
         MaxAttempts) or raise MaxReceiveCount"
    )]
    MaxReceives { run_max: u32, queue_max: u32 },
    #[error(
        "the work queue has no redrive policy (maxReceiveCount); a message whose worker \
         crashes every time would be received forever. Give it a dead-letter queue with a \
         maxReceiveCount above the run's max_receives ({run_max})"
    )]
    NoRedrivePolicy { run_max: u32 },
    #[error("run {0} not found")]
    UnknownRun(RunId),
    #[error(
        "{left_ms} ms are left in this invocation, under the dispatch margin of {margin_ms} ms \
         plus {} s to work in; raise the function's Timeout or lower SETTLE_DISPATCH_MARGIN_MS",
        MIN_DISPATCH_WINDOW.as_secs()
    )]
    TooLittleTime { left_ms: u128, margin_ms: u128 },
    #[error("{op}: {source}")]
    Port {
        op: &'static str,
        #[source]
        source: PortError,
    },
    #[error(
        "dispatching run {run} failed: {source}; its progress is saved, continue it \
         with {{\"resume\": \"{run}\"}}"
    )]
    Dispatch {
        run: RunId,
        #[source]
        source: dispatch::DispatchError,
    },
    #[error(
        "run {run} is unfinished ({enqueued} items enqueued) and could not be handed to \
         a fresh invocation: {source}; continue it with {{\"resume\": \"{run}\"}}"
    )]
    Continue {
        run: RunId,
        enqueued: u64,
        #[source]
        source: BoxError,
    },
}

/// How the invocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DispatchOutcome {
    /// Every claimed item is enqueued and claiming is over.
    Done,
    /// Time ran short; a fresh invocation continues the run.
    Continued,
    /// A new run was asked for, but no item is pending: no run was created.
    NothingPending,
}

/// The invocation's JSON response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DispatchSummary {
    pub run_id: Option<RunId>,
    pub outcome: DispatchOutcome,
    /// Items of the run enqueued so far (all invocations).
    pub enqueued: u64,
    /// Items claimed into the run so far; final once `outcome` is `done`.
    pub total: u64,
}

/// The dispatcher's handler, built once at cold start.
#[derive(Debug)]
pub struct DispatcherFunction {
    backend: Backend,
    defaults: RunConfig,
    queue_max_receives: Option<u32>,
    continuation: std::sync::Arc<dyn Continuation>,
}

impl DispatcherFunction {
    /// `queue_max_receives` is the work queue's maxReceiveCount. Refuses
    /// default settings that break the rule in [`DispatchError::MaxReceives`],
    /// so a bad deployment fails at cold start, not at the first tick.
    pub fn new(
        backend: Backend,
        defaults: RunConfig,
        queue_max_receives: Option<u32>,
        continuation: std::sync::Arc<dyn Continuation>,
    ) -> Result<Self, DispatchError> {
        check_max_receives(defaults.max_receives, queue_max_receives)?;
        Ok(Self {
            backend,
            defaults,
            queue_max_receives,
            continuation,
        })
    }

    /// Handles one invocation. `request_id` is the Lambda request id (it
    /// names a manual invoke's run); `stop_at` is when to stop dispatching
    /// and hand over (see [`stop_at`]), `None` for no limit.
    pub async fn handle(
        &self,
        request: DispatchRequest,
        request_id: &str,
        stop_at: Option<Instant>,
    ) -> Result<DispatchSummary, DispatchError> {
        if matches!(request, DispatchRequest::Scheduled { .. }) {
            // A tick is also the deployment's clock for the reconciler; its
            // failure must not stop the dispatch, which is this tick's job.
            match reconcile::sweep_when_quiet(&self.backend, RECONCILE_RECENT_RUNS).await {
                Ok(r) if r.failed + r.dropped > 0 => tracing::warn!(
                    failed = r.failed,
                    dropped = r.dropped,
                    "reconciled work messages the queue dead-lettered without a result"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not look for parked work messages"),
            }
        }
        let ledger = self.backend.ledger.as_ref();
        // `resumed`: a retried trigger finds the run its first try created,
        // whose dispatch may have sent more than it saved. A continuation
        // saved its progress before it handed over.
        let (run, resumed) = match request {
            DispatchRequest::Resume(id) => (
                ledger
                    .run(&id)
                    .await
                    .map_err(port("read the run"))?
                    .ok_or(DispatchError::UnknownRun(id))?,
                false,
            ),
            DispatchRequest::Scheduled { event_id, time_ms } => {
                let id = derived_run_id(time_ms, &event_id);
                match self.open_or_create(id, self.defaults.clone()).await? {
                    Some(opened) => opened,
                    None => return Ok(nothing_pending()),
                }
            }
            DispatchRequest::NewRun {
                max_receives,
                tolerated_failure_percent,
            } => {
                let config = RunConfig {
                    max_receives: max_receives.unwrap_or(self.defaults.max_receives),
                    tolerated_failure_percent: tolerated_failure_percent
                        .unwrap_or(self.defaults.tolerated_failure_percent),
                    // The deployed worker function's processor does the work.
                    processor: None,
                    ..RunConfig::default()
                };
                let id = derived_run_id(now_millis(), request_id);
                match self.open_or_create(id, config).await? {
                    Some(opened) => opened,
                    None => return Ok(nothing_pending()),
                }
            }
        };
        // Also for a resumed run: the queue may have been reconfigured since.
        check_max_receives(run.config.max_receives, self.queue_max_receives)?;
        let id = run.id;
        let b = &self.backend;
        let done = dispatch::dispatch(
            b.source.as_ref(),
            ledger,
            b.work.as_ref(),
            &id,
            stop_at,
            resumed,
        )
        .await
        .map_err(|source| DispatchError::Dispatch {
            run: id.clone(),
            source,
        })?;
        let run = ledger
            .run(&id)
            .await
            .map_err(port("read the run"))?
            .ok_or_else(|| DispatchError::UnknownRun(id.clone()))?;
        let outcome = match done {
            Dispatched::Done { .. } => {
                if run.is_settled() && run.settled_at.is_none() {
                    // A run with no items never sees a result, so no reducer
                    // would ever mark it settled.
                    ledger
                        .mark_settled(&id, now_millis())
                        .await
                        .map_err(port("mark the empty run settled"))?;
                    tracing::info!(run = %id, status = %run.status(), "{}", run.summary());
                }
                DispatchOutcome::Done
            }
            Dispatched::Unfinished { enqueued } => {
                self.continuation
                    .resume_later(&id)
                    .await
                    .map_err(|source| DispatchError::Continue {
                        run: id.clone(),
                        enqueued,
                        source,
                    })?;
                tracing::info!(run = %id, enqueued, "time is short; continuing in a fresh invocation");
                DispatchOutcome::Continued
            }
        };
        Ok(DispatchSummary {
            run_id: Some(id),
            outcome,
            enqueued: run.enqueued,
            total: run.total,
        })
    }

    /// The run `id` if it exists (a retried trigger), else a new one, unless
    /// nothing is pending (`None`: a tick with no work leaves no empty run);
    /// with whether it existed.
    async fn open_or_create(
        &self,
        id: RunId,
        config: RunConfig,
    ) -> Result<Option<(RunRecord, bool)>, DispatchError> {
        let ledger = self.backend.ledger.as_ref();
        if let Some(run) = ledger.run(&id).await.map_err(port("read the run"))? {
            tracing::info!(run = %id, "this trigger created the run before; resuming it");
            return Ok(Some((run, true)));
        }
        check_max_receives(config.max_receives, self.queue_max_receives)?;
        let pending = self
            .backend
            .source
            .pending()
            .await
            .map_err(port("count the pending items"))?;
        if pending == 0 {
            tracing::info!("no items pending; no run created");
            return Ok(None);
        }
        let run = RunRecord::new(id.clone(), config, now_millis());
        match ledger.create_run(&run).await {
            Ok(()) => {
                tracing::info!(run = %id, pending, "run created");
                Ok(Some((run, false)))
            }
            // Another invocation of the same trigger created it meanwhile.
            Err(PortError::Invalid(_)) => ledger
                .run(&id)
                .await
                .map_err(port("read the run"))?
                .map(|run| Some((run, true)))
                .ok_or(DispatchError::UnknownRun(id)),
            Err(e) => Err(port("create the run")(e)),
        }
    }
}

fn nothing_pending() -> DispatchSummary {
    DispatchSummary {
        run_id: None,
        outcome: DispatchOutcome::NothingPending,
        enqueued: 0,
        total: 0,
    }
}

fn port(op: &'static str) -> impl Fn(PortError) -> DispatchError {
    move |source| DispatchError::Port { op, source }
}

/// The rule in [`DispatchError::MaxReceives`].
pub fn check_max_receives(run_max: u32, queue_max: Option<u32>) -> Result<(), DispatchError> {
    match queue_max {
        None => Err(DispatchError::NoRedrivePolicy { run_max }),
        Some(queue_max) if run_max >= queue_max => {
            Err(DispatchError::MaxReceives { run_max, queue_max })
        }
        Some(_) => Ok(()),
    }
}

/// When to stop dispatching: `margin` before the invocation's `deadline`.
/// Refuses when that leaves less than [`MIN_DISPATCH_WINDOW`], so that a
/// function whose timeout is too short fails loudly instead of handing an
/// empty slice of work to an endless chain of fresh invocations.
pub fn stop_at(deadline: SystemTime, margin: Duration) -> Result<Instant, DispatchError> {
    let left = deadline
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    if left < margin + MIN_DISPATCH_WINDOW {
        return Err(DispatchError::TooLittleTime {
            left_ms: left.as_millis(),
            margin_ms: margin.as_millis(),
        });
    }
    Ok(Instant::now() + (left - margin))
}

/// A run id made from a trigger: the time part from `time_ms` (so ids still
/// sort by age), the suffix from a hash of `key`. The same trigger always
/// names the same run.
pub fn derived_run_id(time_ms: u64, key: &str) -> RunId {
    let base = RunId::generate(time_ms);
    // `rYYYYMMDDTHHMMSSZ-` then six hex digits: keep the prefix, replace the digits.
    let prefix = base.as_str().get(..18).unwrap_or_default();
    RunId::parse(&format!("{prefix}{:06x}", fnv1a(key) & 0xff_ffff)).unwrap_or(base)
}

/// FNV-1a: stable across builds and Rust versions, unlike std's hasher.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn derived_ids_are_stable_and_valid() {
        let t = 1_764_000_000_000;
        let a = derived_run_id(t, "53dc4d37-cffa-4f76-80c9-8b7d4a4d2eaa");
        assert_eq!(a, derived_run_id(t, "53dc4d37-cffa-4f76-80c9-8b7d4a4d2eaa"));
        assert_ne!(a, derived_run_id(t, "another-event"));
        assert!(a.as_str().starts_with("r20251124T"), "{a}");
        assert_eq!(RunId::parse(a.as_str()).unwrap(), a);
    }

    #[test]
    fn manual_payloads_parse() {
        assert_eq!(
            DispatchRequest::parse(&json!({})).unwrap(),
            DispatchRequest::NewRun {
                max_receives: None,
                tolerated_failure_percent: None
            }
        );
        assert_eq!(
            DispatchRequest::parse(&json!({"max_receives": 3, "tolerated_failure_percent": 10}))
                .unwrap(),
            DispatchRequest::NewRun {
                max_receives: Some(3),
                tolerated_failure_percent: Some(10.0)
            }
        );
        let id = "r20261124T020000Z-abc123";
        assert_eq!(
            DispatchRequest::parse(&json!({ "resume": id })).unwrap(),
            DispatchRequest::Resume(RunId::parse(id).unwrap())
        );
    }

    #[test]
    fn bad_payloads_say_what_is_wrong() {
        let err = |v: serde_json::Value| DispatchRequest::parse(&v).unwrap_err().to_string();
        assert!(err(json!([1])).contains("want a JSON object, got an array"));
        assert!(err(json!({"resume": "nope"})).contains("resume: "));
        assert!(
            err(json!({"resume": "r20261124T020000Z-abc123", "max_receives": 2}))
                .contains("resume takes no settings")
        );
        assert!(err(json!({"max_recieves": 2})).contains("unknown field `max_recieves`"));
        assert!(err(json!({"max_receives": 0})).contains("from 1"));
        assert!(err(json!({"tolerated_failure_percent": 101})).contains("0 to 100"));
        let other = json!({"version": "0", "id": "x", "detail-type": "Object Created",
            "source": "aws.s3", "time": "2026-11-24T02:00:00Z", "detail": {}});
        assert!(err(other).contains("only takes \"Scheduled Event\""));
    }

    #[test]
    fn max_receives_must_stay_below_the_queue_limit() {
        assert!(check_max_receives(3, Some(6)).is_ok());
        assert!(check_max_receives(5, Some(6)).is_ok());
        let e = check_max_receives(6, Some(6)).unwrap_err().to_string();
        assert!(e.contains("max_receives (6) must be below"), "{e}");
        assert!(e.contains("maxReceiveCount (6)"), "{e}");
        let e = check_max_receives(3, None).unwrap_err().to_string();
        assert!(e.contains("no redrive policy"), "{e}");
    }

    #[test]
    fn stop_at_leaves_the_margin_and_refuses_too_little_time() {
        let margin = Duration::from_secs(30);
        let deadline = SystemTime::now() + Duration::from_secs(900);
        let stop = stop_at(deadline, margin).unwrap();
        let until = stop.saturating_duration_since(Instant::now());
        assert!(until <= Duration::from_secs(870) && until > Duration::from_secs(860));
        let e = stop_at(SystemTime::now() + Duration::from_secs(20), margin).unwrap_err();
        assert!(matches!(e, DispatchError::TooLittleTime { .. }), "{e}");
    }
}
