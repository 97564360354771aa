//! The http processor's secret header value, read once at cold start from
//! SSM Parameter Store or Secrets Manager. The value is never logged and
//! never shown: [`SecretValue`]'s Debug prints its length only, and the
//! errors name the secret, never what it holds.

use crate::settings::SecretSource;

/// A secret's value; its Debug output hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(String);

impl SecretValue {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The value itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretValue(*** {} bytes)", self.0.len())
    }
}

/// Why the secret could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("read {source_name}: GetParameter failed: {detail}")]
    Ssm {
        source_name: SecretSource,
        /// What the service said (its code and message), or why no answer came.
        detail: String,
        #[source]
        source: Box<
            aws_sdk_ssm::error::SdkError<aws_sdk_ssm::operation::get_parameter::GetParameterError>,
        >,
    },
    #[error("read {source_name}: GetSecretValue failed: {detail}")]
    SecretsManager {
        source_name: SecretSource,
        detail: String,
        #[source]
        source: Box<
            aws_sdk_secretsmanager::error::SdkError<
                aws_sdk_secretsmanager::operation::get_secret_value::GetSecretValueError,
            >,
        >,
    },
    /// The store answered, without a text value to send.
    #[error("read {source_name}: {reason}")]
    NoValue {
        source_name: SecretSource,
        reason: &'static str,
    },
}

/// Reads the secret `source` names with the clients of `sdk` (whose
/// endpoint resolution honours `AWS_ENDPOINT_URL` and
/// `AWS_ENDPOINT_URL_SSM` / `AWS_ENDPOINT_URL_SECRETS_MANAGER`).
pub async fn read_secret(
    sdk: &aws_config::SdkConfig,
    source: &SecretSource,
) -> Result<SecretValue, SecretError> {
    let no_value = |reason| SecretError::NoValue {
        source_name: source.clone(),
        reason,
    };
    let value = match source {
        SecretSource::Ssm(name) => aws_sdk_ssm::Client::new(sdk)
            .get_parameter()
            .name(name)
            // A SecureString comes back decrypted; other kinds ignore this.
            .with_decryption(true)
            .send()
            .await
            .map_err(|e| SecretError::Ssm {
                source_name: source.clone(),
                detail: settle_aws::describe(&e),
                source: Box::new(e),
            })?
            .parameter
            .and_then(|p| p.value)
            .ok_or_else(|| no_value("the parameter has no value"))?,
        SecretSource::SecretsManager(name) => aws_sdk_secretsmanager::Client::new(sdk)
            .get_secret_value()
            .secret_id(name)
            .send()
            .await
            .map_err(|e| SecretError::SecretsManager {
                source_name: source.clone(),
                detail: settle_aws::describe(&e),
                source: Box::new(e),
            })?
            .secret_string
            .ok_or_else(|| {
                no_value("the secret has no SecretString (a binary secret cannot be a header)")
            })?,
    };
    Ok(SecretValue::new(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let v = SecretValue::new("Bearer hunter2".into());
        let shown = format!("{v:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(shown, "SecretValue(*** 14 bytes)");
        assert_eq!(v.expose(), "Bearer hunter2");
    }
}
