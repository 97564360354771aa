//! SQS semantics on the `messages` table: visibility timeout, receive
//! counts, redrive to a dead-letter queue after `max_receives`, batch limits.
//! Deliberately no more exact than SQS: a message is redelivered whenever its
//! visibility lapses, even while a worker is still on it.

use crate::db::{Db, DbError};
use crate::port_err;
use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};
use settle_core::domain::now_millis;
use settle_core::message::MAX_BODY_BYTES;
use settle_core::ports::{Delivery, PortError, Queue, QueueDepth, MAX_QUEUE_BATCH};
use std::time::Duration;

/// SQS's longest visibility timeout: 12 hours.
const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);

/// One named queue in the database.
#[derive(Debug, Clone)]
pub struct EmbeddedQueue {
    db: Db,
    id: i64,
    name: String,
}

impl EmbeddedQueue {
    /// Opens the queue `name`, creating it if needed.
    pub(crate) async fn open(db: &Db, name: &str) -> Result<Self, DbError> {
        let owned = name.to_owned();
        let id = db
            .write(move |c| {
                c.execute(
                    "INSERT OR IGNORE INTO queues (name) VALUES (?1)",
                    params![owned],
                )?;
                Ok(c.query_row(
                    "SELECT id FROM queues WHERE name = ?1",
                    params![owned],
                    |r| r.get(0),
                )?)
            })
            .await?;
        Ok(Self {
            db: db.clone(),
            id,
            name: name.to_owned(),
        })
    }

    /// Sets the redrive policy: after `max_receives` receives a message moves
    /// to `dlq` instead of being delivered again.
    pub async fn set_redrive(
        &self,
        dlq: &EmbeddedQueue,
        max_receives: u32,
    ) -> Result<(), PortError> {
        let (id, dlq) = (self.id, dlq.id);
        self.db
            .write(move |c| {
                c.execute(
                    "UPDATE queues SET dlq = ?2, max_receives = ?3 WHERE id = ?1",
                    params![id, dlq, max_receives],
                )?;
                Ok(())
            })
            .await
            .map_err(port_err("SetQueueAttributes"))
    }

    /// The redrive policy's receive limit, if any.
    pub async fn max_receives(&self) -> Result<Option<u32>, PortError> {
        let id = self.id;
        self.db
            .read(move |c| {
                Ok(c.query_row(
                    "SELECT max_receives FROM queues WHERE id = ?1",
                    params![id],
                    |r| r.get(0),
                )?)
            })
            .await
            .map_err(port_err("GetQueueAttributes"))
    }
}

fn check_batch(op: &str, n: usize) -> Result<(), PortError> {
    if n == 0 || n > MAX_QUEUE_BATCH {
        Err(PortError::Invalid(format!(
            "{op} takes 1 to {MAX_QUEUE_BATCH} entries, got {n}"
        )))
    } else {
        Ok(())
    }
}

/// `?from, ?from+1, …` for `n` parameters.
fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn parse_receipt(receipt: &str) -> Result<(i64, i64), PortError> {
    receipt
        .split_once(':')
        .and_then(|(id, n)| Some((id.parse().ok()?, n.parse().ok()?)))
        .ok_or_else(|| PortError::Invalid(format!("receipt handle {receipt:?} is not valid")))
}

