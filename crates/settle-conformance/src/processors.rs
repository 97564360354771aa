//! Processors for the backends' tests.

use settle_core::domain::{Item, Output, ProcessError};
use settle_core::{AttemptContext, Processor};
use std::time::Duration;

/// Fails every item as retryable; items whose id starts with "wait" ask
/// for their retry no sooner than the given delay (a gateway's 429 with
/// `Retry-After`).
#[derive(Debug)]
pub struct AsksToWait(pub Duration);

#[async_trait::async_trait]
impl Processor for AsksToWait {
    async fn process(
        &self,
        item: &Item,
        _ctx: &AttemptContext,
    ) -> Result<Option<Output>, ProcessError> {
        let e = ProcessError::retryable("busy");
        if item.id.as_str().starts_with("wait") {
            return Err(e.with_retry_after(self.0));
        }
        Err(e)
    }
}
