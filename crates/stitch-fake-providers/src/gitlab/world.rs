//! The fake's state: projects, pipelines with their jobs and traces, and
//! how pipelines progress with time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

use super::Timing;

/// Marker in a pipeline's `STITCH_HEAD` variable choosing its fate.
pub const MARKER: &str = "stitch-gl=";

/// What a pipeline will do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Two jobs pass; the pipeline succeeds.
    Pass,
    /// The second job fails (`script_failure`); the pipeline fails.
    Fail,
    /// Runs until cancelled.
    Hang,
    /// Goes to a status stitch does not know (`waiting_for_callback`).
    Unknown,
    /// Stops at a blocking manual job (`manual`).
    Manual,
}

impl Plan {
    /// The plan named by a `stitch-gl=<plan>` marker in `text`.
    pub fn from_text(text: &str) -> Plan {
        let Some(at) = text.find(MARKER) else {
            return Plan::Pass;
        };
        let word: String = text[at + MARKER.len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        match word.as_str() {
            "fail" => Plan::Fail,
            "hang" => Plan::Hang,
            "unknown" => Plan::Unknown,
            "manual" => Plan::Manual,
            _ => Plan::Pass,
        }
    }
}

/// One job of a fake pipeline.
#[derive(Clone, Debug)]
pub struct FakeJob {
    pub id: u64,
    pub name: &'static str,
    pub stage: &'static str,
    pub status: &'static str,
    pub failure_reason: Option<&'static str>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub trace: String,
}

/// One fake pipeline.
#[derive(Clone, Debug)]
pub struct FakePipeline {
    pub id: u64,
    pub iid: u64,
    pub project_id: u64,
    pub project_path: String,
    pub status: String,
    pub name: Option<String>,
    pub git_ref: String,
    pub source: &'static str,
    pub plan: Plan,
    pub born: Instant,
    pub cancel_at: Option<Instant>,
    pub variables: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub jobs: Vec<FakeJob>,
}

/// A pipeline status change, for webhooks.
#[derive(Clone, Debug)]
pub struct Transition {
    /// The status it changed to.
    pub status: String,
    /// The Pipeline Hook body.
    pub body: Value,
    pub stitch_build_id: Option<String>,
}

/// Whether a pipeline status is final.
pub fn is_terminal(status: &str) -> bool {
    matches!(status, "success" | "failed" | "canceled" | "skipped")
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The webhook form of a time (`2016-08-12 15:23:28 UTC`).
fn hook_ts(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// A trace line as GitLab Runner 17 writes it with timestamps on.
fn trace_line(at: DateTime<Utc>, text: &str) -> String {
    format!(
        "{} 00O {text}\n",
        at.to_rfc3339_opts(SecondsFormat::Micros, true)
    )
}

fn section(at: DateTime<Utc>, kind: &str, name: &str, header: &str) -> String {
    format!(
        "\u{1b}[0K{kind}:{}:{name}\r\u{1b}[0K{header}\n",
        at.timestamp()
    )
}

impl FakeJob {
    fn json(&self, p: &FakePipeline, base: &str) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "stage": self.stage,
            "status": self.status,
            "ref": p.git_ref,
            "tag": false,
            "allow_failure": false,
            "failure_reason": self.failure_reason,
            "created_at": ts(self.created_at),
            "started_at": self.started_at.map(ts),
            "finished_at": self.finished_at.map(ts),
            "duration": match (self.started_at, self.finished_at) {
                (Some(s), Some(f)) => json!((f - s).num_milliseconds() as f64 / 1000.0),
                _ => Value::Null,
            },
            "web_url": format!("{}/-/jobs/{}", p.web_url(base), self.id),
            "pipeline": {"id": p.id, "project_id": p.project_id, "ref": p.git_ref, "status": p.status},
            "user": {"id": 1, "username": "stitch-bot", "name": "stitch"},
            "runner": null,
        })
    }
}

