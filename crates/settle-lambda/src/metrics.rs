//! The worker's metrics as CloudWatch Embedded Metric Format lines: one
//! JSON line on stdout per run in each invocation, which CloudWatch Logs
//! turns into metrics without an API call. The run id is a property, not a
//! dimension: a dimension value makes a metric of its own (billed monthly),
//! and a run id would make one per run; as a property it stays searchable
//! in Logs Insights. The one dimension is the function's name, which names
//! the stack.

use serde_json::{json, Map, Value};
use settle_core::work::RunCounts;
use settle_core::RunId;
use std::collections::BTreeMap;

/// The metrics' namespace (template.yaml's dashboard reads it).
pub const NAMESPACE: &str = "Settle";

/// The EMF lines of one invocation's counts, one per run, stamped `at`
/// (epoch milliseconds).
pub fn emf_lines(function: &str, runs: &BTreeMap<RunId, RunCounts>, at: u64) -> Vec<String> {
    runs.iter()
        .map(|(run, c)| {
            let mut metrics = vec![
                ("ItemsSucceeded", "Count", json!(c.succeeded)),
                ("ItemsFailed", "Count", json!(c.failed)),
                ("ItemsRetried", "Count", json!(c.retried)),
                ("ItemsDeadLettered", "Count", json!(c.dead_lettered)),
                ("ItemsRedriven", "Count", json!(c.redriven)),
                ("ItemsThrottled", "Count", json!(c.throttled)),
            ];
            // EMF takes an array of values; an empty one is not a value.
            if !c.durations_ms.is_empty() {
                metrics.push(("ItemDuration", "Milliseconds", json!(c.durations_ms)));
            }
            let mut line = Map::new();
            line.insert(
                "_aws".into(),
                json!({
                    "Timestamp": at,
                    "CloudWatchMetrics": [{
                        "Namespace": NAMESPACE,
                        "Dimensions": [["FunctionName"]],
                        "Metrics": metrics.iter()
                            .map(|(name, unit, _)| json!({"Name": name, "Unit": unit}))
                            .collect::<Vec<_>>(),
                    }],
                }),
            );
            line.insert("FunctionName".into(), json!(function));
            line.insert("RunId".into(), json!(run.as_str()));
            for (name, _, value) in metrics {
                line.insert(name.into(), value);
            }
            Value::Object(line).to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_run_with_the_run_as_a_property() {
        let (a, b) = (RunId::generate(1), RunId::generate(2));
        let mut runs = BTreeMap::new();
        runs.insert(
            a.clone(),
            RunCounts {
                succeeded: 2,
                failed: 1,
                retried: 3,
                dead_lettered: 1,
                redriven: 1,
                throttled: 4,
                durations_ms: vec![12, 40, 7, 1, 2, 3],
            },
        );
        runs.insert(b.clone(), RunCounts::default());
        let lines = emf_lines("stack-worker", &runs, 1_700_000_000_000);
        assert_eq!(lines.len(), 2);
        let first: Value = serde_json::from_str(&lines[0]).unwrap();
        let second: Value = serde_json::from_str(&lines[1]).unwrap();
        let (la, lb) = if first["RunId"] == a.as_str() {
            (first, second)
        } else {
            (second, first)
        };
        let spec = &la["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(spec["Namespace"], "Settle");
        assert_eq!(spec["Dimensions"], json!([["FunctionName"]]));
        assert_eq!(la["_aws"]["Timestamp"], 1_700_000_000_000u64);
        // Every declared metric has its value on the line, and the run id
        // is no dimension.
        for m in spec["Metrics"].as_array().unwrap() {
            let name = m["Name"].as_str().unwrap();
            assert!(!la[name].is_null(), "{name} has no value");
        }
        assert_eq!(
            (
                la["ItemsSucceeded"].clone(),
                la["ItemsFailed"].clone(),
                la["ItemsRetried"].clone()
            ),
            (json!(2), json!(1), json!(3))
        );
        assert_eq!(
            (la["ItemsDeadLettered"].clone(), la["ItemsRedriven"].clone()),
            (json!(1), json!(1))
        );
        assert_eq!(la["ItemsThrottled"], json!(4));
        assert_eq!(la["ItemDuration"], json!([12, 40, 7, 1, 2, 3]));
        assert_eq!(la["FunctionName"], "stack-worker");
        // No attempts: no duration metric declared or given.
        let names: Vec<&str> = lb["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["Name"].as_str().unwrap())
            .collect();
        assert!(!names.contains(&"ItemDuration"), "{names:?}");
        assert!(lb.get("ItemDuration").is_none());
    }
}
