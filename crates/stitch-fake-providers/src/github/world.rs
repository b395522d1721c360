//! The fake's state: workflow runs with their jobs and logs, and how runs
//! progress with time. Run and job JSON start from the captured-style
//! templates in `tests/data/github/`.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

use super::Timing;

/// Marker in a run's `stitch_head` input choosing its fate.
pub const MARKER: &str = "stitch-gh=";

const RUN_TEMPLATE: &str = include_str!("../../tests/data/github/run_completed.json");
const JOBS_TEMPLATE: &str = include_str!("../../tests/data/github/jobs.json");
const LOG_TEMPLATE: &str = include_str!("../../tests/data/github/job_log.txt");

/// What a run will do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Two jobs succeed; the run concludes `success`.
    Pass,
    /// The second job fails; the run concludes `failure`.
    Fail,
    /// Runs until cancelled.
    Hang,
    /// Completes without a conclusion (stitch: unknown) and stays so.
    Unknown,
    /// Concludes `timed_out`.
    TimedOut,
}

impl Plan {
    /// The plan named by a `stitch-gh=<plan>` marker in `text`.
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
            "hang" => Plan::Hang,
            "unknown" => Plan::Unknown,
            "timed_out" => Plan::TimedOut,
            _ => Plan::Pass,
        }
    }
}

/// One job of a fake run.
#[derive(Clone, Debug)]
pub struct FakeJob {
    pub id: u64,
    pub name: String,
    pub command: String,
    pub status: &'static str,
    pub conclusion: Option<&'static str>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub log: String,
}

/// One fake workflow run.
#[derive(Clone, Debug)]
pub struct FakeRun {
    pub id: u64,
    pub owner: String,
    pub repo: String,
    pub workflow: String,
    pub workflow_id: u64,
    pub event: &'static str,
    pub run_number: u64,
    pub branch: String,
    pub display_title: String,
    pub inputs: BTreeMap<String, String>,
    pub status: &'static str,
    pub conclusion: Option<&'static str>,
    pub plan: Plan,
    pub born: Instant,
    pub cancel_at: Option<Instant>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub jobs: Vec<FakeJob>,
}

/// A change the progression made, for webhooks: the event name and body.
#[derive(Clone, Debug)]
pub struct Transition {
    pub event: &'static str,
    pub action: &'static str,
    pub body: Value,
    pub stitch_build_id: Option<String>,
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn run_template() -> &'static Value {
    static RUN: OnceLock<Value> = OnceLock::new();
    RUN.get_or_init(|| serde_json::from_str(RUN_TEMPLATE).unwrap_or(Value::Null))
}

fn jobs_template() -> &'static Value {
    static JOBS: OnceLock<Value> = OnceLock::new();
    JOBS.get_or_init(|| serde_json::from_str(JOBS_TEMPLATE).unwrap_or(Value::Null))
}

/// The template log's lines without their time stamps.
fn log_template() -> &'static [String] {
    static LINES: OnceLock<Vec<String>> = OnceLock::new();
    LINES.get_or_init(|| {
        LOG_TEMPLATE
            .trim_start_matches('\u{feff}')
            .lines()
            .map(|l| l.split_once(' ').map(|(_, t)| t).unwrap_or(l).to_string())
            .collect()
    })
}

/// A log line as GitHub writes it: time with 7 fractional digits, `Z`, text.
pub fn log_line(at: DateTime<Utc>, text: &str) -> String {
    format!("{}0Z {text}\n", at.format("%Y-%m-%dT%H:%M:%S%.6f"))
}

impl FakeRun {
    pub fn is_completed(&self) -> bool {
        self.status == "completed"
    }

    pub fn stitch_build_id(&self) -> Option<&str> {
        self.inputs.get("stitch_build_id").map(String::as_str)
    }

