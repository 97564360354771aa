//! SQS semantics on message pages: visibility timeout, receive counts,
//! redrive to a dead-letter queue after `max_receives`, batch limits.
//! Deliberately no more exact than SQS: a message is redelivered whenever its
//! visibility lapses, even while a worker is still on it.
//!
//! Storage: each send call's batch is one page. The `pages` row holds the
//! per-message state (visible_at and receive count per slot, or deleted) and
//! the page's earliest visible_at over its live messages, which the ready
//! index orders by; `page_bodies` holds the bodies, written once by the send
//! and removed with the page's last message. So a receive, a delete or a
//! visibility change of a whole batch rewrites one small row, not ten rows
//! and ten index entries.
//!
//! A message id is `page * 16 + slot` (page ids from AUTOINCREMENT, so never
//! reused), except for a message the redrive policy moved to the DLQ, which
//! keeps its id, stored beside its body. A receipt names the page, the slot
//! and the receive count, so only the latest receive's receipt acts.

use crate::db::{Db, DbError, Refusal};
use crate::port_err;
use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use settle_core::domain::now_millis;
use settle_core::message::MAX_BODY_BYTES;
use settle_core::ports::{Delivery, PortError, Queue, QueueDepth, MAX_QUEUE_BATCH, MAX_SEND_DELAY};
use std::collections::BTreeMap;
use std::time::Duration;

mod page;

use page::{
    decode_bodies, decode_slots, encode_bodies, encode_ids, encode_slots, message_ids,
    next_visible, Slot, DELETED, SLOTS,
};

/// SQS's longest visibility timeout: 12 hours.
const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);

/// A page whose state or bodies do not decode. A SQLite-level error, so
/// that it rolls back the group rather than commit a half-done write.
fn corrupt(page: i64) -> DbError {
    DbError::Sqlite(rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Blob,
        format!("message page {page} is corrupted").into(),
    ))
}

/// Inserts a page of `bodies` into `queue`, all visible at `visible_at` with
/// the given receive counts; `ids` keeps moved messages' ids.
fn insert_page(
    c: &Connection,
    queue: i64,
    slots: &[Slot],
    bodies: &[u8],
    ids: Option<&[u8]>,
) -> Result<i64, DbError> {
    let next = next_visible(slots).unwrap_or(0);
    c.prepare_cached("INSERT INTO pages (queue, next_visible_at, slots) VALUES (?1, ?2, ?3)")?
        .execute(params![queue, next, encode_slots(slots)])?;
    let page = c.last_insert_rowid();
    c.prepare_cached("INSERT INTO page_bodies (page, bodies, ids) VALUES (?1, ?2, ?3)")?
        .execute(params![page, bodies, ids])?;
    Ok(page)
}

/// Saves a page's changed slots: deletes the page once no slot is live.
fn save_page(c: &Connection, page: i64, old_next: i64, slots: &[Slot]) -> Result<(), DbError> {
    match next_visible(slots) {
        None => {
            c.prepare_cached("DELETE FROM pages WHERE id = ?1")?
                .execute(params![page])?;
            c.prepare_cached("DELETE FROM page_bodies WHERE page = ?1")?
                .execute(params![page])?;
        }
        Some(next) if next == old_next => {
            c.prepare_cached("UPDATE pages SET slots = ?2 WHERE id = ?1")?
                .execute(params![page, encode_slots(slots)])?;
        }
        Some(next) => {
            c.prepare_cached("UPDATE pages SET slots = ?2, next_visible_at = ?3 WHERE id = ?1")?
                .execute(params![page, encode_slots(slots), next])?;
        }
    }
    Ok(())
}

/// A page of `queue`: its next_visible_at and slots.
fn load_page(c: &Connection, queue: i64, page: i64) -> Result<Option<(i64, Vec<Slot>)>, DbError> {
    Ok(
        c.prepare_cached("SELECT next_visible_at, slots FROM pages WHERE id = ?1 AND queue = ?2")?
            .query_row(params![page, queue], |r| {
                Ok((r.get::<_, i64>(0)?, decode_slots(&r.get::<_, Vec<u8>>(1)?)))
            })
            .optional()?,
    )
}

