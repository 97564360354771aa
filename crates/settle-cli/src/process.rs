//! Processing until done: dispatch (if unfinished) beside the local runner,
//! a progress bar on stderr, and a clean stop on SIGINT or SIGTERM.

use crate::cli::ProcessArgs;
use crate::cli::Workers;
use crate::deployment::Deployment;
use crate::processors::Chosen;
use crate::signals::{Signal, Stop};
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use settle_core::dispatch::{self, Dispatched};
use settle_core::domain::now_millis;
use settle_core::flow::ScopeState;
use settle_core::reconcile;
use settle_core::runner::{Runner, RunnerConfig, RunnerStats};
use settle_core::work::{Worker, WorkerConfig};
use settle_core::{RunId, RunRecord};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// When processing may stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// The run has settled (dispatch included).
    Settled,
    /// The work and results queues are empty: everything sent has been
    /// processed (a redrive's messages, say).
    Drained,
}

/// What stopped processing.
#[derive(Debug)]
pub enum Finish {
    /// The run as it ended, how long processing took, and how many items
    /// settled during it.
    Done(RunRecord, Duration, u64),
    /// Stopped by a signal before the end; the run as it was then.
    Interrupted(RunRecord, Signal),
    /// Stopped waiting: throttled this long with no call answered (the
    /// run's `--max-throttle-wait`); its items are left pending.
    Throttled(RunRecord, Duration),
}

/// Why processing stopped before the end.
enum Cut {
    Failed(anyhow::Error),
    Signal(Signal),
    Throttled(Duration),
}

const TICK: Duration = Duration::from_millis(100);
/// While waiting for a run to settle, the queues are counted every this many ticks.
const STALL_CHECK_EVERY: u32 = 10;

pub fn runner(d: &Deployment, args: &ProcessArgs, chosen: &Chosen) -> Runner {
    let b = &d.backend;
    let work = b.work.clone();
    let visibility = Duration::from_secs(args.visibility_timeout);
    let worker = Worker::new(
        chosen.processor.clone(),
        work.clone(),
        b.dlq.clone(),
        b.results.clone(),
        WorkerConfig {
            retry_delay: Duration::from_millis(args.retry_delay_ms),
            // Half the visibility timeout: the rest of the window is for the
            // batch's other items, the results and the deletes, so that one
            // slow item does not get its whole batch redelivered.
            item_timeout: Some(visibility / 2),
            visibility: Some(visibility),
            // Every item of the batches in flight is handed over at once;
            // `--concurrency` bounds how many of them run.
            concurrency: Some(chosen.items),
            // A redelivered message's holder is done or dead once its
            // attempt and report could have run; the reducers then commit
            // within their window. (A reducer that died holding a result
            // returns it only after the results visibility: that rare case
            // may run an attempt again, counted once.)
            result_lag: Some(visibility / 2 + visibility + d.reducer_window()),
            receive_limit: b.capabilities.fixed_max_receive_count,
            ..WorkerConfig::default()
        },
    )
    .reading(b.ledger.clone());
    Runner {
        worker: Arc::new(worker),
        work,
        results: b.results.clone(),
        ledger: b.ledger.clone(),
        config: RunnerConfig {
            concurrency: chosen.batches,
            batch_size: args.batch_size as usize,
            visibility,
            results_visibility: d.results_visibility(visibility),
            reducer_window: d.reducer_window(),
            ..RunnerConfig::default()
        },
        stats: Arc::new(RunnerStats::default()),
    }
}

