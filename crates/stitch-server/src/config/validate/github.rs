//! `[queues.NAME.github]`: names, URL, exactly one way to authenticate,
//! the input limits, and that the named environment variables and key
//! file hold something.

use stitch_runners::github::{GithubSection, RESERVED_INPUTS};

use super::super::problems::{with, Problems, Seg};
use super::{env_is_set, is_http_url, is_vendor_name, validate_nonzero, validate_rate_limit, Env};

pub(super) fn validate(key: &[Seg], gh: &GithubSection, problems: &mut Problems, env: Env<'_>) {
    for (field, value) in [("owner", &gh.owner), ("repo", &gh.repo)] {
        if !is_vendor_name(value) {
            problems.report(
                with(key, &[field]),
                format!("{value:?} is not a GitHub name (letters, digits, '-', '_', '.')"),
            );
        }
    }
    if gh.workflow.trim().is_empty() || gh.workflow.contains('/') {
        problems.report(
            with(key, &["workflow"]),
            "must be the workflow's file name (stitch.yml) or numeric id",
        );
    }
    if gh.git_ref.trim().is_empty() {
        problems.report(with(key, &["ref"]), "must not be empty");
    }
    if !is_http_url(&gh.api_url) {
        problems.report(
            with(key, &["api_url"]),
            "must be an http:// or https:// URL",
        );
    }
    let version_ok = gh.api_version.len() == 10
        && chrono::NaiveDate::parse_from_str(&gh.api_version, "%Y-%m-%d").is_ok();
    if !version_ok {
        problems.report(
            with(key, &["api_version"]),
            format!(
                "{:?} is not a GitHub API version (a date like 2022-11-28)",
                gh.api_version
            ),
        );
    }
    validate_credentials(key, gh, problems, env);
    validate_inputs(key, gh, problems);
    validate_rate_limit(key, &gh.rate_limit, problems);
    validate_nonzero(
        key,
        &[
            ("request_timeout", gh.request_timeout),
            ("log_poll", gh.log_poll),
        ],
        problems,
    );
}

/// A token, or the three keys of a GitHub App, not both; and that they hold
/// something.
fn validate_credentials(key: &[Seg], gh: &GithubSection, problems: &mut Problems, env: Env<'_>) {
    let app = [
        gh.app_id.is_some(),
        gh.private_key_file.is_some(),
        gh.installation_id.is_some(),
    ];
    match (&gh.token_env, app) {
        (Some(_), [false, false, false]) | (None, [true, true, true]) => {}
        (None, [false, false, false]) => problems.report(
            with(key, &["token_env"]),
            "missing; set token_env, or app_id, private_key_file and installation_id",
        ),
        (Some(_), _) => problems.report(
            with(key, &["token_env"]),
            "set either token_env or the GitHub App keys (app_id, private_key_file, installation_id), not both",
        ),
        (None, _) => {
            for (field, set) in ["app_id", "private_key_file", "installation_id"]
                .iter()
                .zip(app)
            {
                if !set {
                    problems.report(
                        with(key, &[field]),
                        "missing; a GitHub App needs app_id, private_key_file and installation_id",
                    );
                }
            }
        }
    }
    if let Some(name) = &gh.token_env {
        if !env_is_set(env, name) {
            problems.report(
                with(key, &["token_env"]),
                format!(
                    "environment variable {name:?} is unset or empty; it must hold a GitHub token"
                ),
            );
        }
    }
    if let Some(file) = &gh.private_key_file {
        match std::fs::read(file) {
            Ok(pem) if pem.starts_with(b"-----BEGIN") => {}
            Ok(_) => problems.report(
                with(key, &["private_key_file"]),
                format!("{} is not a PEM private key", file.display()),
            ),
            Err(e) => problems.report(
                with(key, &["private_key_file"]),
                format!("cannot read {}: {e}", file.display()),
            ),
        }
    }
    if gh.app_id.as_deref().is_some_and(|a| a.trim().is_empty()) {
        problems.report(with(key, &["app_id"]), "must not be empty");
    }
}

/// stitch's own inputs plus the extra ones fit in a dispatch.
fn validate_inputs(key: &[Seg], gh: &GithubSection, problems: &mut Problems) {
    if gh.max_inputs < RESERVED_INPUTS.len() {
        problems.report(
            with(key, &["max_inputs"]),
            format!(
                "must be at least {} (stitch's own inputs)",
                RESERVED_INPUTS.len()
            ),
        );
        return;
    }
    let total = RESERVED_INPUTS.len()
        + gh.inputs
            .keys()
            .filter(|k| !RESERVED_INPUTS.contains(&k.as_str()))
            .count();
    if total > gh.max_inputs {
        problems.report(
            with(key, &["inputs"]),
            format!(
                "{} extra inputs plus stitch's 5 exceed GitHub's limit of {} inputs",
                gh.inputs.len(),
                gh.max_inputs
            ),
        );
    }
}
