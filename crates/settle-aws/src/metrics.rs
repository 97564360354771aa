//! API call counting for the cost report: an SDK interceptor that counts
//! every request sent, per operation, and the DynamoDB capacity that the
//! backend asked the service to report. Because an emulator reports no
//! capacity for some operations (moto: none for TransactWriteItems), the
//! interceptor also derives DynamoDB's billed units from the requests and
//! responses themselves, by DynamoDB's rules (see [`Metrics::billed_units`]).

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::{
    AfterDeserializationInterceptorContextRef, BeforeTransmitInterceptorContextRef,
};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::{ConfigBag, Storable, StoreReplace};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Counters shared by the clients of one [`crate::AwsBackend`].
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    calls: Arc<Mutex<BTreeMap<String, u64>>>,
    capacity: Arc<Mutex<BTreeMap<String, f64>>>,
    units: Arc<Mutex<BTreeMap<String, f64>>>,
}

impl Metrics {
    /// Requests sent per operation ("SQS.SendMessageBatch"), retries included:
    /// AWS bills every request it receives.
    pub fn call_counts(&self) -> BTreeMap<String, u64> {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// DynamoDB capacity units (reads and writes) per operation, as reported
    /// by the service for the calls that asked for it.
    pub fn consumed_capacity(&self) -> BTreeMap<String, f64> {
        self.capacity
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// DynamoDB units as AWS would bill them, derived from the traffic, per
    /// `"<operation> WRU"` / `"<operation> RRU"`:
    /// - a write costs 1 WRU per started KB of each item written, 2 in a
    ///   transaction, with the item's size computed by DynamoDB's rules. An
    ///   update or delete counts 1 KB: the rows Settle updates (meta, run
    ///   rows) are smaller.
    ///   A Put carrying the sparse index attribute `frun` also writes the
    ///   `failed` index (+1 WRU per KB).
    /// - a read costs 1 RRU per started 4 KB returned (at least 1 per
    ///   GetItem, per BatchGetItem key and per Query), half when eventually
    ///   consistent.
    pub fn billed_units(&self) -> BTreeMap<String, f64> {
        self.units
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Counts one event under `key`, beside the per-operation call counts.
    pub(crate) fn count(&self, key: &str) {
        *self
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.to_owned())
            .or_default() += 1;
    }

    pub(crate) fn add_capacity(&self, op: &str, units: f64) {
        if units > 0.0 {
            *self
                .capacity
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(op.to_owned())
                .or_default() += units;
        }
    }

    /// The interceptor to install on an SDK client.
    pub(crate) fn interceptor(&self) -> CallCounter {
        CallCounter {
            calls: self.calls.clone(),
            units: self.units.clone(),
        }
    }
}

/// Counts each request as it is about to be sent: once per attempt, so a
/// retried call counts as often as AWS bills it.
#[derive(Debug)]
pub(crate) struct CallCounter {
    calls: Arc<Mutex<BTreeMap<String, u64>>>,
    units: Arc<Mutex<BTreeMap<String, f64>>>,
}

/// Whether the read in flight is strongly consistent, from its request.
#[derive(Debug, Clone, Copy)]
struct Consistent(bool);

impl Storable for Consistent {
    type Storer = StoreReplace<Self>;
}

fn started(bytes: usize, unit: usize) -> f64 {
    bytes.div_ceil(unit).max(1) as f64
}

/// An item's size as DynamoDB bills it, from its wire form
/// (`{"name": {"S": "..."}, ...}`): attribute names plus values, strings in
/// UTF-8 bytes, numbers about one byte per two digits plus one, documents 3
/// bytes plus their elements plus one per element.
fn size(item: &Value) -> usize {
    item.as_object().map_or(0, |attrs| {
        attrs
            .iter()
            .map(|(name, v)| name.len() + value_size(v))
            .sum()
    })
}

fn value_size(v: &Value) -> usize {
    let Some((ty, x)) = v.as_object().and_then(|o| o.iter().next()) else {
        return 0;
    };
    let number = |n: &str| n.trim_start_matches('-').len().div_ceil(2) + 1;
    match (ty.as_str(), x) {
        ("S", Value::String(s)) => s.len(),
        ("N", Value::String(n)) => number(n),
        // Base64 on the wire: three bytes per four characters.
        ("B", Value::String(b)) => b.len() / 4 * 3,
        ("BOOL" | "NULL", _) => 1,
        ("SS", Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::len).sum(),
        ("NS", Value::Array(a)) => a.iter().filter_map(Value::as_str).map(number).sum(),
        ("L", Value::Array(a)) => 3 + a.iter().map(|e| 1 + value_size(e)).sum::<usize>(),
        ("M", Value::Object(m)) => {
            3 + m
                .iter()
                .map(|(k, e)| 1 + k.len() + value_size(e))
                .sum::<usize>()
        }
        _ => 0,
    }
}

/// Write units of a DynamoDB write request (see [`Metrics::billed_units`]).
fn write_units(op: &str, req: &Value) -> f64 {
    let put = |item: &Value, factor: f64| {
        let kb = started(size(item), 1024);
        let index = if item.get("frun").is_some() { kb } else { 0.0 };
        kb * factor + index
    };
    match op {
        "PutItem" => put(&req["Item"], 1.0),
        "UpdateItem" | "DeleteItem" => 1.0,
        "BatchWriteItem" => req["RequestItems"]
            .as_object()
            .into_iter()
            .flat_map(|t| t.values())
            .flat_map(|w| w.as_array().into_iter().flatten())
            .map(|w| match w.get("PutRequest") {
                Some(p) => put(&p["Item"], 1.0),
                None => 1.0,
            })
            .sum(),
        "TransactWriteItems" => req["TransactItems"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| match a.get("Put") {
                Some(p) => put(&p["Item"], 2.0),
                None => 2.0,
            })
            .sum(),
        _ => 0.0,
    }
}

/// Read units of a DynamoDB read, from its response (see [`Metrics::billed_units`]).
fn read_units(op: &str, resp: &Value, consistent: bool) -> f64 {
    let factor = if consistent { 1.0 } else { 0.5 };
    let units = match op {
        "GetItem" => started(resp.get("Item").map_or(0, size), 4096),
        // A query is billed on the sum of the items it returned.
        "Query" | "Scan" => started(
            resp["Items"]
                .as_array()
                .map_or(0, |items| items.iter().map(size).sum()),
            4096,
        ),
        "BatchGetItem" => resp["Responses"]
            .as_object()
            .into_iter()
            .flat_map(|t| t.values())
            .flat_map(|items| items.as_array().into_iter().flatten())
            .map(|item| started(size(item), 4096))
            .sum(),
        _ => 0.0,
    };
    units * factor
}

impl CallCounter {
    fn add_units(&self, key: String, units: f64) {
        if units > 0.0 {
            *self
                .units
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(key)
                .or_default() += units;
        }
    }
}

impl Intercept for CallCounter {
    fn name(&self) -> &'static str {
        "SettleCallCounter"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let op = match cfg.load::<Metadata>() {
            Some(m) => format!("{}.{}", m.service(), m.name()),
            None => "unknown".to_owned(),
        };
        if let Some(name) = op.strip_prefix("DynamoDB.") {
            let req: Value = context
                .request()
                .body()
                .bytes()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            self.add_units(format!("{op} WRU"), write_units(name, &req));
            let consistent = req["ConsistentRead"].as_bool().unwrap_or(false)
                || req["RequestItems"]
                    .as_object()
                    .into_iter()
                    .flat_map(|t| t.values())
                    .any(|t| t["ConsistentRead"].as_bool().unwrap_or(false));
            cfg.interceptor_state().store_put(Consistent(consistent));
        }
        *self
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(op)
            .or_default() += 1;
        Ok(())
    }

    fn read_after_deserialization(
        &self,
        context: &AfterDeserializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let Some(op) = cfg
            .load::<Metadata>()
            .filter(|m| m.service() == "DynamoDB")
            .map(|m| m.name().to_owned())
        else {
            return Ok(());
        };
        if !context.response().status().is_success() {
            // Refused calls are counted apart by error, e.g.
            // "DynamoDB.PutItem (ConditionalCheckFailedException)": lost
            // races show in the cost report instead of hiding in the totals.
            let code = context
                .response()
                .body()
                .bytes()
                .and_then(|b| serde_json::from_slice::<Value>(b).ok())
                .and_then(|v| v["__type"].as_str().map(str::to_owned))
                .map(|t| t.rsplit('#').next().unwrap_or_default().to_owned())
                .unwrap_or_else(|| context.response().status().as_u16().to_string());
            *self
                .calls
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(format!("DynamoDB.{op} ({code})"))
                .or_default() += 1;
            return Ok(());
        }
        let consistent = cfg.load::<Consistent>().is_some_and(|c| c.0);
        if let Some(resp) = context
            .response()
            .body()
            .bytes()
            .and_then(|b| serde_json::from_slice::<Value>(b).ok())
        {
            self.add_units(
                format!("DynamoDB.{op} RRU"),
                read_units(&op, &resp, consistent),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn write_units_follow_dynamodb_billing() {
        let small = json!({"pk": {"S": "I#r"}, "sk": {"S": "a"}});
        let big = json!({"pk": {"S": "x".repeat(1500)}});
        let failed = json!({"pk": {"S": "I#r"}, "frun": {"S": "r"}});
        let tx = json!({"TransactItems": [
            {"Put": {"Item": small}}, {"Put": {"Item": big}},
            {"Put": {"Item": failed}}, {"Update": {"Key": {}}}
        ]});
        // 2 × (1 + 2 + 1 + 1) for the transaction, +1 for the index row.
        assert_eq!(write_units("TransactWriteItems", &tx), 11.0);
        let batch = json!({"RequestItems": {"t": [
            {"PutRequest": {"Item": small}}, {"DeleteRequest": {"Key": {}}}
        ]}});
        assert_eq!(write_units("BatchWriteItem", &batch), 2.0);
        assert_eq!(write_units("GetItem", &json!({})), 0.0);
    }

    #[test]
    fn read_units_follow_dynamodb_billing() {
        let item = json!({"d": {"S": "x".repeat(5000)}});
        assert_eq!(size(&item), 5001);
        let doc = json!({"n": {"N": "12345"}, "m": {"M": {"k": {"BOOL": true}}}, "l": {"L": [{"S": "ab"}]}});
        // n: 1 + 4; m: 1 + 3 + (1 + 1 + 1); l: 1 + 3 + (1 + 2)
        assert_eq!(size(&doc), 5 + 7 + 7);
        assert_eq!(read_units("GetItem", &json!({}), true), 1.0);
        assert_eq!(read_units("GetItem", &json!({"Item": item}), false), 1.0);
        assert_eq!(read_units("Query", &json!({"Items": [item]}), true), 2.0);
        let batch = json!({"Responses": {"t": [{"a": {"S": "1"}}, {"b": {"S": "2"}}]}});
        assert_eq!(read_units("BatchGetItem", &batch, false), 1.0);
    }
}
