//! [`Source`] on DynamoDB, designed so that no step writes once per item
//! except the load itself, and that one packs items into block rows.
//!
//! - A load writes its items in block rows (up to [`BLOCK_MAX_ITEMS`] items
//!   or [`BLOCK_MAX_BYTES`] each) under its own load id, unpublished, then
//!   publishes them with one transaction: the global sequence range
//!   `published+1 ..= published+n` is mapped to the load (a segment row) and
//!   `published` moves up. A load that fails publishes nothing and deletes
//!   its blocks, best effort; unpublished blocks are never read.
//! - Loads take turns: a lease on the meta row, so that "already pending"
//!   is decided against a set that no other load changes meanwhile.
//! - Pending = `published - head`. A claim is one transaction that moves
//!   `head` forward conditionally, adds the count to the run's `total`, and
//!   records the claimed range in a claim row of the run.
//! - `claimed` reads the run's claim rows, maps sequence numbers to
//!   segments and block rows, and reads those with Query (never a Scan).
//!
//! See `docs/aws.md` for the rows and their costs.

use crate::ddb::{
    corrupt, get_bool, get_n, get_s, n, random_suffix, s, sdk_err, tx_failure, Row, Tables,
    TxFailure,
};
use crate::ledger::{new_run_row, run_key};
use async_trait::async_trait;
use aws_sdk_dynamodb::types::{
    AttributeValue, DeleteRequest, Put, PutRequest, ReturnConsumedCapacity, TransactWriteItem,
    Update, WriteRequest,
};
use futures::future::{BoxFuture, FutureExt};
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::value::RawValue;
use settle_core::domain::{now_millis, Item, ItemId, RunId, RunRecord};
use settle_core::ports::{LineError, LoadError, LoadInput, PortError, Source};
use std::collections::hash_map::{DefaultHasher, Entry};
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Items per block row at most.
pub const BLOCK_MAX_ITEMS: u64 = 100;
/// Encoded bytes per block row at most (one larger item gets a block alone).
/// Writes are billed per KB, so packing small items is what saves.
pub const BLOCK_MAX_BYTES: usize = 16 * 1024;
/// Items per block partition: a load's blocks spread over partitions of
/// this many items, so a big load is not one hot partition. Blocks never
/// cross a partition boundary.
pub const SHARD_ITEMS: u64 = 4096;
/// BatchWriteItem's limit.
const BATCH_WRITE: usize = 25;
/// BatchWriteItem calls in flight during a load.
const WRITE_CONCURRENCY: usize = 8;
/// How long a load's lease on the meta row lasts without renewal, and how
/// often it is renewed. A crashed load blocks others for at most the lease.
const LOAD_LEASE: Duration = Duration::from_secs(60);
const LEASE_RENEW: Duration = Duration::from_secs(15);
/// How long a load waits for another load's lease.
const LOAD_LOCK_WAIT: Duration = Duration::from_secs(90);
/// Optimistic retries of a claim that lost a race.
const CLAIM_RETRIES: u32 = 100;

const META_PK: &str = "META";
const SEG_PK: &str = "SEG";

fn key(pk: impl Into<String>, sk: u64) -> HashMap<String, AttributeValue> {
    HashMap::from([("pk".to_owned(), s(pk)), ("sk".to_owned(), n(sk))])
}

fn meta_key() -> HashMap<String, AttributeValue> {
    key(META_PK, 0)
}

fn block_pk(load: &str, index: u64) -> String {
    format!("B#{load}#{}", index / SHARD_ITEMS)
}

fn claims_pk(run: &RunId) -> String {
    format!("C#{run}")
}

