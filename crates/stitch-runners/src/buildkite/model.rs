//! Buildkite REST v2 objects as far as stitch reads them, with open enums
//! (a state added by Buildkite later is kept as `Other`, never an error)
//! and the mapping of build states onto stitch's status set.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use stitch_core::BuildStatus;

/// The meta-data key that carries stitch's build id on a Buildkite build.
pub const META_BUILD_ID: &str = "stitch:build_id";
/// The meta-data key that carries the stitch queue name.
pub const META_QUEUE: &str = "stitch:queue";

/// A Buildkite build state. Open: unknown values are kept verbatim.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum BuildState {
    Creating,
    Scheduled,
    Running,
    Passed,
    Failing,
    Failed,
    Blocked,
    Canceling,
    Canceled,
    Skipped,
    NotRun,
    /// A state this version of stitch does not know (`waiting`, …).
    Other(String),
}

impl BuildState {
    /// Parses the REST value; unknown values become `Other`.
    pub fn parse(s: &str) -> Self {
        match s {
            "creating" => Self::Creating,
            "scheduled" => Self::Scheduled,
            "running" => Self::Running,
            "passed" => Self::Passed,
            "failing" => Self::Failing,
            "failed" => Self::Failed,
            "blocked" => Self::Blocked,
            "canceling" => Self::Canceling,
            "canceled" => Self::Canceled,
            "skipped" => Self::Skipped,
            "not_run" => Self::NotRun,
            other => Self::Other(other.to_string()),
        }
    }

    /// The REST value.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Creating => "creating",
            Self::Scheduled => "scheduled",
            Self::Running => "running",
            Self::Passed => "passed",
            Self::Failing => "failing",
            Self::Failed => "failed",
            Self::Blocked => "blocked",
            Self::Canceling => "canceling",
            Self::Canceled => "canceled",
            Self::Skipped => "skipped",
            Self::NotRun => "not_run",
            Self::Other(s) => s,
        }
    }

    /// stitch's status for this state (issue #5): creating, scheduled →
    /// accepted; running, failing, blocked → running; passed → succeeded;
    /// failed, not_run, skipped → failed; canceling, canceled → cancelled;
    /// anything else → unknown (non-terminal).
    pub fn status(&self) -> BuildStatus {
        match self {
            Self::Creating | Self::Scheduled => BuildStatus::Accepted,
            Self::Running | Self::Failing | Self::Blocked => BuildStatus::Running,
            Self::Passed => BuildStatus::Succeeded,
            Self::Failed | Self::NotRun | Self::Skipped => BuildStatus::Failed,
            Self::Canceling | Self::Canceled => BuildStatus::Cancelled,
            Self::Other(_) => BuildStatus::Unknown,
        }
    }
}

impl Serialize for BuildState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for BuildState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self::parse(&String::deserialize(d)?))
    }
}

/// A build, as the REST API and webhooks return it. Only fields stitch
/// reads are typed; webhooks carry no `jobs`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Build {
    /// The build's UUID.
    pub id: String,
    /// The per-pipeline build number.
    pub number: u64,
    pub state: BuildState,
    /// Set while a block step waits; `state` keeps its last value then.
    #[serde(default)]
    pub blocked: bool,
    #[serde(default)]
    pub web_url: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub branch: Option<String>,
    #[serde(default)]
    pub commit: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    /// Meta-data; values other than strings are kept as their JSON text.
    #[serde(default, deserialize_with = "string_map")]
    pub meta_data: BTreeMap<String, String>,
    #[serde(default)]
    pub jobs: Vec<Job>,
    #[serde(default)]
    pub job_state_counts: Option<JobStateCounts>,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub finished_at: Option<String>,
}

impl Build {
    /// The stitch build id stamped on this build, if it is stitch's.
    pub fn stitch_build_id(&self) -> Option<&str> {
        self.meta_data.get(META_BUILD_ID).map(String::as_str)
    }
}

/// `job_state_counts` of GET build.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct JobStateCounts {
    #[serde(default)]
    pub total: u64,
    #[serde(default)]
    pub states: BTreeMap<String, u64>,
}

