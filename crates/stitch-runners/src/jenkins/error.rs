//! What a Jenkins call fails with ([`JenkinsError`], the shared
//! [`HttpError`] over what Jenkins' error answers carry) and how an error
//! answer is read. Jenkins answers errors with HTML pages, so the message
//! is a summary of the page.

use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;

use crate::http_error::{AnswerDetail, HttpError};
use crate::http_util::status_summary;

/// What a Jenkins call failed with.
pub type JenkinsError = HttpError<JenkinsDetail>;

/// What a Jenkins error answer carries beside its status and message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JenkinsDetail {
    /// `Retry-After` of a 429 or 503 (a proxy in front of the controller).
    pub retry_after: Option<Duration>,
    /// A 403 refusing the request for a missing or stale CSRF crumb.
    pub crumb_refused: bool,
}

impl AnswerDetail for JenkinsDetail {
    const VENDOR: &'static str = "Jenkins";

    fn describe(&self) -> String {
        if self.crumb_refused {
            " (CSRF crumb refused)".into()
        } else {
            String::new()
        }
    }

    fn retry_after(&self, status: u16) -> Option<Duration> {
        if status == 429 || status == 503 {
            self.retry_after
        } else {
            None
        }
    }
}

impl JenkinsError {
    /// The 403 Jenkins gives a POST without a valid crumb.
    pub fn is_crumb_refused(&self) -> bool {
        matches!(self, Self::Api { status: 403, detail, .. } if detail.crumb_refused)
    }
}

/// `Retry-After` in seconds (the HTTP-date form is not used by Jenkins'
/// proxies in practice and is read as absent).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// The typed error of a non-success answer.
pub(crate) fn api_error(status: StatusCode, body: &str, retry: Option<Duration>) -> JenkinsError {
    let crumb_refused = status == StatusCode::FORBIDDEN && body.contains("No valid crumb");
    JenkinsError::Api {
        status: status.as_u16(),
        message: status_summary(status, &strip_tags(body)),
        detail: JenkinsDetail {
            retry_after: retry,
            crumb_refused,
        },
    }
}

/// The text of an HTML error page (tags dropped, whitespace folded), so a
/// message says what the page said rather than its markup.
fn strip_tags(body: &str) -> String {
    let mut out = String::with_capacity(body.len());
    let mut in_tag = false;
    for c in body.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                out.push(' ');
            }
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use stitch_core::RunnerError;

    #[test]
    fn error_pages_are_read_as_text() {
        let e = api_error(
            StatusCode::FORBIDDEN,
            "<html><body><h2>HTTP ERROR 403 No valid crumb was included in the request</h2></body></html>",
            None,
        );
        assert!(e.is_crumb_refused());
        assert_eq!(
            e.to_string(),
            "Jenkins answered HTTP 403: Forbidden: HTTP ERROR 403 No valid crumb was included \
             in the request (CSRF crumb refused)"
        );
        let e = api_error(StatusCode::NOT_FOUND, "", None);
        assert!(!e.is_crumb_refused());
        assert_eq!(e.to_string(), "Jenkins answered HTTP 404: Not Found");
    }

    #[test]
    fn waits_are_read_from_retry_after() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let r: RunnerError = api_error(StatusCode::TOO_MANY_REQUESTS, "", retry_after(&h)).into();
        assert!(r.is_retryable());
        assert_eq!(r.retry_after(), Some(Duration::from_secs(7)));
        let r: RunnerError = api_error(StatusCode::UNAUTHORIZED, "", retry_after(&h)).into();
        assert!(!r.is_retryable());
        assert_eq!(r.retry_after(), None);
    }
}
