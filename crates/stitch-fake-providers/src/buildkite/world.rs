//! The fake's state: organizations, pipelines, builds with their jobs and
//! logs, and how builds progress with time.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

use super::Timing;

/// Marker in a build's `STITCH_HEAD` env (or message) choosing its fate.
pub const MARKER: &str = "stitch-bk=";

/// What a build will do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Two jobs pass; the build passes.
    Pass,
    /// The second job promises exit 2, the build turns `failing`, then `failed`.
    Fail,
    /// Runs until cancelled.
    Hang,
    /// Goes to a state stitch does not know (`waiting`) and stays there.
    Unknown,
    /// Passes with a block step left waiting (`blocked: true`).
    Block,
}

impl Plan {
    /// The plan named by a `stitch-bk=<plan>` marker in `text`.
    pub fn from_text(text: &str) -> Plan {
        let Some(at) = text.find(MARKER) else {
            return Plan::Pass;
        };
        let rest = &text[at + MARKER.len()..];
        let word: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        match word.as_str() {
            "fail" => Plan::Fail,
            "hang" => Plan::Hang,
            "unknown" => Plan::Unknown,
            "block" => Plan::Block,
            _ => Plan::Pass,
        }
    }
}

/// One job of a fake build.
#[derive(Clone, Debug)]
pub struct FakeJob {
    pub id: String,
    pub name: String,
    pub command: String,
    pub state: &'static str,
    pub exit_status: Option<i64>,
    pub promised_exit_status: Option<i64>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub log: String,
}

/// One fake build.
#[derive(Clone, Debug)]
pub struct FakeBuild {
    pub org: String,
    pub pipeline: String,
    pub number: u64,
    pub uuid: String,
    pub state: String,
    pub blocked: bool,
    pub plan: Plan,
    pub born: Instant,
    pub cancel_at: Option<Instant>,
    /// When each `GET` of this build arrived (benchmarks split a cancel's
    /// latency at the status read that led to it).
    pub reads: Vec<Instant>,
    pub branch: String,
    pub commit: String,
    pub message: String,
    pub env: BTreeMap<String, String>,
    pub meta_data: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub jobs: Vec<FakeJob>,
}

/// A change the progression made, for webhooks.
#[derive(Clone, Debug)]
pub struct Transition {
    pub event: String,
    pub build: Value,
    pub job: Option<Value>,
    pub stitch_build_id: Option<String>,
}

