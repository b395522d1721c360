//! The Jenkins remote-access API objects stitch reads (`api/json` of queue
//! items, builds and jobs; the crumb issuer) and how a build's
//! `building` / `result` and a queue item's state map onto [`BuildStatus`].

use serde::Deserialize;
use serde_json::Value;
use stitch_core::BuildStatus;

/// The build parameter carrying stitch's build id: what a lookup matches.
pub const PARAM_BUILD_ID: &str = "STITCH_BUILD_ID";

/// One entry of an object's `actions[]`; only `ParametersAction` entries
/// carry `parameters` (the others are `{}` or other plugins' data).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Action {
    #[serde(default)]
    pub parameters: Vec<ParameterValue>,
}

/// One `{name, value}` of a `ParametersAction`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ParameterValue {
    pub name: String,
    /// A string for string parameters; booleans and others stay JSON.
    #[serde(default)]
    pub value: Value,
}

/// The string value of parameter `name` in `actions`, if set.
fn parameter<'a>(actions: &'a [Action], name: &str) -> Option<&'a str> {
    actions
        .iter()
        .flat_map(|a| a.parameters.iter())
        .find(|p| p.name == name)
        .and_then(|p| p.value.as_str())
}

/// `queue/item/N/api/json`: an item waiting in the queue, or one that left
/// it (`LeftItem`: `cancelled`, or an `executable` build).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QueueItem {
    pub id: u64,
    /// `hudson.model.Queue$WaitingItem`, `…$BlockedItem`, `…$BuildableItem`,
    /// `…$LeftItem`.
    #[serde(rename = "_class", default)]
    pub class: String,
    /// Set on a `LeftItem`: it was cancelled before it ran.
    #[serde(default)]
    pub cancelled: bool,
    /// No executor can ever take it (a label no node carries, …).
    #[serde(default)]
    pub stuck: bool,
    /// Why it is still waiting, in Jenkins' words.
    #[serde(default)]
    pub why: Option<String>,
    /// The build it became, once it left the queue to run.
    #[serde(default)]
    pub executable: Option<Executable>,
    #[serde(default)]
    pub actions: Vec<Action>,
    /// The job it is for (`url` is the job's absolute URL).
    #[serde(default)]
    pub task: Option<Task>,
}

/// A queue item's `executable`: the build it became.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Executable {
    pub number: u64,
    #[serde(default)]
    pub url: Option<String>,
}

/// A queue item's `task`: the job.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Task {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
}

impl QueueItem {
    /// The `STITCH_BUILD_ID` parameter it carries.
    pub fn stitch_build_id(&self) -> Option<&str> {
        parameter(&self.actions, PARAM_BUILD_ID)
    }

    /// Whether it left the queue (`LeftItem`): cancelled, or running.
    pub fn has_left(&self) -> bool {
        self.class.ends_with("$LeftItem") || self.cancelled || self.executable.is_some()
    }

    /// The status of a build that is still this queue item: `cancelled`
    /// for one cancelled in the queue, `accepted` otherwise (stuck items
    /// too: stitch's `accepted_timeout` ends those).
    pub fn status(&self) -> BuildStatus {
        if self.cancelled {
            BuildStatus::Cancelled
        } else {
            BuildStatus::Accepted
        }
    }
}

/// `queue/api/json`: the items waiting now.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Queue {
    #[serde(default)]
    pub items: Vec<QueueItem>,
}

/// A build's `result`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BuildResult {
    Success,
    Failure,
    /// Built, but marked unstable (typically failing tests).
    Unstable,
    Aborted,
    NotBuilt,
    /// A result stitch does not know.
    Other(String),
}

impl BuildResult {
    /// Reads Jenkins' result name.
    pub fn parse(s: &str) -> Self {
        match s {
            "SUCCESS" => Self::Success,
            "FAILURE" => Self::Failure,
            "UNSTABLE" => Self::Unstable,
            "ABORTED" => Self::Aborted,
            "NOT_BUILT" => Self::NotBuilt,
            other => Self::Other(other.to_string()),
        }
    }

    /// The status of a finished build with this result. `UNSTABLE` is
    /// `failed`: Jenkins marks a build unstable when its tests fail, and a
    /// merge gate must not pass such a change. `NOT_BUILT` (the build did
    /// not run its work) is `failed` too. Unknown results are `unknown`.
    pub fn status(&self) -> BuildStatus {
        match self {
            Self::Success => BuildStatus::Succeeded,
            Self::Failure | Self::Unstable | Self::NotBuilt => BuildStatus::Failed,
            Self::Aborted => BuildStatus::Cancelled,
            Self::Other(_) => BuildStatus::Unknown,
        }
    }
}

/// `job/…/N/api/json`: one build.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Build {
    pub number: u64,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub building: bool,
    /// `null` while the build runs (unless a pipeline set it early).
    #[serde(default)]
    pub result: Option<String>,
    /// The queue item the build came from.
    #[serde(default)]
    pub queue_id: Option<u64>,
    /// Start time, milliseconds since the epoch.
    #[serde(default)]
    pub timestamp: Option<i64>,
    /// Milliseconds the build took (0 while it runs).
    #[serde(default)]
    pub duration: Option<i64>,
    #[serde(default)]
    pub full_display_name: Option<String>,
    #[serde(default)]
    pub actions: Vec<Action>,
}

