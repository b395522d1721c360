//! GitHub Actions REST objects as far as stitch reads them, with open
//! strings for `status` and `conclusion` (values GitHub adds later are
//! kept, never an error), and the mapping onto stitch's status set.

/// GitHub's JSON media type.
pub const MEDIA_TYPE: &str = "application/vnd.github+json";
/// The header pinning the REST API version.
pub const API_VERSION_HEADER: &str = "x-github-api-version";
/// The API version whose dispatch answers 204 unless asked for run details.
pub const API_VERSION_2022: &str = "2022-11-28";

use serde::{Deserialize, Serialize};
use stitch_core::BuildStatus;

/// The workflow input carrying stitch's build id; the workflow's `run-name`
/// must include it (`run-name: stitch ${{ inputs.stitch_build_id }}`).
pub const INPUT_BUILD_ID: &str = "stitch_build_id";
/// The workflow input carrying the stitch queue name.
pub const INPUT_QUEUE: &str = "stitch_queue";
/// The workflow input carrying the base change URIs (JSON array).
pub const INPUT_BASE: &str = "stitch_base";
/// The workflow input carrying the head change URIs (JSON array).
pub const INPUT_HEAD: &str = "stitch_head";
/// The workflow input carrying the caller metadata (JSON object).
pub const INPUT_METADATA: &str = "stitch_metadata";
/// Every input stitch sets; they win over configured extra inputs.
pub const RESERVED_INPUTS: [&str; 5] = [
    INPUT_BUILD_ID,
    INPUT_QUEUE,
    INPUT_BASE,
    INPUT_HEAD,
    INPUT_METADATA,
];

/// A workflow run (`GET /repos/{o}/{r}/actions/runs/{id}`, list entries,
/// and `workflow_run` webhook bodies).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// The run id (the dispatch's `workflow_run_id`).
    pub id: u64,
    /// The workflow's name.
    #[serde(default)]
    pub name: Option<String>,
    /// The `run-name`: where stitch finds its build id.
    #[serde(default)]
    pub display_title: Option<String>,
    /// `queued`, `in_progress`, `completed`, … (open).
    #[serde(default)]
    pub status: Option<String>,
    /// Set once completed: `success`, `failure`, … (open).
    #[serde(default)]
    pub conclusion: Option<String>,
    /// The run's page.
    #[serde(default)]
    pub html_url: Option<String>,
    /// Re-runs keep the id and count attempts from 1.
    #[serde(default)]
    pub run_attempt: Option<u64>,
    /// What started the run (`workflow_dispatch`).
    #[serde(default)]
    pub event: Option<String>,
    /// The branch the run is on.
    #[serde(default)]
    pub head_branch: Option<String>,
    /// When GitHub created it (RFC 3339).
    #[serde(default)]
    pub created_at: Option<String>,
}

impl Run {
    /// stitch's status for this run (see [`map_status`]).
    pub fn status(&self) -> BuildStatus {
        map_status(self.status.as_deref(), self.conclusion.as_deref())
    }

    /// Whether the run title names `build_id` as a whole word (the
    /// `run-name` carries it between other text).
    pub fn names_build(&self, build_id: &str) -> bool {
        self.display_title
            .as_deref()
            .is_some_and(|t| title_names(t, build_id))
    }
}

/// Whether `title` contains `id` not glued to other id characters.
pub fn title_names(title: &str, id: &str) -> bool {
    if id.is_empty() {
        return false;
    }
    let glued = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    title.match_indices(id).any(|(at, _)| {
        let before = title[..at].chars().next_back();
        let after = title[at + id.len()..].chars().next();
        !before.is_some_and(glued) && !after.is_some_and(glued)
    })
}

/// Maps a run's `status` and `conclusion` (issue #9): queued, requested,
/// waiting, pending → accepted; in_progress → running; completed + success
/// → succeeded; completed + cancelled → cancelled; completed + failure,
/// timed_out, startup_failure, action_required, stale, neutral, skipped →
/// failed; completed without a conclusion, and anything unknown → unknown
/// (non-terminal: keep polling).
pub fn map_status(status: Option<&str>, conclusion: Option<&str>) -> BuildStatus {
    match status.unwrap_or("") {
        "queued" | "requested" | "waiting" | "pending" => BuildStatus::Accepted,
        "in_progress" => BuildStatus::Running,
        "completed" => match conclusion.unwrap_or("") {
            "success" => BuildStatus::Succeeded,
            "cancelled" => BuildStatus::Cancelled,
            "failure" | "timed_out" | "startup_failure" | "action_required" | "stale"
            | "neutral" | "skipped" => BuildStatus::Failed,
            _ => BuildStatus::Unknown,
        },
        _ => BuildStatus::Unknown,
    }
}

/// `{total_count, workflow_runs}`.
#[derive(Clone, Debug, Deserialize)]
pub struct RunList {
    /// The runs of this page.
    #[serde(default)]
    pub workflow_runs: Vec<Run>,
}

