//! The stock worker's other processor kinds on `infra/events/worker-sqs.json`,
//! through the worker handler on the embedded backend: the user's own
//! function (behind a fake invoker) and an HTTP endpoint (a tiny server on
//! 127.0.0.1). Each record settles on its own, as with the scripted kind.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test.

mod common;

use async_trait::async_trait;
use common::*;
use serde_json::{json, Value};
use settle_core::domain::{AttemptOutcome, ErrorKind};
use settle_core::message::{decode_results, ResultBody, WorkBody};
use settle_core::ports::BoxError;
use settle_core::work::WorkerConfig;
use settle_lambda::function::{FunctionProcessor, Invoked, Invoker};
use settle_lambda::{ProcessorSettings, WorkerFunction, WorkerSettings};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::time::Instant;

const OK: &str = "7b2c1d3e-4f50-4a61-8b72-9c83d4e5f601";

const ITEMS: &[(&str, &str)] = &[
    ("sub-000001", "ok"),
    ("sub-000002", "permanent"),
    ("sub-000003", "panic"),
];

fn config() -> WorkerConfig {
    WorkerConfig {
        item_timeout: Some(Duration::from_secs(5)),
        ..WorkerConfig::default()
    }
}

/// The results the handler sent, by item.
async fn results(e: &settle_embedded::Embedded) -> Vec<ResultBody> {
    let mut bodies: Vec<ResultBody> = drain(&e.results)
        .await
        .iter()
        .flat_map(|d| decode_results(&d.body).unwrap())
        .collect();
    bodies.sort_by(|a, b| a.item.cmp(&b.item));
    bodies
}

fn error_of(r: &ResultBody) -> (ErrorKind, bool, &str) {
    match &r.attempt.outcome {
        AttemptOutcome::Failed {
            kind,
            terminal,
            error,
        } => (*kind, *terminal, error.as_str()),
        other => panic!("{}: {other:?}", r.item),
    }
}

/// Plays the user's function: answers `ok` and `permanent` items, leaves
/// the `panic` item out, adds a result for an item it was not sent.
#[derive(Default)]
struct Function {
    requests: Mutex<Vec<Value>>,
}

#[async_trait]
impl Invoker for &'static Function {
    fn name(&self) -> &str {
        "renewals-fn"
    }
    async fn invoke(&self, payload: Vec<u8>) -> Result<Invoked, BoxError> {
        let request: Value = serde_json::from_slice(&payload)?;
        let mut results = vec![json!({"id": "sub-999999", "status": "ok"})];
        for item in request["items"].as_array().unwrap() {
            let id = item["id"].clone();
            match item["payload"]["script"].as_str().unwrap() {
                "ok" => results.push(json!({"id": id, "status": "ok", "output": {"renewed": id}})),
                "permanent" => {
                    results.push(json!({"id": id, "status": "fail", "error": "card declined"}))
                }
                _ => {}
            }
        }
        self.requests.lock().unwrap().push(request);
        Ok(Invoked {
            status: 200,
            function_error: None,
            payload: serde_json::to_vec(&json!({ "results": results }))?,
            log_tail: Some("START RequestId: 1\nrenewing the batch\nEND RequestId: 1\n".into()),
        })
    }
}

#[tokio::test]
async fn the_function_kind_invokes_once_per_batch_and_settles_each_record() {
    let e = embedded().await;
    fixture_run(&e, ITEMS).await;
    let function: &'static Function = Box::leak(Box::default());
    let worker = WorkerFunction::batched(
        &e.backend(),
        Arc::new(FunctionProcessor::new(function)),
        config(),
    );
    let response = worker
        .handle(
            sqs_fixture("worker-sqs.json"),
            Some(Instant::now() + Duration::from_secs(30)),
        )
        .await
        .unwrap();
    // The item without a result is retried as a new message; the
    // undecodable record is parked; no record comes back.
    assert!(failure_ids(&response).is_empty());

    let requests = function.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 1, "one invoke for the batch");
    let ids: Vec<&str> = requests[0]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["sub-000001", "sub-000002", "sub-000003"]);
    assert_eq!(
        requests[0]["items"][0]["idempotency_key"],
        "r20261124T020000Z-5e771e:sub-000001"
    );
    assert_eq!(requests[0]["items"][0]["attempt"], 1);

    let bodies = results(&e).await;
    assert_eq!(bodies.len(), 3);
    assert_eq!(bodies[0].attempt.outcome, AttemptOutcome::Succeeded);
    assert_eq!(bodies[0].attempt.message_id, OK);
    assert_eq!(
        bodies[0].attempt.output.as_ref().unwrap().get(),
        r#"{"renewed":"sub-000001"}"#
    );
    assert_eq!(
        error_of(&bodies[1]),
        (ErrorKind::Permanent, true, "card declined")
    );
    assert_eq!(
        error_of(&bodies[2]),
        (
            ErrorKind::Retryable,
            false,
            "Invoke renewals-fn: no result for this item"
        )
    );
    // Each attempt keeps the invocation's log tail as its log.
    for b in &bodies {
        let log = b.attempt.log.as_deref().unwrap();
        assert!(
            log.starts_with("Invoke renewals-fn (3 items) -> 200 in "),
            "{log}"
        );
        assert!(log.contains("renewing the batch\n"), "{log}");
    }
    let dead = drain(&e.dlq).await;
    assert_eq!(dead.len(), 2);
    let copy = dead
        .iter()
        .find_map(|d| WorkBody::decode(&d.body).ok())
        .unwrap();
    assert_eq!(copy.item.as_str(), "sub-000002");
}