fn id_hash(id: &str) -> u64 {
    let mut h = DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// A published load's place in the global sequence: `lo ..= hi`, item
/// index `i` of the load is sequence number `lo + i`.
#[derive(Debug, Clone)]
struct Segment {
    lo: u64,
    hi: u64,
    load: String,
}

/// One item as stored in a block row: id, line in its file, payload.
type Stored = (String, u64, Box<RawValue>);

/// The item source of one items table (and the run rows of the ledger
/// table, whose `total` a claim moves).
#[derive(Debug, Clone)]
pub struct DynamoSource {
    t: Tables,
    /// Segments never change once published: cached by `hi`.
    segments: Arc<Mutex<BTreeMap<u64, Segment>>>,
}

struct Meta {
    head: u64,
    published: u64,
}

impl DynamoSource {
    pub(crate) fn new(t: Tables) -> Self {
        Self {
            t,
            segments: Arc::default(),
        }
    }

    async fn meta(&self, op: &'static str) -> Result<Meta, PortError> {
        let out = self
            .t
            .client
            .get_item()
            .table_name(&self.t.items)
            .set_key(Some(meta_key()))
            .consistent_read(true)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| sdk_err(op, &self.t.items, e))?;
        self.t.capacity("DynamoDB.GetItem", out.consumed_capacity());
        let row = out.item();
        Ok(Meta {
            head: row.and_then(|r| get_n(r, "head")).unwrap_or(0),
            published: row.and_then(|r| get_n(r, "published")).unwrap_or(0),
        })
    }

    /// The segment holding sequence number `g`.
    async fn segment(&self, g: u64) -> Result<Segment, PortError> {
        let cached = {
            let segs = self.segments.lock().unwrap_or_else(PoisonError::into_inner);
            segs.range(g..).next().map(|(_, seg)| seg.clone())
        };
        if let Some(seg) = cached.filter(|seg| seg.lo <= g) {
            return Ok(seg);
        }
        let op = "DynamoDB.Query";
        let out = self
            .t
            .client
            .query()
            .table_name(&self.t.items)
            .key_condition_expression("pk = :p AND sk >= :g")
            .expression_attribute_values(":p", s(SEG_PK))
            .expression_attribute_values(":g", n(g))
            .limit(16)
            .consistent_read(true)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| sdk_err(op, &self.t.items, e))?;
        self.t.capacity(op, out.consumed_capacity());
        let mut segs = self.segments.lock().unwrap_or_else(PoisonError::into_inner);
        for row in out.items() {
            let seg = Segment {
                hi: get_n(row, "sk").ok_or_else(|| corrupt(op, "segment row", "sk"))?,
                lo: get_n(row, "lo").ok_or_else(|| corrupt(op, "segment row", "lo"))?,
                load: get_s(row, "load")
                    .ok_or_else(|| corrupt(op, "segment row", "load"))?
                    .to_owned(),
            };
            segs.insert(seg.hi, seg);
        }
        segs.range(g..)
            .next()
            .map(|(_, seg)| seg.clone())
            .filter(|seg| seg.lo <= g)
            .ok_or_else(|| {
                PortError::backend(
                    op,
                    format!(
                        "table {}: no segment row holds sequence number {g}",
                        self.t.items
                    ),
                )
            })
    }

    /// Items `lo ..= hi` (indexes within `load`), at most `limit`, in order.
    async fn read_load(
        &self,
        load: &str,
        lo: u64,
        hi: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Stored)>, PortError> {
        let op = "DynamoDB.Query";
        let mut out = Vec::new();
        let mut shard_start = lo - lo % SHARD_ITEMS;
        while shard_start <= hi && out.len() < limit {
            let shard_end = shard_start + SHARD_ITEMS - 1;
            // A block holding `lo` starts at most BLOCK_MAX_ITEMS - 1 before it.
            let from = lo.saturating_sub(BLOCK_MAX_ITEMS - 1).max(shard_start);
            let to = hi.min(shard_end);
            let mut start = None;
            loop {
                let page = self
                    .t
                    .client
                    .query()
                    .table_name(&self.t.items)
                    .key_condition_expression("pk = :p AND sk BETWEEN :a AND :b")
                    .expression_attribute_values(":p", s(block_pk(load, shard_start)))
                    .expression_attribute_values(":a", n(from))
                    .expression_attribute_values(":b", n(to))
                    // Blocks were written before their publish: a strong
                    // read is sure to see them.
                    .consistent_read(true)
                    .set_exclusive_start_key(start)
                    .return_consumed_capacity(ReturnConsumedCapacity::Total)
                    .send()
                    .await
                    .map_err(|e| sdk_err(op, &self.t.items, e))?;
                self.t.capacity(op, page.consumed_capacity());
                for row in page.items() {
                    let what = format!("block row {}", get_s(row, "pk").unwrap_or("?"));
                    let first = get_n(row, "sk").ok_or_else(|| corrupt(op, &what, "sk"))?;
                    let items: Vec<Stored> = get_s(row, "d")
                        .and_then(|d| serde_json::from_str(d).ok())
                        .ok_or_else(|| corrupt(op, &what, "d"))?;
                    for (k, it) in items.into_iter().enumerate() {
                        let i = first + k as u64;
                        if i >= lo && i <= hi && out.len() < limit {
                            out.push((i, it));
                        }
                    }
                }
                start = page.last_evaluated_key().cloned();
                if start.is_none() || out.len() >= limit {
                    break;
                }
            }
            shard_start += SHARD_ITEMS;
        }
        Ok(out)
    }

    /// Published items with sequence numbers `lo ..= hi`, at most `limit`.
    async fn read_seq(
        &self,
        lo: u64,
        hi: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Stored)>, PortError> {
        let mut out = Vec::new();
        let mut g = lo;
        while g <= hi && out.len() < limit {
            let seg = self.segment(g).await?;
            let end = hi.min(seg.hi);
            let got = self
                .read_load(&seg.load, g - seg.lo, end - seg.lo, limit - out.len())
                .await?;
            out.extend(got.into_iter().map(|(i, it)| (seg.lo + i, it)));
            g = end + 1;
        }
        Ok(out)
    }

    async fn lease(&self, load: &str, first: bool) -> Result<bool, PortError> {
        let now = now_millis();
        let until = now + LOAD_LEASE.as_millis() as u64;
        let cond = if first {
            "attribute_not_exists(lock_owner) OR lock_until < :now"
        } else {
            "lock_owner = :me"
        };
        let t = &self.t;
        let mut u = t
            .client
            .update_item()
            .table_name(&t.items)
            .set_key(Some(meta_key()))
            .update_expression("SET lock_owner = :me, lock_until = :until")
            .condition_expression(cond)
            .expression_attribute_values(":me", s(load))
            .expression_attribute_values(":until", n(until));
        if first {
            u = u.expression_attribute_values(":now", n(now));
        }
        t.update(&t.items, u).await
    }

    async fn release(&self, load: &str) {
        let t = &self.t;
        let req = t
            .client
            .update_item()
            .table_name(&t.items)
            .set_key(Some(meta_key()))
            .update_expression("REMOVE lock_owner, lock_until")
            .condition_expression("lock_owner = :me")
            .expression_attribute_values(":me", s(load));
        // A failed condition means the lease was no longer ours: nothing to release.
        if let Err(e) = t.update(&t.items, req).await {
            tracing::warn!(load, error = %e, "could not release the load lease; it expires by itself");
        }
    }

    /// Loads `items` as one load, under the lease the caller holds: each
    /// item is checked against the pending ones ([`Self::refuse_pending`])
    /// and the load's own ([`refuse_repeat`]), written into block rows
    /// ([`BlockWriter`]), and the lease renewed as it goes
    /// ([`LeaseRenewal`]); then the whole load is published at once. The
    /// keys of the rows written go to `written`, for the caller to delete
    /// should the load fail.
    async fn load_locked(
        &self,
        load: &str,
        items: LoadInput,
        run: Option<&RunRecord>,
        written: &mut Vec<HashMap<String, AttributeValue>>,
    ) -> Result<u64, LoadError> {
        let meta = self.meta("load").await?;
        let pending = self.pending_ids(&meta).await?;
        let mut seen = SeenIds::default();
        let mut blocks = BlockWriter::new(self, load, written);
        let mut lease = LeaseRenewal::new();
        for entry in items {
            let (line, item) = entry?;
            let h = id_hash(item.id.as_str());
            self.refuse_pending(&pending, item.id.as_str(), h, line)
                .await?;
            refuse_repeat(&mut seen, &mut blocks, item.id.as_str(), h, line).await?;
            blocks.push(line, item).await?;
            lease.renew_if_due(self, load).await?;
        }
        let count = blocks.finish().await?;
        if count == 0 {
            return Ok(0);
        }
        self.publish(load, meta.published, count, run).await?;
        Ok(count)
    }

    /// The ids of every pending item (`head+1 ..= published`), read once
    /// at the start of a load: the lease keeps other loads from adding to
    /// them meanwhile.
    async fn pending_ids(&self, meta: &Meta) -> Result<PendingIds, PortError> {
        let mut pending = PendingIds::default();
        let mut g = meta.head + 1;
        while g <= meta.published {
            let page = self.read_seq(g, meta.published, 10_000).await?;
            let Some((last, _)) = page.last() else { break };
            g = last + 1;
            for (seq, (id, _, _)) in page {
                if pending.by_hash.insert(id_hash(&id), seq).is_some() {
                    pending.exact.insert(id, seq);
                }
            }
        }
        Ok(pending)
    }

    /// Refuses `id` (hash `h`, on `line`) if it is already pending from an
    /// earlier load. A hash match whose id is not kept aside is read back,
    /// so that a collision never refuses a new id.
    async fn refuse_pending(
        &self,
        pending: &PendingIds,
        id: &str,
        h: u64,
        line: u64,
    ) -> Result<(), LoadError> {
        let earlier = match pending.by_hash.get(&h) {
            Some(&seq) if pending.exact.contains_key(id) => Some(seq),
            Some(&seq) => {
                let got = self.read_seq(seq, seq, 1).await?;
                got.first()
                    .filter(|(_, (other, _, _))| other == id)
                    .map(|(g, _)| *g)
            }
            None => None,
        };
        match earlier {
            Some(_) => Err(LineError {
                line,
                reason: format!(
                    "id {id:?} is already pending from an earlier load; dispatch them first (settle dispatch), or remove this line"
                ),
            }
            .into()),
            None => Ok(()),
        }
    }

    fn block_row(&self, load: &str, first: u64, block: &[Stored]) -> Result<Row, PortError> {
        let d = serde_json::to_string(block).map_err(|e| PortError::backend("load", e))?;
        let mut row = key(block_pk(load, first), first);
        row.insert("d".into(), s(d));
        Ok(row)
    }

    /// Maps `published+1 ..= published+n` to the load and releases the lease,
    /// in one transaction: the load's items become pending all at once.
    /// With `run`, the same transaction creates the run and claims every
    /// pending item for it (see [`Source::load_run`]); a claim by another
    /// run that moves the head meanwhile makes it read the head again.
    async fn publish(
        &self,
        load: &str,
        published: u64,
        count: u64,
        run: Option<&RunRecord>,
    ) -> Result<(), PortError> {
        let op = "DynamoDB.TransactWriteItems";
        let hi = published + count;
        let mut head = match run {
            Some(_) => Some(self.meta(op).await?.head),
            None => None,
        };
        let mut tries = 0;
        loop {
            let mut actions = vec![self.publish_meta(load, published, hi, head)?];
            let mut seg = key(SEG_PK, hi);
            seg.insert("lo".into(), n(published + 1));
            seg.insert("load".into(), s(load));
            let seg = Put::builder()
                .table_name(&self.t.items)
                .set_item(Some(seg))
                .condition_expression("attribute_not_exists(pk)")
                .build()
                .map_err(|e| PortError::backend(op, e))?;
            actions.push(TransactWriteItem::builder().put(seg).build());
            if let (Some(run), Some(head)) = (run, head) {
                actions.extend(self.claim_all(run, head, hi)?);
            }
            let guard = self.t.exclusive().await;
            let res = self
                .t
                .client
                .transact_write_items()
                .set_transact_items(Some(actions))
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await;
            drop(guard);
            let reasons = match res {
                Ok(out) => {
                    self.t.capacity(op, out.consumed_capacity());
                    return Ok(());
                }
                Err(e) => match tx_failure(&self.t.items, e) {
                    TxFailure::Cancelled(reasons) => reasons,
                    TxFailure::Other(e) => return Err(e),
                },
            };
            // Another run's claim may have moved the head; anything else
            // (the lease lost, the run's id taken) will not change by retrying.
            let Some(used) = head else {
                return Err(lost_lease(load));
            };
            let now = self.meta(op).await?.head;
            if now == used || tries >= CLAIM_RETRIES {
                return Err(match run {
                    Some(run) if now == used => PortError::backend(
                        op,
                        format!(
                            "load {load} could not create run {} (cancelled: {reasons:?}); \
                             nothing was published",
                            run.id
                        ),
                    ),
                    _ => lost_lease(load),
                });
            }
            tries += 1;
            head = Some(now);
        }
    }

    /// The meta row's update of a publish: `published` moves to `hi` and
    /// the lease is released; with `head`, the head moves to `hi` as well
    /// (everything pending is claimed), on condition that it is still `head`.
    fn publish_meta(
        &self,
        load: &str,
        published: u64,
        hi: u64,
        head: Option<u64>,
    ) -> Result<TransactWriteItem, PortError> {
        let mut update = Update::builder()
            .table_name(&self.t.items)
            .set_key(Some(meta_key()))
            .expression_attribute_names("#pub", "published")
            .expression_attribute_values(":hi", n(hi))
            .expression_attribute_values(":me", s(load))
            .expression_attribute_values(":old", n(published));
        let published_cond = "lock_owner = :me AND (attribute_not_exists(#pub) OR #pub = :old)";
        update = match head {
            None => update
                .update_expression("SET #pub = :hi REMOVE lock_owner, lock_until")
                .condition_expression(published_cond),
            Some(head) => update
                .update_expression("SET #pub = :hi, #hd = :hi REMOVE lock_owner, lock_until")
                .condition_expression(format!(
                    "{published_cond} AND ({})",
                    if head == 0 {
                        "attribute_not_exists(#hd) OR #hd = :head"
                    } else {
                        "#hd = :head"
                    }
                ))
                .expression_attribute_names("#hd", "head")
                .expression_attribute_values(":head", n(head)),
        };
        let update = update
            .build()
            .map_err(|e| PortError::backend("DynamoDB.TransactWriteItems", e))?;
        Ok(TransactWriteItem::builder().update(update).build())
    }

    /// The new run's row, with `head+1 ..= hi` claimed and its claims over,
    /// and the claim row of that range.
    fn claim_all(
        &self,
        run: &RunRecord,
        head: u64,
        hi: u64,
    ) -> Result<[TransactWriteItem; 2], PortError> {
        let op = "DynamoDB.TransactWriteItems";
        let mut row = new_run_row(run)?;
        row.insert("total".into(), n(hi - head));
        row.insert("claim_bound".into(), n(hi));
        let row = Put::builder()
            .table_name(&self.t.ledger)
            .set_item(Some(row))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(|e| PortError::backend(op, e))?;
        let mut range = key(claims_pk(&run.id), hi);
        range.insert("lo".into(), n(head + 1));
        let range = Put::builder()
            .table_name(&self.t.items)
            .set_item(Some(range))
            .build()
            .map_err(|e| PortError::backend(op, e))?;
        Ok([
            TransactWriteItem::builder().put(row).build(),
            TransactWriteItem::builder().put(range).build(),
        ])
    }

    /// Best effort: the blocks of a load that will never be published.
    async fn clean_up(&self, load: &str, keys: Vec<HashMap<String, AttributeValue>>) {
        for chunk in keys.chunks(BATCH_WRITE) {
            let requests = chunk
                .iter()
                .filter_map(|k| {
                    DeleteRequest::builder()
                        .set_key(Some(k.clone()))
                        .build()
                        .ok()
                        .map(|d| WriteRequest::builder().delete_request(d).build())
                })
                .collect();
            if let Err(e) = send_batch_write(&self.t, requests).await {
                tracing::warn!(load, error = %e, "could not delete the blocks of a failed load; \
                    they are never read, and take space only");
                return;
            }
        }
    }

    async fn run_row(&self, op: &'static str, run: &RunId) -> Result<Row, PortError> {
        let out = self
            .t
            .client
            .get_item()
            .table_name(&self.t.ledger)
            .set_key(Some(run_key(run)))
            .consistent_read(true)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| sdk_err(op, &self.t.ledger, e))?;
        self.t.capacity("DynamoDB.GetItem", out.consumed_capacity());
        out.item
            .ok_or_else(|| PortError::NotFound(format!("run {run}")))
    }
}