impl FakePipeline {
    /// Moves the pipeline along its plan to where `now` puts it; returns
    /// the status changes.
    pub fn advance(&mut self, now: Instant, timing: &Timing, base: &str) -> Vec<Transition> {
        let mut out = Vec::new();
        if is_terminal(&self.status) {
            return out;
        }
        let wall = Utc::now();
        if let Some(at) = self.cancel_at {
            if now >= at + timing.cancel {
                for j in &mut self.jobs {
                    if !matches!(j.status, "success" | "failed" | "canceled") {
                        if j.status == "running" {
                            j.trace
                                .push_str(&trace_line(wall, "ERROR: Job failed: canceled"));
                            j.finished_at = Some(wall);
                        }
                        j.status = "canceled";
                    }
                }
                self.finished_at = Some(wall);
                self.set_status("canceled", wall, base, &mut out);
            }
            return out;
        }
        if self.status == "created" {
            self.set_status("pending", wall, base, &mut out);
        }
        let age = now.saturating_duration_since(self.born);
        if age < timing.schedule {
            return out;
        }
        if self.plan == Plan::Unknown {
            if self.status != "waiting_for_callback" {
                self.set_status("waiting_for_callback", wall, base, &mut out);
            }
            return out;
        }
        if self.status == "pending" {
            self.started_at = Some(wall);
            self.set_status("running", wall, base, &mut out);
        }
        let run = age - timing.schedule;
        let half = timing.run / 2;
        self.job_step(0, run, Duration::ZERO, half, false, wall);
        if self.plan == Plan::Hang {
            if run >= half && self.jobs[1].status != "running" {
                self.start_job(1, wall);
            }
            return out;
        }
        if self.plan == Plan::Manual {
            if run >= half && self.status != "manual" {
                self.jobs[1].status = "manual";
                self.set_status("manual", wall, base, &mut out);
            }
            return out;
        }
        let fails = self.plan == Plan::Fail;
        self.job_step(1, run, half, timing.run, fails, wall);
        if run >= timing.run {
            self.finished_at = Some(wall);
            self.set_status(
                if fails { "failed" } else { "success" },
                wall,
                base,
                &mut out,
            );
        }
        out
    }

    fn job_step(
        &mut self,
        i: usize,
        run: Duration,
        from: Duration,
        to: Duration,
        fails: bool,
        wall: DateTime<Utc>,
    ) {
        if run >= from && matches!(self.jobs[i].status, "created" | "pending") {
            self.start_job(i, wall);
        }
        if run >= to && self.jobs[i].status == "running" {
            let job = &mut self.jobs[i];
            job.trace
                .push_str(&section(wall, "section_end", "step_script", ""));
            if fails {
                job.trace.push_str(&trace_line(
                    wall,
                    "test result: FAILED. 41 passed; 1 failed",
                ));
                job.trace.push_str(&trace_line(
                    wall,
                    "\u{1b}[31;1mERROR: Job failed: exit code 2\u{1b}[0;m",
                ));
                job.status = "failed";
                job.failure_reason = Some("script_failure");
            } else {
                job.trace
                    .push_str(&trace_line(wall, &format!("{} finished", job.name)));
                job.trace
                    .push_str(&trace_line(wall, "\u{1b}[32;1mJob succeeded\u{1b}[0;m"));
                job.status = "success";
            }
            job.finished_at = Some(wall);
        }
    }

    fn start_job(&mut self, i: usize, wall: DateTime<Utc>) {
        let git_ref = self.git_ref.clone();
        let job = &mut self.jobs[i];
        job.status = "running";
        job.started_at = Some(wall);
        job.trace.push_str(&trace_line(
            wall,
            "\u{1b}[0KRunning with gitlab-runner 17.5.0 (fake)",
        ));
        job.trace.push_str(&section(
            wall,
            "section_start",
            "get_sources",
            "\u{1b}[0;1mGetting source from Git repository\u{1b}[0;m",
        ));
        job.trace
            .push_str(&trace_line(wall, &format!("Checking out {git_ref}")));
        job.trace
            .push_str(&section(wall, "section_end", "get_sources", ""));
        job.trace.push_str(&section(
            wall,
            "section_start",
            "step_script",
            "\u{1b}[0;1mExecuting \"step_script\" stage of the job script\u{1b}[0;m",
        ));
        job.trace.push_str(&trace_line(
            wall,
            &format!("\u{1b}[32;1m$ make {}\u{1b}[0;m", job.name),
        ));
    }

