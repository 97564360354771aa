//! `--http` against a real server on 127.0.0.1: a minimal HTTP/1.1
//! responder, so that each test says exactly what goes on the wire (any
//! status, a slow answer, a Retry-After) and counts connections.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test.

use serde_json::value::RawValue;
use settle_core::domain::{ErrorKind, Item, ItemId, Output, ProcessError, RunId};
use settle_core::work::MAX_VISIBILITY;
use settle_core::{AttemptContext, Processor, ProcessorSpec};
use settle_processors::{build, parse_header, Parallelism, SpecError};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::time::Instant;

/// A request as the server read it.
#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    /// Names lowercased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the server answers.
#[derive(Debug, Clone, Default)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    delay: Duration,
    /// Promise 100 bytes more than the body, then hang up.
    cut_short: bool,
}

fn reply(status: u16, body: &str) -> Reply {
    Reply {
        status,
        body: body.as_bytes().to_vec(),
        ..Reply::default()
    }
}

type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
    requests: Mutex<Vec<Request>>,
}

struct Server {
    url: String,
    seen: Arc<Seen>,
}

impl Server {
    async fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/charge", listener.local_addr().unwrap());
        let seen = Arc::new(Seen::default());
        let handler: Arc<Handler> = Arc::new(handler);
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                s.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, s.clone(), handler.clone()));
            }
        });
        Server { url, seen }
    }

    fn requests(&self) -> Vec<Request> {
        self.seen.requests.lock().unwrap().clone()
    }

    fn connections(&self) -> usize {
        self.seen.connections.load(Ordering::SeqCst)
    }
}

/// Answers requests on one connection, keeping it open between them.
async fn serve(stream: tokio::net::TcpStream, seen: Arc<Seen>, handler: Arc<Handler>) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let mut line = String::new();
        if read.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let path = parts.next().unwrap_or_default().to_owned();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map_or(0, |(_, v)| v.parse().unwrap());
        let mut body = vec![0; length];
        if read.read_exact(&mut body).await.is_err() {
            return;
        }
        let request = Request {
            method,
            path,
            headers,
            body,
        };
        seen.requests.lock().unwrap().push(request.clone());
        let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        seen.most_in_flight.fetch_max(now, Ordering::SeqCst);
        let reply = handler(&request);
        tokio::time::sleep(reply.delay).await;
        seen.in_flight.fetch_sub(1, Ordering::SeqCst);
        let mut head = format!("HTTP/1.1 {} Whatever\r\n", reply.status);
        // A 204 has no body, and says nothing of its length.
        if reply.status != 204 {
            let promised = reply.body.len() + if reply.cut_short { 100 } else { 0 };
            head.push_str(&format!("content-length: {promised}\r\n"));
        }
        for (name, value) in &reply.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&reply.body);
        if write.write_all(&bytes).await.is_err() || reply.cut_short {
            return;
        }
    }
}

fn item(id: &str, payload: &str) -> Item {
    Item::new(
        ItemId::new(id).unwrap(),
        RawValue::from_string(payload.into()).unwrap(),
    )
}

fn http(url: &str, headers: &[(&str, &str)], parallelism: usize) -> Arc<dyn Processor> {
    let spec = ProcessorSpec::Http {
        url: url.to_owned(),
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
    };
    build(&spec, Parallelism::of(parallelism)).unwrap()
}

