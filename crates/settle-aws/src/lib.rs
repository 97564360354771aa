//! Settle's AWS backend: the work and results queues on SQS, the item source
//! and the ledger on DynamoDB, behind the core's ports. See `docs/aws.md`
//! for the table design and the cost per item.
//!
//! Configuration is read once ([`AwsConfig::from_env`]); region, credentials
//! and `AWS_ENDPOINT_URL` (an emulator) come from aws-config's standard chain.

mod ddb;
mod error;
mod idempotency;
mod ledger;
mod metrics;
#[cfg(feature = "provision")]
pub mod provision;
mod segments;
mod source;
mod sqs;

pub use error::{AwsError, AwsErrorKind, SdkSource};
pub use idempotency::DynamoIdempotency;
pub use ledger::DynamoLedger;
pub use metrics::Metrics;
pub use source::DynamoSource;
pub use sqs::SqsQueue;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};
use settle_core::Capabilities;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Attempts per AWS call (first try included) for throttling and transient
/// errors; the SDK's standard mode backs off exponentially with jitter.
pub const MAX_ATTEMPTS: u32 = 8;

/// The environment variables [`AwsConfig::from_env`] reads, in its field order.
pub const ENV_VARS: [&str; 6] = [
    "SETTLE_WORK_QUEUE_URL",
    "SETTLE_WORK_DLQ_URL",
    "SETTLE_RESULTS_QUEUE_URL",
    "SETTLE_RESULTS_DLQ_URL",
    "SETTLE_ITEMS_TABLE",
    "SETTLE_LEDGER_TABLE",
];

/// Where one deployment's queues and tables are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsConfig {
    pub work_queue_url: String,
    pub work_dlq_url: String,
    pub results_queue_url: String,
    pub results_dlq_url: String,
    pub items_table: String,
    pub ledger_table: String,
    /// `SETTLE_EMULATOR_WRITE_LOCK=1`, which `infra/emulator.sh` exports:
    /// serialise this process's DynamoDB writes around transactions, for
    /// moto (see `ddb::emulator_lock`). Never inferred from a custom
    /// endpoint, which real deployments set for VPC endpoints.
    pub emulator_write_lock: bool,
}

/// Why the backend could not be configured or connected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "missing or empty environment variable{}: {} (a deployed stack's outputs, \
         or eval \"$(infra/emulator.sh up)\" for the local emulator)",
        if .0.len() == 1 { "" } else { "s" },
        .0.join(", ")
    )]
    Missing(Vec<&'static str>),
    #[error(
        "work queue {queue} has no dead-letter queue (RedrivePolicy); Settle needs one: {reason}"
    )]
    NoRedrivePolicy { queue: String, reason: String },
    #[error("{op} on {target} failed: {source}")]
    Aws {
        op: &'static str,
        target: String,
        #[source]
        source: Box<AwsError>,
    },
}

/// The variable that turns the emulator's write lock on ([`AwsConfig::emulator_write_lock`]).
pub const EMULATOR_WRITE_LOCK: &str = "SETTLE_EMULATOR_WRITE_LOCK";

impl AwsConfig {
    /// Reads the six `SETTLE_*` variables of [`ENV_VARS`]; the error names
    /// every one that is missing or empty.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// As [`AwsConfig::from_env`], from any lookup (tests, a config file).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut missing = Vec::new();
        let mut values: Vec<String> = Vec::with_capacity(ENV_VARS.len());
        for name in ENV_VARS {
            match get(name).filter(|v| !v.trim().is_empty()) {
                Some(v) => values.push(v.trim().to_owned()),
                None => {
                    missing.push(name);
                    values.push(String::new());
                }
            }
        }
        if !missing.is_empty() {
            return Err(ConfigError::Missing(missing));
        }
        let mut v = values.into_iter();
        let mut next = || v.next().unwrap_or_default();
        Ok(Self {
            work_queue_url: next(),
            work_dlq_url: next(),
            results_queue_url: next(),
            results_dlq_url: next(),
            items_table: next(),
            ledger_table: next(),
            emulator_write_lock: get(EMULATOR_WRITE_LOCK).is_some_and(|v| v.trim() == "1"),
        })
    }

    /// The variables as `(name, value)` pairs, in [`ENV_VARS`] order.
    pub fn to_env(&self) -> [(&'static str, &str); 6] {
        [
            (ENV_VARS[0], self.work_queue_url.as_str()),
            (ENV_VARS[1], self.work_dlq_url.as_str()),
            (ENV_VARS[2], self.results_queue_url.as_str()),
            (ENV_VARS[3], self.results_dlq_url.as_str()),
            (ENV_VARS[4], self.items_table.as_str()),
            (ENV_VARS[5], self.ledger_table.as_str()),
        ]
    }
}

