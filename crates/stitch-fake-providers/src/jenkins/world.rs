//! The fake's state: jobs with their parameter definitions, the queue, the
//! builds with their consoles, and how items and builds progress with time.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::Timing;

/// Marker in a build's `STITCH_HEAD` parameter choosing its fate.
pub const MARKER: &str = "stitch-jk=";

/// What a queue item and its build will do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Runs and ends `SUCCESS`.
    Pass,
    /// Runs and ends `FAILURE`.
    Fail,
    /// Runs and ends `UNSTABLE` (a test failed).
    Unstable,
    /// Runs and ends `NOT_BUILT`.
    NotBuilt,
    /// Runs until stopped.
    Hang,
    /// Runs and ends with a result stitch does not know.
    Unknown,
    /// Waits in the queue for an executor until cancelled.
    Queue,
    /// Waits in the queue, stuck (no node has its label), until cancelled.
    Stuck,
}

impl Plan {
    /// The plan named by a `stitch-jk=<plan>` marker in `text`.
    pub fn from_text(text: &str) -> Plan {
        let Some(at) = text.find(MARKER) else {
            return Plan::Pass;
        };
        let word: String = text[at + MARKER.len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        match word.as_str() {
            "fail" => Plan::Fail,
            "unstable" => Plan::Unstable,
            "not_built" => Plan::NotBuilt,
            "hang" => Plan::Hang,
            "unknown" => Plan::Unknown,
            "queue" => Plan::Queue,
            "stuck" => Plan::Stuck,
            _ => Plan::Pass,
        }
    }

    fn result(self) -> &'static str {
        match self {
            Plan::Fail => "FAILURE",
            Plan::Unstable => "UNSTABLE",
            Plan::NotBuilt => "NOT_BUILT",
            Plan::Unknown => "PARTIALLY_GREEN",
            _ => "SUCCESS",
        }
    }
}

/// How a job declares a parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// `StringParameterDefinition`: its value is listed in `api/json`.
    String,
    /// `PasswordParameterDefinition`: listed without its value.
    Password,
}

/// A job of the fake: its parameter definitions and builds.
#[derive(Debug, Default)]
pub struct FakeJob {
    pub parameters: Vec<(String, ParamKind)>,
    pub next_number: u64,
    pub builds: Vec<FakeBuild>,
}

/// Where a queue item is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemState {
    Waiting,
    Cancelled,
    /// Left the queue as build `number`.
    Left(u64),
}

/// One queue item.
#[derive(Clone, Debug)]
pub struct FakeItem {
    pub id: u64,
    pub job: String,
    pub parameters: Vec<(String, String)>,
    pub plan: Plan,
    pub born: Instant,
    pub in_queue_since: i64,
    pub state: ItemState,
    pub left_at: Option<Instant>,
}

/// One build.
#[derive(Clone, Debug)]
pub struct FakeBuild {
    pub number: u64,
    pub queue_id: u64,
    pub parameters: Vec<(String, String)>,
    pub plan: Plan,
    pub started: Instant,
    pub timestamp: i64,
    pub building: bool,
    pub result: Option<&'static str>,
    pub duration: i64,
    pub stop_at: Option<Instant>,
    pub console: String,
    /// The console lines the middle of the run wrote already.
    pub progressed: bool,
}

/// A console note, as pipelines write before their steps.
const NOTE: &str = "\u{1b}[8mha:////4FakeNoteAAAAlgAAABsAAAA=\u{1b}[0m";

/// Everything the fake knows.
#[derive(Debug, Default)]
pub struct World {
    pub jobs: HashMap<String, FakeJob>,
    pub items: Vec<FakeItem>,
    pub next_item: u64,
}

fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// `actions[]` with the parameters (password values left out) and a cause.
fn actions(job: &FakeJob, parameters: &[(String, String)]) -> Value {
    let params: Vec<Value> = parameters
        .iter()
        .map(|(name, value)| {
            let kind = job
                .parameters
                .iter()
                .find(|(n, _)| n == name)
                .map_or(ParamKind::String, |(_, k)| *k);
            match kind {
                ParamKind::String => json!({
                    "_class": "hudson.model.StringParameterValue", "name": name, "value": value
                }),
                ParamKind::Password => json!({
                    "_class": "hudson.model.PasswordParameterValue", "name": name
                }),
            }
        })
        .collect();
    json!([
        {"_class": "hudson.model.ParametersAction", "parameters": params},
        {"_class": "hudson.model.CauseAction", "causes": [{
            "_class": "hudson.model.Cause$RemoteCause",
            "shortDescription": "Started by remote host 127.0.0.1",
            "addr": "127.0.0.1", "note": null
        }]},
        {}
    ])
}

