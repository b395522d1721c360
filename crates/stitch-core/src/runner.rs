//! The `BuildRunner` contract and the values that cross it.

use std::collections::BTreeMap;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::build::{BuildId, BuildStatus};
use crate::changes::ChangeSet;
use crate::error::RunnerError;
use crate::log::LogLine;
use crate::metadata::BuildMetadata;
use crate::validation::{validate_queue_name, ValidationError};

/// A request to start one build. On the wire the change set is flattened:
/// `{"build_id", "queue", "base", "head", "metadata"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerRequest {
    /// stitch's id for the build; the runner's idempotency key.
    pub build_id: BuildId,
    /// The queue the build belongs to.
    pub queue: String,
    /// What to build.
    #[serde(flatten)]
    pub changes: ChangeSet,
    /// Caller metadata, stamped on the provider's build where possible.
    #[serde(default)]
    pub metadata: BuildMetadata,
    /// Environment the CI job needs to call back into stitch
    /// (`STITCH_JOB_TOKEN`, `STITCH_SERVER`). Runners add it to the job's
    /// environment; it is a credential, so they never stamp it as metadata
    /// or log it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub job_env: BTreeMap<String, String>,
    /// `true` only when the caller knows no earlier trigger of this build
    /// id was attempted anywhere (the first delivery of its trigger
    /// message). A runner whose look-up of an existing build is costly
    /// (GitHub lists runs and matches titles) may then skip the look-up
    /// before creating; `false`, the default, always allows a duplicate
    /// check.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub first_attempt: bool,
}

impl TriggerRequest {
    /// A request with empty metadata.
    pub fn new(build_id: BuildId, queue: impl Into<String>, changes: ChangeSet) -> Self {
        Self {
            build_id,
            queue: queue.into(),
            changes,
            metadata: BuildMetadata::new(),
            job_env: BTreeMap::new(),
            first_attempt: false,
        }
    }

    /// Builder: set the caller metadata.
    #[must_use]
    pub fn with_metadata(mut self, metadata: BuildMetadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// Builder: set the environment the job uses to call back into stitch.
    #[must_use]
    pub fn with_job_env(mut self, job_env: BTreeMap<String, String>) -> Self {
        self.job_env = job_env;
        self
    }

    /// Builder: mark this as the first trigger attempt of the build id
    /// (see [`TriggerRequest::first_attempt`]).
    #[must_use]
    pub fn with_first_attempt(mut self, first_attempt: bool) -> Self {
        self.first_attempt = first_attempt;
        self
    }

    /// Check queue name, change set and metadata against the input limits.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_queue_name(&self.queue)?;
        self.changes.validate()?;
        self.metadata.validate()
    }

    /// A handle for this build with no runner ref yet.
    pub fn handle(&self) -> BuildHandle {
        BuildHandle::new(self.build_id.clone(), self.queue.clone())
    }
}

/// The provider's own identity of a build, opaque to everything but the
/// runner that minted it. Stored on the build record as JSON
/// (`{"id", "url"?, "data"?}`); a cache, never the only way back to the build.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunnerRef {
    /// The provider's id (Buildkite build number, GitHub run id, …).
    pub id: String,
    /// A human-facing URL of the build, when the provider has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Anything else the runner needs to find the build again.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data: BTreeMap<String, String>,
}

impl RunnerRef {
    /// A ref with just an id.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            url: None,
            data: BTreeMap::new(),
        }
    }

    /// Builder: set the URL.
    #[must_use]
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// Builder: add one `data` entry.
    #[must_use]
    pub fn with_data(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.data.insert(key.into(), value.into());
        self
    }

    /// One `data` entry.
    pub fn data(&self, key: &str) -> Option<&str> {
        self.data.get(key).map(String::as_str)
    }
}

