//! The embedded backend against the shared conformance suite.

use settle_conformance::{conformance_tests, Subject};
use settle_embedded::Embedded;
use std::sync::Arc;

async fn fresh() -> Subject {
    // Each clause gets its own database file; the directory lives as long as the test process.
    let dir = tempfile::tempdir().expect("temp dir").keep();
    let e = Embedded::open(&dir.join("settle.db")).await.expect("open");
    e.work.set_redrive(&e.dlq, 2).await.expect("redrive policy");
    Subject {
        work: Arc::new(e.work.clone()),
        dlq: Arc::new(e.dlq.clone()),
        results: Arc::new(e.results.clone()),
        source: Arc::new(e.store.clone()),
        ledger: Arc::new(e.store.clone()),
        work_max_receives: 2,
    }
}

conformance_tests!(fresh());
