//! Creates a stack's queues and tables through the API, from the one
//! definition in `infra/stack.json` (which the emulator script and the
//! CloudFormation template mirror). For tests and the local emulator; a
//! real deployment uses the template.

use crate::AwsConfig;
use aws_config::SdkConfig;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ScalarAttributeType,
};
use aws_sdk_sqs::types::QueueAttributeName;
use serde::Deserialize;
use std::collections::BTreeMap;

/// The stack definition, as shipped in `infra/stack.json`.
pub const STACK_JSON: &str = include_str!("../../../infra/stack.json");

#[derive(Debug, Clone, Deserialize)]
pub struct Stack {
    pub queues: BTreeMap<String, QueueDef>,
    pub tables: BTreeMap<String, TableDef>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct QueueDef {
    pub name: String,
    pub env: String,
    pub attributes: BTreeMap<String, String>,
    pub dead_letter: Option<String>,
    pub max_receive_count: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TableDef {
    pub name: String,
    pub env: String,
    pub attributes: BTreeMap<String, String>,
    pub hash_key: String,
    pub range_key: String,
    pub indexes: Vec<IndexDef>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct IndexDef {
    pub name: String,
    pub hash_key: String,
    pub range_key: String,
    pub projection: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("infra/stack.json is not a stack definition")]
    Json(#[source] serde_json::Error),
    /// A definition that parses but does not hold together.
    #[error("infra/stack.json: {0}")]
    Definition(String),
    #[error("infra/stack.json: table {table}: {what} is incomplete")]
    Build {
        table: String,
        what: &'static str,
        #[source]
        source: aws_smithy_types::error::operation::BuildError,
    },
    #[error("{op} for {target} failed")]
    Aws {
        op: &'static str,
        target: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("DynamoDB table {0} did not become ACTIVE within 60 s")]
    NotActive(String),
    #[error("the stack created does not name every queue and table the backend needs")]
    Names(#[source] crate::ConfigError),
}

impl Stack {
    /// The shipped definition.
    pub fn default_stack() -> Result<Self, ProvisionError> {
        serde_json::from_str(STACK_JSON).map_err(ProvisionError::Json)
    }
}

fn aws<E: std::error::Error + Send + Sync + 'static>(
    op: &'static str,
    target: &str,
) -> impl Fn(E) -> ProvisionError {
    let target = target.to_owned();
    move |e| ProvisionError::Aws {
        op,
        target: target.clone(),
        source: Box::new(e),
    }
}

/// Creates the stack's queues and tables with every name prefixed by
/// `prefix` (empty for the default stack). `work_max_receive_count`
/// overrides the work queue's redrive limit (tests use small ones).
/// Creating what already exists with the same settings is not an error.
pub async fn create_stack(
    sdk: &SdkConfig,
    stack: &Stack,
    prefix: &str,
    work_max_receive_count: Option<u32>,
) -> Result<AwsConfig, ProvisionError> {
    let sqs = aws_sdk_sqs::Client::new(sdk);
    let dynamo = aws_sdk_dynamodb::Client::new(sdk);
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut arns: BTreeMap<String, String> = BTreeMap::new();
    // Dead-letter queues first: the others name them in their policy.
    let mut order: Vec<(&String, &QueueDef)> = stack.queues.iter().collect();
    order.sort_by_key(|(_, q)| q.dead_letter.is_some());
    for (key, q) in order {
        let name = format!("{prefix}{}", q.name);
        let mut create = sqs.create_queue().queue_name(&name);
        for (k, v) in &q.attributes {
            create = create.attributes(QueueAttributeName::from(k.as_str()), v);
        }
        if let Some(dlq) = &q.dead_letter {
            let arn = arns.get(dlq).ok_or_else(|| {
                ProvisionError::Definition(format!("queue {key} names unknown dead letter {dlq}"))
            })?;
            let max = if key == "work" {
                work_max_receive_count.or(q.max_receive_count)
            } else {
                q.max_receive_count
            };
            let max = max.ok_or_else(|| {
                ProvisionError::Definition(format!("queue {key} has no max_receive_count"))
            })?;
            let policy = serde_json::json!({"deadLetterTargetArn": arn, "maxReceiveCount": max});
            create = create.attributes(QueueAttributeName::RedrivePolicy, policy.to_string());
        }
        let url = create
            .send()
            .await
            .map_err(aws("SQS.CreateQueue", &name))?
            .queue_url()
            .unwrap_or_default()
            .to_owned();
        let arn = sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(aws("SQS.GetQueueAttributes", &name))?
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
            .unwrap_or_default();
        arns.insert(key.clone(), arn);
        env.insert(q.env.clone(), url);
    }
    for (key, t) in &stack.tables {
        let name = format!("{prefix}{}", t.name);
        let attr_type = |a: &str| -> Result<ScalarAttributeType, ProvisionError> {
            let ty = t.attributes.get(a).ok_or_else(|| {
                ProvisionError::Definition(format!("table {key}: key {a} has no attribute type"))
            })?;
            Ok(ScalarAttributeType::from(ty.as_str()))
        };
        let schema = |h: &str, r: &str| -> Result<Vec<KeySchemaElement>, ProvisionError> {
            let el = |n: &str, k| {
                KeySchemaElement::builder()
                    .attribute_name(n)
                    .key_type(k)
                    .build()
                    .map_err(build(key, "a key schema element"))
            };
            Ok(vec![el(h, KeyType::Hash)?, el(r, KeyType::Range)?])
        };
        let mut create = dynamo
            .create_table()
            .table_name(&name)
            .billing_mode(BillingMode::PayPerRequest)
            .set_key_schema(Some(schema(&t.hash_key, &t.range_key)?));
        for a in t.attributes.keys() {
            create = create.attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(a)
                    .attribute_type(attr_type(a)?)
                    .build()
                    .map_err(build(key, "an attribute definition"))?,
            );
        }
        for ix in &t.indexes {
            create = create.global_secondary_indexes(
                GlobalSecondaryIndex::builder()
                    .index_name(&ix.name)
                    .set_key_schema(Some(schema(&ix.hash_key, &ix.range_key)?))
                    .projection(
                        Projection::builder()
                            .projection_type(ProjectionType::from(ix.projection.as_str()))
                            .build(),
                    )
                    .build()
                    .map_err(build(key, "a secondary index"))?,
            );
        }
        match create.send().await {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_in_use_exception()) => {}
            Err(e) => return Err(aws("DynamoDB.CreateTable", &name)(e)),
        }
        wait_active(&dynamo, &name).await?;
        env.insert(t.env.clone(), name);
    }
    // The stack's names; the emulator setting as the process has it.
    AwsConfig::from_lookup(|k| {
        env.get(k)
            .cloned()
            .or_else(|| (k == crate::EMULATOR_WRITE_LOCK).then(|| std::env::var(k).ok())?)
    })
    .map_err(ProvisionError::Names)
}

fn build(
    table: &str,
    what: &'static str,
) -> impl Fn(aws_smithy_types::error::operation::BuildError) -> ProvisionError {
    let table = table.to_owned();
    move |source| ProvisionError::Build {
        table: table.clone(),
        what,
        source,
    }
}

/// Waits until a new table takes writes (at once on an emulator, seconds on AWS).
async fn wait_active(dynamo: &aws_sdk_dynamodb::Client, name: &str) -> Result<(), ProvisionError> {
    use aws_sdk_dynamodb::types::TableStatus;
    for _ in 0..120 {
        let out = dynamo
            .describe_table()
            .table_name(name)
            .send()
            .await
            .map_err(aws("DynamoDB.DescribeTable", name))?;
        if out.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    Err(ProvisionError::NotActive(name.to_owned()))
}