/// The ids pending from earlier loads, by hash; the full id is kept aside
/// only when its hash repeats, so that the check stays exact.
#[derive(Default)]
struct PendingIds {
    by_hash: HashMap<u64, u64>,
    exact: HashMap<String, u64>,
}

/// The ids of this load so far: index by hash, and (index, line) by full
/// id for the ids whose hash repeated.
#[derive(Default)]
struct SeenIds {
    by_hash: HashMap<u64, u64>,
    exact: HashMap<String, (u64, u64)>,
}

/// Refuses `id` (hash `h`, on `line`) if this load had it before, naming
/// the earlier line; otherwise records it at the next index of `blocks`.
/// A hash match is confirmed against the earlier item itself, read from
/// the open block or back from the table ([`BlockWriter::item_at`]).
async fn refuse_repeat(
    seen: &mut SeenIds,
    blocks: &mut BlockWriter<'_>,
    id: &str,
    h: u64,
    line: u64,
) -> Result<(), LoadError> {
    let first_line = if let Some(&(_, l)) = seen.exact.get(id) {
        Some(l)
    } else if let Some(&prev) = seen.by_hash.get(&h) {
        blocks
            .item_at(prev)
            .await?
            .filter(|(i, _)| i == id)
            .map(|(_, l)| l)
    } else {
        None
    };
    if let Some(first) = first_line {
        return Err(LineError {
            line,
            reason: format!("duplicate id {id:?} (first on line {first})"),
        }
        .into());
    }
    match seen.by_hash.entry(h) {
        Entry::Occupied(_) => {
            seen.exact.insert(id.to_owned(), (blocks.index, line));
        }
        Entry::Vacant(v) => {
            v.insert(blocks.index);
        }
    }
    Ok(())
}

