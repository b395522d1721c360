//! The declaration to the stitch server:
//! `POST {server}/v1/builds/{id}/promise-failure` with the build's job token,
//! retried under a [`RetryPolicy`] (429, 5xx and network failures with
//! backoff; any other 4xx is final at once).

use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use reqwest::header::{HeaderMap, RETRY_AFTER};

use crate::coordinator::Declare;
use crate::env;
use crate::promise::{Declaration, PromiseFailure};

/// How declarations are retried: exponential backoff from `initial`,
/// doubling up to `max`, with full jitter; a `Retry-After` header (429,
/// 503) is honoured up to `max`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, at least 1.
    pub max_attempts: u32,
    /// Backoff before the second attempt.
    pub initial: Duration,
    /// Longest backoff.
    pub max: Duration,
}

impl Default for RetryPolicy {
    /// 10 attempts, 200 ms doubling to 5 s (about 20 s in the worst case),
    /// like the Buildkite agent's `PromiseFailureWithRetry`.
    fn default() -> Self {
        Self {
            max_attempts: 10,
            initial: Duration::from_millis(200),
            max: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// No retries: one attempt.
    pub fn once() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The backoff after `attempt` (1-based) failed.
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(wait) = retry_after {
            return wait.min(self.max);
        }
        let exp = self
            .initial
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
            .min(self.max);
        // Full jitter: many jobs retrying at once do not retry in step.
        let millis = u64::try_from(exp.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::thread_rng().gen_range(millis / 2..=millis.max(1)))
    }
}

/// Whether a failed attempt may be retried: 429, 5xx, or no answer.
fn retryable(status: Option<u16>) -> bool {
    match status {
        None => true,
        Some(s) => s == 429 || s >= 500,
    }
}

/// Why a [`ServerClient`] cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ServerClientError {
    /// A required environment variable is unset or empty.
    #[error("{0} is not set: not running inside a stitch job")]
    MissingEnv(&'static str),
    /// The build id cannot be a path segment.
    #[error("invalid build id {0:?}")]
    InvalidBuildId(String),
    /// The server URL is not http(s).
    #[error("invalid server URL {0:?}: expected http://HOST[:PORT]")]
    InvalidServer(String),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
}

/// Declares promises for one build to the stitch server with its job token.
#[derive(Clone, Debug)]
pub struct ServerClient {
    http: reqwest::Client,
    url: String,
    job_token: String,
    retry: RetryPolicy,
}

impl ServerClient {
    /// A client for build `build_id` on `server` (base URL) with `job_token`,
    /// using the default [`RetryPolicy`].
    pub fn new(server: &str, build_id: &str, job_token: &str) -> Result<Self, ServerClientError> {
        let server = server.trim().trim_end_matches('/');
        if !(server.starts_with("http://") || server.starts_with("https://")) {
            return Err(ServerClientError::InvalidServer(server.to_string()));
        }
        let id_ok = !build_id.is_empty()
            && build_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !id_ok {
            return Err(ServerClientError::InvalidBuildId(build_id.to_string()));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ServerClientError::Http(e.to_string()))?;
        Ok(Self {
            http,
            url: format!("{server}/v1/builds/{build_id}/promise-failure"),
            job_token: job_token.trim().to_string(),
            retry: RetryPolicy::default(),
        })
    }

