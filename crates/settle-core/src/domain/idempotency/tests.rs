#![allow(clippy::unwrap_used)]

use super::*;
use serde_json::value::RawValue;
use std::sync::atomic::{AtomicU32, Ordering};

fn key(item: &str) -> IdempotencyKey {
    IdempotencyKey::new(
        RunId::parse("r20260101T000000Z-abcdef").unwrap(),
        ItemId::new(item).unwrap(),
    )
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

fn utility(store: Arc<dyn IdempotencyStore>) -> Idempotency {
    Idempotency::with_config(
        store,
        IdempotencyConfig {
            backoff: Duration::from_millis(1),
            ..IdempotencyConfig::default()
        },
    )
}

/// Counts the effect's executions and answers `n` (its execution number).
async fn counted(calls: &AtomicU32) -> Result<u32, ProcessError> {
    Ok(calls.fetch_add(1, Ordering::SeqCst) + 1)
}

#[tokio::test]
async fn a_duplicate_gets_the_stored_result_without_executing() {
    let store = Arc::new(MemoryIdempotencyStore::new());
    let idem = utility(store.clone());
    let calls = AtomicU32::new(0);
    let first: u32 = idem
        .run(&key("a"), "{}", soon(), || counted(&calls))
        .await
        .unwrap();
    let second: u32 = idem
        .run(&key("a"), "{}", soon(), || counted(&calls))
        .await
        .unwrap();
    assert_eq!(
        (first, second),
        (1, 1),
        "the second call replays the first's result"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let rec = store.get(&key("a")).await.unwrap().unwrap();
    assert!(
        matches!(&rec, IdempotencyRecord::Completed { result, payload_hash, .. }
            if result == "1" && *payload_hash == payload_hash_of("{}")),
        "{rec:?}"
    );
    // Another item is another key.
    let other: u32 = idem
        .run(&key("b"), "{}", soon(), || counted(&calls))
        .await
        .unwrap();
    assert_eq!(other, 2);
}

fn payload_hash_of(p: &str) -> String {
    payload_hash(p)
}

#[test]
fn payload_hash_is_sha256_hex() {
    assert_eq!(
        payload_hash(""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_ne!(payload_hash("{\"a\":1}"), payload_hash("{\"a\":2}"));
}

#[tokio::test]
async fn another_payload_under_the_same_key_is_a_permanent_error() {
    let store = Arc::new(MemoryIdempotencyStore::new());
    let idem = utility(store);
    let calls = AtomicU32::new(0);
    let _: u32 = idem
        .run(&key("a"), r#"{"amount":1}"#, soon(), || counted(&calls))
        .await
        .unwrap();
    let err = idem
        .run::<u32, _, _>(&key("a"), r#"{"amount":2}"#, soon(), || counted(&calls))
        .await
        .unwrap_err();
    assert!(
        matches!(err, IdempotencyError::PayloadMismatch { .. }),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Permanent);
    assert!(err.to_string().contains("different payload"), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_failure_releases_the_claim_so_a_retry_executes() {
    let store = Arc::new(MemoryIdempotencyStore::new());
    let idem = utility(store.clone());
    let err = idem
        .run::<u32, _, _>(&key("a"), "{}", soon(), || async {
            Err(ProcessError::retryable("gateway timeout"))
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Retryable);
    assert_eq!(ProcessError::from(err).message, "gateway timeout");
    assert_eq!(store.get(&key("a")).await.unwrap(), None, "claim released");
    let calls = AtomicU32::new(0);
    let n: u32 = idem
        .run(&key("a"), "{}", soon(), || counted(&calls))
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn a_panic_releases_the_claim_and_unwinds_on() {
    let store = Arc::new(MemoryIdempotencyStore::new());
    let idem = utility(store.clone());
    let caught = AssertUnwindSafe(
        idem.run::<u32, _, _>(&key("a"), "{}", soon(), || async { panic!("boom") }),
    )
    .catch_unwind()
    .await;
    let panic = caught.unwrap_err();
    assert_eq!(panic.downcast_ref::<&str>(), Some(&"boom"));
    assert_eq!(store.get(&key("a")).await.unwrap(), None);
}

#[tokio::test]
async fn an_unexpired_claim_refuses_a_duplicate_and_an_expired_one_is_taken_over() {
    let store = Arc::new(MemoryIdempotencyStore::new());
    let idem = utility(store.clone());
    let hash = payload_hash("{}");
    let now = now_millis();
    assert_eq!(
        store
            .claim(&key("a"), &hash, "other", now, now + 60_000)
            .await
            .unwrap(),
        Claim::Acquired
    );
    let calls = AtomicU32::new(0);
    let err = idem
        .run::<u32, _, _>(&key("a"), "{}", soon(), || counted(&calls))
        .await
        .unwrap_err();
    match &err {
        IdempotencyError::InProgress { remaining_ms, .. } => {
            assert!((50_000..=60_000).contains(remaining_ms), "{err}")
        }
        e => panic!("{e}"),
    }
    assert_eq!(err.kind(), ErrorKind::Retryable);
    assert!(err.to_string().contains("already in progress"), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // A crashed attempt's claim, expired: the next attempt executes.
    store
        .claim(&key("b"), &hash, "crashed", now - 10_000, now - 1)
        .await
        .unwrap();
    let n: u32 = idem
        .run(&key("b"), "{}", soon(), || counted(&calls))
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert!(matches!(
        store.get(&key("b")).await.unwrap(),
        Some(IdempotencyRecord::Completed { .. })
    ));
}

#[tokio::test]
async fn concurrent_duplicates_execute_once() {
    let store = Arc::new(MemoryIdempotencyStore::new());
    let idem = utility(store);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let calls = AtomicU32::new(0);
    let k = key("a");
    let first = idem.run::<u32, _, _>(&k, "{}", soon(), || async {
        started_tx.send(()).unwrap();
        go_rx.await.unwrap();
        counted(&calls).await
    });
    let second = async {
        started_rx.await.unwrap();
        let res = idem
            .run::<u32, _, _>(&key("a"), "{}", soon(), || counted(&calls))
            .await;
        go_tx.send(()).unwrap();
        res
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(first.unwrap(), 1);
    assert!(matches!(second, Err(IdempotencyError::InProgress { .. })));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_passed_deadline_claims_nothing() {
    let store = Arc::new(MemoryIdempotencyStore::new());
    let idem = utility(store.clone());
    let calls = AtomicU32::new(0);
    let err = idem
        .run::<u32, _, _>(&key("a"), "{}", Instant::now(), || counted(&calls))
        .await
        .unwrap_err();
    assert!(
        matches!(err, IdempotencyError::DeadlinePassed { .. }),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Retryable);
    assert_eq!(store.get(&key("a")).await.unwrap(), None);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_stored_result_of_another_type_is_a_permanent_error() {
    let store = Arc::new(MemoryIdempotencyStore::new());
    let idem = utility(store);
    let _: String = idem
        .run(&key("a"), "{}", soon(), || async {
            Ok("receipt-1".to_owned())
        })
        .await
        .unwrap();
    let err = idem
        .run::<u32, _, _>(&key("a"), "{}", soon(), || async { Ok(7) })
        .await
        .unwrap_err();
    assert!(matches!(err, IdempotencyError::Result { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::Permanent);
}

/// Wraps a store; the first `fail` calls of each operation fail, before or
/// after taking effect.
#[derive(Debug)]
struct Flaky {
    inner: MemoryIdempotencyStore,
    fail: u32,
    after: bool,
    calls: Mutex<HashMap<&'static str, u32>>,
}

use std::collections::HashMap;
use std::sync::Mutex;

impl Flaky {
    fn new(fail: u32, after: bool) -> Self {
        Self {
            inner: MemoryIdempotencyStore::new(),
            fail,
            after,
            calls: Mutex::default(),
        }
    }
    fn should_fail(&self, op: &'static str) -> bool {
        let mut calls = self.calls.lock().unwrap();
        let n = calls.entry(op).or_default();
        *n += 1;
        *n <= self.fail
    }
    async fn wrap<R>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<R, PortError>>,
    ) -> Result<R, PortError> {
        let fail = self.should_fail(op);
        if fail && !self.after {
            return Err(PortError::backend(op, "injected before"));
        }
        let res = call.await;
        if fail {
            return Err(PortError::backend(op, "injected after"));
        }
        res
    }
}

#[async_trait]
impl IdempotencyStore for Flaky {
    async fn claim(
        &self,
        key: &IdempotencyKey,
        h: &str,
        t: &str,
        now: Millis,
        exp: Millis,
    ) -> Result<Claim, PortError> {
        self.wrap("claim", self.inner.claim(key, h, t, now, exp))
            .await
    }
    async fn complete(&self, key: &IdempotencyKey, t: &str, r: &str) -> Result<(), PortError> {
        self.wrap("complete", self.inner.complete(key, t, r)).await
    }
    async fn release(&self, key: &IdempotencyKey, t: &str) -> Result<(), PortError> {
        self.wrap("release", self.inner.release(key, t)).await
    }
    async fn get(&self, key: &IdempotencyKey) -> Result<Option<IdempotencyRecord>, PortError> {
        self.inner.get(key).await
    }
}

#[tokio::test]
async fn store_calls_whose_effect_is_unknown_are_repeated_under_the_same_token() {
    for after in [false, true] {
        let store = Arc::new(Flaky::new(2, after));
        let idem = utility(store.clone());
        let calls = AtomicU32::new(0);
        let n: u32 = idem
            .run(&key("a"), "{}", soon(), || counted(&calls))
            .await
            .unwrap();
        assert_eq!(n, 1, "after = {after}");
        assert!(
            matches!(
                store.get(&key("a")).await.unwrap(),
                Some(IdempotencyRecord::Completed { .. })
            ),
            "after = {after}: the completed record was stored"
        );
        // A failure's release is repeated too.
        let err = idem
            .run::<u32, _, _>(&key("b"), "{}", soon(), || async {
                Err(ProcessError::permanent("declined"))
            })
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Permanent);
        assert_eq!(store.get(&key("b")).await.unwrap(), None, "after = {after}");
    }
}

#[tokio::test]
async fn a_store_that_keeps_failing_is_a_retryable_error_and_nothing_runs() {
    let store = Arc::new(Flaky::new(u32::MAX, false));
    let idem = utility(store);
    let calls = AtomicU32::new(0);
    let err = idem
        .run::<u32, _, _>(&key("a"), "{}", soon(), || counted(&calls))
        .await
        .unwrap_err();
    assert!(matches!(err, IdempotencyError::Store { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::Retryable);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn run_for_keys_by_run_and_item_and_hashes_the_payload() {
    let store = Arc::new(MemoryIdempotencyStore::new());
    let idem = utility(store.clone());
    let item = Item::new(
        ItemId::new("sub-1").unwrap(),
        RawValue::from_string(r#"{"amount":5}"#.into()).unwrap(),
    );
    let run = RunId::parse("r20260101T000000Z-abcdef").unwrap();
    let ctx = AttemptContext::new(run.clone(), &item, 1);
    let _: () = idem
        .run_for(&ctx, &item, || async { Ok(()) })
        .await
        .unwrap();
    let k = IdempotencyKey::new(run, item.id.clone());
    assert_eq!(k.to_string(), ctx.idempotency_key);
    let rec = store.get(&k).await.unwrap().unwrap();
    assert_eq!(rec.payload_hash(), payload_hash(r#"{"amount":5}"#));
}

#[tokio::test]
async fn run_for_claims_until_the_attempt_deadline() {
    let item = Item::new(
        ItemId::new("i").unwrap(),
        RawValue::from_string("null".into()).unwrap(),
    );
    let run = RunId::parse("r20260101T000000Z-abcdef").unwrap();
    let k = IdempotencyKey::new(run.clone(), item.id.clone());
    for (deadline, lo, hi) in [
        (Some(Duration::from_secs(5)), 4_000, 5_000),
        (None, 14 * 60_000, 15 * 60_000),
    ] {
        let store = Arc::new(MemoryIdempotencyStore::new());
        let idem = utility(store.clone());
        let mut ctx = AttemptContext::new(run.clone(), &item, 1);
        ctx.deadline = deadline.map(|d| Instant::now() + d);
        let before = now_millis();
        let seen = idem
            .run_for::<(), _, _>(&ctx, &item, || async {
                Err(ProcessError::retryable("look, then fail"))
            })
            .await;
        // The claim was released; take one directly to read what run_for set.
        assert!(seen.is_err());
        let _: () = idem
            .run_for(&ctx, &item, || {
                let store = store.clone();
                let k = k.clone();
                async move {
                    match store.get(&k).await.unwrap() {
                        Some(IdempotencyRecord::InProgress { expires_at, .. }) => {
                            let ttl = expires_at - before;
                            assert!((lo..=hi + 100).contains(&ttl), "ttl {ttl} ms");
                        }
                        other => panic!("{other:?}"),
                    }
                    Ok(())
                }
            })
            .await
            .unwrap();
    }
}

#[test]
fn errors_convert_to_process_errors_of_their_kind() {
    let e: ProcessError = IdempotencyError::InProgress {
        key: "r:i".into(),
        remaining_ms: 5,
    }
    .into();
    assert_eq!(e.kind, ErrorKind::Retryable);
    assert_eq!(
        e.message,
        "r:i: already in progress in another attempt (its claim expires in 5 ms)"
    );
    assert_eq!(
        e.retry_after,
        Some(Duration::from_millis(5) + CLOCK_SKEW),
        "retry once the claim has expired"
    );
    let e: ProcessError = IdempotencyError::DeadlinePassed { key: "r:i".into() }.into();
    assert_eq!((e.kind, e.retry_after), (ErrorKind::Retryable, None));
    let e: ProcessError = IdempotencyError::Effect(ProcessError::permanent("declined")).into();
    assert_eq!(
        (e.kind, e.message.as_str()),
        (ErrorKind::Permanent, "declined")
    );
}