/// A load's items on their way into block rows: the open block, the
/// closed blocks' rows not yet sent, and the BatchWriteItem calls in
/// flight (at most [`WRITE_CONCURRENCY`]).
struct BlockWriter<'a> {
    source: &'a DynamoSource,
    load: &'a str,
    /// The keys of every row sent, for the caller's clean-up.
    written: &'a mut Vec<HashMap<String, AttributeValue>>,
    block: Vec<Stored>,
    /// The load index of the open block's first item.
    block_first: u64,
    block_bytes: usize,
    rows: Vec<Row>,
    inflight: FuturesUnordered<BoxFuture<'static, Result<(), PortError>>>,
    /// Items taken so far: the next item's index in the load.
    index: u64,
}

impl<'a> BlockWriter<'a> {
    fn new(
        source: &'a DynamoSource,
        load: &'a str,
        written: &'a mut Vec<HashMap<String, AttributeValue>>,
    ) -> Self {
        Self {
            source,
            load,
            written,
            block: Vec::new(),
            block_first: 0,
            block_bytes: 0,
            rows: Vec::new(),
            inflight: FuturesUnordered::new(),
            index: 0,
        }
    }

    /// Adds an item to the open block, first closing the block if the item
    /// would overfill it or starts a new partition ([`SHARD_ITEMS`]); sends
    /// the closed rows by [`BATCH_WRITE`], waiting while too many calls are
    /// in flight.
    async fn push(&mut self, line: u64, item: Item) -> Result<(), PortError> {
        let size = item.id.as_str().len() + item.payload.get().len() + 32;
        if !self.block.is_empty()
            && (self.block.len() as u64 == BLOCK_MAX_ITEMS
                || self.block_bytes + size > BLOCK_MAX_BYTES
                || self.index.is_multiple_of(SHARD_ITEMS))
        {
            self.close_block()?;
        }
        if self.block.is_empty() {
            self.block_first = self.index;
        }
        self.block.push((item.id.into(), line, item.payload));
        self.block_bytes += size;
        self.index += 1;
        if self.rows.len() >= BATCH_WRITE {
            self.send_rows();
            while self.inflight.len() >= WRITE_CONCURRENCY {
                if let Some(r) = self.inflight.next().await {
                    r?;
                }
            }
        }
        Ok(())
    }

