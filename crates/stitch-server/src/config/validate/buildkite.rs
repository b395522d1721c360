//! `[queues.NAME.buildkite]`: slugs, URL, budget, and that the named
//! environment variables hold secrets.

use stitch_runners::buildkite::BuildkiteSection;

use super::super::problems::{with, Problems, Seg};
use super::{env_is_set, is_http_url, is_vendor_name, validate_nonzero, validate_rate_limit, Env};

pub(super) fn validate(key: &[Seg], bk: &BuildkiteSection, problems: &mut Problems, env: Env<'_>) {
    for (field, value) in [("org", &bk.org), ("pipeline", &bk.pipeline)] {
        if !is_vendor_name(value) {
            problems.report(
                with(key, &[field]),
                format!("{value:?} is not a Buildkite slug (letters, digits, '-', '_', '.')"),
            );
        }
    }
    for (field, value) in [("branch", &bk.branch), ("commit", &bk.commit)] {
        if value.trim().is_empty() {
            problems.report(with(key, &[field]), "must not be empty");
        }
    }
    if !is_http_url(&bk.api_url) {
        problems.report(
            with(key, &["api_url"]),
            "must be an http:// or https:// URL",
        );
    }
    if !env_is_set(env, &bk.token_env) {
        problems.report(
            with(key, &["token_env"]),
            format!(
                "environment variable {:?} is unset or empty; it must hold a Buildkite API token",
                bk.token_env
            ),
        );
    }
    validate_rate_limit(key, &bk.rate_limit, problems);
    validate_nonzero(
        key,
        &[
            ("request_timeout", bk.request_timeout),
            ("log_poll", bk.log_poll),
        ],
        problems,
    );
    if bk.max_log_bytes == 0 {
        problems.report(with(key, &["max_log_bytes"]), "must be at least 1");
    }
    if let Some(w) = &bk.webhook {
        let webhook = with(key, &["webhook"]);
        if !env_is_set(env, &w.secret_env) {
            problems.report(
                with(&webhook, &["secret_env"]),
                format!(
                    "environment variable {:?} is unset or empty; it must hold the webhook token",
                    w.secret_env
                ),
            );
        }
        validate_nonzero(
            &webhook,
            &[("max_age", w.max_age), ("poll", w.poll)],
            problems,
        );
    }
}
