//! `JenkinsRunner`: the `BuildRunner` contract over [`Client`].
//!
//! - **trigger**: `buildWithParameters` with the `STITCH_*` parameters
//!   (the job must define them: Jenkins drops parameters a job does not
//!   declare). The ref is the queue item Jenkins answered with; the build
//!   number is learnt later from the item's `executable`. Before
//!   triggering, the runner looks the id up (an in-process cache, then the
//!   queue and the job's builds by their `STITCH_BUILD_ID` parameter,
//!   skipped only on a request's `first_attempt`); a trigger whose outcome
//!   is unknown (timeout, reset, 5xx, an answer without a queue item) is
//!   followed by the same lookup, repeated for `lookup_settle`, and only an
//!   empty answer triggers again. Concurrent triggers of one id in this
//!   process are serialized.
//! - **status / cancel / logs** resolve the build: the cached build
//!   number, else the ref's queue item (still waiting, cancelled, or the
//!   build it became), else — the item forgotten, or no ref after a
//!   restart — the lookup. Each checks the build carries the handle's id.
//! - **status**: a waiting item is `accepted` (`jenkins_stuck` and
//!   `jenkins_why` say why it waits), a cancelled one `cancelled`; a build
//!   is `running` while `building`, then its result's status (see
//!   [`BuildResult::status`]: `UNSTABLE` is `failed`).
//! - **cancel**: a waiting item is cancelled in the queue (and the build it
//!   became meanwhile is stopped); a running build is stopped. Either is
//!   confirmed by the next poll (`ABORTED` → `cancelled`).
//! - **logs**: the console, read with the progressive-text API from the
//!   offset Jenkins gave last (`X-Text-Size`), never downloaded twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use stitch_core::metadata::keys;
use stitch_core::{
    async_trait, BuildHandle, BuildId, BuildMetadata, BuildRunner, LogLine, LogStream,
    OutputStream, RunnerError, RunnerRef, StatusReport, StepKind, TriggerRequest,
};

use super::client::{Client, JobPath};
use super::error::JenkinsError;
use super::logs::LineSplitter;
use super::model::{Build, QueueItem, PARAM_BUILD_ID};
use crate::http_budget::Priority;
use crate::log_follower::{Batch, LogFollower, LogSource, SharedLogs};
use crate::trigger_book::{BuildCache, TriggerBook};

/// Triggers attempted for one trigger call before the error goes back to
/// the caller (whose retries take over; each later one looks up first).
const TRIGGER_ROUNDS: u32 = 3;
/// How far before a build id was minted a lookup searches (clock skew).
const LOOKUP_SLACK: chrono::Duration = chrono::Duration::minutes(10);
/// Pause between recovery lookups while a lost trigger settles.
const SETTLE_STEP: Duration = Duration::from_millis(250);
/// Builds read per page of a lookup.
const LOOKUP_PAGE: u32 = 100;

/// Default [`JenkinsConfig::max_log_bytes`]: 16 MiB.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 16 * 1024 * 1024;
/// Default [`JenkinsConfig::lookup_depth`].
pub const DEFAULT_LOOKUP_DEPTH: u32 = 1000;

/// Runner metadata keys (beside `url`).
pub mod meta {
    /// The queue item the trigger made.
    pub const QUEUE_ITEM: &str = "jenkins_queue_item";
    /// The build number, once the item left the queue.
    pub const NUMBER: &str = "jenkins_number";
    /// The build's raw `result` (also while building, when a pipeline set
    /// it early).
    pub const RESULT: &str = "jenkins_result";
    /// `"true"` while a queue item can never be taken by an executor.
    pub const STUCK: &str = "jenkins_stuck";
    /// Why a queue item still waits, in Jenkins' words.
    pub const WHY: &str = "jenkins_why";
}

