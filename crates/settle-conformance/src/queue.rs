//! Clauses of the queue contract (`settle_core::ports::Queue`): SQS
//! semantics of delivery, visibility, limits and the redrive policy.

use crate::{delete_all, receive_n, Subject, AFTER_VIS, VIS};
use settle_core::message::MAX_BODY_BYTES;
use std::collections::BTreeSet;
use std::time::Duration;

/// Sent messages arrive once each, hidden after receipt; deleted ones are gone.
pub async fn queue_send_receive_delete(s: &Subject) {
    let q = s.work.as_ref();
    q.send(vec!["a".into(), "b".into(), "c".into()])
        .await
        .unwrap();
    let got = receive_n(q, 3, VIS).await;
    let bodies: BTreeSet<_> = got.iter().map(|d| d.body.as_str()).collect();
    assert_eq!(bodies, BTreeSet::from(["a", "b", "c"]));
    assert!(got.iter().all(|d| d.receive_count == 1));
    let ids: BTreeSet<_> = got.iter().map(|d| &d.message_id).collect();
    assert_eq!(ids.len(), 3, "message ids are distinct");
    assert!(
        q.receive(10, VIS).await.unwrap().is_empty(),
        "received messages are hidden"
    );
    delete_all(q, &got).await;
    tokio::time::sleep(AFTER_VIS).await;
    assert!(
        receive_n(q, 1, VIS).await.is_empty(),
        "deleted messages never come back"
    );
    assert_eq!(q.depth().await.unwrap().total(), 0);
}

/// A message not deleted within its visibility timeout is delivered again,
/// with the same id, a higher receive count and a new receipt.
pub async fn queue_visibility_timeout_redelivers(s: &Subject) {
    let q = s.work.as_ref();
    q.send(vec!["x".into()]).await.unwrap();
    let received = std::time::Instant::now();
    let first = receive_n(q, 1, VIS).await.pop().unwrap();
    let depth = q.depth().await.unwrap();
    // Only meaningful while the timeout can still be running: on a loaded
    // machine the count may come back after it expired.
    if received.elapsed() < VIS {
        assert_eq!((depth.visible, depth.in_flight), (0, 1));
    }
    tokio::time::sleep(AFTER_VIS).await;
    let second = receive_n(q, 1, VIS).await.pop().unwrap();
    assert_eq!(second.message_id, first.message_id);
    assert_eq!(second.receive_count, 2);
    assert_ne!(second.receipt, first.receipt);
    q.delete(vec![second.receipt]).await.unwrap();
    tokio::time::sleep(AFTER_VIS).await;
    assert!(receive_n(q, 1, VIS).await.is_empty());
}

/// Changing the visibility to zero makes a message receivable at once;
/// a longer one keeps it hidden past the original timeout.
pub async fn queue_change_visibility(s: &Subject) {
    let q = s.work.as_ref();
    q.send(vec!["x".into()]).await.unwrap();
    let d = receive_n(q, 1, Duration::from_secs(30))
        .await
        .pop()
        .unwrap();
    q.change_visibility(&d.receipt, Duration::ZERO)
        .await
        .unwrap();
    let again = receive_n(q, 1, VIS)
        .await
        .pop()
        .expect("visible again at once");
    assert_eq!(again.message_id, d.message_id);
    q.change_visibility(&again.receipt, Duration::from_secs(3))
        .await
        .unwrap();
    tokio::time::sleep(AFTER_VIS).await;
    assert!(
        q.receive(10, VIS).await.unwrap().is_empty(),
        "still hidden by the longer timeout"
    );
    // A zero visibility timeout still returns a message once per receive call.
    q.send(vec!["zero".into()]).await.unwrap();
    let zero = q.receive(10, Duration::ZERO).await.unwrap();
    let zeros = zero.iter().filter(|d| d.body == "zero").count();
    assert!(
        zeros <= 1,
        "one receive returned the same message {zeros} times"
    );
}

/// Batches over 10 entries and bodies over 256 KiB are refused, and nothing is sent.
pub async fn queue_limits(s: &Subject) {
    let q = s.work.as_ref();
    let eleven: Vec<String> = (0..11).map(|i| i.to_string()).collect();
    assert!(q.send(eleven).await.is_err(), "11 entries are refused");
    assert!(
        q.receive(11, VIS).await.is_err(),
        "receive of 11 is refused"
    );
    let big = "x".repeat(MAX_BODY_BYTES + 1);
    assert!(
        q.send(vec![big]).await.is_err(),
        "an oversize body is refused"
    );
    assert_eq!(q.depth().await.unwrap().total(), 0, "nothing was sent");
}

