//! Where the CLI works: the embedded database file, or an AWS stack; and
//! who processes the work: this process (the local runner), or the deployed
//! Lambda functions.

use crate::cli::{BackendKind, Cli, Workers};
use crate::commands::input;
use anyhow::Result;
use settle_core::Backend;
use settle_embedded::Embedded;
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
    Embedded(Embedded),
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
                let e = Embedded::open(&cli.db)
                    .await
                    .map_err(|err| input(format!("cannot open the database: {err}")))?;
                Ok(Self {
                    backend: e.backend(),
                    workers: Workers::Local,
                    kind: Kind::Embedded(e),
                })
            }
        }
    }

    /// Names the backend in messages, e.g. "no runs yet in ...".
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Embedded(e) => e.db.path().display().to_string(),
        }
    }

    /// Makes the queues ready for runs of `max_receives`, or says why they
    /// cannot take them.
    pub async fn prepare_for(&self, max_receives: u32) -> Result<()> {
        match &self.kind {
            Kind::Embedded(e) => Ok(e.set_max_receives(max_receives).await?),
        }
    }

    /// How long the queues may look empty while items are still pending
    /// before the CLI calls the run stalled. SQS's counts are approximate
    /// and lag by up to a minute; the embedded counts are exact.
    pub fn stall_after(&self) -> Duration {
        match &self.kind {
            Kind::Embedded(_) => Duration::from_secs(3),
        }
    }
}
