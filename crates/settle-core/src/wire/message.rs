//! The JSON bodies that travel on the queues. Versioned by field names only:
//! unknown fields are rejected so a body from another producer is caught, not guessed at.

use crate::domain::{Attempt, AttemptOutcome, ErrorKind, Item, ItemId, Millis, Output, RunId};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// SQS's limit on one message body, which the embedded queue enforces too.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

fn is_zero(n: &u32) -> bool {
    *n == 0
}

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
    /// The item's position in its run's claim order, from 0. A compact
    /// per-run key: the DynamoDB ledger keeps each run's item statuses in
    /// bitmaps indexed by it (see docs/aws.md).
    pub seq: u64,
    /// Attempts made by earlier messages for this item: this message's
    /// attempt is the next one. A retry is a new message that carries the
    /// count on, so receives that never ran the processor (a copy handed
    /// back, a redelivery while the item is in hand) are not attempts.
    #[serde(default)]
    pub prior_attempts: u32,
    /// Attempts made before the current round began: a redrive starts a new round
    /// of `max_receives` attempts.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub round: u32,
    /// The run's receive limit, carried so one queue can serve runs with different limits.
    pub max_receives: u32,
    pub payload: Box<RawValue>,
    /// Set on the copy the worker puts in the DLQ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead: Option<DeadLetter>,
    /// Receives of this attempt, by earlier copies of this message, that
    /// ended with no outcome known (see the worker's gate).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lost_receives: u32,
    /// Sent again by a dispatch that resumed after an interruption: a copy
    /// of this item's first message may already be queued or in hand, so
    /// a worker that knows of no attempt waits once before running it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resent: bool,
    /// Sent on by a worker with its attempt unused (an item not started, a
    /// wait): a copy of it may exist, so the gate reads its outcome.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub requeued: bool,
    /// Not to be attempted before this time (milliseconds since the epoch):
    /// a retry put off longer than a queue can delay a message is sent
    /// again, delayed, until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Millis>,
    /// The redrive pass that sent this message back, carried into its dead
    /// letter: a pass tells its own messages, dead-lettered again while it
    /// still scans, from older copies of the same item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redrive: Option<String>,
    /// Throttled answers the item got before this message (see
    /// [`crate::domain::AttemptOutcome::Throttled`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub throttled: u32,
    /// The item's key in its run's flow control (the run's `--key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The run's flow limits, so that any worker honours them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<crate::flow::FlowLimits>,
}