impl Build {
    /// The `STITCH_BUILD_ID` parameter it carries.
    pub fn stitch_build_id(&self) -> Option<&str> {
        parameter(&self.actions, PARAM_BUILD_ID)
    }

    /// The parsed result, if set.
    pub fn result(&self) -> Option<BuildResult> {
        self.result.as_deref().map(BuildResult::parse)
    }

    /// `running` while `building`; afterwards the result's status; a
    /// finished build without a result is `unknown`.
    pub fn status(&self) -> BuildStatus {
        if self.building {
            return BuildStatus::Running;
        }
        self.result().map_or(BuildStatus::Unknown, |r| r.status())
    }
}

/// `job/…/api/json?tree=allBuilds[…]{a,b}`: a range of a job's builds,
/// newest first.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BuildRange {
    #[serde(default)]
    pub all_builds: Vec<Build>,
}

/// `crumbIssuer/api/json`: the CSRF crumb and the header to send it in.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CrumbAnswer {
    pub crumb: String,
    pub crumb_request_field: String,
}

impl std::fmt::Debug for CrumbAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrumbAnswer")
            .field("crumb_request_field", &self.crumb_request_field)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_map_onto_statuses() {
        let cases = [
            ("SUCCESS", BuildStatus::Succeeded),
            ("FAILURE", BuildStatus::Failed),
            ("UNSTABLE", BuildStatus::Failed),
            ("NOT_BUILT", BuildStatus::Failed),
            ("ABORTED", BuildStatus::Cancelled),
            ("PARTIALLY_GREEN", BuildStatus::Unknown),
        ];
        for (name, status) in cases {
            assert_eq!(BuildResult::parse(name).status(), status, "{name}");
        }
    }

    #[test]
    fn builds_read_building_then_result() {
        let b: Build = serde_json::from_value(serde_json::json!({
            "number": 3, "building": true, "result": "FAILURE",
            "actions": [{}, {"_class": "hudson.model.ParametersAction",
                "parameters": [{"name": "STITCH_BUILD_ID", "value": "b-1"},
                               {"name": "DRY", "value": true}]}]
        }))
        .unwrap();
        assert_eq!(
            b.status(),
            BuildStatus::Running,
            "a running build is running"
        );
        assert_eq!(b.stitch_build_id(), Some("b-1"));
        let done = Build {
            building: false,
            ..b.clone()
        };
        assert_eq!(done.status(), BuildStatus::Failed);
        let no_result = Build {
            building: false,
            result: None,
            ..b
        };
        assert_eq!(no_result.status(), BuildStatus::Unknown);
    }

    #[test]
    fn queue_items_know_whether_they_left() {
        let waiting: QueueItem = serde_json::from_value(serde_json::json!({
            "_class": "hudson.model.Queue$WaitingItem", "id": 7, "stuck": true,
            "why": "There are no nodes with the label 'gpu'", "actions": []
        }))
        .unwrap();
        assert!(!waiting.has_left() && waiting.stuck);
        assert_eq!(waiting.status(), BuildStatus::Accepted);
        let cancelled: QueueItem = serde_json::from_value(serde_json::json!({
            "_class": "hudson.model.Queue$LeftItem", "id": 7, "cancelled": true,
            "executable": null
        }))
        .unwrap();
        assert!(cancelled.has_left());
        assert_eq!(cancelled.status(), BuildStatus::Cancelled);
    }

    #[test]
    fn captured_shapes_are_read() {
        let waiting: QueueItem = serde_json::from_str(include_str!(concat!(
            "../../../stitch-fake-providers/tests/data/jenkins",
            "/queue_item_waiting.json"
        )))
        .unwrap();
        assert!(!waiting.has_left());
        assert_eq!(
            waiting.stitch_build_id(),
            Some("01JD3M6Q1B7V9K3T5W8X2Y4Z6A")
        );
        assert_eq!(
            waiting.why.as_deref(),
            Some("Waiting for next available executor")
        );
        let left: QueueItem = serde_json::from_str(include_str!(concat!(
            "../../../stitch-fake-providers/tests/data/jenkins",
            "/queue_item_left.json"
        )))
        .unwrap();
        assert!(left.has_left());
        assert_eq!(left.executable.as_ref().map(|e| e.number), Some(57));
        let build: Build = serde_json::from_str(include_str!(concat!(
            "../../../stitch-fake-providers/tests/data/jenkins",
            "/build_unstable.json"
        )))
        .unwrap();
        assert_eq!(build.queue_id, Some(118));
        assert_eq!(build.status(), BuildStatus::Failed);
        assert_eq!(build.result(), Some(BuildResult::Unstable));
        assert_eq!(build.stitch_build_id(), Some("01JD3M6Q1B7V9K3T5W8X2Y4Z6A"));
        let crumb: CrumbAnswer = serde_json::from_str(include_str!(concat!(
            "../../../stitch-fake-providers/tests/data/jenkins",
            "/crumb.json"
        )))
        .unwrap();
        assert_eq!(crumb.crumb_request_field, "Jenkins-Crumb");
        assert!(!format!("{crumb:?}").contains(&crumb.crumb));
    }
}