    /// Moves the run along its plan to where `now` puts it; returns the
    /// webhook-worthy transitions.
    pub fn advance(&mut self, now: Instant, timing: &Timing, base: &str) -> Vec<Transition> {
        let mut out = Vec::new();
        if self.is_completed() {
            return out;
        }
        let wall = Utc::now();
        if let Some(at) = self.cancel_at {
            if now >= at + timing.cancel {
                for i in 0..self.jobs.len() {
                    let job = &mut self.jobs[i];
                    if job.status == "completed" {
                        continue;
                    }
                    if job.status == "in_progress" {
                        job.log
                            .push_str(&log_line(wall, "##[error]The operation was canceled."));
                    }
                    job.status = "completed";
                    job.conclusion = Some("cancelled");
                    job.completed_at = Some(wall);
                    out.push(self.job_transition(i, "completed", base));
                }
                self.finish("cancelled", wall, base, &mut out);
            }
            return out;
        }
        let age = now.saturating_duration_since(self.born);
        if age < timing.queue {
            return out;
        }
        if self.plan == Plan::Unknown {
            self.status = "completed";
            self.conclusion = None;
            self.updated_at = wall;
            out.push(self.run_transition("completed", base));
            return out;
        }
        if self.status == "queued" {
            self.status = "in_progress";
            self.started_at = Some(wall);
            self.updated_at = wall;
            out.push(self.run_transition("in_progress", base));
        }
        let run = age - timing.queue;
        let half = timing.run / 2;
        self.job_step(0, run, Duration::ZERO, half, None, wall, base, &mut out);
        if self.plan == Plan::Hang {
            if run >= half && self.jobs[1].status == "queued" {
                self.start_job(1, wall, base, &mut out);
            }
            return out;
        }
        let end = match self.plan {
            Plan::Fail => Some("failure"),
            Plan::TimedOut => Some("cancelled"),
            _ => None,
        };
        self.job_step(1, run, half, timing.run, end, wall, base, &mut out);
        if run >= timing.run {
            let conclusion = match self.plan {
                Plan::Fail => "failure",
                Plan::TimedOut => "timed_out",
                _ => "success",
            };
            self.finish(conclusion, wall, base, &mut out);
        }
        out
    }

    fn finish(
        &mut self,
        conclusion: &'static str,
        wall: DateTime<Utc>,
        base: &str,
        out: &mut Vec<Transition>,
    ) {
        self.status = "completed";
        self.conclusion = Some(conclusion);
        self.updated_at = wall;
        out.push(self.run_transition("completed", base));
    }

    #[allow(clippy::too_many_arguments)]
    fn job_step(
        &mut self,
        i: usize,
        run: Duration,
        from: Duration,
        to: Duration,
        failure: Option<&'static str>,
        wall: DateTime<Utc>,
        base: &str,
        out: &mut Vec<Transition>,
    ) {
        if run >= from && self.jobs[i].status == "queued" {
            self.start_job(i, wall, base, out);
        }
        if run >= to && self.jobs[i].status == "in_progress" {
            let job = &mut self.jobs[i];
            match failure {
                Some(c) => {
                    job.log
                        .push_str(&log_line(wall, "test result: FAILED. 41 passed; 1 failed"));
                    job.log.push_str(&log_line(
                        wall,
                        "##[error]Process completed with exit code 2.",
                    ));
                    job.conclusion = Some(if c == "failure" {
                        "failure"
                    } else {
                        "cancelled"
                    });
                }
                None => {
                    job.log
                        .push_str(&log_line(wall, &format!("{} finished", job.name)));
                    job.conclusion = Some("success");
                }
            }
            job.log
                .push_str(&log_line(wall, "Cleaning up orphan processes"));
            job.status = "completed";
            job.completed_at = Some(wall);
            self.updated_at = wall;
            out.push(self.job_transition(i, "completed", base));
        }
    }

    fn start_job(&mut self, i: usize, wall: DateTime<Utc>, base: &str, out: &mut Vec<Transition>) {
        let job = &mut self.jobs[i];
        job.status = "in_progress";
        job.started_at = Some(wall);
        job.log.push('\u{feff}');
        for line in log_template() {
            let line = line.replace("make build", &job.command);
            // The template's own last line ends the job; it comes at the end.
            if line.starts_with("Cleaning up") || line.contains("Finished `dev`") {
                continue;
            }
            job.log.push_str(&log_line(wall, &line));
        }
        self.updated_at = wall;
        out.push(self.job_transition(i, "in_progress", base));
    }

    fn api_url(&self, base: &str) -> String {
        format!(
            "{base}/repos/{}/{}/actions/runs/{}",
            self.owner, self.repo, self.id
        )
    }

    pub fn html_url(&self) -> String {
        format!(
            "https://github.example/{}/{}/actions/runs/{}",
            self.owner, self.repo, self.id
        )
    }

    fn repository(&self) -> Value {
        let mut repo = run_template()["repository"].clone();
        repo["name"] = json!(self.repo);
        repo["full_name"] = json!(format!("{}/{}", self.owner, self.repo));
        repo["owner"]["login"] = json!(self.owner);
        repo["html_url"] = json!(format!(
            "https://github.example/{}/{}",
            self.owner, self.repo
        ));
        repo
    }

