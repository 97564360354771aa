//! The dispatcher Lambda: a schedule tick or a manual invoke creates or
//! resumes a run and dispatches it; an unfinished run continues in a fresh
//! invocation (see `settle_lambda::self_invoke`).
use lambda_runtime::{service_fn, Error, LambdaEvent};
use settle_lambda::dispatcher::stop_at;
use settle_lambda::self_invoke::SelfInvoke;
use settle_lambda::{cold_start, invocation_deadline, telemetry};
use settle_lambda::{DispatchRequest, DispatcherFunction};
use std::sync::Arc;

#[tokio::main]
async fn main() -> Result<(), Error> {
    telemetry::init();
    let settings = cold_start(
        "read settings",
        settle_lambda::DispatcherSettings::from_env(),
    )?;
    let cfg = cold_start("read config", settle_aws::AwsConfig::from_env())?;
    let sdk = settle_aws::sdk_config().await;
    let aws = cold_start("connect", settle_aws::connect_with(&sdk, &cfg).await)?;
    let next = Arc::new(cold_start("self-invoke", SelfInvoke::from_env(&sdk))?);
    let (backend, max) = (aws.backend(), aws.work_max_receive_count());
    let function = &cold_start(
        "check settings",
        DispatcherFunction::new(backend, settings.run, max, next),
    )?;
    let margin = settings.margin;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<serde_json::Value>| async move {
            let request = DispatchRequest::parse(&event.payload)?;
            let deadline = invocation_deadline(event.context.deadline);
            let stop = deadline.map(|d| stop_at(d, margin)).transpose()?;
            function
                .handle(request, &event.context.request_id, stop)
                .await
        },
    ))
    .await
}
