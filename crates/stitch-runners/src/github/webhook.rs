//! GitHub webhook requests (`research/github_actions.md` §5): verifying
//! `X-Hub-Signature-256` (`sha256=` + hex HMAC-SHA256 of the raw body,
//! keyed with the webhook secret, compared in constant time) and reading
//! what a `workflow_run` / `workflow_job` event says about which run.

use serde::Deserialize;

use crate::signature::{hmac_sha256_hex, verify_hmac_sha256};

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
/// The event name header.
pub const EVENT_HEADER: &str = "x-github-event";
/// The delivery id header (one GUID per delivery; redeliveries keep it).
pub const DELIVERY_HEADER: &str = "x-github-delivery";

/// Why a webhook was refused. The messages never echo secrets.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// No `X-Hub-Signature-256` header.
    #[error("missing X-Hub-Signature-256 header")]
    MissingSignature,
    /// Not `sha256=<64 hex digits>`.
    #[error("malformed X-Hub-Signature-256: {0}")]
    MalformedSignature(&'static str),
    /// The signature does not match the body.
    #[error("X-Hub-Signature-256 does not match the request body")]
    BadSignature,
}

/// `sha256=<hex>` for `body` keyed with `secret`: the header value GitHub sends.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    format!("sha256={}", hmac_sha256_hex(secret, &[body]))
}

/// Checks an `X-Hub-Signature-256` value for `body` against `secret`.
pub fn verify_signature(
    secret: &[u8],
    header: Option<&str>,
    body: &[u8],
) -> Result<(), WebhookError> {
    let header = header.ok_or(WebhookError::MissingSignature)?;
    let hex_part = header
        .trim()
        .strip_prefix("sha256=")
        .ok_or(WebhookError::MalformedSignature("expected sha256=<hex>"))?;
    if hex_part.len() != 64 {
        return Err(WebhookError::MalformedSignature(
            "expected 64 hex digits after sha256=",
        ));
    }
    let expected = hex::decode(hex_part)
        .map_err(|_| WebhookError::MalformedSignature("signature is not hex"))?;
    if verify_hmac_sha256(secret, &[body], &expected) {
        Ok(())
    } else {
        Err(WebhookError::BadSignature)
    }
}

/// What a verified event says about a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunHint {
    /// `workflow_run.id`, or `workflow_job.run_id`.
    pub run_id: Option<u64>,
    /// `workflow_run.display_title` (where the stitch build id is).
    pub title: Option<String>,
    /// `repository.full_name` (`owner/repo`).
    pub repository: Option<String>,
    /// The event's `action` (`requested`, `in_progress`, `completed`, …).
    pub action: Option<String>,
}

#[derive(Deserialize)]
struct Payload {
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    workflow_run: Option<PayloadRun>,
    #[serde(default)]
    workflow_job: Option<PayloadJob>,
    #[serde(default)]
    repository: Option<PayloadRepo>,
}

#[derive(Deserialize)]
struct PayloadRun {
    id: u64,
    #[serde(default)]
    display_title: Option<String>,
}

#[derive(Deserialize)]
struct PayloadJob {
    run_id: u64,
}

#[derive(Deserialize)]
struct PayloadRepo {
    #[serde(default)]
    full_name: Option<String>,
}

/// Reads the run an event is about. `Ok(None)`: an event that is not about
/// runs (`ping`, `push`, …); `Err`: the body is not the JSON the event
/// promises.
pub fn run_hint(event: &str, body: &[u8]) -> Result<Option<RunHint>, serde_json::Error> {
    if event != "workflow_run" && event != "workflow_job" {
        return Ok(None);
    }
    let p: Payload = serde_json::from_slice(body)?;
    let (run_id, title) = match (event, p.workflow_run, p.workflow_job) {
        ("workflow_run", Some(r), _) => (Some(r.id), r.display_title),
        ("workflow_job", _, Some(j)) => (Some(j.run_id), None),
        _ => (None, None),
    };
    Ok(Some(RunHint {
        run_id,
        title,
        repository: p.repository.and_then(|r| r.full_name),
        action: p.action,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// github/docs `validating-webhook-deliveries.md`: GitHub's own example.
    const SECRET: &str = "It's a Secret to Everybody";
    const PAYLOAD: &str = "Hello, World!";
    const HEADER: &str = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn githubs_documented_vector_verifies() {
        assert_eq!(sign(SECRET.as_bytes(), PAYLOAD.as_bytes()), HEADER);
        verify_signature(SECRET.as_bytes(), Some(HEADER), PAYLOAD.as_bytes()).unwrap();
    }

    #[test]
    fn forged_tampered_and_malformed_signatures_are_refused() {
        let body = PAYLOAD.as_bytes();
        assert_eq!(
            verify_signature(SECRET.as_bytes(), Some(HEADER), b"Hello, World?"),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify_signature(b"another secret", Some(HEADER), body),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify_signature(SECRET.as_bytes(), None, body),
            Err(WebhookError::MissingSignature)
        );
        let upper = HEADER.replace("757107ea", "757107EA");
        // Hex case does not matter to the MAC bytes.
        verify_signature(SECRET.as_bytes(), Some(&upper), body).unwrap();
        for bad in [
            "",
            "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
            "sha1=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
            "sha256=757107ea",
            "sha256=zz7107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        ] {
            assert!(
                matches!(
                    verify_signature(SECRET.as_bytes(), Some(bad), body),
                    Err(WebhookError::MalformedSignature(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn run_hints_come_from_runs_and_jobs_only() {
        let raw = include_bytes!(
            "../../../stitch-fake-providers/tests/data/github/webhook_workflow_run_completed.json"
        );
        let hint = run_hint("workflow_run", raw).unwrap().unwrap();
        assert_eq!(hint.run_id, Some(9138577001));
        assert_eq!(hint.title.as_deref(), Some("Nightly docs build"));
        assert_eq!(hint.repository.as_deref(), Some("acme/app"));
        assert_eq!(hint.action.as_deref(), Some("completed"));
        let job = br#"{"action":"completed","workflow_job":{"id":5,"run_id":77},"repository":{"full_name":"acme/app"}}"#;
        assert_eq!(
            run_hint("workflow_job", job).unwrap().unwrap().run_id,
            Some(77)
        );
        let ping =
            include_bytes!("../../../stitch-fake-providers/tests/data/github/webhook_ping.json");
        assert_eq!(run_hint("ping", ping).unwrap(), None);
        assert!(run_hint("workflow_run", b"{not json").is_err());
    }
}
