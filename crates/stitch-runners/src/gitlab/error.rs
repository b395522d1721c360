//! What a GitLab call fails with ([`GitlabError`], the shared [`HttpError`]
//! over what GitLab's error answers carry) and how an error answer and its
//! rate-limit headers are read.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::StatusCode;

use crate::http_error::{AnswerDetail, HttpError};
use crate::http_util::status_summary;

/// What a GitLab call failed with.
pub type GitlabError = HttpError<GitlabDetail>;

/// What a GitLab error answer carries beside its status and message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GitlabDetail {
    /// How long GitLab asked callers to wait (`Retry-After`, else until
    /// `RateLimit-Reset`).
    pub retry_after: Option<Duration>,
}

impl AnswerDetail for GitlabDetail {
    const VENDOR: &'static str = "GitLab";

    /// The wait is one only on a 429 (other answers may carry the headers).
    fn retry_after(&self, status: u16) -> Option<Duration> {
        if status == 429 {
            self.retry_after
        } else {
            None
        }
    }
}

/// A header as an unsigned number.
pub(crate) fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// How long to wait after a rate-limit answer: `Retry-After` (seconds),
/// else until `RateLimit-Reset` (a Unix time, unlike Buildkite's seconds),
/// measured against `now` (Unix seconds).
pub(crate) fn rate_limit_wait(headers: &HeaderMap, now: i64) -> Option<Duration> {
    if let Some(secs) = header_u64(headers, "retry-after") {
        return Some(Duration::from_secs(secs));
    }
    until_reset(headers, now)
}

/// The time until `RateLimit-Reset` (Unix seconds), from `now`.
pub(crate) fn until_reset(headers: &HeaderMap, now: i64) -> Option<Duration> {
    let reset = i64::try_from(header_u64(headers, "ratelimit-reset")?).ok()?;
    Some(Duration::from_secs(reset.saturating_sub(now).max(0) as u64))
}

/// The message of a GitLab error body: `{"message": "…"}`, `{"message":
/// {"field": ["…"]}}` (validation), or `{"error": "…"}` (bad parameters).
fn body_message(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let text = match (v.get("message"), v.get("error")) {
        (Some(serde_json::Value::String(s)), _) => s.clone(),
        (Some(serde_json::Value::Object(fields)), _) => fields
            .iter()
            .map(|(field, problems)| match problems {
                serde_json::Value::Array(list) => {
                    let texts: Vec<String> = list
                        .iter()
                        .map(|p| p.as_str().map(str::to_string).unwrap_or(p.to_string()))
                        .collect();
                    format!("{field}: {}", texts.join(", "))
                }
                other => format!("{field}: {other}"),
            })
            .collect::<Vec<_>>()
            .join("; "),
        (Some(serde_json::Value::Array(list)), _) => list
            .iter()
            .map(|p| p.as_str().map(str::to_string).unwrap_or(p.to_string()))
            .collect::<Vec<_>>()
            .join("; "),
        (_, Some(serde_json::Value::String(s))) => s.clone(),
        _ => return None,
    };
    (!text.is_empty()).then_some(text)
}

/// The typed error of a non-success answer.
pub(crate) fn api_error(
    status: StatusCode,
    headers: &HeaderMap,
    body: &str,
    now: i64,
) -> GitlabError {
    GitlabError::Api {
        status: status.as_u16(),
        message: body_message(body).unwrap_or_else(|| status_summary(status, body)),
        detail: GitlabDetail {
            retry_after: rate_limit_wait(headers, now),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stitch_core::RunnerError;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn error_bodies_of_every_shape_are_read() {
        let none = HeaderMap::new();
        let e = api_error(
            StatusCode::BAD_REQUEST,
            &none,
            r#"{"error":"ref is missing"}"#,
            0,
        );
        assert_eq!(e.to_string(), "GitLab answered HTTP 400: ref is missing");
        let e = api_error(
            StatusCode::BAD_REQUEST,
            &none,
            r#"{"message":{"base":["Reference not found"],"ref":["is invalid"]}}"#,
            0,
        );
        assert_eq!(
            e.to_string(),
            "GitLab answered HTTP 400: base: Reference not found; ref: is invalid"
        );
        let e = api_error(
            StatusCode::NOT_FOUND,
            &none,
            r#"{"message":"404 Project Not Found"}"#,
            0,
        );
        assert!(RunnerError::from(e).is_not_found());
        let e = api_error(
            StatusCode::BAD_GATEWAY,
            &none,
            "<html>bad gateway</html>",
            0,
        );
        assert_eq!(
            e.to_string(),
            "GitLab answered HTTP 502: Bad Gateway: <html>bad gateway</html>"
        );
    }

    #[test]
    fn waits_come_from_retry_after_else_the_reset_time() {
        let h = headers(&[("retry-after", "7"), ("ratelimit-reset", "1000")]);
        assert_eq!(rate_limit_wait(&h, 900), Some(Duration::from_secs(7)));
        let h = headers(&[("ratelimit-reset", "1000")]);
        assert_eq!(rate_limit_wait(&h, 960), Some(Duration::from_secs(40)));
        assert_eq!(
            rate_limit_wait(&h, 2000),
            Some(Duration::ZERO),
            "a past reset waits not"
        );
        assert_eq!(
            rate_limit_wait(&headers(&[("retry-after", "soon")]), 0),
            None
        );
        let e = api_error(
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[("retry-after", "3")]),
            "",
            0,
        );
        let r: RunnerError = e.into();
        assert!(r.is_retryable());
        assert_eq!(r.retry_after(), Some(Duration::from_secs(3)));
        let e = api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &headers(&[("retry-after", "3")]),
            "",
            0,
        );
        assert_eq!(RunnerError::from(e).retry_after(), None);
    }
}
