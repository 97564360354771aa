//! [`IdempotencyStore`] on DynamoDB, in the ledger table under its own key
//! prefix: partition `K#<run>`, sort key the item id. No new table, and the
//! rows never carry `frun`, so the failed-items index never sees them. Every
//! write is one conditional single-item call. See `docs/idempotency.md`.

use crate::ddb::{corrupt, get_n, get_s, is_condition_failed, n, s, sdk_err, Row, Tables};
use async_trait::async_trait;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnConsumedCapacity};
use settle_core::domain::Millis;
use settle_core::idempotency::{Claim, IdempotencyKey, IdempotencyRecord, IdempotencyStore};
use settle_core::ports::PortError;
use std::collections::HashMap;

const IN_PROGRESS: &str = "in_progress";
const COMPLETED: &str = "completed";

/// The partition of a run's idempotency records.
pub(crate) fn idempotency_pk(run: &settle_core::RunId) -> String {
    format!("K#{run}")
}

fn key_of(key: &IdempotencyKey) -> HashMap<String, AttributeValue> {
    HashMap::from([
        ("pk".to_owned(), s(idempotency_pk(&key.run))),
        ("sk".to_owned(), s(key.item.as_str())),
    ])
}

/// The idempotency records of one ledger table.
#[derive(Debug, Clone)]
pub struct DynamoIdempotency {
    t: Tables,
}

impl DynamoIdempotency {
    pub(crate) fn new(t: Tables) -> Self {
        Self { t }
    }

    async fn read(
        &self,
        op: &'static str,
        key: &IdempotencyKey,
    ) -> Result<Option<IdempotencyRecord>, PortError> {
        let out = self
            .t
            .client
            .get_item()
            .table_name(&self.t.ledger)
            .set_key(Some(key_of(key)))
            .consistent_read(true)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| sdk_err(op, &self.t.ledger, e))?;
        self.t.capacity("DynamoDB.GetItem", out.consumed_capacity());
        out.item()
            .map(|row| record_from_row(op, key, row))
            .transpose()
    }
}

fn record_from_row(
    op: &'static str,
    key: &IdempotencyKey,
    row: &Row,
) -> Result<IdempotencyRecord, PortError> {
    let what = format!("idempotency row {}/{}", idempotency_pk(&key.run), key.item);
    let text = |f: &str| {
        get_s(row, f)
            .map(str::to_owned)
            .ok_or_else(|| corrupt(op, &what, f))
    };
    let (payload_hash, token) = (text("h")?, text("tok")?);
    match get_s(row, "st") {
        Some(IN_PROGRESS) => Ok(IdempotencyRecord::InProgress {
            payload_hash,
            token,
            expires_at: get_n(row, "exp").ok_or_else(|| corrupt(op, &what, "exp"))?,
        }),
        Some(COMPLETED) => Ok(IdempotencyRecord::Completed {
            payload_hash,
            token,
            result: text("res")?,
        }),
        _ => Err(corrupt(op, &what, "st")),
    }
}

/// Claims that found a record which then vanished (released meanwhile)
/// before giving up; each such round is a race another attempt won.
const CLAIM_ROUNDS: usize = 3;

#[async_trait]
impl IdempotencyStore for DynamoIdempotency {
    async fn claim(
        &self,
        key: &IdempotencyKey,
        payload_hash: &str,
        token: &str,
        now: Millis,
        expires_at: Millis,
    ) -> Result<Claim, PortError> {
        let op = "DynamoDB.PutItem";
        for _ in 0..CLAIM_ROUNDS {
            let mut row = key_of(key);
            row.insert("st".into(), s(IN_PROGRESS));
            row.insert("h".into(), s(payload_hash));
            row.insert("tok".into(), s(token));
            row.insert("exp".into(), n(expires_at));
            let guard = self.t.shared().await;
            let res = self
                .t
                .client
                .put_item()
                .table_name(&self.t.ledger)
                .set_item(Some(row))
                // Free, or an in-progress claim of the same payload that
                // expired or is this very claim (a repeated call).
                .condition_expression(
                    "attribute_not_exists(pk) OR (#st = :ip AND #h = :h AND (#exp <= :now OR #tok = :tok))",
                )
                .expression_attribute_names("#st", "st")
                .expression_attribute_names("#h", "h")
                .expression_attribute_names("#exp", "exp")
                .expression_attribute_names("#tok", "tok")
                .expression_attribute_values(":ip", s(IN_PROGRESS))
                .expression_attribute_values(":h", s(payload_hash))
                .expression_attribute_values(":now", n(now))
                .expression_attribute_values(":tok", s(token))
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await;
            drop(guard);
            match res {
                Ok(out) => {
                    self.t.capacity(op, out.consumed_capacity());
                    return Ok(Claim::Acquired);
                }
                Err(e) if is_condition_failed(&e) => {
                    if let Some(found) = self.read("DynamoDB.GetItem", key).await? {
                        return Ok(Claim::Existing(found));
                    }
                    // Released between the put and the read: claim again.
                }
                Err(e) => return Err(sdk_err(op, &self.t.ledger, e)),
            }
        }
        Err(PortError::Conflict)
    }

    async fn complete(
        &self,
        key: &IdempotencyKey,
        token: &str,
        result: &str,
    ) -> Result<(), PortError> {
        let t = &self.t;
        let update = t
            .client
            .update_item()
            .table_name(&t.ledger)
            .set_key(Some(key_of(key)))
            .update_expression("SET #st = :done, #res = :res REMOVE #exp")
            .condition_expression("#tok = :tok AND #st = :ip")
            .expression_attribute_names("#st", "st")
            .expression_attribute_names("#res", "res")
            .expression_attribute_names("#exp", "exp")
            .expression_attribute_names("#tok", "tok")
            .expression_attribute_values(":done", s(COMPLETED))
            .expression_attribute_values(":ip", s(IN_PROGRESS))
            .expression_attribute_values(":res", s(result))
            .expression_attribute_values(":tok", s(token));
        if t.update(&t.ledger, update).await? {
            return Ok(());
        }
        // A repeat of a completion that took effect is fine; anything else
        // means the claim expired and another attempt took the key.
        match self.read("DynamoDB.GetItem", key).await? {
            Some(IdempotencyRecord::Completed { token: mine, .. }) if mine == token => Ok(()),
            _ => Err(PortError::Conflict),
        }
    }

    async fn release(&self, key: &IdempotencyKey, token: &str) -> Result<(), PortError> {
        let op = "DynamoDB.DeleteItem";
        let guard = self.t.shared().await;
        let res = self
            .t
            .client
            .delete_item()
            .table_name(&self.t.ledger)
            .set_key(Some(key_of(key)))
            .condition_expression("#tok = :tok AND #st = :ip")
            .expression_attribute_names("#st", "st")
            .expression_attribute_names("#tok", "tok")
            .expression_attribute_values(":ip", s(IN_PROGRESS))
            .expression_attribute_values(":tok", s(token))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        drop(guard);
        match res {
            Ok(out) => {
                self.t.capacity(op, out.consumed_capacity());
                Ok(())
            }
            // Not ours (or gone): nothing to release.
            Err(e) if is_condition_failed(&e) => Ok(()),
            Err(e) => Err(sdk_err(op, &self.t.ledger, e)),
        }
    }

    async fn get(&self, key: &IdempotencyKey) -> Result<Option<IdempotencyRecord>, PortError> {
        self.read("DynamoDB.GetItem", key).await
    }
}
