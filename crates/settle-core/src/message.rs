//! The JSON bodies that travel on the queues. Versioned by field names only:
//! unknown fields are rejected so a body from another producer is caught, not guessed at.

use crate::domain::{Attempt, Item, ItemId, RunId};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// SQS's limit on one message body, which the embedded queue enforces too.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// Why a queue body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("body is {0} bytes; a message holds at most {MAX_BODY_BYTES}")]
    TooLarge(usize),
    #[error("body is not a Settle message: {0}")]
    Json(#[from] serde_json::Error),
}

/// Why the dead-lettered copy of a work message is in the DLQ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetter {
    pub error: String,
    /// Attempts made before dead-lettering; a redrive continues counting from here.
    pub attempts: u32,
}

/// A work-queue message: one item of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkBody {
    pub run: RunId,
    pub item: ItemId,
    /// Attempts made by earlier messages for this item (non-zero after a redrive).
    #[serde(default)]
    pub prior_attempts: u32,
    /// The run's receive limit, carried so one queue can serve runs with different limits.
    pub max_receives: u32,
    pub payload: Box<RawValue>,
    /// Set on the copy the worker puts in the DLQ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead: Option<DeadLetter>,
}

impl WorkBody {
    pub fn new(run: RunId, item: Item, max_receives: u32) -> Self {
        Self {
            run,
            item: item.id,
            prior_attempts: 0,
            max_receives,
            payload: item.payload,
            dead: None,
        }
    }
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("WorkBody always serializes")
    }
    pub fn decode(body: &str) -> Result<Self, DecodeError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(DecodeError::TooLarge(body.len()));
        }
        Ok(serde_json::from_str(body)?)
    }
    pub fn item(&self) -> Item {
        Item::new(self.item.clone(), self.payload.clone())
    }
}

/// A results-queue message: one attempt at one item, for the reducer.
// No deny_unknown_fields here: serde does not support it with `flatten`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultBody {
    pub run: RunId,
    pub item: ItemId,
    #[serde(flatten)]
    pub attempt: Attempt,
}

impl ResultBody {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("ResultBody always serializes")
    }
    pub fn decode(body: &str) -> Result<Self, DecodeError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(DecodeError::TooLarge(body.len()));
        }
        Ok(serde_json::from_str(body)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AttemptOutcome, ErrorKind};

    #[test]
    fn work_body_round_trips_payload_verbatim() {
        let run = RunId::generate(0);
        let payload = RawValue::from_string(r#"{"b":1, "a":[true]}"#.into()).unwrap();
        let body = WorkBody::new(
            run.clone(),
            Item::new(ItemId::new("u1").unwrap(), payload),
            3,
        );
        let text = body.encode();
        let back = WorkBody::decode(&text).unwrap();
        assert_eq!(back.run, run);
        assert_eq!(back.payload.get(), r#"{"b":1, "a":[true]}"#);
        assert!(!text.contains("dead"));
    }

    #[test]
    fn malformed_bodies_are_named() {
        assert!(WorkBody::decode("not json").is_err());
        let err = WorkBody::decode(r#"{"run":"r1","item":"a","max_receives":3,"payload":null}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a Settle run id"), "{err}");
        let big = "x".repeat(MAX_BODY_BYTES + 1);
        assert!(matches!(
            WorkBody::decode(&big),
            Err(DecodeError::TooLarge(_))
        ));
    }

    #[test]
    fn result_body_round_trips() {
        let r = ResultBody {
            run: RunId::generate(0),
            item: ItemId::new("a").unwrap(),
            attempt: Attempt {
                attempt: 2,
                message_id: "m".into(),
                started_at: 7,
                duration_ms: 3,
                outcome: AttemptOutcome::Failed {
                    kind: ErrorKind::Permanent,
                    error: "card declined".into(),
                    terminal: true,
                },
            },
        };
        assert_eq!(ResultBody::decode(&r.encode()).unwrap(), r);
    }
}
