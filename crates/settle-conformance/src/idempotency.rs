//! Clauses of the idempotency store's contract, through the utility that
//! processors use ([`Idempotency`]) and through the store's own calls.

use crate::Subject;
use settle_core::domain::{now_millis, ErrorKind, ItemId, ProcessError, RunId};
use settle_core::idempotency::{
    payload_hash, Claim, Idempotency, IdempotencyError, IdempotencyKey, IdempotencyRecord,
};
use settle_core::ports::PortError;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

fn key(item: &str) -> IdempotencyKey {
    IdempotencyKey::new(RunId::generate(now_millis()), ItemId::new(item).unwrap())
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

/// The effect of the clauses: counts executions, answers a receipt.
async fn charge(calls: &AtomicU32, item: &str) -> Result<String, ProcessError> {
    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
    Ok(format!("receipt {item} #{n}"))
}

/// The first execution runs the effect and stores its result as completed,
/// with the payload's hash.
pub async fn idempotency_first_execution_stores_result(s: &Subject) {
    let idem = Idempotency::new(s.idempotency.clone());
    let k = key("charge-1");
    assert_eq!(s.idempotency.get(&k).await.unwrap(), None);
    let calls = AtomicU32::new(0);
    let got: String = idem
        .run(&k, r#"{"amount":5}"#, soon(), || charge(&calls, "charge-1"))
        .await
        .unwrap();
    assert_eq!(got, "receipt charge-1 #1");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    match s.idempotency.get(&k).await.unwrap() {
        Some(IdempotencyRecord::Completed {
            payload_hash: h,
            result,
            ..
        }) => {
            assert_eq!(h, payload_hash(r#"{"amount":5}"#));
            assert_eq!(result, r#""receipt charge-1 #1""#);
        }
        other => panic!("expected a completed record, found {other:?}"),
    }
}

/// A duplicate (same key, same payload) gets the stored result and does not
/// run the effect; the same item in another run is new work.
pub async fn idempotency_duplicate_returns_stored_result(s: &Subject) {
    let idem = Idempotency::new(s.idempotency.clone());
    let k = key("dup");
    let calls = AtomicU32::new(0);
    for _ in 0..3 {
        let got: String = idem
            .run(&k, "{}", soon(), || charge(&calls, "dup"))
            .await
            .unwrap();
        assert_eq!(got, "receipt dup #1");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "executed once");
    // A later run of the same item: a new key, so the effect runs again.
    let mut later = key("dup");
    while later.run == k.run {
        later = key("dup");
    }
    let got: String = idem
        .run(&later, "{}", soon(), || charge(&calls, "dup"))
        .await
        .unwrap();
    assert_eq!(got, "receipt dup #2");
}

/// The same key with another payload is a permanent error that says so, and
/// leaves the stored record as it was; an in-progress record of another
/// payload is not taken over either, even once expired.
pub async fn idempotency_different_payload_is_refused(s: &Subject) {
    let idem = Idempotency::new(s.idempotency.clone());
    let k = key("pay");
    let calls = AtomicU32::new(0);
    let _: String = idem
        .run(&k, r#"{"amount":5}"#, soon(), || charge(&calls, "pay"))
        .await
        .unwrap();
    let before = s.idempotency.get(&k).await.unwrap();
    let err = idem
        .run::<String, _, _>(&k, r#"{"amount":6}"#, soon(), || charge(&calls, "pay"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, IdempotencyError::PayloadMismatch { .. }),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Permanent);
    assert!(err.to_string().contains("different payload"), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(s.idempotency.get(&k).await.unwrap(), before);

    let k2 = key("pay-expired");
    let now = now_millis();
    let claim = s
        .idempotency
        .claim(&k2, &payload_hash("a"), "t1", now, now - 1)
        .await
        .unwrap();
    assert_eq!(claim, Claim::Acquired);
    let found = s
        .idempotency
        .claim(&k2, &payload_hash("b"), "t2", now, now + 60_000)
        .await
        .unwrap();
    assert!(
        matches!(&found, Claim::Existing(r) if r.token() == "t1"),
        "{found:?}"
    );
}

/// An in-progress record past its expiry (a crashed attempt's claim) is
/// taken over: the effect runs. The crashed claim's token can then neither
/// complete nor release the new one.
pub async fn idempotency_expired_claim_is_reclaimed(s: &Subject) {
    let store = &s.idempotency;
    let k = key("crashed");
    let hash = payload_hash("{}");
    let now = now_millis();
    assert_eq!(
        store
            .claim(&k, &hash, "crashed", now - 10_000, now - 5_000)
            .await
            .unwrap(),
        Claim::Acquired
    );
    let idem = Idempotency::new(store.clone());
    let calls = AtomicU32::new(0);
    let got: String = idem
        .run(&k, "{}", soon(), || charge(&calls, "crashed"))
        .await
        .unwrap();
    assert_eq!(
        (got.as_str(), calls.load(Ordering::SeqCst)),
        ("receipt crashed #1", 1)
    );

    // Store level: a reclaimed key belongs to the new token.
    let k2 = key("taken-over");
    store.claim(&k2, &hash, "old", now, now - 1).await.unwrap();
    assert_eq!(
        store
            .claim(&k2, &hash, "new", now, now + 60_000)
            .await
            .unwrap(),
        Claim::Acquired
    );
    store.release(&k2, "old").await.unwrap();
    let late = store.complete(&k2, "old", "\"late\"").await;
    assert!(matches!(late, Err(PortError::Conflict)), "{late:?}");
    assert!(
        matches!(store.get(&k2).await.unwrap(), Some(IdempotencyRecord::InProgress { token, .. }) if token == "new"),
        "the new claim stands"
    );
    // The holder's own calls repeat safely.
    assert_eq!(
        store
            .claim(&k2, &hash, "new", now, now + 60_000)
            .await
            .unwrap(),
        Claim::Acquired
    );
    store.complete(&k2, "new", "\"done\"").await.unwrap();
    store.complete(&k2, "new", "\"done\"").await.unwrap();
    store.release(&k2, "new").await.unwrap();
    assert!(matches!(
        store.get(&k2).await.unwrap(),
        Some(IdempotencyRecord::Completed { result, .. }) if result == "\"done\""
    ));
}

/// A duplicate that finds an unexpired in-progress record gets a retryable
/// "already in progress" error and does not run the effect.
pub async fn idempotency_unexpired_claim_is_in_progress(s: &Subject) {
    let k = key("busy");
    let now = now_millis();
    s.idempotency
        .claim(&k, &payload_hash("{}"), "holder", now, now + 60_000)
        .await
        .unwrap();
    let idem = Idempotency::new(s.idempotency.clone());
    let calls = AtomicU32::new(0);
    let err = idem
        .run::<String, _, _>(&k, "{}", soon(), || charge(&calls, "busy"))
        .await
        .unwrap_err();
    assert!(matches!(err, IdempotencyError::InProgress { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::Retryable);
    assert!(err.to_string().contains("already in progress"), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert!(matches!(
        s.idempotency.get(&k).await.unwrap(),
        Some(IdempotencyRecord::InProgress { token, .. }) if token == "holder"
    ));
}

/// A failed effect releases its claim, so a retry runs it again; a completed
/// record is never released.
pub async fn idempotency_failure_releases_the_claim(s: &Subject) {
    let idem = Idempotency::new(s.idempotency.clone());
    let k = key("declined");
    let err = idem
        .run::<String, _, _>(&k, "{}", soon(), || async {
            Err(ProcessError::retryable("gateway timeout"))
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Retryable);
    assert_eq!(ProcessError::from(err).message, "gateway timeout");
    assert_eq!(s.idempotency.get(&k).await.unwrap(), None, "claim released");
    let calls = AtomicU32::new(0);
    let got: String = idem
        .run(&k, "{}", soon(), || charge(&calls, "declined"))
        .await
        .unwrap();
    assert_eq!(got, "receipt declined #1");
    let token = s
        .idempotency
        .get(&k)
        .await
        .unwrap()
        .unwrap()
        .token()
        .to_owned();
    s.idempotency.release(&k, &token).await.unwrap();
    assert!(matches!(
        s.idempotency.get(&k).await.unwrap(),
        Some(IdempotencyRecord::Completed { .. })
    ));
}

/// Of many concurrent claimers of one key, exactly one executes; the others
/// are told it is in progress. Raw claims: exactly one is acquired.
pub async fn idempotency_concurrent_claimers_execute_once(s: &Subject) {
    const N: usize = 8;
    let k = key("race");
    let now = now_millis();
    let hash = payload_hash("{}");
    let claims = futures::future::join_all((0..N).map(|i| {
        let (store, k, hash) = (s.idempotency.clone(), k.clone(), hash.clone());
        tokio::spawn(async move {
            store
                .claim(&k, &hash, &format!("t{i}"), now, now + 60_000)
                .await
                .unwrap()
        })
    }))
    .await;
    let won = claims
        .iter()
        .filter(|c| matches!(c.as_ref().unwrap(), Claim::Acquired))
        .count();
    assert_eq!(won, 1, "{claims:?}");

    let k = key("race-run");
    let calls = Arc::new(AtomicU32::new(0));
    let idem = Idempotency::new(s.idempotency.clone());
    let runs = futures::future::join_all((0..N).map(|_| {
        let (idem, k, calls) = (idem.clone(), k.clone(), calls.clone());
        tokio::spawn(async move {
            idem.run::<String, _, _>(&k, "{}", soon(), || async {
                // Long enough that every other claimer arrives meanwhile.
                tokio::time::sleep(Duration::from_millis(1500)).await;
                charge(&calls, "race-run").await
            })
            .await
        })
    }))
    .await;
    let results: Vec<_> = runs.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "executed once: {results:?}"
    );
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let busy = results
        .iter()
        .filter(|r| matches!(r, Err(IdempotencyError::InProgress { .. })))
        .count();
    assert_eq!((ok, busy), (1, N - 1), "{results:?}");
    let again: String = idem
        .run(&k, "{}", soon(), || charge(&calls, "race-run"))
        .await
        .unwrap();
    assert_eq!(again, "receipt race-run #1");
}
