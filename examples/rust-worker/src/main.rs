//! The renewals processor of `examples/rust` as the worker Lambda. The
//! template's `WorkerFunction` builds this binary when its
//! `Metadata: BuildProperties: Binary` names `renewals-worker` (docs/lambda.md).
#[tokio::main]
async fn main() -> Result<(), settle_lambda::Error> {
    settle_lambda::run_worker(settle_example_renewals::Renewals).await
}
