//! Request types and OpenAPI schemas (the document that lists them with
//! the routes is `openapi.rs`).
//!
//! The request body is the service's own [`CreateBuild`](crate::service::CreateBuild). The types here mirror
//! what the handlers serialize (the store's `Build` and `Event`, the core's
//! `LogLine`) for the OpenAPI document only; a test checks that their
//! property names match the JSON the server actually sends.

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

/// A build's status. `succeeded`, `failed` and `cancelled` are terminal;
/// `unknown` is not.
#[derive(Clone, Copy, Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BuildStatus {
    Unknown,
    Accepted,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// A build record.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct BuildRecord {
    /// stitch's build id (`b_` + 26 base32 characters), time-ordered.
    pub id: String,
    /// The build queue.
    pub queue: String,
    pub status: BuildStatus,
    /// Change URIs assumed good.
    pub base: Vec<String>,
    /// Change URIs under test.
    pub head: Vec<String>,
    /// Caller keys plus the runner's (`url`, `error`, `exit_status`, …).
    pub metadata: BTreeMap<String, String>,
    /// The provider's identity of the build once triggered (`{"id","url"?,"data"?}`).
    #[schema(value_type = Option<Object>, required = true)]
    pub runner_ref: Option<serde_json::Value>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
    /// When the build became terminal.
    #[schema(required = true)]
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The provider's web URL, once known.
    #[schema(required = true)]
    pub url: Option<String>,
    /// Whether cancellation was requested; the status stays non-terminal
    /// until the provider confirms it.
    pub cancel_requested: bool,
}

/// A page of `GET /v1/builds`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct BuildList {
    /// Newest first.
    pub builds: Vec<BuildRecord>,
    /// Pass as `cursor=` for the next page; null on the last page.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// What an event records.
#[derive(Clone, Copy, Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The build's status (or its metadata) changed.
    Status,
    /// A running job promised the build will fail.
    Failing,
}

/// One entry of the event log, as sent on `/v1/events`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Event {
    /// Gapless sequence number; resume after it with `after=` or `Last-Event-ID`.
    pub seq: u64,
    pub build_id: String,
    pub queue: String,
    pub kind: EventKind,
    /// The build's status after the change.
    pub status: BuildStatus,
    /// The build's merged metadata after the change.
    pub metadata: BTreeMap<String, String>,
    pub at: chrono::DateTime<chrono::Utc>,
}

/// One log frame, byte-compatible with Tangled's spindle `LogLine`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct LogLine {
    /// `data` or `control`.
    pub kind: String,
    /// The output line (data) or the step name (control).
    pub content: String,
    /// RFC 3339 UTC with milliseconds.
    pub time: String,
    pub step_id: i64,
    /// `stdout` or `stderr` (data lines only).
    pub stream: Option<String>,
    /// `start` or `end` (control lines only).
    pub step_status: Option<String>,
    /// 1 = user step; omitted for 0 = system step.
    pub step_kind: Option<u8>,
    /// The command a step runs (start control lines).
    pub step_command: Option<String>,
}

/// The error envelope of every non-2xx answer.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// An error's stable code and explanation.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case code (`invalid_request`, `build_not_found`, …).
    pub code: String,
    /// For humans; may change between versions.
    pub message: String,
    /// `events_pruned` only: the oldest event still stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_seq: Option<u64>,
}

/// `{"status":"ok"}` / `{"status":"ready"}`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct HealthBody {
    pub status: String,
}
