//! The stock worker Lambda: work-queue batches through the processor that
//! `SETTLE_PROCESSOR` names (scripted, http or function; docs/lambda.md).
#[tokio::main]
async fn main() -> Result<(), settle_lambda::Error> {
    settle_lambda::run_stock_worker().await
}
