//! `POST /webhooks/gitlab`: GitLab Pipeline Hooks wake the poll loop.
//!
//! `X-Gitlab-Token` is checked first against the secrets of the `gitlab`
//! queues with a `webhook` table (see [`crate::gitlab_webhooks`]):
//! anything unverified is 401 and changes nothing. A verified Pipeline
//! Hook whose pipeline is named for a live build (`stitch <build id>`, else
//! its `STITCH_BUILD_ID` variable) on a queue that secret speaks for, of
//! that queue's project, wakes the build's signal partition; the poll asks
//! GitLab for the truth (hook bodies are hints). A hook whose status maps
//! to the status the build already has wakes nothing. Everything else
//! verified — other events, pipelines that are not stitch's — is 200 and
//! nothing else. The body is capped at [`GITLAB_MAX_BODY`].

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use stitch_api::{ErrorBody, WebhookOutcome};
use stitch_runners::gitlab::webhook::{pipeline_hint, EVENT_HEADER};
use stitch_runners::gitlab::PipelineStatus;

use super::error::ApiError;
use super::webhooks::{count_delivery, ignored, outcome, wake};
use super::Ctx;

/// Largest accepted GitLab webhook body: a Pipeline Hook carries the
/// pipeline, its variables, every job and the project, tens of KiB.
pub const GITLAB_MAX_BODY: usize = 1024 * 1024;

/// Receive a GitLab webhook.
#[utoipa::path(
    post,
    path = "/webhooks/gitlab",
    tag = "webhooks",
    request_body(content = String, content_type = "application/json", description = "A GitLab webhook body (Pipeline Hook)"),
    params(
        ("X-Gitlab-Event" = Option<String>, Header, description = "Event name (`Pipeline Hook`, …)"),
        ("X-Gitlab-Token" = Option<String>, Header, description = "The webhook's secret token (a request without it is refused 401 where webhooks are configured)")
    ),
    responses(
        (status = 200, description = "Verified; `woken` or `ignored`", body = WebhookOutcome),
        (status = 400, description = "`malformed_json`", body = ErrorBody),
        (status = 401, description = "`invalid_webhook`: missing or wrong token", body = ErrorBody),
        (status = 404, description = "`webhooks_not_configured`", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody)
    )
)]
pub(crate) async fn gitlab(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<WebhookOutcome>, ApiError> {
    let answer = receive(&ctx, headers, body).await;
    count_delivery(&ctx, "gitlab", &answer);
    answer
}

async fn receive(
    ctx: &Ctx,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<WebhookOutcome>, ApiError> {
    let state = &ctx.state;
    let hooks = state.gitlab_webhooks();
    if hooks.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "webhooks_not_configured",
            "no queue has [queues.NAME.gitlab.webhook] configured",
        ));
    }
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("webhook bodies are limited to {GITLAB_MAX_BODY} bytes"),
            )
        } else {
            ApiError::invalid(r.body_text())
        }
    })?;
    let queues = hooks
        .verify(&headers)
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, "invalid_webhook", e.to_string()))?;
    let event = headers.get(EVENT_HEADER).and_then(|v| v.to_str().ok());
    let hint = pipeline_hint(event, &body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("webhook body: {e}"),
        )
    })?;
    let Some((hint, id)) = hint.and_then(|h| {
        let id = h.build_id.clone()?;
        Some((h, id))
    }) else {
        return Ok(ignored());
    };
    let build = match state.store().get_build(&id).await {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(ignored()),
        Err(e) => return Err(ApiError::unavailable(e)),
    };
    // A secret speaks only for its own queues, each for its own project.
    let ours = queues.contains(&build.queue)
        && hooks.speaks_for(&build.queue, hint.project_path.as_deref(), hint.project_id);
    if !ours || build.status.is_terminal() {
        return Ok(ignored());
    }
    // A hook whose status stitch already has (`pending` for an accepted
    // build) changes nothing a poll would find: the safety-net poll
    // covers a hint that was wrong. This keeps a build at four calls.
    let hinted = hint
        .status
        .as_deref()
        .map(|s| PipelineStatus::parse(s).status());
    if hinted == Some(build.status) {
        return Ok(ignored());
    }
    wake(state, &id).await?;
    Ok(outcome("woken", Some(&id)))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use stitch_runners::gitlab::webhook::pipeline_hint;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn bodies_of_any_bytes_decode_or_fail_typed(
            event in prop::option::of(".{0,16}"),
            body in prop::collection::vec(any::<u8>(), 0..512),
        ) {
            let _ = pipeline_hint(event.as_deref(), &body);
        }
    }
}