/// A message a receive took, before it is named for the caller.
#[derive(Debug)]
struct Taken {
    page: i64,
    slot: usize,
    message: i64,
    body: String,
    receive_count: u32,
}

impl Taken {
    fn into_delivery(self) -> Delivery {
        // Built with itoa rather than format!: two strings per message
        // received, on the hot path of every receive.
        let mut n = itoa::Buffer::new();
        let message_id = ["m", n.format(self.message)].concat();
        let mut receipt = String::with_capacity(24);
        receipt.push_str(n.format(self.page));
        receipt.push(':');
        receipt.push_str(n.format(self.slot));
        receipt.push(':');
        receipt.push_str(n.format(self.receive_count));
        Delivery {
            message_id,
            receipt,
            body: self.body,
            receive_count: self.receive_count,
        }
    }
}

/// One named queue in the database.
#[derive(Debug, Clone)]
pub struct EmbeddedQueue {
    db: Db,
    id: i64,
    name: String,
}

impl EmbeddedQueue {
    /// Stores one page of `bodies` with their slots' state.
    async fn put<'a>(
        &self,
        bodies: impl ExactSizeIterator<Item = &'a str> + Clone,
        slots: Vec<Slot>,
    ) -> Result<(), PortError> {
        check_batch("send", bodies.len())?;
        let total: usize = bodies.clone().map(str::len).sum();
        if total > MAX_BODY_BYTES {
            return Err(PortError::Invalid(format!(
                "the batch's bodies are {total} bytes together; at most {MAX_BODY_BYTES}"
            )));
        }
        let id = self.id;
        let blob = encode_bodies(bodies);
        self.db
            .write(move |c| {
                insert_page(c, id, &slots, &blob, None)?;
                Ok(())
            })
            .await
            .map_err(port_err("SendMessageBatch"))
    }

    /// Opens the queue `name`, creating it if needed.
    pub(crate) async fn open(db: &Db, name: &str) -> Result<Self, DbError> {
        let owned = name.to_owned();
        // A read first: an existing queue needs no write lock (see db::schema_is_current).
        let found = db
            .read(move |c| {
                Ok(c.prepare_cached("SELECT id FROM queues WHERE name = ?1")?
                    .query_row(params![owned], |r| r.get(0))
                    .optional()?)
            })
            .await?;
        if let Some(id) = found {
            return Ok(Self {
                db: db.clone(),
                id,
                name: name.to_owned(),
            });
        }
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

/// A receipt: page, slot, and the receive count it was handed out at.
fn parse_receipt(receipt: &str) -> Result<(i64, usize, u32), PortError> {
    let invalid = || PortError::Invalid(format!("receipt handle {receipt:?} is not valid"));
    let mut parts = receipt.split(':');
    let (Some(page), Some(slot), Some(n), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid());
    };
    let slot: usize = slot.parse().map_err(|_| invalid())?;
    if slot as i64 >= SLOTS {
        return Err(invalid());
    }
    Ok((
        page.parse().map_err(|_| invalid())?,
        slot,
        n.parse().map_err(|_| invalid())?,
    ))
}