/// One attempt at a one-off item: its result and its log.
async fn attempt(
    processor: &dyn Processor,
    deadline: Option<Duration>,
) -> (Result<Option<Output>, ProcessError>, String) {
    let it = item("user-7", r#"{"amount":42}"#);
    let mut ctx = AttemptContext::new(RunId::generate(0), &it, 1);
    ctx.deadline = deadline.map(|d| Instant::now() + d);
    let result = processor.process(&it, &ctx).await;
    (result, ctx.take_log().unwrap_or_default())
}

async fn answering(r: Reply) -> (Server, Arc<dyn Processor>) {
    let server = Server::start(move |_| r.clone()).await;
    let processor = http(&server.url, &[], 2);
    (server, processor)
}

#[tokio::test]
async fn a_2xx_json_body_is_the_output_and_the_request_carries_the_item() {
    let server = Server::start(|_| reply(200, r#" {"charged": true} "#)).await;
    let processor = http(
        &server.url,
        &[("X-Api-Key", "s3cret-value"), ("X-Tenant", "acme")],
        4,
    );
    let it = item("user-7", r#"{"amount":42}"#);
    let run = RunId::generate(0);
    let ctx = AttemptContext::new(run.clone(), &it, 3);
    let output = processor.process(&it, &ctx).await.unwrap().unwrap();
    assert_eq!(output.get(), r#"{"charged": true}"#);

    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/charge"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("idempotency-key"), Some(&*ctx.idempotency_key));
    assert_eq!(
        r.header("idempotency-key").unwrap(),
        format!("{run}:user-7")
    );
    assert_eq!(r.header("x-api-key"), Some("s3cret-value"));
    assert_eq!(r.header("x-tenant"), Some("acme"));
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "id": "user-7",
            "payload": {"amount": 42},
            "run_id": run.as_str(),
            "attempt": 3,
        })
    );

    let log = ctx.take_log().unwrap();
    let line = log.trim_end();
    assert!(
        line.starts_with(&format!("POST {} -> 200 in ", server.url)) && line.ends_with(" ms"),
        "{log:?}"
    );
    assert_eq!(log.lines().count(), 1, "{log:?}");
    assert!(!log.contains("s3cret"), "header values are never logged");
}

#[tokio::test]
async fn an_empty_body_is_no_output() {
    for status in [200, 201, 204] {
        let (_server, processor) = answering(reply(status, "")).await;
        let (result, log) = attempt(&*processor, None).await;
        assert_eq!(result.unwrap(), None, "{status}");
        assert!(log.contains(&format!("-> {status} in ")), "{log}");
    }
}

#[tokio::test]
async fn a_body_that_is_not_json_is_kept_as_a_string() {
    let (_server, processor) = answering(reply(200, "charged, ref 123\n")).await;
    let (result, _) = attempt(&*processor, None).await;
    // The final line break goes, as for a command's stdout.
    assert_eq!(result.unwrap().unwrap().get(), r#""charged, ref 123""#);
}

#[tokio::test]
async fn an_output_over_the_limit_is_a_permanent_error_naming_its_size() {
    let big = format!("\"{}\"", "x".repeat(70_000));
    let (_server, processor) = answering(reply(200, &big)).await;
    let (result, _) = attempt(&*processor, None).await;
    let e = result.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(e.message.contains("70002 bytes"), "{e}");
    assert!(e.message.contains("65536"), "{e}");
}

#[tokio::test]
async fn a_402_is_permanent_and_its_error_shows_the_body() {
    let (_server, processor) = answering(reply(402, r#"{"error":"card_declined"}"#)).await;
    let (result, log) = attempt(&*processor, None).await;
    let e = result.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert_eq!(e.message, r#"HTTP 402: {"error":"card_declined"}"#);
    assert_eq!(e.retry_after, None);
    assert!(log.contains("-> 402 in "), "{log}");
}

#[tokio::test]
async fn a_body_cut_short_loses_the_output_but_not_the_status() {
    let cut = |status| Reply {
        cut_short: true,
        ..reply(status, "{\"partial")
    };
    let (_server, processor) = answering(cut(200)).await;
    let (result, log) = attempt(&*processor, None).await;
    let e = result.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable, "the output was lost: {e}");
    assert!(
        log.contains("-> 200, then reading its body failed after "),
        "{log}"
    );

    let (_server, processor) = answering(cut(402)).await;
    let (result, log) = attempt(&*processor, None).await;
    let e = result.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent, "the status said so: {e}");
    assert_eq!(e.message, "HTTP 402");
    assert!(log.contains("-> 402 in "), "{log}");
    assert!(log.contains("reading the body failed"), "{log}");
}

#[tokio::test]
async fn a_404_is_permanent() {
    let (_server, processor) = answering(reply(404, "")).await;
    let e = attempt(&*processor, None).await.0.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert_eq!(e.message, "HTTP 404");
}

#[tokio::test]
async fn an_error_body_is_cut_to_one_short_line() {
    let page = format!("<html>\n<body>\r\n{}</body></html>", "oops ".repeat(500));
    let (_server, processor) = answering(reply(400, &page)).await;
    let e = attempt(&*processor, None).await.0.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(
        e.message.starts_with("HTTP 400: <html> <body> oops oops"),
        "{e}"
    );
    assert!(e.message.ends_with("..."), "{e}");
    assert!(e.message.len() <= 220, "{} bytes: {e}", e.message.len());
    assert!(!e.message.contains(['\n', '\r']), "{e}");
}

#[tokio::test]
async fn a_redirect_is_permanent_and_not_followed() {
    let server = Server::start(|r| {
        if r.path == "/charge" {
            Reply {
                headers: vec![("location", "/elsewhere".into())],
                ..reply(301, "moved")
            }
        } else {
            reply(200, "{}")
        }
    })
    .await;
    let processor = http(&server.url, &[], 2);
    let e = attempt(&*processor, None).await.0.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert_eq!(
        e.message,
        "HTTP 301 (redirects are not followed; Location: /elsewhere): moved"
    );
    let paths: Vec<String> = server.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/charge"]);
}

#[tokio::test]
async fn a_429_or_503_is_throttled() {
    for status in [429, 503] {
        let (_server, processor) = answering(reply(status, "slow down")).await;
        let (result, log) = attempt(&*processor, None).await;
        let e = result.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Throttled, "{status}");
        assert_eq!(e.message, format!("HTTP {status}: slow down"));
        assert_eq!(e.retry_after, None, "{status}");
        assert!(log.contains(&format!("-> {status} in ")), "{log}");
    }
}

#[tokio::test]
async fn a_408_425_or_other_5xx_is_retryable() {
    for status in [408, 425, 500, 502, 504] {
        let (_server, processor) = answering(reply(status, "busy")).await;
        let e = attempt(&*processor, None).await.0.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Retryable, "{status}");
        assert_eq!(e.message, format!("HTTP {status}: busy"));
        assert_eq!(e.retry_after, None, "{status}");
    }
}

#[tokio::test]
async fn retry_after_is_honoured_in_seconds_and_as_a_date() {
    let with = |status, value: String| Reply {
        headers: vec![("retry-after", value)],
        ..reply(status, "")
    };
    let (_server, processor) = answering(with(429, "120".into())).await;
    let e = attempt(&*processor, None).await.0.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Throttled);
    assert_eq!(e.retry_after, Some(Duration::from_secs(120)));

    let in_an_hour = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3600));
    let (_server, processor) = answering(with(503, in_an_hour)).await;
    let e = attempt(&*processor, None).await.0.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Throttled);
    let after = e.retry_after.unwrap();
    assert!(
        (3590..=3600).contains(&after.as_secs()),
        "{after:?} for a date an hour away"
    );

    let (_server, processor) = answering(with(429, "604800".into())).await;
    let e = attempt(&*processor, None).await.0.unwrap_err();
    assert_eq!(e.retry_after, Some(MAX_VISIBILITY), "capped at 12 hours");

    // A retryable failure's Retry-After is kept too.
    for status in [408, 500] {
        let (_server, processor) = answering(with(status, "30".into())).await;
        let e = attempt(&*processor, None).await.0.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Retryable, "{status}");
        assert_eq!(e.retry_after, Some(Duration::from_secs(30)), "{status}");
    }

    // A permanent failure's is not: it is never tried again.
    let (_server, processor) = answering(with(400, "30".into())).await;
    let e = attempt(&*processor, None).await.0.unwrap_err();
    assert_eq!((e.kind, e.retry_after), (ErrorKind::Permanent, None));
}

