//! The HTTP API (docs/api.md): builds, the event stream, log streams, health,
//! metrics and the OpenAPI document.
//!
//! - [`router`] wires every route onto an [`AppState`]; [`router_with`]
//!   takes [`HttpOptions`] (keepalive cadence) for tests and tuning.
//! - [`serve_with`] runs a router on a listener until a shutdown future
//!   resolves, then ends open streams and drains connections; the `[http]`
//!   limits cut off slow clients and cap open connections ([`serve`]: the
//!   default limits).
//! - [`observe`] wraps every route (request ids, a span per request, a
//!   panic guard); [`serve_with`] applies it.
//! - [`check_bind`] refuses a non-loopback address when no API token is
//!   configured (the tokens are read by [`crate::config::api_tokens`]).
//!
//! Handlers only validate, call [`crate::service`], and shape answers; they
//! never move a build's status themselves (docs/architecture.md). Every error answers
//! `{"error":{"code","message"}}` (see [`error`]). `docs/api.md` is the
//! user-facing description.

mod auth;
mod builds;
pub mod error;
mod events;
mod extract;
mod listener;
mod logs;
mod loopback;
mod metrics;
pub mod observe;
mod openapi;
mod ops;
mod queues;
mod streams;
mod webhooks;
mod webhooks_gitlab;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::{Extension, Router};
use tokio_util::sync::CancellationToken;

use crate::config::HttpConfig;
use crate::state::AppState;

pub use error::ApiError;
pub use streams::{close_websocket, limit_websocket};

/// Default interval between keepalives on idle streams: SSE comment lines
/// and WebSocket pings.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(15);

/// Tunables of the HTTP layer that are not part of the configuration file.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Interval between keepalives on streams (SSE comment, WebSocket ping).
    pub keepalive: Duration,
    /// How often an event or log stream that is caught up re-reads the
    /// database even without a wake-up (writers in other processes).
    pub recheck: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            keepalive: DEFAULT_KEEPALIVE,
            recheck: Duration::from_secs(1),
        }
    }
}

/// What every handler shares: the service state plus HTTP-only parts.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) state: AppState,
    pub(crate) options: Arc<HttpOptions>,
    pub(crate) metrics: metrics::Metrics,
    pub(crate) openapi: Arc<String>,
    pub(crate) queue_list: Arc<queues::QueueListCache>,
}

/// Set by [`serve`] on every request: cancelled when the server shuts down,
/// so long-lived streams end and the drain can finish.
#[derive(Clone, Debug, Default)]
pub(crate) struct Shutdown(pub(crate) CancellationToken);

/// The API router with default [`HttpOptions`]. `tokens` are the accepted
/// bearer tokens; empty means no authentication (bind loopback only, see
/// [`check_bind`]).
pub fn router(state: AppState, tokens: Vec<String>) -> Router {
    router_with(state, tokens, HttpOptions::default())
}

/// The API router with explicit [`HttpOptions`].
pub fn router_with(state: AppState, tokens: Vec<String>, options: HttpOptions) -> Router {
    let max_body = state.config().api.max_body_bytes;
    let queues: Vec<String> = state.build_queues().map(|q| q.name.clone()).collect();
    let openapi = openapi::document(!tokens.is_empty(), &queues);
    let metrics = metrics::Metrics::install(&state);
    let ctx = Ctx {
        state,
        options: Arc::new(options),
        metrics,
        openapi: Arc::new(openapi),
        queue_list: Arc::default(),
    };
    let guard = loopback::LoopbackGuard::new(
        !tokens.is_empty(),
        ctx.state.config().api.public_url.as_deref(),
    );
    let auth = auth::Auth::new(tokens);
    Router::new()
        .route("/v1/queues/{queue}/builds", post(builds::create_build))
        .route("/v1/builds", get(builds::list_builds))
        .route("/v1/builds/{id}", get(builds::get_build))
        .route("/v1/builds/{id}/cancel", post(builds::cancel_build))
        .route(
            "/v1/builds/{id}/promise-failure",
            post(builds::promise_failure),
        )
        .route("/v1/builds/{id}/logs", get(logs::build_logs))
        .route("/v1/events", get(events::events))
        .route("/v1/queues", get(queues::list_queues))
        .route("/v1/dead-letters", get(queues::list_dead_letters))
        .route(
            "/v1/dead-letters/{topic}/{id}/replay",
            post(queues::replay_dead_letter),
        )
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .route(
            "/webhooks/buildkite",
            post(webhooks::buildkite).layer(DefaultBodyLimit::max(webhooks::MAX_BODY)),
        )
        .route(
            "/webhooks/github",
            post(webhooks::github).layer(DefaultBodyLimit::max(webhooks::GITHUB_MAX_BODY)),
        )
        .route(
            "/webhooks/gitlab",
            post(webhooks_gitlab::gitlab)
                .layer(DefaultBodyLimit::max(webhooks_gitlab::GITLAB_MAX_BODY)),
        )
        .merge(crate::dashboard::routes())
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(auth, auth::require))
        .layer(axum::middleware::from_fn_with_state(guard, loopback::check))
        .layer(axum::middleware::from_fn_with_state(
            ctx.metrics.clone(),
            metrics::track,
        ))
        .with_state(ctx)
}

/// Serves `router` on `listener` with the default [`HttpConfig`] limits;
/// see [`serve_with`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_with(listener, router, HttpConfig::default(), shutdown).await
}

/// Serves `router` on `listener` until `shutdown` resolves, then ends open
/// event and log streams (SSE streams end, WebSockets get close 1001) and
/// waits for in-flight requests to finish. `limits` (`[http]`) bound what
/// a client may hold: header and body read timeouts, open connections.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: HttpConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let token = CancellationToken::new();
    let app = observe::layer(router).layer(Extension(Shutdown(token.clone())));
    let stop = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown => stop.cancel(),
            () = stop.cancelled() => {}
        }
    });
    let served = listener::run(listener, app, limits, token.clone()).await;
    // Also when accepting failed for good: the shutdown watcher ends too.
    token.cancel();
    served
}

/// Refuses to listen on a non-loopback address when no API token is
/// configured (docs/api.md, "Authentication"): an unauthenticated API must not be reachable
/// from other machines.
pub fn check_bind(addr: SocketAddr, tokens_configured: bool) -> Result<(), String> {
    if tokens_configured || is_loopback(addr) {
        return Ok(());
    }
    Err(format!(
        "refusing to listen on {addr}: no API tokens are configured, so only loopback addresses \
         (127.0.0.0/8, ::1) are allowed; set api.tokens_env to environment variables holding \
         bearer tokens, or listen on 127.0.0.1"
    ))
}

fn is_loopback(addr: SocketAddr) -> bool {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        std::net::IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}
