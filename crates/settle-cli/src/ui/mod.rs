//! `settle ui`: the operator's dashboard over either backend. Pages are
//! rendered on the server from the same ports the other commands read;
//! a retry is `settle redrive`'s own code path
//! ([`crate::commands::redrive_move`] and [`crate::commands::redrive_process`]). The guard in front of every route
//! is in [`guard`].

mod guard;
mod html;
mod listen;
mod metrics;
mod pages;

use crate::cli::{ProcessArgs, UiArgs};
use crate::commands::{input, InputError};
use crate::deployment::Deployment;
use crate::signals::Stop;
use anyhow::{Context, Result};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
pub use listen::Listen;
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// What the handlers share.
#[derive(Debug)]
pub(crate) struct Ui {
    d: Arc<Deployment>,
    /// How a retry's moved items are processed here.
    process: ProcessArgs,
    read_only: bool,
    /// Held from a retry's move until its items are processed: one retry at
    /// a time in this process, so that two local runners never share a
    /// redrive, and the server waits for it before it exits.
    busy: Arc<tokio::sync::Mutex<()>>,
    /// The run whose retried items are being processed here, for its page.
    retrying: std::sync::Mutex<Option<settle_core::RunId>>,
    stop: Stop,
    /// Retries this server made, and the items they moved and did not move.
    retries: AtomicU64,
    moved: AtomicU64,
    not_moved: AtomicU64,
}

impl Ui {
    fn retrying(&self) -> std::sync::MutexGuard<'_, Option<settle_core::RunId>> {
        // Held for an assignment or a comparison: a panic cannot leave it
        // half-written.
        self.retrying
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Clears [`Ui::retrying`] when dropped: the end of a retry's processing.
pub(crate) struct Retrying(Arc<Ui>);

impl Drop for Retrying {
    fn drop(&mut self) {
        *self.0.retrying() = None;
    }
}

/// Serves until SIGINT or SIGTERM, then waits for a retry's processing
/// (which stops at the same signal) so the database is left whole.
pub async fn serve(d: Arc<Deployment>, args: UiArgs, stop: Stop) -> Result<ExitCode> {
    let token = match args.token {
        Some(t) if t.trim().is_empty() => {
            return Err(input("--token (SETTLE_UI_TOKEN) must not be empty"))
        }
        // It travels in a cookie and a header: no separators, no spaces.
        Some(t)
            if !t
                .chars()
                .all(|c| c.is_ascii_graphic() && !matches!(c, ';' | ',' | '"' | '\\')) =>
        {
            return Err(input(
                "--token (SETTLE_UI_TOKEN) may hold letters, digits and punctuation \
                 other than ; , \" \\, and no spaces",
            ))
        }
        t => t,
    };
    let addrs = args.listen.addrs(token.is_some()).map_err(|e| {
        // Bad input (exit 2) that keeps its cause, such as the resolver's.
        let msg = e.to_string();
        anyhow::Error::new(e).context(InputError(msg))
    })?;
    let listener = tokio::net::TcpListener::bind(&addrs[..])
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener
        .local_addr()
        .context("cannot read the listening address")?;
    // The name it listens by is a Host it is reached by.
    let mut hosts = args.allow_hosts;
    hosts.extend(args.listen.host().map(str::to_owned));
    let guard = Arc::new(guard::Guard::new(addr, token, &hosts, args.read_only));
    let ui = Arc::new(Ui {
        d: d.clone(),
        process: args.process,
        read_only: args.read_only,
        busy: Arc::default(),
        retrying: std::sync::Mutex::default(),
        stop: stop.clone(),
        retries: AtomicU64::new(0),
        moved: AtomicU64::new(0),
        not_moved: AtomicU64::new(0),
    });
    let app = router(ui.clone()).layer(axum::middleware::from_fn_with_state(guard, guard::check));
    eprintln!(
        "settle ui: {} on http://{addr}/{} (Ctrl-C stops)",
        d.describe(),
        if args.read_only { " read-only" } else { "" }
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            stop.stopped().await;
        })
        .await
        .context("the server failed")?;
    let _done = ui.busy.lock().await;
    Ok(ExitCode::SUCCESS)
}

fn router(ui: Arc<Ui>) -> Router {
    Router::new()
        .route("/", get(pages::runs))
        .route("/runs/{run}", get(pages::run))
        .route("/runs/{run}/item", get(pages::item))
        .route("/runs/{run}/retry", get(pages::confirm).post(pages::retry))
        .route("/runs/{run}/results.jsonl", get(pages::results))
        .route("/api/runs/{run}", get(pages::run_json))
        .route("/metrics", get(metrics::metrics))
        .route("/assets/ui.js", get(js))
        .route("/assets/ui.css", get(css))
        .with_state(ui)
}

async fn js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/ui.js"),
    )
}

async fn css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/ui.css"),
    )
}

/// A page's failure, shown as a page: bad input (an unknown run or item,
/// an item that has not failed) is the operator's 400 or 404, anything
/// else a 500 with its causes.
#[derive(Debug)]
pub(crate) struct PageError(StatusCode, String);

impl PageError {
    fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        Self(status, msg.into())
    }
}

impl From<anyhow::Error> for PageError {
    fn from(e: anyhow::Error) -> Self {
        let text = format!("{e:#}");
        match e.downcast_ref::<InputError>() {
            Some(i) if i.0.contains("not found") || i.0.starts_with("no record") => {
                Self(StatusCode::NOT_FOUND, text)
            }
            Some(_) => Self(StatusCode::BAD_REQUEST, text),
            None => Self(StatusCode::INTERNAL_SERVER_ERROR, text),
        }
    }
}

impl From<settle_core::PortError> for PageError {
    fn from(e: settle_core::PortError) -> Self {
        anyhow::Error::new(e).into()
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let body = format!(
            "<h1>{}</h1>\n<p class=\"error\">{}</p>\n<p><a href=\"/\">All runs</a></p>\n",
            self.0.as_u16(),
            html::esc(&self.1)
        );
        (self.0, Html(html::page("error", &body))).into_response()
    }
}
