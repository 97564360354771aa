//! What the conformance suite does not reach: loads that span many blocks
//! and block partitions, a whole run end to end with its API calls counted,
//! and connect's refusal of a work queue without a dead-letter queue.
//! On the emulator at `AWS_ENDPOINT_URL`, each test on its own stack.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test.

use serde_json::value::RawValue;
use settle_aws::provision::{create_stack, Stack};
use settle_aws::{AwsBackend, AwsConfig, ConfigError};
use settle_core::domain::{now_millis, ItemStatus};
use settle_core::ports::{LineError, LoadError, LoadInput};
use settle_core::runner::{Runner, RunnerConfig, RunnerStats};
use settle_core::work::{Worker, WorkerConfig};
use settle_core::{dispatch, Item, ItemId, RunConfig, Scripted};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn stack() -> (aws_config::SdkConfig, AwsConfig) {
    assert!(
        std::env::var("AWS_ENDPOINT_URL").is_ok_and(|v| !v.trim().is_empty()),
        "AWS_ENDPOINT_URL is not set: start the emulator: eval \"$(infra/emulator.sh up)\", or run make test"
    );
    let sdk = settle_aws::sdk_config().await;
    let prefix = format!("t{}-{:06x}-", now_millis(), fastrand::u32(..0x0100_0000));
    let cfg = create_stack(&sdk, &Stack::default_stack().unwrap(), &prefix, None)
        .await
        .unwrap();
    (sdk, cfg)
}

async fn fresh() -> AwsBackend {
    let (sdk, cfg) = stack().await;
    settle_aws::connect_with(&sdk, &cfg).await.unwrap()
}