/// After `work_max_receives` receives without a delete, the message moves to
/// the dead-letter queue, body intact.
pub async fn queue_redrive_to_dlq(s: &Subject) {
    let q = s.work.as_ref();
    q.send(vec!["poison".into()]).await.unwrap();
    for n in 1..=s.work_max_receives {
        let d = receive_n(q, 1, VIS)
            .await
            .pop()
            .unwrap_or_else(|| panic!("receive {n}"));
        assert_eq!(d.receive_count, n);
        tokio::time::sleep(AFTER_VIS).await;
    }
    assert!(
        receive_n(q, 1, VIS).await.is_empty(),
        "not delivered past the limit"
    );
    let dead = receive_n(s.dlq.as_ref(), 1, VIS).await;
    assert_eq!(dead.len(), 1, "moved to the DLQ");
    assert_eq!(dead[0].body, "poison");
}

/// Messages sent in one call are still separate messages: each has its own
/// visibility, receive count, receipt and redrive, and depth counts each.
pub async fn queue_messages_of_one_send_are_independent(s: &Subject) {
    let q = s.work.as_ref();
    let long = Duration::from_secs(30);
    q.send(vec!["a".into(), "b".into(), "c".into()])
        .await
        .unwrap();
    let first = receive_n(q, 1, VIS).await.pop().unwrap();
    let depth = q.depth().await.unwrap();
    assert_eq!((depth.visible, depth.in_flight), (2, 1));
    let rest = receive_n(q, 2, long).await;
    assert_eq!(rest.len(), 2);
    let mut bodies: BTreeSet<_> = rest.iter().map(|d| d.body.as_str()).collect();
    bodies.insert(first.body.as_str());
    assert_eq!(bodies, BTreeSet::from(["a", "b", "c"]));
    let (gone, kept) = (&rest[0], &rest[1]);
    q.delete(vec![gone.receipt.clone()]).await.unwrap();
    q.change_visibility(&kept.receipt, Duration::ZERO)
        .await
        .unwrap();
    let kept = receive_n(q, 1, long)
        .await
        .pop()
        .expect("visible again at once");
    assert_eq!(
        (kept.body.as_str(), kept.receive_count),
        (rest[1].body.as_str(), 2)
    );
    tokio::time::sleep(AFTER_VIS).await;
    let mut again = receive_n(q, 3, VIS).await;
    assert_eq!(
        again.len(),
        1,
        "one message lapsed, one is deleted, one hidden"
    );
    let mut last = again.pop().unwrap();
    assert_eq!(
        (&last.message_id, last.receive_count),
        (&first.message_id, 2)
    );
    while last.receive_count < s.work_max_receives {
        tokio::time::sleep(AFTER_VIS).await;
        let n = last.receive_count;
        last = receive_n(q, 1, VIS).await.pop().expect("redelivered");
        assert_eq!(
            (&last.message_id, last.receive_count),
            (&first.message_id, n + 1)
        );
    }
    // At its limit, only that message moves to the DLQ.
    tokio::time::sleep(AFTER_VIS).await;
    assert!(receive_n(q, 3, VIS).await.is_empty());
    let dead = receive_n(s.dlq.as_ref(), 3, VIS).await;
    assert_eq!(dead.len(), 1, "only the message at its limit moved");
    assert_eq!(dead[0].body, first.body);
    let depth = q.depth().await.unwrap();
    assert_eq!((depth.visible, depth.in_flight), (0, 1));
    q.delete(vec![kept.receipt.clone()]).await.unwrap();
    assert_eq!(q.depth().await.unwrap().total(), 0);
}

/// A message sent with a delay is not received before it; the others of
/// its send are received at once. A delay past the limit is refused. A
/// batch visibility change acts on each message it names.
pub async fn queue_delayed_send_and_batch_visibility(s: &Subject) {
    let q = s.work.as_ref();
    q.send_delayed(vec![
        ("now".into(), Duration::ZERO),
        ("later".into(), Duration::from_secs(2)),
    ])
    .await
    .unwrap();
    let first = receive_n(q, 2, Duration::from_secs(30)).await;
    assert_eq!(
        first.iter().map(|d| d.body.as_str()).collect::<Vec<_>>(),
        ["now"],
        "the delayed message waits"
    );
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let later = receive_n(q, 1, Duration::from_secs(30)).await;
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].body, "later");
    let too_long = settle_core::ports::MAX_SEND_DELAY + Duration::from_secs(1);
    assert!(matches!(
        q.send_delayed(vec![("x".into(), too_long)]).await,
        Err(settle_core::ports::PortError::Invalid(_))
    ));

    // Both back at once by one call.
    q.change_visibility_batch(
        vec![first[0].receipt.clone(), later[0].receipt.clone()],
        Duration::ZERO,
    )
    .await
    .unwrap();
    let again = receive_n(q, 2, VIS).await;
    assert_eq!(again.len(), 2, "both visible again");
}