    /// Turns the open block into a row waiting to be sent.
    fn close_block(&mut self) -> Result<(), PortError> {
        let row = self
            .source
            .block_row(self.load, self.block_first, &self.block)?;
        self.rows.push(row);
        self.block.clear();
        self.block_bytes = 0;
        Ok(())
    }

    /// Sends the waiting rows as one BatchWriteItem (at most [`BATCH_WRITE`]).
    fn send_rows(&mut self) {
        if self.rows.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.rows);
        self.written.extend(batch.iter().map(row_key));
        self.inflight
            .push(write_rows(self.source.t.clone(), batch).boxed());
    }

    /// Waits for every write in flight.
    async fn drain(&mut self) -> Result<(), PortError> {
        while let Some(r) = self.inflight.next().await {
            r?;
        }
        Ok(())
    }

    /// The id and line of the item at load index `index`: from the open
    /// block, or else read back from its row once every write has landed.
    async fn item_at(&mut self, index: u64) -> Result<Option<(String, u64)>, PortError> {
        if index >= self.block_first {
            return Ok(self
                .block
                .get((index - self.block_first) as usize)
                .map(|(i, l, _)| (i.clone(), *l)));
        }
        self.send_rows();
        self.drain().await?;
        Ok(self
            .source
            .read_load(self.load, index, index, 1)
            .await?
            .into_iter()
            .next()
            .map(|(_, (i, l, _))| (i, l)))
    }

    /// Closes the last block, sends every row and waits for them all.
    /// Returns the number of items written.
    async fn finish(mut self) -> Result<u64, PortError> {
        if !self.block.is_empty() {
            self.close_block()?;
        }
        let rows = std::mem::take(&mut self.rows);
        self.written.extend(rows.iter().map(row_key));
        for batch in rows.chunks(BATCH_WRITE) {
            self.inflight
                .push(write_rows(self.source.t.clone(), batch.to_vec()).boxed());
        }
        self.drain().await?;
        Ok(self.index)
    }
}

