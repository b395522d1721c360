//! `RunnerError` and its classification into retryable vs permanent.
//!
//! Runners report what happened; the consumer framework decides what to do
//! (retry with backoff, or dead-letter and fail the build) from
//! [`RunnerError::classify`].

use std::time::Duration;

/// What a [`BuildRunner`](crate::BuildRunner) call can fail with. Each
/// variant carries what classification needs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RunnerError {
    /// The provider answered with a non-success HTTP status.
    #[error("provider answered HTTP {status}: {message}")]
    Http {
        /// The HTTP status code.
        status: u16,
        /// The provider's message (or a summary of its body).
        message: String,
        /// How long the provider asked us to wait (`Retry-After`, rate-limit reset).
        retry_after: Option<Duration>,
    },
    /// The request never got an answer: connect/DNS/TLS failure, timeout, reset.
    #[error("transport failure: {0}")]
    Transport(String),
    /// The provider does not know this build.
    #[error("build not found: {0}")]
    NotFound(String),
    /// The request can never succeed as sent (bad input, bad configuration).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The runner does not implement this operation (e.g. `logs`).
    #[error("this runner does not support the operation")]
    NotSupported,
    /// A fault inside the runner itself (local I/O, a broken invariant).
    #[error("runner internal error: {0}")]
    Internal(String),
}

/// What the caller should do with a failed call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Try again later (with backoff, honouring `retry_after`).
    Retryable,
    /// Trying again cannot help; fail the build with the error.
    Permanent,
}

impl RunnerError {
    /// An HTTP error without a retry hint.
    pub fn http(status: u16, message: impl Into<String>) -> Self {
        RunnerError::Http {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Retryable: transport failures, HTTP 408, 429 and 5xx except 501/505,
    /// and internal errors (usually local I/O; the retry budget bounds them).
    /// Permanent: every other HTTP status, not found, invalid request and
    /// not supported.
    pub fn classify(&self) -> ErrorClass {
        match self {
            RunnerError::Http { status, .. } => classify_http_status(*status),
            RunnerError::Transport(_) | RunnerError::Internal(_) => ErrorClass::Retryable,
            RunnerError::NotFound(_)
            | RunnerError::InvalidRequest(_)
            | RunnerError::NotSupported => ErrorClass::Permanent,
        }
    }

    /// Shorthand for `classify() == ErrorClass::Retryable`.
    pub fn is_retryable(&self) -> bool {
        self.classify() == ErrorClass::Retryable
    }

    /// The provider's requested wait before the next attempt, if it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RunnerError::Http { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether this is [`RunnerError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, RunnerError::NotFound(_))
    }
}

/// Classify an HTTP status code: 408 (request timeout), 429 (rate limited)
/// and 5xx are retryable, except 501 (not implemented) and 505 (HTTP version
/// not supported), which will answer the same way forever. Everything else
/// is permanent.
pub fn classify_http_status(status: u16) -> ErrorClass {
    match status {
        408 | 429 => ErrorClass::Retryable,
        501 | 505 => ErrorClass::Permanent,
        500..=599 => ErrorClass::Retryable,
        _ => ErrorClass::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_classification_table() {
        let retryable = [408, 429, 500, 502, 503, 504, 599];
        let permanent = [400, 401, 403, 404, 409, 422, 501, 505, 200, 302, 600];
        for s in retryable {
            assert!(RunnerError::http(s, "x").is_retryable(), "{s}");
        }
        for s in permanent {
            assert!(!RunnerError::http(s, "x").is_retryable(), "{s}");
        }
    }

    #[test]
    fn variant_classification() {
        assert!(RunnerError::Transport("reset".into()).is_retryable());
        assert!(RunnerError::Internal("disk full".into()).is_retryable());
        assert_eq!(
            RunnerError::NotFound("b".into()).classify(),
            ErrorClass::Permanent
        );
        assert_eq!(
            RunnerError::InvalidRequest("b".into()).classify(),
            ErrorClass::Permanent
        );
        assert_eq!(RunnerError::NotSupported.classify(), ErrorClass::Permanent);
        assert!(RunnerError::NotFound("b".into()).is_not_found());
    }

    #[test]
    fn retry_after_is_carried() {
        let e = RunnerError::Http {
            status: 429,
            message: "slow down".into(),
            retry_after: Some(Duration::from_secs(7)),
        };
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        assert_eq!(e.to_string(), "provider answered HTTP 429: slow down");
        assert_eq!(RunnerError::Transport("x".into()).retry_after(), None);
    }
}
