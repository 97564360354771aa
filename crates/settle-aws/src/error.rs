//! An AWS call's failure, with the SDK's error kept as its source and its
//! kind told from the error itself (the service's error code, or that no
//! answer came), never from its message.

use aws_runtime::retries::classifiers::THROTTLING_ERRORS;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use settle_core::ports::PortError;
use std::fmt;

/// What an AWS call met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AwsErrorKind {
    /// The service answered with a throttling code, one of the SDK's own
    /// list (`THROTTLING_ERRORS`, which its retries back off on): the
    /// retries ran out.
    Throttled,
    /// The service refused the request for another reason.
    Service,
    /// No answer from the service: the request could not be built or sent,
    /// timed out, or its response did not parse.
    NoAnswer,
}

/// A failed AWS call: what it was on (`table NAME`, `queue URL`), the
/// service's error code if it answered, and the SDK's error as the source.
#[derive(Debug)]
pub struct AwsError {
    target: String,
    kind: AwsErrorKind,
    code: Option<String>,
    /// One line for the error (see `crate::describe`), made while the
    /// SDK's error still has its operation's type.
    summary: String,
    source: SdkSource,
}

/// The SDK's error, as its service's error type (boxed: they are large).
#[derive(Debug, thiserror::Error)]
pub enum SdkSource {
    #[error(transparent)]
    DynamoDb(Box<aws_sdk_dynamodb::Error>),
    #[error(transparent)]
    Sqs(Box<aws_sdk_sqs::Error>),
}

impl AwsError {
    /// A failed DynamoDB call on `target`.
    pub(crate) fn dynamodb<E, R>(target: impl Into<String>, e: SdkError<E, R>) -> Self
    where
        E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
        R: fmt::Debug,
        aws_sdk_dynamodb::Error: From<SdkError<E, R>>,
    {
        let (kind, code, summary) = classify(&e);
        Self {
            target: target.into(),
            kind,
            code,
            summary,
            source: SdkSource::DynamoDb(Box::new(e.into())),
        }
    }

    /// A failed SQS call on `target`.
    pub(crate) fn sqs<E, R>(target: impl Into<String>, e: SdkError<E, R>) -> Self
    where
        E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
        R: fmt::Debug,
        aws_sdk_sqs::Error: From<SdkError<E, R>>,
    {
        let (kind, code, summary) = classify(&e);
        Self {
            target: target.into(),
            kind,
            code,
            summary,
            source: SdkSource::Sqs(Box::new(e.into())),
        }
    }

    pub fn kind(&self) -> AwsErrorKind {
        self.kind
    }

    pub fn is_throttling(&self) -> bool {
        self.kind == AwsErrorKind::Throttled
    }

    /// The service's error code, when the service answered.
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// The AWS error behind a port error of this backend, if any.
    pub fn of(e: &PortError) -> Option<&AwsError> {
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = next {
            if let Some(aws) = err.downcast_ref::<AwsError>() {
                return Some(aws);
            }
            next = err.source();
        }
        None
    }
}

fn classify<E, R>(e: &SdkError<E, R>) -> (AwsErrorKind, Option<String>, String)
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
    R: fmt::Debug,
{
    let summary = crate::describe(e);
    match e.as_service_error() {
        Some(se) => {
            let code = se.code().map(str::to_owned);
            let kind = match code.as_deref() {
                Some(c) if THROTTLING_ERRORS.contains(&c) => AwsErrorKind::Throttled,
                _ => AwsErrorKind::Service,
            };
            (kind, code, summary)
        }
        None => (AwsErrorKind::NoAnswer, None, summary),
    }
}

impl fmt::Display for AwsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.target.is_empty() {
            f.write_str(&self.summary)
        } else {
            write!(f, "{}: {}", self.target, self.summary)
        }
    }
}

impl std::error::Error for AwsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use aws_sdk_dynamodb::operation::put_item::PutItemError;
    use aws_sdk_sqs::operation::send_message_batch::SendMessageBatchError;
    use aws_smithy_runtime_api::http::{Response, StatusCode};
    use aws_smithy_types::body::SdkBody;
    use aws_smithy_types::error::ErrorMetadata;

    fn response(status: u16) -> Response {
        Response::new(StatusCode::try_from(status).unwrap(), SdkBody::empty())
    }

    fn put_item_error(code: &str) -> SdkError<PutItemError, Response> {
        let meta = ErrorMetadata::builder()
            .code(code)
            .message("slow down")
            .build();
        SdkError::service_error(PutItemError::generic(meta), response(400))
    }

    #[test]
    fn throttling_is_told_by_the_error_code() {
        for code in [
            "ProvisionedThroughputExceededException",
            "ThrottlingException",
            "RequestLimitExceeded",
        ] {
            let e = AwsError::dynamodb("table t", put_item_error(code));
            assert_eq!(e.kind(), AwsErrorKind::Throttled, "{code}");
            assert_eq!(e.code(), Some(code));
        }
        let e = AwsError::dynamodb("table t", put_item_error("ValidationException"));
        assert_eq!(e.kind(), AwsErrorKind::Service);
        assert!(!e.is_throttling());
        assert_eq!(e.to_string(), "table t: ValidationException: slow down");
    }

    #[test]
    fn the_sdk_error_is_the_source_and_found_behind_a_port_error() {
        let meta = ErrorMetadata::builder().code("RequestThrottled").build();
        let sdk = SdkError::service_error(SendMessageBatchError::generic(meta), response(400));
        let port = PortError::backend("SQS.SendMessageBatch", AwsError::sqs("queue q", sdk));
        let aws = AwsError::of(&port).unwrap();
        assert!(aws.is_throttling());
        let source = std::error::Error::source(aws).unwrap();
        assert!(source.downcast_ref::<SdkSource>().is_some());
    }

    #[test]
    fn a_call_without_an_answer_has_no_code() {
        let e: SdkError<PutItemError, Response> = SdkError::timeout_error("operation timed out");
        let e = AwsError::dynamodb("table t", e);
        assert_eq!((e.kind(), e.code()), (AwsErrorKind::NoAnswer, None));
    }
}
