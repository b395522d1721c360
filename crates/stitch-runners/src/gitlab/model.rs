//! GitLab REST v4 objects as far as stitch reads them, with an open status
//! enum (a status GitLab adds later is kept as `Other`, never an error) and
//! the mapping of pipeline statuses onto stitch's status set.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use stitch_core::{BuildId, BuildStatus};

/// The pipeline variable carrying the pipeline name stitch expects; the
/// project's `.gitlab-ci.yml` names its pipelines with it
/// (`workflow: name: $STITCH_PIPELINE_NAME`).
pub const VAR_PIPELINE_NAME: &str = "STITCH_PIPELINE_NAME";

/// The variables stitch sets on every pipeline; configured `variables`
/// may not use these names.
pub const RESERVED_VARIABLES: [&str; 6] = [
    "STITCH_BUILD_ID",
    "STITCH_QUEUE",
    "STITCH_BASE",
    "STITCH_HEAD",
    "STITCH_METADATA",
    VAR_PIPELINE_NAME,
];

/// The name of the pipeline of stitch build `id`: what stitch finds it by.
pub fn pipeline_name(id: &BuildId) -> String {
    format!("stitch {id}")
}

/// A pipeline status. Open: unknown values are kept verbatim.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PipelineStatus {
    Created,
    WaitingForResource,
    Preparing,
    Pending,
    Running,
    Success,
    Failed,
    Canceling,
    Canceled,
    Skipped,
    Manual,
    Scheduled,
    /// A status this version of stitch does not know.
    Other(String),
}

impl PipelineStatus {
    /// Parses the REST value; unknown values become `Other`.
    pub fn parse(s: &str) -> Self {
        match s {
            "created" => Self::Created,
            "waiting_for_resource" => Self::WaitingForResource,
            "preparing" => Self::Preparing,
            "pending" => Self::Pending,
            "running" => Self::Running,
            "success" => Self::Success,
            "failed" => Self::Failed,
            "canceling" => Self::Canceling,
            "canceled" => Self::Canceled,
            "skipped" => Self::Skipped,
            "manual" => Self::Manual,
            "scheduled" => Self::Scheduled,
            other => Self::Other(other.to_string()),
        }
    }

    /// The REST value.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Created => "created",
            Self::WaitingForResource => "waiting_for_resource",
            Self::Preparing => "preparing",
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Success => "success",
            Self::Failed => "failed",
            Self::Canceling => "canceling",
            Self::Canceled => "canceled",
            Self::Skipped => "skipped",
            Self::Manual => "manual",
            Self::Scheduled => "scheduled",
            Self::Other(s) => s,
        }
    }

    /// stitch's status for this pipeline status (issue #21): created,
    /// waiting_for_resource, preparing, pending, scheduled → accepted;
    /// running, manual → running; success → succeeded; failed, skipped →
    /// failed; canceling, canceled → cancelled; anything else → unknown.
    pub fn status(&self) -> BuildStatus {
        match self {
            Self::Created
            | Self::WaitingForResource
            | Self::Preparing
            | Self::Pending
            | Self::Scheduled => BuildStatus::Accepted,
            Self::Running | Self::Manual => BuildStatus::Running,
            Self::Success => BuildStatus::Succeeded,
            Self::Failed | Self::Skipped => BuildStatus::Failed,
            Self::Canceling | Self::Canceled => BuildStatus::Cancelled,
            Self::Other(_) => BuildStatus::Unknown,
        }
    }

    /// Why the status maps as it does, where that is not plain from its
    /// name (the `gitlab_reason` metadata).
    pub fn reason(&self) -> Option<String> {
        Some(match self {
            Self::WaitingForResource => "waiting for a resource group to free up".into(),
            Self::Preparing => "a runner is preparing the environment".into(),
            Self::Scheduled => "waiting for a delayed job's time".into(),
            Self::Manual => "waiting for someone to start a manual job".into(),
            Self::Skipped => "GitLab skipped the pipeline: no job ran".into(),
            Self::Canceling => "GitLab is cancelling the pipeline".into(),
            Self::Other(s) => format!("GitLab status {s:?} is not one stitch knows"),
            _ => return None,
        })
    }
}

impl Serialize for PipelineStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for PipelineStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self::parse(&String::deserialize(d)?))
    }
}

/// A pipeline as the REST API returns it. Only fields stitch reads are
/// typed.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Pipeline {
    /// The instance-wide pipeline id.
    pub id: u64,
    /// The per-project pipeline number.
    #[serde(default)]
    pub iid: Option<u64>,
    #[serde(default)]
    pub project_id: Option<u64>,
    pub status: PipelineStatus,
    /// Set by `workflow:name` (where stitch's build id is).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(rename = "ref", default)]
    pub git_ref: Option<String>,
    #[serde(default)]
    pub sha: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub web_url: Option<String>,
    #[serde(default)]
    pub detailed_status: Option<DetailedStatus>,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub updated_at: Option<String>,
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub finished_at: Option<String>,
}

