//! The worker Lambda's whole life: what a worker binary's `main` calls.
//!
//! - [`run_worker`] runs the user's own [`Processor`], the one their CLI
//!   runs (`settle_cli::Settle::processor`), as the worker Lambda.
//! - [`run_stock_worker`] runs the processor `SETTLE_PROCESSOR` names: the
//!   scripted test bed, an HTTP endpoint, or the user's own Lambda function.
//!
//! Both set up JSON logging, read their settings and connect the AWS
//! backend once at cold start; a failure there ends the process with one
//! log line naming what failed, so Lambda reports an init error.

use crate::function::{FunctionProcessor, LambdaInvoker};
use crate::secret::read_secret;
use crate::settings::{ProcessorSettings, WorkerSettings};
use crate::{cold_start, deadline_instant, invocation_deadline, telemetry};
use crate::{SqsEvent, WorkerFunction};
use lambda_runtime::{service_fn, Error, LambdaEvent};
use settle_core::Processor;
use std::sync::Arc;

/// Items of a batch the http processor sends at once: the template's
/// batch size, so a batch's requests all go out together.
pub const HTTP_PARALLELISM: usize = 10;

/// Runs `processor` as the worker Lambda until the runtime stops it.
///
/// ```no_run
/// # #[derive(Debug)] struct Renewals;
/// # #[async_trait::async_trait] impl settle_core::Processor for Renewals {
/// #   async fn process(&self, _: &settle_core::Item, _: &settle_core::AttemptContext)
/// #     -> Result<Option<settle_core::domain::Output>, settle_core::ProcessError> { Ok(None) } }
/// #[tokio::main]
/// async fn main() -> Result<(), settle_lambda::Error> {
///     settle_lambda::run_worker(Renewals).await
/// }
/// ```
pub async fn run_worker(processor: impl Processor) -> Result<(), Error> {
    telemetry::init();
    // The template sets SETTLE_PROCESSOR for the stock worker; a binary with
    // its own processor says so rather than seem to obey it.
    if let Ok(kind) = std::env::var("SETTLE_PROCESSOR") {
        if !matches!(kind.trim(), "" | "scripted") {
            tracing::warn!(SETTLE_PROCESSOR = %kind,
                "this worker runs its own processor; SETTLE_PROCESSOR is ignored");
        }
    }
    let settings = cold_start("read settings", WorkerSettings::from_env())?;
    let cfg = cold_start("read config", settle_aws::AwsConfig::from_env())?;
    let aws = cold_start("connect", settle_aws::connect(&cfg).await)?;
    let function = WorkerFunction::new(&aws.backend(), Arc::new(processor), settings.worker);
    serve(function).await
}

/// Runs the stock worker: the processor that `SETTLE_PROCESSOR` names.
pub async fn run_stock_worker() -> Result<(), Error> {
    telemetry::init();
    let settings = cold_start("read settings", WorkerSettings::from_env())?;
    let kind = cold_start("read settings", ProcessorSettings::from_env())?;
    let cfg = cold_start("read config", settle_aws::AwsConfig::from_env())?;
    let sdk = settle_aws::sdk_config().await;
    let aws = cold_start("connect", settle_aws::connect_with(&sdk, &cfg).await)?;
    let backend = aws.backend();
    let function = cold_start(
        "set up the processor",
        stock_function(&sdk, &backend, &kind, settings).await,
    )?;
    serve(function).await
}

/// Why the stock worker's processor cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Secret(#[from] crate::secret::SecretError),
    #[error(transparent)]
    Http(#[from] settle_processors::SpecError),
}

/// The stock worker's handler for `kind`; reads the http processor's
/// secret, if it has one, here and only here.
pub async fn stock_function(
    sdk: &aws_config::SdkConfig,
    backend: &settle_core::Backend,
    kind: &ProcessorSettings,
    settings: WorkerSettings,
) -> Result<WorkerFunction, SetupError> {
    let config = settings.worker;
    Ok(match kind {
        ProcessorSettings::Scripted => {
            WorkerFunction::new(backend, Arc::new(settle_core::Scripted), config)
        }
        ProcessorSettings::Http {
            url,
            secret,
            header,
        } => {
            let headers = match secret {
                Some(source) => {
                    let value = read_secret(sdk, source).await?;
                    vec![(header.clone(), value.expose().to_owned())]
                }
                None => Vec::new(),
            };
            let http = settle_processors::http::Http::new(url, &headers, HTTP_PARALLELISM)?;
            tracing::info!(url = %url, secret = ?secret.as_ref().map(ToString::to_string),
                header = %header, "the worker POSTs each item");
            WorkerFunction::new(backend, Arc::new(http), config)
        }
        ProcessorSettings::Function { name } => {
            let invoker = LambdaInvoker::new(aws_sdk_lambda::Client::new(sdk), name.clone());
            tracing::info!(function = %name, "the worker invokes the function once per batch");
            WorkerFunction::batched(backend, Arc::new(FunctionProcessor::new(invoker)), config)
        }
    })
}

/// Hands each invocation to `function` until the runtime stops.
async fn serve(function: WorkerFunction) -> Result<(), Error> {
    let function = &function;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        let deadline = invocation_deadline(event.context.deadline).map(deadline_instant);
        function.handle(event.payload, deadline).await
    }))
    .await
}
