//! `--http URL`: one POST per attempt to the user's endpoint.
//!
//! | what | contract |
//! |---|---|
//! | request | `POST URL`, `Content-Type: application/json`, body `{"id", "payload", "run_id", "attempt"}` |
//! | headers | `Idempotency-Key: <run id>:<item id>`, and each `--http-header 'Name: value'` |
//! | connections | one keep-alive pool per processor, at most `parallelism` requests in flight |
//! | 2xx | succeeded: a JSON body is the output, any other body is kept as a JSON string, an empty one is no output |
//! | 429, 503 | throttled: not a failure, no attempt used; the run slows down, and waits `Retry-After` first when the answer has one (seconds or an HTTP date; at most [`MAX_VISIBILITY`]) |
//! | 408, 425, any other 5xx | failed, retryable, not before `Retry-After` (the same) |
//! | a connection error, no answer by the attempt's deadline | failed, retryable |
//! | 3xx (never followed), any other 4xx | failed permanently |
//! | the attempt's log | one line per request: `POST URL -> 402 in 12 ms`, or the connection error with its causes |
//!
//! The error is `HTTP <status>: <the body's first bytes, on one line>`.
//! Header values are never logged, nor put in an error: they are usually
//! credentials.

use crate::SpecError;
use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use reqwest::{redirect, Client, Response, StatusCode, Url};
use serde::Serialize;
use serde_json::value::RawValue;
use settle_core::domain::{bounded_error, Item, Output, ProcessError, MAX_OUTPUT_BYTES};
use settle_core::work::MAX_VISIBILITY;
use settle_core::{AttemptContext, Processor};
use std::error::Error as StdError;
use std::time::{Duration, SystemTime};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Bytes of a failed response's body that its error shows.
pub const ERROR_BODY_BYTES: usize = 200;

/// Most of a failed response's body read (and dropped) so that its
/// connection can go back to the pool; past this the connection is closed
/// instead, which costs less than reading an endless error page.
const DRAIN_LIMIT: usize = 64 * 1024;

/// Most of a successful response's body read to learn its size once it is
/// too large to be an output: enough to tell a near miss, not a download.
const OVERSIZE_LIMIT: usize = 16 * MAX_OUTPUT_BYTES;

/// How long an idle connection stays in the pool. Below the usual
/// 60–75 s keep-alive of servers and load balancers, so that the client
/// gives up a connection before the server does and a request rarely
/// lands on one being closed.
const POOL_IDLE: Duration = Duration::from_secs(50);

/// Headers that Settle itself sets on every request: a user's copy would
/// contradict it (a second `Idempotency-Key`, a `Content-Type` that is not
/// the body's) or break the framing of the request.
const RESERVED: &[&str] = &[
    "idempotency-key",
    "content-type",
    "content-length",
    "transfer-encoding",
    "connection",
];

/// Reads an `--http-header` value, `Name: value`. The value is trimmed of
/// surrounding whitespace; an error shows the name, never the value.
pub fn parse_header(s: &str) -> Result<(String, String), SpecError> {
    let Some((name, value)) = s.split_once(':') else {
        // With no colon, what was written may be a bare value (a token):
        // say how long it is, not what it is.
        return Err(SpecError::Header {
            header: format!("({} characters)", s.chars().count()),
            reason: "expected 'Name: value'".into(),
        });
    };
    let name = name.trim();
    let value = value.trim();
    check_header(name, value)?;
    Ok((name.to_owned(), value.to_owned()))
}

/// Checks one header as it will be sent, returning it in wire form.
fn check_header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), SpecError> {
    let refuse = |reason: &str| SpecError::Header {
        header: name.to_owned(),
        reason: reason.to_owned(),
    };
    if name.is_empty() {
        return Err(refuse("the header has no name (expected 'Name: value')"));
    }
    let parsed =
        HeaderName::from_bytes(name.as_bytes()).map_err(|_| refuse("not a valid header name"))?;
    if RESERVED.contains(&parsed.as_str()) {
        return Err(refuse("Settle sets this header itself"));
    }
    let value =
        HeaderValue::from_str(value).map_err(|_| refuse("the value holds a control character"))?;
    Ok((parsed, value))
}