    /// The REST JSON of the run (also the webhook's `workflow_run`).
    pub fn json(&self, base: &str) -> Value {
        let mut v = run_template().clone();
        let url = self.api_url(base);
        v["id"] = json!(self.id);
        v["name"] = json!(self.workflow.trim_end_matches(".yml"));
        v["display_title"] = json!(self.display_title);
        v["run_number"] = json!(self.run_number);
        v["head_branch"] = json!(self.branch);
        v["path"] = json!(format!(".github/workflows/{}", self.workflow));
        v["workflow_id"] = json!(self.workflow_id);
        v["event"] = json!(self.event);
        v["status"] = json!(self.status);
        v["conclusion"] = json!(self.conclusion);
        v["run_attempt"] = json!(1);
        v["created_at"] = json!(ts(self.created_at));
        v["updated_at"] = json!(ts(self.updated_at));
        v["run_started_at"] = json!(ts(self.started_at.unwrap_or(self.created_at)));
        v["url"] = json!(url);
        v["html_url"] = json!(self.html_url());
        for (key, rest) in [
            ("jobs_url", "/jobs"),
            ("logs_url", "/logs"),
            ("cancel_url", "/cancel"),
            ("rerun_url", "/rerun"),
            ("artifacts_url", "/artifacts"),
        ] {
            v[key] = json!(format!("{url}{rest}"));
        }
        v["workflow_url"] = json!(format!(
            "{base}/repos/{}/{}/actions/workflows/{}",
            self.owner, self.repo, self.workflow_id
        ));
        v["repository"] = self.repository();
        v["head_repository"] = self.repository();
        v
    }

    /// The REST JSON of job `i` (also the webhook's `workflow_job`).
    pub fn job_json(&self, i: usize, base: &str) -> Value {
        let j = &self.jobs[i];
        let jobs = &jobs_template()["jobs"];
        let mut v = jobs[i.min(1)].clone();
        v["id"] = json!(j.id);
        v["run_id"] = json!(self.id);
        v["name"] = json!(j.name);
        v["workflow_name"] = json!(self.workflow.trim_end_matches(".yml"));
        v["head_branch"] = json!(self.branch);
        v["run_url"] = json!(self.api_url(base));
        v["url"] = json!(format!(
            "{base}/repos/{}/{}/actions/jobs/{}",
            self.owner, self.repo, j.id
        ));
        v["html_url"] = json!(format!("{}/job/{}", self.html_url(), j.id));
        v["status"] = json!(j.status);
        v["conclusion"] = json!(j.conclusion);
        v["created_at"] = json!(ts(self.created_at));
        v["started_at"] = json!(j.started_at.map(ts));
        v["completed_at"] = json!(j.completed_at.map(ts));
        let step_status = |n: usize| -> (&str, Option<&str>) {
            match (j.status, n) {
                ("completed", _) => ("completed", j.conclusion),
                ("in_progress", 0 | 1) => ("completed", Some("success")),
                ("in_progress", 2) => ("in_progress", None),
                _ => ("queued", None),
            }
        };
        if let Some(steps) = v["steps"].as_array_mut() {
            for (n, step) in steps.iter_mut().enumerate() {
                let (status, conclusion) = step_status(n);
                step["status"] = json!(status);
                step["conclusion"] = json!(conclusion);
                if n == 2 {
                    step["name"] = json!(format!("Run {}", j.command));
                }
            }
        }
        v
    }

    fn run_transition(&self, action: &'static str, base: &str) -> Transition {
        Transition {
            event: "workflow_run",
            action,
            body: json!({
                "action": action,
                "workflow_run": self.json(base),
                "workflow": {
                    "id": self.workflow_id,
                    "name": self.workflow.trim_end_matches(".yml"),
                    "path": format!(".github/workflows/{}", self.workflow),
                    "state": "active",
                },
                "repository": self.repository(),
                "sender": {"login": "stitch-ci[bot]", "id": 160031974, "type": "Bot"},
            }),
            stitch_build_id: self.stitch_build_id().map(str::to_string),
        }
    }

    fn job_transition(&self, i: usize, action: &'static str, base: &str) -> Transition {
        Transition {
            event: "workflow_job",
            action,
            body: json!({
                "action": action,
                "workflow_job": self.job_json(i, base),
                "repository": self.repository(),
                "sender": {"login": "stitch-ci[bot]", "id": 160031974, "type": "Bot"},
            }),
            stitch_build_id: self.stitch_build_id().map(str::to_string),
        }
    }

