//! The continuation on AWS: the dispatcher invokes itself asynchronously
//! with `{"resume": RUN_ID}`.
//!
//! Why this and not another mechanism:
//! - It needs no extra resource: no continuation queue, no state machine.
//!   The run's cursor is already saved in the ledger, so the payload only
//!   names the run.
//! - An asynchronous (`Event`) invoke returns once Lambda has queued the
//!   event, so the handover is durable before this invocation ends, and
//!   Lambda retries the new invocation twice if it fails.
//! - If the handover is lost anyway, nothing is: the run stays unfinished
//!   with its cursor saved, and `{"resume": RUN_ID}` (or `settle resume`)
//!   continues it. A Step Functions loop would add retries and a visible
//!   history, at the cost of a state machine per deployment; a queue
//!   consumed by the dispatcher would be detected as a recursive loop after
//!   16 hops. Neither is needed for a chain whose every link saves its
//!   progress.

use crate::dispatcher::Continuation;
use async_trait::async_trait;
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::InvocationType;
use settle_core::ports::BoxError;
use settle_core::RunId;

/// Invokes `function` (this function's own name) with `{"resume": run}`.
#[derive(Debug, Clone)]
pub struct SelfInvoke {
    client: aws_sdk_lambda::Client,
    function: String,
}

/// Lambda sets this variable to the function's name in every execution environment.
pub const FUNCTION_NAME_VAR: &str = "AWS_LAMBDA_FUNCTION_NAME";

impl SelfInvoke {
    pub fn new(client: aws_sdk_lambda::Client, function: String) -> Self {
        Self { client, function }
    }

    /// The client for `sdk`, invoking the function named by
    /// `AWS_LAMBDA_FUNCTION_NAME`; the error names the variable if it is unset.
    pub fn from_env(sdk: &aws_config::SdkConfig) -> Result<Self, BoxError> {
        let function = std::env::var(FUNCTION_NAME_VAR)
            .ok()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                format!(
                    "missing environment variable {FUNCTION_NAME_VAR}: the dispatcher \
                     continues an unfinished run by invoking itself, by this name"
                )
            })?;
        Ok(Self::new(aws_sdk_lambda::Client::new(sdk), function))
    }
}

#[async_trait]
impl Continuation for SelfInvoke {
    async fn resume_later(&self, run: &RunId) -> Result<(), BoxError> {
        let payload = serde_json::json!({ "resume": run.as_str() }).to_string();
        let out = self
            .client
            .invoke()
            .function_name(&self.function)
            .invocation_type(InvocationType::Event)
            .payload(Blob::new(payload))
            .send()
            .await
            .map_err(|e| {
                format!(
                    "Invoke {} (asynchronous, resume {run}): {}",
                    self.function,
                    aws_sdk_lambda::error::DisplayErrorContext(&e)
                )
            })?;
        // 202 Accepted: the event is queued for a fresh invocation.
        if out.status_code() != 202 {
            return Err(format!(
                "Invoke {} (asynchronous, resume {run}) answered status {}, want 202",
                self.function,
                out.status_code()
            )
            .into());
        }
        Ok(())
    }
}