#[async_trait]
impl Queue for EmbeddedQueue {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&self, bodies: Vec<String>) -> Result<(), PortError> {
        let slots = vec![
            Slot {
                visible_at: 0,
                count: 0
            };
            bodies.len()
        ];
        self.put(bodies.iter().map(String::as_str), slots).await
    }

    async fn send_delayed(&self, messages: Vec<(String, Duration)>) -> Result<(), PortError> {
        if let Some((_, d)) = messages.iter().find(|(_, d)| *d > MAX_SEND_DELAY) {
            return Err(PortError::Invalid(format!(
                "a delay of {} s; a message is delayed by at most {} s",
                d.as_secs(),
                MAX_SEND_DELAY.as_secs()
            )));
        }
        let now = now_millis() as i64;
        let slots = messages
            .iter()
            .map(|(_, d)| Slot {
                visible_at: if d.is_zero() {
                    0
                } else {
                    now + d.as_millis() as i64
                },
                count: 0,
            })
            .collect();
        self.put(messages.iter().map(|(b, _)| b.as_str()), slots)
            .await
    }

    async fn receive(&self, max: usize, visibility: Duration) -> Result<Vec<Delivery>, PortError> {
        check_batch("receive", max)?;
        let visibility = visibility.min(MAX_VISIBILITY).as_millis() as i64;
        let id = self.id;
        let taken = self
            .db
            .write(move |c| {
                let now = now_millis() as i64;
                let (dlq, limit): (Option<i64>, Option<i64>) = c
                    .prepare_cached("SELECT dlq, max_receives FROM queues WHERE id = ?1")?
                    .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?)))?;
                // The redrive policy: a message received this often moves to the DLQ.
                let limit = dlq.and(limit);
                let mut out: Vec<Taken> = Vec::with_capacity(max);
                // Moved messages: id, receive count, body.
                let mut dead: Vec<(i64, u32, String)> = Vec::new();
                let mut pick = c.prepare_cached(
                    "SELECT id, next_visible_at, slots FROM pages \
                     WHERE queue = ?1 AND next_visible_at <= ?2 \
                     ORDER BY next_visible_at, id LIMIT ?3",
                )?;
                let mut bodies =
                    c.prepare_cached("SELECT bodies, ids FROM page_bodies WHERE page = ?1")?;
                while out.len() < max {
                    let want = max - out.len();
                    // Pages until they hold `want` due messages: a send's
                    // page holds up to ten, so one page is often enough,
                    // and reading the rest of `want` pages would be waste.
                    let mut found: Vec<(i64, i64, Vec<Slot>)> = Vec::new();
                    let mut due = 0;
                    let mut rows = pick.query(params![id, now, want as i64])?;
                    while due < want {
                        let Some(r) = rows.next()? else { break };
                        let blob = r.get_ref(2)?.as_blob().map_err(rusqlite::Error::from)?;
                        let slots = decode_slots(blob);
                        due += slots
                            .iter()
                            .filter(|s| s.live() && s.visible_at <= now)
                            .count();
                        found.push((r.get(0)?, r.get(1)?, slots));
                    }
                    drop(rows);
                    if found.is_empty() {
                        break;
                    }
                    for (page, old_next, mut slots) in found {
                        if out.len() >= max {
                            break;
                        }
                        let (mut taken, mut moved) = (Vec::new(), Vec::new());
                        for (i, s) in slots.iter_mut().enumerate() {
                            if !s.live() || s.visible_at > now {
                                continue;
                            }
                            if limit.is_some_and(|l| i64::from(s.count) >= l) {
                                moved.push(i);
                                s.visible_at = DELETED;
                                continue;
                            }
                            if out.len() + taken.len() >= max {
                                break;
                            }
                            s.count += 1;
                            // At least 1 ms: one receive call returns a message
                            // once, even with a visibility timeout of zero.
                            s.visible_at = now + visibility.max(1);
                            taken.push(i);
                        }
                        // A page due now has a due live slot; one that does
                        // not is corrupt, and would be picked forever.
                        if taken.is_empty() && moved.is_empty() {
                            return Err(corrupt(page));
                        }
                        let (blob, ids): (Vec<u8>, Option<Vec<u8>>) =
                            bodies.query_row(params![page], |r| Ok((r.get(0)?, r.get(1)?)))?;
                        let ids = ids.as_deref();
                        let taken_bodies =
                            decode_bodies(&blob, &taken).ok_or_else(|| corrupt(page))?;
                        let taken_ids = message_ids(page, ids, &taken);
                        for ((i, body), msg) in taken.iter().zip(taken_bodies).zip(taken_ids) {
                            out.push(Taken {
                                page,
                                slot: *i,
                                message: msg,
                                body,
                                receive_count: slots[*i].count,
                            });
                        }
                        if !moved.is_empty() {
                            let moved_bodies =
                                decode_bodies(&blob, &moved).ok_or_else(|| corrupt(page))?;
                            let moved_ids = message_ids(page, ids, &moved);
                            for ((i, body), msg) in moved.iter().zip(moved_bodies).zip(moved_ids) {
                                dead.push((msg, slots[*i].count, body));
                            }
                        }
                        save_page(c, page, old_next, &slots)?;
                    }
                }
                if let Some(dlq) = dlq.filter(|_| !dead.is_empty()) {
                    for chunk in dead.chunks(MAX_QUEUE_BATCH) {
                        let slots: Vec<Slot> = chunk
                            .iter()
                            .map(|(_, n, _)| Slot {
                                visible_at: 0,
                                count: *n,
                            })
                            .collect();
                        let blob = encode_bodies(chunk.iter().map(|(_, _, b)| b.as_str()));
                        let ids = encode_ids(chunk.iter().map(|(m, _, _)| *m));
                        insert_page(c, dlq, &slots, &blob, Some(&ids))?;
                    }
                }
                Ok(out)
            })
            .await
            .map_err(port_err("ReceiveMessage"))?;
        // Named here rather than inside the write: the writer thread is what
        // every caller waits on, and formatting is work any thread can do.
        Ok(taken.into_iter().map(Taken::into_delivery).collect())
    }

    async fn delete(&self, receipts: Vec<String>) -> Result<(), PortError> {
        check_batch("delete", receipts.len())?;
        let mut by_page: BTreeMap<i64, Vec<(usize, u32)>> = BTreeMap::new();
        for r in &receipts {
            let (page, slot, n) = parse_receipt(r)?;
            by_page.entry(page).or_default().push((slot, n));
        }
        let id = self.id;
        self.db
            .write(move |c| {
                for (page, receipts) in by_page {
                    let Some((old_next, mut slots)) = load_page(c, id, page)? else {
                        continue;
                    };
                    let mut changed = false;
                    for (slot, n) in receipts {
                        if let Some(s) = slots.get_mut(slot).filter(|s| s.live() && s.count == n) {
                            s.visible_at = DELETED;
                            changed = true;
                        }
                    }
                    if changed {
                        save_page(c, page, old_next, &slots)?;
                    }
                }
                Ok(())
            })
            .await
            .map_err(port_err("DeleteMessageBatch"))
    }

    async fn change_visibility(&self, receipt: &str, timeout: Duration) -> Result<(), PortError> {
        let (page, slot, n) = parse_receipt(receipt)?;
        let timeout = timeout.min(MAX_VISIBILITY).as_millis() as i64;
        let id = self.id;
        let receipt = receipt.to_owned();
        self.db
            .write(move |c| {
                let visible_at = now_millis() as i64 + timeout;
                let stale = |why: &'static str| {
                    Err(Refusal::StaleReceipt {
                        receipt: receipt.clone(),
                        why,
                    }
                    .into())
                };
                let Some((old_next, mut slots)) = load_page(c, id, page)? else {
                    return stale("the message is gone");
                };
                match slots.get_mut(slot).filter(|s| s.live()) {
                    None => return stale("the message is gone"),
                    Some(s) if s.count != n => {
                        return stale("the message was received again since")
                    }
                    Some(s) => s.visible_at = visible_at,
                }
                save_page(c, page, old_next, &slots)
            })
            .await
            .map_err(port_err("ChangeMessageVisibility"))
    }

    async fn depth(&self) -> Result<QueueDepth, PortError> {
        let id = self.id;
        self.db
            .read(move |c| {
                let now = now_millis() as i64;
                let mut depth = QueueDepth::default();
                let mut st = c.prepare_cached("SELECT slots FROM pages WHERE queue = ?1")?;
                let mut rows = st.query(params![id])?;
                while let Some(r) = rows.next()? {
                    let blob = r.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?;
                    for s in decode_slots(blob).iter().filter(|s| s.live()) {
                        if s.visible_at <= now {
                            depth.visible += 1;
                        } else {
                            depth.in_flight += 1;
                        }
                    }
                }
                Ok(depth)
            })
            .await
            .map_err(port_err("GetQueueAttributes"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use crate::Embedded;
    use settle_core::ports::Queue;
    use std::time::Duration;

    async fn open() -> Embedded {
        let dir = tempfile::tempdir().unwrap().keep();
        Embedded::open(&dir.join("settle.db")).await.unwrap()
    }

    #[tokio::test]
    async fn a_stale_receipt_neither_deletes_nor_changes_visibility() {
        let e = open().await;
        let q = &e.work;
        q.send(vec!["a".into(), "b".into()]).await.unwrap();
        let first = q.receive(1, Duration::ZERO).await.unwrap().pop().unwrap();
        // A zero visibility timeout means visible again a millisecond on.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let second = q.receive(1, Duration::from_secs(60)).await.unwrap();
        let second = second
            .into_iter()
            .find(|d| d.message_id == first.message_id);
        let second = match second {
            Some(d) => d,
            // The other message came first; take this one again.
            None => q.receive(10, Duration::from_secs(60)).await.unwrap()[0].clone(),
        };
        assert_eq!(second.message_id, first.message_id);
        assert_eq!(second.receive_count, 2);
        q.delete(vec![first.receipt.clone()]).await.unwrap();
        assert!(q
            .change_visibility(&first.receipt, Duration::ZERO)
            .await
            .is_err());
        assert_eq!(q.depth().await.unwrap().total(), 2, "nothing deleted");
        q.delete(vec![second.receipt.clone()]).await.unwrap();
        assert_eq!(q.depth().await.unwrap().total(), 1);
        assert!(q
            .change_visibility(&second.receipt, Duration::ZERO)
            .await
            .is_err());
        assert!(q.delete(vec!["1:99:1".into()]).await.is_err());
        assert!(q.delete(vec!["nonsense".into()]).await.is_err());
    }

    #[tokio::test]
    async fn message_ids_are_never_reused_and_survive_the_redrive() {
        let e = open().await;
        let q = &e.work;
        q.set_redrive(&e.dlq, 1).await.unwrap();
        q.send(vec!["x".into()]).await.unwrap();
        let x = q.receive(10, Duration::from_secs(60)).await.unwrap();
        q.delete(vec![x[0].receipt.clone()]).await.unwrap();
        assert_eq!(q.depth().await.unwrap().total(), 0);
        q.send(vec!["p".into(), "q".into()]).await.unwrap();
        let p = q.receive(1, Duration::ZERO).await.unwrap().pop().unwrap();
        assert_ne!(p.message_id, x[0].message_id, "a new page, a new id");
        // A zero visibility timeout means visible again a millisecond on.
        tokio::time::sleep(Duration::from_millis(5)).await;
        // p is at its limit: this receive moves it and delivers only q.
        let rest = q.receive(10, Duration::from_secs(60)).await.unwrap();
        assert_eq!(rest.len(), 1);
        assert_ne!(rest[0].message_id, p.message_id);
        let dead = e.dlq.receive(10, Duration::from_secs(60)).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].message_id.as_str(), dead[0].body.as_str()),
            (p.message_id.as_str(), p.body.as_str())
        );
        assert_eq!(dead[0].receive_count, 2, "the count goes on in the DLQ");
        // The old receipt acts on neither queue.
        q.delete(vec![p.receipt.clone()]).await.unwrap();
        e.dlq.delete(vec![p.receipt.clone()]).await.unwrap();
        assert_eq!(e.dlq.depth().await.unwrap().total(), 1);
        e.dlq.delete(vec![dead[0].receipt.clone()]).await.unwrap();
        assert_eq!(e.dlq.depth().await.unwrap().total(), 0);
    }
}
