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

use std::convert::Infallible;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rand::RngCore;
use subtle::ConstantTimeEq;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
        let task = tokio::spawn(serve(listener, state, stop.clone()));
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

/// How long a connection may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts connections until `stop`, then lets in-flight requests finish.
///
/// hyper's HTTP/1 connection is used directly rather than through a
/// router: a test suite failing everywhere opens one connection per
/// failing test, all at once, and per-connection cost is what decides how
/// fast the last caller is answered (docs/benchmarks.md, promise-failure).
async fn serve(listener: UnixListener, state: ApiState, stop: CancellationToken) {
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors or memory: the listener is fine,
                    // connections will be accepted again once some close.
                    tracing::warn!(error = %e, "job API cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            let served = tokio::select! {
                r = conn.as_mut() => r,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "job API connection ended with an error");
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// One request: token first (so nothing about the API is visible without
/// it), then route, method, body size, body.
async fn handle(state: &ApiState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Err(message) = authorize(state, req.headers()) {
        return error(StatusCode::UNAUTHORIZED, message);
    }
    if req.uri().path() != PROMISE_FAILURE_PATH {
        return error(StatusCode::NOT_FOUND, "no such job API route");
    }
    if req.method() != Method::POST {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "promise-failure accepts POST only",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
            )
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            )
        }
    };
    let promise = match PromiseFailure::from_json(&body) {
        Ok(p) => p,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let result = state.coordinator.declare(promise).await;
    json(StatusCode::OK, &result)
}

/// `Err` carries the 401 message.
fn authorize(state: &ApiState, headers: &HeaderMap) -> Result<(), &'static str> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .and_then(|v| {
            v.get(..7)
                .filter(|s| s.eq_ignore_ascii_case(b"bearer "))
                .map(|_| v[7..].trim_ascii())
        });
    match presented {
        None => Err("missing Authorization: Bearer <STITCH_JOB_API_TOKEN> header"),
        Some(t) if bool::from(t.ct_eq(&state.token)) => Ok(()),
        Some(_) => Err("invalid job API token"),
    }
}

/// The job API's error shape: `{"error":"..."}`.
fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message.into() }))
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    // Serializing these plain structs cannot fail; an empty object is a
    // safe answer should it ever.
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
