//! The user's own Lambda function, in any runtime, as the worker's
//! processor: invoked synchronously once per worker batch.
//!
//! | what | contract |
//! |---|---|
//! | request | `{"items": [{"id", "payload", "run_id", "attempt", "idempotency_key", "deadline_ms"}, ...]}` (`deadline_ms`: Unix epoch ms, absent if none) |
//! | response | `{"results": [{"id", "status": "ok" \| "retry" \| "fail" \| "throttled", "output", "error", "retry_after_ms", "log"}, ...]}` |
//! | `ok` | succeeded; `output` (any JSON, optional) is the item's output |
//! | `retry` | failed, retryable, not before `retry_after_ms` if given; `error` says why |
//! | `fail` | failed permanently; `error` says why |
//! | `throttled` | the service the function calls asks to slow down: not a failure, no attempt used; the run slows down, waiting `retry_after_ms` first if given; `error` (optional) says why |
//! | a result for an id not in the request | ignored, and named in a log line |
//! | no result for an item | that item fails, retryable: "no result for this item" |
//! | a result that is not one of the above | that item fails, retryable, with what was wrong |
//! | Lambda throttles the invoke (`TooManyRequestsException`: the function's concurrency or the account's is used up) | every item of the batch is throttled, waiting the exception's `retryAfterSeconds` first if it has one |
//! | a function error, another failed invoke, a response that is not JSON of this shape | every item of the batch fails, retryable, with the reason (bounded) |
//! | no answer within the worker's item timeout | every item of the batch fails, retryable ("timed out") |
//! | the attempt's log | `Invoke NAME (N items) -> 200 in 12 ms`, then the result's own `log` if it has one, else the invocation's log tail (`LogType: Tail`, the last 4 KB) |
//!
//! Why once per batch and not once per item: an invocation costs a request
//! and a start, and a function that renews subscriptions often does better
//! with ten at once (one connection, one bulk call). The core's
//! [`BatchProcessor`] hook hands this processor the batch's due items in
//! one call, and keeps each item's outcome, output and log its own.

use async_trait::async_trait;
use aws_sdk_lambda::error::SdkError;
use aws_sdk_lambda::operation::invoke::InvokeError;
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::{InvocationType, LogType};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use settle_core::domain::{now_millis, Output, ProcessError};
use settle_core::ports::BoxError;
use settle_core::{BatchAttempt, BatchProcessor};
use settle_processors::http::causes;
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// Bytes of a bad response (or a function error's message) that an error quotes.
pub const QUOTE_BYTES: usize = 200;

/// What one synchronous invoke returned.
#[derive(Debug, Clone, Default)]
pub struct Invoked {
    /// The HTTP status of the Invoke call (200 for a RequestResponse invoke that ran).
    pub status: i32,
    /// Set when the function failed (`Unhandled`, `Handled`): the payload
    /// then holds its `errorMessage` and `errorType`.
    pub function_error: Option<String>,
    pub payload: Vec<u8>,
    /// The end of the invocation's log, decoded.
    pub log_tail: Option<String>,
}

/// Invokes the user's function: the Lambda client in production, a fake
/// in tests.
#[async_trait]
pub trait Invoker: Send + Sync + 'static {
    /// The function's name or ARN, as logs and errors show it.
    fn name(&self) -> &str;
    /// One synchronous invoke with `payload`. An error means the call did
    /// not run the function to an answer (no connection, throttled, no
    /// such function, no permission).
    async fn invoke(&self, payload: Vec<u8>) -> Result<Invoked, BoxError>;
}

/// The Lambda Invoke API: `RequestResponse`, `LogType: Tail`.
#[derive(Debug, Clone)]
pub struct LambdaInvoker {
    client: aws_sdk_lambda::Client,
    function: String,
}

impl LambdaInvoker {
    /// `function` is a name or ARN, with a qualifier if any. The client's
    /// endpoint follows the standard resolution, so `AWS_ENDPOINT_URL_LAMBDA`
    /// (e.g. `cargo lambda watch`) or `AWS_ENDPOINT_URL` redirect it.
    pub fn new(client: aws_sdk_lambda::Client, function: String) -> Self {
        Self { client, function }
    }
}

#[async_trait]
impl Invoker for LambdaInvoker {
    fn name(&self) -> &str {
        &self.function
    }

    async fn invoke(&self, payload: Vec<u8>) -> Result<Invoked, BoxError> {
        let out = self
            .client
            .invoke()
            .function_name(&self.function)
            .invocation_type(InvocationType::RequestResponse)
            .log_type(LogType::Tail)
            .payload(Blob::new(payload))
            .send()
            .await
            .map_err(Box::new)?;
        let log_tail = out.log_result().and_then(decode_tail);
        Ok(Invoked {
            status: out.status_code(),
            function_error: out.function_error().map(str::to_owned),
            payload: out
                .payload()
                .map(|p| p.as_ref().to_vec())
                .unwrap_or_default(),
            log_tail,
        })
    }
}

