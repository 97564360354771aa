//! A fresh embedded backend as a conformance [`Subject`], one database file
//! per call.

use settle_conformance::Subject;
use settle_embedded::Embedded;
use std::sync::Arc;

/// A new database whose work queue dead-letters after `work_max_receives`.
pub async fn fresh(work_max_receives: u32) -> Subject {
    fresh_with(work_max_receives, false).await
}

/// [`fresh`], opened inline ([`Embedded::open_inline`]) if `inline`.
pub async fn fresh_with(work_max_receives: u32, inline: bool) -> Subject {
    // The directory lives as long as the test process.
    let dir = tempfile::tempdir().expect("temp dir").keep();
    let path = dir.join("settle.db");
    let e = if inline {
        Embedded::open_inline(&path).await
    } else {
        Embedded::open(&path).await
    }
    .expect("open");
    e.work
        .set_redrive(&e.dlq, work_max_receives)
        .await
        .expect("redrive policy");
    Subject {
        work: Arc::new(e.work.clone()),
        dlq: Arc::new(e.dlq.clone()),
        results: Arc::new(e.results.clone()),
        source: Arc::new(e.store.clone()),
        ledger: Arc::new(e.store.clone()),
        idempotency: Arc::new(e.idempotency.clone()),
        work_max_receives,
        cheap_dlq_scan: settle_embedded::CAPABILITIES.cheap_dlq_scan,
    }
}