/// How one queue's builds run on Jenkins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JenkinsConfig {
    /// The job builds run as.
    pub job: JobPath,
    /// Extra build parameters; the `STITCH_*` ones win over them.
    pub parameters: BTreeMap<String, String>,
    /// How often a followed console is re-read.
    pub log_poll: Duration,
    /// How long a recovery lookup keeps looking for a build whose trigger
    /// answer was lost before triggering again.
    pub lookup_settle: Duration,
    /// The most console bytes streamed for one build.
    pub max_log_bytes: u64,
    /// The most of the job's newest builds a lookup reads.
    pub lookup_depth: u32,
}

impl JenkinsConfig {
    /// Defaults: no extra parameters, console re-read every 2 s, lookups
    /// settle for 2 s, logs capped at 16 MiB, lookups read at most the
    /// 1,000 newest builds.
    pub fn new(job: JobPath) -> Self {
        Self {
            job,
            parameters: BTreeMap::new(),
            log_poll: Duration::from_secs(2),
            lookup_settle: Duration::from_secs(2),
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
            lookup_depth: DEFAULT_LOOKUP_DEPTH,
        }
    }
}

/// Where a stitch build is at Jenkins.
#[derive(Clone, Debug)]
pub enum Progress {
    /// Still a queue item (waiting, or cancelled before it ran).
    Queued(QueueItem),
    /// A build (running or finished).
    Built(Build),
}

/// The Jenkins runner. See the module docs.
pub struct JenkinsRunner {
    inner: Arc<Inner>,
    followers: SharedLogs,
}

/// What the runner and its console followers share: the client, the
/// configuration and what this process learnt of its builds.
struct Inner {
    client: Client,
    config: JenkinsConfig,
    /// Refs of builds triggered or found by this process.
    book: TriggerBook,
    /// Build numbers learnt from queue items (which Jenkins forgets).
    numbers: BuildCache<u64>,
}

