//! `POST /webhooks/buildkite`: Buildkite webhooks wake the poll loop.
//!
//! The request is verified against the configured secrets first
//! (`X-Buildkite-Token` or `X-Buildkite-Signature`, see
//! [`crate::webhooks`]): anything unverified is 401 and changes nothing.
//! A verified `build.*` / `job.*` event whose build carries
//! `meta_data["stitch:build_id"]` of a live build on a queue that secret
//! speaks for wakes that build's signal partition; the poll asks Buildkite
//! for the truth (webhook bodies are hints). Everything else verified —
//! `ping`, unknown events, builds that are not stitch's — is 200 and
//! nothing else. The body is capped at [`MAX_BODY`].

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};
use stitch_core::BuildId;
use stitch_runners::buildkite::META_BUILD_ID;

use super::error::ApiError;
use super::Ctx;
use crate::state::topics;

/// Largest accepted webhook body. Build and job payloads carry no job
/// lists and are a few KiB.
pub const MAX_BODY: usize = 256 * 1024;

/// Delays of the follow-up wakes after a wake that found nothing postponed.
const RETRY_WAKE_MS: [u64; 5] = [20, 100, 300, 1000, 3000];

/// What the receiver did.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct WebhookOutcome {
    /// `woken` (a build's poll runs now) or `ignored`.
    pub outcome: String,
    /// The stitch build woken, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
}

#[derive(Deserialize)]
struct Payload {
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    build: Option<PayloadBuild>,
}

#[derive(Deserialize)]
struct PayloadBuild {
    #[serde(default)]
    meta_data: Option<serde_json::Map<String, serde_json::Value>>,
}

fn ignored() -> Json<WebhookOutcome> {
    Json(WebhookOutcome {
        outcome: "ignored".into(),
        build_id: None,
    })
}

/// Receive a Buildkite webhook.
#[utoipa::path(
    post,
    path = "/webhooks/buildkite",
    tag = "webhooks",
    request_body(content = String, content_type = "application/json", description = "A Buildkite webhook body"),
    params(
        ("X-Buildkite-Event" = Option<String>, Header, description = "Event name"),
        ("X-Buildkite-Token" = Option<String>, Header, description = "Token scheme"),
        ("X-Buildkite-Signature" = Option<String>, Header, description = "`timestamp=…,signature=…` (HMAC-SHA256 scheme)")
    ),
    responses(
        (status = 200, description = "Verified; `woken` or `ignored`", body = WebhookOutcome),
        (status = 400, description = "`malformed_json`", body = super::schema::ErrorBody),
        (status = 401, description = "`invalid_webhook`: missing, wrong, tampered or stale credentials", body = super::schema::ErrorBody),
        (status = 404, description = "`webhooks_not_configured`", body = super::schema::ErrorBody),
        (status = 413, description = "`body_too_large`", body = super::schema::ErrorBody)
    )
)]
pub(crate) async fn buildkite(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<WebhookOutcome>, ApiError> {
    let hooks = ctx.state.buildkite_webhooks();
    if hooks.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "webhooks_not_configured",
            "no queue has [queues.NAME.buildkite.webhook] configured",
        ));
    }
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("webhook bodies are limited to {MAX_BODY} bytes"),
            )
        } else {
            ApiError::invalid(r.body_text())
        }
    })?;
    let now = chrono::Utc::now().timestamp();
    let queues = hooks
        .verify(&headers, &body, now)
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, "invalid_webhook", e.to_string()))?;
    let payload: Payload = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("webhook body: {e}"),
        )
    })?;
    let event = headers
        .get(stitch_runners::buildkite::webhook::EVENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(payload.event)
        .unwrap_or_default();
    if !(event.starts_with("build.") || event.starts_with("job.")) {
        return Ok(ignored());
    }
    let Some(id) = payload
        .build
        .and_then(|b| b.meta_data)
        .and_then(|m| m.get(META_BUILD_ID)?.as_str().map(str::to_string))
        .and_then(|s| s.parse::<BuildId>().ok())
    else {
        return Ok(ignored());
    };
    let state = &ctx.state;
    let build = match state.store().get_build(&id).await {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(ignored()),
        Err(e) => return Err(ApiError::unavailable(e)),
    };
    // A secret speaks only for its own queues.
    if !queues.contains(&build.queue) || build.status.is_terminal() {
        return Ok(ignored());
    }
    state.wake_hints().mark(&id);
    let woken = state
        .queue()
        .admin()
        .wake(topics::SIGNAL, id.as_str())
        .await
        .map_err(ApiError::unavailable)?;
    if woken == 0 {
        // The build's poll is running (or about to hold): its end checks the
        // hint, but a hold committed just after that check would sleep the
        // whole safety-net delay. Wake again shortly, until a poll took the hint.
        let (state, id) = (state.clone(), id.clone());
        tokio::spawn(async move {
            for ms in RETRY_WAKE_MS {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                if !state.wake_hints().is_pending(&id) {
                    return;
                }
                match state
                    .queue()
                    .admin()
                    .wake(topics::SIGNAL, id.as_str())
                    .await
                {
                    Ok(n) if n > 0 => return,
                    Ok(_) => {}
                    Err(e) => tracing::warn!(build = %id, error = %e, "webhook wake failed"),
                }
            }
        });
    }
    Ok(Json(WebhookOutcome {
        outcome: "woken".into(),
        build_id: Some(id.to_string()),
    }))
}