    /// The `requested` webhook of a new run.
    pub fn requested(&self, base: &str) -> Transition {
        self.run_transition("requested", base)
    }
}

/// Everything the fake knows.
#[derive(Debug, Default)]
pub struct World {
    pub runs: Vec<FakeRun>,
    next_id: u64,
}

impl World {
    /// A new run of `workflow`, queued.
    #[allow(clippy::too_many_arguments)]
    pub fn new_run(
        &mut self,
        owner: &str,
        repo: &str,
        workflow: &str,
        workflow_id: u64,
        branch: &str,
        inputs: BTreeMap<String, String>,
        run_name: Option<&str>,
        now: Instant,
    ) -> &mut FakeRun {
        self.next_id += 1;
        // Real run ids are large; jobs count on from their run's id.
        let id = 9_100_000_000 + self.next_id * 10;
        let head = inputs.get("stitch_head").cloned().unwrap_or_default();
        let plan = Plan::from_text(&head);
        let display_title = match run_name {
            Some(template) => render_run_name(template, &inputs),
            None => workflow.trim_end_matches(".yml").to_string(),
        };
        let job = |n: u64, name: &str, command: &str| FakeJob {
            id: 25_000_000_000 + id + n,
            name: name.to_string(),
            command: command.to_string(),
            status: "queued",
            conclusion: None,
            started_at: None,
            completed_at: None,
            log: String::new(),
        };
        let wall = Utc::now();
        self.runs.push(FakeRun {
            id,
            owner: owner.to_string(),
            repo: repo.to_string(),
            workflow: workflow.to_string(),
            workflow_id,
            event: "workflow_dispatch",
            run_number: self.next_id,
            branch: branch.to_string(),
            display_title,
            inputs,
            status: "queued",
            conclusion: None,
            plan,
            born: now,
            cancel_at: None,
            created_at: wall,
            updated_at: wall,
            started_at: None,
            jobs: vec![job(1, "build", "make build"), job(2, "test", "make test")],
        });
        let last = self.runs.len() - 1;
        &mut self.runs[last]
    }

    pub fn run_mut(&mut self, owner: &str, repo: &str, id: u64) -> Option<&mut FakeRun> {
        self.runs
            .iter_mut()
            .find(|r| r.id == id && r.owner == owner && r.repo == repo)
    }

    pub fn job(&self, owner: &str, repo: &str, job_id: u64) -> Option<(&FakeRun, usize)> {
        self.runs
            .iter()
            .filter(|r| r.owner == owner && r.repo == repo)
            .find_map(|r| r.jobs.iter().position(|j| j.id == job_id).map(|i| (r, i)))
    }
}

/// `run-name` with `${{ inputs.NAME }}` expressions replaced.
pub fn render_run_name(template: &str, inputs: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(at) = rest.find("${{") {
        out.push_str(&rest[..at]);
        let Some(end) = rest[at..].find("}}") else {
            out.push_str(&rest[at..]);
            return out;
        };
        let expr = rest[at + 3..at + end].trim();
        if let Some(name) = expr.strip_prefix("inputs.") {
            out.push_str(inputs.get(name.trim()).map(String::as_str).unwrap_or(""));
        }
        rest = &rest[at + end + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_names_render_inputs() {
        let inputs = BTreeMap::from([("stitch_build_id".to_string(), "b_1".to_string())]);
        assert_eq!(
            render_run_name(
                "stitch ${{ inputs.stitch_build_id }} (${{inputs.none}})",
                &inputs
            ),
            "stitch b_1 ()"
        );
        assert_eq!(render_run_name("plain", &inputs), "plain");
        assert_eq!(render_run_name("broken ${{ x", &inputs), "broken ${{ x");
    }

    #[test]
    fn templates_parse_and_logs_are_stamped() {
        assert!(run_template()["id"].is_u64());
        assert_eq!(jobs_template()["jobs"].as_array().unwrap().len(), 2);
        assert!(log_template()[0].starts_with("Current runner version"));
        let line = log_line(Utc::now(), "x");
        let (stamp, text) = line.split_once(' ').unwrap();
        assert_eq!(stamp.len(), "2026-03-12T09:14:09.1183520Z".len(), "{stamp}");
        assert_eq!(text, "x\n");
    }
}
