//! Bearer-token authentication. With tokens configured, every route except
//! `/healthz`, `/readyz`, the webhook receivers (which verify the
//! provider's own credentials) and the dashboard's pages and assets (no
//! data; the page sends the token on its API calls) needs
//! `Authorization: Bearer <token>`;
//! tokens are compared in constant time.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// Paths that answer without a token: liveness and readiness probes, and
/// webhook receivers (authenticated by the provider's token or signature).
const PUBLIC_PATHS: [&str; 5] = [
    "/healthz",
    "/readyz",
    "/webhooks/buildkite",
    "/webhooks/github",
    "/webhooks/gitlab",
];

/// The accepted tokens; empty means authentication is off.
#[derive(Clone)]
pub(crate) struct Auth {
    tokens: Arc<Vec<Vec<u8>>>,
}

impl Auth {
    pub(crate) fn new(tokens: Vec<String>) -> Self {
        let tokens = tokens
            .into_iter()
            .map(|t| t.trim().as_bytes().to_vec())
            .filter(|t| !t.is_empty())
            .collect();
        Self {
            tokens: Arc::new(tokens),
        }
    }

    /// Whether `presented` is one of the tokens. Every token is compared,
    /// each in time that depends only on the lengths, so the answer time
    /// does not reveal how much of a token matched.
    fn accepts(&self, presented: &[u8]) -> bool {
        let mut ok = false;
        for t in self.tokens.iter() {
            ok |= ct_eq(t, presented);
        }
        ok
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

fn unauthorized(message: &str) -> Response {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response()
}

/// Routes authenticated by a build's job token instead of the API tokens
/// (their handlers check it): `/v1/builds/{id}/promise-failure`.
fn job_token_route(path: &str) -> bool {
    path.strip_prefix("/v1/builds/")
        .and_then(|rest| rest.strip_suffix("/promise-failure"))
        .is_some_and(|id| !id.is_empty() && !id.contains('/'))
}

/// The bearer token of a request, or why there is none.
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Result<&str, &'static str> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or("missing Authorization: Bearer <token> header")?;
    let presented = value
        .to_str()
        .map_err(|_| "the Authorization header is not valid text")?;
    match presented.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case("bearer ") => Ok(presented[7..].trim()),
        _ => Err("the Authorization header must use the Bearer scheme"),
    }
}

/// Whether a path is behind the API tokens (when tokens are configured):
/// every path but the public ones and those with their own credentials.
pub(crate) fn needs_api_token(path: &str) -> bool {
    !(PUBLIC_PATHS.contains(&path) || job_token_route(path))
}

/// Middleware: refuses requests without a valid bearer token when tokens
/// are configured.
pub(crate) async fn require(State(auth): State<Auth>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    // Dashboard pages and assets hold no data and a browser cannot attach
    // a token to a navigation: they answer without one, and the page then
    // asks for it (the loopback guard still checks them).
    if auth.tokens.is_empty() || !needs_api_token(path) || crate::dashboard::is_dashboard_path(path)
    {
        return next.run(req).await;
    }
    let token = match bearer(req.headers()) {
        Ok(t) => t.as_bytes(),
        Err(message) => return unauthorized(message),
    };
    if !auth.accepts(token) {
        return unauthorized("invalid bearer token");
    }
    next.run(req).await
}
