//! Builds on the wire: the record, a page of records, and the two request
//! bodies that act on a build.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use stitch_core::{limits, BuildId, BuildStatus, RunnerRef};
use utoipa::openapi::schema::{Array, ArrayBuilder, Object, ObjectBuilder, Type};
use utoipa::ToSchema;

/// Text without control characters (`char::is_control`: U+0000–U+001F,
/// U+007F–U+009F), as an ECMA-262 pattern.
pub const NO_CONTROL_CHARS: &str = r"^[^\x00-\x1F\x7F-\x9F]*$";
/// What `stitch_core::validate_metadata_key` accepts.
pub const METADATA_KEY: &str = r"^[A-Za-z0-9_.:-]{1,128}$";

/// Free-form `string → string` metadata (caller keys or runner keys).
/// Fields spell the map out: the schema derive does not see through aliases.
pub type Metadata = BTreeMap<String, String>;

/// A build record, as every build route answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BuildRecord {
    /// stitch's build id, time-ordered.
    pub id: BuildId,
    /// The build queue.
    pub queue: String,
    /// The current status.
    pub status: BuildStatus,
    /// Change URIs assumed good.
    pub base: Vec<String>,
    /// Change URIs under test.
    pub head: Vec<String>,
    /// Caller keys plus the runner's (`url`, `error`, `exit_status`, …);
    /// the runner's win on a clash.
    pub metadata: BTreeMap<String, String>,
    /// The provider's identity of the build once triggered; null before.
    #[schema(required = true)]
    pub runner_ref: Option<RunnerRef>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Time of the last change.
    pub updated_at: DateTime<Utc>,
    /// When the build became terminal; null until then.
    #[schema(required = true)]
    pub finished_at: Option<DateTime<Utc>>,
    /// The provider's web URL, once known.
    #[schema(required = true)]
    pub url: Option<String>,
    /// Whether cancellation was requested; the status stays non-terminal
    /// until the provider confirms it.
    #[serde(default)]
    #[schema(required = true)]
    pub cancel_requested: bool,
}

/// A page of `GET /v1/builds`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BuildList {
    /// Newest first.
    pub builds: Vec<BuildRecord>,
    /// Pass as `cursor=` for the next page; null on the last page.
    #[serde(default)]
    #[schema(required = true)]
    pub next_cursor: Option<BuildId>,
}

/// A request to create a build: the body of `POST /v1/queues/{queue}/builds`.
/// Unknown fields are refused.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "base": ["https://forge.example/acme/app/pull/41"],
    "head": ["https://forge.example/acme/app/pull/42"],
    "metadata": {"ticket": "T-1"},
    "idempotency_key": "mq-7f3a"
}))]
pub struct CreateBuild {
    /// Change URIs assumed good (the dependency prefix), in order.
    #[serde(default)]
    #[schema(schema_with = base_schema)]
    pub base: Vec<String>,
    /// Change URIs under test, in order; at least one.
    #[schema(schema_with = head_schema)]
    pub head: Vec<String>,
    /// Caller metadata, echoed back on the record and events.
    #[serde(default)]
    #[schema(schema_with = caller_metadata_schema)]
    pub metadata: BTreeMap<String, String>,
    /// Same key on the same queue returns the existing build (200) instead
    /// of creating another; a different request with it is a 409.
    /// 1–256 printable characters.
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\x00-\x1F\x7F-\x9F]*$"
    )]
    pub idempotency_key: Option<String>,
}

/// A list of change URIs with the limits `ChangeSet::validate` enforces.
/// The length limit is in bytes on the server; the schema can only count
/// characters, which is the same for the ASCII of URIs.
fn change_uris(description: &str, min_items: usize) -> Array {
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(limits::MAX_CHANGE_URI_BYTES))
                .pattern(Some(NO_CONTROL_CHARS)),
        )
        .min_items(Some(min_items))
        .max_items(Some(limits::MAX_CHANGES_PER_LIST))
        .description(Some(description))
        .build()
}

fn base_schema() -> Array {
    change_uris(
        "Change URIs assumed good (the dependency prefix), in order.",
        0,
    )
}

fn head_schema() -> Array {
    change_uris("Change URIs under test, in order; at least one.", 1)
}

/// Caller metadata with the limits `BuildMetadata::validate` enforces.
fn caller_metadata_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(METADATA_KEY)),
        ))
        .additional_properties(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .max_length(Some(limits::MAX_METADATA_VALUE_BYTES)),
        ))
        .max_properties(Some(limits::MAX_METADATA_KEYS))
        .description(Some(
            "Caller metadata, echoed back on the record and events. Keys: 1–128 of \
             letters, digits and `_ . : -`.",
        ))
        .build()
}

/// The body of `POST /v1/builds/{id}/promise-failure` (and of the job
/// API's `POST /promise-failure`). Unknown fields are refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"exit_status": 1, "reason": "test_login failed"}))]
pub struct PromiseFailureBody {
    /// The exit status the job will finish with.
    #[schema(minimum = 1, maximum = 2147483647)]
    pub exit_status: i64,
    /// Why, for humans (at most 4096 bytes).
    #[serde(default)]
    pub reason: Option<String>,
}
