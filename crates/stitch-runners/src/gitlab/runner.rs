//! `GitlabRunner`: the `BuildRunner` contract over [`Client`].
//!
//! - **trigger**: a pipeline on the configured ref with the `STITCH_*`
//!   variables, among them `STITCH_PIPELINE_NAME = "stitch <build id>"`,
//!   which the project's `workflow: name` gives the pipeline. Before
//!   creating, the runner looks the name up (an in-process cache of refs
//!   first, then the pipeline list filtered by name, skipped only on a
//!   request's `first_attempt`), so a redelivered trigger after a crash
//!   finds the pipeline it created. A create whose outcome is unknown
//!   (timeout, reset, 5xx) is followed by the same lookup, repeated for
//!   `lookup_settle`, and only an empty answer creates again. Concurrent
//!   triggers of one id in this process are serialized.
//! - **status / cancel / logs** use the recorded ref (pipeline id),
//!   checking the pipeline carries the handle's name; without a ref they
//!   find the pipeline by its name (restart-safe).
//! - **cancel**: a pipeline already terminal is left alone; GitLab's
//!   answer to the cancel is not trusted to have ended it — the next poll
//!   reads `canceling` or `canceled`, both cancelled.
//! - **logs**: one step per job (in job id order), each job's trace read
//!   as it grows; only lines not sent before are emitted.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use stitch_core::metadata::keys;
use stitch_core::{
    async_trait, BuildHandle, BuildId, BuildMetadata, BuildRunner, LogStream, RunnerError,
    RunnerRef, StatusReport, TriggerRequest,
};

use super::client::{Client, PipelineQuery};
use super::error::GitlabError;
use super::logs::{step_end, step_start, JobRead};
use super::model::{
    pipeline_name, CreatePipeline, Pipeline, PipelineStatus, Variable, VAR_PIPELINE_NAME,
};
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

/// Default [`GitlabConfig::max_log_bytes`]: 16 MiB.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 16 * 1024 * 1024;

/// Runner metadata keys (beside `url`).
pub mod meta {
    /// The pipeline id.
    pub const PIPELINE_ID: &str = "gitlab_pipeline_id";
    /// The raw pipeline status.
    pub const STATUS: &str = "gitlab_status";
    /// What GitLab's UI shows (`success-with-warnings`, …), when it differs
    /// from the status.
    pub const DETAILED_STATUS: &str = "gitlab_detailed_status";
    /// Why the status maps as it does, where that is not plain.
    pub const REASON: &str = "gitlab_reason";
    /// `"true"` while a manual job blocks the pipeline.
    pub const BLOCKED: &str = "gitlab_blocked";
}

/// How one queue's builds run on GitLab.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GitlabConfig {
    /// The project: numeric id or `group/name` path.
    pub project: String,
    /// The ref pipelines run on.
    pub git_ref: String,
    /// Extra pipeline variables (stitch's own win).
    pub variables: BTreeMap<String, String>,
    /// How often a followed log re-reads the pipeline.
    pub log_poll: Duration,
    /// How long a recovery lookup keeps looking for a pipeline whose
    /// create answer was lost before creating again.
    pub lookup_settle: Duration,
    /// The most log bytes streamed for one build (all jobs together).
    pub max_log_bytes: u64,
}

impl GitlabConfig {
    /// Defaults: no extra variables, logs re-read every 2 s, lookups
    /// settle for 2 s, logs capped at 16 MiB per build.
    pub fn new(project: impl Into<String>, git_ref: impl Into<String>) -> Self {
        Self {
            project: project.into(),
            git_ref: git_ref.into(),
            variables: BTreeMap::new(),
            log_poll: Duration::from_secs(2),
            lookup_settle: Duration::from_secs(2),
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
        }
    }
}

/// The GitLab runner. See the module docs.
pub struct GitlabRunner {
    client: Client,
    config: GitlabConfig,
    book: TriggerBook,
    /// The log follower of each build someone is viewing, shared by all
    /// its viewers.
    followers: SharedLogs,
}