fn items(ids: impl IntoIterator<Item = (u64, String, &'static str)>) -> LoadInput {
    let v: Vec<Result<(u64, Item), LineError>> = ids
        .into_iter()
        .map(|(line, id, payload)| {
            Ok((
                line,
                Item::new(
                    ItemId::new(id).unwrap(),
                    RawValue::from_string(payload.into()).unwrap(),
                ),
            ))
        })
        .collect();
    Box::new(v.into_iter())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_loads_are_atomic_and_read_back_in_order_across_block_partitions() {
    let aws = fresh().await;
    let b = aws.backend();
    // 5,000 items: more than one block partition (4,096) and many blocks.
    let n = 5000u64;
    let id = |i: u64| format!("user-{i:05}");
    // A duplicate far from its first line: the first copy's block is
    // already written, so the check reads it back.
    let dup = items((1..=n).map(|l| (l, if l == 4500 { id(3) } else { id(l) }, "{\"k\":1}")));
    match b.source.load(dup).await {
        Err(LoadError::Line(e)) => {
            assert_eq!(e.line, 4500);
            assert!(e.reason.contains("first on line 3"), "{}", e.reason);
        }
        other => panic!("expected a line error, got {other:?}"),
    }
    assert_eq!(
        b.source.pending().await.unwrap(),
        0,
        "a failed load publishes nothing"
    );
    // A duplicate whose first copy sits in a closed block not yet written.
    let near = items((1..=300).map(|l| (l, if l == 160 { id(10) } else { id(l) }, "{\"k\":1}")));
    match b.source.load(near).await {
        Err(LoadError::Line(e)) => {
            assert_eq!(e.line, 160);
            assert!(e.reason.contains("first on line 10"), "{}", e.reason);
        }
        other => panic!("expected a line error, got {other:?}"),
    }
    assert_eq!(b.source.pending().await.unwrap(), 0);

    let loaded = b
        .source
        .load(items((1..=n).map(|l| (l, id(l), "{\"k\":1}"))))
        .await
        .unwrap();
    assert_eq!(loaded, n);
    assert_eq!(b.source.pending().await.unwrap(), n);
    // A later load repeating a pending id names it, whatever block it is in.
    match b
        .source
        .load(items([(1, "new".to_string(), "1"), (2, id(4321), "2")]))
        .await
    {
        Err(LoadError::Line(e)) => {
            assert_eq!(e.line, 2);
            assert!(e.reason.contains("already pending"), "{}", e.reason);
        }
        other => panic!("expected a line error, got {other:?}"),
    }
    let run = dispatch::create_run(b.ledger.as_ref(), RunConfig::default())
        .await
        .unwrap();
    let mut claimed = 0;
    loop {
        let got = b.source.claim(&run.id, 1000).await.unwrap();
        if got == 0 {
            break;
        }
        claimed += got;
    }
    assert_eq!(claimed, n);
    let mut cursor: Option<String> = None;
    let mut read = Vec::new();
    loop {
        let (page, next) = b
            .source
            .claimed(&run.id, cursor.as_deref(), 700)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        read.extend(page.into_iter().map(|it| it.id.to_string()));
        cursor = next;
    }
    let want: Vec<String> = (1..=n).map(id).collect();
    assert_eq!(read, want, "every claimed item once, in load order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_settles_exactly_and_its_calls_are_counted() {
    let aws = fresh().await;
    let b = aws.backend();
    let n = 300u64;
    // Every tenth item fails for good.
    b.source
        .load(items((1..=n).map(|l| {
            let payload = if l % 10 == 0 {
                "{\"script\":\"permanent\"}"
            } else {
                "{}"
            };
            (l, format!("i{l}"), payload)
        })))
        .await
        .unwrap();
    let before = aws.call_counts();
    let run = dispatch::create_run(b.ledger.as_ref(), RunConfig::default())
        .await
        .unwrap();
    dispatch::dispatch(
        b.source.as_ref(),
        b.ledger.as_ref(),
        b.work.as_ref(),
        &run.id,
        None,
        false,
    )
    .await
    .unwrap();
    let worker = Worker::new(
        Arc::new(Scripted),
        b.work.clone(),
        b.dlq.clone(),
        b.results.clone(),
        WorkerConfig::default(),
    );
    let runner = Runner {
        worker: Arc::new(worker),
        work: b.work.clone(),
        results: b.results.clone(),
        ledger: b.ledger.clone(),
        config: RunnerConfig {
            concurrency: 4,
            reducers: 2,
            ..RunnerConfig::default()
        },
        stats: Arc::new(RunnerStats::default()),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move { runner.run(stop_rx).await });
    let started = Instant::now();
    let settled = loop {
        let r = b.ledger.run(&run.id).await.unwrap().unwrap();
        if r.settled_at.is_some() {
            break r;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not settled: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stop_tx.send(true).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(
        (settled.total, settled.succeeded, settled.failed),
        (n, 270, 30)
    );
    let failures = b.ledger.failures(&run.id, None, 1000).await.unwrap();
    assert_eq!(failures.len(), 30);
    assert!(failures.iter().all(|(_, r)| r.status == ItemStatus::Failed));

    let after = aws.call_counts();
    let mut report = String::new();
    for (op, count) in &after {
        let used = count - before.get(op).copied().unwrap_or(0);
        report.push_str(&format!(
            "  {op:<36} {used:>6}  ({:.3} per item)\n",
            used as f64 / n as f64
        ));
    }
    for (op, units) in aws.consumed_capacity() {
        report.push_str(&format!("  capacity {op:<27} {units:>8.1}\n"));
    }
    eprintln!("calls for {n} items (load included in capacity only):\n{report}");
    for op in [
        "SQS.SendMessageBatch",
        "SQS.ReceiveMessage",
        "SQS.DeleteMessageBatch",
        "DynamoDB.TransactWriteItems",
        "DynamoDB.BatchGetItem",
    ] {
        assert!(
            after.get(op).copied().unwrap_or(0) > 0,
            "{op} not counted:\n{report}"
        );
    }
    // Sends are batched: at most one SendMessageBatch per 10 work messages
    // plus the worker's result sends (one call per worker batch).
    let sends =
        after["SQS.SendMessageBatch"] - before.get("SQS.SendMessageBatch").copied().unwrap_or(0);
    assert!(
        sends <= n / 10 * 3,
        "{sends} send calls for {n} items:\n{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_refuses_a_work_queue_without_a_dead_letter_queue() {
    let (sdk, mut cfg) = stack().await;
    // Point the work queue at its own DLQ, which has no redrive policy.
    cfg.work_queue_url = cfg.work_dlq_url.clone();
    match settle_aws::connect_with(&sdk, &cfg).await {
        Err(e @ ConfigError::NoRedrivePolicy { .. }) => {
            assert!(e.to_string().contains(&cfg.work_dlq_url), "{e}");
        }
        other => panic!("expected NoRedrivePolicy, got {other:?}"),
    }
}

/// On SQS a retry is a new message whose DelaySeconds is its delay: a
/// retry-after keeps it out of every receive until it has passed, while
/// one without comes back after the backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_keeps_the_message_hidden_until_it_passes() {
    use settle_core::message::WorkBody;
    let aws = fresh().await;
    let b = aws.backend();
    let run = settle_core::RunId::generate(now_millis());
    let body = |id: &str| {
        let payload = RawValue::from_string("{}".to_owned()).unwrap();
        WorkBody::new(
            run.clone(),
            Item::new(ItemId::new(id).unwrap(), payload),
            0,
            5,
        )
        .encode()
    };
    b.work
        .send(vec![body("wait-1"), body("now-1")])
        .await
        .unwrap();
    let worker = Worker::new(
        Arc::new(settle_conformance::processors::AsksToWait(
            Duration::from_secs(3),
        )),
        b.work.clone(),
        b.dlq.clone(),
        b.results.clone(),
        WorkerConfig {
            retry_delay: Duration::from_millis(10),
            ..WorkerConfig::default()
        },
    );
    let visibility = Duration::from_secs(30);
    let mut batch = Vec::new();
    for _ in 0..20 {
        batch.extend(b.work.receive(10, visibility).await.unwrap());
        if batch.len() == 2 {
            break;
        }
    }
    assert_eq!(batch.len(), 2);
    let started = Instant::now();
    let response = worker.handle(&batch, None).await;
    assert!(
        response.failures.is_empty(),
        "both are done: their retries are new messages"
    );
    settle_core::work::delete_done(b.work.as_ref(), &batch, &response)
        .await
        .unwrap();
    let received = |got: Vec<settle_core::ports::Delivery>| -> Vec<String> {
        got.iter()
            .map(|d| WorkBody::decode(&d.body).unwrap().item.to_string())
            .collect()
    };
    // The backoff (10 ms, whole seconds on SQS: 1 s) has passed; the
    // retry-after has not.
    tokio::time::sleep(Duration::from_millis(1_800).saturating_sub(started.elapsed())).await;
    let early = received(b.work.receive(10, visibility).await.unwrap());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "too slow to tell"
    );
    assert_eq!(
        early,
        vec!["now-1".to_string()],
        "only the one without a retry-after"
    );
    tokio::time::sleep(Duration::from_millis(3_500).saturating_sub(started.elapsed())).await;
    let late = received(b.work.receive(10, visibility).await.unwrap());
    assert_eq!(
        late,
        vec!["wait-1".to_string()],
        "back once its retry-after passed"
    );
}
