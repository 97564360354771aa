//! The `scripted` processor: each item's payload says how its attempts
//! go, so the demo, the tests and the benchmarks drive every outcome
//! without user code. The CLI's `--processor scripted` and the sample
//! worker function run it too.

use crate::domain::processor::{AttemptContext, Processor};
use crate::domain::{Item, Output, ProcessError};
use async_trait::async_trait;
use serde::Deserialize;
use std::time::Duration;

/// Follows each item's `payload.script`, for demos and tests:
///
/// | script          | behaviour                                                    |
/// |-----------------|--------------------------------------------------------------|
/// | absent, `"ok"`  | succeed                                                      |
/// | `"permanent"`   | fail with a permanent error                                  |
/// | `"retryable:N"` | fail with a retryable error on attempts 1..=N, then succeed  |
/// | `"throttled:N"` | answer throttled (retry after 100 ms) N times, then succeed  |
/// | `"panic"`       | panic                                                        |
/// | `"sleep:MS"`    | sleep MS milliseconds, then succeed                          |
/// | anything else   | permanent error "unknown script"                             |
///
/// A success returns `payload.output`, if there is one, as the item's
/// output; `payload.log`, if there is one, is written to every attempt's
/// log. `payload.output_bytes: N` makes the output `{"receipt":"rrr..."}`
/// of N bytes, and `payload.log_bytes: N` writes a log line of N bytes to
/// every attempt: sized outputs and logs without carrying them in the
/// payload (what `make cost` uses to price them).
#[derive(Debug, Default, Clone, Copy)]
pub struct Scripted;

#[derive(Deserialize, Default)]
struct ScriptPayload {
    script: Option<String>,
    output: Option<Box<serde_json::value::RawValue>>,
    // Any JSON, so that an odd `log` never changes what the script does.
    log: Option<serde_json::Value>,
    output_bytes: Option<usize>,
    log_bytes: Option<usize>,
}

/// `{"receipt":"rrr..."}` of `bytes` bytes (at least the 15 of its frame).
pub fn sized_output(bytes: usize) -> String {
    const FRAME: usize = r#"{"receipt":""}"#.len();
    format!(
        r#"{{"receipt":"{}"}}"#,
        "r".repeat(bytes.saturating_sub(FRAME).max(1))
    )
}

/// A parsed script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    Ok,
    Permanent,
    Retryable(u32),
    Throttled(u32),
    Panic,
    Sleep(u64),
    Unknown(String),
}

impl Script {
    pub fn of(item: &Item) -> Script {
        // Payloads that are not objects, or have no `script`, just succeed.
        let script = serde_json::from_str::<ScriptPayload>(item.payload.get())
            .ok()
            .and_then(|p| p.script);
        match script {
            None => Script::Ok,
            Some(s) => Script::parse(&s),
        }
    }

    pub fn parse(s: &str) -> Script {
        let num = |rest: &str| rest.parse::<u64>().ok();
        match s {
            "ok" => Script::Ok,
            "permanent" => Script::Permanent,
            "panic" => Script::Panic,
            _ => {
                if let Some(n) = s.strip_prefix("retryable:").and_then(num) {
                    Script::Retryable(n.min(u64::from(u32::MAX)) as u32)
                } else if let Some(n) = s.strip_prefix("throttled:").and_then(num) {
                    Script::Throttled(n.min(u64::from(u32::MAX)) as u32)
                } else if let Some(ms) = s.strip_prefix("sleep:").and_then(num) {
                    Script::Sleep(ms)
                } else {
                    Script::Unknown(s.to_owned())
                }
            }
        }
    }
}