/// How stitch points a runner at an existing build. `runner_ref` is `None`
/// when the ref was lost before it was recorded; runners that can, find the
/// build by `build_id` then.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildHandle {
    /// stitch's id for the build.
    pub build_id: BuildId,
    /// The queue the build belongs to.
    pub queue: String,
    /// The ref `trigger` returned, when recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_ref: Option<RunnerRef>,
}

impl BuildHandle {
    /// A handle without a runner ref.
    pub fn new(build_id: BuildId, queue: impl Into<String>) -> Self {
        Self {
            build_id,
            queue: queue.into(),
            runner_ref: None,
        }
    }

    /// Builder: attach the runner ref.
    #[must_use]
    pub fn with_ref(mut self, runner_ref: RunnerRef) -> Self {
        self.runner_ref = Some(runner_ref);
        self
    }
}

/// What `status` observed: the mapped status and runner-defined metadata
/// (`url`, `error`, `exit_status`, …).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The mapped status; provider states stitch does not know are `unknown`.
    pub status: BuildStatus,
    /// Runner metadata.
    #[serde(default)]
    pub metadata: BuildMetadata,
}

impl StatusReport {
    /// A report with empty metadata.
    pub fn new(status: BuildStatus) -> Self {
        Self {
            status,
            metadata: BuildMetadata::new(),
        }
    }

    /// Builder: set the metadata.
    #[must_use]
    pub fn with_metadata(mut self, metadata: BuildMetadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// Whether the reported status is terminal.
    pub fn is_terminal(&self) -> bool {
        self.status.is_terminal()
    }
}

/// A build's log: frames in order, ending when the build is terminal and
/// every line has been sent. An `Err` item reports a failure to read more.
pub type LogStream = BoxStream<'static, Result<LogLine, RunnerError>>;

/// A backend that runs builds. Implementations are long-lived and
/// concurrency-safe; per-queue wiring (which runner, which settings) lives
/// in the server's configuration layer.
///
/// Contract:
/// - `trigger` and `cancel` return promptly (one provider round trip);
///   `status` may be slow. Nothing blocks indefinitely.
/// - The build id is the idempotency key: triggering a build id the runner
///   already created returns the existing ref and creates nothing.
/// - `status` of a build the runner cannot find is [`RunnerError::NotFound`].
/// - Provider states the runner does not recognise map to
///   [`BuildStatus::Unknown`], which is non-terminal.
/// - `cancel` returns once the request reached the provider; it is a no-op
///   (`Ok`) for a build that is already terminal.
/// - Errors carry what classification needs; the caller decides on retries.
#[async_trait]
pub trait BuildRunner: Send + Sync {
    /// The runner's configuration name (`"noop"`, `"fake"`, `"local"`, …).
    fn name(&self) -> &'static str;

    /// Start the build described by `req`, or return the ref of the build
    /// already started for `req.build_id`.
    async fn trigger(&self, req: &TriggerRequest) -> Result<RunnerRef, RunnerError>;

    /// The build's current status and runner metadata.
    async fn status(&self, handle: &BuildHandle) -> Result<StatusReport, RunnerError>;

    /// Ask the provider to cancel the build; `Ok` on terminal builds.
    async fn cancel(&self, handle: &BuildHandle) -> Result<(), RunnerError>;

