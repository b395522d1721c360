//! What a call of a vendor's REST API fails with: one error type for every
//! vendor client (`buildkite::Client`, `github::Client`, and the ones to
//! come), with one answer to "may a non-repeatable call have taken
//! effect?" ([`HttpError::outcome_unknown`]) and one mapping onto
//! [`RunnerError`].
//!
//! The seam: what differs per vendor is its name in messages and what its
//! error answers carry beside the status and message (validation details,
//! how it speaks of rate limits). A vendor names that in an
//! [`AnswerDetail`] and calls its error `HttpError<ItsDetail>`
//! (`buildkite::BuildkiteError`, `github::GithubError`); checks that only
//! make sense for one vendor (`is_already_finished`, `is_conflict`) are
//! inherent methods on that one instantiation, in the vendor's module.

use std::fmt;
use std::time::Duration;

use stitch_core::RunnerError;

use crate::http_util::transport_message;

/// What one vendor's error answers carry beside the status and message.
pub trait AnswerDetail: Clone + fmt::Debug + PartialEq + Eq + Send + Sync + 'static {
    /// The vendor's name in messages ("Buildkite").
    const VENDOR: &'static str;

    /// Text shown after the answer's message (validation details); empty
    /// when there is nothing to add.
    fn describe(&self) -> String {
        String::new()
    }

    /// The status the runner layer should see for an answer of `status`
    /// (a vendor whose rate limits come as 403s reports them as 429).
    fn runner_status(&self, status: u16) -> u16 {
        status
    }

    /// How long the vendor asked callers to wait, for an answer of `status`.
    fn retry_after(&self, status: u16) -> Option<Duration>;
}

/// What a vendor call failed with; `D` is what the vendor's error answers
/// carry (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpError<D> {
    /// The vendor answered with an error status.
    Api {
        /// HTTP status.
        status: u16,
        /// The body's message (or a summary of a body that had none).
        message: String,
        /// What else the vendor's answer said.
        detail: D,
    },
    /// No answer: connect failure, timeout, reset.
    Transport {
        /// What happened.
        message: String,
        /// False only when the connection was never made (nothing was sent).
        maybe_processed: bool,
    },
    /// A success status with a body that is not the expected JSON (a proxy
    /// page, a truncated answer).
    Decode {
        /// HTTP status.
        status: u16,
        /// The decode error.
        message: String,
    },
    /// A URL could not be built (bad API root, a pagination link elsewhere).
    Url(String),
    /// Credentials cannot be used (a bad key, a token no header can carry).
    Auth(String),
}

impl<D: AnswerDetail> HttpError<D> {
    /// The error of a request that got no answer; whether it may have been
    /// processed follows from whether the connection was made.
    pub fn transport(e: &reqwest::Error) -> Self {
        Self::Transport {
            message: transport_message(e),
            maybe_processed: !e.is_connect(),
        }
    }

    /// The HTTP status, for answers that had one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } | Self::Decode { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the vendor said the thing does not exist (404).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// For a call that must not be repeated blindly (a create, a dispatch):
    /// it may or may not have taken effect (timeout or reset after sending,
    /// a 5xx, an unreadable success). Look before calling again.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            Self::Transport {
                maybe_processed, ..
            } => *maybe_processed,
            Self::Api { status, .. } => *status >= 500,
            Self::Decode { .. } => true,
            Self::Url(_) | Self::Auth(_) => false,
        }
    }
}

impl<D: AnswerDetail> fmt::Display for HttpError<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let vendor = D::VENDOR;
        match self {
            Self::Api {
                status,
                message,
                detail,
            } => write!(
                f,
                "{vendor} answered HTTP {status}: {message}{}",
                detail.describe()
            ),
            Self::Transport { message, .. } => write!(f, "request to {vendor} failed: {message}"),
            Self::Decode { status, message } => write!(
                f,
                "{vendor} answered HTTP {status} with an unreadable body: {message}"
            ),
            Self::Url(what) => write!(f, "invalid {vendor} URL: {what}"),
            Self::Auth(what) => write!(f, "{vendor} credentials: {what}"),
        }
    }
}

impl<D: AnswerDetail> std::error::Error for HttpError<D> {}

impl<D: AnswerDetail> From<HttpError<D>> for RunnerError {
    fn from(e: HttpError<D>) -> Self {
        let text = e.to_string();
        match e {
            HttpError::Api { status: 404, .. } => RunnerError::NotFound(text),
            HttpError::Api { status, detail, .. } => RunnerError::Http {
                status: detail.runner_status(status),
                message: text,
                retry_after: detail.retry_after(status),
            },
            // Undecodable success bodies are usually proxies in trouble: retry.
            HttpError::Transport { .. } | HttpError::Decode { .. } => RunnerError::Transport(text),
            HttpError::Url(_) | HttpError::Auth(_) => RunnerError::InvalidRequest(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vendor whose answers carry nothing beyond status and message.
    #[derive(Clone, Debug, PartialEq, Eq)]
    struct Plain;

    impl AnswerDetail for Plain {
        const VENDOR: &'static str = "Plain";
        fn retry_after(&self, _status: u16) -> Option<Duration> {
            None
        }
    }

    fn api(status: u16) -> HttpError<Plain> {
        HttpError::Api {
            status,
            message: "m".into(),
            detail: Plain,
        }
    }

    #[test]
    fn outcomes_and_runner_errors_follow_the_kind_of_failure() {
        assert!(RunnerError::from(api(404)).is_not_found());
        assert!(api(404).is_not_found());
        for s in [500, 502, 503] {
            assert!(api(s).outcome_unknown());
            assert!(RunnerError::from(api(s)).is_retryable());
        }
        for s in [400, 401, 403, 409, 422] {
            assert!(!api(s).outcome_unknown(), "{s}");
            assert!(!RunnerError::from(api(s)).is_retryable(), "{s}");
        }
        let t = |maybe_processed| HttpError::<Plain>::Transport {
            message: "x".into(),
            maybe_processed,
        };
        assert!(t(true).outcome_unknown() && !t(false).outcome_unknown());
        assert!(RunnerError::from(t(false)).is_retryable());
        let decode = HttpError::<Plain>::Decode {
            status: 201,
            message: "eof".into(),
        };
        assert!(decode.outcome_unknown());
        assert_eq!(decode.status(), Some(201));
        for e in [
            HttpError::<Plain>::Url("x".into()),
            HttpError::Auth("x".into()),
        ] {
            assert!(!e.outcome_unknown());
            assert_eq!(e.status(), None);
            assert!(!RunnerError::from(e).is_retryable());
        }
    }

    #[test]
    fn messages_name_the_vendor() {
        assert_eq!(api(502).to_string(), "Plain answered HTTP 502: m");
        assert_eq!(
            HttpError::<Plain>::Auth("bad key".into()).to_string(),
            "Plain credentials: bad key"
        );
        assert_eq!(
            HttpError::<Plain>::Url("x".into()).to_string(),
            "invalid Plain URL: x"
        );
    }
}