/// `job/a/job/b/` below `base`.
pub fn job_url(base: &str, job: &str) -> String {
    let mut url = base.to_string();
    for name in job.split('/') {
        url.push_str("/job/");
        url.push_str(&encode_segment(name));
    }
    url.push('/');
    url
}

fn encode_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

impl World {
    /// Queues a build of `job` with the parameters it declares (others are
    /// dropped, as Jenkins does); an identical item already waiting is
    /// returned instead of a new one (Jenkins merges them). `None`: no such
    /// job.
    pub fn queue_build(
        &mut self,
        job: &str,
        given: &[(String, String)],
        now: Instant,
    ) -> Option<(u64, bool)> {
        let declared = &self.jobs.get(job)?.parameters;
        let parameters: Vec<(String, String)> = declared
            .iter()
            .filter_map(|(name, _)| {
                given
                    .iter()
                    .rev()
                    .find(|(n, _)| n == name)
                    .map(|(n, v)| (n.clone(), v.clone()))
            })
            .collect();
        if let Some(same) = self
            .items
            .iter()
            .find(|i| i.job == job && i.state == ItemState::Waiting && i.parameters == parameters)
        {
            return Some((same.id, false));
        }
        self.next_item += 1;
        let head = parameters
            .iter()
            .find(|(n, _)| n == "STITCH_HEAD")
            .map(|(_, v)| v.as_str())
            .unwrap_or_default();
        let item = FakeItem {
            id: self.next_item,
            job: job.to_string(),
            plan: Plan::from_text(head),
            parameters,
            born: now,
            in_queue_since: now_millis(),
            state: ItemState::Waiting,
            left_at: None,
        };
        self.items.push(item);
        Some((self.next_item, true))
    }

    /// Moves items and builds to where `now` puts them; forgets items that
    /// left the queue `timing.forget` ago. True when anything moved.
    pub fn advance(&mut self, now: Instant, timing: &Timing) -> bool {
        let mut moved = false;
        let before = self.items.len();
        self.items.retain(|i| {
            i.left_at
                .is_none_or(|at| now.saturating_duration_since(at) < timing.forget)
        });
        moved |= self.items.len() != before;
        for item in self.items.iter_mut() {
            if item.state != ItemState::Waiting
                || matches!(item.plan, Plan::Queue | Plan::Stuck)
                || now.saturating_duration_since(item.born) < timing.queue
            {
                continue;
            }
            let Some(job) = self.jobs.get_mut(&item.job) else {
                continue;
            };
            job.next_number += 1;
            let number = job.next_number;
            let mut console = String::from("Started by remote host 127.0.0.1\n");
            console.push_str(&format!("{NOTE}[Pipeline] Start of Pipeline\n"));
            console.push_str(
                "[Pipeline] node\nRunning on agent-1 in /var/lib/jenkins/workspace/app\n",
            );
            console.push_str(&format!("{NOTE}[Pipeline] sh\n+ make test\n"));
            job.builds.push(FakeBuild {
                number,
                queue_id: item.id,
                parameters: item.parameters.clone(),
                plan: item.plan,
                started: now,
                timestamp: now_millis(),
                building: true,
                result: None,
                duration: 0,
                stop_at: None,
                console,
                progressed: false,
            });
            item.state = ItemState::Left(number);
            item.left_at = Some(now);
            moved = true;
        }
        for job in self.jobs.values_mut() {
            for b in job.builds.iter_mut().filter(|b| b.building) {
                moved |= b.advance(now, timing);
            }
        }
        moved
    }

    pub fn build_mut(&mut self, job: &str, number: u64) -> Option<&mut FakeBuild> {
        self.jobs
            .get_mut(job)?
            .builds
            .iter_mut()
            .find(|b| b.number == number)
    }

    pub fn all_builds(&self) -> impl Iterator<Item = &FakeBuild> {
        self.jobs.values().flat_map(|j| j.builds.iter())
    }

