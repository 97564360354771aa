//! [`Queue`] on SQS.

use crate::error::AwsError;
use crate::ConfigError;
use async_trait::async_trait;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageSystemAttributeName, QueueAttributeName, SendMessageBatchRequestEntry,
};
use aws_sdk_sqs::Client;
use settle_core::message::MAX_BODY_BYTES;
use settle_core::ports::{Delivery, PortError, Queue, QueueDepth, MAX_QUEUE_BATCH, MAX_SEND_DELAY};
use std::collections::HashSet;
use std::time::Duration;

/// SQS's longest visibility timeout: 12 hours.
const MAX_VISIBILITY_SECS: u64 = 12 * 3600;
/// Resends of the entries a SendMessageBatch or DeleteMessageBatch refused
/// one by one (the SDK retries whole calls, not entries).
const ENTRY_RETRIES: u32 = 3;

/// One SQS queue, by URL.
#[derive(Debug, Clone)]
pub struct SqsQueue {
    client: Client,
    url: String,
    name: String,
    receive_wait_secs: i32,
    metrics: Option<crate::Metrics>,
    /// Receives one at a time, on the emulator only (see
    /// [`SqsQueue::emulated`]).
    emulated: bool,
}

/// moto's ReceiveMessage is not safe to call concurrently on one queue:
/// two receives at once can fail with a 500 after one of them has marked
/// messages received, and the SDK's retry then receives others. Those
/// receives, which no caller ever saw, count towards the messages' receive
/// limit, which the queue enforces. One lock for every queue: the
/// emulator's receives are short.
fn emulator_receives() -> &'static tokio::sync::Mutex<()> {
    static LOCK: std::sync::OnceLock<tokio::sync::Mutex<()>> = std::sync::OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
}

impl SqsQueue {
    /// A queue on `client`, which counts its calls if it was built with the
    /// backend's interceptor (as [`crate::connect`] does).
    pub fn new(client: Client, url: &str) -> Self {
        let name = url.rsplit('/').next().unwrap_or(url).to_owned();
        Self {
            client,
            url: url.to_owned(),
            name,
            receive_wait_secs: 0,
            metrics: None,
            emulated: false,
        }
    }

    /// Serialises this process's receives, for the emulator (`SETTLE_EMULATOR_WRITE_LOCK=1`).
    pub fn emulated(mut self, emulated: bool) -> Self {
        self.emulated = emulated;
        self
    }

    /// Counts empty receives in `metrics` (the backend's call counters).
    pub fn with_metrics(mut self, metrics: crate::Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Long-polls each receive for up to `wait` (at most 20 s): fewer empty
    /// receives, each billed, for a poller that can wait. Default: no wait,
    /// as the port's callers poll in their own loops.
    pub fn with_receive_wait(mut self, wait: Duration) -> Self {
        self.receive_wait_secs = wait.as_secs().min(20) as i32;
        self
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

fn err<E>(op: &'static str, queue: &str, e: aws_sdk_sqs::error::SdkError<E>) -> PortError
where
    E: std::error::Error + aws_sdk_sqs::error::ProvideErrorMetadata + Send + Sync + 'static,
    aws_sdk_sqs::Error: From<aws_sdk_sqs::error::SdkError<E>>,
{
    PortError::backend(op, AwsError::sqs(format!("queue {queue}"), e))
}

/// SQS counts visibility in whole seconds; round up so a message is never
/// visible again sooner than asked.
fn whole_secs(d: Duration) -> i32 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.min(MAX_VISIBILITY_SECS) as i32
}

/// Reads the queue's RedrivePolicy maxReceiveCount.
pub(crate) async fn max_receive_count(client: &Client, url: &str) -> Result<u32, ConfigError> {
    let out = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::RedrivePolicy)
        .send()
        .await
        .map_err(|e| ConfigError::Aws {
            op: "SQS.GetQueueAttributes",
            target: url.to_owned(),
            source: Box::new(AwsError::sqs("", e)),
        })?;
    let no_policy = |reason: String| ConfigError::NoRedrivePolicy {
        queue: url.to_owned(),
        reason,
    };
    let policy = out
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::RedrivePolicy))
        .ok_or_else(|| no_policy("the queue has no RedrivePolicy attribute".into()))?;
    let json: serde_json::Value = serde_json::from_str(policy)
        .map_err(|e| no_policy(format!("RedrivePolicy {policy:?} is not JSON: {e}")))?;
    // SQS gives the count as a number, some emulators as a string.
    let count = match &json["maxReceiveCount"] {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    };
    count
        .and_then(|c| u32::try_from(c).ok())
        .filter(|c| *c > 0)
        .ok_or_else(|| {
            no_policy(format!(
                "RedrivePolicy {policy} has no valid maxReceiveCount"
            ))
        })
}

