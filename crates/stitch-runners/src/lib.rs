//! stitch's build runners, each behind [`stitch_core::BuildRunner`]:
//!
//! - [`noop`]: succeeds at once (baselines, wiring tests).
//! - [`fake`]: a simulated CI with realistic timing and logs, outcome chosen
//!   by markers in change URIs (the zero-config default).
//! - [`local`]: runs a shell command per build as a real child process.
//! - [`buildkite`]: builds on Buildkite pipelines (REST API v2).
//! - [`github`]: builds as GitHub Actions workflow runs (REST API).
//! - [`gitlab`]: builds as GitLab CI pipelines (REST API v4).
//! - [`jenkins`]: builds as runs of a parameterised Jenkins job.
//!
//! Each runner with settings has a `section` module: its table of
//! `stitch.toml` (`[queues.NAME.local]`, …), read by `stitch-server`.
//!
//! What the vendor runners share (a new vendor plugs into these seams):
//! [`http_error`] (what a call fails with: one error type over the
//! vendor's answer details), [`http_retry`] (the retry policy they are
//! given), [`http_budget`] (the request budget of one rate-limit scope),
//! [`http_util`] (transport messages, pagination, URLs), [`log_follower`]
//! (following a build's log as it grows, per viewer or shared),
//! [`timed_lines`] (raw job logs as timed lines, over the vendor's line
//! stamps), [`trigger_book`] (which provider ref each build was triggered
//! as, one trigger at a time per build) and [`signature`] (webhook HMACs).
//! [`conformance`] is the suite every runner passes; [`RunnerKind`] names
//! the runners a configuration may choose.
#![forbid(unsafe_code)]

pub mod buildkite;
pub mod conformance;
pub mod fake;
pub mod github;
pub mod gitlab;
pub mod http_budget;
pub mod http_error;
mod http_metrics;
pub mod http_retry;
pub mod http_util;
pub mod jenkins;
pub mod local;
pub mod log_follower;
pub mod noop;
pub mod signature;
pub mod timed_lines;
pub mod trigger_book;

use std::fmt;
use std::str::FromStr;

pub use buildkite::{BuildkiteConfig, BuildkiteRunner};
pub use fake::{FakeConfig, FakeConfigError, FakeRunner};
pub use github::{GithubConfig, GithubRunner};
pub use gitlab::{GitlabConfig, GitlabRunner};
pub use jenkins::{JenkinsConfig, JenkinsRunner};
pub use local::{LocalConfig, LocalConfigError, LocalRunner};
pub use noop::NoopRunner;

/// The runners a queue can be configured with (`runner = "…"` in
/// `stitch.toml`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunnerKind {
    /// [`NoopRunner`].
    Noop,
    /// [`FakeRunner`].
    Fake,
    /// [`LocalRunner`].
    Local,
    /// [`BuildkiteRunner`].
    Buildkite,
    /// [`GithubRunner`].
    Github,
    /// [`GitlabRunner`].
    Gitlab,
    /// [`JenkinsRunner`].
    Jenkins,
}

impl RunnerKind {
    /// Every runner kind, in the order help texts list them.
    pub const ALL: [RunnerKind; 7] = [
        RunnerKind::Noop,
        RunnerKind::Fake,
        RunnerKind::Local,
        RunnerKind::Buildkite,
        RunnerKind::Github,
        RunnerKind::Gitlab,
        RunnerKind::Jenkins,
    ];

    /// The configuration name (`runner = "…"`).
    pub fn as_str(self) -> &'static str {
        match self {
            RunnerKind::Noop => "noop",
            RunnerKind::Fake => "fake",
            RunnerKind::Local => "local",
            RunnerKind::Buildkite => "buildkite",
            RunnerKind::Github => "github",
            RunnerKind::Gitlab => "gitlab",
            RunnerKind::Jenkins => "jenkins",
        }
    }
}

impl fmt::Display for RunnerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A runner name that is not one of [`RunnerKind::ALL`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown runner {name:?}; valid runners are: {}", valid_runner_names())]
pub struct UnknownRunnerError {
    /// The name that was given.
    pub name: String,
}

fn valid_runner_names() -> String {
    RunnerKind::ALL
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl FromStr for RunnerKind {
    type Err = UnknownRunnerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_runner_name(s)
    }
}

/// Parse a configured runner name (exact, lower-case).
pub fn parse_runner_name(name: &str) -> Result<RunnerKind, UnknownRunnerError> {
    RunnerKind::ALL
        .into_iter()
        .find(|k| k.as_str() == name)
        .ok_or_else(|| UnknownRunnerError {
            name: name.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_names_parse() {
        for k in RunnerKind::ALL {
            assert_eq!(parse_runner_name(k.as_str()), Ok(k));
            assert_eq!(k.to_string().parse::<RunnerKind>(), Ok(k));
        }
    }

    #[test]
    fn unknown_runner_lists_the_valid_names() {
        let err = parse_runner_name("travis").unwrap_err();
        assert_eq!(err.name, "travis");
        assert!(
            err.to_string()
                .starts_with(r#"unknown runner "travis"; valid runners are: noop, fake, local, buildkite, github, gitlab, jenkins"#),
            "{err}"
        );
        assert!(err.to_string().contains("jenkins"), "{err}");
        assert!(parse_runner_name("Fake").is_err());
        assert!(parse_runner_name("").is_err());
    }
}
