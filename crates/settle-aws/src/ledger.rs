//! [`Ledger`] on DynamoDB: run rows in one partition sorted by run id (which
//! sorts by time), one row per item of a run, and a sparse index of failed
//! rows. See `docs/aws.md`.

use crate::ddb::{
    corrupt, get_bool, get_i, get_n, get_s, is_condition_failed, n, s, sdk_err, tx_failure, Row,
    Tables, TxFailure,
};
use crate::segments::{locate, rank, Segment};
use async_trait::async_trait;
use aws_sdk_dynamodb::types::{
    AttributeValue, KeysAndAttributes, Put, ReturnConsumedCapacity, TransactWriteItem, Update,
};
use aws_smithy_types::Blob;
use settle_core::domain::{
    ItemId, ItemRecord, ItemStatus, RedriveScope, RunId, RunRecord, TallyDelta,
};
use settle_core::ports::{ItemPut, Ledger, LedgerBatch, PortError, Versioned, MAX_COMMIT_ACTIONS};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

/// Partition key of every run row: `runs(limit)` is one Query, newest first.
pub(crate) const RUNS_PK: &str = "RUN";
/// The sparse global secondary index over failed item rows: partition
/// `frun` (the run id, set only while the row is failed), sort `sk` (item id).
pub const FAILED_INDEX: &str = "failed";
/// BatchGetItem's limit on keys per call.
const BATCH_GET: usize = 100;
/// Item rows written at once by one commit.
const PUT_CONCURRENCY: usize = 16;
/// Lost races on a segment before the commit reports a conflict (the
/// reducer then re-reads and retries the whole batch).
const MAX_SEGMENT_RACES: u32 = 16;

/// The partition of a run's item rows.
pub(crate) fn items_pk(run: &RunId) -> String {
    format!("I#{run}")
}

/// The row of one status segment of a run (see `segments.rs`): a partition
/// of its own, so segments of one run spread over the table's partitions.
fn segment_key(run: &RunId, segment: u64) -> Row {
    HashMap::from([
        ("pk".to_owned(), s(format!("S#{run}#{segment}"))),
        ("sk".to_owned(), s("S")),
    ])
}

pub(crate) fn run_key(run: &RunId) -> HashMap<String, AttributeValue> {
    HashMap::from([
        ("pk".to_owned(), s(RUNS_PK)),
        ("sk".to_owned(), s(run.as_str())),
    ])
}

/// The run rows and item rows of one ledger table.
#[derive(Debug, Clone)]
pub struct DynamoLedger {
    t: Tables,
}

impl DynamoLedger {
    pub(crate) fn new(t: Tables) -> Self {
        Self { t }
    }

