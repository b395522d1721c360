//! What a Buildkite call fails with ([`BuildkiteError`], the shared
//! [`HttpError`] over what Buildkite's error answers carry) and how an
//! error answer is read.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::StatusCode;

use super::model::{ErrorBody, FieldError};
use crate::http_error::{AnswerDetail, HttpError};
use crate::http_util::status_summary;

/// What a Buildkite call failed with.
pub type BuildkiteError = HttpError<BuildkiteDetail>;

/// What a Buildkite error answer carries beside its status and message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildkiteDetail {
    /// The body's `errors[]` (validation failures).
    pub errors: Vec<FieldError>,
    /// Seconds until the rate-limit window resets, when Buildkite said.
    pub rate_limit_reset: Option<Duration>,
}

impl AnswerDetail for BuildkiteDetail {
    const VENDOR: &'static str = "Buildkite";

    fn describe(&self) -> String {
        if self.errors.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = self.errors.iter().map(ToString::to_string).collect();
            format!(" ({})", list.join("; "))
        }
    }

    /// The reset is a wait only on a 429 (other answers carry it too).
    fn retry_after(&self, status: u16) -> Option<Duration> {
        if status == 429 {
            self.rate_limit_reset
        } else {
            None
        }
    }
}

impl BuildkiteError {
    /// The 422 Buildkite gives when cancelling a build that already ended.
    pub fn is_already_finished(&self) -> bool {
        matches!(self, Self::Api { status: 422, message, .. }
            if message.to_ascii_lowercase().contains("already finished"))
    }
}

/// Seconds until the rate-limit window resets: the larger of the
/// organization (`RateLimit-Reset`) and user (`RateLimit-User-Reset`) resets.
pub(crate) fn rate_limit_reset(headers: &HeaderMap) -> Option<Duration> {
    ["ratelimit-reset", "ratelimit-user-reset"]
        .iter()
        .filter_map(|name| {
            headers
                .get(*name)?
                .to_str()
                .ok()?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .max()
        .map(Duration::from_secs)
}

/// The typed error of a non-success answer.
pub(crate) fn api_error(status: StatusCode, body: &str, reset: Option<Duration>) -> BuildkiteError {
    let parsed: Option<ErrorBody> = serde_json::from_str(body).ok();
    let (message, errors) = match parsed {
        Some(b) if !b.message.is_empty() => (b.message, b.errors),
        Some(b) => (status_summary(status, body), b.errors),
        None => (status_summary(status, body), Vec::new()),
    };
    BuildkiteError::Api {
        status: status.as_u16(),
        message,
        detail: BuildkiteDetail {
            errors,
            rate_limit_reset: reset,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stitch_core::RunnerError;

    fn api(status: u16, reset: Option<Duration>) -> BuildkiteError {
        BuildkiteError::Api {
            status,
            message: "m".into(),
            detail: BuildkiteDetail {
                errors: vec![],
                rate_limit_reset: reset,
            },
        }
    }

    #[test]
    fn errors_map_into_runner_errors() {
        let r: RunnerError = api(429, Some(Duration::from_secs(7))).into();
        assert!(r.is_retryable());
        assert_eq!(r.retry_after(), Some(Duration::from_secs(7)));
        let r: RunnerError = api(503, Some(Duration::from_secs(7))).into();
        assert_eq!(r.retry_after(), None, "a reset is a wait only on a 429");
        let r: RunnerError = api(404, None).into();
        assert!(r.is_not_found());
        for s in [500, 502, 503] {
            assert!(RunnerError::from(api(s, None)).is_retryable());
        }
        for s in [400, 401, 403, 422] {
            assert!(!RunnerError::from(api(s, None)).is_retryable(), "{s}");
        }
        let t: RunnerError = BuildkiteError::Transport {
            message: "reset".into(),
            maybe_processed: true,
        }
        .into();
        assert!(t.is_retryable());
        assert!(!RunnerError::from(BuildkiteError::Url("x".into())).is_retryable());
    }

    #[test]
    fn unknown_outcomes_of_a_create() {
        let t = |maybe_processed| BuildkiteError::Transport {
            message: "x".into(),
            maybe_processed,
        };
        assert!(t(true).outcome_unknown());
        assert!(!t(false).outcome_unknown());
        assert!(api(502, None).outcome_unknown());
        assert!(!api(422, None).outcome_unknown());
        assert!(!api(429, None).outcome_unknown());
        assert!(BuildkiteError::Decode {
            status: 201,
            message: "eof".into()
        }
        .outcome_unknown());
    }

    #[test]
    fn error_bodies_are_read() {
        let e = api_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            r#"{"message":"Validation Failed","errors":[{"field":"commit","code":"missing"}]}"#,
            None,
        );
        assert_eq!(
            e.to_string(),
            "Buildkite answered HTTP 422: Validation Failed (commit missing)"
        );
        let e = api_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            r#"{"message":"Build can't be canceled because it's already finished."}"#,
            None,
        );
        assert!(e.is_already_finished());
        let e = api_error(StatusCode::BAD_GATEWAY, "<html>bad gateway</html>", None);
        assert_eq!(
            e.to_string(),
            "Buildkite answered HTTP 502: Bad Gateway: <html>bad gateway</html>"
        );
    }

    #[test]
    fn the_larger_reset_wins() {
        let mut h = HeaderMap::new();
        assert_eq!(rate_limit_reset(&h), None);
        h.insert("RateLimit-Reset", "12".parse().unwrap());
        h.insert("RateLimit-User-Reset", "40".parse().unwrap());
        assert_eq!(rate_limit_reset(&h), Some(Duration::from_secs(40)));
        h.insert("RateLimit-User-Reset", "junk".parse().unwrap());
        assert_eq!(rate_limit_reset(&h), Some(Duration::from_secs(12)));
    }
}
