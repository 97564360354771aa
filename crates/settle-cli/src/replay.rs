//! `settle replay RUN ITEM`: one item through a processor here and now,
//! the fastest way from "item 5 failed" to its cause. Nothing in the run
//! changes: no message is sent, no ledger row written. The attempt carries
//! the item's real idempotency key (`RUN:ITEM`), so a side effect made
//! idempotent with it is answered, not repeated.

use crate::cli::{ProcessArgs, ProcessorArgs};
use crate::commands::input;
use crate::deployment::Deployment;
use crate::processors;
use anyhow::Result;
use futures::FutureExt;
use serde_json::{json, Value};
use settle_core::domain::{Item, ItemId, ProcessError};
use settle_core::{AttemptContext, RunRecord};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

/// What the attempt came to, as printed.
#[derive(Debug)]
pub struct Replayed {
    pub value: Value,
    pub succeeded: bool,
}

/// Finds the item in the run (a scan of its items in claim order) and runs it.
pub async fn replay(
    d: &Deployment,
    run: &RunRecord,
    item_id: &str,
    flags: &ProcessorArgs,
    timeout: Duration,
) -> Result<Replayed> {
    let id = ItemId::new(item_id.to_owned())
        .map_err(|err| input(format!("item id {item_id:?}: {err}")))?;
    let item = find(d, run, &id).await?;
    let spec = processors::for_run(run, flags)?;
    let args = ProcessArgs {
        processor: flags.clone(),
        concurrency: Some(1),
        batch_size: 1,
        visibility_timeout: timeout.as_secs() * 2,
        retry_delay_ms: 0,
    };
    let chosen = processors::build(&spec, &args)?;
    let prior = d
        .backend
        .ledger
        .items(&[(run.id.clone(), id.clone())])
        .await?
        .into_values()
        .next()
        .map_or(0, |r| r.value.attempts);
    let mut ctx = AttemptContext::new(run.id.clone(), &item, prior + 1);
    ctx.deadline = Some(tokio::time::Instant::now() + timeout);
    let started = Instant::now();
    let attempt = AssertUnwindSafe(chosen.processor.process(&item, &ctx)).catch_unwind();
    let outcome = match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(ProcessError::retryable("panic (see the log above)")),
        Err(_) => Err(ProcessError::retryable(format!(
            "timed out after {} s",
            timeout.as_secs()
        ))),
    };
    let log = ctx.take_log();
    let mut value = json!({
        "run_id": run.id,
        "item_id": id,
        "attempt": ctx.attempt,
        "processor": spec.describe(),
        "duration_ms": started.elapsed().as_millis() as u64,
        "log": log,
    });
    let succeeded = outcome.is_ok();
    match outcome {
        Ok(output) => {
            value["outcome"] = "succeeded".into();
            value["output"] = json!(output);
        }
        Err(e) => {
            value["outcome"] = "failed".into();
            value["kind"] = json!(e.kind);
            value["error"] = e.message.into();
            if let Some(after) = e.retry_after {
                value["retry_after_ms"] = (after.as_millis() as u64).into();
            }
        }
    }
    Ok(Replayed { value, succeeded })
}

async fn find(d: &Deployment, run: &RunRecord, id: &ItemId) -> Result<Item> {
    let mut cursor: Option<String> = None;
    loop {
        let (items, next) = d
            .backend
            .source
            .claimed(&run.id, cursor.as_deref(), 1000)
            .await?;
        if items.is_empty() {
            return Err(input(format!(
                "item \"{}\" is not in run {}",
                crate::report::clean(id.as_str()),
                run.id
            )));
        }
        if let Some(item) = items.into_iter().find(|i| &i.id == id) {
            return Ok(item);
        }
        cursor = next;
    }
}

pub fn human(r: &Value) -> String {
    let mut out = format!(
        "Replayed item {} of run {} (as attempt {}) with {}: {} in {} ms\n",
        crate::report::clean(r["item_id"].as_str().unwrap_or_default()),
        r["run_id"].as_str().unwrap_or_default(),
        r["attempt"],
        r["processor"].as_str().unwrap_or_default(),
        r["outcome"].as_str().unwrap_or_default(),
        r["duration_ms"],
    );
    if let Some(e) = r["error"].as_str() {
        out.push_str(&format!(
            "Error ({}): {}\n",
            r["kind"].as_str().unwrap_or_default(),
            crate::report::clean(e)
        ));
    }
    if !r["output"].is_null() {
        out.push_str(&format!(
            "Output: {}\n",
            crate::report::clean(&r["output"].to_string())
        ));
    }
    match r["log"].as_str() {
        Some(log) => {
            out.push_str("Log:\n");
            out.push_str(&crate::report::clean_log(log));
            if !log.ends_with('\n') {
                out.push('\n');
            }
        }
        None => out.push_str("Log: (nothing written)\n"),
    }
    out.push_str("Nothing in the run changed.\n");
    out
}
