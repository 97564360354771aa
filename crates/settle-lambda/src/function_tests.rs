//! The function processor's handling of each kind of response, against a
//! fake invoker: no network.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test.

use super::*;
use settle_core::domain::{ErrorKind, Item, ItemId, MAX_LOG_BYTES};
use settle_core::{AttemptContext, RunId};
use std::sync::Mutex;

/// Answers every invoke with `answer`, keeping the requests it was sent.
struct Fake {
    answer: Result<Invoked, String>,
    requests: Mutex<Vec<serde_json::Value>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct FakeError(String);

#[async_trait]
impl Invoker for &'static Fake {
    fn name(&self) -> &str {
        "renew-fn"
    }
    async fn invoke(&self, payload: Vec<u8>) -> Result<Invoked, BoxError> {
        self.requests
            .lock()
            .unwrap()
            .push(serde_json::from_slice(&payload).unwrap());
        self.answer
            .clone()
            .map_err(|e| Box::new(FakeError(e)) as BoxError)
    }
}

fn fake(answer: Result<Invoked, String>) -> &'static Fake {
    Box::leak(Box::new(Fake {
        answer,
        requests: Mutex::default(),
    }))
}

fn ok(payload: &str, tail: Option<&str>) -> Result<Invoked, String> {
    Ok(Invoked {
        status: 200,
        function_error: None,
        payload: payload.as_bytes().to_vec(),
        log_tail: tail.map(str::to_owned),
    })
}