    /// The `api/json` of queue item `item`.
    pub fn item_json(&self, base: &str, item: &FakeItem) -> Value {
        let Some(job) = self.jobs.get(&item.job) else {
            return Value::Null;
        };
        let name = item.job.rsplit('/').next().unwrap_or_default();
        let mut v = json!({
            "actions": actions(job, &item.parameters),
            "blocked": false,
            "id": item.id,
            "inQueueSince": item.in_queue_since,
            "params": item.parameters.iter().map(|(n, _)| format!("\n{n}=")).collect::<String>(),
            "stuck": item.plan == Plan::Stuck,
            "task": {
                "_class": "org.jenkinsci.plugins.workflow.job.WorkflowJob",
                "name": name,
                "url": job_url(base, &item.job),
                "color": "blue",
            },
            "url": format!("queue/item/{}/", item.id),
        });
        match item.state {
            ItemState::Waiting => {
                v["_class"] = json!("hudson.model.Queue$BuildableItem");
                v["buildable"] = json!(true);
                v["pending"] = json!(false);
                v["buildableStartMilliseconds"] = json!(item.in_queue_since);
                v["why"] = json!(if item.plan == Plan::Stuck {
                    "There are no nodes with the label ‘gpu’"
                } else {
                    "Waiting for next available executor"
                });
            }
            ItemState::Cancelled => {
                v["_class"] = json!("hudson.model.Queue$LeftItem");
                v["buildable"] = json!(false);
                v["why"] = Value::Null;
                v["cancelled"] = json!(true);
                v["executable"] = Value::Null;
            }
            ItemState::Left(number) => {
                v["_class"] = json!("hudson.model.Queue$LeftItem");
                v["buildable"] = json!(false);
                v["why"] = Value::Null;
                v["cancelled"] = json!(false);
                v["executable"] = json!({
                    "_class": "org.jenkinsci.plugins.workflow.job.WorkflowRun",
                    "number": number,
                    "url": format!("{}{number}/", job_url(base, &item.job)),
                });
            }
        }
        v
    }

    /// The `api/json` of `build` of `job`.
    pub fn build_json(&self, base: &str, job: &str, b: &FakeBuild) -> Value {
        let Some(fake_job) = self.jobs.get(job) else {
            return Value::Null;
        };
        json!({
            "_class": "org.jenkinsci.plugins.workflow.job.WorkflowRun",
            "actions": actions(fake_job, &b.parameters),
            "artifacts": [],
            "building": b.building,
            "description": null,
            "displayName": format!("#{}", b.number),
            "duration": b.duration,
            "estimatedDuration": 400,
            "executor": null,
            "fullDisplayName": format!("{} #{}", job.replace('/', " » "), b.number),
            "id": b.number.to_string(),
            "keepLog": false,
            "number": b.number,
            "queueId": b.queue_id,
            "result": b.result,
            "timestamp": b.timestamp,
            "url": format!("{}{}/", job_url(base, job), b.number),
            "inProgress": b.building,
        })
    }
}

impl FakeBuild {
    /// Moves a running build along its plan; true when it changed.
    fn advance(&mut self, now: Instant, timing: &Timing) -> bool {
        let age = now.saturating_duration_since(self.started);
        if let Some(at) = self.stop_at {
            if now >= at + timing.cancel {
                self.console
                    .push_str("Aborted by stitch\n[Pipeline] End of Pipeline\nFinished: ABORTED\n");
                self.finish("ABORTED", age);
                return true;
            }
            return false;
        }
        if !self.progressed && age >= timing.run / 2 {
            self.progressed = true;
            let line = match self.plan {
                Plan::Fail => "test result: FAILED. 41 passed; 1 failed",
                Plan::Unstable => "test result: 1 test failed (marked unstable)",
                _ => "test result: ok. 42 passed; 0 failed",
            };
            self.console.push_str(line);
            self.console.push('\n');
            return true;
        }
        if self.plan == Plan::Hang || age < timing.run {
            return false;
        }
        let result = self.plan.result();
        self.console
            .push_str(&format!("[Pipeline] End of Pipeline\nFinished: {result}\n"));
        self.finish(result, age);
        true
    }

    fn finish(&mut self, result: &'static str, took: Duration) {
        self.building = false;
        self.result = Some(result);
        self.duration = i64::try_from(took.as_millis()).unwrap_or(i64::MAX).max(1);
    }

    /// The value of parameter `name`.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}
