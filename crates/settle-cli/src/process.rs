//! Processing until done: dispatch (if unfinished) beside the local runner,
//! a progress bar on stderr, and a clean stop on Ctrl-C.

use crate::cli::ProcessArgs;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use settle_core::dispatch::{self, Dispatched};
use settle_core::domain::now_millis;
use settle_core::ports::{Ledger, Queue};
use settle_core::runner::{Runner, RunnerConfig, RunnerStats};
use settle_core::work::{Worker, WorkerConfig};
use settle_core::{RunId, RunRecord, Scripted};
use settle_embedded::Embedded;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// When processing may stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// The run has settled (dispatch included).
    Settled,
    /// The work and results queues are empty: everything sent has been processed.
    Drained,
}

/// What stopped processing.
#[derive(Debug)]
pub enum Finish {
    /// The run as it ended, how long processing took, and how many items
    /// settled during it.
    Done(RunRecord, Duration, u64),
    Interrupted(RunRecord),
}

const TICK: Duration = Duration::from_millis(100);
/// While waiting for a run to settle, the queues are counted every this many ticks.
const STALL_CHECK_EVERY: u32 = 10;
/// Consecutive counts finding the queues empty with items still pending: a stall.
const STALL_CHECKS: u32 = 3;

pub fn runner(e: &Embedded, args: &ProcessArgs) -> Runner {
    let work: Arc<dyn Queue> = Arc::new(e.work.clone());
    let visibility = Duration::from_secs(args.visibility_timeout);
    let worker = Worker::new(
        Arc::new(Scripted),
        work.clone(),
        Arc::new(e.dlq.clone()),
        Arc::new(e.results.clone()),
        WorkerConfig {
            retry_delay: Duration::from_millis(args.retry_delay_ms),
            // Half the visibility timeout: the rest of the window is for the
            // batch's other items, the results and the deletes, so that one
            // slow item does not get its whole batch redelivered.
            item_timeout: Some(visibility / 2),
            ..WorkerConfig::default()
        },
    );
    Runner {
        worker: Arc::new(worker),
        work,
        results: Arc::new(e.results.clone()),
        ledger: Arc::new(e.store.clone()),
        config: RunnerConfig {
            concurrency: args.concurrency as usize,
            batch_size: args.batch_size as usize,
            visibility,
            ..RunnerConfig::default()
        },
        stats: Arc::new(RunnerStats::default()),
    }
}

/// Dispatches the rest of `run` (if any) and processes until `until`.
pub async fn process(
    e: &Embedded,
    run: &RunId,
    args: &ProcessArgs,
    until: Until,
) -> Result<Finish> {
    let started = Instant::now();
    let record = e
        .store
        .run(run)
        .await?
        .with_context(|| format!("run {run} not found"))?;
    let before = record.clone();
    e.set_max_receives(record.config.max_receives).await?;
    let runner = runner(e, args);
    let (stop_tx, stop_rx) = watch::channel(false);
    let poll = tokio::spawn({
        let runner = runner.clone();
        async move { runner.run(stop_rx).await }
    });
    let mut dispatching = (!record.dispatched).then(|| {
        let (e, run) = (e.clone(), run.clone());
        tokio::spawn(
            async move { dispatch::dispatch(&e.store, &e.store, &e.work, &run, None).await },
        )
    });
    let bar = progress_bar(&record);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut stalled = 0;
    let mut tick: u32 = 0;
    let outcome = loop {
        tokio::select! {
            _ = &mut ctrl_c => break Err(None),
            _ = tokio::time::sleep(TICK) => {}
        }
        if let Some(d) = &dispatching {
            if d.is_finished() {
                let d = dispatching.take().expect("checked");
                match d.await? {
                    Ok(Dispatched::Done { .. }) => {}
                    Ok(Dispatched::Unfinished { .. }) => unreachable!("no deadline given"),
                    Err(err) => {
                        break Err(Some(anyhow::Error::new(err).context("dispatch failed")))
                    }
                }
            }
        }
        if poll.is_finished() {
            break Err(Some(anyhow::anyhow!(
                "the local runner stopped unexpectedly"
            )));
        }
        let now = e.store.run(run).await?.context("run vanished")?;
        show(&bar, &now);
        if dispatching.is_some() {
            continue;
        }
        let settled = now.is_settled();
        if until == Until::Settled && settled {
            break Ok(now);
        }
        // Counting a queue scans it: do it when it decides something (draining),
        // or now and then to notice a stall, not on every tick.
        tick += 1;
        if until == Until::Settled && !tick.is_multiple_of(STALL_CHECK_EVERY) {
            continue;
        }
        let empty = e.work.depth().await?.total() == 0 && e.results.depth().await?.total() == 0;
        if empty && (until == Until::Drained || settled) {
            break Ok(now);
        }
        stalled = if empty && !settled { stalled + 1 } else { 0 };
        if stalled >= STALL_CHECKS {
            break Err(Some(anyhow::anyhow!(
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
    let polled = poll.await;
    bar.finish_and_clear();
    let record = e.store.run(run).await?.context("run vanished")?;
    match outcome {
        Ok(_) => {
            polled??;
            if record.is_settled() && record.settled_at.is_none() {
                // An empty run never sees a result, so nobody else marks it.
                e.store.mark_settled(run, now_millis()).await?;
            }
            let settled = |r: &RunRecord| r.succeeded + r.failed;
            let count = settled(&record).saturating_sub(settled(&before));
            Ok(Finish::Done(record, started.elapsed(), count))
        }
        Err(None) => Ok(Finish::Interrupted(record)),
        Err(Some(err)) => {
            if let Ok(Err(runner_err)) = polled {
                bail!("{err:#}; runner: {runner_err}");
            }
            Err(err)
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

fn show(bar: &ProgressBar, run: &RunRecord) {
    bar.set_length(run.total.max(1));
    bar.set_position(run.succeeded + run.failed);
    let stage = if run.dispatched {
        "processing"
    } else {
        "dispatching"
    };
    bar.set_message(format!(
        "{stage}: {} ok, {} failed",
        run.succeeded, run.failed
    ));
}