/// A job of a build.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Job {
    pub id: String,
    /// `script`, `waiter`, `manual`, `trigger`, …
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub step_key: Option<String>,
    #[serde(default)]
    pub command: Option<String>,
    /// Job state; open (`passed`, `running`, `timed_out`, …).
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub exit_status: Option<i64>,
    #[serde(default)]
    pub promised_exit_status: Option<i64>,
    #[serde(default)]
    pub soft_failed: bool,
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub finished_at: Option<String>,
    #[serde(default)]
    pub retried: bool,
}

impl Job {
    /// The step's display name: name, else label, else step key, else the id.
    pub fn display_name(&self) -> &str {
        [&self.name, &self.label, &self.step_key]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .find(|s| !s.is_empty())
            .unwrap_or(&self.id)
    }

    /// Whether the job runs a command (and so has a log).
    pub fn has_log(&self) -> bool {
        self.kind == "script" || self.kind == "command"
    }

    /// Whether the job will not change any more.
    pub fn is_finished(&self) -> bool {
        matches!(
            self.state.as_deref(),
            Some(
                "passed"
                    | "failed"
                    | "timed_out"
                    | "canceled"
                    | "skipped"
                    | "broken"
                    | "expired"
                    | "not_run"
                    | "waiting_failed"
                    | "blocked_failed"
                    | "unblocked_failed"
            )
        )
    }

    /// Whether the job has started running (its log may have lines).
    pub fn has_started(&self) -> bool {
        self.started_at.is_some()
            || self.is_finished()
            || matches!(
                self.state.as_deref(),
                Some("running" | "canceling" | "timing_out")
            )
    }
}

/// The body of `POST …/builds`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CreateBuild {
    pub commit: String,
    pub branch: String,
    pub message: String,
    pub env: BTreeMap<String, String>,
    pub meta_data: BTreeMap<String, String>,
}

/// One entry of a validation failure's `errors[]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct FieldError {
    #[serde(default)]
    pub field: Option<String>,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<&str> = [&self.field, &self.code, &self.message]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect();
        f.write_str(&parts.join(" "))
    }
}

/// A Buildkite error body: `{"message", "errors"?}`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct ErrorBody {
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub errors: Vec<FieldError>,
}

fn string_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw: Option<BTreeMap<String, serde_json::Value>> = Option::deserialize(d)?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => (k, s),
            other => (k, other.to_string()),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_build_state_maps_as_the_issue_says() {
        use BuildStatus::*;
        let table = [
            ("creating", Accepted),
            ("scheduled", Accepted),
            ("running", Running),
            ("failing", Running),
            ("blocked", Running),
            ("passed", Succeeded),
            ("failed", Failed),
            ("not_run", Failed),
            ("skipped", Failed),
            ("canceling", Cancelled),
            ("canceled", Cancelled),
            ("waiting", Unknown),
            ("waiting_failed", Unknown),
            ("brand_new_state", Unknown),
            ("", Unknown),
        ];
        for (raw, want) in table {
            let state = BuildState::parse(raw);
            assert_eq!(state.status(), want, "{raw}");
            assert_eq!(state.as_str(), raw, "round trip of {raw}");
        }
    }

    #[test]
    fn states_deserialize_open() {
        let s: BuildState = serde_json::from_str("\"waiting\"").unwrap();
        assert_eq!(s, BuildState::Other("waiting".into()));
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"waiting\"");
    }

    #[test]
    fn meta_data_values_of_any_type_are_read() {
        let b: Build = serde_json::from_str(
            r#"{"id":"u","number":1,"state":"passed","meta_data":{"a":"x","b":true,"c":3}}"#,
        )
        .unwrap();
        assert_eq!(b.meta_data["a"], "x");
        assert_eq!(b.meta_data["b"], "true");
        assert_eq!(b.meta_data["c"], "3");
        assert_eq!(b.stitch_build_id(), None);
        let nulls: Build =
            serde_json::from_str(r#"{"id":"u","number":1,"state":"passed","meta_data":null}"#)
                .unwrap();
        assert!(nulls.meta_data.is_empty());
    }

    #[test]
    fn job_names_fall_back() {
        let mut j: Job = serde_json::from_str(r#"{"id":"j1","type":"script"}"#).unwrap();
        assert_eq!(j.display_name(), "j1");
        j.label = Some(":rust: test".into());
        assert_eq!(j.display_name(), ":rust: test");
        j.name = Some("".into());
        assert_eq!(j.display_name(), ":rust: test");
        assert!(j.has_log());
        assert!(!j.has_started());
    }
}
