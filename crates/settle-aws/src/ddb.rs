//! What the source and the ledger share: the client, the table names, and
//! small helpers for attributes and errors.

use crate::error::AwsError;
use crate::metrics::Metrics;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, ConsumedCapacity};
use aws_sdk_dynamodb::Client;
use settle_core::ports::PortError;
use std::collections::HashMap;
use std::sync::OnceLock;
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

pub(crate) type Row = HashMap<String, AttributeValue>;

/// Both tables of one deployment.
#[derive(Debug, Clone)]
pub(crate) struct Tables {
    pub client: Client,
    pub items: String,
    pub ledger: String,
    pub metrics: Metrics,
    /// Set by `SETTLE_EMULATOR_WRITE_LOCK=1` (see [`emulator_lock`]).
    pub emulated: bool,
}

/// moto answers a cancelled TransactWriteItems by restoring a snapshot of
/// each table it touched, taken when the transaction began: any write that
/// another request made meanwhile is lost (moto/dynamodb/models, 5.2.x).
/// DynamoDB never does that. Against an emulator, this process therefore
/// runs no other write while a transaction runs: transactions take this
/// lock exclusively, other writes shared. Other processes on the same
/// emulator are not covered (see docs/aws.md).
fn emulator_lock() -> &'static RwLock<()> {
    static LOCK: OnceLock<RwLock<()>> = OnceLock::new();
    LOCK.get_or_init(|| RwLock::new(()))
}

impl Tables {
    /// Held around a TransactWriteItems call (emulator only).
    pub async fn exclusive(&self) -> Option<RwLockWriteGuard<'static, ()>> {
        if self.emulated {
            Some(emulator_lock().write().await)
        } else {
            None
        }
    }

    /// Held around any other write call (emulator only).
    pub async fn shared(&self) -> Option<RwLockReadGuard<'static, ()>> {
        if self.emulated {
            Some(emulator_lock().read().await)
        } else {
            None
        }
    }

    /// Sends a conditional UpdateItem on `table` under the emulator guard and
    /// counts its capacity. `Ok(false)`: its condition failed, nothing written.
    pub async fn update(
        &self,
        table: &str,
        req: aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder,
    ) -> Result<bool, PortError> {
        let op = "DynamoDB.UpdateItem";
        let guard = self.shared().await;
        let res = req
            .return_consumed_capacity(aws_sdk_dynamodb::types::ReturnConsumedCapacity::Total)
            .send()
            .await;
        drop(guard);
        match res {
            Ok(out) => {
                self.capacity(op, out.consumed_capacity());
                Ok(true)
            }
            Err(e) if is_condition_failed(&e) => Ok(false),
            Err(e) => Err(sdk_err(op, table, e)),
        }
    }

    pub fn capacity<'a>(&self, op: &str, cc: impl IntoIterator<Item = &'a ConsumedCapacity>) {
        let units: f64 = cc.into_iter().filter_map(|c| c.capacity_units()).sum();
        self.metrics.add_capacity(op, units);
    }
}

pub(crate) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

pub(crate) fn n(v: impl std::fmt::Display) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// A corrupt or unexpected stored row: names the table, the row and the field.
pub(crate) fn corrupt(op: &'static str, what: &str, field: &str) -> PortError {
    PortError::backend(
        op,
        format!("{what}: attribute {field} is missing or malformed"),
    )
}

pub(crate) fn get_s<'a>(row: &'a Row, field: &str) -> Option<&'a str> {
    row.get(field)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
}

pub(crate) fn get_n(row: &Row, field: &str) -> Option<u64> {
    row.get(field)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
}

pub(crate) fn get_i(row: &Row, field: &str) -> Option<i64> {
    row.get(field)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
}

pub(crate) fn get_bool(row: &Row, field: &str) -> Option<bool> {
    row.get(field).and_then(|v| v.as_bool().ok()).copied()
}

/// Any SDK error as a port error naming the operation and the table.
pub(crate) fn sdk_err<E>(op: &'static str, table: &str, e: SdkError<E>) -> PortError
where
    E: std::error::Error + aws_sdk_dynamodb::error::ProvideErrorMetadata + Send + Sync + 'static,
    aws_sdk_dynamodb::Error: From<SdkError<E>>,
{
    PortError::backend(op, AwsError::dynamodb(format!("table {table}"), e))
}

/// Whether an SDK error is a conditional check failure of a single-item write.
pub(crate) fn is_condition_failed<E>(e: &SdkError<E>) -> bool
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata,
{
    e.as_service_error()
        .and_then(|s| s.code())
        .is_some_and(|c| c == "ConditionalCheckFailedException")
}

/// How a TransactWriteItems call failed.
#[derive(Debug)]
pub(crate) enum TxFailure {
    /// Cancelled: the reason code of each action, in request order
    /// ("None" for actions that were fine).
    Cancelled(Vec<String>),
    Other(PortError),
}

impl TxFailure {
    /// True when some action's condition failed or it raced another
    /// transaction: the caller's optimistic read is stale.
    pub fn is_race(reasons: &[String]) -> bool {
        reasons
            .iter()
            .any(|c| c == "ConditionalCheckFailed" || c == "TransactionConflict")
    }
}

pub(crate) fn tx_failure(table: &str, e: SdkError<TransactWriteItemsError>) -> TxFailure {
    if let Some(TransactWriteItemsError::TransactionCanceledException(t)) = e.as_service_error() {
        let reasons: Vec<String> = t
            .cancellation_reasons()
            .iter()
            .map(|r| r.code().unwrap_or("None").to_owned())
            .collect();
        if TxFailure::is_race(&reasons) {
            return TxFailure::Cancelled(reasons);
        }
    }
    TxFailure::Other(sdk_err("DynamoDB.TransactWriteItems", table, e))
}

/// A short random suffix for ids that must not collide across processes.
pub(crate) fn random_suffix() -> String {
    format!("{:08x}", fastrand::u32(..))
}