#[async_trait]
impl Processor for Scripted {
    async fn process(
        &self,
        item: &Item,
        ctx: &AttemptContext,
    ) -> Result<Option<Output>, ProcessError> {
        // Payloads that are not objects just succeed.
        let p = serde_json::from_str::<ScriptPayload>(item.payload.get()).unwrap_or_default();
        if let Some(serde_json::Value::String(log)) = &p.log {
            ctx.log(log);
        }
        if let Some(n) = p.log_bytes.filter(|n| *n > 0) {
            ctx.log(format!("{}\n", "l".repeat(n - 1)));
        }
        let sized = p
            .output_bytes
            .and_then(|n| serde_json::value::RawValue::from_string(sized_output(n)).ok())
            .map(Output::raw);
        let done = || Ok(sized.clone().or_else(|| p.output.clone().map(Output::raw)));
        match p.script.as_deref().map_or(Script::Ok, Script::parse) {
            Script::Ok => done(),
            Script::Permanent => Err(ProcessError::permanent("permanent failure (scripted)")),
            Script::Retryable(n) if ctx.attempt <= n => Err(ProcessError::retryable(format!(
                "retryable failure {} of {n} (scripted)",
                ctx.attempt
            ))),
            Script::Retryable(_) => done(),
            Script::Throttled(n) if ctx.throttled < n => Err(ProcessError::throttled(format!(
                "throttled {} of {n} (scripted)",
                ctx.throttled + 1
            ))
            .with_retry_after(Duration::from_millis(100))),
            Script::Throttled(_) => done(),
            Script::Panic => panic!("scripted panic for item {}", item.id),
            Script::Sleep(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                done()
            }
            Script::Unknown(s) => Err(ProcessError::permanent(format!("unknown script {s:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ErrorKind, RunId};
    use crate::testing::item;

    #[test]
    fn scripts_parse() {
        assert_eq!(Script::of(&item("null")), Script::Ok);
        assert_eq!(Script::of(&item(r#"{"x":1}"#)), Script::Ok);
        assert_eq!(Script::of(&item(r#"{"script":"ok"}"#)), Script::Ok);
        assert_eq!(
            Script::of(&item(r#"{"script":"retryable:2"}"#)),
            Script::Retryable(2)
        );
        assert_eq!(
            Script::of(&item(r#"{"script":"sleep:5"}"#)),
            Script::Sleep(5)
        );
        assert_eq!(Script::of(&item(r#"{"script":"panic"}"#)), Script::Panic);
        assert_eq!(
            Script::of(&item(r#"{"script":"retryable:x"}"#)),
            Script::Unknown("retryable:x".into())
        );
    }

    #[tokio::test]
    async fn retryable_counts_lifetime_attempts() {
        let it = item(r#"{"script":"retryable:2"}"#);
        let run = RunId::generate(0);
        for (attempt, ok) in [(1, false), (2, false), (3, true), (7, true)] {
            let ctx = AttemptContext::new(run.clone(), &it, attempt);
            let res = Scripted.process(&it, &ctx).await;
            assert_eq!(res.is_ok(), ok, "attempt {attempt}");
            if let Err(e) = res {
                assert_eq!(e.kind, ErrorKind::Retryable);
            }
        }
    }

    #[tokio::test]
    async fn unknown_script_is_permanent() {
        let it = item(r#"{"script":"explode"}"#);
        let ctx = AttemptContext::new(RunId::generate(0), &it, 1);
        let err = Scripted.process(&it, &ctx).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Permanent);
        assert_eq!(err.message, "unknown script \"explode\"");
    }

    #[tokio::test]
    async fn scripted_returns_the_payloads_output_and_writes_its_log() {
        let it = item(r#"{"script":"ok","output":{"receipt":"r-1"},"log":"charged\n"}"#);
        let ctx = AttemptContext::new(RunId::generate(0), &it, 1);
        let out = Scripted.process(&it, &ctx).await.unwrap().unwrap();
        assert_eq!(out.get(), r#"{"receipt":"r-1"}"#);
        assert_eq!(ctx.take_log().as_deref(), Some("charged\n"));
        let it = item(r#"{"script":"permanent","output":1,"log":7}"#);
        let ctx = AttemptContext::new(RunId::generate(0), &it, 1);
        assert!(Scripted.process(&it, &ctx).await.is_err());
        assert_eq!(ctx.take_log(), None);
    }

    #[tokio::test]
    async fn scripted_sizes_its_output_and_log_on_request() {
        let it = item(r#"{"script":"ok","output_bytes":100,"log_bytes":100}"#);
        let ctx = AttemptContext::new(RunId::generate(0), &it, 1);
        let out = Scripted.process(&it, &ctx).await.unwrap().unwrap();
        assert_eq!(out.get().len(), 100);
        assert!(out.get().starts_with(r#"{"receipt":"rr"#), "{}", out.get());
        let log = ctx.take_log().unwrap();
        assert_eq!((log.len(), log.ends_with('\n')), (100, true));
        // Smaller than its frame: still a valid object.
        assert_eq!(sized_output(3), r#"{"receipt":"r"}"#);
    }
}