fn batch(ids: &[&str]) -> Vec<BatchAttempt> {
    let run = RunId::parse("r20261124T020000Z-5e771e").unwrap();
    ids.iter()
        .map(|id| {
            let item = Item::new(
                ItemId::new(*id).unwrap(),
                RawValue::from_string(format!(r#"{{"user":"{id}"}}"#)).unwrap(),
            );
            let mut ctx = AttemptContext::new(run.clone(), &item, 2);
            ctx.deadline = Some(Instant::now() + Duration::from_secs(10));
            BatchAttempt { item, ctx }
        })
        .collect()
}

async fn run(f: &'static Fake, ids: &[&str]) -> (Vec<Outcome>, Vec<Option<String>>) {
    let b = batch(ids);
    let out = FunctionProcessor::new(f).process_batch(&b).await;
    let logs = b.iter().map(|a| a.ctx.take_log()).collect();
    (out, logs)
}

fn err(o: &Outcome) -> &ProcessError {
    o.as_ref().unwrap_err()
}

#[tokio::test]
async fn the_request_holds_each_item_with_its_attempt() {
    let f = fake(ok(r#"{"results":[]}"#, None));
    run(f, &["a", "b"]).await;
    let requests = f.requests.lock().unwrap();
    assert_eq!(requests.len(), 1, "one invoke per batch");
    let items = requests[0]["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["id"], "a");
    assert_eq!(items[0]["payload"], serde_json::json!({"user": "a"}));
    assert_eq!(items[0]["run_id"], "r20261124T020000Z-5e771e");
    assert_eq!(items[0]["attempt"], 2);
    assert_eq!(items[0]["idempotency_key"], "r20261124T020000Z-5e771e:a");
    let deadline = items[0]["deadline_ms"].as_u64().unwrap();
    let now = now_millis();
    assert!(
        deadline > now + 9_000 && deadline <= now + 10_000,
        "{deadline} vs {now}"
    );
}

#[tokio::test]
async fn each_result_settles_its_own_item() {
    let f = fake(ok(
        r#"{"results":[
            {"id":"ok","status":"ok","output":{"charged":1500}},
            {"id":"bare","status":"ok"},
            {"id":"retry","status":"retry","error":"gateway busy","retry_after_ms":30000},
            {"id":"plain-retry","status":"retry"},
            {"id":"fail","status":"fail","error":"card declined"},
            {"id":"odd","status":"maybe"}
        ]}"#,
        Some("START\nrenewing everyone\nEND\n"),
    ));
    let (out, logs) = run(f, &["ok", "bare", "retry", "plain-retry", "fail", "odd"]).await;
    assert_eq!(
        out[0].as_ref().unwrap().as_ref().unwrap().get(),
        r#"{"charged":1500}"#
    );
    assert!(out[1].as_ref().unwrap().is_none());
    let retry = err(&out[2]);
    assert_eq!(retry.kind, ErrorKind::Retryable);
    assert_eq!(retry.message, "gateway busy");
    assert_eq!(retry.retry_after, Some(Duration::from_secs(30)));
    assert_eq!(err(&out[3]).message, "the function asked for a retry");
    assert_eq!(err(&out[3]).retry_after, None);
    let fail = err(&out[4]);
    assert_eq!(
        (fail.kind, fail.message.as_str()),
        (ErrorKind::Permanent, "card declined")
    );
    let odd = err(&out[5]);
    assert_eq!(odd.kind, ErrorKind::Retryable);
    assert!(
        odd.message
            .contains(r#"status "maybe", want ok, retry, fail or throttled"#),
        "{}",
        odd.message
    );
    // Every attempt's log: the invoke line, then the tail it ran under.
    let log = logs[0].as_deref().unwrap();
    assert!(
        log.starts_with("Invoke renew-fn (6 items) -> 200 in "),
        "{log}"
    );
    assert!(log.ends_with("START\nrenewing everyone\nEND\n"), "{log}");
}

#[tokio::test]
async fn a_throttled_result_asks_to_slow_down() {
    let f = fake(ok(
        r#"{"results":[
            {"id":"waits","status":"throttled","error":"HTTP 429 from the gateway","retry_after_ms":2000},
            {"id":"bare","status":"throttled"},
            {"id":"ok","status":"ok"},
            {"id":"no-status","retry_after_ms":2000}
        ]}"#,
        None,
    ));
    let (out, _) = run(f, &["waits", "bare", "ok", "no-status"]).await;
    let waits = err(&out[0]);
    assert_eq!(
        (waits.kind, waits.message.as_str()),
        (ErrorKind::Throttled, "HTTP 429 from the gateway")
    );
    assert_eq!(waits.retry_after, Some(Duration::from_secs(2)));
    let bare = err(&out[1]);
    assert_eq!(
        (bare.kind, bare.message.as_str()),
        (ErrorKind::Throttled, "the function asked to slow down")
    );
    assert_eq!(bare.retry_after, None);
    assert!(out[2].is_ok(), "a throttle is its own item's");
    // Unlike a jsonl answer, a result always names its status.
    let none = err(&out[3]);
    assert_eq!(none.kind, ErrorKind::Retryable);
    assert!(
        none.message
            .contains("a bad result for this item (missing field `status`"),
        "{}",
        none.message
    );
}

#[tokio::test]
async fn an_unknown_id_is_ignored_and_a_missing_result_is_retried() {
    let f = fake(ok(
        r#"{"results":[{"id":"a","status":"ok"},{"id":"stranger","status":"fail"},{"id":"a","status":"fail"}]}"#,
        None,
    ));
    let (out, _) = run(f, &["a", "b"]).await;
    // The first result for "a" counts; the stranger and the repeat do not.
    assert!(out[0].is_ok());
    let missing = err(&out[1]);
    assert_eq!(missing.kind, ErrorKind::Retryable);
    assert_eq!(missing.message, "Invoke renew-fn: no result for this item");
}

#[tokio::test]
async fn a_result_of_its_own_keeps_its_own_log() {
    let f = fake(ok(
        r#"{"results":[{"id":"a","status":"ok","log":"charged a\n"},{"id":"b","status":"ok"}]}"#,
        Some("both items' lines\n"),
    ));
    let (_, logs) = run(f, &["a", "b"]).await;
    let a = logs[0].as_deref().unwrap();
    assert!(
        a.ends_with("charged a\n") && !a.contains("both items"),
        "{a}"
    );
    assert!(logs[1].as_deref().unwrap().ends_with("both items' lines\n"));
}

#[tokio::test]
async fn a_function_error_retries_the_whole_batch_with_its_reason() {
    let f = fake(Ok(Invoked {
        status: 200,
        function_error: Some("Unhandled".into()),
        payload: br#"{"errorType":"TypeError","errorMessage":"cannot read 'card' of undefined"}"#
            .to_vec(),
        log_tail: Some("TypeError at handler.js:3\n".into()),
    }));
    let (out, logs) = run(f, &["a", "b", "c"]).await;
    for o in &out {
        let e = err(o);
        assert_eq!(e.kind, ErrorKind::Retryable);
        assert_eq!(
            e.message,
            "Invoke renew-fn: function error (Unhandled): TypeError: cannot read 'card' of undefined"
        );
    }
    for log in &logs {
        let log = log.as_deref().unwrap();
        assert!(log.contains("(function error: Unhandled)"), "{log}");
        assert!(log.ends_with("TypeError at handler.js:3\n"), "{log}");
    }
}

#[tokio::test]
async fn a_failed_invoke_retries_the_whole_batch() {
    let f = fake(Err(
        "AccessDeniedException: not authorized to perform lambda:InvokeFunction".into(),
    ));
    let (out, logs) = run(f, &["a", "b"]).await;
    for o in &out {
        assert_eq!(err(o).kind, ErrorKind::Retryable);
        assert_eq!(
            err(o).message,
            "Invoke renew-fn: AccessDeniedException: not authorized to perform lambda:InvokeFunction"
        );
    }
    assert!(logs[1].as_deref().unwrap().contains("-> failed after"));
}

/// Lambda refuses every invoke as too many, as the SDK reports it.
struct Throttling {
    retry_after_seconds: Option<&'static str>,
}

#[async_trait]
impl Invoker for Throttling {
    fn name(&self) -> &str {
        "renew-fn"
    }
    async fn invoke(&self, _payload: Vec<u8>) -> Result<Invoked, BoxError> {
        let mut e = aws_sdk_lambda::types::error::TooManyRequestsException::builder()
            .message("Rate Exceeded.")
            .reason(aws_sdk_lambda::types::ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded);
        if let Some(s) = self.retry_after_seconds {
            e = e.retry_after_seconds(s);
        }
        let raw = aws_smithy_runtime_api::http::Response::new(
            429.try_into().unwrap(),
            aws_smithy_types::body::SdkBody::empty(),
        );
        Err(Box::new(SdkError::service_error(
            InvokeError::TooManyRequestsException(e.build()),
            raw,
        )))
    }
}

#[tokio::test]
async fn a_throttled_invoke_throttles_the_whole_batch() {
    for (retry_after_seconds, after) in [(Some("3"), Some(Duration::from_secs(3))), (None, None)] {
        let b = batch(&["a", "b"]);
        let out = FunctionProcessor::new(Throttling {
            retry_after_seconds,
        })
        .process_batch(&b)
        .await;
        for o in &out {
            let e = err(o);
            assert_eq!(e.kind, ErrorKind::Throttled, "{}", e.message);
            assert_eq!(
                e.message,
                "Invoke renew-fn: service error: TooManyRequestsException: Rate Exceeded."
            );
            assert_eq!(e.retry_after, after);
        }
        let log = b[0].ctx.take_log().unwrap();
        assert!(log.contains("-> failed after"), "{log}");
    }
}

#[tokio::test]
async fn a_malformed_response_retries_the_batch_with_a_bounded_quote() {
    let garbage = format!("<html>{}</html>", "x".repeat(5_000));
    let f = fake(ok(&garbage, None));
    let (out, _) = run(f, &["a", "b"]).await;
    for o in &out {
        let e = err(o);
        assert_eq!(e.kind, ErrorKind::Retryable);
        assert!(
            e.message
                .contains("the response is not {\"results\": [...]}"),
            "{}",
            e.message
        );
        assert!(e.message.ends_with("..."), "{}", e.message);
        assert!(e.message.len() < 400, "{} bytes", e.message.len());
    }
    // Valid JSON of the wrong shape, too.
    let f = fake(ok(r#"{"items":[]}"#, None));
    let (out, _) = run(f, &["a"]).await;
    assert!(
        err(&out[0]).message.contains(r#"{"items":[]}"#),
        "{}",
        err(&out[0]).message
    );
    // A result that is not an object with a string id is ignored: its item has none.
    let f = fake(ok(r#"{"results":[42,{"id":7,"status":"ok"}]}"#, None));
    let (out, _) = run(f, &["a"]).await;
    assert_eq!(
        err(&out[0]).message,
        "Invoke renew-fn: no result for this item"
    );
    // A result for the item with a field of the wrong type fails that item only.
    let f = fake(ok(
        r#"{"results":[{"id":"a","status":"retry","retry_after_ms":"soon"},{"id":"b","status":"ok"}]}"#,
        None,
    ));
    let (out, _) = run(f, &["a", "b"]).await;
    assert!(
        err(&out[0]).message.contains("a bad result for this item"),
        "{}",
        err(&out[0]).message
    );
    assert!(out[1].is_ok());
}

#[tokio::test]
async fn a_long_log_tail_is_bounded_per_attempt() {
    let tail = format!("{}the end\n", "line\n".repeat(10_000));
    let f = fake(ok(r#"{"results":[{"id":"a","status":"ok"}]}"#, Some(&tail)));
    let (_, logs) = run(f, &["a"]).await;
    let log = logs[0].as_deref().unwrap();
    assert!(log.starts_with("[settle: "), "{}", &log[..80]);
    assert!(log.ends_with("the end\n"));
    assert!(log.len() <= MAX_LOG_BYTES + 100, "{} bytes", log.len());
}

#[test]
fn the_log_tail_is_decoded_from_base64() {
    let b64 = aws_smithy_types::base64::encode("START RequestId: 1\nrenewing a\nEND\n");
    assert_eq!(
        decode_tail(&b64).as_deref(),
        Some("START RequestId: 1\nrenewing a\nEND\n")
    );
    assert_eq!(decode_tail("not base64!"), None);
}
