//! The functions' own settings, read once at cold start from the
//! environment (the SAM template sets them). Every variable has a default;
//! a variable that is set but unreadable is an error naming it.

use settle_core::work::WorkerConfig;
use settle_core::RunConfig;
use std::time::Duration;

/// A setting that is present but not usable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("environment variable {var}={value:?}: {reason}")]
pub struct SettingsError {
    pub var: &'static str,
    pub value: String,
    pub reason: String,
}

/// Reads variables through `get`, so tests need not touch the process environment.
#[derive(Clone, Copy)]
struct Env<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Env<'_> {
    fn num<T: std::str::FromStr>(
        &self,
        var: &'static str,
        default: T,
        what: &str,
    ) -> Result<T, SettingsError> {
        match (self.0)(var) {
            None => Ok(default),
            Some(v) => v.trim().parse().map_err(|_| SettingsError {
                var,
                value: v.clone(),
                reason: format!("want {what}"),
            }),
        }
    }
    fn millis(&self, var: &'static str, default: u64) -> Result<Duration, SettingsError> {
        self.num(var, default, "a whole number of milliseconds")
            .map(Duration::from_millis)
    }
}

fn process_env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.is_empty())
}

/// The worker function's settings.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub worker: WorkerConfig,
}

impl WorkerSettings {
    /// Reads `SETTLE_ITEM_TIMEOUT_MS` (default 10000; 0 turns it off),
    /// `SETTLE_RETRY_DELAY_MS` (1000), `SETTLE_MAX_RETRY_DELAY_MS` (60000)
    /// `SETTLE_DEADLINE_MARGIN_MS` (2000), `SETTLE_WORK_VISIBILITY_MS`
    /// (0: the worker does not extend visibility), `SETTLE_RESULT_LAG_MS`
    /// and `SETTLE_RECEIVE_LIMIT` (0: the defaults in docs/lambda.md).
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::from_lookup(&process_env)
    }

    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<Self, SettingsError> {
        let env = Env(get);
        // A third of the default 30 s function timeout: one hung item fails
        // alone as "timed out", and the batch's other items and its result
        // sends still fit in the invocation.
        let item_timeout = env.millis("SETTLE_ITEM_TIMEOUT_MS", 10_000)?;
        Ok(Self {
            worker: WorkerConfig {
                item_timeout: (!item_timeout.is_zero()).then_some(item_timeout),
                retry_delay: env.millis("SETTLE_RETRY_DELAY_MS", 1_000)?,
                max_retry_delay: env.millis("SETTLE_MAX_RETRY_DELAY_MS", 60_000)?,
                deadline_margin: env.millis("SETTLE_DEADLINE_MARGIN_MS", 2_000)?,
                // The queue's visibility (180 s in the template) outlasts the
                // function's timeout; set it to have the worker extend its
                // messages' visibility while it holds them.
                visibility: Some(env.millis("SETTLE_WORK_VISIBILITY_MS", 0)?)
                    .filter(|v| !v.is_zero()),
                // One batch per invocation: its size bounds it.
                concurrency: None,
                // How long a redelivered message with no outcome known
                // waits once: the item timeout plus the retry delay unless
                // set (the reducer's batching window is 2 s).
                result_lag: Some(env.millis("SETTLE_RESULT_LAG_MS", 0)?).filter(|v| !v.is_zero()),
                // The template's MaxReceiveCount is MaxAttempts plus the
                // extra receives the worker assumes by default (0: assume).
                receive_limit: Some(env.num(
                    "SETTLE_RECEIVE_LIMIT",
                    0u32,
                    "a whole number: the work queue's maxReceiveCount",
                )?)
                .filter(|n| *n > 0),
            },
        })
    }
}

/// Which user code the stock worker runs: `SETTLE_PROCESSOR` and the
/// variables of its kind. Holds names and places, never a secret's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessorSettings {
    /// The built-in scripted processor (`payload.script`): a test bed.
    Scripted,
    /// One POST per attempt, as `settle --http` (docs/processors.md).
    Http {
        url: String,
        /// Where the value of the secret header is kept, if there is one.
        secret: Option<SecretSource>,
        /// The header that carries it.
        header: String,
    },
    /// The user's own Lambda function, invoked once per worker batch.
    Function {
        /// A function name or ARN (with a qualifier, if any).
        name: String,
    },
}

/// The values `SETTLE_PROCESSOR` takes.
pub const PROCESSOR_KINDS: &str = "scripted, http, function";

/// The header that carries the secret when `SETTLE_HTTP_SECRET_HEADER` is unset.
pub const DEFAULT_SECRET_HEADER: &str = "Authorization";

