//! `Limited`: a processor that does not bound itself is held to N items at
//! once, however many the worker hands it together.
#![allow(clippy::unwrap_used)]

use async_trait::async_trait;
use serde_json::value::RawValue;
use settle_core::domain::{now_millis, Item, ItemId, Output, ProcessError, RunId};
use settle_core::{AttemptContext, Processor};
use settle_processors::Limited;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Counts the attempts in its hands, and the most at once.
#[derive(Default)]
struct Counting {
    now: AtomicUsize,
    most: AtomicUsize,
}

#[async_trait]
impl Processor for Counting {
    async fn process(&self, _: &Item, _: &AttemptContext) -> Result<Option<Output>, ProcessError> {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(n, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        Ok(None)
    }
}

async fn most_at_once(limit: usize, calls: usize) -> usize {
    let counting = Arc::new(Counting::default());
    let limited = Limited::new(counting.clone(), limit);
    let run = RunId::generate(now_millis());
    let items: Vec<Item> = (0..calls)
        .map(|i| {
            Item::new(
                ItemId::new(format!("i{i}")).unwrap(),
                RawValue::from_string("null".into()).unwrap(),
            )
        })
        .collect();
    let ctxs: Vec<AttemptContext> = items
        .iter()
        .map(|i| AttemptContext::new(run.clone(), i, 1))
        .collect();
    let results =
        futures::future::join_all(items.iter().zip(&ctxs).map(|(i, c)| limited.process(i, c)))
            .await;
    assert!(results.iter().all(Result::is_ok));
    counting.most.load(Ordering::SeqCst)
}

#[tokio::test]
async fn at_most_n_attempts_run_at_once() {
    assert_eq!(most_at_once(1, 20).await, 1);
    assert_eq!(most_at_once(3, 20).await, 3);
    // Fewer calls than places: all at once.
    assert_eq!(most_at_once(64, 20).await, 20);
}