    /// Reads rows by key, 100 a call, asking again for any the service
    /// left unprocessed (throttling inside a successful call, which the
    /// SDK does not retry). Rows that do not exist are simply absent.
    async fn batch_get(&self, keys: Vec<Row>, consistent: bool) -> Result<Vec<Row>, PortError> {
        let op = "DynamoDB.BatchGetItem";
        let mut unique = HashSet::new();
        // BatchGetItem refuses a key twice in one call.
        let keys: Vec<Row> = keys
            .into_iter()
            .filter(|k| unique.insert(format!("{:?}/{:?}", k.get("pk"), k.get("sk"))))
            .collect();
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(BATCH_GET) {
            let mut request = Some(
                KeysAndAttributes::builder()
                    .set_keys(Some(chunk.to_vec()))
                    .consistent_read(consistent)
                    .build()
                    .map_err(|e| PortError::backend(op, e))?,
            );
            let mut tries = 0u32;
            while let Some(req) = request.take() {
                let res = self
                    .t
                    .client
                    .batch_get_item()
                    .request_items(&self.t.ledger, req)
                    .return_consumed_capacity(ReturnConsumedCapacity::Total)
                    .send()
                    .await
                    .map_err(|e| sdk_err(op, &self.t.ledger, e))?;
                self.t.capacity(op, res.consumed_capacity());
                if let Some(rows) = res.responses().and_then(|r| r.get(&self.t.ledger)) {
                    out.extend(rows.iter().cloned());
                }
                request = res
                    .unprocessed_keys()
                    .and_then(|u| u.get(&self.t.ledger))
                    .filter(|k| !k.keys().is_empty())
                    .cloned();
                if request.is_some() {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20 << tries.min(8))).await;
                }
            }
        }
        Ok(out)
    }

    /// Sets one attribute of an existing run's row; `NotFound` if there is no such run.
    async fn set_run_attribute(
        &self,
        id: &RunId,
        name: &str,
        value: AttributeValue,
    ) -> Result<(), PortError> {
        let t = &self.t;
        let set = t
            .update(
                &t.ledger,
                t.client
                    .update_item()
                    .table_name(&t.ledger)
                    .set_key(Some(run_key(id)))
                    .update_expression("SET #a = :v")
                    .condition_expression("attribute_exists(pk)")
                    .expression_attribute_names("#a", name)
                    .expression_attribute_values(":v", value),
            )
            .await?;
        if set {
            Ok(())
        } else {
            Err(PortError::NotFound(format!("run {id}")))
        }
    }

    /// Moves a run's flow counts by `d`: one UpdateItem, and one more,
    /// conditional, when a wait ends later than the one recorded.
    async fn move_flow(&self, run: &RunId, d: &TallyDelta) -> Result<(), PortError> {
        let t = &self.t;
        if d.throttled != 0 || d.waiting != 0 {
            t.update(
                &t.ledger,
                t.client
                    .update_item()
                    .table_name(&t.ledger)
                    .set_key(Some(run_key(run)))
                    .update_expression("ADD throttled :t, waiting :w")
                    .condition_expression("attribute_exists(pk)")
                    .expression_attribute_values(":t", n(d.throttled))
                    .expression_attribute_values(":w", n(d.waiting)),
            )
            .await?;
        }
        if let Some(until) = d.waiting_until {
            // A later wait wins; an earlier one leaves the row as it is.
            t.update(
                &t.ledger,
                t.client
                    .update_item()
                    .table_name(&t.ledger)
                    .set_key(Some(run_key(run)))
                    .update_expression("SET waiting_until = :u")
                    .condition_expression(
                        "attribute_exists(pk) AND (attribute_not_exists(waiting_until) OR waiting_until < :u)",
                    )
                    .expression_attribute_values(":u", n(until)),
            )
            .await?;
        }
        Ok(())
    }

    /// Raises the puts' items to their new statuses in the run's segments
    /// and moves the run tallies by what rose, in one transaction
    /// conditional on the segments read; a lost race re-reads and tries
    /// again. See `segments.rs`.
    async fn raise_statuses(&self, puts: &[ItemPut]) -> Result<(), PortError> {
        let op = "DynamoDB.TransactWriteItems";
        let mut slots: BTreeMap<(&RunId, u64), Vec<(usize, u8)>> = BTreeMap::new();
        for p in puts {
            let (segment, slot) = locate(p.seq);
            slots
                .entry((&p.run, segment))
                .or_default()
                .push((slot, rank(p.record.status)));
        }
        let mut tries = 0u32;
        loop {
            // A first read may be stale (half the price); after a lost race, read strongly.
            let rows = self
                .batch_get(
                    slots
                        .keys()
                        .map(|(run, seg)| segment_key(run, *seg))
                        .collect(),
                    tries > 0,
                )
                .await?;
            let mut stored: HashMap<(String, String), (u64, Segment)> = HashMap::new();
            for row in rows {
                let pk = get_s(&row, "pk").unwrap_or("?").to_owned();
                let what = format!("segment row {pk}");
                let bits = row
                    .get("b")
                    .and_then(|b| b.as_b().ok())
                    .and_then(|b| Segment::from_bytes(b.as_ref()))
                    .ok_or_else(|| corrupt(op, &what, "b"))?;
                let v = get_n(&row, "v").ok_or_else(|| corrupt(op, &what, "v"))?;
                let sk = get_s(&row, "sk").unwrap_or("?").to_owned();
                stored.insert((pk, sk), (v, bits));
            }
            let mut actions = Vec::new();
            let mut tallies: BTreeMap<&RunId, TallyDelta> = BTreeMap::new();
            for ((run, seg), wanted) in &slots {
                let key = segment_key(run, *seg);
                let id = (
                    get_s(&key, "pk").unwrap_or_default().to_owned(),
                    get_s(&key, "sk").unwrap_or_default().to_owned(),
                );
                let (version, mut bits) = stored
                    .remove(&id)
                    .map_or((None, Segment::default()), |(v, b)| (Some(v), b));
                let mut delta = TallyDelta::default();
                for &(slot, r) in wanted {
                    delta.add(bits.raise(slot, r));
                }
                if delta.is_zero() {
                    continue;
                }
                tallies.entry(run).or_default().add(delta);
                let mut row = key;
                row.insert("v".into(), n(version.map_or(1, |v| v + 1)));
                row.insert("b".into(), AttributeValue::B(Blob::new(bits.as_bytes())));
                let put = Put::builder()
                    .table_name(&self.t.ledger)
                    .set_item(Some(row));
                let put = match version {
                    None => put.condition_expression("attribute_not_exists(pk)"),
                    Some(v) => put
                        .condition_expression("v = :v")
                        .expression_attribute_values(":v", n(v)),
                };
                actions.push(
                    TransactWriteItem::builder()
                        .put(put.build().map_err(|e| PortError::backend(op, e))?)
                        .build(),
                );
            }
            if actions.is_empty() {
                // Every status was counted already: a replay.
                return Ok(());
            }
            let segments = actions.len();
            let runs: Vec<&RunId> = tallies.keys().copied().collect();
            for (run, d) in &tallies {
                let update = Update::builder()
                    .table_name(&self.t.ledger)
                    .set_key(Some(run_key(run)))
                    .update_expression("ADD #su :s, #fl :f")
                    .condition_expression("attribute_exists(pk)")
                    // Both are DynamoDB reserved words.
                    .expression_attribute_names("#su", "succeeded")
                    .expression_attribute_names("#fl", "failed")
                    .expression_attribute_values(":s", n(d.succeeded))
                    .expression_attribute_values(":f", n(d.failed))
                    .build()
                    .map_err(|e| PortError::backend(op, e))?;
                actions.push(TransactWriteItem::builder().update(update).build());
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
            match res {
                Ok(out) => {
                    self.t.capacity(op, out.consumed_capacity());
                    return Ok(());
                }
                Err(e) => match tx_failure(&self.t.ledger, e) {
                    TxFailure::Cancelled(reasons) => {
                        // A run row whose condition failed is a missing run, not a lost race.
                        if let Some((i, _)) = reasons
                            .iter()
                            .enumerate()
                            .skip(segments)
                            .find(|(_, c)| *c == "ConditionalCheckFailed")
                        {
                            return Err(PortError::NotFound(format!("run {}", runs[i - segments])));
                        }
                        tries += 1;
                        if tries > MAX_SEGMENT_RACES {
                            return Err(PortError::Conflict);
                        }
                        let ms = fastrand::u64(1..=(5 << tries.min(6)));
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    TxFailure::Other(e) => return Err(e),
                },
            }
        }
    }

    /// Writes one item row if its version still is the one read; `Ok(false)` if not.
    async fn put_item_row(&self, p: &ItemPut) -> Result<bool, PortError> {
        let op = "DynamoDB.PutItem";
        let rec = p.record.encode();
        let mut row = HashMap::from([
            ("pk".to_owned(), s(items_pk(&p.run))),
            ("sk".to_owned(), s(p.item.as_str())),
            ("v".to_owned(), n(p.expected.map_or(1, |v| v + 1))),
            ("seq".to_owned(), n(p.seq)),
            ("st".to_owned(), s(p.record.status.as_str())),
            ("rec".to_owned(), s(rec)),
        ]);
        // Only failed rows carry the index key: the index stays sparse,
        // and a row leaving `failed` leaves the index with this write.
        if p.record.status == ItemStatus::Failed {
            row.insert("frun".into(), s(p.run.as_str()));
        }
        let req = self
            .t
            .client
            .put_item()
            .table_name(&self.t.ledger)
            .set_item(Some(row))
            .return_consumed_capacity(ReturnConsumedCapacity::Total);
        let req = match p.expected {
            None => req.condition_expression("attribute_not_exists(pk)"),
            Some(v) => req
                .condition_expression("v = :v")
                .expression_attribute_values(":v", n(v)),
        };
        let guard = self.t.shared().await;
        let res = req.send().await;
        drop(guard);
        match res {
            Ok(out) => {
                self.t.capacity(op, out.consumed_capacity());
                Ok(true)
            }
            Err(e) if is_condition_failed(&e) => {
                tracing::debug!(run = %p.run, item = %p.item, expected = ?p.expected,
                    "item row changed since it was read");
                Ok(false)
            }
            Err(e) => Err(sdk_err(op, &self.t.ledger, e)),
        }
    }

    async fn get_run(&self, op: &'static str, id: &RunId) -> Result<Option<RunRecord>, PortError> {
        let out = self
            .t
            .client
            .get_item()
            .table_name(&self.t.ledger)
            .set_key(Some(run_key(id)))
            .consistent_read(true)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| sdk_err(op, &self.t.ledger, e))?;
        self.t.capacity("DynamoDB.GetItem", out.consumed_capacity());
        out.item().map(|row| run_from_row(op, row)).transpose()
    }
}