    fn set_status(
        &mut self,
        status: &str,
        wall: DateTime<Utc>,
        base: &str,
        out: &mut Vec<Transition>,
    ) {
        self.status = status.to_string();
        self.updated_at = wall;
        out.push(Transition {
            status: status.to_string(),
            body: self.hook_json(base),
            stitch_build_id: self.variables.get("STITCH_BUILD_ID").cloned(),
        });
    }

    pub fn web_url(&self, base: &str) -> String {
        format!("{base}/{}", self.project_path)
    }

    fn detailed_status(&self) -> Value {
        let (group, label) = match self.status.as_str() {
            "success" => ("success", "passed"),
            "manual" => ("manual", "manual action"),
            "canceled" => ("canceled", "canceled"),
            s => (s, s),
        };
        json!({"group": group, "label": label, "text": label, "icon": format!("status_{group}")})
    }

    /// The REST JSON of the pipeline.
    pub fn json(&self, base: &str) -> Value {
        json!({
            "id": self.id,
            "iid": self.iid,
            "project_id": self.project_id,
            "name": self.name,
            "status": self.status,
            "source": self.source,
            "ref": self.git_ref,
            "sha": "a91957a858320c0e17f3a0eca7cfacbff50ea29a",
            "before_sha": "0000000000000000000000000000000000000000",
            "tag": false,
            "yaml_errors": null,
            "user": {"id": 1, "username": "stitch-bot", "name": "stitch"},
            "created_at": ts(self.created_at),
            "updated_at": ts(self.updated_at),
            "started_at": self.started_at.map(ts),
            "finished_at": self.finished_at.map(ts),
            "committed_at": null,
            "duration": null,
            "queued_duration": null,
            "coverage": null,
            "web_url": format!("{}/-/pipelines/{}", self.web_url(base), self.id),
            "detailed_status": self.detailed_status(),
        })
    }

    /// The JSON of the pipeline's jobs, newest first (as GitLab lists them).
    pub fn jobs_json(&self, base: &str) -> Vec<Value> {
        self.jobs.iter().rev().map(|j| j.json(self, base)).collect()
    }

    /// The Pipeline Hook body of the pipeline now.
    pub fn hook_json(&self, base: &str) -> Value {
        let variables: Vec<Value> = self
            .variables
            .iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect();
        let builds: Vec<Value> = self
            .jobs
            .iter()
            .map(|j| {
                json!({
                    "id": j.id, "stage": j.stage, "name": j.name, "status": j.status,
                    "created_at": hook_ts(j.created_at),
                    "started_at": j.started_at.map(hook_ts),
                    "finished_at": j.finished_at.map(hook_ts),
                    "failure_reason": j.failure_reason,
                    "when": "on_success", "manual": j.status == "manual", "allow_failure": false,
                })
            })
            .collect();
        json!({
            "object_kind": "pipeline",
            "object_attributes": {
                "id": self.id,
                "iid": self.iid,
                "name": self.name,
                "ref": self.git_ref,
                "tag": false,
                "sha": "a91957a858320c0e17f3a0eca7cfacbff50ea29a",
                "source": self.source,
                "status": self.status,
                "detailed_status": self.detailed_status()["label"],
                "stages": ["build", "test"],
                "created_at": hook_ts(self.created_at),
                "finished_at": self.finished_at.map(hook_ts),
                "variables": variables,
                "url": format!("{}/-/pipelines/{}", self.web_url(base), self.id),
            },
            "user": {"id": 1, "name": "stitch", "username": "stitch-bot"},
            "project": {
                "id": self.project_id,
                "name": self.project_path.rsplit('/').next().unwrap_or_default(),
                "path_with_namespace": self.project_path,
                "web_url": self.web_url(base),
                "default_branch": "main",
            },
            "builds": builds,
        })
    }
}

/// A project and its pipelines.
#[derive(Debug)]
pub struct FakeProject {
    pub id: u64,
    pub path: String,
    pub next_iid: u64,
    pub pipelines: Vec<FakePipeline>,
}

