//! The reducer Lambda: batches from the results queue into the ledger.
use lambda_runtime::{service_fn, Error, LambdaEvent};
use settle_lambda::{cold_start, telemetry, ReducerFunction, SqsEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    telemetry::init();
    let cfg = cold_start("read config", settle_aws::AwsConfig::from_env())?;
    let aws = cold_start("connect", settle_aws::connect(&cfg).await)?;
    let function = &ReducerFunction::new(&aws.backend());
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        function.handle(event.payload).await
    }))
    .await
}