#[tokio::test]
async fn a_refused_connection_is_retryable_and_logged_with_its_causes() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/charge", listener.local_addr().unwrap());
    drop(listener);
    let processor = http(&url, &[], 2);
    let (result, log) = attempt(&*processor, None).await;
    let e = result.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable);
    assert!(e.message.starts_with(&format!("POST {url}: ")), "{e}");
    assert!(e.message.to_lowercase().contains("refused"), "{e}");
    assert!(
        log.starts_with(&format!("POST {url} -> failed after ")),
        "{log}"
    );
    assert!(log.to_lowercase().contains("refused"), "the causes: {log}");
}

#[tokio::test]
async fn a_server_slower_than_the_deadline_is_a_retryable_timeout() {
    let (_server, processor) = answering(Reply {
        delay: Duration::from_secs(5),
        ..reply(200, "{}")
    })
    .await;
    let started = Instant::now();
    let (result, log) = attempt(&*processor, Some(Duration::from_millis(300))).await;
    let e = result.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "cut at the deadline"
    );
    assert_eq!(e.kind, ErrorKind::Retryable);
    assert!(
        e.message
            .contains("no answer within the attempt's deadline"),
        "{e}"
    );
    assert!(log.contains("-> failed after "), "{log}");
}

#[tokio::test]
async fn sequential_requests_reuse_a_kept_alive_connection() {
    let (server, processor) = answering(reply(200, "{}")).await;
    for _ in 0..50 {
        attempt(&*processor, None).await.0.unwrap();
    }
    assert_eq!(server.requests().len(), 50);
    // One connection here, but a connection goes back to the pool on a
    // task of its own: on a busy machine the next request may beat it.
    let connections = server.connections();
    assert!(
        connections <= 5,
        "{connections} connections for 50 requests"
    );
}