/// Checks the URL: it parses, and its scheme is http or https.
fn check_url(url: &str) -> Result<Url, SpecError> {
    let refuse = |reason: String| SpecError::Url {
        url: url.to_owned(),
        reason,
    };
    let parsed = Url::parse(url).map_err(|e| refuse(format!("not a URL: {e}")))?;
    // Once it parses, the URL is shown without its password.
    let refuse = |reason: String| SpecError::Url {
        url: shown_url(&parsed),
        reason,
    };
    match parsed.scheme() {
        "http" | "https" => {}
        other => {
            return Err(refuse(format!(
                "the scheme must be http or https, not {other}"
            )))
        }
    }
    if !matches!(parsed.host_str(), Some(host) if !host.is_empty()) {
        return Err(refuse("the URL has no host".into()));
    }
    Ok(parsed)
}

/// POSTs each attempt to the user's endpoint.
#[derive(Debug)]
pub struct Http {
    url: Url,
    /// The URL as logs and errors show it: without a password.
    shown: String,
    client: Client,
    slots: Semaphore,
}

impl Http {
    /// Refuses a malformed URL or header. The client, and with it the
    /// connection pool, is built once here and shared by every attempt.
    pub fn new(
        url: &str,
        headers: &[(String, String)],
        parallelism: usize,
    ) -> Result<Self, SpecError> {
        let parsed = check_url(url)?;
        let mut defaults = HeaderMap::new();
        for (name, value) in headers {
            let (name, value) = check_header(name.trim(), value.trim())?;
            // Repeated names are all sent, as curl's -H does.
            defaults.append(name, mark_sensitive(value));
        }
        let parallelism = parallelism.max(1);
        let client = Client::builder()
            // A redirect answers with another endpoint than the one the
            // user named, and a followed POST may turn into a GET: the
            // user fixes the URL instead.
            .redirect(redirect::Policy::none())
            // One idle connection per item that can be in flight: after a
            // burst, every slot finds a warm connection.
            .pool_max_idle_per_host(parallelism)
            .pool_idle_timeout(POOL_IDLE)
            .user_agent(concat!("settle/", env!("CARGO_PKG_VERSION")))
            .default_headers(defaults)
            .build()
            .map_err(|source| SpecError::Client {
                url: url.to_owned(),
                source,
            })?;
        Ok(Self {
            shown: shown_url(&parsed),
            url: parsed,
            client,
            slots: Semaphore::new(parallelism),
        })
    }

    /// The request for one attempt, unsent.
    fn request(
        &self,
        item: &Item,
        ctx: &AttemptContext,
    ) -> Result<reqwest::RequestBuilder, ProcessError> {
        let body = serde_json::to_vec(&Body {
            id: item.id.as_str(),
            payload: &item.payload,
            run_id: ctx.run.as_str(),
            attempt: ctx.attempt,
        })
        .map_err(|e| ProcessError::permanent(format!("cannot encode the item as JSON: {e}")))?;
        // Item ids hold no control characters, so this holds for any id;
        // should it not, no attempt could ever send the item.
        let key = HeaderValue::from_bytes(ctx.idempotency_key.as_bytes()).map_err(|_| {
            ProcessError::permanent("the idempotency key cannot be sent as a header value")
        })?;
        Ok(self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header("idempotency-key", key)
            .body(body))
    }
}

/// What the endpoint receives.
#[derive(Serialize)]
struct Body<'a> {
    id: &'a str,
    payload: &'a RawValue,
    run_id: &'a str,
    attempt: u32,
}

/// Keeps a header value out of reqwest's and hyper's own debug output.
fn mark_sensitive(mut value: HeaderValue) -> HeaderValue {
    value.set_sensitive(true);
    value
}

/// `url` without its password, if it has one.
fn shown_url(url: &Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    shown.to_string()
}