/// One step of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// The step's name.
    pub name: String,
    /// 1-based position.
    #[serde(default)]
    pub number: u64,
    /// `queued`, `in_progress`, `completed`.
    #[serde(default)]
    pub status: Option<String>,
    /// Set once completed.
    #[serde(default)]
    pub conclusion: Option<String>,
}

/// A job of a run (`GET …/runs/{id}/jobs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The job id (for its log).
    pub id: u64,
    /// The job's name.
    #[serde(default)]
    pub name: String,
    /// `queued`, `in_progress`, `completed`, … (open).
    #[serde(default)]
    pub status: Option<String>,
    /// Set once completed.
    #[serde(default)]
    pub conclusion: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    pub started_at: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    pub completed_at: Option<String>,
    /// The job's steps.
    #[serde(default)]
    pub steps: Vec<Step>,
}

impl Job {
    /// Whether the job has finished (its log is complete).
    pub fn is_completed(&self) -> bool {
        self.status.as_deref() == Some("completed")
    }
}

/// `{total_count, jobs}`.
#[derive(Clone, Debug, Deserialize)]
pub struct JobList {
    /// The jobs of this page.
    #[serde(default)]
    pub jobs: Vec<Job>,
}

/// The body of a workflow dispatch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DispatchBody {
    /// Branch or tag the workflow runs on.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// Workflow inputs, all strings.
    pub inputs: std::collections::BTreeMap<String, String>,
    /// API version 2022-11-28 only: ask for the run id in the answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub return_run_details: Option<bool>,
}

/// The run details a dispatch answers with (200).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct DispatchResponse {
    /// The new run's id.
    pub workflow_run_id: u64,
    /// The run's API URL.
    #[serde(default)]
    pub run_url: Option<String>,
    /// The run's page.
    #[serde(default)]
    pub html_url: Option<String>,
}

/// An error body: `{message, documentation_url?, errors?}`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    #[serde(default)]
    pub message: String,
}

/// An installation access token (`POST /app/installations/{id}/access_tokens`).
#[derive(Clone, Debug, Deserialize)]
pub struct InstallationToken {
    /// The token.
    pub token: String,
    /// When it expires (RFC 3339).
    pub expires_at: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_and_conclusion_maps_as_the_issue_says() {
        use BuildStatus::*;
        let table: &[(Option<&str>, Option<&str>, BuildStatus)] = &[
            (Some("queued"), None, Accepted),
            (Some("requested"), None, Accepted),
            (Some("waiting"), None, Accepted),
            (Some("pending"), None, Accepted),
            (Some("in_progress"), None, Running),
            (Some("completed"), Some("success"), Succeeded),
            (Some("completed"), Some("cancelled"), Cancelled),
            (Some("completed"), Some("failure"), Failed),
            (Some("completed"), Some("timed_out"), Failed),
            (Some("completed"), Some("startup_failure"), Failed),
            (Some("completed"), Some("action_required"), Failed),
            (Some("completed"), Some("stale"), Failed),
            (Some("completed"), Some("neutral"), Failed),
            (Some("completed"), Some("skipped"), Failed),
            (Some("completed"), None, Unknown),
            (Some("completed"), Some(""), Unknown),
            (Some("completed"), Some("brand_new_conclusion"), Unknown),
            (Some("brand_new_status"), None, Unknown),
            (Some(""), None, Unknown),
            (None, None, Unknown),
            // A conclusion means nothing before completion.
            (Some("in_progress"), Some("failure"), Running),
        ];
        for (status, conclusion, want) in table {
            assert_eq!(
                map_status(*status, *conclusion),
                *want,
                "{status:?} {conclusion:?}"
            );
        }
    }

    #[test]
    fn titles_name_ids_as_whole_words() {
        let id = "b_01j0000000000000000000000a";
        assert!(title_names(&format!("stitch {id}"), id));
        assert!(title_names(&format!("ci ({id}) on main"), id));
        assert!(title_names(id, id));
        assert!(!title_names(&format!("stitch {id}x"), id));
        assert!(!title_names(&format!("stitch x{id}"), id));
        assert!(!title_names("stitch", id));
        assert!(!title_names("anything", ""));
    }

    #[test]
    fn captured_run_json_reads() {
        let raw =
            include_str!("../../../stitch-fake-providers/tests/data/github/run_completed.json");
        let run: Run = serde_json::from_str(raw).unwrap();
        assert_eq!(run.status(), BuildStatus::Succeeded);
        assert!(run.display_title.is_some());
        assert!(run.run_attempt.is_some());
    }

    #[test]
    fn dispatch_body_shape() {
        let body = DispatchBody {
            git_ref: "main".into(),
            inputs: [("a".to_string(), "1".to_string())].into(),
            return_run_details: None,
        };
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"ref":"main","inputs":{"a":"1"}}"#
        );
        let body = DispatchBody {
            return_run_details: Some(true),
            ..body
        };
        assert!(serde_json::to_string(&body)
            .unwrap()
            .ends_with(r#""return_run_details":true}"#));
    }
}