pub fn is_terminal(state: &str) -> bool {
    matches!(
        state,
        "passed" | "failed" | "canceled" | "skipped" | "not_run"
    )
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn log_line(at: DateTime<Utc>, text: &str) -> String {
    format!("\u{1b}_bk;t={}\u{7}{text}\r\n", at.timestamp_millis())
}

impl FakeBuild {
    /// Moves the build along its plan to where `now` puts it; returns the
    /// webhook-worthy transitions.
    pub fn advance(&mut self, now: Instant, timing: &Timing, base: &str) -> Vec<Transition> {
        let mut out = Vec::new();
        if is_terminal(&self.state) {
            return out;
        }
        let wall = Utc::now();
        if let Some(at) = self.cancel_at {
            if self.state != "canceling" {
                self.set_state("canceling", base, &mut out);
            }
            if now >= at + timing.cancel {
                for j in &mut self.jobs {
                    if !matches!(j.state, "passed" | "failed" | "canceled") {
                        let was_running = j.state == "running";
                        j.state = "canceled";
                        if was_running {
                            j.log.push_str(&log_line(
                                wall,
                                "# Received cancellation signal, interrupting",
                            ));
                            j.finished_at = Some(wall);
                        }
                    }
                }
                self.finished_at = Some(wall);
                self.set_state("canceled", base, &mut out);
            }
            return out;
        }
        let age = now.saturating_duration_since(self.born);
        let run_start = timing.schedule;
        if age < run_start {
            return out;
        }
        if self.plan == Plan::Unknown {
            if self.state != "waiting" {
                self.set_state("waiting", base, &mut out);
            }
            return out;
        }
        if self.state == "scheduled" {
            self.started_at = Some(wall);
            self.set_state("running", base, &mut out);
        }
        let run = age - run_start;
        let half = timing.run / 2;
        // Job 1: the first half of the run.
        self.job_step(0, run, Duration::ZERO, half, false, wall, base, &mut out);
        if self.plan == Plan::Hang {
            // Job 2 starts and never ends.
            if run >= half && self.jobs[1].state != "running" {
                self.start_job(1, wall, base, &mut out);
            }
            return out;
        }
        let fails = self.plan == Plan::Fail;
        if fails && run >= half + half / 2 && self.jobs[1].promised_exit_status.is_none() {
            self.jobs[1].promised_exit_status = Some(2);
            self.jobs[1]
                .log
                .push_str(&log_line(wall, "test result: FAILED. 41 passed; 1 failed"));
            self.set_state("failing", base, &mut out);
        }
        self.job_step(1, run, half, timing.run, fails, wall, base, &mut out);
        if run >= timing.run {
            self.finished_at = Some(wall);
            self.blocked = self.plan == Plan::Block;
            let end = if fails { "failed" } else { "passed" };
            self.set_state(end, base, &mut out);
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn job_step(
        &mut self,
        i: usize,
        run: Duration,
        from: Duration,
        to: Duration,
        fails: bool,
        wall: DateTime<Utc>,
        base: &str,
        out: &mut Vec<Transition>,
    ) {
        if run >= from && self.jobs[i].state == "scheduled" {
            self.start_job(i, wall, base, out);
        }
        if run >= to && self.jobs[i].state == "running" {
            let job = &mut self.jobs[i];
            let (state, code) = if fails { ("failed", 2) } else { ("passed", 0) };
            job.log
                .push_str(&log_line(wall, &format!("{} finished", job.name)));
            if fails {
                job.log.push_str(&log_line(
                    wall,
                    "\u{1b}[31m🚨 Error: The command exited with status 2\u{1b}[0m",
                ));
            }
            job.state = state;
            job.exit_status = Some(code);
            job.finished_at = Some(wall);
            let snapshot = self.job_json(i, base);
            out.push(self.transition("job.finished", Some(snapshot), base));
        }
    }

    fn start_job(&mut self, i: usize, wall: DateTime<Utc>, base: &str, out: &mut Vec<Transition>) {
        let job = &mut self.jobs[i];
        job.state = "running";
        job.started_at = Some(wall);
        job.log
            .push_str(&log_line(wall, "~~~ Preparing working directory"));
        job.log.push_str(&log_line(
            wall,
            &format!("\u{1b}[90m$\u{1b}[0m git checkout -f {}", self.commit),
        ));
        job.log.push_str(&log_line(wall, "~~~ Running commands"));
        job.log
            .push_str(&log_line(wall, &format!("$ {}", job.command)));
        let snapshot = self.job_json(i, base);
        out.push(self.transition("job.started", Some(snapshot), base));
    }

    fn set_state(&mut self, state: &str, base: &str, out: &mut Vec<Transition>) {
        self.state = state.to_string();
        let event = match state {
            s if is_terminal(s) => "build.finished".to_string(),
            "canceling" | "waiting" => return,
            s => format!("build.{s}"),
        };
        out.push(self.transition(&event, None, base));
    }

    fn transition(&self, event: &str, job: Option<Value>, base: &str) -> Transition {
        Transition {
            event: event.to_string(),
            build: self.json(base, false),
            job,
            stitch_build_id: self.meta_data.get("stitch:build_id").cloned(),
        }
    }

    pub fn web_url(&self) -> String {
        format!(
            "https://buildkite.example/{}/{}/builds/{}",
            self.org, self.pipeline, self.number
        )
    }

    fn api_url(&self, base: &str) -> String {
        format!(
            "{base}/v2/organizations/{}/pipelines/{}/builds/{}",
            self.org, self.pipeline, self.number
        )
    }

    pub fn job_json(&self, i: usize, base: &str) -> Value {
        let j = &self.jobs[i];
        let build_url = self.api_url(base);
        let mut v = json!({
            "id": j.id,
            "type": "script",
            "name": j.name,
            "step_key": j.name,
            "command": j.command,
            "state": j.state,
            "soft_failed": false,
            "exit_status": j.exit_status,
            "build_url": build_url,
            "web_url": format!("{}#{}", self.web_url(), j.id),
            "log_url": format!("{build_url}/jobs/{}/log", j.id),
            "raw_log_url": format!("{build_url}/jobs/{}/log.txt", j.id),
            "created_at": ts(self.created_at),
            "started_at": j.started_at.map(ts),
            "finished_at": j.finished_at.map(ts),
            "retried": false,
            "retries_count": null,
            "agent": null,
        });
        if let Some(p) = j.promised_exit_status {
            v["promised_exit_status"] = json!(p);
        }
        v
    }

    /// The REST (or webhook, `with_jobs = false`) JSON of the build.
    pub fn json(&self, base: &str, with_jobs: bool) -> Value {
        let mut v = json!({
            "id": self.uuid,
            "graphql_id": format!("QnVpbGQtLS0{}", self.uuid.replace('-', "")),
            "url": self.api_url(base),
            "web_url": self.web_url(),
            "number": self.number,
            "state": self.state,
            "cancel_reason": if self.state.starts_with("cancel") { json!("canceled via API") } else { Value::Null },
            "blocked": self.blocked,
            "blocked_state": if self.blocked { "passed" } else { "" },
            "message": self.message,
            "commit": self.commit,
            "branch": self.branch,
            "tag": null,
            "env": self.env,
            "source": "api",
            "creator": {"id": "5d606b51-82ad-41aa-acf3-d0bf150ed353", "name": "stitch", "email": "stitch@example.com"},
            "created_at": ts(self.created_at),
            "scheduled_at": ts(self.created_at),
            "started_at": self.started_at.map(ts),
            "finished_at": self.finished_at.map(ts),
            "meta_data": self.meta_data,
            "pull_request": null,
            "rebuilt_from": null,
            "pipeline": {"slug": self.pipeline, "name": self.pipeline},
        });
        if with_jobs {
            let jobs: Vec<Value> = (0..self.jobs.len())
                .map(|i| self.job_json(i, base))
                .collect();
            let mut states: BTreeMap<&str, u64> = BTreeMap::new();
            for j in &self.jobs {
                *states.entry(j.state).or_default() += 1;
            }
            v["jobs"] = Value::Array(jobs);
            v["job_state_counts"] = json!({"total": self.jobs.len(), "states": states});
        }
        v
    }
}

/// A pipeline and its builds.
#[derive(Debug, Default)]
pub struct FakePipeline {
    pub next_number: u64,
    pub builds: Vec<FakeBuild>,
}

/// Everything the fake knows.
#[derive(Debug, Default)]
pub struct World {
    pub pipelines: HashMap<(String, String), FakePipeline>,
}

impl World {
    pub fn new_build(
        &mut self,
        org: &str,
        pipeline: &str,
        body: &CreateBody,
        now: Instant,
    ) -> Option<&mut FakeBuild> {
        let p = self
            .pipelines
            .get_mut(&(org.to_string(), pipeline.to_string()))?;
        p.next_number += 1;
        let number = p.next_number;
        let head = body.env.get("STITCH_HEAD").cloned().unwrap_or_default();
        let plan = Plan::from_text(&format!("{head} {}", body.message));
        let job = |name: &str, command: &str| FakeJob {
            id: uuid_like(),
            name: name.to_string(),
            command: command.to_string(),
            state: "scheduled",
            exit_status: None,
            promised_exit_status: None,
            started_at: None,
            finished_at: None,
            log: String::new(),
        };
        p.builds.push(FakeBuild {
            org: org.to_string(),
            pipeline: pipeline.to_string(),
            number,
            uuid: uuid_like(),
            state: "scheduled".into(),
            blocked: false,
            plan,
            born: now,
            cancel_at: None,
            reads: Vec::new(),
            branch: body.branch.clone(),
            commit: body.commit.clone(),
            message: body.message.clone(),
            env: body.env.clone(),
            meta_data: body.meta_data.clone(),
            created_at: Utc::now(),
            started_at: None,
            finished_at: None,
            jobs: vec![job("build", "make build"), job("test", "make test")],
        });
        p.builds.last_mut()
    }

    pub fn build_mut(&mut self, org: &str, pipeline: &str, number: u64) -> Option<&mut FakeBuild> {
        self.pipelines
            .get_mut(&(org.to_string(), pipeline.to_string()))?
            .builds
            .iter_mut()
            .find(|b| b.number == number)
    }

    pub fn all_builds(&self) -> impl Iterator<Item = &FakeBuild> {
        self.pipelines.values().flat_map(|p| p.builds.iter())
    }
}

/// The create-build body the fake accepts.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct CreateBody {
    #[serde(default)]
    pub commit: String,
    #[serde(default)]
    pub branch: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub meta_data: BTreeMap<String, String>,
}

/// A random UUID-shaped id (v4 layout).
pub fn uuid_like() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}
