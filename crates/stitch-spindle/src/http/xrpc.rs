//! `sh.tangled.owner` and `sh.tangled.pipeline.cancelPipeline`.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use stitch_server::service;

use crate::auth::{check_claims, verify_signature, AuthError};
use crate::records::{CancelInput, CANCEL_NSID, PIPELINE_NSID};
use crate::tid::is_tid;
use crate::Spindle;

/// `GET /xrpc/sh.tangled.owner` → `{"owner": DID}`, no auth.
pub(crate) async fn owner(State(spindle): State<Spindle>) -> Response {
    Json(json!({ "owner": spindle.settings.owner })).into_response()
}

/// An XRPC error: `{"error","message"}`.
fn xrpc_error(status: StatusCode, error: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "error": error, "message": message.into() })),
    )
        .into_response()
}

/// 401: no token, or a token that is not accepted.
fn unauthorized(error: &str, why: AuthError) -> Response {
    xrpc_error(StatusCode::UNAUTHORIZED, error, why.to_string())
}

fn bad(error: &str, message: impl Into<String>) -> Response {
    xrpc_error(StatusCode::BAD_REQUEST, error, message)
}

/// `POST /xrpc/sh.tangled.pipeline.cancelPipeline`: verifies service auth,
/// requires the caller to own the repo, cancels the workflow's build (its
/// `cancelled` status follows from the build's transition). 200 with an
/// empty body; a missing or refused token is 401, other refusals 400, each
/// `{"error","message"}` without URLs or upstream answers.
pub(crate) async fn cancel_pipeline(
    State(spindle): State<Spindle>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = token else {
        return unauthorized("AuthRequired", AuthError::Missing);
    };
    let now = chrono::Utc::now().timestamp();
    let checked = match check_claims(token, &spindle.settings.service_did(), CANCEL_NSID, now) {
        Ok(checked) => checked,
        Err(e) => return unauthorized("InvalidToken", e),
    };
    // Only DIDs the spindle already knows are resolved: a stranger's token
    // must not make the spindle fetch anything.
    match spindle
        .db
        .knows_did(&spindle.settings.owner, &checked.did)
        .await
    {
        Ok(true) => {}
        Ok(false) => return unauthorized("InvalidToken", AuthError::Untrusted),
        Err(e) => {
            tracing::error!(error = %e, "spindle cancel: issuer lookup failed");
            return xrpc_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerError",
                "lookup failed",
            );
        }
    }
    let actor = match verify_signature(&spindle.resolver, checked).await {
        Ok(did) => did,
        Err(e) => return unauthorized("InvalidToken", e),
    };
    let input: CancelInput = match serde_json::from_slice(&body) {
        Ok(i) => i,
        Err(e) => return bad("InvalidRequest", format!("invalid input: {e}")),
    };
    let (repo_did, repo_rkey) = match parse_at_uri(&input.repo, "sh.tangled.repo") {
        Some(parts) => parts,
        None => {
            return bad(
                "InvalidRequest",
                "repo must be an AT-URI at://<did>/sh.tangled.repo/<rkey>",
            )
        }
    };
    let pipeline = match parse_pipeline(&input.pipeline) {
        Some(p) => p,
        None => {
            return bad(
                "InvalidRequest",
                "pipeline must be at://did:web:<knot>/sh.tangled.pipeline/<tid> or a bare TID",
            )
        }
    };
    let runs = match &pipeline {
        (Some(knot), rkey) => spindle
            .db
            .run(knot, rkey, &input.workflow)
            .await
            .map(|r| r.into_iter().collect::<Vec<_>>()),
        (None, rkey) => spindle.db.runs_by_rkey(rkey, &input.workflow).await,
    };
    let runs = match runs {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "spindle cancel: lookup failed");
            return xrpc_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerError",
                "lookup failed",
            );
        }
    };
    let run = match runs.as_slice() {
        [run] => run.clone(),
        [] => return bad("NotFound", "no such workflow run on this spindle"),
        _ => {
            return bad(
                "InvalidRequest",
                "the bare TID matches runs on several knots; send the pipeline AT-URI",
            )
        }
    };
    // The repo named must be the run's, and the caller its owner.
    let repo_name = match spindle.db.repo_name(&repo_did, &repo_rkey).await {
        Ok(name) => name,
        Err(e) => {
            tracing::error!(error = %e, "spindle cancel: repo lookup failed");
            return xrpc_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerError",
                "lookup failed",
            );
        }
    };
    if repo_did != run.repo_did || repo_name.as_deref().is_some_and(|n| n != run.repo_name) {
        return bad(
            "InvalidRequest",
            "the repo does not match the pipeline's repo",
        );
    }
    if actor != run.repo_did {
        return bad("Unauthorized", format!("{actor} does not own the repo"));
    }
    let Some(build_id) = run.build_id else {
        return bad("InvalidRequest", "the workflow is not running");
    };
    match service::cancel_build(&spindle.state, &build_id).await {
        Ok(_) => StatusCode::OK.into_response(),
        Err(e) => {
            tracing::error!(error = %e, build = %build_id, "spindle cancel failed");
            xrpc_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerError",
                "cancel failed",
            )
        }
    }
}

/// `at://<authority>/<collection>/<rkey>` → (authority, rkey).
fn parse_at_uri(uri: &str, collection: &str) -> Option<(String, String)> {
    let rest = uri.strip_prefix("at://")?;
    let mut parts = rest.split('/');
    let (authority, coll, rkey) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || coll != collection || authority.is_empty() || rkey.is_empty() {
        return None;
    }
    Some((authority.to_string(), rkey.to_string()))
}

/// A pipeline AT-URI (knot, rkey) or a bare TID (no knot).
fn parse_pipeline(value: &str) -> Option<(Option<String>, String)> {
    if is_tid(value) {
        return Some((None, value.to_string()));
    }
    let (authority, rkey) = parse_at_uri(value, PIPELINE_NSID)?;
    let knot = authority.strip_prefix("did:web:")?;
    Some((Some(knot.to_string()), rkey))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_forms() {
        assert_eq!(
            parse_pipeline("at://did:web:knot.example.com/sh.tangled.pipeline/3lzabc"),
            Some((Some("knot.example.com".into()), "3lzabc".into()))
        );
        assert_eq!(
            parse_pipeline("3lzabcdefghij"),
            Some((None, "3lzabcdefghij".into()))
        );
        assert_eq!(
            parse_pipeline("at://did:plc:x/sh.tangled.pipeline/3l"),
            None
        );
        assert_eq!(parse_pipeline("at://did:web:k/sh.tangled.repo/3l"), None);
        assert_eq!(
            parse_at_uri("at://did:plc:a/sh.tangled.repo/r/extra", "sh.tangled.repo"),
            None
        );
    }
}
