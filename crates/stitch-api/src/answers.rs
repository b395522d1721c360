//! Answers that are not builds: the error envelope, health, webhooks.

use serde::{Deserialize, Serialize};
use stitch_core::BuildId;
use utoipa::ToSchema;

/// The error envelope of every non-2xx answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// An error's stable code and explanation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case code (`invalid_request`, `build_not_found`, …).
    pub code: String,
    /// For humans; may change between versions.
    pub message: String,
    /// `events_pruned` only: the oldest event still stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_seq: Option<u64>,
}

/// `{"status":"ok"}` / `{"status":"ready"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HealthBody {
    /// `ok` (liveness) or `ready` (readiness).
    pub status: String,
}

/// What a webhook receiver did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WebhookOutcome {
    /// `woken` (a build's poll runs now), `ignored`, or `duplicate` (a
    /// GitHub delivery handled before).
    pub outcome: String,
    /// The stitch build woken, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<BuildId>,
}
