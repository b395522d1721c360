//! `GithubRunner`: the `BuildRunner` contract over [`Client`], one
//! repository workflow per queue.
//!
//! - **trigger** dispatches the workflow with the inputs `stitch_build_id`,
//!   `stitch_queue`, `stitch_base`, `stitch_head` and `stitch_metadata`
//!   (JSON strings) over the configured extra inputs (reserved keys win),
//!   within GitHub's input limits. The run id comes from the dispatch
//!   answer: API version 2022-11-28 asks for it with `return_run_details`
//!   (a server that refuses the flag, GHES before 3.21, is asked again
//!   without it, once per runner), later versions always return it. A 204
//!   (no details) is correlated by **lookup**: the workflow's runs of
//!   `workflow_dispatch` created since the build id was minted, whose
//!   `display_title` (the workflow's `run-name`) names the build id.
//! - **Never twice**: a dispatch whose outcome is unknown (timeout, reset,
//!   5xx) is followed by the lookup, repeated for `lookup_settle` (runs
//!   take seconds to be listed), and only an empty answer dispatches
//!   again. A 204 is never followed by a second dispatch in this process.
//!   A trigger that is not the build's first attempt (a redelivery after a
//!   crash) looks up before dispatching at all. Concurrent triggers of one
//!   id in this process are serialized.
//! - **status / cancel / logs** use the recorded ref (run id), refusing a
//!   ref minted for another build; without a ref they find the run by
//!   lookup. Cancel: 202 is done, 409 (completed) is a no-op.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use stitch_core::metadata::keys;
use stitch_core::{
    async_trait, BuildHandle, BuildId, BuildMetadata, BuildRunner, LogStream, RunnerError,
    RunnerRef, StatusReport, TriggerRequest,
};

use super::client::{Client, Repo, RunQuery};
use super::error::GithubError;
use super::logs::{parse_log, parse_time, step_end, step_start};
use super::model::API_VERSION_2022;
use super::model::{
    DispatchBody, Run, INPUT_BASE, INPUT_BUILD_ID, INPUT_HEAD, INPUT_METADATA, INPUT_QUEUE,
};
use crate::http_budget::Priority;
use crate::log_follower::{Batch, LogFollower, LogSource, Steps};
use crate::timed_lines::data_lines;
use crate::trigger_book::{BuildCache, TriggerBook};

/// Dispatches attempted for one trigger call before the error goes back to
/// the caller (whose retry budget takes over; later attempts look first).
const DISPATCH_ROUNDS: u32 = 3;
/// Pause between lookups while a dispatched run becomes visible.
const SETTLE_STEP: Duration = Duration::from_millis(250);
/// GitHub's cap on the total size of the inputs, characters.
pub const MAX_INPUT_CHARS: usize = 65_535;

/// Runner metadata keys (beside `url`).
pub mod meta {
    /// The workflow run id.
    pub const RUN_ID: &str = "github_run_id";
    /// The run attempt (re-runs keep the id and count up).
    pub const RUN_ATTEMPT: &str = "github_run_attempt";
    /// The raw run status.
    pub const STATUS: &str = "github_status";
    /// The raw conclusion, once completed.
    pub const CONCLUSION: &str = "github_conclusion";
}

/// Keys of the runner ref's `data`.
mod ref_data {
    pub const OWNER: &str = "owner";
    pub const REPO: &str = "repo";
    pub const BUILD_ID: &str = "build_id";
}

/// How one queue's builds run on GitHub Actions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GithubConfig {
    /// The repository.
    pub repo: Repo,
    /// Workflow file name (`stitch.yml`) or numeric id.
    pub workflow: String,
    /// Branch or tag the workflow runs on.
    pub git_ref: String,
    /// Extra workflow inputs; the reserved `stitch_*` inputs win over them.
    pub inputs: BTreeMap<String, String>,
    /// Most inputs a dispatch may carry (GitHub: 25; older GHES: 10).
    pub max_inputs: usize,
    /// How often a followed log re-reads the run's jobs.
    pub log_poll: Duration,
    /// How long a lookup keeps looking for a dispatched run.
    pub lookup_settle: Duration,
    /// How far before a build id was minted a lookup searches (clock skew
    /// between stitch and GitHub).
    pub lookup_slack: Duration,
}

