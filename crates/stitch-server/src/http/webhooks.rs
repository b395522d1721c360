//! `POST /webhooks/buildkite` and `POST /webhooks/github`: provider
//! webhooks wake the poll loop.
//!
//! **Buildkite**:
//! The request is verified against the configured secrets first
//! (`X-Buildkite-Token` or `X-Buildkite-Signature`, see
//! [`crate::webhooks`]): anything unverified is 401 and changes nothing.
//! A verified `build.*` / `job.*` event whose build carries
//! `meta_data["stitch:build_id"]` of a live build on a queue that secret
//! speaks for wakes that build's signal partition; the poll asks Buildkite
//! for the truth (webhook bodies are hints). Everything else verified —
//! `ping`, unknown events, builds that are not stitch's — is 200 and
//! nothing else. The body is capped at [`MAX_BODY`].
//!
//! **GitHub** (`[webhooks.github]`): `X-Hub-Signature-256` is checked over
//! the raw body first (401 and no effect when missing or wrong). A
//! `workflow_run` or `workflow_job` event wakes the build whose run it is:
//! the build named in the run's title (`run-name`), or the live build whose
//! recorded run id it carries — on a `github` queue of the event's
//! repository. `ping`, other events and foreign runs are 200 and nothing
//! else; a delivery id already handled is 200 `duplicate`. The body is
//! capped at [`GITHUB_MAX_BODY`].

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use stitch_api::{ErrorBody, WebhookOutcome};
use stitch_core::{metric, BuildId};
use stitch_runners::buildkite::META_BUILD_ID;
use stitch_runners::github::webhook as gh;

use super::error::ApiError;
use super::Ctx;
use crate::state::topics;
use crate::webhooks::build_ids_in_title;

/// Largest accepted webhook body. Build and job payloads carry no job
/// lists and are a few KiB.
pub const MAX_BODY: usize = 256 * 1024;

/// Largest accepted GitHub webhook body: `workflow_run` payloads carry the
/// run, its head commit and the repository, tens of KiB.
pub const GITHUB_MAX_BODY: usize = 1024 * 1024;

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

/// The stitch build a verified Buildkite webhook is about: the build's
/// `meta_data["stitch:build_id"]` for `build.*` and `job.*` events (named by
/// `X-Buildkite-Event`, else the body's `event`). `Ok(None)` for other
/// events and builds without a valid id; `Err` for a body that is not JSON.
pub(crate) fn buildkite_build_id(
    event_header: Option<&str>,
    body: &[u8],
) -> Result<Option<BuildId>, serde_json::Error> {
    let payload: Payload = serde_json::from_slice(body)?;
    let event = event_header
        .map(str::to_string)
        .or(payload.event)
        .unwrap_or_default();
    if !(event.starts_with("build.") || event.starts_with("job.")) {
        return Ok(None);
    }
    Ok(payload
        .build
        .and_then(|b| b.meta_data)
        .and_then(|m| m.get(META_BUILD_ID)?.as_str().map(str::to_string))
        .and_then(|s| s.parse::<BuildId>().ok()))
}

/// Wakes `id`'s signal partition so its next poll happens now. The queue
/// records the wake, so a poll that is running now (here or in another
/// process) is followed by another at once instead of its hold (ADR 0012).
pub(super) async fn wake(state: &crate::state::AppState, id: &BuildId) -> Result<(), ApiError> {
    state
        .queue()
        .admin()
        .wake(topics::SIGNAL, id.as_str())
        .await
        .map_err(ApiError::unavailable)?;
    Ok(())
}

pub(super) fn outcome(outcome: &str, build_id: Option<&BuildId>) -> Json<WebhookOutcome> {
    Json(WebhookOutcome {
        outcome: outcome.into(),
        build_id: build_id.cloned(),
    })
}

pub(super) fn ignored() -> Json<WebhookOutcome> {
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
        (status = 400, description = "`malformed_json`", body = ErrorBody),
        (status = 401, description = "`invalid_webhook`: missing, wrong, tampered or stale credentials", body = ErrorBody),
        (status = 404, description = "`webhooks_not_configured`", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody)
    )
)]
pub(crate) async fn buildkite(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<WebhookOutcome>, ApiError> {
    let answer = receive_buildkite(&ctx, headers, body).await;
    count_delivery(&ctx, "buildkite", &answer);
    answer
}

/// Counts a delivery in `stitch_webhook_deliveries_total` by what it came
/// to; the outcome names are a fixed set ([`metric::WEBHOOK_OUTCOME_VALUES`]).
pub(super) fn count_delivery(
    ctx: &Ctx,
    provider: &'static str,
    answer: &Result<Json<WebhookOutcome>, ApiError>,
) {
    let outcome = match answer {
        Ok(o) => match o.outcome.as_str() {
            "woken" => "woken",
            "duplicate" => "duplicate",
            _ => "ignored",
        },
        Err(e) => match e.code {
            "invalid_webhook" => "bad_signature",
            "malformed_json" | "invalid_request" => "malformed",
            "body_too_large" => "too_large",
            "webhooks_not_configured" => "not_configured",
            _ => "failed",
        },
    };
    ctx.metrics.with(|| {
        metrics::counter!(metric::WEBHOOK_DELIVERIES, "provider" => provider, "outcome" => outcome)
            .increment(1);
    });
}

async fn receive_buildkite(
    ctx: &Ctx,
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
    let event = headers
        .get(stitch_runners::buildkite::webhook::EVENT_HEADER)
        .and_then(|v| v.to_str().ok());
    let id = buildkite_build_id(event, &body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("webhook body: {e}"),
        )
    })?;
    let Some(id) = id else {
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
    wake(state, &id).await?;
    Ok(outcome("woken", Some(&id)))
}

