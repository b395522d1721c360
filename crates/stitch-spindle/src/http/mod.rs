//! The spindle's HTTP surface, merged into stitch's listener: `/events`,
//! `/logs/{knot}/{rkey}/{workflow}`, `/xrpc/sh.tangled.owner` and
//! `/xrpc/sh.tangled.pipeline.cancelPipeline`. None of it uses stitch's
//! bearer tokens: the appview calls these without them.

mod events;
mod logs;
mod xrpc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

use crate::Spindle;

/// Largest accepted xrpc request body.
const MAX_BODY: usize = 64 * 1024;

/// The spindle's routes.
pub fn router(spindle: Spindle) -> Router {
    Router::new()
        .route("/events", get(events::events))
        .route("/logs/{knot}/{rkey}/{workflow}", get(logs::logs))
        .route("/xrpc/sh.tangled.owner", get(xrpc::owner))
        .route(
            "/xrpc/sh.tangled.pipeline.cancelPipeline",
            post(xrpc::cancel_pipeline),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(spindle)
}
