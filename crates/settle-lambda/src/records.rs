//! SQS event records to the core's [`Delivery`], and batch failures back to
//! Lambda's partial batch response.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use settle_core::ports::Delivery;
use settle_core::work::BatchResponse;

/// The SQS system attribute that counts receives, this one included.
pub const RECEIVE_COUNT: &str = "ApproximateReceiveCount";

/// A record that cannot be reported on its own: Lambda identifies a batch
/// item failure by message id, so without one the whole batch must go back.
#[derive(Debug, thiserror::Error)]
#[error(
    "record {index} of {len} in the SQS event has no messageId; it cannot be reported \
     on its own, so the whole batch is returned to the queue"
)]
pub struct UnidentifiedRecord {
    /// Zero-based position of the record in the event.
    pub index: usize,
    pub len: usize,
}

/// The records of an event: those that became deliveries, and the message
/// ids of those that could not (each already logged with what it lacked).
#[derive(Debug, Default)]
pub struct Records {
    pub deliveries: Vec<Delivery>,
    pub rejected: Vec<String>,
}

/// Reads every record of `event`. A record missing its receipt handle, its
/// body or a readable receive count is rejected alone, by its message id;
/// a record without a message id fails the whole event (see
/// [`UnidentifiedRecord`]), checked before anything is processed.
pub fn deliveries(event: SqsEvent) -> Result<Records, UnidentifiedRecord> {
    let len = event.records.len();
    if let Some(index) = event.records.iter().position(|r| {
        r.message_id
            .as_deref()
            .is_none_or(|id| id.trim().is_empty())
    }) {
        return Err(UnidentifiedRecord { index, len });
    }
    let mut out = Records::default();
    for record in event.records {
        match delivery(record) {
            Ok(d) => out.deliveries.push(d),
            Err((message_id, what)) => {
                tracing::error!(%message_id, "SQS record lacks {what}; returning it to the queue");
                out.rejected.push(message_id);
            }
        }
    }
    Ok(out)
}

fn delivery(record: SqsMessage) -> Result<Delivery, (String, String)> {
    let message_id = record.message_id.unwrap_or_default();
    let Some(receipt) = record.receipt_handle.filter(|r| !r.is_empty()) else {
        return Err((message_id, "a receiptHandle".into()));
    };
    let Some(body) = record.body else {
        return Err((message_id, "a body".into()));
    };
    let receive_count = match record.attributes.get(RECEIVE_COUNT) {
        None => return Err((message_id, format!("the {RECEIVE_COUNT} attribute"))),
        Some(v) => match v.parse::<u32>() {
            Ok(n) if n >= 1 => n,
            _ => {
                return Err((
                    message_id,
                    format!("a valid {RECEIVE_COUNT} (got {v:?}, want a whole number from 1)"),
                ))
            }
        },
    };
    Ok(Delivery {
        message_id,
        receipt,
        body,
        receive_count,
    })
}

/// Lambda's partial batch response: `batchItemFailures[].itemIdentifier`
/// holds the message ids to deliver again; every other message is deleted.
pub fn batch_response(core: BatchResponse, rejected: Vec<String>) -> SqsBatchResponse {
    let mut response = SqsBatchResponse::default();
    response.set_failures(rejected.into_iter().chain(core.failures));
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn event(json: serde_json::Value) -> SqsEvent {
        serde_json::from_value(json).unwrap()
    }

    fn record(id: Option<&str>, count: Option<&str>) -> serde_json::Value {
        let mut attributes = serde_json::Map::new();
        if let Some(c) = count {
            attributes.insert(RECEIVE_COUNT.into(), c.into());
        }
        serde_json::json!({
            "messageId": id, "receiptHandle": "rh", "body": "{}",
            "attributes": attributes, "eventSource": "aws:sqs"
        })
    }

    #[test]
    fn a_record_without_a_receive_count_is_rejected_alone() {
        let ev = event(serde_json::json!({"Records": [
            record(Some("m1"), Some("2")),
            record(Some("m2"), None),
            record(Some("m3"), Some("zero")),
            record(Some("m4"), Some("0")),
        ]}));
        let got = deliveries(ev).unwrap();
        assert_eq!(got.deliveries.len(), 1);
        assert_eq!(got.deliveries[0].message_id, "m1");
        assert_eq!(got.deliveries[0].receive_count, 2);
        assert_eq!(got.rejected, vec!["m2", "m3", "m4"]);
    }

    #[test]
    fn a_record_without_receipt_or_body_is_rejected_alone() {
        let ev = event(serde_json::json!({"Records": [
            {"messageId": "a", "body": "{}", "attributes": {RECEIVE_COUNT: "1"}},
            {"messageId": "b", "receiptHandle": "rh", "attributes": {RECEIVE_COUNT: "1"}},
            record(Some("c"), Some("1")),
        ]}));
        let got = deliveries(ev).unwrap();
        assert_eq!(got.rejected, vec!["a", "b"]);
        assert_eq!(got.deliveries.len(), 1);
    }

    #[test]
    fn a_record_without_a_message_id_fails_the_whole_event() {
        let ev = event(serde_json::json!({"Records": [
            record(Some("m1"), Some("1")),
            record(None, Some("1")),
        ]}));
        let err = deliveries(ev).unwrap_err();
        assert_eq!((err.index, err.len), (1, 2));
        assert!(err.to_string().contains("record 1 of 2"), "{err}");
    }

    #[test]
    fn response_lists_rejected_and_core_failures() {
        let r = batch_response(
            BatchResponse {
                failures: vec!["x".into()],
                ..BatchResponse::default()
            },
            vec!["y".into()],
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"batchItemFailures": [{"itemIdentifier": "y"}, {"itemIdentifier": "x"}]})
        );
    }
}