impl ProcessorSettings {
    /// Reads `SETTLE_PROCESSOR` (`scripted`, the default, `http` or
    /// `function`); for `http`, `SETTLE_HTTP_URL` (required),
    /// `SETTLE_HTTP_SECRET` (`ssm:NAME` or `secretsmanager:NAME`, optional)
    /// and `SETTLE_HTTP_SECRET_HEADER` (default `Authorization`); for
    /// `function`, `SETTLE_FUNCTION_NAME` (required).
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::from_lookup(&process_env)
    }

    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<Self, SettingsError> {
        let required = |var: &'static str, kind: &str| {
            get(var).ok_or_else(|| SettingsError {
                var,
                value: String::new(),
                reason: format!("required when SETTLE_PROCESSOR={kind}"),
            })
        };
        let kind = get("SETTLE_PROCESSOR");
        match kind.as_deref().map(str::trim) {
            None | Some("scripted") => Ok(Self::Scripted),
            Some("http") => {
                let secret = get("SETTLE_HTTP_SECRET")
                    .map(|v| {
                        SecretSource::parse(&v).map_err(|reason| SettingsError {
                            var: "SETTLE_HTTP_SECRET",
                            value: v.clone(),
                            reason,
                        })
                    })
                    .transpose()?;
                let header = get("SETTLE_HTTP_SECRET_HEADER")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|| DEFAULT_SECRET_HEADER.to_owned());
                if let Err(e) = settle_processors::parse_header(&format!("{header}: x")) {
                    return Err(SettingsError {
                        var: "SETTLE_HTTP_SECRET_HEADER",
                        value: header,
                        reason: e.to_string(),
                    });
                }
                Ok(Self::Http {
                    url: required("SETTLE_HTTP_URL", "http")?.trim().to_owned(),
                    secret,
                    header,
                })
            }
            Some("function") => Ok(Self::Function {
                name: required("SETTLE_FUNCTION_NAME", "function")?
                    .trim()
                    .to_owned(),
            }),
            Some(_) => Err(SettingsError {
                var: "SETTLE_PROCESSOR",
                value: kind.unwrap_or_default(),
                reason: format!("want one of {PROCESSOR_KINDS}"),
            }),
        }
    }
}

/// Where a secret's value is kept: read once at cold start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// An SSM Parameter Store parameter (a SecureString is decrypted).
    Ssm(String),
    /// A Secrets Manager secret's `SecretString`, by name or ARN.
    SecretsManager(String),
}

impl SecretSource {
    /// Reads `ssm:NAME` or `secretsmanager:NAME`; the error says which forms are wanted.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (store, name) = s
            .split_once(':')
            .ok_or_else(|| "want ssm:NAME or secretsmanager:NAME".to_owned())?;
        let name = name.trim();
        if name.is_empty() {
            return Err(format!("{store}: the name is empty"));
        }
        match store {
            "ssm" => Ok(Self::Ssm(name.to_owned())),
            "secretsmanager" => Ok(Self::SecretsManager(name.to_owned())),
            other => Err(format!(
                "unknown store {other:?}: want ssm:NAME or secretsmanager:NAME"
            )),
        }
    }
}

impl std::fmt::Display for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ssm(name) => write!(f, "ssm:{name}"),
            Self::SecretsManager(name) => write!(f, "secretsmanager:{name}"),
        }
    }
}

/// The dispatcher function's settings.
#[derive(Debug, Clone)]
pub struct DispatcherSettings {
    /// The configuration of runs that a schedule (or a manual invoke without
    /// overrides) creates.
    pub run: RunConfig,
    /// Stop dispatching this long before the invocation's deadline, to save
    /// the cursor and hand the rest to a fresh invocation.
    pub margin: Duration,
}