fn run_from_row(op: &'static str, row: &Row) -> Result<RunRecord, PortError> {
    let sk = get_s(row, "sk").unwrap_or("?");
    let what = format!("run row {sk}");
    let id = RunId::parse(sk).map_err(|_| corrupt(op, &what, "sk"))?;
    let num = |f: &str| get_n(row, f).ok_or_else(|| corrupt(op, &what, f));
    let config = get_s(row, "config")
        .and_then(|c| serde_json::from_str(c).ok())
        .ok_or_else(|| corrupt(op, &what, "config"))?;
    Ok(RunRecord {
        id,
        created_at: num("created_at")?,
        config,
        total: num("total")?,
        enqueued: num("enqueued")?,
        cursor: get_s(row, "cursor").map(str::to_owned),
        dispatched: get_bool(row, "dispatched").ok_or_else(|| corrupt(op, &what, "dispatched"))?,
        // Tallies move with ADD and may briefly read negative in no state we
        // write; clamp rather than fail a read.
        succeeded: get_i(row, "succeeded")
            .ok_or_else(|| corrupt(op, &what, "succeeded"))?
            .max(0) as u64,
        failed: get_i(row, "failed")
            .ok_or_else(|| corrupt(op, &what, "failed"))?
            .max(0) as u64,
        settled_at: get_n(row, "settled_at"),
        redriving: get_bool(row, "redriving").unwrap_or(false),
        // A scope this build cannot read (a selector of a newer build) is
        // refused rather than half read: the redrive would move other items.
        throttled: get_i(row, "throttled").unwrap_or(0).max(0) as u64,
        waiting: get_i(row, "waiting").unwrap_or(0).max(0) as u64,
        waiting_until: get_n(row, "waiting_until"),
        // Only shown, never acted on: one that does not read is left out.
        flow: get_s(row, "flow").and_then(|s| serde_json::from_str(s).ok()),
        redrive: match get_s(row, "redrive") {
            Some(scope) => {
                Some(RedriveScope::decode(scope).map_err(|_| corrupt(op, &what, "redrive"))?)
            }
            None => None,
        },
    })
}