impl WorkBody {
    pub fn new(run: RunId, item: Item, seq: u64, max_receives: u32) -> Self {
        Self {
            run,
            item: item.id,
            seq,
            prior_attempts: 0,
            round: 0,
            max_receives,
            payload: item.payload,
            dead: None,
            lost_receives: 0,
            resent: false,
            requeued: false,
            not_before: None,
            redrive: None,
            throttled: 0,
            key: None,
            flow: None,
        }
    }
    /// This message's attempt number.
    pub fn attempt(&self) -> u32 {
        self.prior_attempts.saturating_add(1)
    }
    /// Whether a copy of this message, or a settled message of its item,
    /// may exist when it is received for the `receive_count`-th time: only
    /// a dispatch's first message of an item, on its first receive, has
    /// none, and the gate need not read its outcome.
    pub fn may_have_a_copy(&self, receive_count: u32) -> bool {
        receive_count > 1
            || self.prior_attempts > 0
            || self.resent
            || self.requeued
            || self.redrive.is_some()
            || self.lost_receives > 0
    }
    /// Whether this message's attempt is the last of its round.
    pub fn last_of_round(&self) -> bool {
        self.attempt().saturating_sub(self.round) >= self.max_receives
    }
    pub fn encode(&self) -> String {
        crate::wire::json::work_body(self)
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

/// A results-queue message: one attempt at one item, for the reducer. On
/// the wire the attempt's fields (and its outcome's) sit beside `run`,
/// `item` and `seq` in one flat object (the private `WireResult`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultBody {
    pub run: RunId,
    pub item: ItemId,
    /// The item's [`WorkBody::seq`].
    pub seq: u64,
    pub attempt: Attempt,
}

/// How a [`ResultBody`] is read. It is written by [`crate::wire::json`] alone
/// (one encoder for the wire type); this is the same JSON, spelled out
/// field by field rather than with `#[serde(flatten)]`: flatten buffers
/// every field into a map of its own before decoding it, which made
/// decoding results the largest CPU cost of the reducer (a tenth of the
/// runtime's time on a 1M-item run). Unknown fields are ignored: bodies
/// written by earlier versions must still decode.
#[derive(Deserialize)]
struct WireResult {
    run: RunId,
    item: ItemId,
    seq: u64,
    attempt: u32,
    message_id: String,
    started_at: Millis,
    duration_ms: u64,
    outcome: WireOutcome,
    #[serde(default)]
    kind: Option<ErrorKind>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    terminal: Option<bool>,
    #[serde(default)]
    output: Option<Output>,
    #[serde(default)]
    log: Option<String>,
    #[serde(default)]
    nth: Option<u32>,
    #[serde(default)]
    retry_at: Option<Millis>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum WireOutcome {
    Succeeded,
    Failed,
    Throttled,
}

impl<'de> Deserialize<'de> for ResultBody {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let w = WireResult::deserialize(d)?;
        let outcome = match w.outcome {
            WireOutcome::Succeeded => AttemptOutcome::Succeeded,
            WireOutcome::Failed => AttemptOutcome::Failed {
                kind: w.kind.ok_or_else(|| D::Error::missing_field("kind"))?,
                error: w.error.ok_or_else(|| D::Error::missing_field("error"))?,
                terminal: w
                    .terminal
                    .ok_or_else(|| D::Error::missing_field("terminal"))?,
            },
            WireOutcome::Throttled => AttemptOutcome::Throttled {
                nth: w.nth.ok_or_else(|| D::Error::missing_field("nth"))?,
            },
        };
        Ok(Self {
            run: w.run,
            item: w.item,
            seq: w.seq,
            attempt: Attempt {
                attempt: w.attempt,
                message_id: w.message_id,
                started_at: w.started_at,
                duration_ms: w.duration_ms,
                outcome,
                output: w.output,
                log: w.log,
                retry_at: w.retry_at,
            },
        })
    }
}

impl ResultBody {
    pub fn encode(&self) -> String {
        crate::wire::json::result_body(self)
    }
    pub fn decode(body: &str) -> Result<Self, DecodeError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(DecodeError::TooLarge(body.len()));
        }
        Ok(serde_json::from_str(body)?)
    }
}

/// A results-queue message: the results of one worker batch. One message
/// for a batch's results, rather than one per item, cuts the results path's
/// queue calls (send, receive, delete) by up to ten: the largest share of
/// the queue bill, and of the embedded engine's writes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResultsBody {
    results: Vec<ResultBody>,
}

/// Packs encoded results into as few results messages as fit
/// [`MAX_BODY_BYTES`]. Returns each message's body and the indices (into
/// `encoded`) of the results it carries.
pub fn pack_results(encoded: &[String]) -> Vec<(String, Vec<usize>)> {
    const FRAME: usize = r#"{"results":[]}"#.len();
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, r) in encoded.iter().enumerate() {
        match out.last_mut() {
            Some((body, members)) if body.len() + 1 + r.len() + 2 <= MAX_BODY_BYTES => {
                body.push(',');
                body.push_str(r);
                members.push(i);
            }
            _ => {
                let mut body = String::with_capacity(FRAME + r.len());
                body.push_str(r#"{"results":["#);
                body.push_str(r);
                out.push((body, vec![i]));
            }
        }
    }
    for (body, _) in &mut out {
        body.push_str("]}");
    }
    out
}

