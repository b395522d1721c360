//! `BuildkiteRunner`: the `BuildRunner` contract over [`Client`].
//!
//! - **trigger**: the build id is stamped as `meta_data["stitch:build_id"]`.
//!   Before creating, the runner looks the id up (an in-process cache of
//!   refs first, then the meta-data filter, skipped only on a request's
//!   `first_attempt`), so a redelivered trigger after a crash finds the
//!   build it created. A create whose outcome is unknown
//!   (timeout, reset, 5xx) is followed by the same lookup — repeated for
//!   `lookup_settle`, since Buildkite does not document how soon a new build
//!   is listed — and only an empty answer creates again. Concurrent
//!   triggers of one id in this process are serialized.
//! - **status / cancel / logs** use the recorded ref (number), checking the
//!   build carries the handle's id; without a ref they find the build by
//!   its meta-data (restart-safe, seed `000_*`).
//! - **cancel**: 422 "already finished" is success; so is any 422 for a
//!   build that turns out terminal.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use stitch_core::metadata::keys;
use stitch_core::{
    async_trait, BuildHandle, BuildId, BuildMetadata, BuildRunner, BuildStatus, LogStream,
    RunnerError, RunnerRef, StatusReport, TriggerRequest,
};

use super::client::{BuildQuery, Client, Pipeline};
use super::error::BuildkiteError;
use super::logs::{step_end, step_start, JobRead};
use super::model::{Build, BuildState, CreateBuild, META_BUILD_ID, META_QUEUE};
use crate::http_budget::Priority;
use crate::log_follower::{Batch, LogFollower, LogSource, SharedLogs, Steps};
use crate::timed_lines::parse_vendor_time;
use crate::timed_lines::{data_lines, truncation_line};
use crate::trigger_book::TriggerBook;

/// Creates attempted for one trigger call before the error goes back to
/// the caller (whose retry budget takes over; every later attempt looks up
/// first, so none can duplicate).
const CREATE_ROUNDS: u32 = 3;
/// How far before a build id was minted a lookup searches (clock skew).
const LOOKUP_SLACK: chrono::Duration = chrono::Duration::minutes(10);
/// Pause between recovery lookups while a lost create settles.
const SETTLE_STEP: Duration = Duration::from_millis(250);

/// Runner metadata keys (beside `url`, `exit_status`, `promised_exit_status`).
pub mod meta {
    /// The Buildkite build number.
    pub const NUMBER: &str = "buildkite_number";
    /// The raw Buildkite state.
    pub const STATE: &str = "buildkite_state";
    /// `"true"` while the build is failing (a job failed, others still run).
    pub const FAILING: &str = "buildkite_failing";
    /// `"true"` while a block step waits.
    pub const BLOCKED: &str = "buildkite_blocked";
    /// Number of jobs.
    pub const JOBS_TOTAL: &str = "buildkite_jobs_total";
    /// Jobs running now.
    pub const JOBS_RUNNING: &str = "buildkite_jobs_running";
    /// Jobs that passed.
    pub const JOBS_PASSED: &str = "buildkite_jobs_passed";
    /// Jobs that failed (failed, timed out, broken, expired).
    pub const JOBS_FAILED: &str = "buildkite_jobs_failed";
}

/// How one queue's builds run on Buildkite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildkiteConfig {
    /// Organization and pipeline.
    pub pipeline: Pipeline,
    /// Branch builds run on.
    pub branch: String,
    /// Commit builds run on (`HEAD` = the branch's head).
    pub commit: String,
    /// Whether caller metadata `commit` / `branch` override the two above.
    pub allow_ref_override: bool,
    /// How often a followed log re-reads a running build.
    pub log_poll: Duration,
    /// How long a recovery lookup keeps looking for a build whose create
    /// answer was lost before creating again.
    pub lookup_settle: Duration,
    /// The most log bytes streamed for one build (all jobs together); past
    /// it the log ends with a truncation line and is no longer fetched.
    pub max_log_bytes: u64,
    /// Bytes a log fetch asks for first (the tail of the job's log); a log
    /// that grew by more since the last fetch takes a second request.
    pub log_window: u64,
}