#[async_trait]
impl Queue for EmbeddedQueue {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&self, bodies: Vec<String>) -> Result<(), PortError> {
        check_batch("send", bodies.len())?;
        let total: usize = bodies.iter().map(String::len).sum();
        if total > MAX_BODY_BYTES {
            return Err(PortError::Invalid(format!(
                "the batch's bodies are {total} bytes together; at most {MAX_BODY_BYTES}"
            )));
        }
        let id = self.id;
        self.db
            .write(move |c| {
                // One statement per call, not per message: statement overhead
                // dominates SQLite's cost at these row sizes.
                let values = (0..bodies.len())
                    .map(|i| format!("(?1, 0, 0, ?{})", i + 2))
                    .collect::<Vec<_>>()
                    .join(", ");
                let mut st = c.prepare_cached(&format!(
                    "INSERT INTO messages (queue, visible_at, receive_count, body) VALUES {values}"
                ))?;
                st.raw_bind_parameter(1, id)?;
                for (i, b) in bodies.iter().enumerate() {
                    st.raw_bind_parameter(i + 2, b)?;
                }
                st.raw_execute()?;
                Ok(())
            })
            .await
            .map_err(port_err("SendMessageBatch"))
    }

    async fn receive(&self, max: usize, visibility: Duration) -> Result<Vec<Delivery>, PortError> {
        check_batch("receive", max)?;
        let visibility = visibility.min(MAX_VISIBILITY).as_millis() as i64;
        let id = self.id;
        self.db
            .write(move |c| {
                let now = now_millis() as i64;
                let (dlq, limit): (Option<i64>, Option<i64>) = c
                    .prepare_cached("SELECT dlq, max_receives FROM queues WHERE id = ?1")?
                    .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?)))?;
                let mut out = Vec::with_capacity(max);
                let mut pick = c.prepare_cached(
                    "SELECT id, receive_count FROM messages WHERE queue = ?1 AND visible_at <= ?2 \
                     ORDER BY visible_at, id LIMIT ?3",
                )?;
                loop {
                    let want = max - out.len();
                    let found: Vec<(i64, i64)> = pick
                        .query_map(params![id, now, want as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<Result<_, _>>()?;
                    // The redrive policy: past the limit, to the DLQ instead.
                    let (dead, live): (Vec<_>, Vec<_>) = found.iter().partition(|(_, n)| {
                        matches!((dlq, limit), (Some(_), Some(limit)) if *n >= limit)
                    });
                    if let (Some(dlq), false) = (dlq, dead.is_empty()) {
                        let mut st = c.prepare_cached(&format!(
                            "UPDATE messages SET queue = ?1, visible_at = 0 WHERE id IN ({})",
                            placeholders(2, dead.len())
                        ))?;
                        st.raw_bind_parameter(1, dlq)?;
                        for (i, (msg, _)) in dead.iter().enumerate() {
                            st.raw_bind_parameter(i + 2, msg)?;
                        }
                        st.raw_execute()?;
                    }
                    if !live.is_empty() {
                        let mut st = c.prepare_cached(&format!(
                            "UPDATE messages SET visible_at = ?1, receive_count = receive_count + 1 \
                             WHERE id IN ({}) RETURNING id, receive_count, body",
                            placeholders(2, live.len())
                        ))?;
                        st.raw_bind_parameter(1, now + visibility)?;
                        for (i, (msg, _)) in live.iter().enumerate() {
                            st.raw_bind_parameter(i + 2, msg)?;
                        }
                        let mut rows = st.raw_query();
                        while let Some(r) = rows.next()? {
                            let (msg, n, body): (i64, i64, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
                            out.push(Delivery {
                                message_id: format!("m{msg}"),
                                receipt: format!("{msg}:{n}"),
                                body,
                                receive_count: n as u32,
                            });
                        }
                    }
                    if dead.is_empty() || out.len() >= max || found.len() < want {
                        break;
                    }
                }
                Ok(out)
            })
            .await
            .map_err(port_err("ReceiveMessage"))
    }

    async fn delete(&self, receipts: Vec<String>) -> Result<(), PortError> {
        check_batch("delete", receipts.len())?;
        let parsed = receipts
            .iter()
            .map(|r| parse_receipt(r))
            .collect::<Result<Vec<_>, _>>()?;
        let id = self.id;
        self.db
            .write(move |c| {
                let mut st = c.prepare_cached(
                    "DELETE FROM messages WHERE id = ?1 AND receive_count = ?2 AND queue = ?3",
                )?;
                for (msg, n) in parsed {
                    st.execute(params![msg, n, id])?;
                }
                Ok(())
            })
            .await
            .map_err(port_err("DeleteMessageBatch"))
    }

    async fn change_visibility(&self, receipt: &str, timeout: Duration) -> Result<(), PortError> {
        let (msg, n) = parse_receipt(receipt)?;
        let timeout = timeout.min(MAX_VISIBILITY).as_millis() as i64;
        let id = self.id;
        self.db
            .write(move |c| {
                let visible_at = now_millis() as i64 + timeout;
                let changed = c
                    .prepare_cached(
                        "UPDATE messages SET visible_at = ?4 \
                         WHERE id = ?1 AND receive_count = ?2 AND queue = ?3",
                    )?
                    .execute(params![msg, n, id, visible_at])?;
                if changed == 0 {
                    let exists: Option<i64> = c
                        .query_row("SELECT id FROM messages WHERE id = ?1", params![msg], |r| {
                            r.get(0)
                        })
                        .optional()?;
                    let why = if exists.is_some() {
                        "the message was received again since"
                    } else {
                        "the message is gone"
                    };
                    return Err(DbError::Refused(
                        format!("receipt {msg}:{n} is stale: {why}").into(),
                    ));
                }
                Ok(())
            })
            .await
            .map_err(port_err("ChangeMessageVisibility"))
    }

    async fn depth(&self) -> Result<QueueDepth, PortError> {
        let id = self.id;
        self.db
            .read(move |c| {
                let now = now_millis() as i64;
                let (visible, all): (i64, i64) = c
                    .prepare_cached(
                        "SELECT count(*) FILTER (WHERE visible_at <= ?2), count(*) \
                         FROM messages WHERE queue = ?1",
                    )?
                    .query_row(params![id, now], |r| Ok((r.get(0)?, r.get(1)?)))?;
                Ok(QueueDepth {
                    visible: visible as u64,
                    in_flight: (all - visible) as u64,
                })
            })
            .await
            .map_err(port_err("GetQueueAttributes"))
    }
}
