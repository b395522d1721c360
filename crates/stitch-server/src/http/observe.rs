//! What every request goes through on its way in and out, whatever route
//! answers it (the API, webhooks, the dashboard, add-ons):
//!
//! - a request id: the caller's `x-request-id`, else a new UUID; the
//!   answer carries it back in `x-request-id`;
//! - a span `request` with the method, the route template (never the
//!   path or query, never a header), the status, the request id and, on
//!   build routes, the build id; its lines and the spans exported over
//!   OTLP carry them;
//! - a panic in a handler answers 500 `internal` in the API's error shape
//!   and is logged in the request's span;
//! - headers holding secrets are marked sensitive, so that no `Debug` of
//!   a request prints them.

use std::any::Any;
use std::time::Duration;

use axum::extract::MatchedPath;
use axum::http::{header, HeaderName, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;
use tracing::Span;

use super::error::ApiError;

/// The header a request id travels in, both ways.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest caller-chosen request id that is logged as it is; a longer one
/// is logged cut, so that a caller cannot flood the log through it.
const MAX_LOGGED_REQUEST_ID: usize = 128;

/// Request headers that carry secrets (API and job tokens, webhook
/// tokens and signatures, cookies).
fn sensitive_headers() -> [HeaderName; 6] {
    [
        header::AUTHORIZATION,
        header::PROXY_AUTHORIZATION,
        header::COOKIE,
        HeaderName::from_static("x-buildkite-token"),
        HeaderName::from_static("x-hub-signature"),
        HeaderName::from_static("x-hub-signature-256"),
    ]
}

/// Wraps every route of `router` in the layers above (outermost first:
/// sensitive headers, request id, its echo, the span, the panic guard).
pub fn layer(router: Router) -> Router {
    router
        .layer(CatchPanicLayer::custom(answer_panic))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(record_response)
                // The status is on the span; 5xx answers are logged where
                // they are made (ApiError::internal, the panic guard).
                .on_failure(()),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(SetSensitiveRequestHeadersLayer::new(sensitive_headers()))
}

fn request_span<B>(req: &Request<B>) -> Span {
    let method = req.method().as_str();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    let request_id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(|id| match id.char_indices().nth(MAX_LOGGED_REQUEST_ID) {
            Some((cut, _)) => &id[..cut],
            None => id,
        });
    tracing::info_span!(
        "request",
        otel.name = %format_args!("{method} {}", route.unwrap_or("unmatched")),
        otel.kind = "server",
        method,
        route,
        request_id,
        status = tracing::field::Empty,
        build_id = tracing::field::Empty,
    )
}

fn record_response<B>(res: &Response<B>, latency: Duration, span: &Span) {
    // As i64: OTLP has no unsigned integers (a u64 is exported as text).
    span.record("status", i64::from(res.status().as_u16()));
    tracing::debug!(
        status = res.status().as_u16(),
        latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
        "answered"
    );
}

/// Names the build a request is about on its span.
pub(crate) fn record_build_id(id: &impl std::fmt::Display) {
    Span::current().record("build_id", tracing::field::display(id));
}

/// The answer to a handler that panicked: logged (the hook printed the
/// location already), then the API's generic 500.
fn answer_panic(payload: Box<dyn Any + Send + 'static>) -> Response<axum::body::Body> {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string());
    tracing::error!(panic = %message, "request handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error; the details are in the server log",
    )
    .into_response()
}
