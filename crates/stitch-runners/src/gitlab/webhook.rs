//! GitLab webhook requests: verifying `X-Gitlab-Token` (the webhook's
//! secret token in clear text, compared in constant time) and reading
//! which pipeline a Pipeline Hook event is about.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use stitch_core::BuildId;
use subtle::ConstantTimeEq;

use super::model::pipeline_name;

/// The secret token header.
pub const TOKEN_HEADER: &str = "x-gitlab-token";
/// The event name header (`Pipeline Hook`, `Job Hook`, …).
pub const EVENT_HEADER: &str = "x-gitlab-event";
/// The event this receiver acts on.
pub const PIPELINE_HOOK: &str = "Pipeline Hook";

/// Why a webhook was refused. The messages never echo secrets.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// No `X-Gitlab-Token` header.
    #[error("missing X-Gitlab-Token header")]
    MissingToken,
    /// The token matches no configured secret.
    #[error("invalid X-Gitlab-Token")]
    BadToken,
}

/// Checks an `X-Gitlab-Token` value against `secret` in constant time.
/// The SHA-256 digests are compared, not the values: both are 32 bytes, so
/// the comparison's time says nothing about the secret's length either.
pub fn verify_token(secret: &[u8], presented: &[u8]) -> bool {
    let (expected, got) = (Sha256::digest(secret), Sha256::digest(presented));
    bool::from(expected.ct_eq(&got))
}

/// What a verified Pipeline Hook says about a pipeline.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PipelineHint {
    /// `object_attributes.id`.
    pub pipeline_id: Option<u64>,
    /// The stitch build the pipeline's name (else its `STITCH_BUILD_ID`
    /// variable) names.
    pub build_id: Option<BuildId>,
    /// `object_attributes.status`.
    pub status: Option<String>,
    /// `project.path_with_namespace`.
    pub project_path: Option<String>,
    /// `project.id`.
    pub project_id: Option<u64>,
}

#[derive(Deserialize)]
struct Payload {
    #[serde(default)]
    object_kind: Option<String>,
    #[serde(default)]
    object_attributes: Option<Attributes>,
    #[serde(default)]
    project: Option<Project>,
}

#[derive(Deserialize)]
struct Attributes {
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    variables: Vec<PayloadVariable>,
}

#[derive(Deserialize)]
struct PayloadVariable {
    key: String,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Deserialize)]
struct Project {
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    path_with_namespace: Option<String>,
}

/// Reads the pipeline an event is about. `Ok(None)`: an event that is not
/// a Pipeline Hook (named by `X-Gitlab-Event`, else the body's
/// `object_kind`); `Err`: the body is not the JSON the event promises.
pub fn pipeline_hint(
    event: Option<&str>,
    body: &[u8],
) -> Result<Option<PipelineHint>, serde_json::Error> {
    if event.is_some_and(|e| e != PIPELINE_HOOK) {
        return Ok(None);
    }
    let p: Payload = serde_json::from_slice(body)?;
    if p.object_kind.as_deref() != Some("pipeline") {
        return Ok(None);
    }
    let Some(attrs) = p.object_attributes else {
        return Ok(None);
    };
    let named = attrs.name.as_deref().and_then(|name| {
        let id: BuildId = name.strip_prefix("stitch ")?.parse().ok()?;
        (pipeline_name(&id) == name).then_some(id)
    });
    let from_variable = || {
        attrs
            .variables
            .iter()
            .find(|v| v.key == "STITCH_BUILD_ID")
            .and_then(|v| v.value.as_deref()?.parse().ok())
    };
    Ok(Some(PipelineHint {
        pipeline_id: attrs.id,
        build_id: named.or_else(from_variable),
        status: attrs.status,
        project_path: p
            .project
            .as_ref()
            .and_then(|p| p.path_with_namespace.clone()),
        project_id: p.project.and_then(|p| p.id),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        assert!(verify_token(b"s3cret", b"s3cret"));
        assert!(!verify_token(b"s3cret", b"s3cres"));
        assert!(!verify_token(b"s3cret", b"s3cret "));
        assert!(!verify_token(b"s3cret", b""));
    }

    #[test]
    fn the_documented_pipeline_hook_is_read() {
        let body = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/gitlab/pipeline_hook.json"
        ))
        .unwrap();
        let hint = pipeline_hint(Some(PIPELINE_HOOK), &body).unwrap().unwrap();
        assert_eq!(hint.pipeline_id, Some(31));
        assert_eq!(hint.status.as_deref(), Some("success"));
        assert_eq!(hint.project_path.as_deref(), Some("gitlab-org/gitlab-test"));
        assert_eq!(hint.project_id, Some(1));
        assert_eq!(hint.build_id, None, "not a stitch pipeline");
        assert_eq!(pipeline_hint(Some("Push Hook"), &body).unwrap(), None);
        assert!(pipeline_hint(Some(PIPELINE_HOOK), b"{not json").is_err());
    }

    #[test]
    fn the_build_comes_from_the_name_else_the_variable() {
        let id = BuildId::new();
        let named = serde_json::json!({"object_kind": "pipeline",
            "object_attributes": {"id": 5, "name": pipeline_name(&id), "status": "running"}});
        let hint = pipeline_hint(None, named.to_string().as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(hint.build_id, Some(id.clone()));
        let by_var = serde_json::json!({"object_kind": "pipeline",
            "object_attributes": {"id": 5, "name": null,
                "variables": [{"key": "STITCH_BUILD_ID", "value": id.to_string()}]}});
        let hint = pipeline_hint(None, by_var.to_string().as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(hint.build_id, Some(id));
        let forged = serde_json::json!({"object_kind": "pipeline",
            "object_attributes": {"id": 5, "name": "stitch b_notanid"}});
        let hint = pipeline_hint(None, forged.to_string().as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(hint.build_id, None);
        let job = serde_json::json!({"object_kind": "build"});
        assert_eq!(
            pipeline_hint(None, job.to_string().as_bytes()).unwrap(),
            None
        );
    }
}
