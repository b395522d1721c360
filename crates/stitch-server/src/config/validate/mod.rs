//! The rules a configuration must keep beyond its types: the service's
//! ([`service`]), every queue's (here), and each runner's section (one
//! module per runner). Each rule reports at its key and stays quiet about
//! keys extraction already reported.

mod buildkite;
mod fake;
mod github;
mod gitlab;
mod jenkins;
mod local;
mod service;

use std::time::Duration;

use humantime_serde::re::humantime::format_duration;

use super::problems::{path, with, Problems, Seg};
use super::{Config, QueueConfig, RunnerSection};

/// How rules read the environment variables a configuration names.
pub(super) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Checks every rule.
pub(super) fn validate(config: &Config, problems: &mut Problems, env: Env<'_>) {
    service::validate(config, problems, env);
    if config.queues.is_empty() && !problems.is_broken(&path(&["queues"])) {
        problems.report(
            path(&["queues"]),
            "no queues defined; define a [queues.NAME] table, or leave [queues] out \
             for the built-in \"default\" queue",
        );
    }
    for (name, queue) in &config.queues {
        let base = path(&["queues", name]);
        if let Err(e) = stitch_core::validate_queue_name(name) {
            problems.report(base.clone(), e.to_string());
        }
        validate_runner(&base, &queue.runner, problems, env);
        validate_queue(&base, queue, problems);
    }
}

/// The runner's section, under its key (`queues.NAME.local`).
fn validate_runner(base: &[Seg], runner: &RunnerSection, problems: &mut Problems, env: Env<'_>) {
    let key = with(base, &[runner.kind().as_str()]);
    match runner {
        RunnerSection::Noop => {}
        RunnerSection::Fake(fake) => fake::validate(&key, fake, problems),
        RunnerSection::Local(local) => local::validate(&key, local, problems),
        RunnerSection::Buildkite(bk) => buildkite::validate(&key, bk, problems, env),
        RunnerSection::Github(gh) => github::validate(&key, gh, problems, env),
        RunnerSection::Gitlab(gl) => gitlab::validate(&key, gl, problems, env),
        RunnerSection::Jenkins(jk) => jenkins::validate(&key, jk, problems, env),
    }
}

/// A queue's own keys: concurrency, deadlines, poll and retry.
fn validate_queue(base: &[Seg], q: &QueueConfig, problems: &mut Problems) {
    if q.concurrency == Some(0) {
        problems.report(with(base, &["concurrency"]), "must be at least 1");
    }
    for (key, value) in [
        ("accepted_timeout", q.accepted_timeout),
        ("max_duration", q.max_duration),
    ] {
        if value == Some(Duration::ZERO) {
            problems.report(
                with(base, &[key]),
                "must be greater than zero (leave it out for no limit)",
            );
        }
    }
    for (key, value) in [("accepted", q.poll.accepted), ("running", q.poll.running)] {
        if value.is_zero() {
            problems.report(with(base, &["poll", key]), "must be greater than zero");
        }
    }
    let retry = &q.retry;
    if retry.max_attempts == 0 {
        problems.report(with(base, &["retry", "max_attempts"]), "must be at least 1");
    }
    if retry.initial.is_zero() {
        problems.report(
            with(base, &["retry", "initial"]),
            "must be greater than zero",
        );
    } else if retry.initial > retry.max && !problems.is_broken(&with(base, &["retry", "max"])) {
        problems.report(
            with(base, &["retry", "initial"]),
            format!(
                "{} is longer than retry.max ({})",
                format_duration(retry.initial),
                format_duration(retry.max)
            ),
        );
    }
}

/// A rule shared by the runners' sections: a vendor's account or project
/// name (a Buildkite slug, a GitHub owner or repository) is non-empty
/// letters, digits, '-', '_' and '.'.
fn is_vendor_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// A rule shared by the runners' sections: `url` is an http(s) URL.
fn is_http_url(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

/// A rule shared by the runners' sections: the environment variable `name`
/// holds something.
fn env_is_set(env: Env<'_>, name: &str) -> bool {
    env(name).is_some_and(|v| !v.trim().is_empty())
}

/// A rate limit the request budget can work with; the problem is reported
/// at the key it is about.
fn validate_rate_limit(
    key: &[Seg],
    limit: &stitch_runners::http_budget::RateLimitSection,
    problems: &mut Problems,
) {
    if let Some(problem) = limit.limit().problem() {
        let field = if limit.requests < 2 {
            "requests"
        } else {
            "window"
        };
        problems.report(with(key, &["rate_limit", field]), problem);
    }
}

/// Durations of a section that must not be zero.
fn validate_nonzero(key: &[Seg], fields: &[(&str, Duration)], problems: &mut Problems) {
    for (field, value) in fields {
        if value.is_zero() {
            problems.report(with(key, &[field]), "must be greater than zero");
        }
    }
}
