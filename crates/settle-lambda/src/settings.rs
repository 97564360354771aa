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
    /// `SETTLE_DEADLINE_MARGIN_MS` (2000) and `SETTLE_WORK_VISIBILITY_MS`
    /// (0: the worker does not extend visibility).
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
            },
        })
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
    fn dispatcher_defaults() {
        let s = DispatcherSettings::from_lookup(&lookup(&[("SETTLE_MAX_RECEIVES", "4")])).unwrap();
        assert_eq!(s.run.max_receives, 4);
        assert_eq!(s.run.tolerated_failure_percent, 100.0);
        assert_eq!(s.margin, Duration::from_secs(30));
    }
}