/// One line for an SDK error. A service error reads as its code and
/// message (`ValidationException: ...`); the SDK's own context display would
/// also dump the raw HTTP response. Other errors (no connection, a timeout)
/// keep the full chain, which is what says why.
pub fn describe<E, R>(e: &aws_smithy_runtime_api::client::result::SdkError<E, R>) -> String
where
    E: std::error::Error + aws_sdk_sqs::error::ProvideErrorMetadata + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    match e.as_service_error() {
        Some(se) => format!(
            "{}: {}",
            se.code().unwrap_or("service error"),
            se.message().unwrap_or("(no message)")
        ),
        None => aws_sdk_sqs::error::DisplayErrorContext(e).to_string(),
    }
}

/// The SDK settings every Settle client uses: the standard retry mode (it
/// backs off on throttling and transient errors, so no call site loops on
/// those) and timeouts, so a stalled connection fails instead of hanging.
pub async fn sdk_config() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(MAX_ATTEMPTS)
                .with_initial_backoff(Duration::from_millis(50))
                .with_max_backoff(Duration::from_secs(5)),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                // Above SQS's longest long poll (20 s).
                .operation_attempt_timeout(Duration::from_secs(25))
                .operation_timeout(Duration::from_secs(90))
                .build(),
        )
        .load()
        .await
}

/// The connected backend: clients, queues, tables and the call counters.
#[derive(Debug, Clone)]
pub struct AwsBackend {
    cfg: AwsConfig,
    metrics: Metrics,
    work_max_receive_count: Option<u32>,
    work: SqsQueue,
    dlq: SqsQueue,
    results: SqsQueue,
    results_dlq: SqsQueue,
    source: DynamoSource,
    ledger: DynamoLedger,
    idempotency: DynamoIdempotency,
}

/// Connects to the queues and tables of `cfg`. Reads the work queue's
/// redrive policy once; a work queue without one is an error.
pub async fn connect(cfg: &AwsConfig) -> Result<AwsBackend, ConfigError> {
    connect_with(&sdk_config().await, cfg).await
}

/// As [`connect`], with an SDK config of the caller's.
pub async fn connect_with(sdk: &SdkConfig, cfg: &AwsConfig) -> Result<AwsBackend, ConfigError> {
    let metrics = Metrics::default();
    let sqs = aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::config::Builder::from(sdk)
            .interceptor(metrics.interceptor())
            .build(),
    );
    let dynamo = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(sdk)
            .interceptor(metrics.interceptor())
            .build(),
    );
    let work_max_receive_count = Some(sqs::max_receive_count(&sqs, &cfg.work_queue_url).await?);
    let queue = |url: &str| {
        SqsQueue::new(sqs.clone(), url)
            .with_metrics(metrics.clone())
            .emulated(cfg.emulator_write_lock)
    };
    let tables = ddb::Tables {
        client: dynamo,
        items: cfg.items_table.clone(),
        ledger: cfg.ledger_table.clone(),
        metrics: metrics.clone(),
        emulated: cfg.emulator_write_lock,
    };
    Ok(AwsBackend {
        work: queue(&cfg.work_queue_url),
        dlq: queue(&cfg.work_dlq_url),
        results: queue(&cfg.results_queue_url),
        results_dlq: queue(&cfg.results_dlq_url),
        source: DynamoSource::new(tables.clone()),
        idempotency: DynamoIdempotency::new(tables.clone()),
        ledger: DynamoLedger::new(tables),
        cfg: cfg.clone(),
        metrics,
        work_max_receive_count,
    })
}