/// The invocation's log tail from `LogResult` (base64), as text.
pub fn decode_tail(b64: &str) -> Option<String> {
    aws_smithy_types::base64::decode(b64)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .map_err(|e| tracing::warn!(error = %e, "the invocation's log tail is not base64"))
        .ok()
}

/// The worker's processor for `SETTLE_PROCESSOR=function`.
#[derive(Debug)]
pub struct FunctionProcessor<I> {
    invoker: I,
}

impl<I: Invoker> FunctionProcessor<I> {
    pub fn new(invoker: I) -> Self {
        Self { invoker }
    }
}

#[derive(Serialize)]
struct Request<'a> {
    items: Vec<RequestItem<'a>>,
}

#[derive(Serialize)]
struct RequestItem<'a> {
    id: &'a str,
    payload: &'a RawValue,
    run_id: &'a str,
    attempt: u32,
    idempotency_key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    deadline_ms: Option<u64>,
}

#[derive(Deserialize)]
struct Response {
    results: Vec<Box<RawValue>>,
}

/// A result's fields besides its `id` (read first, on its own).
#[derive(Deserialize)]
struct WireResult {
    status: String,
    #[serde(default)]
    output: Option<Box<RawValue>>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    retry_after_ms: Option<u64>,
    #[serde(default)]
    log: Option<String>,
}

#[derive(Deserialize)]
struct FunctionErrorBody {
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default, rename = "errorMessage")]
    error_message: Option<String>,
}

type Outcome = Result<Option<Output>, ProcessError>;

#[async_trait]
impl<I: Invoker> BatchProcessor for FunctionProcessor<I> {
    async fn process_batch(&self, batch: &[BatchAttempt]) -> Vec<Outcome> {
        let name = self.invoker.name();
        let n = batch.len();
        let request = match encode(batch) {
            Ok(r) => r,
            Err(e) => {
                let e = ProcessError::retryable(format!("cannot encode the batch as JSON: {e}"));
                return vec![Err(e); n];
            }
        };
        let started = Instant::now();
        let invoked = self.invoker.invoke(request).await;
        let ms = started.elapsed().as_millis();
        let invoked = match invoked {
            Ok(invoked) => invoked,
            Err(e) => {
                let causes = causes(e.as_ref());
                for a in batch {
                    a.ctx.log(format!(
                        "Invoke {name} ({n} items) -> failed after {ms} ms: {causes}\n"
                    ));
                }
                let message = format!("Invoke {name}: {causes}");
                let e = match invoke_throttled(e.as_ref()) {
                    Some(after) => {
                        let e = ProcessError::throttled(message);
                        match after {
                            Some(after) => e.with_retry_after(after),
                            None => e,
                        }
                    }
                    None => ProcessError::retryable(message),
                };
                return vec![Err(e); n];
            }
        };
        let head = match &invoked.function_error {
            Some(fe) => format!(
                "Invoke {name} ({n} items) -> {} (function error: {fe}) in {ms} ms\n",
                invoked.status
            ),
            None => format!(
                "Invoke {name} ({n} items) -> {} in {ms} ms\n",
                invoked.status
            ),
        };
        let tail = invoked.log_tail.as_deref().unwrap_or_default();
        let whole_batch = |reason: String| -> Vec<Outcome> {
            for a in batch {
                a.ctx.log(&head);
                a.ctx.log(tail);
            }
            vec![Err(ProcessError::retryable(reason)); n]
        };
        if let Some(fe) = &invoked.function_error {
            return whole_batch(function_error(name, fe, &invoked.payload));
        }
        let response: Response = match serde_json::from_slice(&invoked.payload) {
            Ok(r) => r,
            Err(e) => {
                return whole_batch(format!(
                    "Invoke {name}: the response is not {{\"results\": [...]}} ({e}): {}",
                    quote(&invoked.payload)
                ))
            }
        };
        let mut by_id = results_by_id(name, batch, response.results);
        batch
            .iter()
            .map(|a| {
                a.ctx.log(&head);
                match by_id.remove(a.item.id.as_str()) {
                    None => {
                        a.ctx.log(tail);
                        Err(ProcessError::retryable(format!(
                            "Invoke {name}: no result for this item"
                        )))
                    }
                    Some(Err(e)) => {
                        a.ctx.log(tail);
                        Err(e)
                    }
                    Some(Ok(result)) => {
                        // The function's own log of this item, when it
                        // keeps one, is this attempt's log; the tail (every
                        // item's lines) only stands in for it.
                        a.ctx.log(result.log.as_deref().unwrap_or(tail));
                        outcome(name, result)
                    }
                }
            })
            .collect()
    }
}