fn record_from_row(
    op: &'static str,
    row: &Row,
) -> Result<(ItemId, Versioned<ItemRecord>), PortError> {
    let what = format!(
        "item row {}/{}",
        get_s(row, "pk").unwrap_or("?"),
        get_s(row, "sk").unwrap_or("?")
    );
    let id = get_s(row, "sk")
        .and_then(|v| ItemId::new(v).ok())
        .ok_or_else(|| corrupt(op, &what, "sk"))?;
    let value = get_s(row, "rec")
        .and_then(|r| serde_json::from_str(r).ok())
        .ok_or_else(|| corrupt(op, &what, "rec"))?;
    let version = get_n(row, "v").ok_or_else(|| corrupt(op, &what, "v"))?;
    Ok((id, Versioned { value, version }))
}

/// A new run's row, as [`Ledger::create_run`] writes it.
pub(crate) fn new_run_row(run: &RunRecord) -> Result<Row, PortError> {
    let config = serde_json::to_string(&run.config)
        .map_err(|e| PortError::backend("DynamoDB.PutItem", e))?;
    let mut row = run_key(&run.id);
    row.insert("created_at".into(), n(run.created_at));
    row.insert("config".into(), s(config));
    row.insert("total".into(), n(run.total));
    row.insert("enqueued".into(), n(run.enqueued));
    row.insert("dispatched".into(), AttributeValue::Bool(run.dispatched));
    row.insert("succeeded".into(), n(run.succeeded));
    row.insert("failed".into(), n(run.failed));
    if let Some(c) = &run.cursor {
        row.insert("cursor".into(), s(c));
    }
    if let Some(at) = run.settled_at {
        row.insert("settled_at".into(), n(at));
    }
    Ok(row)
}