impl AwsBackend {
    /// The backend behind the ports, for code that serves every backend.
    pub fn backend(&self) -> settle_core::Backend {
        settle_core::Backend {
            work: Arc::new(self.work.clone()),
            dlq: Arc::new(self.dlq.clone()),
            results: Arc::new(self.results.clone()),
            results_dlq: Arc::new(self.results_dlq.clone()),
            source: Arc::new(self.source.clone()),
            ledger: Arc::new(self.ledger.clone()),
            idempotency: Arc::new(self.idempotency.clone()),
            capabilities: self.capabilities(),
        }
    }

    /// The stack's tuning, as [`settle_core::Backend::capabilities`].
    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            // SQS's message counts are approximate and lag by up to a minute.
            stall_after: Duration::from_secs(90),
            // The results queue's VisibilityTimeout (infra/stack.json,
            // template.yaml), which the event source mapping uses: a reducer
            // batch on a slow or throttled table must not come back to a
            // second reducer while the first still commits it.
            min_results_visibility: Duration::from_secs(180),
            // The reducer's event source mapping has a
            // MaximumBatchingWindowInSeconds (template.yaml) that fills
            // batches and so thins the ledger's commits; the local runner
            // plays it.
            reducer_window: Duration::from_secs(2),
            // The stack's redrive policy is fixed by its template; a run must
            // end its attempts before the queue parks its messages, so that
            // every dead-lettered item has a terminal result in the tally.
            fixed_max_receive_count: self.work_max_receive_count,
            cheap_dlq_scan: false,
        }
    }

    /// The work queue's RedrivePolicy maxReceiveCount, read at connect.
    pub fn work_max_receive_count(&self) -> Option<u32> {
        self.work_max_receive_count
    }

    /// Requests sent so far per operation, e.g. "SQS.SendMessageBatch".
    pub fn call_counts(&self) -> BTreeMap<String, u64> {
        self.metrics.call_counts()
    }

    /// DynamoDB capacity units consumed so far per operation.
    pub fn consumed_capacity(&self) -> BTreeMap<String, f64> {
        self.metrics.consumed_capacity()
    }

    /// DynamoDB units as AWS would bill them, derived from the traffic
    /// (see [`Metrics::billed_units`]).
    pub fn billed_units(&self) -> BTreeMap<String, f64> {
        self.metrics.billed_units()
    }

    pub fn config(&self) -> &AwsConfig {
        &self.cfg
    }

    pub fn work(&self) -> &SqsQueue {
        &self.work
    }
    pub fn dlq(&self) -> &SqsQueue {
        &self.dlq
    }
    pub fn results(&self) -> &SqsQueue {
        &self.results
    }
    pub fn results_dlq(&self) -> &SqsQueue {
        &self.results_dlq
    }
    pub fn source(&self) -> &DynamoSource {
        &self.source
    }
    pub fn ledger(&self) -> &DynamoLedger {
        &self.ledger
    }
    pub fn idempotency(&self) -> &DynamoIdempotency {
        &self.idempotency
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_lookup_names_every_missing_variable() {
        let err = AwsConfig::from_lookup(|k| match k {
            "SETTLE_WORK_QUEUE_URL" => Some("http://q".into()),
            "SETTLE_ITEMS_TABLE" => Some("  ".into()),
            _ => None,
        })
        .unwrap_err();
        let msg = err.to_string();
        for name in ENV_VARS.iter().filter(|n| **n != "SETTLE_WORK_QUEUE_URL") {
            assert!(msg.contains(name), "{msg} should name {name}");
        }
        assert!(!msg.contains("SETTLE_WORK_QUEUE_URL"), "{msg}");
    }

    #[test]
    fn from_lookup_reads_all_six() {
        let cfg = AwsConfig::from_lookup(|k| Some(format!("v-{k}"))).unwrap();
        assert_eq!(cfg.ledger_table, "v-SETTLE_LEDGER_TABLE");
        assert_eq!(cfg.work_dlq_url, "v-SETTLE_WORK_DLQ_URL");
        let back = AwsConfig::from_lookup(|k| {
            cfg.to_env()
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
        .unwrap();
        assert_eq!(back, cfg);
    }
}