#[async_trait]
impl Processor for Http {
    async fn process(
        &self,
        item: &Item,
        ctx: &AttemptContext,
    ) -> Result<Option<Output>, ProcessError> {
        let _slot = crate::slot(&self.slots).await?;
        let mut request = self.request(item, ctx)?;
        // Measured after the wait for a slot: the deadline is what is left
        // of the attempt, and the log's time is the endpoint's.
        let started = Instant::now();
        let budget = ctx.deadline.map(|d| d.saturating_duration_since(started));
        if let Some(budget) = budget {
            if budget.is_zero() {
                ctx.log(format!(
                    "POST {} -> not sent: the deadline has passed\n",
                    self.shown
                ));
                return Err(ProcessError::retryable(format!(
                    "POST {}: not sent, the attempt's deadline had passed",
                    self.shown
                )));
            }
            // Covers connecting, sending and reading the whole body.
            request = request.timeout(budget);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => return Err(self.failed(ctx, started, budget, None, e)),
        };
        let status = response.status();
        let retry_after = retry_after(response.headers(), SystemTime::now());
        let location = response
            .headers()
            .get(LOCATION)
            .map(|l| one_line(l.as_bytes(), ERROR_BODY_BYTES));
        if status.is_success() {
            let body = read_body(response, MAX_OUTPUT_BYTES + 1, OVERSIZE_LIMIT).await;
            let body = body.map_err(|e| self.failed(ctx, started, budget, Some(status), e))?;
            self.log_status(ctx, started, status);
            return success(body);
        }
        // One byte more than is shown, to tell that there was more.
        let body = match read_body(response, ERROR_BODY_BYTES + 1, DRAIN_LIMIT).await {
            Ok(body) => {
                self.log_status(ctx, started, status);
                body
            }
            // The status has said what became of the item: the body only
            // explains it, so losing it changes nothing but the message.
            Err(e) => {
                ctx.log(format!(
                    "POST {} -> {} in {} ms; reading the body failed: {}\n",
                    self.shown,
                    status.as_u16(),
                    started.elapsed().as_millis(),
                    causes(&e.without_url())
                ));
                Received::default()
            }
        };
        let mut message = format!("HTTP {}", status.as_u16());
        if status.is_redirection() {
            message.push_str(" (redirects are not followed");
            if let Some(location) = location {
                message.push_str("; Location: ");
                message.push_str(&location);
            }
            message.push(')');
        }
        let snippet = one_line(&body.kept, ERROR_BODY_BYTES);
        if !snippet.is_empty() {
            message.push_str(": ");
            message.push_str(&snippet);
        }
        let message = bounded_error(message);
        let error = if throttling(status) {
            ProcessError::throttled(message)
        } else if retryable(status) {
            ProcessError::retryable(message)
        } else {
            return Err(ProcessError::permanent(message));
        };
        Err(match retry_after {
            Some(after) => error.with_retry_after(after),
            None => error,
        })
    }
}

impl Http {
    fn log_status(&self, ctx: &AttemptContext, started: Instant, status: StatusCode) {
        ctx.log(format!(
            "POST {} -> {} in {} ms\n",
            self.shown,
            status.as_u16(),
            started.elapsed().as_millis()
        ));
    }

    /// A request that got no answer, or a 2xx whose body (the output) was
    /// lost: logged with its causes, and retryable, since the endpoint never
    /// said the item was bad.
    fn failed(
        &self,
        ctx: &AttemptContext,
        started: Instant,
        budget: Option<Duration>,
        status: Option<StatusCode>,
        e: reqwest::Error,
    ) -> ProcessError {
        let ms = started.elapsed().as_millis();
        let timed_out = e.is_timeout();
        // reqwest names the URL itself, password and all: this names ours.
        let causes = causes(&e.without_url());
        let during = match status {
            Some(status) => format!("{}, then reading its body failed", status.as_u16()),
            None => "failed".to_owned(),
        };
        ctx.log(format!(
            "POST {} -> {during} after {ms} ms: {causes}\n",
            self.shown
        ));
        let message = match budget {
            Some(budget) if timed_out => format!(
                "POST {}: no answer within the attempt's deadline ({} ms)",
                self.shown,
                budget.as_millis()
            ),
            _ => format!("POST {}: {causes}", self.shown),
        };
        ProcessError::retryable(bounded_error(message))
    }
}

/// A 2xx response's body as the item's output.
fn success(body: Received) -> Result<Option<Output>, ProcessError> {
    if body.total > MAX_OUTPUT_BYTES {
        let size = if body.complete {
            format!("{} bytes", body.total)
        } else {
            format!("over {} bytes", body.total)
        };
        return Err(ProcessError::permanent(format!(
            "the response body is {size}; an item's output may be at most {MAX_OUTPUT_BYTES}"
        )));
    }
    let text = String::from_utf8_lossy(&body.kept);
    Ok((!text.trim().is_empty()).then(|| Output::from_text(&text)))
}