/// Everything the fake knows.
#[derive(Debug, Default)]
pub struct World {
    pub projects: Vec<FakeProject>,
    /// Instance-wide ids of pipelines and jobs.
    pub next_pipeline_id: u64,
    pub next_job_id: u64,
}

/// `$NAME` and `${NAME}` of `template` replaced by `variables` (unknown
/// names by nothing), as GitLab expands `workflow:name`.
pub fn expand(template: &str, variables: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end) => (&braced[..end], end + 2),
                None => ("", 0),
            }
        } else {
            let n = after
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                .count();
            (&after[..n], n)
        };
        if len == 0 {
            out.push('$');
            rest = after;
            continue;
        }
        out.push_str(variables.get(name).map(String::as_str).unwrap_or(""));
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

impl World {
    /// The project with numeric id or path `key`.
    pub fn project_mut(&mut self, key: &str) -> Option<&mut FakeProject> {
        self.projects
            .iter_mut()
            .find(|p| p.path == key || p.id.to_string() == key)
    }

    pub fn project(&self, key: &str) -> Option<&FakeProject> {
        self.projects
            .iter()
            .find(|p| p.path == key || p.id.to_string() == key)
    }

    /// A new pipeline of `project` (which exists), named by `name_template`.
    pub fn new_pipeline(
        &mut self,
        project: &str,
        git_ref: &str,
        variables: BTreeMap<String, String>,
        name_template: Option<&str>,
        source: &'static str,
        now: Instant,
    ) -> Option<&mut FakePipeline> {
        self.next_pipeline_id += 1;
        let id = self.next_pipeline_id;
        let first_job = self.next_job_id + 1;
        self.next_job_id += 2;
        let p = self.project_mut(project)?;
        p.next_iid += 1;
        let head = variables.get("STITCH_HEAD").cloned().unwrap_or_default();
        let name = name_template
            .map(|t| expand(t, &variables))
            .filter(|n| !n.is_empty());
        let wall = Utc::now();
        let job = |id: u64, name: &'static str, stage: &'static str| FakeJob {
            id,
            name,
            stage,
            status: "created",
            failure_reason: None,
            created_at: wall,
            started_at: None,
            finished_at: None,
            trace: String::new(),
        };
        p.pipelines.push(FakePipeline {
            id,
            iid: p.next_iid,
            project_id: p.id,
            project_path: p.path.clone(),
            status: "created".into(),
            name,
            git_ref: git_ref.to_string(),
            source,
            plan: Plan::from_text(&head),
            born: now,
            cancel_at: None,
            variables,
            created_at: wall,
            updated_at: wall,
            started_at: None,
            finished_at: None,
            jobs: vec![
                job(first_job, "build", "build"),
                job(first_job + 1, "test", "test"),
            ],
        });
        p.pipelines.last_mut()
    }

    pub fn pipeline_mut(&mut self, project: &str, id: u64) -> Option<&mut FakePipeline> {
        self.project_mut(project)?
            .pipelines
            .iter_mut()
            .find(|p| p.id == id)
    }

    pub fn all_pipelines(&self) -> impl Iterator<Item = &FakePipeline> {
        self.projects.iter().flat_map(|p| p.pipelines.iter())
    }

    pub fn job(&self, project: &str, job: u64) -> Option<&FakeJob> {
        self.project(project)?
            .pipelines
            .iter()
            .flat_map(|p| p.jobs.iter())
            .find(|j| j.id == job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_expand_like_workflow_name() {
        let vars = BTreeMap::from([("STITCH_PIPELINE_NAME".to_string(), "stitch b_1".to_string())]);
        assert_eq!(expand("$STITCH_PIPELINE_NAME", &vars), "stitch b_1");
        assert_eq!(
            expand("ci ${STITCH_PIPELINE_NAME}!", &vars),
            "ci stitch b_1!"
        );
        assert_eq!(expand("$UNSET", &vars), "");
        assert_eq!(expand("cost $ 5", &vars), "cost $ 5");
    }
}