impl Pipeline {
    /// Whether this is the pipeline of stitch build `id` (by its name).
    pub fn is_for(&self, id: &BuildId) -> bool {
        self.name.as_deref() == Some(pipeline_name(id).as_str())
    }
}

/// `detailed_status` of a pipeline (what GitLab's UI shows).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct DetailedStatus {
    /// `success-with-warnings`, `manual`, `failed`, …
    #[serde(default)]
    pub group: Option<String>,
    /// `passed with warnings`, …
    #[serde(default)]
    pub label: Option<String>,
}

/// A job of a pipeline.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Job {
    pub id: u64,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub stage: Option<String>,
    /// Job status; open (`success`, `running`, `manual`, …).
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub allow_failure: bool,
    /// `script_failure`, `runner_system_failure`, … for failed jobs.
    #[serde(default)]
    pub failure_reason: Option<String>,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub finished_at: Option<String>,
    #[serde(default)]
    pub web_url: Option<String>,
}

impl Job {
    /// Whether the job will not change any more.
    pub fn is_finished(&self) -> bool {
        matches!(
            self.status.as_str(),
            "success" | "failed" | "canceled" | "skipped"
        )
    }

    /// Whether the job ran (or runs): only those have a trace.
    pub fn has_started(&self) -> bool {
        self.started_at.is_some() || matches!(self.status.as_str(), "running" | "canceling")
    }

    /// The step's display name: the job name, else its id.
    pub fn display_name(&self) -> String {
        if self.name.is_empty() {
            self.id.to_string()
        } else {
            self.name.clone()
        }
    }
}

/// One pipeline variable of a create request.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Variable {
    pub key: String,
    pub value: String,
    /// `env_var` (an environment variable of every job).
    pub variable_type: String,
}

/// The body of `POST /projects/:id/pipeline`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct CreatePipeline {
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub variables: Vec<Variable>,
}

impl CreatePipeline {
    /// The variables as a map (the trigger endpoint's `variables`).
    pub fn variable_map(&self) -> BTreeMap<String, String> {
        self.variables
            .iter()
            .map(|v| (v.key.clone(), v.value.clone()))
            .collect()
    }
}

/// The body of `POST /projects/:id/trigger/pipeline` (JSON form).
#[derive(Clone, Debug, Serialize)]
pub struct TriggerPipeline<'a> {
    pub token: &'a str,
    #[serde(rename = "ref")]
    pub git_ref: &'a str,
    pub variables: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pipeline_status_maps_as_the_issue_says() {
        use BuildStatus::*;
        let table = [
            ("created", Accepted),
            ("waiting_for_resource", Accepted),
            ("preparing", Accepted),
            ("pending", Accepted),
            ("scheduled", Accepted),
            ("running", Running),
            ("manual", Running),
            ("success", Succeeded),
            ("failed", Failed),
            ("skipped", Failed),
            ("canceling", Cancelled),
            ("canceled", Cancelled),
            ("waiting_for_callback", Unknown),
            ("brand_new_status", Unknown),
            ("", Unknown),
        ];
        for (raw, want) in table {
            let status = PipelineStatus::parse(raw);
            assert_eq!(status.status(), want, "{raw}");
            assert_eq!(status.as_str(), raw, "round trip of {raw}");
        }
        assert!(PipelineStatus::parse("running").reason().is_none());
        assert!(PipelineStatus::parse("skipped")
            .reason()
            .unwrap()
            .contains("no job ran"));
        assert!(PipelineStatus::parse("new")
            .reason()
            .unwrap()
            .contains("\"new\""));
    }

    #[test]
    fn pipelines_are_recognised_by_their_name() {
        let id = BuildId::new();
        let p: Pipeline = serde_json::from_value(serde_json::json!({
            "id": 7, "status": "pending", "name": pipeline_name(&id), "ref": "main"
        }))
        .unwrap();
        assert!(p.is_for(&id));
        assert!(!p.is_for(&BuildId::new()));
        assert_eq!(p.git_ref.as_deref(), Some("main"));
        let unnamed: Pipeline =
            serde_json::from_str(r#"{"id":8,"status":"success","name":null}"#).unwrap();
        assert!(!unnamed.is_for(&id));
    }

    #[test]
    fn jobs_know_when_they_have_a_trace() {
        let mut j: Job = serde_json::from_str(r#"{"id":3,"status":"pending"}"#).unwrap();
        assert!(!j.has_started() && !j.is_finished());
        assert_eq!(j.display_name(), "3");
        j.status = "running".into();
        assert!(j.has_started());
        j.status = "skipped".into();
        assert!(j.is_finished() && !j.has_started());
    }
}
