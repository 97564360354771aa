//! A user's own Lambda function for tests: the worker's batch contract
//! (docs/lambda.md) with the scripted processor's semantics, item by item.
//! `payload.script` is `ok`, `permanent`, `retryable:N` (fails its first N
//! attempts), `sleep:MS` or `panic`; a panic fails the whole invocation,
//! which the worker sees as a function error. Any other request is
//! answered with an error naming what was wrong.
//!
//!     cargo lambda watch          # then invoke settle-fixture-function

use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use settle_core::domain::{ErrorKind, Item, ItemId};
use settle_core::{AttemptContext, Processor, RunId, Scripted};

#[derive(Deserialize)]
struct Request {
    items: Vec<RequestItem>,
}

#[derive(Deserialize)]
struct RequestItem {
    id: String,
    payload: Box<RawValue>,
    run_id: String,
    attempt: u32,
}

async fn handle(event: LambdaEvent<Value>) -> Result<Value, Error> {
    let request: Request =
        serde_json::from_value(event.payload).map_err(|e| format!("not a batch request ({e})"))?;
    let mut results = Vec::with_capacity(request.items.len());
    for it in request.items {
        let item = Item::new(ItemId::new(&it.id)?, it.payload);
        let ctx = AttemptContext::new(RunId::parse(&it.run_id)?, &item, it.attempt);
        // Printed, so the invocation's log tail holds every item's line.
        println!("item {} attempt {}", it.id, it.attempt);
        let result = match Scripted.process(&item, &ctx).await {
            Ok(output) => json!({"id": it.id, "status": "ok", "output": output}),
            Err(e) => {
                let status = match e.kind {
                    ErrorKind::Retryable => "retry",
                    ErrorKind::Permanent => "fail",
                    ErrorKind::Throttled => "throttled",
                };
                let mut r = json!({"id": it.id, "status": status, "error": e.message});
                if let Some(after) = e.retry_after {
                    r["retry_after_ms"] = (after.as_millis() as u64).into();
                }
                r
            }
        };
        results.push(result);
    }
    Ok(json!({ "results": results }))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(handle)).await
}
