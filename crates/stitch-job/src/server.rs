//! [`JobApi`]: HTTP on a Unix socket for one job.
//!
//! The socket lives in a fresh directory of mode 0700 under the temporary
//! directory, and is itself mode 0600, so only the user running the job
//! can connect; every request must also carry `Authorization: Bearer
//! <token>` with the random token handed to the job (401 otherwise).
//!
//! Routes (all under `/api/current-job/v0`):
//! - `POST /promise-failure` `{exit_status, reason?}` → 200
//!   `{outcome, accepted, upstream_status?, error?}` even when the server
//!   refused the promise; 400 for an invalid body or exit status. Job API
//!   errors answer `{"error":"..."}`.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use rand::RngCore;
use subtle::ConstantTimeEq;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::coordinator::PromiseFailureCoordinator;
use crate::env;
use crate::promise::PromiseFailure;

/// Path of the promise-failure route.
pub const PROMISE_FAILURE_PATH: &str = "/api/current-job/v0/promise-failure";

/// Largest accepted request body.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Name of the socket inside the private directory.
const SOCKET_NAME: &str = "job-api.sock";

/// A running job API. Dropping it stops serving and removes the socket
/// and its directory.
pub struct JobApi {
    socket: PathBuf,
    token: String,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    // Last: the directory goes after the server was told to stop.
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for JobApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobApi")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct ApiState {
    coordinator: Arc<PromiseFailureCoordinator>,
    token: Arc<[u8]>,
}

impl JobApi {
    /// Starts a job API serving `coordinator` on a new socket in a new
    /// private directory under the system temporary directory. Must be
    /// called inside a Tokio runtime.
    pub fn start(coordinator: Arc<PromiseFailureCoordinator>) -> io::Result<Self> {
        Self::start_in(&std::env::temp_dir(), coordinator)
    }

    /// [`JobApi::start`] with the private directory created under `parent`.
    /// Socket paths are limited to about 100 bytes: keep `parent` short.
    pub fn start_in(
        parent: &Path,
        coordinator: Arc<PromiseFailureCoordinator>,
    ) -> io::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("stitch-job-")
            .tempdir_in(parent)?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        let socket = dir.path().join(SOCKET_NAME);
        let listener = UnixListener::bind(&socket)?;
        // The directory already keeps others out; the mode says so twice.
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;

        let mut raw = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let token = hex::encode(raw);
        let state = ApiState {
            coordinator,
            token: Arc::from(token.as_bytes()),
        };
        let stop = CancellationToken::new();
        let app = router(state);
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "job API stopped with an error");
            }
        });
        Ok(Self {
            socket,
            token,
            stop,
            task: Some(task),
            _dir: dir,
        })
    }

    /// The socket's path (`STITCH_JOB_API_SOCKET`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The bearer token (`STITCH_JOB_API_TOKEN`).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The environment a job needs to reach this API.
    pub fn env(&self) -> [(&'static str, String); 2] {
        [
            (
                env::JOB_API_SOCKET,
                self.socket.to_string_lossy().into_owned(),
            ),
            (env::JOB_API_TOKEN, self.token.clone()),
        ]
    }

    /// Stops accepting connections, lets in-flight requests finish, then
    /// removes the socket directory.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for JobApi {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn router(state: ApiState) -> Router {
    Router::new()
        .route(PROMISE_FAILURE_PATH, post(promise_failure))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such job API route") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .with_state(state)
}

/// The job API's error shape: `{"error":"..."}`.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

async fn require_token(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .and_then(|v| {
            v.get(..7)
                .filter(|s| s.eq_ignore_ascii_case(b"bearer "))
                .map(|_| v[7..].trim_ascii())
        });
    match presented {
        None => error(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer <STITCH_JOB_API_TOKEN> header",
        ),
        Some(t) if bool::from(t.ct_eq(&state.token)) => next.run(req).await,
        Some(_) => error(StatusCode::UNAUTHORIZED, "invalid job API token"),
    }
}

async fn promise_failure(
    State(state): State<ApiState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    let promise = match PromiseFailure::from_json(&body) {
        Ok(p) => p,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let result = state.coordinator.declare(promise).await;
    (StatusCode::OK, Json(result)).into_response()
}