impl GithubConfig {
    /// Defaults: no extra inputs, 25 inputs at most, logs re-read every
    /// 5 s, lookups settle for 10 s and search from 2 minutes before the
    /// build id was minted.
    pub fn new(
        owner: impl Into<String>,
        repo: impl Into<String>,
        workflow: impl Into<String>,
        git_ref: impl Into<String>,
    ) -> Self {
        Self {
            repo: Repo {
                owner: owner.into(),
                name: repo.into(),
            },
            workflow: workflow.into(),
            git_ref: git_ref.into(),
            inputs: BTreeMap::new(),
            max_inputs: 25,
            log_poll: Duration::from_secs(5),
            lookup_settle: Duration::from_secs(10),
            lookup_slack: Duration::from_secs(120),
        }
    }
}

/// What this process knows about a dispatch whose run it has not found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dispatched {
    /// GitHub answered 204: the run exists. Never dispatch again.
    Confirmed,
    /// The answer was lost: look before dispatching again.
    Unknown,
}

/// The GitHub Actions runner. See the module docs.
pub struct GithubRunner {
    client: Client,
    config: GithubConfig,
    /// Cleared once the server refused `return_run_details` (older GHES).
    run_details: AtomicBool,
    book: TriggerBook,
    dispatched: BuildCache<Dispatched>,
}

impl std::fmt::Debug for GithubRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GithubRunner")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// JSON text of string lists and maps (which always serialize).
fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