/// A minimal HTTP/1.1 endpoint: answers each POST by its item's script
/// (`ok` 200 with a JSON body, `permanent` 422, anything else 502 with
/// Retry-After: a retryable failure, where a 503 would be a throttle) and keeps each request's headers and body.
async fn endpoint() -> (String, Arc<Mutex<Vec<(Vec<String>, Value)>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/renew", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                loop {
                    let mut headers = Vec::new();
                    let mut line = String::new();
                    let mut length = 0;
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end().to_owned();
                        if l.is_empty() {
                            break;
                        }
                        if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap();
                        }
                        headers.push(l);
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).await.unwrap();
                    let body: Value = serde_json::from_slice(&body).unwrap();
                    let (status, extra, text) = match body["payload"]["script"].as_str() {
                        Some("ok") => ("200 OK", "", format!(r#"{{"renewed":{}}}"#, body["id"])),
                        Some("permanent") => ("422 Unprocessable", "", "card declined".into()),
                        _ => (
                            "502 Bad Gateway",
                            "Retry-After: 120\r\n",
                            "try later".into(),
                        ),
                    };
                    s.lock().unwrap().push((headers, body));
                    let reply = format!(
                        "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\n\r\n{text}",
                        text.len()
                    );
                    if reader.get_mut().write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

/// The stock worker's setup, as its cold start runs it.
async fn stock(e: &settle_embedded::Embedded, kind: &ProcessorSettings) -> WorkerFunction {
    let settings = WorkerSettings::from_lookup(&|var: &str| {
        (var == "SETTLE_ITEM_TIMEOUT_MS").then(|| "5000".to_owned())
    })
    .unwrap();
    // No secret to read: the SDK is never called.
    let sdk = aws_config::SdkConfig::builder().build();
    settle_lambda::run::stock_function(&sdk, &e.backend(), kind, settings)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_http_kind_posts_each_record_and_settles_it_alone() {
    let e = embedded().await;
    fixture_run(&e, ITEMS).await;
    let (url, seen) = endpoint().await;
    let kind = ProcessorSettings::Http {
        url: url.clone(),
        secret: None,
        header: "Authorization".into(),
    };
    let response = stock(&e, &kind)
        .await
        .handle(
            sqs_fixture("worker-sqs.json"),
            Some(Instant::now() + Duration::from_secs(30)),
        )
        .await
        .unwrap();
    // The panicked item's retry is a new message: no record comes back.
    assert!(failure_ids(&response).is_empty());

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "one POST per decodable record");
    for (headers, body) in &seen {
        let key = format!(
            "idempotency-key: r20261124T020000Z-5e771e:{}",
            body["id"].as_str().unwrap()
        );
        assert!(
            headers.iter().any(|h| h.eq_ignore_ascii_case(&key)),
            "{headers:?}"
        );
        assert!(!headers
            .iter()
            .any(|h| h.to_ascii_lowercase().starts_with("authorization")));
    }

    let bodies = results(&e).await;
    assert_eq!(bodies[0].attempt.outcome, AttemptOutcome::Succeeded);
    assert_eq!(
        bodies[0].attempt.output.as_ref().unwrap().get(),
        r#"{"renewed":"sub-000001"}"#
    );
    assert_eq!(
        error_of(&bodies[1]),
        (ErrorKind::Permanent, true, "HTTP 422: card declined")
    );
    assert_eq!(
        error_of(&bodies[2]),
        (ErrorKind::Retryable, false, "HTTP 502: try later")
    );
    let log = bodies[2].attempt.log.as_deref().unwrap();
    assert!(log.starts_with(&format!("POST {url} -> 502 in ")), "{log}");
    assert_eq!(drain(&e.dlq).await.len(), 2);
}

#[tokio::test]
async fn a_bad_http_url_fails_the_cold_start() {
    let e = embedded().await;
    let kind = ProcessorSettings::Http {
        url: "ftp://example.com/".into(),
        secret: None,
        header: "Authorization".into(),
    };
    let settings = WorkerSettings::from_lookup(&|_: &str| None).unwrap();
    let sdk = aws_config::SdkConfig::builder().build();
    let err = settle_lambda::run::stock_function(&sdk, &e.backend(), &kind, settings)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("the scheme must be http or https"),
        "{err}"
    );
}