/// Renews a load's lease on the meta row every [`LEASE_RENEW`] while the
/// load runs; a lease found taken ends the load before it publishes.
struct LeaseRenewal {
    renewed: Instant,
}

impl LeaseRenewal {
    fn new() -> Self {
        Self {
            renewed: Instant::now(),
        }
    }

    async fn renew_if_due(&mut self, source: &DynamoSource, load: &str) -> Result<(), PortError> {
        if self.renewed.elapsed() >= LEASE_RENEW {
            if !source.lease(load, false).await? {
                return Err(lost_lease(load));
            }
            self.renewed = Instant::now();
        }
        Ok(())
    }
}

/// A row's key, to delete it if its load fails.
fn row_key(row: &Row) -> HashMap<String, AttributeValue> {
    row.iter()
        .filter(|(k, _)| *k == "pk" || *k == "sk")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn lost_lease(load: &str) -> PortError {
    PortError::backend(
        "load",
        format!("load {load} lost its lease on the items table (it ran {}s without renewing); nothing was published",
            LOAD_LEASE.as_secs()),
    )
}

async fn write_rows(t: Tables, rows: Vec<Row>) -> Result<(), PortError> {
    let requests = rows
        .into_iter()
        .map(|r| {
            PutRequest::builder()
                .set_item(Some(r))
                .build()
                .map(|p| WriteRequest::builder().put_request(p).build())
                .map_err(|e| PortError::backend("DynamoDB.BatchWriteItem", e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    send_batch_write(&t, requests).await
}

/// One BatchWriteItem, resending what it left unprocessed (throttling inside
/// a successful call, which the SDK's retries do not cover).
async fn send_batch_write(t: &Tables, mut requests: Vec<WriteRequest>) -> Result<(), PortError> {
    let op = "DynamoDB.BatchWriteItem";
    let mut tries = 0u32;
    while !requests.is_empty() {
        let guard = t.shared().await;
        let out = t
            .client
            .batch_write_item()
            .request_items(&t.items, requests)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| sdk_err(op, &t.items, e))?;
        drop(guard);
        t.capacity(op, out.consumed_capacity());
        requests = out
            .unprocessed_items()
            .and_then(|u| u.get(&t.items))
            .cloned()
            .unwrap_or_default();
        if !requests.is_empty() {
            tries += 1;
            if tries > 10 {
                return Err(PortError::backend(
                    op,
                    format!(
                        "table {}: {} writes still unprocessed after {tries} tries",
                        t.items,
                        requests.len()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20 << tries.min(8))).await;
        }
    }
    Ok(())
}

#[async_trait]
impl Source for DynamoSource {
    async fn load(&self, items: LoadInput) -> Result<u64, LoadError> {
        self.load_as(items, None).await
    }

    async fn load_run(&self, run: &RunRecord, items: LoadInput) -> Result<u64, LoadError> {
        self.load_as(items, Some(run)).await
    }

    async fn pending(&self) -> Result<u64, PortError> {
        let m = self.meta("DynamoDB.GetItem").await?;
        Ok(m.published.saturating_sub(m.head))
    }

    async fn claim(&self, run: &RunId, limit: usize) -> Result<u64, PortError> {
        let op = "DynamoDB.TransactWriteItems";
        let mut tries = 0;
        loop {
            let meta = self.meta(op).await?;
            let row = self.run_row(op, run).await?;
            if get_bool(&row, "dispatched") != Some(false) {
                return Err(PortError::Invalid(format!(
                    "run {run} has finished dispatching"
                )));
            }
            // A run claims only what was published before its first claim.
            let bound = get_n(&row, "claim_bound").unwrap_or(meta.published);
            let hi = bound.min(meta.head + limit as u64);
            if hi <= meta.head {
                if get_n(&row, "claim_bound").is_none() {
                    self.set_bound(run, bound).await?;
                }
                return Ok(0);
            }
            let count = hi - meta.head;
            let head_cond = if meta.head == 0 {
                "attribute_not_exists(#hd) OR #hd = :head"
            } else {
                "#hd = :head"
            };
            let meta_update = Update::builder()
                .table_name(&self.t.items)
                .set_key(Some(meta_key()))
                .update_expression("SET #hd = :hi")
                .condition_expression(head_cond)
                .expression_attribute_names("#hd", "head")
                .expression_attribute_values(":hi", n(hi))
                .expression_attribute_values(":head", n(meta.head))
                .build()
                .map_err(|e| PortError::backend(op, e))?;
            let run_update = Update::builder()
                .table_name(&self.t.ledger)
                .set_key(Some(run_key(run)))
                .update_expression("SET claim_bound = if_not_exists(claim_bound, :b) ADD #tot :n")
                .condition_expression(
                    "attribute_exists(pk) AND #dis = :f \
                     AND (attribute_not_exists(claim_bound) OR claim_bound = :b)",
                )
                // Reserved words in DynamoDB expressions.
                .expression_attribute_names("#tot", "total")
                .expression_attribute_names("#dis", "dispatched")
                .expression_attribute_values(":b", n(bound))
                .expression_attribute_values(":n", n(count))
                .expression_attribute_values(":f", AttributeValue::Bool(false))
                .build()
                .map_err(|e| PortError::backend(op, e))?;
            let mut range = key(claims_pk(run), hi);
            range.insert("lo".into(), n(meta.head + 1));
            let range = Put::builder()
                .table_name(&self.t.items)
                .set_item(Some(range))
                .build()
                .map_err(|e| PortError::backend(op, e))?;
            let guard = self.t.exclusive().await;
            let res = self
                .t
                .client
                .transact_write_items()
                .transact_items(TransactWriteItem::builder().update(meta_update).build())
                .transact_items(TransactWriteItem::builder().update(run_update).build())
                .transact_items(TransactWriteItem::builder().put(range).build())
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await;
            drop(guard);
            match res {
                Ok(out) => {
                    self.t.capacity(op, out.consumed_capacity());
                    return Ok(count);
                }
                Err(e) => match tx_failure(&self.t.items, e) {
                    // Another claim moved the head, or the run changed: read again.
                    TxFailure::Cancelled(_) if tries < CLAIM_RETRIES => {
                        tries += 1;
                        let ms = fastrand::u64(1..=(5 << tries.min(6)));
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    TxFailure::Cancelled(reasons) => {
                        return Err(PortError::backend(
                            op,
                            format!("claim for run {run} lost the race {tries} times in a row (last: {reasons:?})"),
                        ))
                    }
                    TxFailure::Other(e) => return Err(e),
                },
            }
        }
    }

    async fn claimed(
        &self,
        run: &RunId,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Item>, Option<String>), PortError> {
        let op = "DynamoDB.Query";
        let after: u64 = match cursor {
            None => 0,
            Some(c) => c.parse().map_err(|_| {
                PortError::Invalid(format!("cursor {c:?} is not an AWS source cursor"))
            })?,
        };
        let mut items = Vec::new();
        let mut last = after;
        let mut start = None;
        'pages: loop {
            // Claim rows are keyed by their range's end: those past the cursor.
            let page = self
                .t
                .client
                .query()
                .table_name(&self.t.items)
                .key_condition_expression("pk = :p AND sk > :after")
                .expression_attribute_values(":p", s(claims_pk(run)))
                .expression_attribute_values(":after", n(after))
                .consistent_read(true)
                .limit(16)
                .set_exclusive_start_key(start)
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(|e| sdk_err(op, &self.t.items, e))?;
            self.t.capacity(op, page.consumed_capacity());
            for row in page.items() {
                let hi = get_n(row, "sk").ok_or_else(|| corrupt(op, "claim row", "sk"))?;
                let lo = get_n(row, "lo").ok_or_else(|| corrupt(op, "claim row", "lo"))?;
                let got = self
                    .read_seq(lo.max(after + 1), hi, limit - items.len())
                    .await?;
                for (g, (id, _, payload)) in got {
                    let id = ItemId::new(id).map_err(|_| corrupt(op, "block row", "d"))?;
                    items.push(Item::new(id, payload));
                    last = g;
                }
                if items.len() >= limit {
                    break 'pages;
                }
            }
            start = page.last_evaluated_key().cloned();
            if start.is_none() {
                break;
            }
        }
        let next = (last > 0).then(|| last.to_string());
        Ok((items, next))
    }
}

impl DynamoSource {
    /// A load under the lease; with `run`, published into that new run.
    async fn load_as(&self, items: LoadInput, run: Option<&RunRecord>) -> Result<u64, LoadError> {
        let load = format!("l{}-{}", now_millis(), random_suffix());
        let waited = Instant::now();
        let mut tries = 0u32;
        while !self.lease(&load, true).await? {
            if waited.elapsed() >= LOAD_LOCK_WAIT {
                return Err(PortError::backend(
                    "load",
                    format!(
                        "table {}: another load holds the load lease; waited {}s",
                        self.t.items,
                        LOAD_LOCK_WAIT.as_secs()
                    ),
                )
                .into());
            }
            tries += 1;
            tokio::time::sleep(Duration::from_millis(50 << tries.min(5))).await;
        }
        let mut written = Vec::new();
        let res = self.load_locked(&load, items, run, &mut written).await;
        if res.is_err() || matches!(res, Ok(0)) {
            self.release(&load).await;
            self.clean_up(&load, written).await;
        }
        res
    }

    async fn set_bound(&self, run: &RunId, bound: u64) -> Result<(), PortError> {
        let t = &self.t;
        let req = t
            .client
            .update_item()
            .table_name(&t.ledger)
            .set_key(Some(run_key(run)))
            .update_expression("SET claim_bound = if_not_exists(claim_bound, :b)")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":b", n(bound));
        match t.update(&t.ledger, req).await? {
            true => Ok(()),
            false => Err(PortError::NotFound(format!("run {run}"))),
        }
    }
}
