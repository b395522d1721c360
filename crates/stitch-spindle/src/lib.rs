//! stitch as a Tangled spindle (`docs/spindle.md`): Tangled pipelines run on
//! any stitch queue.
//!
//! - [`jetstream`]: discovers repos naming this spindle, members, collaborators.
//! - [`knot`]: one event-stream client per tracked knot; triggers go to
//!   [`trigger`], which authorizes them and creates one stitch build per
//!   workflow through `stitch_server::service::create_build`.
//! - `event_stream`: the reconnecting WebSocket loop both follow their
//!   streams with.
//! - [`status`]: turns those builds' transitions (the store's event log) into
//!   `sh.tangled.pipeline.status` records in [`db`].
//! - [`http`]: `/events`, `/logs/...` and the xrpc methods ([`auth`] and
//!   [`did`] verify service-auth tokens).
//!
//! [`addon`] plugs it into `stitch serve` when `[spindle]` is configured.
#![forbid(unsafe_code)]

pub mod auth;
pub mod config;
pub mod db;
pub mod did;
pub mod error;
mod event_stream;
pub mod http;
pub mod jetstream;
pub mod knot;
pub mod records;
pub mod routing;
pub mod status;
pub mod tid;
pub mod trigger;

use std::sync::Arc;

use futures::FutureExt;
use stitch_server::app::{Addon, AddonStart};
use stitch_server::config::Config;
use stitch_server::state::AppState;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Settings;
pub use error::SpindleError;

/// Everything the spindle's tasks and handlers share. Cheap to clone.
#[derive(Clone)]
pub struct Spindle {
    /// The stitch service.
    pub state: AppState,
    /// The spindle's tables.
    pub db: db::SpindleDb,
    /// Its settings.
    pub settings: Arc<Settings>,
    /// Resolves callers' DIDs for service auth.
    pub resolver: did::DidResolver,
    /// The knots followed now.
    pub knots: knot::KnotClients,
    pub(crate) tasks: TaskTracker,
    pub(crate) stop: CancellationToken,
}

/// A started spindle: its routes and the task that ends with it.
pub struct Started {
    /// The spindle.
    pub spindle: Spindle,
    /// Routes to merge into stitch's router.
    pub router: axum::Router,
    /// Resolves when every spindle task has ended after `stop`.
    pub done: tokio::task::JoinHandle<()>,
}

/// Opens the spindle's tables and starts the status translator, the
/// Jetstream consumer and a client per known knot. Everything stops when
/// `stop` is cancelled.
pub async fn start(
    state: AppState,
    settings: Settings,
    stop: CancellationToken,
) -> Result<Started, SpindleError> {
    let db = db::SpindleDb::open(state.store().clone()).await?;
    let spindle = Spindle {
        state,
        db,
        resolver: did::DidResolver::new(&settings.plc_url, settings.dev),
        settings: Arc::new(settings),
        knots: knot::KnotClients::default(),
        tasks: TaskTracker::new(),
        stop: stop.clone(),
    };
    spindle.knots.sync(&spindle, &stop).await?;
    spindle
        .tasks
        .spawn(status::run(spindle.clone(), stop.clone()));
    spindle
        .tasks
        .spawn(jetstream::run(spindle.clone(), stop.clone()));
    let tasks = spindle.tasks.clone();
    let done = tokio::spawn(async move {
        stop.cancelled().await;
        tasks.close();
        tasks.wait().await;
    });
    Ok(Started {
        router: http::router(spindle.clone()),
        spindle,
        done,
    })
}

/// The `stitch serve` add-on for a configuration with a `[spindle]`
/// section; `None` without one.
pub fn addon(config: &Config) -> Option<AddonStart> {
    let settings = Settings::from_config(config.spindle.as_ref()?);
    Some(Box::new(move |state: AppState, stop: CancellationToken| {
        async move {
            let started = start(state, settings, stop)
                .await
                .map_err(|e| format!("starting the spindle: {e}"))?;
            Ok(Addon {
                router: started.router,
                tasks: vec![started.done],
            })
        }
        .boxed()
    }))
}
