//! What a GitHub call fails with ([`GithubError`], the shared
//! [`HttpError`] over what GitHub's error answers carry), and how an error
//! answer is read: one place for the client, the App-token minting and the
//! runner.

use std::time::Duration;

use chrono::Utc;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;

use super::model::ErrorBody;
use crate::http_error::{AnswerDetail, HttpError};
use crate::http_util::status_summary;

/// What a GitHub call failed with.
pub type GithubError = HttpError<GithubDetail>;

/// What a GitHub error answer carries beside its status and message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GithubDetail {
    /// How long GitHub asked us to wait (`retry-after`, or until
    /// `x-ratelimit-reset` when the quota is spent).
    pub retry_after: Option<Duration>,
    /// A primary or secondary rate limit (403 or 429), not a refusal.
    pub rate_limited: bool,
}

impl AnswerDetail for GithubDetail {
    const VENDOR: &'static str = "GitHub";

    /// A rate-limited 403 is "wait", not "forbidden": the 429 it means.
    fn runner_status(&self, status: u16) -> u16 {
        if self.rate_limited {
            429
        } else {
            status
        }
    }

    fn retry_after(&self, _status: u16) -> Option<Duration> {
        self.retry_after
    }
}

impl GithubError {
    /// The 409 GitHub gives when cancelling a run that already completed.
    pub fn is_conflict(&self) -> bool {
        self.status() == Some(409)
    }

    /// A 400/422 naming `return_run_details`: a server older than GHES
    /// 3.21 that does not know the flag (nothing was created).
    pub fn rejects_run_details(&self) -> bool {
        matches!(self, Self::Api { status: 400 | 422, message, .. }
            if message.contains("return_run_details"))
    }
}

pub(crate) fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// Time until `x-ratelimit-reset` (epoch seconds), at least one second.
pub(crate) fn until_reset(headers: &HeaderMap) -> Option<Duration> {
    let reset = header_u64(headers, "x-ratelimit-reset")?;
    let now = Utc::now().timestamp().max(0) as u64;
    Some(Duration::from_secs(reset.saturating_sub(now).max(1)))
}

/// The typed error of a non-success answer; `retry_after` from
/// `retry-after`, else (quota spent) until `x-ratelimit-reset`.
pub(crate) fn api_error(status: StatusCode, headers: &HeaderMap, body: &str) -> GithubError {
    let message = match serde_json::from_str::<ErrorBody>(body) {
        Ok(b) if !b.message.is_empty() => b.message,
        _ => status_summary(status, body),
    };
    let retry_after = header_u64(headers, "retry-after").map(Duration::from_secs);
    let spent = header_u64(headers, "x-ratelimit-remaining") == Some(0);
    let rate_limited = match status.as_u16() {
        429 => true,
        403 => {
            retry_after.is_some() || spent || message.to_ascii_lowercase().contains("rate limit")
        }
        _ => false,
    };
    let retry_after = retry_after.or_else(|| {
        if rate_limited && spent {
            until_reset(headers)
        } else {
            None
        }
    });
    GithubError::Api {
        status: status.as_u16(),
        message,
        detail: GithubDetail {
            retry_after,
            rate_limited,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stitch_core::RunnerError;

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn rate_limits_are_told_from_permission_errors() {
        let forbidden = api_error(
            StatusCode::FORBIDDEN,
            &HeaderMap::new(),
            r#"{"message":"Resource not accessible by integration"}"#,
        );
        assert!(matches!(
            forbidden,
            GithubError::Api {
                detail: GithubDetail {
                    rate_limited: false,
                    ..
                },
                ..
            }
        ));
        assert!(!RunnerError::from(forbidden).is_retryable());

        let secondary = api_error(
            StatusCode::FORBIDDEN,
            &headers(&[("retry-after", "7".into())]),
            r#"{"message":"You have exceeded a secondary rate limit."}"#,
        );
        let r = RunnerError::from(secondary.clone());
        assert!(r.is_retryable());
        assert_eq!(r.retry_after(), Some(Duration::from_secs(7)));

        let reset = Utc::now().timestamp() + 30;
        let primary = api_error(
            StatusCode::FORBIDDEN,
            &headers(&[
                ("x-ratelimit-remaining", "0".into()),
                ("x-ratelimit-reset", reset.to_string()),
            ]),
            r#"{"message":"API rate limit exceeded for installation ID 1."}"#,
        );
        let GithubError::Api {
            detail:
                GithubDetail {
                    rate_limited: true,
                    retry_after: Some(wait),
                },
            ..
        } = primary
        else {
            panic!("{primary:?}")
        };
        assert!(wait >= Duration::from_secs(28) && wait <= Duration::from_secs(31));

        let too_many = api_error(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new(), "");
        assert!(RunnerError::from(too_many).is_retryable());
    }

    #[test]
    fn errors_map_into_runner_errors() {
        let api = |status| GithubError::Api {
            status,
            message: "m".into(),
            detail: GithubDetail::default(),
        };
        assert!(RunnerError::from(api(404)).is_not_found());
        for s in [500, 502, 503] {
            assert!(RunnerError::from(api(s)).is_retryable());
            assert!(api(s).outcome_unknown());
        }
        for s in [400, 401, 403, 409, 422] {
            assert!(!RunnerError::from(api(s)).is_retryable(), "{s}");
            assert!(!api(s).outcome_unknown());
        }
        assert!(api(409).is_conflict());
        let t = |maybe_processed| GithubError::Transport {
            message: "x".into(),
            maybe_processed,
        };
        assert!(t(true).outcome_unknown() && !t(false).outcome_unknown());
        assert!(RunnerError::from(t(true)).is_retryable());
        assert!(!RunnerError::from(GithubError::Auth("x".into())).is_retryable());
    }

    #[test]
    fn old_servers_rejecting_run_details_are_recognised() {
        let e = api_error(
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            r#"{"message":"\"return_run_details\" is not a permitted key."}"#,
        );
        assert!(e.rejects_run_details());
        let e = api_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &HeaderMap::new(),
            r#"{"message":"Unexpected inputs provided: [\"x\"]"}"#,
        );
        assert!(!e.rejects_run_details());
    }
}
