//! Wire shapes of the Tangled records and frames the spindle reads and
//! writes (pinned by `tests/golden.rs` and `tests/data/`). Field names and order
//! follow the Go structs of the stock spindle byte for byte.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// NSID of a pipeline trigger record.
pub const PIPELINE_NSID: &str = "sh.tangled.pipeline";
/// NSID of a pipeline status record.
pub const STATUS_NSID: &str = "sh.tangled.pipeline.status";
/// NSID of a repository record.
pub const REPO_NSID: &str = "sh.tangled.repo";
/// NSID of a spindle membership record.
pub const MEMBER_NSID: &str = "sh.tangled.spindle.member";
/// NSID of a repository collaborator record.
pub const COLLABORATOR_NSID: &str = "sh.tangled.repo.collaborator";
/// NSID of the owner query.
pub const OWNER_NSID: &str = "sh.tangled.owner";
/// NSID of the cancel procedure.
pub const CANCEL_NSID: &str = "sh.tangled.pipeline.cancelPipeline";

/// The six states of `sh.tangled.pipeline.status` (spelled `cancelled`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PipelineState {
    /// Accepted, not running yet.
    Pending,
    /// Running.
    Running,
    /// Finished and passed.
    Success,
    /// Finished and did not pass, or could not run.
    Failed,
    /// Stopped by a deadline.
    Timeout,
    /// Stopped on request.
    Cancelled,
}

impl PipelineState {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            PipelineState::Pending => "pending",
            PipelineState::Running => "running",
            PipelineState::Success => "success",
            PipelineState::Failed => "failed",
            PipelineState::Timeout => "timeout",
            PipelineState::Cancelled => "cancelled",
        }
    }
}

/// A `sh.tangled.pipeline.status` record, as the stock spindle writes it:
/// `$type` is `""` (Go ignores its `,const=` tag), `createdAt` is RFC 3339
/// with second precision, `error`/`exitCode` only when set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineStatus {
    /// Always `""` on the wire.
    #[serde(rename = "$type", default)]
    pub type_: String,
    /// `at://did:web:<knot>/sh.tangled.pipeline/<rkey>`.
    pub pipeline: String,
    /// The workflow file name.
    pub workflow: String,
    /// The state.
    pub status: PipelineState,
    /// When the state was recorded (RFC 3339 UTC, seconds).
    #[serde(rename = "createdAt")]
    pub created_at: String,
    /// Why it failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The exit code of a failed or cancelled workflow.
    #[serde(rename = "exitCode", default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
}

/// The pipeline AT-URI statuses point at.
pub fn pipeline_uri(knot: &str, rkey: &str) -> String {
    format!("at://did:web:{knot}/{PIPELINE_NSID}/{rkey}")
}

/// One frame of the spindle's `/events` stream:
/// `{"rkey","nsid","event","created"}`.
#[derive(Debug, Serialize)]
pub struct EventFrame<'a> {
    /// The record's TID.
    pub rkey: &'a str,
    /// The record's NSID.
    pub nsid: &'a str,
    /// The record, verbatim as stored.
    pub event: &'a RawValue,
    /// Unix nanoseconds, strictly increasing: the resume cursor.
    pub created: i64,
}

/// One frame of a knot's `/events` stream (the same envelope; `created` is
/// absent on older knots).
#[derive(Debug, Deserialize)]
pub struct KnotFrame {
    /// The record's rkey.
    pub rkey: String,
    /// The record's NSID.
    pub nsid: String,
    /// The record.
    pub event: serde_json::Value,
    /// Unix nanoseconds, when the knot sends it.
    #[serde(default)]
    pub created: Option<i64>,
}

/// A `sh.tangled.pipeline` trigger record.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineRecord {
    /// What caused the pipeline; the lexicon does not force it.
    #[serde(default)]
    pub trigger_metadata: Option<TriggerMetadata>,
    /// One entry per workflow file; entries may be null.
    #[serde(default)]
    pub workflows: Vec<Option<Workflow>>,
}

/// `triggerMetadata`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TriggerMetadata {
    /// `push`, `pull_request` or `manual`.
    #[serde(default)]
    pub kind: String,
    /// The repository the trigger is about.
    #[serde(default)]
    pub repo: Option<TriggerRepo>,
    /// Push data (kind `push`).
    #[serde(default)]
    pub push: Option<PushData>,
    /// Pull request data (kind `pull_request`).
    #[serde(default)]
    pub pull_request: Option<PullRequestData>,
    /// Manual run inputs (kind `manual`).
    #[serde(default)]
    pub manual: Option<ManualData>,
}

