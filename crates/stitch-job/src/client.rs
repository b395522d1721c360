//! [`JobApiClient`]: talks to a [`crate::JobApi`] over its Unix socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::env;
use crate::promise::{PromiseFailure, PromiseFailureResult};
use crate::server::PROMISE_FAILURE_PATH;

/// Why a job API call failed.
#[derive(Debug, thiserror::Error)]
pub enum JobApiError {
    /// The socket is missing, refuses connections, or the connection broke:
    /// callers may declare directly instead.
    #[error("cannot reach the job API at {socket}: {detail}")]
    Unreachable {
        /// The socket path.
        socket: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The job API refused the request (400 invalid body, 401 bad token).
    #[error("the job API refused the request (HTTP {status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Its `error` message.
        message: String,
    },
    /// The answer could not be understood.
    #[error("unexpected answer from the job API: {0}")]
    Protocol(String),
}

/// A client of one job API.
#[derive(Clone, Debug)]
pub struct JobApiClient {
    http: reqwest::Client,
    socket: PathBuf,
    token: String,
}

impl JobApiClient {
    /// A client of the job API at `socket` with bearer `token`.
    pub fn new(socket: &Path, token: &str) -> Result<Self, JobApiError> {
        // A declaration may retry for a while upstream; the waiters wait with it.
        let http = reqwest::Client::builder()
            .unix_socket(socket)
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| JobApiError::Protocol(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            socket: socket.to_path_buf(),
            token: token.to_string(),
        })
    }

    /// A client from `STITCH_JOB_API_SOCKET` and `STITCH_JOB_API_TOKEN`;
    /// `None` when either is unset or empty (no job API here).
    pub fn from_env() -> Option<Result<Self, JobApiError>> {
        let socket = std::env::var(env::JOB_API_SOCKET)
            .ok()
            .filter(|s| !s.is_empty())?;
        let token = std::env::var(env::JOB_API_TOKEN)
            .ok()
            .filter(|s| !s.is_empty())?;
        Some(Self::new(Path::new(&socket), &token))
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `POST /api/current-job/v0/promise-failure`.
    pub async fn promise_failure(
        &self,
        promise: &PromiseFailure,
    ) -> Result<PromiseFailureResult, JobApiError> {
        let resp = self
            .http
            // The host is a placeholder: the connection goes to the socket.
            .post(format!("http://job{PROMISE_FAILURE_PATH}"))
            .bearer_auth(&self.token)
            .json(promise)
            .send()
            .await
            .map_err(|e| JobApiError::Unreachable {
                socket: self.socket.clone(),
                detail: error_chain(&e),
            })?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| JobApiError::Unreachable {
            socket: self.socket.clone(),
            detail: error_chain(&e),
        })?;
        if status != 200 {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
            return Err(JobApiError::Refused { status, message });
        }
        serde_json::from_slice(&body).map_err(|e| JobApiError::Protocol(e.to_string()))
    }
}

/// The error and its sources, so "connection refused" is not hidden behind
/// "error sending request".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
