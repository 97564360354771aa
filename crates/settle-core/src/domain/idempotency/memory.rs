//! An [`IdempotencyStore`] in memory: for unit tests of processors, and of
//! the utility itself. It keeps the store's contract in one process.

use super::{Claim, IdempotencyKey, IdempotencyRecord, IdempotencyStore};
use crate::domain::ports::PortError;
use crate::domain::Millis;
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Mutex;

/// Records in a map behind a mutex; every operation holds the lock throughout.
#[derive(Debug, Default)]
pub struct MemoryIdempotencyStore {
    records: Mutex<HashMap<IdempotencyKey, IdempotencyRecord>>,
}

impl MemoryIdempotencyStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<IdempotencyKey, IdempotencyRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl IdempotencyStore for MemoryIdempotencyStore {
    async fn claim(
        &self,
        key: &IdempotencyKey,
        payload_hash: &str,
        token: &str,
        now: Millis,
        expires_at: Millis,
    ) -> Result<Claim, PortError> {
        let mut records = self.records();
        let free = match records.get(key) {
            None => true,
            Some(IdempotencyRecord::InProgress {
                payload_hash: h,
                token: t,
                expires_at: e,
            }) => h == payload_hash && (*e <= now || t == token),
            Some(IdempotencyRecord::Completed { .. }) => false,
        };
        if !free {
            let found = records.get(key).cloned().expect("checked above");
            return Ok(Claim::Existing(found));
        }
        records.insert(
            key.clone(),
            IdempotencyRecord::InProgress {
                payload_hash: payload_hash.to_owned(),
                token: token.to_owned(),
                expires_at,
            },
        );
        Ok(Claim::Acquired)
    }

    async fn complete(
        &self,
        key: &IdempotencyKey,
        token: &str,
        result: &str,
    ) -> Result<(), PortError> {
        let mut records = self.records();
        match records.get_mut(key) {
            Some(r) if r.token() == token => {
                if let IdempotencyRecord::InProgress { payload_hash, .. } = r {
                    *r = IdempotencyRecord::Completed {
                        payload_hash: std::mem::take(payload_hash),
                        token: token.to_owned(),
                        result: result.to_owned(),
                    };
                }
                Ok(())
            }
            _ => Err(PortError::Conflict),
        }
    }

    async fn release(&self, key: &IdempotencyKey, token: &str) -> Result<(), PortError> {
        let mut records = self.records();
        if matches!(records.get(key), Some(IdempotencyRecord::InProgress { token: t, .. }) if t == token)
        {
            records.remove(key);
        }
        Ok(())
    }

    async fn get(&self, key: &IdempotencyKey) -> Result<Option<IdempotencyRecord>, PortError> {
        Ok(self.records().get(key).cloned())
    }
}