impl GithubRunner {
    /// A runner for one queue's workflow.
    pub fn new(client: Client, config: GithubConfig) -> Self {
        let run_details = client.api_version() == API_VERSION_2022;
        Self {
            client,
            config,
            run_details: AtomicBool::new(run_details),
            book: TriggerBook::new(),
            dispatched: BuildCache::new(),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &GithubConfig {
        &self.config
    }

    /// The client in use.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn remember(&self, id: &BuildId, r: &RunnerRef) {
        self.book.remember(id, r);
        self.dispatched.remove(id);
    }

    fn mark_dispatched(&self, id: &BuildId, how: Dispatched) {
        // A confirmed dispatch stays confirmed.
        self.dispatched.update(id, |old| match old {
            Some(Dispatched::Confirmed) => Dispatched::Confirmed,
            _ => how,
        });
    }

    fn runner_ref(&self, id: &BuildId, run_id: u64, url: Option<&str>) -> RunnerRef {
        let mut r = RunnerRef::new(run_id.to_string())
            .with_data(ref_data::OWNER, self.config.repo.owner.clone())
            .with_data(ref_data::REPO, self.config.repo.name.clone())
            .with_data(ref_data::BUILD_ID, id.to_string());
        if let Some(url) = url {
            r = r.with_url(url);
        }
        r
    }

    fn found(&self, id: &BuildId, run: &Run) -> RunnerRef {
        let r = self.runner_ref(id, run.id, run.html_url.as_deref());
        self.remember(id, &r);
        r
    }

    fn repo_of(&self, r: &RunnerRef) -> Repo {
        match (r.data(ref_data::OWNER), r.data(ref_data::REPO)) {
            (Some(owner), Some(name)) => Repo {
                owner: owner.to_string(),
                name: name.to_string(),
            },
            _ => self.config.repo.clone(),
        }
    }

    /// The run whose title names `id`, if GitHub lists one. Several (a
    /// duplicate made by something else) → the oldest, deterministically.
    async fn lookup(&self, id: &BuildId) -> Result<Option<Run>, GithubError> {
        let slack = chrono::Duration::from_std(self.config.lookup_slack)
            .unwrap_or_else(|_| chrono::Duration::minutes(2));
        let query = RunQuery {
            event: Some("workflow_dispatch".into()),
            created_from: Some(id.created_at() - slack),
            ..RunQuery::default()
        };
        let runs = self
            .client
            .list_runs(&self.config.repo, &self.config.workflow, &query)
            .await?;
        let mut matching: Vec<Run> = runs
            .into_iter()
            .filter(|r| r.names_build(id.as_str()))
            .collect();
        if matching.len() > 1 {
            tracing::warn!(build_id = %id, runs = matching.len(), "several GitHub runs name one build; using the oldest");
        }
        matching.sort_by_key(|r| r.id);
        Ok(matching.into_iter().next())
    }

    /// The lookup after a dispatch: keeps looking for `lookup_settle`.
    async fn lookup_settled(&self, id: &BuildId) -> Result<Option<Run>, GithubError> {
        let deadline = tokio::time::Instant::now() + self.config.lookup_settle;
        loop {
            if let Some(run) = self.lookup(id).await? {
                return Ok(Some(run));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(SETTLE_STEP).await;
        }
    }

    /// The dispatch inputs of `req`, checked against GitHub's limits.
    pub fn inputs(&self, req: &TriggerRequest) -> Result<BTreeMap<String, String>, RunnerError> {
        let mut inputs = self.config.inputs.clone();
        inputs.insert(INPUT_BUILD_ID.into(), req.build_id.to_string());
        inputs.insert(INPUT_QUEUE.into(), req.queue.clone());
        inputs.insert(INPUT_BASE.into(), json(&req.changes.base));
        inputs.insert(INPUT_HEAD.into(), json(&req.changes.head));
        inputs.insert(INPUT_METADATA.into(), json(&req.metadata));
        if inputs.len() > self.config.max_inputs {
            return Err(RunnerError::InvalidRequest(format!(
                "the dispatch would carry {} workflow inputs; GitHub accepts at most {} \
                 (5 are stitch's; remove extra inputs from the queue's github.inputs)",
                inputs.len(),
                self.config.max_inputs
            )));
        }
        let chars: usize = inputs
            .iter()
            .map(|(k, v)| k.chars().count() + v.chars().count())
            .sum();
        if chars > MAX_INPUT_CHARS {
            return Err(RunnerError::InvalidRequest(format!(
                "the workflow inputs total {chars} characters; GitHub accepts at most \
                 {MAX_INPUT_CHARS} (shorten the change lists or metadata, or pass them by reference)"
            )));
        }
        Ok(inputs)
    }

    async fn trigger_locked(&self, req: &TriggerRequest) -> Result<RunnerRef, RunnerError> {
        let id = &req.build_id;
        if let Some(r) = self.book.cached(id) {
            return Ok(r);
        }
        let inputs = self.inputs(req)?;
        let earlier = self.dispatched.get(id);
        if !req.first_attempt || earlier.is_some() {
            let found = if earlier.is_some() {
                self.lookup_settled(id).await?
            } else {
                self.lookup(id).await?
            };
            if let Some(run) = found {
                return Ok(self.found(id, &run));
            }
            if earlier == Some(Dispatched::Confirmed) {
                return Err(not_visible(id));
            }
        }
        let mut last = None;
        let mut rounds = 0;
        while rounds < DISPATCH_ROUNDS {
            rounds += 1;
            let flag = self.run_details.load(Ordering::Relaxed);
            let body = DispatchBody {
                git_ref: self.config.git_ref.clone(),
                inputs: inputs.clone(),
                return_run_details: flag.then_some(true),
            };
            match self
                .client
                .dispatch(&self.config.repo, &self.config.workflow, &body)
                .await
            {
                Ok(Some(details)) if details.workflow_run_id > 0 => {
                    let r =
                        self.runner_ref(id, details.workflow_run_id, details.html_url.as_deref());
                    self.remember(id, &r);
                    return Ok(r);
                }
                Ok(_) => {
                    // 204, or details without an id: the run exists; find it.
                    self.mark_dispatched(id, Dispatched::Confirmed);
                    return match self.lookup_settled(id).await? {
                        Some(run) => Ok(self.found(id, &run)),
                        None => Err(not_visible(id)),
                    };
                }
                Err(e) if flag && e.rejects_run_details() => {
                    // An older server: nothing was created; ask without the flag.
                    tracing::info!(error = %e, "the GitHub server refuses return_run_details; dispatching without it and finding runs by their run-name");
                    self.run_details.store(false, Ordering::Relaxed);
                    rounds -= 1;
                }
                Err(e) if e.outcome_unknown() => {
                    tracing::info!(build_id = %id, error = %e, "dispatch outcome unknown; looking for the run before dispatching again");
                    self.mark_dispatched(id, Dispatched::Unknown);
                    if let Some(run) = self.lookup_settled(id).await? {
                        return Ok(self.found(id, &run));
                    }
                    last = Some(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(last
            .map(RunnerError::from)
            .unwrap_or_else(|| RunnerError::Internal("no dispatch attempted".into())))
    }

    /// The run `handle` points at: by its ref (refusing another build's
    /// ref), else by lookup. `NotFound` when neither finds it.
    async fn resolve(&self, handle: &BuildHandle) -> Result<(Repo, Run), RunnerError> {
        let r = handle
            .runner_ref
            .clone()
            .or_else(|| self.book.cached(&handle.build_id));
        if let Some(r) = r {
            if let Some(owner) = r.data(ref_data::BUILD_ID) {
                if owner != handle.build_id.as_str() {
                    return Err(RunnerError::NotFound(format!(
                        "GitHub run {} belongs to build {owner}, not to {}",
                        r.id, handle.build_id
                    )));
                }
            }
            let run_id: u64 = r.id.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                RunnerError::NotFound(format!(
                    "{:?} is not a GitHub run id (build {})",
                    r.id, handle.build_id
                ))
            })?;
            let repo = self.repo_of(&r);
            let run = self.client.get_run(&repo, run_id).await?;
            return Ok((repo, run));
        }
        match self.lookup(&handle.build_id).await? {
            Some(run) => {
                self.found(&handle.build_id, &run);
                Ok((self.config.repo.clone(), run))
            }
            None => Err(RunnerError::NotFound(format!(
                "no run of {} workflow {} names build {} in its title",
                self.config.repo, self.config.workflow, handle.build_id
            ))),
        }
    }
}

fn not_visible(id: &BuildId) -> RunnerError {
    // Retryable: the next attempt looks again and never dispatches twice.
    RunnerError::Transport(format!(
        "the workflow was dispatched for build {id} but no run naming it is listed yet \
         (does the workflow's run-name include ${{{{ inputs.stitch_build_id }}}}?)"
    ))
}

/// The status report of a run: the mapped status plus `url`,
/// `github_run_id`, `github_run_attempt`, `github_status` and
/// `github_conclusion`.
pub fn status_report(run: &Run) -> StatusReport {
    let mut md = BuildMetadata::new();
    if let Some(url) = &run.html_url {
        md.insert(keys::URL, url.clone());
    }
    md.insert(meta::RUN_ID, run.id.to_string());
    if let Some(a) = run.run_attempt {
        md.insert(meta::RUN_ATTEMPT, a.to_string());
    }
    if let Some(s) = &run.status {
        md.insert(meta::STATUS, s.clone());
    }
    if let Some(c) = run.conclusion.as_ref().filter(|c| !c.is_empty()) {
        md.insert(meta::CONCLUSION, c.clone());
    }
    StatusReport::new(run.status()).with_metadata(md)
}

#[async_trait]
impl BuildRunner for GithubRunner {
    fn name(&self) -> &'static str {
        "github"
    }

    async fn trigger(&self, req: &TriggerRequest) -> Result<RunnerRef, RunnerError> {
        req.validate()
            .map_err(|e| RunnerError::InvalidRequest(e.to_string()))?;
        let _serialized = self.book.lock(&req.build_id).await;
        self.trigger_locked(req).await
    }

    async fn status(&self, handle: &BuildHandle) -> Result<StatusReport, RunnerError> {
        let (_, run) = self.resolve(handle).await?;
        Ok(status_report(&run))
    }

    async fn cancel(&self, handle: &BuildHandle) -> Result<(), RunnerError> {
        let (repo, run) = self.resolve(handle).await?;
        if run.status().is_terminal() {
            return Ok(());
        }
        match self.client.cancel_run(&repo, run.id).await {
            Ok(()) => Ok(()),
            // Completed meanwhile: nothing left to cancel.
            Err(e) if e.is_conflict() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn logs(&self, handle: &BuildHandle) -> Result<LogStream, RunnerError> {
        let (repo, run) = self.resolve(handle).await?;
        let source = RunLogs {
            // Log reads never spend the reserve dispatches, polls and
            // cancels need.
            client: self.client.with_priority(Priority::Logs),
            repo,
            run_id: run.id,
            steps: Steps::default(),
        };
        Ok(LogFollower::new(source, run, self.config.log_poll).into_stream())
    }
}

/// A run's job logs, each read once its job finished, until the run is
/// terminal.
struct RunLogs {
    client: Client,
    repo: Repo,
    run_id: u64,
    /// Jobs by id.
    steps: Steps<u64, ()>,
}

#[async_trait]
impl LogSource for RunLogs {
    type Build = Run;
    type Error = GithubError;

    async fn reread(&mut self) -> Result<Run, GithubError> {
        self.client.get_run(&self.repo, self.run_id).await
    }

    async fn read(&mut self, run: &Run) -> Result<Batch, GithubError> {
        let terminal = run.status().is_terminal();
        let jobs = self.client.list_jobs(&self.repo, self.run_id).await?;
        let now = Utc::now();
        let mut out = Vec::new();
        for job in &jobs {
            let started = job.started_at.is_some() || job.is_completed();
            if !started {
                continue;
            }
            let step = self.steps.step(job.id, || ());
            if step.closed {
                continue;
            }
            if !step.opened {
                step.opened = true;
                out.push(step_start(step.id, job, now));
            }
            if job.is_completed() || terminal {
                // Logs exist once a job is finished; a job that never ran
                // (cancelled while queued) has none.
                let raw = match self.client.job_log(&self.repo, job.id).await {
                    Ok(raw) => raw,
                    Err(e) if e.is_not_found() => String::new(),
                    Err(e) => return Err(e),
                };
                let start = job
                    .started_at
                    .as_deref()
                    .and_then(parse_time)
                    .unwrap_or(now);
                out.extend(data_lines(step.id, &parse_log(&raw, start)));
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
    use crate::github::auth::Credentials;
    use crate::http_budget::RequestBudget;
    use crate::http_retry::RetryPolicy;
    use stitch_core::ChangeSet;

    fn runner(config: GithubConfig, version: &str) -> GithubRunner {
        let client = Client::new(
            reqwest::Client::new(),
            "http://127.0.0.1:1",
            version,
            Credentials::token("t").unwrap(),
            std::sync::Arc::new(RequestBudget::new(Default::default())),
            RetryPolicy::none(),
        )
        .unwrap();
        GithubRunner::new(client, config)
    }

    #[test]
    fn reserved_inputs_win_and_limits_are_clear_errors() {
        let mut config = GithubConfig::new("acme", "app", "stitch.yml", "main");
        config.inputs = BTreeMap::from([
            ("environment".to_string(), "staging".to_string()),
            (INPUT_QUEUE.to_string(), "spoofed".to_string()),
        ]);
        let r = runner(config.clone(), API_VERSION_2022);
        let req = TriggerRequest::new(
            BuildId::new(),
            "ci",
            ChangeSet::new(vec!["b1".into()], vec!["h1".into(), "h2".into()]),
        )
        .with_metadata(BuildMetadata::new().with("ticket", "T-1"))
        .with_job_env(BTreeMap::from([(
            "STITCH_JOB_TOKEN".to_string(),
            "secret".to_string(),
        )]));
        let inputs = r.inputs(&req).unwrap();
        assert_eq!(inputs[INPUT_QUEUE], "ci");
        assert_eq!(inputs[INPUT_BUILD_ID], req.build_id.to_string());
        assert_eq!(inputs[INPUT_BASE], r#"["b1"]"#);
        assert_eq!(inputs[INPUT_HEAD], r#"["h1","h2"]"#);
        assert_eq!(inputs[INPUT_METADATA], r#"{"ticket":"T-1"}"#);
        assert_eq!(inputs["environment"], "staging");
        assert!(!inputs.values().any(|v| v.contains("secret")));

        config.max_inputs = 6;
        config.inputs.insert("another".to_string(), "x".to_string());
        let err = runner(config.clone(), API_VERSION_2022)
            .inputs(&req)
            .unwrap_err();
        assert!(
            matches!(&err, RunnerError::InvalidRequest(m) if m.contains("at most 6")),
            "{err}"
        );

        config.max_inputs = 25;
        config.inputs = BTreeMap::from([("big".to_string(), "x".repeat(MAX_INPUT_CHARS))]);
        let err = runner(config, API_VERSION_2022).inputs(&req).unwrap_err();
        assert!(
            matches!(&err, RunnerError::InvalidRequest(m) if m.contains("65535")),
            "{err}"
        );
    }

    #[test]
    fn run_details_are_asked_for_only_where_the_version_has_the_flag() {
        let c = GithubConfig::new("acme", "app", "stitch.yml", "main");
        assert!(runner(c.clone(), "2022-11-28")
            .run_details
            .load(Ordering::Relaxed));
        assert!(!runner(c, "2026-03-10").run_details.load(Ordering::Relaxed));
    }

    #[test]
    fn reports_carry_the_run() {
        let run: Run = serde_json::from_str(include_str!(
            "../../../stitch-fake-providers/tests/data/github/run_completed.json"
        ))
        .unwrap();
        let r = status_report(&run);
        assert_eq!(r.status, stitch_core::BuildStatus::Succeeded);
        let m = &r.metadata;
        assert_eq!(
            m.get("url"),
            Some("https://github.com/acme/app/actions/runs/9138410223")
        );
        assert_eq!(m.get(meta::RUN_ID), Some("9138410223"));
        assert_eq!(m.get(meta::RUN_ATTEMPT), Some("1"));
        assert_eq!(m.get(meta::STATUS), Some("completed"));
        assert_eq!(m.get(meta::CONCLUSION), Some("success"));
    }
}