impl DispatcherSettings {
    /// Reads `SETTLE_MAX_RECEIVES` (default 3: the template's `MaxAttempts`),
    /// `SETTLE_TOLERATED_FAILURE_PERCENT` (100) and
    /// `SETTLE_DISPATCH_MARGIN_MS` (30000).
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::from_lookup(&process_env)
    }

    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<Self, SettingsError> {
        let env = Env(get);
        let defaults = RunConfig::default();
        let max_receives = env.num(
            "SETTLE_MAX_RECEIVES",
            defaults.max_receives,
            "a whole number from 1",
        )?;
        if max_receives == 0 {
            return Err(SettingsError {
                var: "SETTLE_MAX_RECEIVES",
                value: "0".into(),
                reason: "want a whole number from 1".into(),
            });
        }
        let percent: f64 = env.num(
            "SETTLE_TOLERATED_FAILURE_PERCENT",
            defaults.tolerated_failure_percent,
            "a number from 0 to 100",
        )?;
        if !(0.0..=100.0).contains(&percent) {
            return Err(SettingsError {
                var: "SETTLE_TOLERATED_FAILURE_PERCENT",
                value: percent.to_string(),
                reason: "want a number from 0 to 100".into(),
            });
        }
        Ok(Self {
            run: RunConfig {
                max_receives,
                tolerated_failure_percent: percent,
                processor: None,
                ..RunConfig::default()
            },
            // Enough for the page in flight (1,000 items, 100 SendMessageBatch
            // calls) and the cursor save, with room for a slow SQS moment.
            margin: env.millis("SETTLE_DISPATCH_MARGIN_MS", 30_000)?,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn worker_defaults_and_overrides() {
        let d = WorkerSettings::from_lookup(&lookup(&[])).unwrap().worker;
        assert_eq!(d.item_timeout, Some(Duration::from_secs(10)));
        assert_eq!(d.retry_delay, Duration::from_secs(1));
        let s = WorkerSettings::from_lookup(&lookup(&[
            ("SETTLE_ITEM_TIMEOUT_MS", "0"),
            ("SETTLE_DEADLINE_MARGIN_MS", "500"),
        ]))
        .unwrap()
        .worker;
        assert_eq!(s.item_timeout, None);
        assert_eq!(s.deadline_margin, Duration::from_millis(500));
    }

    #[test]
    fn a_bad_setting_is_named() {
        let err =
            WorkerSettings::from_lookup(&lookup(&[("SETTLE_RETRY_DELAY_MS", "soon")])).unwrap_err();
        assert_eq!(err.var, "SETTLE_RETRY_DELAY_MS");
        assert_eq!(
            err.to_string(),
            "environment variable SETTLE_RETRY_DELAY_MS=\"soon\": want a whole number of milliseconds"
        );
        let err =
            DispatcherSettings::from_lookup(&lookup(&[("SETTLE_MAX_RECEIVES", "0")])).unwrap_err();
        assert_eq!(err.var, "SETTLE_MAX_RECEIVES");
        let err = DispatcherSettings::from_lookup(&lookup(&[(
            "SETTLE_TOLERATED_FAILURE_PERCENT",
            "150",
        )]))
        .unwrap_err();
        assert!(err.to_string().contains("from 0 to 100"), "{err}");
    }

    #[test]
    fn every_worker_variable_is_read_and_a_bad_value_named() {
        let vars = [
            "SETTLE_ITEM_TIMEOUT_MS",
            "SETTLE_RETRY_DELAY_MS",
            "SETTLE_MAX_RETRY_DELAY_MS",
            "SETTLE_DEADLINE_MARGIN_MS",
            "SETTLE_WORK_VISIBILITY_MS",
        ];
        let d = WorkerSettings::from_lookup(&lookup(&[])).unwrap().worker;
        assert_eq!(d.max_retry_delay, Duration::from_secs(60));
        assert_eq!(d.deadline_margin, Duration::from_secs(2));
        assert_eq!(d.visibility, None);
        let all: Vec<(&str, &str)> = vars.iter().map(|v| (*v, "1234")).collect();
        let s = WorkerSettings::from_lookup(&lookup(&all)).unwrap().worker;
        let ms = Duration::from_millis(1234);
        assert_eq!(s.item_timeout, Some(ms));
        assert_eq!(
            (
                s.retry_delay,
                s.max_retry_delay,
                s.deadline_margin,
                s.visibility
            ),
            (ms, ms, ms, Some(ms))
        );
        for var in vars {
            let err = WorkerSettings::from_lookup(&lookup(&[(var, "-1")])).unwrap_err();
            assert_eq!(err.var, var);
        }
    }

    #[test]
    fn the_processor_defaults_to_scripted() {
        let s = ProcessorSettings::from_lookup(&lookup(&[])).unwrap();
        assert_eq!(s, ProcessorSettings::Scripted);
        let s =
            ProcessorSettings::from_lookup(&lookup(&[("SETTLE_PROCESSOR", "scripted")])).unwrap();
        assert_eq!(s, ProcessorSettings::Scripted);
    }

    #[test]
    fn an_unknown_processor_is_named_with_the_allowed_values() {
        let err =
            ProcessorSettings::from_lookup(&lookup(&[("SETTLE_PROCESSOR", "exec")])).unwrap_err();
        assert_eq!(err.var, "SETTLE_PROCESSOR");
        assert_eq!(
            err.to_string(),
            "environment variable SETTLE_PROCESSOR=\"exec\": want one of scripted, http, function"
        );
    }

    #[test]
    fn http_reads_its_url_secret_and_header() {
        let s = ProcessorSettings::from_lookup(&lookup(&[
            ("SETTLE_PROCESSOR", "http"),
            ("SETTLE_HTTP_URL", "https://example.com/renew"),
        ]))
        .unwrap();
        assert_eq!(
            s,
            ProcessorSettings::Http {
                url: "https://example.com/renew".into(),
                secret: None,
                header: "Authorization".into(),
            }
        );
        let s = ProcessorSettings::from_lookup(&lookup(&[
            ("SETTLE_PROCESSOR", "http"),
            ("SETTLE_HTTP_URL", "https://example.com/renew"),
            ("SETTLE_HTTP_SECRET", "secretsmanager:settle/gateway"),
            ("SETTLE_HTTP_SECRET_HEADER", "X-Api-Key"),
        ]))
        .unwrap();
        assert_eq!(
            s,
            ProcessorSettings::Http {
                url: "https://example.com/renew".into(),
                secret: Some(SecretSource::SecretsManager("settle/gateway".into())),
                header: "X-Api-Key".into(),
            }
        );
    }

    #[test]
    fn http_errors_name_their_variable() {
        let err =
            ProcessorSettings::from_lookup(&lookup(&[("SETTLE_PROCESSOR", "http")])).unwrap_err();
        assert_eq!(err.var, "SETTLE_HTTP_URL");
        assert!(
            err.to_string()
                .contains("required when SETTLE_PROCESSOR=http"),
            "{err}"
        );
        let http = |var, value| {
            ProcessorSettings::from_lookup(&lookup(&[
                ("SETTLE_PROCESSOR", "http"),
                ("SETTLE_HTTP_URL", "https://example.com/"),
                (var, value),
            ]))
            .unwrap_err()
        };
        let err = http("SETTLE_HTTP_SECRET", "vault:token");
        assert_eq!(err.var, "SETTLE_HTTP_SECRET");
        assert!(
            err.to_string()
                .contains("want ssm:NAME or secretsmanager:NAME"),
            "{err}"
        );
        let err = http("SETTLE_HTTP_SECRET_HEADER", "Bad Header");
        assert_eq!(err.var, "SETTLE_HTTP_SECRET_HEADER");
        let err = http("SETTLE_HTTP_SECRET_HEADER", "Idempotency-Key");
        assert!(
            err.to_string().contains("Settle sets this header itself"),
            "{err}"
        );
    }

    #[test]
    fn function_needs_its_name() {
        let s = ProcessorSettings::from_lookup(&lookup(&[
            ("SETTLE_PROCESSOR", "function"),
            ("SETTLE_FUNCTION_NAME", "renewals"),
        ]))
        .unwrap();
        assert_eq!(
            s,
            ProcessorSettings::Function {
                name: "renewals".into()
            }
        );
        let err = ProcessorSettings::from_lookup(&lookup(&[("SETTLE_PROCESSOR", "function")]))
            .unwrap_err();
        assert_eq!(err.var, "SETTLE_FUNCTION_NAME");
        assert!(
            err.to_string()
                .contains("required when SETTLE_PROCESSOR=function"),
            "{err}"
        );
    }

    #[test]
    fn secret_sources_parse() {
        assert_eq!(
            SecretSource::parse("ssm:/settle/token"),
            Ok(SecretSource::Ssm("/settle/token".into()))
        );
        assert_eq!(
            SecretSource::parse(
                " secretsmanager:arn:aws:secretsmanager:eu-west-1:1:secret:x-AbCdEf "
            ),
            Ok(SecretSource::SecretsManager(
                "arn:aws:secretsmanager:eu-west-1:1:secret:x-AbCdEf".into()
            ))
        );
        assert!(SecretSource::parse("ssm:")
            .unwrap_err()
            .contains("the name is empty"));
        assert!(SecretSource::parse("token")
            .unwrap_err()
            .contains("want ssm:NAME"));
        assert!(SecretSource::parse("vault:x")
            .unwrap_err()
            .contains("unknown store \"vault\""));
        assert_eq!(SecretSource::Ssm("/a".into()).to_string(), "ssm:/a");
    }

    #[test]
    fn dispatcher_defaults() {
        let s = DispatcherSettings::from_lookup(&lookup(&[("SETTLE_MAX_RECEIVES", "4")])).unwrap();
        assert_eq!(s.run.max_receives, 4);
        assert_eq!(s.run.tolerated_failure_percent, 100.0);
        assert_eq!(s.margin, Duration::from_secs(30));
    }
}