    /// Stream the build's log. Optional: the default is
    /// [`RunnerError::NotSupported`].
    async fn logs(&self, handle: &BuildHandle) -> Result<LogStream, RunnerError> {
        let _ = handle;
        Err(RunnerError::NotSupported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    struct Always;

    #[async_trait]
    impl BuildRunner for Always {
        fn name(&self) -> &'static str {
            "always"
        }
        async fn trigger(&self, req: &TriggerRequest) -> Result<RunnerRef, RunnerError> {
            Ok(RunnerRef::new(req.build_id.to_string()))
        }
        async fn status(&self, _: &BuildHandle) -> Result<StatusReport, RunnerError> {
            Ok(StatusReport::new(BuildStatus::Succeeded))
        }
        async fn cancel(&self, _: &BuildHandle) -> Result<(), RunnerError> {
            Ok(())
        }
    }

    #[test]
    fn trait_is_object_safe_and_logs_default_to_not_supported() {
        let runner: Arc<dyn BuildRunner> = Arc::new(Always);
        let req = TriggerRequest::new(BuildId::new(), "q", ChangeSet::head_only(["c"]));
        futures::executor::block_on(async {
            let r = runner.trigger(&req).await.unwrap();
            let handle = req.handle().with_ref(r);
            assert!(runner.status(&handle).await.unwrap().is_terminal());
            assert!(matches!(
                runner.logs(&handle).await,
                Err(RunnerError::NotSupported)
            ));
        });
        assert_eq!(runner.name(), "always");
    }

    #[test]
    fn trigger_request_wire_shape_is_flat() {
        let id: BuildId = "b_01j0000000000000000000000a".parse().unwrap();
        let req = TriggerRequest::new(
            id,
            "ci",
            ChangeSet::new(vec!["b1".into()], vec!["h1".into()]),
        )
        .with_metadata(BuildMetadata::new().with("ticket", "T-1"));
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(
            json,
            r#"{"build_id":"b_01j0000000000000000000000a","queue":"ci","base":["b1"],"head":["h1"],"metadata":{"ticket":"T-1"}}"#
        );
        assert_eq!(serde_json::from_str::<TriggerRequest>(&json).unwrap(), req);
        let first = req.clone().with_first_attempt(true);
        let json = serde_json::to_string(&first).unwrap();
        assert!(json.ends_with(r#","first_attempt":true}"#), "{json}");
        assert_eq!(
            serde_json::from_str::<TriggerRequest>(&json).unwrap(),
            first
        );
    }

    #[test]
    fn trigger_request_validation_reports_the_first_problem() {
        let req = TriggerRequest::new(BuildId::new(), "ci", ChangeSet::default());
        assert_eq!(req.validate(), Err(ValidationError::EmptyHead));
        let req = TriggerRequest::new(BuildId::new(), "", ChangeSet::head_only(["c"]));
        assert_eq!(req.validate(), Err(ValidationError::EmptyQueue));
        let req = TriggerRequest::new(BuildId::new(), "ci", ChangeSet::head_only(["c"]))
            .with_metadata(BuildMetadata::new().with("bad key", "v"));
        assert_eq!(req.validate().unwrap_err().field(), "metadata.bad key");
    }

    #[test]
    fn runner_ref_omits_empty_parts() {
        let r = RunnerRef::new("42");
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"id":"42"}"#);
        let r = RunnerRef::new("42")
            .with_url("https://ci/42")
            .with_data("uuid", "u-1");
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"id":"42","url":"https://ci/42","data":{"uuid":"u-1"}}"#
        );
        assert_eq!(serde_json::from_str::<RunnerRef>(&json).unwrap(), r);
        assert_eq!(r.data("uuid"), Some("u-1"));
    }

    #[test]
    fn handle_and_status_report_round_trip() {
        let h = BuildHandle::new(BuildId::new(), "q");
        let json = serde_json::to_string(&h).unwrap();
        assert!(!json.contains("runner_ref"), "{json}");
        assert_eq!(serde_json::from_str::<BuildHandle>(&json).unwrap(), h);
        let h = h.with_ref(RunnerRef::new("x"));
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<BuildHandle>(&json).unwrap(), h);

        let s = StatusReport::new(BuildStatus::Failed)
            .with_metadata(BuildMetadata::new().with("exit_status", "2"));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(
            json,
            r#"{"status":"failed","metadata":{"exit_status":"2"}}"#
        );
        assert_eq!(serde_json::from_str::<StatusReport>(&json).unwrap(), s);
        let bare: StatusReport = serde_json::from_str(r#"{"status":"unknown"}"#).unwrap();
        assert_eq!(bare, StatusReport::new(BuildStatus::Unknown));
    }
}