/// Dispatches the rest of `run` (if any) and processes until `until`.
///
/// A run with an open redrive ([`RunRecord::redriving`]) is not settled
/// until the queues have drained: then its redrive is closed here.
///
/// `chosen` is the processor that works locally; `None` with deployed
/// workers, which bring their own.
pub async fn process(
    d: &Deployment,
    run: &RunId,
    args: &ProcessArgs,
    chosen: Option<&Chosen>,
    until: Until,
    resumed: bool,
    stop: &Stop,
) -> Result<Finish> {
    let started = Instant::now();
    let b = &d.backend;
    let record = b
        .ledger
        .run(run)
        .await?
        .with_context(|| format!("run {run} not found"))?;
    let before = record.clone();
    d.prepare_for(record.config.max_receives).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    // With deployed workers the Lambda functions process; this process
    // only dispatches and follows the tally.
    let max_throttle_wait = record.config.max_throttle_wait_s.map(Duration::from_secs);
    let mut worker = None;
    let poll = chosen
        .filter(|_| d.workers == Workers::Local)
        .map(|chosen| {
            let mut runner = runner(d, args, chosen);
            if record.config.key.is_some() {
                // A full key's items are sent round at once; more batches
                // in flight keep reading the queue past them while the
                // admitted items run, so another key's items are reached.
                runner.config.concurrency = runner.config.concurrency * 2 + 1;
            }
            worker = Some(runner.worker.clone());
            tokio::spawn(async move { runner.run(stop_rx).await })
        });
    let mut dispatching = (!record.dispatched).then(|| {
        let (b, run) = (b.clone(), run.clone());
        tokio::spawn(async move {
            dispatch::dispatch(
                b.source.as_ref(),
                b.ledger.as_ref(),
                b.work.as_ref(),
                &run,
                None,
                resumed,
            )
            .await
        })
    });
    let stall_checks =
        (d.stall_after().as_millis() / (TICK * STALL_CHECK_EVERY).as_millis()).max(1) as u32;
    let bar = progress_bar(&record);
    let stopped = stop.stopped();
    tokio::pin!(stopped);
    let mut stalled = 0;
    let mut tick: u32 = 0;
    let outcome = loop {
        tokio::select! {
            signal = &mut stopped => break Err(Cut::Signal(signal)),
            _ = tokio::time::sleep(TICK) => {}
        }
        if let Some(d) = &dispatching {
            if d.is_finished() {
                let d = dispatching.take().expect("checked");
                match d.await? {
                    Ok(Dispatched::Done { .. }) => {}
                    Ok(Dispatched::Unfinished { .. }) => unreachable!("no deadline given"),
                    Err(err) => {
                        break Err(Cut::Failed(
                            anyhow::Error::new(err).context("dispatch failed"),
                        ))
                    }
                }
            }
        }
        if poll.as_ref().is_some_and(|p| p.is_finished()) {
            break Err(Cut::Failed(anyhow::anyhow!(
                "the local runner stopped unexpectedly"
            )));
        }
        let now = b.ledger.run(run).await?.context("run vanished")?;
        let flow = worker.as_ref().map(|w| w.limiter().state(run, 0));
        show(&bar, &now, flow.as_ref().and_then(|f| f.first()));
        if let (Some(w), Some(max)) = (&worker, max_throttle_wait) {
            if let Some(waited) = w.limiter().throttled_for(run).filter(|t| *t >= max) {
                break Err(Cut::Throttled(waited));
            }
        }
        if dispatching.is_some() {
            continue;
        }
        if until == Until::Settled && now.is_settled() {
            break Ok(now);
        }
        // Every item has an outcome, though a redrive's messages may still
        // be on their way to changing some.
        let settled = now.dispatched && now.pending() == 0;
        // Counting a queue scans it: do it when it decides something (draining),
        // or now and then to notice a stall, not on every tick.
        tick += 1;
        if until == Until::Settled && !tick.is_multiple_of(STALL_CHECK_EVERY) {
            continue;
        }
        let empty = b.work.depth().await?.total() == 0 && b.results.depth().await?.total() == 0;
        if empty && (until == Until::Drained || settled) {
            if now.redriving {
                // Whatever the redrive moved has been processed.
                b.ledger.set_redriving(run, false).await?;
            }
            break Ok(now);
        }
        stalled = if empty && !settled { stalled + 1 } else { 0 };
        if stalled == 1 {
            // Nothing left to process and still pending: were messages
            // parked in the DLQ by the queue's own redrive policy?
            let r = reconcile::reconcile_parked(
                b.ledger.as_ref(),
                b.dlq.as_ref(),
                b.results.as_ref(),
                run,
            )
            .await?;
            if r.failed + r.dropped > 0 {
                bar.suspend(|| {
                    eprintln!(
                        "note: {} items had no result after their last receive and were \
                         dead-lettered by the queue; they are now counted failed \
                         (redrivable)",
                        r.failed
                    )
                });
                stalled = 0;
                continue;
            }
        }
        if stalled >= stall_checks {
            break Err(Cut::Failed(anyhow::anyhow!(
                "run {run} has {} pending items but no messages left to process; \
                 the database may have been changed by hand",
                now.pending()
            )));
        }
    };
    let _ = stop_tx.send(true);
    if let Some(d) = dispatching {
        d.abort();
    }
    let polled = match poll {
        Some(p) => p.await,
        None => Ok(Ok(())),
    };
    bar.finish_and_clear();
    let record = b.ledger.run(run).await?.context("run vanished")?;
    match outcome {
        Ok(_) => {
            polled??;
            if record.is_settled() && record.settled_at.is_none() {
                // An empty run never sees a result, so nobody else marks it.
                b.ledger.mark_settled(run, now_millis()).await?;
            }
            let settled = |r: &RunRecord| r.succeeded + r.failed;
            let count = settled(&record).saturating_sub(settled(&before));
            Ok(Finish::Done(record, started.elapsed(), count))
        }
        Err(Cut::Signal(signal)) => Ok(Finish::Interrupted(record, signal)),
        Err(Cut::Throttled(waited)) => Ok(Finish::Throttled(record, waited)),
        Err(Cut::Failed(err)) => {
            // What was committed stays (a full disk, say, stops the run but
            // loses nothing): tell the operator how to go on once it is fixed.
            let err = match polled {
                Ok(Err(runner_err)) => anyhow::anyhow!("{err:#}; runner: {runner_err}"),
                _ => err,
            };
            Err(err.context(format!(
                "run {run} stopped before it settled; once the cause is fixed, \
                 `settle resume {run}` continues it"
            )))
        }
    }
}

fn progress_bar(run: &RunRecord) -> ProgressBar {
    let bar = ProgressBar::new(run.total.max(1));
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {pos}/{len} items ({per_sec}, eta {eta})",
        )
        .expect("template is valid")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn show(bar: &ProgressBar, run: &RunRecord, flow: Option<&ScopeState>) {
    bar.set_length(run.total.max(1));
    bar.set_position(run.succeeded + run.failed);
    let stage = if run.dispatched {
        "processing"
    } else {
        "dispatching"
    };
    let flow = match flow {
        Some(f) if f.paused_for_ms.is_some() || f.throttled_for_ms.is_some() => format!(
            ", throttled ({})",
            f.rate.map_or("pausing".into(), |r| format!("{r:.1}/s now"))
        ),
        Some(ScopeState { rate: Some(r), .. }) => format!(", {r:.1}/s allowed"),
        _ => String::new(),
    };
    bar.set_message(format!(
        "{stage}: {} ok, {} failed{flow}",
        run.succeeded, run.failed
    ));
}
