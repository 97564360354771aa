//! The renewals processor: the user's own work, written once against
//! `settle_core::Processor` and run by the `renewals` CLI (src/main.rs) and
//! by the `renewals-worker` Lambda (examples/rust-worker).
//!
//! An item's payload: `{"user": "u-1", "plan": "pro", "card": "4242..."}`.
//! Cards ending 0002 are declined (permanent: retrying will not help), 0119
//! time out at the gateway (retried); the rest are charged, once per run
//! thanks to the idempotency key.

use settle_core::domain::{Item, Output, ProcessError};
use settle_core::{AttemptContext, Processor};

/// Renews one subscription.
#[derive(Debug)]
pub struct Renewals;

#[derive(serde::Deserialize)]
struct Renewal {
    user: String,
    plan: String,
    card: String,
}

#[async_trait::async_trait]
impl Processor for Renewals {
    async fn process(
        &self,
        item: &Item,
        ctx: &AttemptContext,
    ) -> Result<Option<Output>, ProcessError> {
        let r: Renewal = serde_json::from_str(item.payload.get())
            .map_err(|e| ProcessError::permanent(format!("not a renewal: {e}")))?;
        let cents = match r.plan.as_str() {
            "basic" => 500,
            "pro" => 1500,
            "team" => 4900,
            other => return Err(ProcessError::permanent(format!("unknown plan {other:?}"))),
        };
        let last4 = &r.card[r.card.len().saturating_sub(4)..];
        ctx.log(format!(
            "renewing {} on {}: charging {cents} cents to card ...{last4} (attempt {})\n",
            r.user, r.plan, ctx.attempt
        ));
        match last4 {
            "0002" => Err(ProcessError::permanent(format!("card ...{last4} declined"))),
            "0119" => Err(ProcessError::retryable("gateway timeout")),
            _ => {
                // A real gateway takes the key, so a duplicate cannot charge twice.
                let charge = format!("ch_{}", ctx.idempotency_key.replace(':', "_"));
                ctx.log(format!("charged: {charge}\n"));
                Output::json(&serde_json::json!({
                    "user": r.user, "amount_cents": cents, "charge": charge,
                }))
                .map(Some)
                .map_err(|e| ProcessError::permanent(e.to_string()))
            }
        }
    }
}
