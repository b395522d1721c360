//! `[queues.NAME.gitlab]`: project, ref, URL, variables, budget, and that
//! the named environment variables hold secrets.

use stitch_runners::gitlab::{GitlabSection, RESERVED_VARIABLES};

use super::super::problems::{with, Problems, Seg};
use super::{env_is_set, is_http_url, validate_nonzero, validate_rate_limit, Env};

/// A project id (digits) or path (`group/sub/name`: segments of letters,
/// digits, '-', '_', '.', none empty).
fn is_project(s: &str) -> bool {
    !s.is_empty()
        && s.split('/').all(|seg| {
            !seg.is_empty()
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        })
}

/// A CI/CD variable name GitLab accepts: letters, digits and '_'.
fn is_variable_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub(super) fn validate(key: &[Seg], gl: &GitlabSection, problems: &mut Problems, env: Env<'_>) {
    if !is_project(&gl.project) {
        problems.report(
            with(key, &["project"]),
            format!(
                "{:?} is not a GitLab project id or path (group/name: letters, digits, '-', '_', '.')",
                gl.project
            ),
        );
    }
    if gl.git_ref.trim().is_empty() {
        problems.report(with(key, &["ref"]), "must not be empty");
    }
    if !is_http_url(&gl.api_url) {
        problems.report(
            with(key, &["api_url"]),
            "must be an http:// or https:// URL (https://HOST/api/v4)",
        );
    }
    if !env_is_set(env, &gl.token_env) {
        problems.report(
            with(key, &["token_env"]),
            format!(
                "environment variable {:?} is unset or empty; it must hold a GitLab API token",
                gl.token_env
            ),
        );
    }
    if let Some(trigger) = &gl.trigger_token_env {
        if !env_is_set(env, trigger) {
            problems.report(
                with(key, &["trigger_token_env"]),
                format!(
                    "environment variable {trigger:?} is unset or empty; it must hold a pipeline trigger token"
                ),
            );
        }
    }
    for name in gl.variables.keys() {
        let at = with(key, &["variables", name]);
        if RESERVED_VARIABLES.contains(&name.as_str()) || name.starts_with("STITCH_") {
            problems.report(
                at,
                "STITCH_* variables are stitch's own; choose another name",
            );
        } else if !is_variable_name(name) {
            problems.report(at, "a variable name is letters, digits and '_'");
        }
    }
    validate_rate_limit(key, &gl.rate_limit, problems);
    validate_nonzero(
        key,
        &[
            ("request_timeout", gl.request_timeout),
            ("log_poll", gl.log_poll),
        ],
        problems,
    );
    if gl.max_log_bytes == 0 {
        problems.report(with(key, &["max_log_bytes"]), "must be at least 1");
    }
    if let Some(w) = &gl.webhook {
        let webhook = with(key, &["webhook"]);
        if !env_is_set(env, &w.secret_env) {
            problems.report(
                with(&webhook, &["secret_env"]),
                format!(
                    "environment variable {:?} is unset or empty; it must hold the webhook's secret token",
                    w.secret_env
                ),
            );
        }
        validate_nonzero(&webhook, &[("poll", w.poll)], problems);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projects_and_variable_names() {
        for ok in ["42", "group/app", "g/sub.group/app-ci_2"] {
            assert!(is_project(ok), "{ok}");
        }
        for bad in [
            "",
            "/app",
            "group/",
            "group//app",
            "my group/app",
            "g/app?x",
        ] {
            assert!(!is_project(bad), "{bad}");
        }
        assert!(is_variable_name("DEPLOY_ENV"));
        assert!(!is_variable_name("DEPLOY-ENV"));
        assert!(!is_variable_name(""));
    }
}
