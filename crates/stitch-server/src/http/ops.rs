//! Operational endpoints: liveness, readiness, metrics, the OpenAPI document.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::Ctx;
use stitch_api::{ErrorBody, HealthBody};

/// How long readiness waits for the database.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process is alive", body = HealthBody))
)]
pub(crate) async fn healthz() -> Json<HealthBody> {
    Json(HealthBody {
        status: "ok".into(),
    })
}

/// Readiness: the database answers a cheap query.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready to serve", body = HealthBody),
        (status = 503, description = "The database is not reachable (`not_ready`)", body = ErrorBody)
    )
)]
pub(crate) async fn readyz(State(ctx): State<Ctx>) -> Response {
    match tokio::time::timeout(READY_TIMEOUT, ctx.state.store().latest_seq()).await {
        Ok(Ok(_)) => Json(HealthBody {
            status: "ready".into(),
        })
        .into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness check failed");
            not_ready("the database is not reachable")
        }
        Err(_) => {
            tracing::warn!("readiness check timed out");
            not_ready("the database did not answer in time")
        }
    }
}

fn not_ready(message: &str) -> Response {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message).into_response()
}

/// Prometheus text exposition.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
        (status = 401, description = "Missing or invalid token", body = ErrorBody)
    )
)]
pub(crate) async fn metrics(State(ctx): State<Ctx>) -> Response {
    ctx.metrics.refresh(&ctx.state).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ctx.metrics.render(),
    )
        .into_response()
}

/// This API's OpenAPI 3.1 document, generated from the handlers.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    security(("bearer" = [])),
    responses((status = 200, description = "OpenAPI document", content_type = "application/json", body = Object))
)]
pub(crate) async fn openapi(State(ctx): State<Ctx>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        ctx.openapi.as_ref().clone(),
    )
        .into_response()
}