/// Reads a results message: `{"results": [...]}`, or a single result (the
/// form earlier versions sent, which may still be queued).
pub fn decode_results(body: &str) -> Result<Vec<ResultBody>, DecodeError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(DecodeError::TooLarge(body.len()));
    }
    match serde_json::from_str::<ResultsBody>(body) {
        Ok(b) if b.results.is_empty() => Err(DecodeError::Json(serde::de::Error::custom(
            "a results message holds no results",
        ))),
        Ok(b) => Ok(b.results),
        Err(batch_err) => match serde_json::from_str::<ResultBody>(body) {
            Ok(single) => Ok(vec![single]),
            Err(_) => Err(batch_err.into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_body_round_trips_payload_verbatim() {
        let run = RunId::generate(0);
        let payload = RawValue::from_string(r#"{"b":1, "a":[true]}"#.into()).unwrap();
        let body = WorkBody::new(
            run.clone(),
            Item::new(ItemId::new("u1").unwrap(), payload),
            7,
            3,
        );
        let text = body.encode();
        let back = WorkBody::decode(&text).unwrap();
        assert_eq!(back.run, run);
        assert_eq!(back.seq, 7);
        assert_eq!(back.payload.get(), r#"{"b":1, "a":[true]}"#);
        assert!(!text.contains("dead"));
    }

    #[test]
    fn malformed_bodies_are_named() {
        assert!(WorkBody::decode("not json").is_err());
        let err =
            WorkBody::decode(r#"{"run":"r1","item":"a","seq":0,"max_receives":3,"payload":null}"#)
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
            seq: 41,
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
                output: None,
                log: None,
                retry_at: None,
            },
        };
        assert_eq!(ResultBody::decode(&r.encode()).unwrap(), r);
        // The flat form that earlier versions wrote with serde's flatten.
        assert_eq!(
            r.encode(),
            r#"{"run":"#.to_owned()
                + &serde_json::to_string(&r.run).unwrap()
                + r#","item":"a","seq":41,"attempt":2,"message_id":"m","started_at":7,"duration_ms":3,"outcome":"failed","kind":"permanent","error":"card declined","terminal":true}"#
        );
        let ok = r#"{"run":"#.to_owned()
            + &serde_json::to_string(&r.run).unwrap()
            + r#","item":"a","seq":1,"attempt":1,"message_id":"m","started_at":7,"duration_ms":3,"outcome":"succeeded","later":1}"#;
        let ok = ResultBody::decode(&ok).unwrap();
        assert_eq!(ok.attempt.outcome, AttemptOutcome::Succeeded);
        let err = ResultBody::decode(&ok.encode().replace(r#""succeeded""#, r#""failed""#))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `kind`"), "{err}");
        // The single form is still read as a results message.
        assert_eq!(decode_results(&r.encode()).unwrap(), vec![r.clone()]);
        let packed = pack_results(&[r.encode(), r.encode()]);
        assert_eq!(packed.len(), 1);
        assert_eq!(packed[0].1, vec![0, 1]);
        assert_eq!(decode_results(&packed[0].0).unwrap(), vec![r.clone(), r]);
    }

    #[test]
    fn results_pack_into_bodies_that_fit() {
        let big = format!("\"{}\"", "x".repeat(MAX_BODY_BYTES / 3));
        let packed = pack_results(&[big.clone(), big.clone(), big.clone(), big]);
        assert_eq!(packed.len(), 2);
        assert_eq!(packed[0].1, vec![0, 1]);
        assert_eq!(packed[1].1, vec![2, 3]);
        assert!(packed.iter().all(|(b, _)| b.len() <= MAX_BODY_BYTES));
    }

    #[test]
    fn bad_results_messages_are_named() {
        let err = decode_results(r#"{"results":[]}"#).unwrap_err().to_string();
        assert!(err.contains("holds no results"), "{err}");
        let err = decode_results(r#"{"results":[{"run":"x"}]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a Settle message"), "{err}");
        assert!(decode_results("[]").is_err());
    }
}