#[async_trait]
impl Ledger for DynamoLedger {
    async fn create_run(&self, run: &RunRecord) -> Result<(), PortError> {
        let row = new_run_row(run)?;
        let guard = self.t.shared().await;
        let res = self
            .t
            .client
            .put_item()
            .table_name(&self.t.ledger)
            .set_item(Some(row))
            .condition_expression("attribute_not_exists(pk)")
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        drop(guard);
        match res {
            Ok(out) => {
                self.t.capacity("DynamoDB.PutItem", out.consumed_capacity());
                Ok(())
            }
            Err(e) if is_condition_failed(&e) => {
                Err(PortError::Invalid(format!("run {} already exists", run.id)))
            }
            Err(e) => Err(sdk_err("DynamoDB.PutItem", &self.t.ledger, e)),
        }
    }

    async fn run(&self, id: &RunId) -> Result<Option<RunRecord>, PortError> {
        self.get_run("DynamoDB.GetItem", id).await
    }

    async fn runs(&self, limit: usize) -> Result<Vec<RunRecord>, PortError> {
        let op = "DynamoDB.Query";
        let mut out = Vec::new();
        let mut start = None;
        while out.len() < limit {
            let page = self
                .t
                .client
                .query()
                .table_name(&self.t.ledger)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", s(RUNS_PK))
                .scan_index_forward(false)
                .limit((limit - out.len()).min(1000) as i32)
                .set_exclusive_start_key(start)
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(|e| sdk_err(op, &self.t.ledger, e))?;
            self.t.capacity(op, page.consumed_capacity());
            for row in page.items() {
                out.push(run_from_row(op, row)?);
            }
            start = page.last_evaluated_key().cloned();
            if start.is_none() {
                break;
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    async fn record_dispatch(
        &self,
        id: &RunId,
        enqueued: u64,
        cursor: Option<&str>,
        dispatched: bool,
    ) -> Result<(), PortError> {
        let op = "DynamoDB.UpdateItem";
        // Progress moves forward only: the write is conditional on not going
        // back, so a slower dispatcher's stale report changes nothing but
        // (if it finished) the dispatched flag.
        let mut set = vec!["#enq = :e"];
        let t = &self.t;
        let mut update = t
            .client
            .update_item()
            .table_name(&t.ledger)
            .set_key(Some(run_key(id)))
            .condition_expression("attribute_exists(pk) AND #enq <= :e")
            .expression_attribute_names("#enq", "enqueued")
            .expression_attribute_values(":e", n(enqueued));
        if let Some(c) = cursor {
            set.push("#c = :c");
            update = update.expression_attribute_values(":c", s(c));
        }
        if dispatched {
            set.push("#dis = :t");
            update = update.expression_attribute_names("#dis", "dispatched");
            update = update.expression_attribute_values(":t", AttributeValue::Bool(true));
        }
        let mut expr = format!("SET {}", set.join(", "));
        if cursor.is_none() {
            expr.push_str(" REMOVE #c");
        }
        let update = update
            .update_expression(expr)
            .expression_attribute_names("#c", "cursor");
        if t.update(&t.ledger, update).await? {
            return Ok(());
        }
        // Stale progress, or no such run: tell them apart.
        if self.get_run(op, id).await?.is_none() {
            return Err(PortError::NotFound(format!("run {id}")));
        }
        if dispatched {
            t.update(
                &t.ledger,
                t.client
                    .update_item()
                    .table_name(&t.ledger)
                    .set_key(Some(run_key(id)))
                    .update_expression("SET #dis = :t")
                    .expression_attribute_names("#dis", "dispatched")
                    .condition_expression("attribute_exists(pk)")
                    .expression_attribute_values(":t", AttributeValue::Bool(true)),
            )
            .await?;
        }
        Ok(())
    }

    async fn items(
        &self,
        keys: &[(RunId, ItemId)],
    ) -> Result<HashMap<(RunId, ItemId), Versioned<ItemRecord>>, PortError> {
        let op = "DynamoDB.BatchGetItem";
        let keys: Vec<Row> = keys
            .iter()
            .map(|(run, item)| {
                HashMap::from([
                    ("pk".to_owned(), s(items_pk(run))),
                    ("sk".to_owned(), s(item.as_str())),
                ])
            })
            .collect();
        // Eventually consistent, at half the price of a strong read: the
        // commit is conditional on the versions read, so a stale row costs a
        // retry (a conflict, then a re-read), never a wrong tally. Most rows
        // read are new ones, which no staleness affects.
        let mut out = HashMap::with_capacity(keys.len());
        for row in self.batch_get(keys, false).await? {
            let run = get_s(&row, "pk")
                .and_then(|p| p.strip_prefix("I#"))
                .and_then(|r| RunId::parse(r).ok())
                .ok_or_else(|| corrupt(op, "item row", "pk"))?;
            let (item, v) = record_from_row(op, &row)?;
            out.insert((run, item), v);
        }
        Ok(out)
    }

    async fn commit(&self, batch: LedgerBatch) -> Result<Vec<RunRecord>, PortError> {
        let actions = batch.puts.len() + batch.tallies.len();
        if actions > MAX_COMMIT_ACTIONS {
            return Err(PortError::Invalid(format!(
                "a commit holds at most {MAX_COMMIT_ACTIONS} rows, got {actions}"
            )));
        }
        if batch.puts.is_empty() {
            return Ok(Vec::new());
        }
        // Statuses first, rows second: a crash between the two leaves the
        // tally counting a row the retry then writes, never a written row
        // the tally missed (a retry finds such a row's result already in it
        // and would count nothing). `batch.tallies` is not needed: the
        // segments yield the same deltas.
        self.raise_statuses(&batch.puts).await?;
        let mut conflict = false;
        for chunk in batch.puts.chunks(PUT_CONCURRENCY) {
            for w in futures::future::join_all(chunk.iter().map(|p| self.put_item_row(p))).await {
                conflict |= !w?;
            }
        }
        if conflict {
            return Err(PortError::Conflict);
        }
        // The flow counts (throttled answers, items waiting long) after the
        // rows: a crash between the two loses this batch's counts rather
        // than counting them twice on the retry. They inform; the tally
        // above is what is exact.
        for (run, d) in batch.tallies.iter().filter(|(_, d)| d.moves_flow()) {
            self.move_flow(run, d).await?;
        }
        // The runs as they stand now (at or after this commit): a later
        // tally only helps the settle check.
        let runs: BTreeSet<&RunId> = batch.puts.iter().map(|p| &p.run).collect();
        let mut out = Vec::with_capacity(runs.len());
        for run in runs {
            match self.get_run("DynamoDB.GetItem", run).await? {
                Some(r) => out.push(r),
                None => return Err(PortError::NotFound(format!("run {run}"))),
            }
        }
        Ok(out)
    }

    fn atomic_commit(&self) -> bool {
        false
    }

    async fn set_redriving(&self, id: &RunId, open: bool) -> Result<(), PortError> {
        self.set_run_attribute(id, "redriving", AttributeValue::Bool(open))
            .await
    }

    async fn set_flow(
        &self,
        id: &RunId,
        state: &settle_core::flow::FlowState,
    ) -> Result<(), PortError> {
        let state = serde_json::to_string(state)
            .map_err(|e| PortError::backend("DynamoDB.UpdateItem", e))?;
        self.set_run_attribute(id, "flow", s(state)).await
    }

    async fn set_redrive(&self, id: &RunId, scope: &RedriveScope) -> Result<(), PortError> {
        // One attribute of the run row, written once per redrive.
        self.set_run_attribute(id, "redrive", s(scope.encode()))
            .await
    }

    async fn clear_redrive(&self, id: &RunId, scope: &RedriveScope) -> Result<bool, PortError> {
        let t = &self.t;
        // The stored scope is compared whole: encode() gives equal scopes
        // equal strings.
        let cleared = t
            .update(
                &t.ledger,
                t.client
                    .update_item()
                    .table_name(&t.ledger)
                    .set_key(Some(run_key(id)))
                    .update_expression("REMOVE redrive")
                    .condition_expression("attribute_exists(pk) AND redrive = :s")
                    .expression_attribute_values(":s", s(scope.encode())),
            )
            .await?;
        if !cleared && self.get_run("DynamoDB.GetItem", id).await?.is_none() {
            return Err(PortError::NotFound(format!("run {id}")));
        }
        Ok(cleared)
    }

    async fn mark_settled(&self, id: &RunId, at: u64) -> Result<bool, PortError> {
        let t = &self.t;
        t.update(
            &t.ledger,
            t.client
                .update_item()
                .table_name(&t.ledger)
                .set_key(Some(run_key(id)))
                .update_expression("SET settled_at = :at")
                .condition_expression("attribute_exists(pk) AND attribute_not_exists(settled_at)")
                .expression_attribute_values(":at", n(at)),
        )
        .await
    }

    async fn failures(
        &self,
        run: &RunId,
        after: Option<&ItemId>,
        limit: usize,
    ) -> Result<Vec<(ItemId, ItemRecord)>, PortError> {
        let op = "DynamoDB.Query";
        let mut out = Vec::new();
        let mut start = None;
        while out.len() < limit {
            let mut q = self
                .t
                .client
                .query()
                .table_name(&self.t.ledger)
                .index_name(FAILED_INDEX)
                .expression_attribute_values(":r", s(run.as_str()))
                .limit((limit - out.len()).min(1000) as i32)
                .set_exclusive_start_key(start)
                .return_consumed_capacity(ReturnConsumedCapacity::Total);
            q = match after {
                Some(a) => q
                    .key_condition_expression("frun = :r AND sk > :a")
                    .expression_attribute_values(":a", s(a.as_str())),
                None => q.key_condition_expression("frun = :r"),
            };
            let page = q.send().await.map_err(|e| sdk_err(op, &self.t.ledger, e))?;
            self.t.capacity(op, page.consumed_capacity());
            for row in page.items() {
                let (id, v) = record_from_row(op, row)?;
                // The index lags the table a little on AWS: trust the row's record.
                if v.value.status == ItemStatus::Failed {
                    out.push((id, v.value));
                }
            }
            start = page.last_evaluated_key().cloned();
            if start.is_none() {
                break;
            }
        }
        out.truncate(limit);
        Ok(out)
    }
}