/// `triggerMetadata.repo`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TriggerRepo {
    /// The knot hosting the repository.
    #[serde(default)]
    pub knot: String,
    /// The owner's DID.
    #[serde(default)]
    pub did: String,
    /// The repository name.
    #[serde(default)]
    pub repo: String,
    /// The default branch (empty on the knot's push path).
    #[serde(default)]
    pub default_branch: String,
}

/// `triggerMetadata.push`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PushData {
    /// The pushed ref (`refs/heads/main`).
    #[serde(rename = "ref", default)]
    pub ref_: String,
    /// The new commit.
    #[serde(default)]
    pub new_sha: String,
    /// The previous commit.
    #[serde(default)]
    pub old_sha: String,
}

/// `triggerMetadata.pullRequest`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PullRequestData {
    /// Branch the change comes from.
    #[serde(default)]
    pub source_branch: String,
    /// Branch it targets.
    #[serde(default)]
    pub target_branch: String,
    /// Commit under test.
    #[serde(default)]
    pub source_sha: String,
    /// What happened to the pull request.
    #[serde(default)]
    pub action: String,
}

/// `triggerMetadata.manual`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ManualData {
    /// Inputs given by the user.
    #[serde(default)]
    pub inputs: Vec<ManualInput>,
}

/// One manual input.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ManualInput {
    /// Input name.
    #[serde(default)]
    pub key: String,
    /// Input value.
    #[serde(default)]
    pub value: String,
}

/// One workflow of a trigger.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Workflow {
    /// The workflow file name (`ci.yml`).
    #[serde(default)]
    pub name: String,
    /// The engine the file names (required by Tangled; not used by stitch).
    #[serde(default)]
    pub engine: String,
    /// The file's raw YAML.
    #[serde(default)]
    pub raw: String,
}

/// One Jetstream frame.
#[derive(Debug, Deserialize)]
pub struct JetstreamFrame {
    /// The repository (account) the event is about.
    pub did: String,
    /// Jetstream's cursor: unix microseconds.
    pub time_us: i64,
    /// `commit`, `identity` or `account`.
    pub kind: String,
    /// The record change of a `commit` event.
    #[serde(default)]
    pub commit: Option<JetstreamCommit>,
}

/// `commit` of a Jetstream frame.
#[derive(Debug, Deserialize)]
pub struct JetstreamCommit {
    /// `create`, `update` or `delete`.
    pub operation: String,
    /// The record's NSID.
    pub collection: String,
    /// The record key.
    pub rkey: String,
    /// The record (absent on delete).
    #[serde(default)]
    pub record: Option<serde_json::Value>,
}

/// The parts of `sh.tangled.repo` the spindle uses.
#[derive(Debug, Deserialize)]
pub struct RepoRecord {
    /// Repository name.
    pub name: String,
    /// Knot hosting it.
    pub knot: String,
    /// Spindle hostname that runs its pipelines.
    #[serde(default)]
    pub spindle: Option<String>,
}

/// The parts of `sh.tangled.spindle.member` the spindle uses.
#[derive(Debug, Deserialize)]
pub struct MemberRecord {
    /// The member's DID.
    pub subject: String,
    /// The spindle hostname the membership is for.
    pub instance: String,
}

/// The parts of `sh.tangled.repo.collaborator` the spindle uses.
#[derive(Debug, Deserialize)]
pub struct CollaboratorRecord {
    /// The collaborator's DID.
    pub subject: String,
    /// The repository AT-URI.
    pub repo: String,
}

/// `sh.tangled.pipeline.cancelPipeline` input.
#[derive(Debug, Deserialize)]
pub struct CancelInput {
    /// `at://<did>/sh.tangled.repo/<rkey>`.
    pub repo: String,
    /// The pipeline AT-URI, or its bare TID.
    pub pipeline: String,
    /// The workflow name.
    pub workflow: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_omits_error_and_exit_code_when_unset() {
        let s = PipelineStatus {
            type_: String::new(),
            pipeline: pipeline_uri("knot.example.com", "3l"),
            workflow: "ci.yml".into(),
            status: PipelineState::Running,
            created_at: "2026-01-02T03:04:05Z".into(),
            error: None,
            exit_code: None,
        };
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"$type":"","pipeline":"at://did:web:knot.example.com/sh.tangled.pipeline/3l","workflow":"ci.yml","status":"running","createdAt":"2026-01-02T03:04:05Z"}"#
        );
    }

    #[test]
    fn trigger_tolerates_null_workflows_and_missing_fields() {
        let r: PipelineRecord = serde_json::from_str(
            r#"{"$type":"","workflows":[null,{"name":""},{"name":"ci.yml"}]}"#,
        )
        .unwrap();
        assert!(r.trigger_metadata.is_none());
        assert_eq!(r.workflows.len(), 3);
        assert!(r.workflows[0].is_none());
    }
}