#[async_trait]
impl Queue for SqsQueue {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send_delayed(&self, bodies: Vec<(String, Duration)>) -> Result<(), PortError> {
        if bodies.len() > MAX_QUEUE_BATCH {
            return Err(PortError::Invalid(format!(
                "send to {}: {} messages; a batch holds at most {MAX_QUEUE_BATCH}",
                self.name,
                bodies.len()
            )));
        }
        let total: usize = bodies.iter().map(|(b, _)| b.len()).sum();
        if total > MAX_BODY_BYTES {
            return Err(PortError::Invalid(format!(
                "send to {}: {total} bytes in one batch; SQS takes at most {MAX_BODY_BYTES}",
                self.name
            )));
        }
        if let Some((_, d)) = bodies.iter().find(|(_, d)| *d > MAX_SEND_DELAY) {
            return Err(PortError::Invalid(format!(
                "send to {}: a delay of {} s; SQS delays a message by at most {} s",
                self.name,
                d.as_secs(),
                MAX_SEND_DELAY.as_secs()
            )));
        }
        let mut pending: Vec<(usize, (String, Duration))> =
            bodies.into_iter().enumerate().collect();
        let mut tries = 0;
        while !pending.is_empty() {
            let entries = pending
                .iter()
                .map(|(i, (body, delay))| {
                    // Whole seconds, rounded up: never received early.
                    let secs = whole_secs(*delay);
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(body.clone())
                        .set_delay_seconds((secs > 0).then_some(secs))
                        .build()
                        .map_err(|e| PortError::backend("SQS.SendMessageBatch", e))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let out = self
                .client
                .send_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| err("SQS.SendMessageBatch", &self.name, e))?;
            if out.failed().is_empty() {
                return Ok(());
            }
            let failed: HashSet<&str> = out.failed().iter().map(|f| f.id()).collect();
            let fatal: Vec<String> = out
                .failed()
                .iter()
                .filter(|f| f.sender_fault() || tries >= ENTRY_RETRIES)
                .map(|f| {
                    format!(
                        "entry {}: {} {}",
                        f.id(),
                        f.code(),
                        f.message().unwrap_or("")
                    )
                })
                .collect();
            if !fatal.is_empty() {
                return Err(PortError::backend(
                    "SQS.SendMessageBatch",
                    format!(
                        "queue {}: {} of the batch's messages were not sent: {}",
                        self.name,
                        failed.len(),
                        fatal.join("; ")
                    ),
                ));
            }
            // Only the refused entries go again; the others are stored.
            pending.retain(|(i, _)| failed.contains(i.to_string().as_str()));
            tries += 1;
            tokio::time::sleep(Duration::from_millis(50 << tries)).await;
        }
        Ok(())
    }