impl std::fmt::Debug for JenkinsRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JenkinsRunner")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl JenkinsRunner {
    /// A runner for one queue's job.
    pub fn new(client: Client, config: JenkinsConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                client,
                config,
                book: TriggerBook::new(),
                numbers: BuildCache::new(),
            }),
            followers: SharedLogs::default(),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &JenkinsConfig {
        &self.inner.config
    }

    async fn trigger_locked(&self, req: &TriggerRequest) -> Result<RunnerRef, RunnerError> {
        let inner = &self.inner;
        if let Some(r) = inner.book.cached(&req.build_id) {
            return Ok(r);
        }
        if !req.first_attempt {
            if let Some(p) = inner.lookup(&inner.client, &req.build_id).await? {
                return Ok(inner.found(&req.build_id, &p));
            }
        }
        let parameters = inner.parameters(req);
        let mut last = None;
        for _ in 0..TRIGGER_ROUNDS {
            match inner
                .client
                .build_with_parameters(&inner.config.job, &parameters)
                .await
            {
                Ok(queue_id) => return Ok(inner.found_item(&req.build_id, queue_id)),
                Err(e) if e.outcome_unknown() => {
                    tracing::info!(build = %req.build_id, error = %e, "trigger outcome unknown; looking the build up before triggering again");
                    if let Some(p) = inner.lookup_settled(&req.build_id).await? {
                        return Ok(inner.found(&req.build_id, &p));
                    }
                    last = Some(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(last
            .map(RunnerError::from)
            .unwrap_or_else(|| RunnerError::Internal("no trigger attempted".into())))
    }
}

impl Inner {
    /// The ref of queue item `queue_id`, remembered for `id`.
    fn found_item(&self, id: &BuildId, queue_id: u64) -> RunnerRef {
        let mut r = RunnerRef::new(queue_id.to_string())
            .with_data("job", self.config.job.full_name().to_string());
        if let Ok(url) = self.client.job_url(&self.config.job) {
            r = r.with_url(url.to_string());
        }
        self.book.remember(id, &r);
        r
    }

    /// The ref of a build found by lookup (its queue item, and its number).
    fn found_build(&self, id: &BuildId, build: &Build) -> RunnerRef {
        self.numbers.insert(id, build.number);
        let mut r = RunnerRef::new(build.queue_id.unwrap_or_default().to_string())
            .with_data("job", self.config.job.full_name().to_string())
            .with_data("number", build.number.to_string());
        if let Some(url) = &build.url {
            r = r.with_url(url.clone());
        }
        self.book.remember(id, &r);
        r
    }

    fn found(&self, id: &BuildId, progress: &Progress) -> RunnerRef {
        match progress {
            Progress::Queued(item) => self.found_item(id, item.id),
            Progress::Built(build) => self.found_build(id, build),
        }
    }

    /// The queue item or build carrying `STITCH_BUILD_ID = id`: the queue
    /// first, then the job's builds, newest first, back to a little before
    /// the id was minted (an item leaves the queue only to become a build,
    /// so reading in this order cannot miss one in passage). Several (made
    /// by something else) → the oldest build.
    async fn lookup(
        &self,
        client: &Client,
        id: &BuildId,
    ) -> Result<Option<Progress>, JenkinsError> {
        let job_path = client.job_url(&self.config.job)?.path().to_string();
        let queued = client.queue().await?.into_iter().find(|item| {
            item.stitch_build_id() == Some(id.as_str())
                && item
                    .task
                    .as_ref()
                    .and_then(|t| t.url.as_deref())
                    .is_none_or(|url| {
                        url.trim_end_matches('/')
                            .ends_with(job_path.trim_end_matches('/'))
                    })
        });
        if let Some(item) = queued {
            return Ok(Some(Progress::Queued(item)));
        }
        let oldest = (id.created_at() - LOOKUP_SLACK).timestamp_millis();
        let mut found: Option<Build> = None;
        let mut from = 0;
        while from < self.config.lookup_depth {
            let to = (from + LOOKUP_PAGE).min(self.config.lookup_depth);
            let page = client.list_builds(&self.config.job, from, to).await?;
            let full = page.len() as u32 == to - from;
            let mut older = false;
            for b in page {
                if b.timestamp.is_some_and(|t| t < oldest) {
                    older = true;
                }
                if b.stitch_build_id() == Some(id.as_str())
                    && found.as_ref().is_none_or(|f| b.number < f.number)
                {
                    found = Some(b);
                }
            }
            if !full || older {
                break;
            }
            from = to;
        }
        Ok(found.map(Progress::Built))
    }

    /// The lookup after a trigger with an unknown outcome: keeps looking
    /// for `lookup_settle` before concluding there is no build.
    async fn lookup_settled(&self, id: &BuildId) -> Result<Option<Progress>, JenkinsError> {
        let deadline = tokio::time::Instant::now() + self.config.lookup_settle;
        loop {
            if let Some(p) = self.lookup(&self.client, id).await? {
                return Ok(Some(p));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(SETTLE_STEP).await;
        }
    }

    /// The build parameters: the configured ones, the job environment
    /// (`STITCH_JOB_TOKEN`, `STITCH_SERVER`), then stitch's own.
    pub(crate) fn parameters(&self, req: &TriggerRequest) -> Vec<(String, String)> {
        let mut p: BTreeMap<String, String> = self.config.parameters.clone();
        p.extend(req.job_env.clone());
        p.insert(PARAM_BUILD_ID.into(), req.build_id.to_string());
        p.insert("STITCH_QUEUE".into(), req.queue.clone());
        p.insert("STITCH_BASE".into(), json(&req.changes.base));
        p.insert("STITCH_HEAD".into(), json(&req.changes.head));
        p.insert("STITCH_METADATA".into(), json(&req.metadata));
        p.into_iter().collect()
    }

    fn not_yours(&self, what: String, carried: Option<&str>, id: &BuildId) -> RunnerError {
        RunnerError::NotFound(format!(
            "{what} of Jenkins job {} carries {PARAM_BUILD_ID}={carried:?}, not {id} \
             (does the job declare the STITCH_* parameters?)",
            self.config.job.full_name()
        ))
    }

    /// Reads build `number`, checking it is `id`'s.
    async fn own_build(
        &self,
        client: &Client,
        id: &BuildId,
        number: u64,
    ) -> Result<Build, RunnerError> {
        let build = client.get_build(&self.config.job, number).await?;
        if build.stitch_build_id() != Some(id.as_str()) {
            return Err(self.not_yours(format!("build #{number}"), build.stitch_build_id(), id));
        }
        Ok(build)
    }

    /// Where `handle`'s build is now (see the module docs). `NotFound` when
    /// nothing carries its id.
    async fn resolve(
        &self,
        client: &Client,
        handle: &BuildHandle,
    ) -> Result<Progress, RunnerError> {
        let id = &handle.build_id;
        let r = handle.runner_ref.clone().or_else(|| self.book.cached(id));
        let number = self
            .numbers
            .get(id)
            .or_else(|| r.as_ref()?.data("number")?.parse().ok());
        if let Some(number) = number {
            match self.own_build(client, id, number).await {
                Ok(build) => return Ok(Progress::Built(build)),
                // A number that is not (or no longer) this build's: look
                // further, below.
                Err(RunnerError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        if let Some(r) = &r {
            let queue_id: u64 = r.id.parse().map_err(|_| {
                RunnerError::NotFound(format!(
                    "{:?} is not a Jenkins queue item (build {id})",
                    r.id
                ))
            })?;
            match client.queue_item(queue_id).await {
                Ok(item) => {
                    if item.stitch_build_id() != Some(id.as_str()) {
                        return Err(self.not_yours(
                            format!("queue item {queue_id}"),
                            item.stitch_build_id(),
                            id,
                        ));
                    }
                    return match &item.executable {
                        Some(exe) => {
                            self.numbers.insert(id, exe.number);
                            let build = self.own_build(client, id, exe.number).await?;
                            Ok(Progress::Built(build))
                        }
                        None => Ok(Progress::Queued(item)),
                    };
                }
                // Jenkins forgets items a while after they left the queue.
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        match self.lookup(client, id).await? {
            Some(p) => {
                self.found(id, &p);
                Ok(p)
            }
            None => Err(RunnerError::NotFound(format!(
                "no queue item or build of Jenkins job {} carries {PARAM_BUILD_ID}={id}",
                self.config.job.full_name()
            ))),
        }
    }
}

/// JSON text of string lists and maps (which always serialize).
fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// The status report of where a build is: the mapped status plus `url`,
/// `jenkins_queue_item`, `jenkins_number`, `jenkins_result`, and for a
/// waiting item `jenkins_why` / `jenkins_stuck`.
pub fn status_report(progress: &Progress) -> StatusReport {
    let mut md = BuildMetadata::new();
    match progress {
        Progress::Queued(item) => {
            md.insert(meta::QUEUE_ITEM, item.id.to_string());
            if let Some(url) = item.task.as_ref().and_then(|t| t.url.clone()) {
                md.insert(keys::URL, url);
            }
            if item.stuck {
                md.insert(meta::STUCK, "true");
            }
            if let Some(why) = item.why.as_deref().filter(|w| !w.is_empty()) {
                md.insert(meta::WHY, why);
            }
            StatusReport::new(item.status()).with_metadata(md)
        }
        Progress::Built(build) => {
            if let Some(url) = &build.url {
                md.insert(keys::URL, url.clone());
            }
            if let Some(q) = build.queue_id {
                md.insert(meta::QUEUE_ITEM, q.to_string());
            }
            md.insert(meta::NUMBER, build.number.to_string());
            if let Some(result) = &build.result {
                md.insert(meta::RESULT, result.clone());
            }
            StatusReport::new(build.status()).with_metadata(md)
        }
    }
}

#[async_trait]
impl BuildRunner for JenkinsRunner {
    fn name(&self) -> &'static str {
        "jenkins"
    }

    async fn trigger(&self, req: &TriggerRequest) -> Result<RunnerRef, RunnerError> {
        req.validate()
            .map_err(|e| RunnerError::InvalidRequest(e.to_string()))?;
        let _serialized = self.inner.book.lock(&req.build_id).await;
        self.trigger_locked(req).await
    }

    async fn status(&self, handle: &BuildHandle) -> Result<StatusReport, RunnerError> {
        let inner = &self.inner;
        let progress = inner.resolve(&inner.client, handle).await?;
        Ok(status_report(&progress))
    }

    async fn cancel(&self, handle: &BuildHandle) -> Result<(), RunnerError> {
        let Inner { client, config, .. } = &*self.inner;
        let job = &config.job;
        match self.inner.resolve(client, handle).await? {
            Progress::Built(build) if build.status().is_terminal() => Ok(()),
            Progress::Built(build) => Ok(client.stop_build(job, build.number).await?),
            Progress::Queued(item) if item.cancelled => Ok(()),
            Progress::Queued(item) => {
                match client.cancel_queue_item(item.id).await {
                    Ok(()) => {}
                    // No longer waiting: it left the queue meanwhile.
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
                // The item may have become a build while the cancel was
                // on its way: stop that one too.
                match self.inner.resolve(client, handle).await? {
                    Progress::Built(build) if !build.status().is_terminal() => {
                        Ok(client.stop_build(job, build.number).await?)
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    /// Viewers of one build share one follower (one read stream of the
    /// console), as for the other vendor runners.
    async fn logs(&self, handle: &BuildHandle) -> Result<LogStream, RunnerError> {
        if let Some(viewer) = self.followers.join(&handle.build_id) {
            return Ok(viewer);
        }
        let client = self.inner.client.with_priority(Priority::Logs);
        let progress = self.inner.resolve(&client, handle).await?;
        let source = Console {
            inner: self.inner.clone(),
            client,
            handle: handle.clone(),
            offset: 0,
            opened: false,
            splitter: LineSplitter::new(Utc::now()),
        };
        let follower = LogFollower::new(source, progress, self.inner.config.log_poll);
        Ok(self.followers.join_or_start(&handle.build_id, follower))
    }
}

/// A build's console, read as it grows until the build finished and
/// Jenkins said no more data comes, or `max_log_bytes` were read.
struct Console {
    inner: Arc<Inner>,
    /// The client at log priority.
    client: Client,
    handle: BuildHandle,
    /// The offset Jenkins said to read from next.
    offset: u64,
    opened: bool,
    splitter: LineSplitter,
}

fn step_name(config: &JenkinsConfig, build: &Build) -> String {
    build
        .full_display_name
        .clone()
        .unwrap_or_else(|| format!("{} #{}", config.job.full_name(), build.number))
}

#[async_trait]
impl LogSource for Console {
    type Build = Progress;
    type Error = RunnerError;

    async fn reread(&mut self) -> Result<Progress, RunnerError> {
        // The number learnt at the first read is cached: one request.
        self.inner.resolve(&self.client, &self.handle).await
    }

    async fn read(&mut self, progress: &Progress) -> Result<Batch, RunnerError> {
        let build = match progress {
            // Nothing runs yet; a cancelled item never will.
            Progress::Queued(item) => {
                return Ok(Batch {
                    lines: Vec::new(),
                    finished: item.cancelled,
                })
            }
            Progress::Built(build) => build,
        };
        let now = Utc::now();
        let name = step_name(&self.inner.config, build);
        let mut out = Vec::new();
        if !self.opened {
            self.opened = true;
            let started = build
                .timestamp
                .and_then(DateTime::from_timestamp_millis)
                .unwrap_or(now);
            out.push(LogLine::step_start(
                1,
                name.clone(),
                StepKind::User,
                None,
                started,
            ));
        }
        let allowed = self.inner.config.max_log_bytes.saturating_sub(self.offset);
        // One byte past the cap tells a log that outgrew it from one that
        // just reached it.
        let chunk = self
            .client
            .console_since(
                &self.inner.config.job,
                build.number,
                self.offset,
                allowed.saturating_add(1),
            )
            .await?;
        let over = chunk.bytes.len() as u64 > allowed;
        let take = chunk
            .bytes
            .len()
            .min(usize::try_from(allowed).unwrap_or(usize::MAX));
        self.offset = if over {
            self.offset + take as u64
        } else {
            chunk.next
        };
        for line in self.splitter.push(&chunk.bytes[..take]) {
            out.push(LogLine::data(1, OutputStream::Stdout, line.text, now));
        }
        if over {
            out.push(LogLine::data(
                1,
                OutputStream::Stderr,
                format!(
                    "[stitch] log truncated: this build's console passed the {}-byte limit \
                     (max_log_bytes); the rest is on Jenkins",
                    self.inner.config.max_log_bytes
                ),
                now,
            ));
            return Ok(Batch {
                lines: out,
                finished: true,
            });
        }
        let finished = !build.building && !chunk.more;
        if finished {
            if let Some(last) = self.splitter.finish() {
                out.push(LogLine::data(1, OutputStream::Stdout, last.text, now));
            }
            let ended = match (build.timestamp, build.duration) {
                (Some(t), Some(d)) if d > 0 => DateTime::from_timestamp_millis(t + d),
                _ => None,
            };
            out.push(LogLine::step_end(
                1,
                name,
                StepKind::User,
                ended.unwrap_or(now),
            ));
        }
        Ok(Batch {
            lines: out,
            finished,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stitch_core::{BuildStatus, ChangeSet};

    fn runner(parameters: BTreeMap<String, String>) -> JenkinsRunner {
        let client = Client::new(
            reqwest::Client::new(),
            "http://127.0.0.1:1",
            super::super::client::Credentials::new("stitch", "t").unwrap(),
            Arc::new(crate::http_budget::RequestBudget::new(Default::default())),
            crate::http_retry::RetryPolicy::none(),
        )
        .unwrap();
        let mut config = JenkinsConfig::new(JobPath::parse("team/app").unwrap());
        config.parameters = parameters;
        JenkinsRunner::new(client, config)
    }

    #[test]
    fn parameters_carry_the_build_and_stitch_wins() {
        let r = runner(BTreeMap::from([
            ("DEPLOY".to_string(), "no".to_string()),
            ("STITCH_QUEUE".to_string(), "spoofed".to_string()),
        ]));
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
        let p: BTreeMap<_, _> = r.inner.parameters(&req).into_iter().collect();
        assert_eq!(p["STITCH_BUILD_ID"], req.build_id.to_string());
        assert_eq!(p["STITCH_QUEUE"], "ci");
        assert_eq!(p["STITCH_BASE"], r#"["b1"]"#);
        assert_eq!(p["STITCH_HEAD"], r#"["h1","h2"]"#);
        assert_eq!(p["STITCH_METADATA"], r#"{"ticket":"T-1"}"#);
        assert_eq!(p["STITCH_JOB_TOKEN"], "secret");
        assert_eq!(p["STITCH_SERVER"], "http://stitch");
        assert_eq!(p["DEPLOY"], "no");
    }

    #[test]
    fn reports_say_where_the_build_is() {
        let item: QueueItem = serde_json::from_value(serde_json::json!({
            "_class": "hudson.model.Queue$BuildableItem", "id": 12, "stuck": true,
            "why": "Waiting for next available executor", "actions": [],
            "task": {"name": "app", "url": "http://ci/job/team/job/app/"}
        }))
        .unwrap();
        let r = status_report(&Progress::Queued(item));
        assert_eq!(r.status, BuildStatus::Accepted);
        assert_eq!(r.metadata.get(meta::STUCK), Some("true"));
        assert_eq!(r.metadata.get(meta::QUEUE_ITEM), Some("12"));
        assert_eq!(
            r.metadata.get(meta::WHY),
            Some("Waiting for next available executor")
        );
        let build: Build = serde_json::from_value(serde_json::json!({
            "number": 4, "building": false, "result": "UNSTABLE", "queueId": 12,
            "url": "http://ci/job/team/job/app/4/"
        }))
        .unwrap();
        let r = status_report(&Progress::Built(build));
        assert_eq!(r.status, BuildStatus::Failed);
        assert_eq!(r.metadata.get(meta::RESULT), Some("UNSTABLE"));
        assert_eq!(r.metadata.get(meta::NUMBER), Some("4"));
        assert_eq!(r.metadata.get("url"), Some("http://ci/job/team/job/app/4/"));
    }
}