/// Whether Lambda refused the invoke as too many (the function's reserved
/// concurrency, or the account's, is used up; or the invoke rate): a
/// request to slow down, with the wait it names if any. The SDK has
/// already retried it a few times by then.
fn invoke_throttled(e: &(dyn std::error::Error + 'static)) -> Option<Option<Duration>> {
    let e = e.downcast_ref::<SdkError<InvokeError>>()?;
    match e.as_service_error()? {
        InvokeError::TooManyRequestsException(e) => Some(
            e.retry_after_seconds()
                .and_then(|s| s.trim().parse().ok())
                .map(Duration::from_secs),
        ),
        _ => None,
    }
}

/// The request body for `batch`.
fn encode(batch: &[BatchAttempt]) -> Result<Vec<u8>, serde_json::Error> {
    let items = batch
        .iter()
        .map(|a| RequestItem {
            id: a.item.id.as_str(),
            payload: &a.item.payload,
            run_id: a.ctx.run.as_str(),
            attempt: a.ctx.attempt,
            idempotency_key: &a.ctx.idempotency_key,
            deadline_ms: a.ctx.deadline.map(|d| {
                now_millis() + d.saturating_duration_since(Instant::now()).as_millis() as u64
            }),
        })
        .collect();
    serde_json::to_vec(&Request { items })
}

/// The response's results by item id: each one read on its own, so that a
/// bad result fails its own item only. A result for an id the batch does
/// not hold, or a second one for the same id, is ignored and logged.
fn results_by_id<'a>(
    name: &str,
    batch: &'a [BatchAttempt],
    results: Vec<Box<RawValue>>,
) -> HashMap<&'a str, Result<WireResult, ProcessError>> {
    let mut by_id = HashMap::with_capacity(batch.len());
    let ids: HashMap<&str, &'a str> = batch
        .iter()
        .map(|a| (a.item.id.as_str(), a.item.id.as_str()))
        .collect();
    for raw in results {
        #[derive(Deserialize)]
        struct Id {
            id: String,
        }
        let Ok(Id { id }) = serde_json::from_str::<Id>(raw.get()) else {
            tracing::warn!(function = name, result = %quote(raw.get().as_bytes()),
                "a result without a string id is ignored");
            continue;
        };
        let Some(&key) = ids.get(id.as_str()) else {
            tracing::warn!(function = name, id = %id,
                "a result for an item not in the batch is ignored");
            continue;
        };
        if by_id.contains_key(key) {
            tracing::warn!(function = name, id = %id,
                "a second result for the same item is ignored");
            continue;
        }
        let parsed = serde_json::from_str::<WireResult>(raw.get()).map_err(|e| {
            ProcessError::retryable(format!(
                "Invoke {name}: a bad result for this item ({e}): {}",
                quote(raw.get().as_bytes())
            ))
        });
        by_id.insert(key, parsed);
    }
    by_id
}

/// One item's outcome from its result.
fn outcome(name: &str, r: WireResult) -> Outcome {
    match r.status.as_str() {
        "ok" => Ok(r.output.map(Output::raw)),
        "retry" => {
            let e = ProcessError::retryable(
                r.error
                    .unwrap_or_else(|| "the function asked for a retry".into()),
            );
            Err(match r.retry_after_ms {
                Some(ms) => e.with_retry_after(Duration::from_millis(ms)),
                None => e,
            })
        }
        "fail" => Err(ProcessError::permanent(
            r.error
                .unwrap_or_else(|| "the function failed the item".into()),
        )),
        "throttled" => {
            let e = ProcessError::throttled(
                r.error
                    .unwrap_or_else(|| "the function asked to slow down".into()),
            );
            Err(match r.retry_after_ms {
                Some(ms) => e.with_retry_after(Duration::from_millis(ms)),
                None => e,
            })
        }
        other => Err(ProcessError::retryable(format!(
            "Invoke {name}: a bad result for this item: status {:?}, want ok, retry, fail or throttled",
            quote(other.as_bytes())
        ))),
    }
}

/// The reason a function error gives every item of the batch.
fn function_error(name: &str, kind: &str, payload: &[u8]) -> String {
    match serde_json::from_slice::<FunctionErrorBody>(payload) {
        Ok(FunctionErrorBody {
            error_type,
            error_message,
        }) if error_type.is_some() || error_message.is_some() => format!(
            "Invoke {name}: function error ({kind}): {}: {}",
            error_type.as_deref().unwrap_or("Error"),
            quote(error_message.unwrap_or_default().as_bytes())
        ),
        _ => format!("Invoke {name}: function error ({kind}): {}", quote(payload)),
    }
}

/// The first [`QUOTE_BYTES`] of `bytes` as one line, a cut marked with `...`.
fn quote(bytes: &[u8]) -> String {
    let cut = bytes.len() > QUOTE_BYTES;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(QUOTE_BYTES)]);
    let mut line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if cut {
        let kept = line.trim_end_matches('\u{FFFD}').len();
        line.truncate(kept);
        line.push_str("...");
    }
    line
}

#[cfg(test)]
#[path = "function_tests.rs"]
mod tests;
