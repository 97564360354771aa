//! The http processor's secret header, read at cold start from SSM
//! Parameter Store and from Secrets Manager on the AWS emulator
//! (moto_server). Needs the emulator's environment
//! (`eval "$(infra/emulator.sh up)"`, which `make test` does); without it
//! each test fails and says so.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test.

mod common;

use common::*;
use settle_lambda::secret::{read_secret, SecretError};
use settle_lambda::{ProcessorSettings, SecretSource, WorkerSettings};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::time::Instant;

async fn sdk() -> aws_config::SdkConfig {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    assert!(
        set("AWS_ENDPOINT_URL"),
        "AWS_ENDPOINT_URL is not set: this test reads secrets from the local AWS emulator. \
         Start it with `eval \"$(infra/emulator.sh up)\"` (or run `make test`, which does)"
    );
    settle_aws::sdk_config().await
}

/// A name no other test, or earlier run on the same emulator, uses.
fn fresh(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}{}-{nanos}", std::process::id())
}

#[tokio::test]
async fn a_secure_string_parameter_is_read_decrypted() {
    let sdk = sdk().await;
    let name = fresh("/settle/test/token-");
    aws_sdk_ssm::Client::new(&sdk)
        .put_parameter()
        .name(&name)
        .value("Bearer from-ssm")
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .send()
        .await
        .unwrap();
    let value = read_secret(&sdk, &SecretSource::Ssm(name)).await.unwrap();
    assert_eq!(value.expose(), "Bearer from-ssm");
}

#[tokio::test]
async fn a_secrets_manager_secret_is_read() {
    let sdk = sdk().await;
    let name = fresh("settle/test/token-");
    aws_sdk_secretsmanager::Client::new(&sdk)
        .create_secret()
        .name(&name)
        .secret_string("Bearer from-secrets-manager")
        .send()
        .await
        .unwrap();
    let value = read_secret(&sdk, &SecretSource::SecretsManager(name))
        .await
        .unwrap();
    assert_eq!(value.expose(), "Bearer from-secrets-manager");
}

#[tokio::test]
async fn a_missing_secret_is_named_in_the_error() {
    let sdk = sdk().await;
    let name = fresh("/settle/test/absent-");
    let err = read_secret(&sdk, &SecretSource::Ssm(name.clone()))
        .await
        .unwrap_err();
    assert!(matches!(err, SecretError::Ssm { .. }), "{err:?}");
    let want = format!("read ssm:{name}: GetParameter failed: ParameterNotFound: ");
    assert!(err.to_string().starts_with(&want), "{err}");
    let err = read_secret(&sdk, &SecretSource::SecretsManager(name.clone()))
        .await
        .unwrap_err();
    let want =
        format!("read secretsmanager:{name}: GetSecretValue failed: ResourceNotFoundException: ");
    assert!(err.to_string().starts_with(&want), "{err}");
}

/// The stock worker's cold start reads the secret once and sends it as the
/// header on every POST.
#[tokio::test]
async fn the_http_kind_sends_the_secret_header() {
    let sdk = sdk().await;
    let name = fresh("/settle/test/api-key-");
    aws_sdk_ssm::Client::new(&sdk)
        .put_parameter()
        .name(&name)
        .value("k-123")
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .send()
        .await
        .unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/renew", listener.local_addr().unwrap());
    let keys = Arc::new(Mutex::new(Vec::new()));
    let k = keys.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let k = k.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                loop {
                    let (mut line, mut length) = (String::new(), 0usize);
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end().to_ascii_lowercase();
                        if l.is_empty() {
                            break;
                        }
                        if let Some(v) = l.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap();
                        }
                        if l.starts_with("x-api-key:") {
                            let value = &line.trim_end()["x-api-key:".len()..];
                            k.lock().unwrap().push(value.trim().to_owned());
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).await.unwrap();
                    let reply = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
                    if reader.get_mut().write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });

    let e = embedded().await;
    fixture_run(
        &e,
        &[
            ("sub-000001", "ok"),
            ("sub-000002", "ok"),
            ("sub-000003", "ok"),
        ],
    )
    .await;
    let kind = ProcessorSettings::Http {
        url,
        secret: Some(SecretSource::Ssm(name)),
        header: "X-Api-Key".into(),
    };
    let settings = WorkerSettings::from_lookup(&|_: &str| None).unwrap();
    let worker = settle_lambda::run::stock_function(&sdk, &e.backend(), &kind, settings)
        .await
        .unwrap();
    let response = worker
        .handle(
            sqs_fixture("worker-sqs.json"),
            Some(Instant::now() + Duration::from_secs(30)),
        )
        .await
        .unwrap();
    assert!(failure_ids(&response).is_empty(), "{response:?}");
    let keys = keys.lock().unwrap().clone();
    assert_eq!(keys, vec!["k-123"; 3]);
}
