//! Where the CLI works: the embedded database file, or an AWS stack; and
//! who processes the work: this process (the local runner), or the deployed
//! Lambda functions.

use crate::cli::{BackendKind, Cli, Workers};
use crate::commands::input;
use anyhow::Result;
use settle_core::Backend;
use settle_embedded::{DbError, Embedded};
use std::time::Duration;

/// An opened backend and how its work gets processed.
#[derive(Debug)]
pub struct Deployment {
    pub backend: Backend,
    pub workers: Workers,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    // Boxed: the two differ much in size.
    Embedded(Box<Embedded>),
    Aws(Box<settle_aws::AwsBackend>),
}

impl Deployment {
    pub async fn open(cli: &Cli) -> Result<Self> {
        match cli.backend {
            BackendKind::Embedded => {
                if cli.workers == Some(Workers::Deployed) {
                    return Err(input(
                        "--workers deployed needs --backend aws: the embedded engine has no deployed functions",
                    ));
                }
                let opened = if cli.command.creates_database() {
                    Embedded::open(&cli.db).await
                } else {
                    Embedded::open_existing(&cli.db).await
                };
                let e = opened.map_err(|err| match err {
                    DbError::Missing(path) => input(format!(
                        "no database at {} (nothing has run here yet; \
                         `settle run --items FILE` creates it)",
                        path.display()
                    )),
                    err => input(format!("cannot open the database: {err}")),
                })?;
                Ok(Self {
                    backend: e.backend(),
                    workers: Workers::Local,
                    kind: Kind::Embedded(Box::new(e)),
                })
            }
            BackendKind::Aws => {
                let cfg = settle_aws::AwsConfig::from_env().map_err(|e| input(e.to_string()))?;
                let aws = settle_aws::connect(&cfg)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot reach the AWS stack: {e}"))?;
                Ok(Self {
                    backend: aws.backend(),
                    workers: cli.workers.unwrap_or(Workers::Deployed),
                    kind: Kind::Aws(Box::new(aws)),
                })
            }
        }
    }

    /// Leaves the embedded database whole in its main file (see
    /// [`settle_embedded::Db::checkpoint_on_exit`]), so that a copy of that
    /// file alone, taken while no command runs, holds everything.
    pub async fn close(&self) {
        if let Kind::Embedded(e) = &self.kind {
            e.db.checkpoint_on_exit().await;
        }
    }

    /// The embedded engine, if that is the backend.
    pub fn embedded(&self) -> Option<&Embedded> {
        match &self.kind {
            Kind::Embedded(e) => Some(e),
            Kind::Aws(_) => None,
        }
    }

    /// The AWS calls made so far, per operation (`None` on the embedded
    /// backend), for `--report-calls` and the cost figures.
    pub fn call_counts(&self) -> Option<std::collections::BTreeMap<String, u64>> {
        match &self.kind {
            Kind::Embedded(_) => None,
            Kind::Aws(aws) => Some(aws.call_counts()),
        }
    }

    /// DynamoDB capacity units: as the service reported them, and as
    /// derived from the traffic by DynamoDB's billing rules.
    pub fn capacity(&self) -> Option<serde_json::Value> {
        match &self.kind {
            Kind::Embedded(_) => None,
            Kind::Aws(aws) => Some(serde_json::json!({
                "reported": aws.consumed_capacity(),
                "billed_estimate": aws.billed_units(),
            })),
        }
    }

    /// Names the backend in messages, e.g. "no runs yet in ...".
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Embedded(e) => e.db.path().display().to_string(),
            Kind::Aws(aws) => format!("the ledger table {}", aws.config().ledger_table),
        }
    }

    /// Makes the queues ready for runs of `max_receives`, or says why they
    /// cannot take them.
    pub async fn prepare_for(&self, max_receives: u32) -> Result<()> {
        if let Some(limit) = self.backend.capabilities.fixed_max_receive_count {
            if max_receives >= limit {
                return Err(input(format!(
                    "--max-receives {max_receives} must be below the work queue's maxReceiveCount ({limit}); \
                     use at most {}",
                    limit.saturating_sub(1).max(1)
                )));
            }
        }
        if let Kind::Embedded(e) = &self.kind {
            e.set_max_receives(max_receives).await?;
        }
        Ok(())
    }

    /// How long the queues may look empty while items are still pending
    /// before the CLI calls the run stalled.
    pub fn stall_after(&self) -> Duration {
        self.backend.capabilities.stall_after
    }

    /// How long the local runner's reducers hide the results they took:
    /// the work visibility, or the backend's minimum if that is longer.
    pub fn results_visibility(&self, work: Duration) -> Duration {
        self.backend.capabilities.min_results_visibility.max(work)
    }

    /// The local runner's reducer batching window.
    pub fn reducer_window(&self) -> Duration {
        self.backend.capabilities.reducer_window
    }
}
