//! Logging for the functions: JSON lines on stdout (CloudWatch Logs parses
//! them), ids only. Payloads can hold card data and a secret is a secret,
//! so nothing here may print one: the runtime's TRACE line with the raw event is capped off, and a
//! contained processor panic is logged without its message (the message is
//! kept, bounded, as the item's error in the ledger, not in the logs).

use tracing_subscriber::EnvFilter;

/// Directives appended to whatever level is asked for. More specific than a
/// global `trace`, so they win: the runtime logs the whole raw event at
/// TRACE when it cannot parse it, and the AWS SDK's orchestrator logs whole
/// responses at TRACE, bodies included (a message's payload, the http
/// processor's secret from SSM or Secrets Manager).
const PAYLOAD_CAPS: &[&str] = &[
    "lambda_runtime::layers::api_response=debug",
    "aws_smithy_runtime=debug",
];

/// Installs the JSON subscriber and the panic hook. The level comes from
/// `AWS_LAMBDA_LOG_LEVEL` (Lambda's advanced logging controls), else
/// `RUST_LOG`, else `info`.
pub fn init() {
    let level = std::env::var("AWS_LAMBDA_LOG_LEVEL")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let mut filter =
        EnvFilter::try_new(level.to_lowercase()).unwrap_or_else(|_| EnvFilter::new("info"));
    for cap in PAYLOAD_CAPS {
        if let Ok(d) = cap.parse() {
            filter = filter.add_directive(d);
        }
    }
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        // Lambda stamps every line itself; the request id comes from the
        // runtime's per-invocation span, which the JSON output includes.
        .without_time()
        .with_current_span(false)
        .with_span_list(true)
        .with_target(false)
        .init();
    quiet_contained_panics();
}

/// A panic in a processor is caught and becomes that item's retryable
/// error. The default hook would print its message (which may quote a
/// payload) to stderr; log only that it happened, inside the item's span.
fn quiet_contained_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if settle_core::work::in_processor() {
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            tracing::warn!(at, "processor panicked; contained to its item");
        } else {
            default(info);
        }
    }));
}
