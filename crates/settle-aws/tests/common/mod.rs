//! A fresh AWS stack on the emulator as a conformance [`Subject`].

use settle_aws::provision::{create_stack, Stack};
use settle_conformance::Subject;

/// A fresh stack whose work queue dead-letters after `work_max_receives`.
pub async fn fresh(work_max_receives: u32) -> Subject {
    if std::env::var("AWS_ENDPOINT_URL").map_or(true, |v| v.trim().is_empty()) {
        panic!(
            "AWS_ENDPOINT_URL is not set: these tests run against the local emulator. \
             start the emulator: eval \"$(infra/emulator.sh up)\", or run make test"
        );
    }
    let sdk = settle_aws::sdk_config().await;
    let stack = Stack::default_stack().expect("infra/stack.json");
    let prefix = format!(
        "t{}-{:06x}-",
        settle_core::domain::now_millis(),
        fastrand::u32(..0x0100_0000)
    );
    let cfg = create_stack(&sdk, &stack, &prefix, Some(work_max_receives))
        .await
        .expect("create the test stack on the emulator");
    let aws = settle_aws::connect_with(&sdk, &cfg).await.expect("connect");
    assert_eq!(aws.work_max_receive_count(), Some(work_max_receives));
    let b = aws.backend();
    Subject {
        work: b.work,
        dlq: b.dlq,
        results: b.results,
        source: b.source,
        ledger: b.ledger,
        idempotency: b.idempotency,
        work_max_receives,
        cheap_dlq_scan: b.capabilities.cheap_dlq_scan,
    }
}