/// Whether the endpoint asks to slow down: 429 Too Many Requests, or 503
/// Service Unavailable, which servers and load balancers answer when
/// overloaded (RFC 9110 pairs both with `Retry-After`). The item was not
/// worked on, so the answer is no failure of it.
fn throttling(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 503)
}

/// Whether trying again later can help: the endpoint said so (408 Request
/// Timeout, 425 Too Early), or it failed itself (5xx).
fn retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 425) || status.is_server_error()
}

/// How long `Retry-After` asks to wait: delay seconds or an HTTP date,
/// at most [`MAX_VISIBILITY`] (a message cannot be hidden for longer).
/// A date in the past is no wait; an unreadable value is ignored.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let after = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is still "a long time".
        Duration::from_secs(value.parse().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(after.min(MAX_VISIBILITY))
}

/// Part of a response body.
#[derive(Debug, Default)]
struct Received {
    /// Its first bytes.
    kept: Vec<u8>,
    /// How many bytes were read in all.
    total: usize,
    /// Whether that was the whole body.
    complete: bool,
}

/// Reads `response`'s body, keeping its first `keep` bytes, and stopping
/// once more than `limit` bytes have been read.
async fn read_body(
    mut response: Response,
    keep: usize,
    limit: usize,
) -> Result<Received, reqwest::Error> {
    let mut body = Received::default();
    while let Some(chunk) = response.chunk().await? {
        body.total += chunk.len();
        let room = keep.saturating_sub(body.kept.len());
        body.kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.total > limit {
            return Ok(body);
        }
    }
    body.complete = true;
    Ok(body)
}

/// The first `max` bytes of `bytes` as one line of text: whitespace and
/// control characters become single spaces, a cut is marked with `...`.
fn one_line(bytes: &[u8], max: usize) -> String {
    let cut = bytes.len() > max;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(max)]);
    let mut line = String::with_capacity(text.len());
    for word in text.split(|c: char| c.is_whitespace() || c.is_control()) {
        if word.is_empty() {
            continue;
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    // A multi-byte character cut in two shows as U+FFFD: drop it.
    if cut {
        let trimmed = line.trim_end_matches('\u{FFFD}').len();
        line.truncate(trimmed);
        line.push_str("...");
    }
    line
}

/// An error and its causes, on one line, each said once (hyper and
/// reqwest often repeat their source's text in their own).
pub fn causes(e: &(dyn StdError + 'static)) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
            retry_after(&h, now)
        };
        assert_eq!(with("120"), Some(Duration::from_secs(120)));
        assert_eq!(with(" 0 "), Some(Duration::ZERO));
        assert_eq!(with("99999999999999999999999"), Some(MAX_VISIBILITY));
        assert_eq!(with("86400"), Some(MAX_VISIBILITY));
        let in_an_hour = httpdate::fmt_http_date(now + Duration::from_secs(3600));
        assert_eq!(with(&in_an_hour), Some(Duration::from_secs(3600)));
        let an_hour_ago = httpdate::fmt_http_date(now - Duration::from_secs(3600));
        assert_eq!(with(&an_hour_ago), Some(Duration::ZERO));
        assert_eq!(with("soon"), None);
        assert_eq!(with("-5"), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn error_bodies_become_one_bounded_line() {
        assert_eq!(one_line(b"  {\"a\":\n\t1}\r\n", 200), "{\"a\": 1}");
        assert_eq!(one_line(b"abcdef", 3), "abc...");
        assert_eq!(one_line("é".repeat(10).as_bytes(), 5), "éé...");
        assert_eq!(one_line(b"a\x00\x1bb", 200), "a b");
        assert_eq!(one_line(b"", 200), "");
    }

    #[test]
    fn passwords_are_not_shown() {
        let url = Url::parse("https://user:hunter2@example.com/x?y=1").unwrap();
        assert_eq!(shown_url(&url), "https://user:***@example.com/x?y=1");
        let url = Url::parse("http://example.com:8080/").unwrap();
        assert_eq!(shown_url(&url), "http://example.com:8080/");
        let e = check_url("ftp://me:hunter2@example.com/").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}
