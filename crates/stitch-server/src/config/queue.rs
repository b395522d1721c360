//! `[queues.NAME]`: one build queue, its runner and that runner's section.
//!
//! In the file a queue names its runner (`runner = "local"`) and keeps the
//! runner's settings in a sub-table named after it (`[queues.NAME.local]`);
//! in memory the two are one value, [`RunnerSection`], so a queue cannot
//! hold settings its runner does not read. A new runner is a new variant
//! here, its section type next to the runner, and its validation module.

use std::time::Duration;

use serde::Deserialize;

use super::{
    BuildkiteSection, FakeSection, GithubSection, GitlabSection, JenkinsSection, LocalSection,
    RunnerKind,
};

/// A queue's runner with its section of `stitch.toml`.
#[derive(Clone, Debug, PartialEq)]
pub enum RunnerSection {
    Noop,
    /// `[queues.NAME.fake]`, defaults when absent.
    Fake(FakeSection),
    Local(LocalSection),
    Buildkite(BuildkiteSection),
    Github(GithubSection),
    Gitlab(GitlabSection),
    Jenkins(JenkinsSection),
}

impl RunnerSection {
    /// Which runner this is.
    pub fn kind(&self) -> RunnerKind {
        match self {
            RunnerSection::Noop => RunnerKind::Noop,
            RunnerSection::Fake(_) => RunnerKind::Fake,
            RunnerSection::Local(_) => RunnerKind::Local,
            RunnerSection::Buildkite(_) => RunnerKind::Buildkite,
            RunnerSection::Github(_) => RunnerKind::Github,
            RunnerSection::Gitlab(_) => RunnerKind::Gitlab,
            RunnerSection::Jenkins(_) => RunnerKind::Jenkins,
        }
    }
}

impl Default for RunnerSection {
    fn default() -> Self {
        RunnerSection::Fake(FakeSection::default())
    }
}

/// `[queues.NAME]`
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(try_from = "QueueTable")]
pub struct QueueConfig {
    /// `runner = "…"` and the runner's table.
    pub runner: RunnerSection,
    /// Builds running at once (local runner); the rest wait as accepted.
    pub concurrency: Option<u32>,
    /// A promised failure fails the build at once and cancels it.
    pub fail_fast: bool,
    /// Still accepted after this → cancel + failed.
    pub accepted_timeout: Option<Duration>,
    /// Not terminal after this → cancel + failed.
    pub max_duration: Option<Duration>,
    pub poll: PollConfig,
    pub retry: RetryConfig,
}

/// `[queues.NAME]` as the file writes it: the runner's name, and a table
/// for each runner. `runner_tables` reports the tables the runner does
/// not read, and a missing one, before this is read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct QueueTable {
    runner: RunnerKind,
    concurrency: Option<u32>,
    fail_fast: bool,
    #[serde(with = "humantime_serde")]
    accepted_timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    max_duration: Option<Duration>,
    poll: PollConfig,
    retry: RetryConfig,
    local: Option<LocalSection>,
    fake: Option<FakeSection>,
    buildkite: Option<BuildkiteSection>,
    github: Option<GithubSection>,
    gitlab: Option<GitlabSection>,
    jenkins: Option<JenkinsSection>,
}

impl Default for QueueTable {
    fn default() -> Self {
        Self {
            runner: RunnerKind::Fake,
            concurrency: None,
            fail_fast: false,
            accepted_timeout: None,
            max_duration: None,
            poll: PollConfig::default(),
            retry: RetryConfig::default(),
            local: None,
            fake: None,
            buildkite: None,
            github: None,
            gitlab: None,
            jenkins: None,
        }
    }
}

impl TryFrom<QueueTable> for QueueConfig {
    type Error = String;

    /// Keeps the runner's own table; the others were reported already.
    fn try_from(t: QueueTable) -> Result<Self, String> {
        let missing = || {
            format!(
                "runner {:?} needs its [queues.NAME.{0}] table",
                t.runner.as_str()
            )
        };
        let runner = match t.runner {
            RunnerKind::Noop => RunnerSection::Noop,
            RunnerKind::Fake => RunnerSection::Fake(t.fake.unwrap_or_default()),
            RunnerKind::Local => RunnerSection::Local(t.local.ok_or_else(missing)?),
            RunnerKind::Buildkite => RunnerSection::Buildkite(t.buildkite.ok_or_else(missing)?),
            RunnerKind::Github => RunnerSection::Github(t.github.ok_or_else(missing)?),
            RunnerKind::Gitlab => RunnerSection::Gitlab(t.gitlab.ok_or_else(missing)?),
            RunnerKind::Jenkins => RunnerSection::Jenkins(t.jenkins.ok_or_else(missing)?),
        };
        Ok(Self {
            runner,
            concurrency: t.concurrency,
            fail_fast: t.fail_fast,
            accepted_timeout: t.accepted_timeout,
            max_duration: t.max_duration,
            poll: t.poll,
            retry: t.retry,
        })
    }
}

/// `poll = { accepted = "5s", running = "2s" }`: delay between status polls.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PollConfig {
    #[serde(with = "humantime_serde")]
    pub accepted: Duration,
    #[serde(with = "humantime_serde")]
    pub running: Duration,
}

impl Default for PollConfig {
    fn default() -> Self {
        Self {
            accepted: Duration::from_secs(5),
            running: Duration::from_secs(2),
        }
    }
}

/// `retry = { max_attempts = 10, initial = "1s", max = "5m" }`: trigger and
/// status errors the runner reports as retryable.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 10,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
        }
    }
}