impl std::fmt::Debug for GitlabRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitlabRunner")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl GitlabRunner {
    /// A runner for one queue's project.
    pub fn new(client: Client, config: GitlabConfig) -> Self {
        Self {
            client,
            config,
            book: TriggerBook::new(),
            followers: SharedLogs::default(),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &GitlabConfig {
        &self.config
    }

    fn project_of(&self, r: Option<&RunnerRef>) -> String {
        r.and_then(|r| r.data("project"))
            .unwrap_or(&self.config.project)
            .to_string()
    }

    fn found(&self, id: &BuildId, p: &Pipeline) -> RunnerRef {
        let mut r =
            RunnerRef::new(p.id.to_string()).with_data("project", self.config.project.clone());
        if let Some(url) = &p.web_url {
            r = r.with_url(url.clone());
        }
        self.book.remember(id, &r);
        r
    }

    /// The pipeline named for `id`, if GitLab lists one. Several (a
    /// duplicate made by something else) → the oldest, deterministically.
    async fn lookup_with(
        &self,
        client: &Client,
        id: &BuildId,
    ) -> Result<Option<Pipeline>, GitlabError> {
        let query = PipelineQuery {
            name: Some(pipeline_name(id)),
            updated_after: Some(id.created_at() - LOOKUP_SLACK),
            ..PipelineQuery::default()
        };
        let pipelines = client.list_pipelines(&self.config.project, &query).await?;
        Ok(pipelines
            .into_iter()
            .filter(|p| p.is_for(id))
            .min_by_key(|p| p.id))
    }

    /// The lookup after a create with an unknown outcome: keeps looking for
    /// `lookup_settle` before concluding there is no pipeline.
    async fn lookup_settled(&self, id: &BuildId) -> Result<Option<Pipeline>, GitlabError> {
        let deadline = tokio::time::Instant::now() + self.config.lookup_settle;
        loop {
            if let Some(p) = self.lookup_with(&self.client, id).await? {
                return Ok(Some(p));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(SETTLE_STEP).await;
        }
    }

    /// The create request of `req`: configured variables, the job
    /// environment, then stitch's variables (which win).
    pub fn create_body(&self, req: &TriggerRequest) -> CreatePipeline {
        let mut vars: BTreeMap<String, String> = self.config.variables.clone();
        vars.extend(req.job_env.clone());
        vars.insert("STITCH_BUILD_ID".into(), req.build_id.to_string());
        vars.insert("STITCH_QUEUE".into(), req.queue.clone());
        vars.insert("STITCH_BASE".into(), json(&req.changes.base));
        vars.insert("STITCH_HEAD".into(), json(&req.changes.head));
        vars.insert("STITCH_METADATA".into(), json(&req.metadata));
        vars.insert(VAR_PIPELINE_NAME.into(), pipeline_name(&req.build_id));
        CreatePipeline {
            git_ref: self.config.git_ref.clone(),
            variables: vars
                .into_iter()
                .map(|(key, value)| Variable {
                    key,
                    value,
                    variable_type: "env_var".into(),
                })
                .collect(),
        }
    }

    async fn trigger_locked(&self, req: &TriggerRequest) -> Result<RunnerRef, RunnerError> {
        if let Some(r) = self.book.cached(&req.build_id) {
            return Ok(r);
        }
        if !req.first_attempt {
            if let Some(p) = self.lookup_with(&self.client, &req.build_id).await? {
                return Ok(self.found(&req.build_id, &p));
            }
        }
        let body = self.create_body(req);
        let mut last = None;
        for _ in 0..CREATE_ROUNDS {
            match self
                .client
                .create_pipeline(&self.config.project, &body)
                .await
            {
                Ok(p) => {
                    if !p.is_for(&req.build_id) {
                        tracing::warn!(build = %req.build_id, pipeline = p.id, name = ?p.name, "the pipeline is not named for its build; set `workflow: name: $STITCH_PIPELINE_NAME` in .gitlab-ci.yml (docs/runners/gitlab.md)");
                    }
                    return Ok(self.found(&req.build_id, &p));
                }
                Err(e) if e.outcome_unknown() => {
                    tracing::info!(build = %req.build_id, error = %e, "create outcome unknown; looking the pipeline up before creating again");
                    if let Some(p) = self.lookup_settled(&req.build_id).await? {
                        return Ok(self.found(&req.build_id, &p));
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

    /// The pipeline `handle` points at: by its ref (checking its name),
    /// else by name lookup. `NotFound` when neither finds it.
    async fn resolve_with(
        &self,
        client: &Client,
        handle: &BuildHandle,
    ) -> Result<(String, Pipeline), RunnerError> {
        let r = handle
            .runner_ref
            .clone()
            .or_else(|| self.book.cached(&handle.build_id));
        let project = self.project_of(r.as_ref());
        if let Some(r) = r {
            let id: u64 = r.id.parse().map_err(|_| {
                RunnerError::NotFound(format!(
                    "{:?} is not a GitLab pipeline id (build {})",
                    r.id, handle.build_id
                ))
            })?;
            let pipeline = client.get_pipeline(&project, id).await?;
            if !pipeline.is_for(&handle.build_id) {
                return Err(RunnerError::NotFound(format!(
                    "GitLab pipeline {id} of {project} is named {:?}, not {:?} (is `workflow: name: \
                     ${VAR_PIPELINE_NAME}` in the project's .gitlab-ci.yml?)",
                    pipeline.name.as_deref().unwrap_or(""),
                    pipeline_name(&handle.build_id)
                )));
            }
            return Ok((project, pipeline));
        }
        match self.lookup_with(client, &handle.build_id).await? {
            Some(p) => {
                self.found(&handle.build_id, &p);
                Ok((project, p))
            }
            None => Err(RunnerError::NotFound(format!(
                "no GitLab pipeline of {project} is named {:?}",
                pipeline_name(&handle.build_id)
            ))),
        }
    }
}

/// JSON text of string lists and maps (which always serialize).
fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// The status report of a pipeline: the mapped status plus `url`, the
/// pipeline id, the raw status, the detailed status where it says more,
/// the reason of a non-obvious mapping and the manual-block flag.
pub fn status_report(p: &Pipeline) -> StatusReport {
    let mut md = BuildMetadata::new();
    if let Some(url) = &p.web_url {
        md.insert(keys::URL, url.clone());
    }
    md.insert(meta::PIPELINE_ID, p.id.to_string());
    md.insert(meta::STATUS, p.status.as_str());
    if let Some(group) = p.detailed_status.as_ref().and_then(|d| d.group.as_deref()) {
        if group != p.status.as_str() {
            md.insert(meta::DETAILED_STATUS, group);
        }
    }
    if let Some(reason) = p.status.reason() {
        md.insert(meta::REASON, reason);
    }
    if p.status == PipelineStatus::Manual {
        md.insert(meta::BLOCKED, "true");
    }
    StatusReport::new(p.status.status()).with_metadata(md)
}

#[async_trait]
impl BuildRunner for GitlabRunner {
    fn name(&self) -> &'static str {
        "gitlab"
    }

    async fn trigger(&self, req: &TriggerRequest) -> Result<RunnerRef, RunnerError> {
        req.validate()
            .map_err(|e| RunnerError::InvalidRequest(e.to_string()))?;
        let _serialized = self.book.lock(&req.build_id).await;
        self.trigger_locked(req).await
    }

    async fn status(&self, handle: &BuildHandle) -> Result<StatusReport, RunnerError> {
        let (_, p) = self.resolve_with(&self.client, handle).await?;
        Ok(status_report(&p))
    }

    async fn cancel(&self, handle: &BuildHandle) -> Result<(), RunnerError> {
        let (project, p) = self.resolve_with(&self.client, handle).await?;
        if p.status.status().is_terminal() {
            return Ok(());
        }
        match self.client.cancel_pipeline(&project, p.id).await {
            Ok(_) => Ok(()),
            Err(
                e @ GitlabError::Api {
                    status: 400..=499, ..
                },
            ) if !e.is_not_found() => {
                // Not cancelable: fine if it ended meanwhile, an error otherwise.
                let now = self.client.get_pipeline(&project, p.id).await?;
                if now.status.status().is_terminal() {
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
        let (project, pipeline) = self.resolve_with(&client, handle).await?;
        let source = PipelineLogs {
            client,
            project,
            pipeline: pipeline.id,
            max_bytes: self.config.max_log_bytes,
            bytes_streamed: 0,
            steps: Steps::default(),
        };
        let follower = LogFollower::new(source, pipeline, self.config.log_poll);
        Ok(self.followers.join_or_start(&handle.build_id, follower))
    }
}

/// A pipeline's job traces, read as they grow until the pipeline is
/// terminal or its log reached `max_bytes`.
struct PipelineLogs {
    client: Client,
    project: String,
    pipeline: u64,
    max_bytes: u64,
    /// Trace bytes read so far, all jobs together.
    bytes_streamed: u64,
    /// Jobs by id, with how far their traces were read.
    steps: Steps<u64, JobRead>,
}

#[async_trait]
impl LogSource for PipelineLogs {
    type Build = Pipeline;
    type Error = GitlabError;

    async fn reread(&mut self) -> Result<Pipeline, GitlabError> {
        self.client.get_pipeline(&self.project, self.pipeline).await
    }

    async fn read(&mut self, pipeline: &Pipeline) -> Result<Batch, GitlabError> {
        let terminal = pipeline.status.status().is_terminal();
        let now = Utc::now();
        let mut jobs = self.client.list_jobs(&self.project, self.pipeline).await?;
        jobs.sort_by_key(|j| j.id);
        let mut out = Vec::new();
        for job in jobs.iter().filter(|j| j.has_started()) {
            let start = job
                .started_at
                .as_deref()
                .and_then(parse_vendor_time)
                .unwrap_or(now);
            let step = self.steps.step(job.id, || JobRead::new(start));
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
                .job_trace_since(&self.project, job.id, step.state.bytes_read, allowed)
                .await?;
            let over = chunk.bytes.len() as u64 > allowed;
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
                out.push(truncation_line(step.id, self.max_bytes, "GitLab", now));
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
    use stitch_core::{BuildStatus, ChangeSet};

    fn runner(config: GitlabConfig) -> GitlabRunner {
        let client = Client::new(
            reqwest::Client::new(),
            "http://127.0.0.1:1/api/v4",
            "glpat-x",
            std::sync::Arc::new(crate::http_budget::RequestBudget::new(Default::default())),
            crate::http_retry::RetryPolicy::none(),
        )
        .unwrap();
        GitlabRunner::new(client, config)
    }

    #[test]
    fn create_body_carries_every_stitch_variable_and_stitch_wins() {
        let mut config = GitlabConfig::new("group/app", "main");
        config.variables = BTreeMap::from([
            ("DEPLOY".to_string(), "no".to_string()),
            ("STITCH_QUEUE".to_string(), "forged".to_string()),
        ]);
        let r = runner(config);
        let req = TriggerRequest::new(
            BuildId::new(),
            "ci",
            ChangeSet::new(vec!["b1".into()], vec!["h1".into(), "h2".into()]),
        )
        .with_metadata(BuildMetadata::new().with("ticket", "T-1"))
        .with_job_env(BTreeMap::from([
            ("STITCH_JOB_TOKEN".to_string(), "secret".to_string()),
            ("STITCH_SERVER".to_string(), "http://stitch".to_string()),
        ]));
        let body = r.create_body(&req);
        assert_eq!(body.git_ref, "main");
        let vars = body.variable_map();
        assert!(body.variables.iter().all(|v| v.variable_type == "env_var"));
        assert_eq!(vars["STITCH_BUILD_ID"], req.build_id.to_string());
        assert_eq!(vars["STITCH_QUEUE"], "ci", "stitch's variables win");
        assert_eq!(vars["STITCH_BASE"], r#"["b1"]"#);
        assert_eq!(vars["STITCH_HEAD"], r#"["h1","h2"]"#);
        assert_eq!(vars["STITCH_METADATA"], r#"{"ticket":"T-1"}"#);
        assert_eq!(vars["STITCH_JOB_TOKEN"], "secret");
        assert_eq!(vars["STITCH_SERVER"], "http://stitch");
        assert_eq!(vars["DEPLOY"], "no");
        assert_eq!(vars[VAR_PIPELINE_NAME], format!("stitch {}", req.build_id));
    }

    #[test]
    fn reports_carry_status_reason_and_block() {
        let p: Pipeline = serde_json::from_value(serde_json::json!({
            "id": 99, "status": "manual", "web_url": "https://gitlab.example/g/app/-/pipelines/99",
            "detailed_status": {"group": "manual", "label": "manual action"}
        }))
        .unwrap();
        let r = status_report(&p);
        assert_eq!(r.status, BuildStatus::Running);
        assert_eq!(r.metadata.get(meta::BLOCKED), Some("true"));
        assert_eq!(r.metadata.get(meta::PIPELINE_ID), Some("99"));
        assert_eq!(
            r.metadata.get(meta::DETAILED_STATUS),
            None,
            "same as the status"
        );
        assert!(r.metadata.get(meta::REASON).unwrap().contains("manual"));
        assert_eq!(
            r.metadata.get("url"),
            Some("https://gitlab.example/g/app/-/pipelines/99")
        );
        let warned: Pipeline = serde_json::from_value(serde_json::json!({
            "id": 1, "status": "success", "detailed_status": {"group": "success-with-warnings"}
        }))
        .unwrap();
        let r = status_report(&warned);
        assert_eq!(r.status, BuildStatus::Succeeded);
        assert_eq!(
            r.metadata.get(meta::DETAILED_STATUS),
            Some("success-with-warnings")
        );
        assert_eq!(r.metadata.get(meta::REASON), None);
    }
}