/// Default [`BuildkiteConfig::max_log_bytes`]: 16 MiB.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 16 * 1024 * 1024;
/// Default [`BuildkiteConfig::log_window`]: 64 KiB.
pub const DEFAULT_LOG_WINDOW: u64 = 64 * 1024;

impl BuildkiteConfig {
    /// Defaults: commit `HEAD`, no override, logs re-read every 2 s,
    /// lookups settle for 2 s, logs capped at 16 MiB per build and read
    /// 64 KiB tails first.
    pub fn new(
        org: impl Into<String>,
        pipeline: impl Into<String>,
        branch: impl Into<String>,
    ) -> Self {
        Self {
            pipeline: Pipeline {
                org: org.into(),
                slug: pipeline.into(),
            },
            branch: branch.into(),
            commit: "HEAD".into(),
            allow_ref_override: false,
            log_poll: Duration::from_secs(2),
            lookup_settle: Duration::from_secs(2),
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
            log_window: DEFAULT_LOG_WINDOW,
        }
    }
}

/// The Buildkite runner. See the module docs.
pub struct BuildkiteRunner {
    client: Client,
    config: BuildkiteConfig,
    book: TriggerBook,
    /// The log follower of each build someone is viewing, shared by all
    /// its viewers.
    followers: SharedLogs,
}

