//! The worker Lambda: batches from the work queue through the core's worker.
use lambda_runtime::{service_fn, Error, LambdaEvent};
use settle_lambda::{cold_start, deadline_instant, invocation_deadline, telemetry};
use settle_lambda::{SqsEvent, WorkerFunction};
use std::sync::Arc;

#[tokio::main]
async fn main() -> Result<(), Error> {
    telemetry::init();
    let settings = cold_start("read settings", settle_lambda::WorkerSettings::from_env())?;
    let cfg = cold_start("read config", settle_aws::AwsConfig::from_env())?;
    let aws = cold_start("connect", settle_aws::connect(&cfg).await)?;
    let processor = Arc::new(settle_core::Scripted);
    let function = &WorkerFunction::new(&aws.backend(), processor, settings.worker);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        let deadline = invocation_deadline(event.context.deadline).map(deadline_instant);
        function.handle(event.payload, deadline).await
    }))
    .await
}
