//! `[queues.NAME.jenkins]`: the controller URL, the job path, the user and
//! that its token variable holds one, the parameters, budget and timings.

use stitch_runners::jenkins::{JenkinsSection, JobPath};

use super::super::problems::{with, Problems, Seg};
use super::{env_is_set, is_http_url, validate_nonzero, validate_rate_limit, Env};

pub(super) fn validate(key: &[Seg], jk: &JenkinsSection, problems: &mut Problems, env: Env<'_>) {
    if !is_http_url(&jk.url) || url_has_credentials(&jk.url) {
        problems.report(
            with(key, &["url"]),
            "must be an http:// or https:// URL without credentials (they go in user and token_env)",
        );
    }
    if let Err(e) = JobPath::parse(&jk.job) {
        problems.report(with(key, &["job"]), e);
    }
    if jk.user.trim().is_empty() || jk.user.contains(':') {
        problems.report(
            with(key, &["user"]),
            "must name the Jenkins user the API token belongs to (no ':')",
        );
    }
    if !env_is_set(env, &jk.token_env) {
        problems.report(
            with(key, &["token_env"]),
            format!(
                "environment variable {:?} is unset or empty; it must hold the user's Jenkins API token",
                jk.token_env
            ),
        );
    }
    for name in jk.parameters.keys() {
        if name.trim().is_empty() {
            problems.report(
                with(key, &["parameters"]),
                "parameter names must not be empty",
            );
        } else if name.starts_with("STITCH_") {
            problems.report(
                with(key, &["parameters", name]),
                "STITCH_* parameters are set by stitch; choose another name",
            );
        }
    }
    validate_rate_limit(key, &jk.rate_limit, problems);
    validate_nonzero(
        key,
        &[
            ("request_timeout", jk.request_timeout),
            ("log_poll", jk.log_poll),
        ],
        problems,
    );
    if jk.max_log_bytes == 0 {
        problems.report(with(key, &["max_log_bytes"]), "must be at least 1");
    }
    if jk.lookup_depth == 0 {
        problems.report(with(key, &["lookup_depth"]), "must be at least 1");
    }
}

/// Whether `url` carries `user:password@` (it would reach logs and errors).
fn url_has_credentials(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    authority.contains('@')
}