    async fn receive(&self, max: usize, visibility: Duration) -> Result<Vec<Delivery>, PortError> {
        if max > MAX_QUEUE_BATCH {
            return Err(PortError::Invalid(format!(
                "receive from {}: {max} messages; SQS returns at most {MAX_QUEUE_BATCH}",
                self.name
            )));
        }
        if max == 0 {
            return Ok(Vec::new());
        }
        let _one_at_a_time = match self.emulated {
            true => Some(emulator_receives().lock().await),
            false => None,
        };
        let out = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max as i32)
            .visibility_timeout(whole_secs(visibility))
            .wait_time_seconds(self.receive_wait_secs)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(|e| err("SQS.ReceiveMessage", &self.name, e))?;
        if out.messages().is_empty() {
            // Billed like any other; counted apart so a cost report can tell
            // per-item receives from a poller's idle ones.
            if let Some(m) = &self.metrics {
                m.count("SQS.ReceiveMessage (empty)");
            }
        }
        let mut seen = HashSet::new();
        let mut got = Vec::new();
        for m in out.messages() {
            let (Some(id), Some(receipt)) = (m.message_id(), m.receipt_handle()) else {
                return Err(PortError::backend(
                    "SQS.ReceiveMessage",
                    format!(
                        "queue {}: a message came without an id or receipt handle",
                        self.name
                    ),
                ));
            };
            // With a zero visibility timeout an emulator can hand out the
            // same message twice in one answer; SQS never does. Keep one.
            if !seen.insert(id.to_owned()) {
                continue;
            }
            let receive_count = m
                .attributes()
                .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| {
                    PortError::backend(
                        "SQS.ReceiveMessage",
                        format!(
                            "queue {}: message {id} came without ApproximateReceiveCount",
                            self.name
                        ),
                    )
                })?;
            got.push(Delivery {
                message_id: id.to_owned(),
                receipt: receipt.to_owned(),
                body: m.body().unwrap_or_default().to_owned(),
                receive_count,
            });
        }
        Ok(got)
    }

    async fn delete(&self, receipts: Vec<String>) -> Result<(), PortError> {
        if receipts.len() > MAX_QUEUE_BATCH {
            return Err(PortError::Invalid(format!(
                "delete from {}: {} receipts; a batch holds at most {MAX_QUEUE_BATCH}",
                self.name,
                receipts.len()
            )));
        }
        let mut pending: Vec<(usize, String)> = receipts.into_iter().enumerate().collect();
        let mut tries = 0;
        while !pending.is_empty() {
            let entries = pending
                .iter()
                .map(|(i, r)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .build()
                        .map_err(|e| PortError::backend("SQS.DeleteMessageBatch", e))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let out = self
                .client
                .delete_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| err("SQS.DeleteMessageBatch", &self.name, e))?;
            // A stale or spent receipt is not an error: the port lets such a
            // delete leave the message, or find it already gone.
            let failed: Vec<_> = out
                .failed()
                .iter()
                .filter(|f| f.code() != "ReceiptHandleIsInvalid")
                .collect();
            if failed.is_empty() {
                return Ok(());
            }
            if tries >= ENTRY_RETRIES || failed.iter().any(|f| f.sender_fault()) {
                let what: Vec<String> = failed
                    .iter()
                    .map(|f| {
                        format!(
                            "entry {}: {} {}",
                            f.id(),
                            f.code(),
                            f.message().unwrap_or("")
                        )
                    })
                    .collect();
                return Err(PortError::backend(
                    "SQS.DeleteMessageBatch",
                    format!("queue {}: {}", self.name, what.join("; ")),
                ));
            }
            let again: HashSet<&str> = failed.iter().map(|f| f.id()).collect();
            pending.retain(|(i, _)| again.contains(i.to_string().as_str()));
            tries += 1;
            tokio::time::sleep(Duration::from_millis(50 << tries)).await;
        }
        Ok(())
    }

    async fn change_visibility(&self, receipt: &str, timeout: Duration) -> Result<(), PortError> {
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .visibility_timeout(whole_secs(timeout))
            .send()
            .await
            .map_err(|e| err("SQS.ChangeMessageVisibility", &self.name, e))?;
        Ok(())
    }

    async fn change_visibility_batch(
        &self,
        receipts: Vec<String>,
        timeout: Duration,
    ) -> Result<(), PortError> {
        if receipts.len() > MAX_QUEUE_BATCH {
            return Err(PortError::Invalid(format!(
                "change visibility in {}: {} messages; a batch holds at most {MAX_QUEUE_BATCH}",
                self.name,
                receipts.len()
            )));
        }
        if receipts.is_empty() {
            return Ok(());
        }
        let entries = receipts
            .iter()
            .enumerate()
            .map(|(i, r)| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(r)
                    .visibility_timeout(whole_secs(timeout))
                    .build()
                    .map_err(|e| PortError::backend("SQS.ChangeMessageVisibilityBatch", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Entries that failed (a receipt a newer receive replaced, a
        // message deleted meanwhile) are skipped, as the port says.
        self.client
            .change_message_visibility_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| err("SQS.ChangeMessageVisibilityBatch", &self.name, e))?;
        Ok(())
    }

    async fn depth(&self) -> Result<QueueDepth, PortError> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(|e| err("SQS.GetQueueAttributes", &self.name, e))?;
        let get = |name: QueueAttributeName| -> u64 {
            out.attributes()
                .and_then(|a| a.get(&name))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok(QueueDepth {
            visible: get(QueueAttributeName::ApproximateNumberOfMessages)
                + get(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
            in_flight: get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visibility_rounds_up_to_whole_seconds() {
        assert_eq!(whole_secs(Duration::ZERO), 0);
        assert_eq!(whole_secs(Duration::from_millis(1)), 1);
        assert_eq!(whole_secs(Duration::from_millis(1000)), 1);
        assert_eq!(whole_secs(Duration::from_millis(1001)), 2);
        assert_eq!(whole_secs(Duration::from_secs(100_000)), 43_200);
    }
}