#[tokio::test]
async fn requests_in_flight_are_bounded_by_the_parallelism() {
    let server = Server::start(|_| Reply {
        delay: Duration::from_millis(100),
        ..reply(200, "{}")
    })
    .await;
    let processor = http(&server.url, &[], 2);
    let attempts = (0..6).map(|_| attempt(&*processor, None));
    for (result, _) in futures::future::join_all(attempts).await {
        result.unwrap();
    }
    assert_eq!(server.requests().len(), 6);
    assert_eq!(server.seen.most_in_flight.load(Ordering::SeqCst), 2);
}

#[test]
fn bad_urls_are_refused_before_anything_runs() {
    for (url, why) in [
        ("not a url", "not a URL"),
        ("ftp://example.com/x", "must be http or https, not ftp"),
        ("file:///etc/passwd", "must be http or https, not file"),
        ("http://", "not a URL"),
    ] {
        let spec = ProcessorSpec::Http {
            url: url.into(),
            headers: vec![],
        };
        match build(&spec, Parallelism::of(1)) {
            Err(e @ SpecError::Url { .. }) => assert!(e.to_string().contains(why), "{url}: {e}"),
            Err(other) => panic!("{url}: {other}"),
            Ok(_) => panic!("{url} accepted"),
        }
    }
    let ok = ProcessorSpec::Http {
        url: "https://api.example.com/v1/charge?x=1".into(),
        headers: vec![("Authorization".into(), "Bearer abc".into())],
    };
    build(&ok, Parallelism::of(8)).unwrap();
}

#[test]
fn headers_are_parsed_and_their_values_never_shown() {
    assert_eq!(
        parse_header("Authorization:  Bearer abc:def ").unwrap(),
        ("Authorization".into(), "Bearer abc:def".into())
    );
    assert_eq!(
        parse_header("X-Empty:").unwrap(),
        ("X-Empty".into(), String::new())
    );
    for (header, why) in [
        ("Bearer-s3cret", "expected 'Name: value'"),
        (": s3cret", "no name"),
        ("Bad Name: s3cret", "not a valid header name"),
        ("X-Key: s3cret\u{1}", "control"),
        ("Idempotency-Key: s3cret", "Settle sets this header itself"),
        ("content-type: s3cret", "Settle sets this header itself"),
    ] {
        let e = parse_header(header).unwrap_err();
        assert!(matches!(e, SpecError::Header { .. }), "{header}: {e:?}");
        let shown = e.to_string();
        assert!(shown.contains(why), "{header}: {shown}");
        assert!(!shown.contains("s3cret"), "{header}: {shown}");
    }
    // The same checks hold for a spec recorded with a run (a resume).
    let spec = ProcessorSpec::Http {
        url: "http://127.0.0.1:1/".into(),
        headers: vec![("X Bad".into(), "s3cret".into())],
    };
    let e = build(&spec, Parallelism::of(1)).err().unwrap();
    assert!(matches!(e, SpecError::Header { .. }), "{e:?}");
    assert!(!e.to_string().contains("s3cret"), "{e}");
}