impl std::fmt::Debug for BuildkiteRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildkiteRunner")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl BuildkiteRunner {
    /// A runner for one queue's pipeline.
    pub fn new(client: Client, config: BuildkiteConfig) -> Self {
        Self {
            client,
            config,
            book: TriggerBook::new(),
            followers: SharedLogs::default(),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &BuildkiteConfig {
        &self.config
    }

    fn pipeline_of(&self, r: Option<&RunnerRef>) -> Pipeline {
        match r.and_then(|r| Some((r.data("org")?, r.data("pipeline")?))) {
            Some((org, slug)) => Pipeline {
                org: org.to_string(),
                slug: slug.to_string(),
            },
            None => self.config.pipeline.clone(),
        }
    }

    fn runner_ref(&self, build: &Build) -> RunnerRef {
        let mut r = RunnerRef::new(build.number.to_string())
            .with_data("uuid", build.id.clone())
            .with_data("org", self.config.pipeline.org.clone())
            .with_data("pipeline", self.config.pipeline.slug.clone());
        if let Some(url) = &build.web_url {
            r = r.with_url(url.clone());
        }
        r
    }

    /// The build stamped with `id`, if Buildkite lists one. Several (a
    /// duplicate made by something else) → the oldest, deterministically.
    async fn lookup(&self, id: &BuildId) -> Result<Option<Build>, BuildkiteError> {
        self.lookup_with(&self.client, id).await
    }

    /// [`Self::lookup`] through `client`.
    async fn lookup_with(
        &self,
        client: &Client,
        id: &BuildId,
    ) -> Result<Option<Build>, BuildkiteError> {
        let query = BuildQuery {
            meta_data: vec![(META_BUILD_ID.to_string(), id.to_string())],
            created_from: Some(id.created_at() - LOOKUP_SLACK),
            exclude_jobs: true,
            ..BuildQuery::default()
        };
        let builds = client.list_builds(&self.config.pipeline, &query).await?;
        Ok(builds
            .into_iter()
            .filter(|b| b.stitch_build_id() == Some(id.as_str()))
            .min_by_key(|b| b.number))
    }

    /// The lookup after a create with an unknown outcome: keeps looking for
    /// `lookup_settle` before concluding there is no build.
    async fn lookup_settled(&self, id: &BuildId) -> Result<Option<Build>, BuildkiteError> {
        let deadline = tokio::time::Instant::now() + self.config.lookup_settle;
        loop {
            if let Some(b) = self.lookup(id).await? {
                return Ok(Some(b));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(SETTLE_STEP).await;
        }
    }

    fn create_body(&self, req: &TriggerRequest) -> CreateBuild {
        let md = &req.metadata;
        let overridden = |key: &str, default: &str| {
            if self.config.allow_ref_override {
                md.get(key)
                    .filter(|v| !v.is_empty())
                    .unwrap_or(default)
                    .to_string()
            } else {
                default.to_string()
            }
        };
        let mut env: BTreeMap<String, String> = req.job_env.clone();
        env.insert("STITCH_BUILD_ID".into(), req.build_id.to_string());
        env.insert("STITCH_QUEUE".into(), req.queue.clone());
        env.insert("STITCH_BASE".into(), json(&req.changes.base));
        env.insert("STITCH_HEAD".into(), json(&req.changes.head));
        env.insert("STITCH_METADATA".into(), json(md));
        let message = md.get("message").map(str::to_string).unwrap_or_else(|| {
            let head = req
                .changes
                .head
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>();
            let mut m = format!(
                "stitch {} on {}: {}",
                req.build_id,
                req.queue,
                head.join(" ")
            );
            if m.len() > 500 {
                let cut = (0..=497)
                    .rev()
                    .find(|i| m.is_char_boundary(*i))
                    .unwrap_or(0);
                m.truncate(cut);
                m.push_str("...");
            }
            m
        });
        CreateBuild {
            commit: overridden("commit", &self.config.commit),
            branch: overridden("branch", &self.config.branch),
            message,
            env,
            meta_data: BTreeMap::from([
                (META_BUILD_ID.to_string(), req.build_id.to_string()),
                (META_QUEUE.to_string(), req.queue.clone()),
            ]),
        }
    }

    async fn trigger_locked(&self, req: &TriggerRequest) -> Result<RunnerRef, RunnerError> {
        if let Some(r) = self.book.cached(&req.build_id) {
            return Ok(r);
        }
        if !req.first_attempt {
            if let Some(b) = self.lookup(&req.build_id).await? {
                return Ok(self.found(&req.build_id, &b));
            }
        }
        let body = self.create_body(req);
        let mut last = None;
        for _ in 0..CREATE_ROUNDS {
            match self.client.create_build(&self.config.pipeline, &body).await {
                Ok(b) => return Ok(self.found(&req.build_id, &b)),
                Err(e) if e.outcome_unknown() => {
                    tracing::info!(build = %req.build_id, error = %e, "create outcome unknown; looking the build up before creating again");
                    if let Some(b) = self.lookup_settled(&req.build_id).await? {
                        return Ok(self.found(&req.build_id, &b));
                    }
                    last = Some(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(last
            .map(RunnerError::from)
            .unwrap_or_else(|| RunnerError::Internal("no create attempted".into())))
    }

    fn found(&self, id: &BuildId, b: &Build) -> RunnerRef {
        let r = self.runner_ref(b);
        self.book.remember(id, &r);
        r
    }

    /// The build `handle` points at: by its ref (checking the stamped id),
    /// else by meta-data lookup. `NotFound` when neither finds it.
    async fn resolve(&self, handle: &BuildHandle) -> Result<(Pipeline, Build), RunnerError> {
        self.resolve_with(&self.client, handle).await
    }

    /// [`Self::resolve`] through `client` (log viewers resolve at
    /// [`Priority::Logs`]).
    async fn resolve_with(
        &self,
        client: &Client,
        handle: &BuildHandle,
    ) -> Result<(Pipeline, Build), RunnerError> {
        let r = handle
            .runner_ref
            .clone()
            .or_else(|| self.book.cached(&handle.build_id));
        let pipeline = self.pipeline_of(r.as_ref());
        if let Some(r) = r {
            let number: u64 = r.id.parse().map_err(|_| {
                RunnerError::NotFound(format!(
                    "{:?} is not a Buildkite build number (build {})",
                    r.id, handle.build_id
                ))
            })?;
            let build = client.get_build(&pipeline, number).await?;
            if build.stitch_build_id() != Some(handle.build_id.as_str()) {
                return Err(RunnerError::NotFound(format!(
                    "Buildkite build {}/{} #{number} belongs to {:?}, not to {}",
                    pipeline.org,
                    pipeline.slug,
                    build.stitch_build_id(),
                    handle.build_id
                )));
            }
            return Ok((pipeline, build));
        }
        match self.lookup_with(client, &handle.build_id).await? {
            Some(b) => {
                self.found(&handle.build_id, &b);
                // The lookup excluded jobs; read the whole build.
                let build = client.get_build(&pipeline, b.number).await?;
                Ok((pipeline, build))
            }
            None => Err(RunnerError::NotFound(format!(
                "no Buildkite build on {}/{} carries meta_data {META_BUILD_ID}={}",
                pipeline.org, pipeline.slug, handle.build_id
            ))),
        }
    }
}

/// JSON text of string lists and maps (which always serialize).
fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// The status report of a build: the mapped state plus `url`,
/// `buildkite_number`, `buildkite_state`, failing/blocked flags, job counts,
/// and any promised or final exit status of a failed job.
pub fn status_report(build: &Build) -> StatusReport {
    let mut md = BuildMetadata::new();
    if let Some(url) = &build.web_url {
        md.insert(keys::URL, url.clone());
    }
    md.insert(meta::NUMBER, build.number.to_string());
    md.insert(meta::STATE, build.state.as_str());
    if build.state == BuildState::Failing {
        md.insert(meta::FAILING, "true");
    }
    if build.blocked || build.state == BuildState::Blocked {
        md.insert(meta::BLOCKED, "true");
    }
    let active: Vec<_> = build.jobs.iter().filter(|j| !j.retried).collect();
    let count = |states: &[&str]| {
        active
            .iter()
            .filter(|j| states.contains(&j.state.as_deref().unwrap_or("")))
            .count()
    };
    if !build.jobs.is_empty() {
        md.insert(meta::JOBS_TOTAL, active.len().to_string());
        md.insert(
            meta::JOBS_RUNNING,
            count(&["running", "canceling", "timing_out"]).to_string(),
        );
        md.insert(meta::JOBS_PASSED, count(&["passed"]).to_string());
        md.insert(
            meta::JOBS_FAILED,
            count(&["failed", "timed_out", "broken", "expired"]).to_string(),
        );
    } else if let Some(c) = &build.job_state_counts {
        md.insert(meta::JOBS_TOTAL, c.total.to_string());
    }
    if let Some(p) = active.iter().find_map(|j| j.promised_exit_status) {
        md.insert(keys::PROMISED_EXIT_STATUS, p.to_string());
    }
    let status = build.state.status();
    if status == BuildStatus::Failed {
        let failed = active
            .iter()
            .find(|j| !j.soft_failed && j.exit_status.is_some_and(|s| s != 0));
        if let Some(code) = failed.and_then(|j| j.exit_status) {
            md.insert(keys::EXIT_STATUS, code.to_string());
        }
    }
    StatusReport::new(status).with_metadata(md)
}

#[async_trait]
impl BuildRunner for BuildkiteRunner {
    fn name(&self) -> &'static str {
        "buildkite"
    }

    async fn trigger(&self, req: &TriggerRequest) -> Result<RunnerRef, RunnerError> {
        req.validate()
            .map_err(|e| RunnerError::InvalidRequest(e.to_string()))?;
        let _serialized = self.book.lock(&req.build_id).await;
        self.trigger_locked(req).await
    }

    async fn status(&self, handle: &BuildHandle) -> Result<StatusReport, RunnerError> {
        let (_, build) = self.resolve(handle).await?;
        Ok(status_report(&build))
    }

    async fn cancel(&self, handle: &BuildHandle) -> Result<(), RunnerError> {
        let (pipeline, build) = self.resolve(handle).await?;
        if build.state.status().is_terminal() {
            return Ok(());
        }
        match self.client.cancel_build(&pipeline, build.number).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_already_finished() => Ok(()),
            Err(e @ BuildkiteError::Api { status: 422, .. }) => {
                // Not cancelable: fine if it ended meanwhile, an error otherwise.
                let now = self.client.get_build(&pipeline, build.number).await?;
                if now.state.status().is_terminal() {
                    Ok(())
                } else {
                    Err(e.into())
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Viewers of one build share one follower (one fetch stream): the
    /// first viewer's call starts it, later ones join it and get every line
    /// so far, and it stops when the last viewer's stream is dropped.
    async fn logs(&self, handle: &BuildHandle) -> Result<LogStream, RunnerError> {
        if let Some(viewer) = self.followers.join(&handle.build_id) {
            return Ok(viewer);
        }
        let client = self.client.with_priority(Priority::Logs);
        let (pipeline, build) = self.resolve_with(&client, handle).await?;
        let source = BuildLogs {
            client,
            pipeline,
            number: build.number,
            window: self.config.log_window,
            max_bytes: self.config.max_log_bytes,
            bytes_streamed: 0,
            steps: Steps::default(),
        };
        let follower = LogFollower::new(source, build, self.config.log_poll);
        // Another viewer may have started one while this one resolved.
        Ok(self.followers.join_or_start(&handle.build_id, follower))
    }
}

/// A build's job logs, read as they grow until the build is terminal or
/// the build's log reached `max_bytes`.
struct BuildLogs {
    client: Client,
    pipeline: Pipeline,
    number: u64,
    window: u64,
    max_bytes: u64,
    /// Log bytes read so far, all jobs together.
    bytes_streamed: u64,
    /// Jobs by id, with how far their logs were read.
    steps: Steps<String, JobRead>,
}

#[async_trait]
impl LogSource for BuildLogs {
    type Build = Build;
    type Error = BuildkiteError;

    async fn reread(&mut self) -> Result<Build, BuildkiteError> {
        self.client.get_build(&self.pipeline, self.number).await
    }

    async fn read(&mut self, build: &Build) -> Result<Batch, BuildkiteError> {
        let terminal = build.state.status().is_terminal();
        let now = Utc::now();
        let mut out = Vec::new();
        for job in build.jobs.iter().filter(|j| j.has_log()) {
            if !job.has_started() {
                continue;
            }
            let start = job
                .started_at
                .as_deref()
                .and_then(parse_vendor_time)
                .unwrap_or(now);
            let step = self.steps.step(job.id.clone(), || JobRead::new(start));
            if step.closed {
                continue;
            }
            if !step.opened {
                step.opened = true;
                out.push(step_start(step.id, job, now));
            }
            let complete = job.is_finished() || terminal;
            let allowed = self.max_bytes.saturating_sub(self.bytes_streamed);
            let chunk = self
                .client
                .job_log_since(
                    &self.pipeline,
                    self.number,
                    &job.id,
                    step.state.bytes_read,
                    self.window,
                    allowed,
                )
                .await?;
            let over = chunk.total.saturating_sub(step.state.bytes_read) > allowed;
            let take = chunk
                .bytes
                .len()
                .min(usize::try_from(allowed).unwrap_or(usize::MAX));
            step.state.bytes_read += take as u64;
            self.bytes_streamed += take as u64;
            out.extend(data_lines(
                step.id,
                &step.state.splitter.push(&chunk.bytes[..take]),
            ));
            if over {
                out.push(truncation_line(step.id, self.max_bytes, "Buildkite", now));
                return Ok(Batch {
                    lines: out,
                    finished: true,
                });
            }
            if complete {
                if let Some(last) = step.state.splitter.finish() {
                    out.extend(data_lines(step.id, &[last]));
                }
                step.closed = true;
                out.push(step_end(step.id, job, now));
            }
        }
        Ok(Batch {
            lines: out,
            finished: terminal,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(json: serde_json::Value) -> Build {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn report_carries_state_flags_and_counts() {
        let b = build(serde_json::json!({
            "id": "u-1", "number": 42, "state": "failing", "blocked": false,
            "web_url": "https://buildkite.com/acme/app/builds/42",
            "jobs": [
                {"id": "j1", "type": "script", "state": "failed", "exit_status": 2, "promised_exit_status": 2},
                {"id": "j2", "type": "script", "state": "running"},
                {"id": "j3", "type": "script", "state": "passed", "exit_status": 0},
                {"id": "j0", "type": "script", "state": "failed", "exit_status": 1, "retried": true},
                {"id": "w", "type": "waiter", "state": "waiting"}
            ]
        }));
        let r = status_report(&b);
        assert_eq!(r.status, BuildStatus::Running);
        let m = &r.metadata;
        assert_eq!(
            m.get("url"),
            Some("https://buildkite.com/acme/app/builds/42")
        );
        assert_eq!(m.get(meta::NUMBER), Some("42"));
        assert_eq!(m.get(meta::STATE), Some("failing"));
        assert_eq!(m.get(meta::FAILING), Some("true"));
        assert_eq!(m.get(meta::BLOCKED), None);
        assert_eq!(m.get(meta::JOBS_TOTAL), Some("4"));
        assert_eq!(m.get(meta::JOBS_RUNNING), Some("1"));
        assert_eq!(m.get(meta::JOBS_PASSED), Some("1"));
        assert_eq!(m.get(meta::JOBS_FAILED), Some("1"));
        assert_eq!(m.get(keys::PROMISED_EXIT_STATUS), Some("2"));
        assert_eq!(m.get(keys::EXIT_STATUS), None, "not terminal yet");
    }

    #[test]
    fn failed_builds_report_the_exit_status_and_blocked_builds_say_so() {
        let b = build(serde_json::json!({
            "id": "u", "number": 1, "state": "failed",
            "jobs": [
                {"id": "a", "type": "script", "state": "failed", "exit_status": 1, "soft_failed": true},
                {"id": "b", "type": "script", "state": "failed", "exit_status": 3}
            ]
        }));
        let r = status_report(&b);
        assert_eq!(r.status, BuildStatus::Failed);
        assert_eq!(r.metadata.get(keys::EXIT_STATUS), Some("3"));
        let blocked = build(serde_json::json!({
            "id": "u", "number": 1, "state": "passed", "blocked": true,
            "job_state_counts": {"total": 3, "states": {"passed": 2}}
        }));
        let r = status_report(&blocked);
        assert_eq!(r.status, BuildStatus::Succeeded);
        assert_eq!(r.metadata.get(meta::BLOCKED), Some("true"));
        assert_eq!(r.metadata.get(meta::JOBS_TOTAL), Some("3"));
        assert_eq!(r.metadata.get(meta::FAILING), None);
    }

    #[test]
    fn create_body_stamps_the_build_and_merges_job_env() {
        use stitch_core::ChangeSet;
        let budget = std::sync::Arc::new(super::super::RequestBudget::new(Default::default()));
        let client = Client::new(
            reqwest::Client::new(),
            "http://127.0.0.1:1",
            budget,
            crate::http_retry::RetryPolicy::none(),
        )
        .unwrap();
        let mut config = BuildkiteConfig::new("acme", "app", "main");
        let runner = BuildkiteRunner::new(client.clone(), config.clone());
        let req = TriggerRequest::new(
            BuildId::new(),
            "ci",
            ChangeSet::new(vec!["b1".into()], vec!["h1".into(), "h2".into()]),
        )
        .with_metadata(
            BuildMetadata::new()
                .with("commit", "abc123")
                .with("ticket", "T-1"),
        )
        .with_job_env(BTreeMap::from([
            ("STITCH_JOB_TOKEN".to_string(), "secret".to_string()),
            ("STITCH_SERVER".to_string(), "http://stitch".to_string()),
        ]));
        let body = runner.create_body(&req);
        assert_eq!(body.commit, "HEAD", "no override unless allowed");
        assert_eq!(body.branch, "main");
        assert_eq!(body.meta_data.len(), 2);
        assert_eq!(body.meta_data[META_BUILD_ID], req.build_id.to_string());
        assert_eq!(body.meta_data[META_QUEUE], "ci");
        assert!(!body.meta_data.values().any(|v| v.contains("secret")));
        assert_eq!(body.env["STITCH_JOB_TOKEN"], "secret");
        assert_eq!(body.env["STITCH_SERVER"], "http://stitch");
        assert_eq!(body.env["STITCH_BUILD_ID"], req.build_id.to_string());
        assert_eq!(body.env["STITCH_QUEUE"], "ci");
        assert_eq!(body.env["STITCH_BASE"], r#"["b1"]"#);
        assert_eq!(body.env["STITCH_HEAD"], r#"["h1","h2"]"#);
        assert_eq!(
            body.env["STITCH_METADATA"],
            r#"{"commit":"abc123","ticket":"T-1"}"#
        );
        assert!(body.message.contains("h1 h2"), "{}", body.message);

        config.allow_ref_override = true;
        let runner = BuildkiteRunner::new(client, config);
        let body = runner.create_body(&req);
        assert_eq!(body.commit, "abc123");
        assert_eq!(body.branch, "main", "no branch in the metadata");
    }
}
