//! `stitch serve`: open the state, start the stages and the HTTP API, and
//! stop gracefully on a signal.

use std::future::Future;

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config};
use crate::http;
use crate::retention;
use crate::stages;
use crate::state::{AppState, StartError};

/// Why `serve` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration asks for something unsafe (non-loopback without tokens).
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("listening on the configured address: {0}")]
    Io(#[from] std::io::Error),
    /// An add-on (e.g. the Tangled spindle) could not start.
    #[error("{0}")]
    Addon(String),
}

/// A feature served beside the API on the same listener (the Tangled
/// spindle): routes merged into the API router (they carry their own
/// authentication) and background tasks.
pub struct Addon {
    /// Routes to merge; must not overlap the API's.
    pub router: axum::Router,
    /// Background tasks, awaited after the server stopped.
    pub tasks: Vec<JoinHandle<()>>,
}

/// Starts an [`Addon`] on the opened state. The token is cancelled when
/// shutdown begins, so long-lived streams and clients end before the drain.
pub type AddonStart = Box<
    dyn FnOnce(AppState, CancellationToken) -> BoxFuture<'static, Result<Addon, String>> + Send,
>;

/// Runs the service until `shutdown` resolves: stop accepting requests,
/// let in-flight stage work finish (buffered deliveries are handed back),
/// then return.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    run_with(config, shutdown, Vec::new()).await
}

/// [`run`], with add-ons started on the state and served on the same
/// listener.
pub async fn run_with(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    addons: Vec<AddonStart>,
) -> Result<(), ServeError> {
    let tokens = config::api_tokens(&config, |k| std::env::var(k).ok());
    http::check_bind(config.listen, !tokens.is_empty()).map_err(ServeError::Refused)?;
    let state = AppState::open(config.clone()).await?;
    let listener = TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    state.set_bound_addr(addr);
    print_banner(&state, addr, !tokens.is_empty());

    let stop = CancellationToken::new();
    let addon_stop = CancellationToken::new();
    let mut router = http::router(state.clone(), tokens);
    let mut addon_tasks = Vec::new();
    for start in addons {
        let addon = start(state.clone(), addon_stop.clone())
            .await
            .map_err(ServeError::Addon)?;
        router = router.merge(addon.router);
        addon_tasks.extend(addon.tasks);
    }
    let mut stage_tasks = stages::start(&state, stop.clone());
    stage_tasks.extend(retention::start(&state, stop.clone()));
    let http_stop = stop.clone();
    let addons_stop = addon_stop.clone();
    let signal = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = http_stop.cancelled() => {}
        }
        addons_stop.cancel();
        tracing::info!("shutting down: no new requests; finishing in-flight work");
    };
    let served = http::serve_with(listener, router, config.http.clone(), signal).await;
    addon_stop.cancel();
    stop.cancel();
    for t in stage_tasks.into_iter().chain(addon_tasks) {
        let _ = t.await;
    }
    served?;
    tracing::info!("stopped");
    Ok(())
}

fn print_banner(state: &AppState, addr: std::net::SocketAddr, auth: bool) {
    let queues: Vec<String> = state
        .build_queues()
        .map(|q| format!("{} ({})", q.name, q.runner_name))
        .collect();
    let first = state
        .build_queues()
        .next()
        .map(|q| q.name.clone())
        .unwrap_or_else(|| "default".into());
    eprintln!("stitch is serving http://{addr}");
    eprintln!("  data:   {}", state.config().data_dir.display());
    eprintln!("  queues: {}", queues.join(", "));
    eprintln!(
        "  auth:   {}",
        if auth {
            "bearer tokens required"
        } else {
            "none (loopback only)"
        }
    );
    eprintln!("Trigger a build from another terminal:");
    eprintln!("  cargo run --release -- build trigger --queue {first} --head https://example.com/change/1 --wait");
    eprintln!("  (add ?stitch-fake=fail to the URI for a failing build on the fake runner)");
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