/// Receive a GitHub webhook.
#[utoipa::path(
    post,
    path = "/webhooks/github",
    tag = "webhooks",
    request_body(content = String, content_type = "application/json", description = "A GitHub webhook body"),
    params(
        ("X-GitHub-Event" = String, Header, min_length = 1, description = "Event name (`workflow_run`, `workflow_job`, `ping`, …); GitHub always sends it"),
        ("X-GitHub-Delivery" = Option<String>, Header, description = "Delivery id (redeliveries keep it)"),
        ("X-Hub-Signature-256" = String, Header, description = "`sha256=` + hex HMAC-SHA256 of the body keyed with the webhook secret")
    ),
    responses(
        (status = 200, description = "Verified; `woken`, `ignored` or `duplicate`", body = WebhookOutcome),
        (status = 400, description = "`malformed_json`, or `invalid_request`: no `X-GitHub-Event` (verified requests only)", body = ErrorBody),
        (status = 401, description = "`invalid_webhook`: missing, malformed or wrong signature", body = ErrorBody),
        (status = 404, description = "`webhooks_not_configured`", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody)
    )
)]
pub(crate) async fn github(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<WebhookOutcome>, ApiError> {
    let answer = receive_github(&ctx, headers, body).await;
    count_delivery(&ctx, "github", &answer);
    answer
}

async fn receive_github(
    ctx: &Ctx,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<WebhookOutcome>, ApiError> {
    let state = &ctx.state;
    let Some(hooks) = state.github_webhooks() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "webhooks_not_configured",
            "[webhooks.github] is not configured",
        ));
    };
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("webhook bodies are limited to {GITHUB_MAX_BODY} bytes"),
            )
        } else {
            ApiError::invalid(r.body_text())
        }
    })?;
    hooks
        .verify(&headers, &body)
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, "invalid_webhook", e.to_string()))?;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let event = header(gh::EVENT_HEADER);
    // Verified but nameless: not something GitHub sends, so say so rather
    // than answer `ignored` as if it were an event of no interest.
    if event.trim().is_empty() {
        return Err(ApiError::invalid(format!(
            "the {} header is missing or empty; GitHub names every event",
            gh::EVENT_HEADER
        )));
    }
    let delivery = header(gh::DELIVERY_HEADER);
    if !delivery.is_empty() && hooks.seen(&delivery) {
        return Ok(outcome("duplicate", None));
    }
    let hint = gh::run_hint(&event, &body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("webhook body: {e}"),
        )
    })?;
    let done = |o: Json<WebhookOutcome>| {
        if !delivery.is_empty() {
            hooks.handled(&delivery);
        }
        Ok(o)
    };
    let Some(hint) = hint else {
        return done(ignored());
    };
    let repo = hint.repository.as_deref();
    // The build the run's title names, else the build that recorded its id.
    let mut target = None;
    for id in hint
        .title
        .as_deref()
        .map(build_ids_in_title)
        .unwrap_or_default()
    {
        match state.store().get_build(&id).await {
            Ok(b) if hooks.speaks_for(&b.queue, repo) => {
                target = Some(b);
                break;
            }
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(ApiError::unavailable(e)),
        }
    }
    if target.is_none() {
        if let Some(run_id) = hint.run_id {
            let found = hooks
                .build_for_run(state.store(), run_id)
                .await
                .map_err(ApiError::unavailable)?;
            if let Some(id) = found {
                match state.store().get_build(&id).await {
                    Ok(b) if hooks.speaks_for(&b.queue, repo) => target = Some(b),
                    Ok(_) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(ApiError::unavailable(e)),
                }
            }
        }
    }
    let Some(build) = target.filter(|b| !b.status.is_terminal()) else {
        return done(ignored());
    };
    wake(state, &build.id).await?;
    done(outcome("woken", Some(&build.id)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    #[test]
    fn the_build_id_comes_from_build_and_job_events_only() {
        let id = BuildId::new();
        let body = json!({"event": "build.finished", "build": {"meta_data": {"stitch:build_id": id.to_string()}}});
        let body = serde_json::to_vec(&body).unwrap();
        assert_eq!(buildkite_build_id(None, &body).unwrap(), Some(id.clone()));
        assert_eq!(
            buildkite_build_id(Some("job.started"), &body).unwrap(),
            Some(id)
        );
        assert_eq!(buildkite_build_id(Some("ping"), &body).unwrap(), None);
        assert!(buildkite_build_id(None, b"{not json").is_err());
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn buildkite_bodies_of_any_bytes_decode_or_fail_typed(
            event in prop::option::of(".{0,16}"),
            body in prop::collection::vec(any::<u8>(), 0..512),
        ) {
            let _ = buildkite_build_id(event.as_deref(), &body);
        }

        #[test]
        fn buildkite_bodies_of_the_wrong_shape_name_no_build(
            event in prop_oneof![Just(Value::from("build.running")), Just(Value::from(7)), Just(Value::Null)],
            meta in prop_oneof![
                Just(Value::Null),
                any::<i64>().prop_map(Value::from),
                ".{0,30}".prop_map(|s| json!({"stitch:build_id": s})),
                any::<u64>().prop_map(|n| json!({"stitch:build_id": n})),
                ".{0,10}".prop_map(|s| json!([s])),
            ],
        ) {
            let body = serde_json::to_vec(&json!({"event": event, "build": {"meta_data": meta}})).unwrap();
            // Only a well-formed id is ever taken.
            if let Ok(Some(id)) = buildkite_build_id(Some("build.running"), &body) {
                let named = id.to_string();
                prop_assert_eq!(
                    Some(named.as_str()),
                    meta.get("stitch:build_id").and_then(Value::as_str)
                );
            }
        }
    }
}