    /// A client from `STITCH_SERVER`, `STITCH_BUILD_ID` and `STITCH_JOB_TOKEN`.
    pub fn from_env() -> Result<Self, ServerClientError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`ServerClient::from_env`] with an injected lookup.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ServerClientError> {
        let get = |name: &'static str| {
            lookup(name)
                .filter(|v| !v.trim().is_empty())
                .ok_or(ServerClientError::MissingEnv(name))
        };
        let token = get(env::JOB_TOKEN)?;
        let build = get(env::BUILD_ID)?;
        let server = get(env::SERVER)?;
        Self::new(&server, &build, &token)
    }

    /// Builder: use `retry` instead of the default policy.
    #[must_use]
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The endpoint this client posts to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// One attempt, no retries. Also returns the `Retry-After` delay.
    async fn attempt(&self, promise: &PromiseFailure) -> (Declaration, Option<Duration>) {
        let sent = self
            .http
            .post(&self.url)
            .bearer_auth(&self.job_token)
            .json(promise)
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                return (
                    Declaration {
                        status: None,
                        error: Some(format!("cannot reach the stitch server: {e}")),
                    },
                    None,
                )
            }
        };
        let status = resp.status().as_u16();
        let retry_after = retry_after(resp.headers());
        if resp.status().is_success() {
            return (
                Declaration {
                    status: Some(status),
                    error: None,
                },
                None,
            );
        }
        let body = resp.text().await.unwrap_or_default();
        (
            Declaration {
                status: Some(status),
                error: Some(error_message(status, &body)),
            },
            retry_after,
        )
    }
}

#[async_trait]
impl Declare for ServerClient {
    async fn declare(&self, promise: &PromiseFailure) -> Declaration {
        let attempts = self.retry.max_attempts.max(1);
        let mut attempt = 1;
        loop {
            let (declaration, retry_after) = self.attempt(promise).await;
            if declaration.accepted() || !retryable(declaration.status) || attempt >= attempts {
                return declaration;
            }
            let wait = self.retry.backoff(attempt, retry_after);
            tracing::debug!(
                attempt,
                status = ?declaration.status,
                error = ?declaration.error,
                ?wait,
                "promise-failure declaration failed; retrying"
            );
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}

/// A declarer for a job API started outside a stitch job (no server or
/// job token in the environment): every declaration fails with the reason,
/// and is not cached, so the job API keeps answering accurately.
#[derive(Clone, Debug)]
pub struct Unconfigured(pub String);

#[async_trait]
impl Declare for Unconfigured {
    async fn declare(&self, _: &PromiseFailure) -> Declaration {
        Declaration {
            status: None,
            error: Some(self.0.clone()),
        }
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs))
}

/// The message of a stitch error body (`{"error":{"code","message"}}`), or
/// what the status means when the body is something else.
fn error_message(status: u16, body: &str) -> String {
    let parsed: Option<String> = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string));
    match parsed {
        Some(m) => m,
        None => {
            let snippet: String = body.chars().take(200).collect();
            if snippet.trim().is_empty() {
                format!("the stitch server answered HTTP {status}")
            } else {
                format!(
                    "the stitch server answered HTTP {status}: {}",
                    snippet.trim()
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial: Duration::from_millis(100),
            max: Duration::from_millis(400),
        };
        for attempt in 1..10 {
            let b = p.backoff(attempt, None);
            assert!(b <= Duration::from_millis(400), "{b:?}");
        }
        assert!(p.backoff(1, None) >= Duration::from_millis(50));
        assert_eq!(
            p.backoff(1, Some(Duration::from_secs(30))),
            Duration::from_millis(400)
        );
    }

    #[test]
    fn retry_classification() {
        assert!(retryable(None));
        assert!(retryable(Some(429)));
        assert!(retryable(Some(503)));
        assert!(!retryable(Some(409)));
        assert!(!retryable(Some(422)));
        assert!(!retryable(Some(403)));
    }

    #[test]
    fn construction_checks_its_inputs() {
        assert!(ServerClient::new("http://127.0.0.1:1", "b_1", "t").is_ok());
        assert!(matches!(
            ServerClient::new("ftp://x", "b_1", "t"),
            Err(ServerClientError::InvalidServer(_))
        ));
        assert!(matches!(
            ServerClient::new("http://x", "../admin", "t"),
            Err(ServerClientError::InvalidBuildId(_))
        ));
        let missing = ServerClient::from_lookup(|_| None).unwrap_err();
        assert!(
            missing.to_string().contains("STITCH_JOB_TOKEN"),
            "{missing}"
        );
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            error_message(409, r#"{"error":{"code":"c","message":"m"}}"#),
            "m"
        );
        assert_eq!(
            error_message(502, ""),
            "the stitch server answered HTTP 502"
        );
        assert!(error_message(502, "<html>bad gateway</html>").contains("bad gateway"));
    }
}
