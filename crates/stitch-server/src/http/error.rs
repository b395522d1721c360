//! API errors: `{"error":{"code":"<stable_snake_case>","message":"..."}}`
//! with the matching HTTP status. Internal faults answer a generic message;
//! their details go to the log only.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use stitch_api::{ErrorBody, ErrorDetail};

use crate::service::ServiceError;

/// An error answer of the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable snake_case code.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// For `events_pruned`: the oldest event still stored.
    pub oldest_seq: Option<u64>,
}

impl ApiError {
    /// An error with an explicit status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            oldest_seq: None,
        }
    }

    /// 410 `events_pruned`: retention deleted events after `after`; the
    /// body names the oldest one still stored, so the client resyncs from
    /// `/v1/builds` and follows on from there.
    pub fn events_pruned(after: u64, oldest: u64) -> Self {
        Self {
            oldest_seq: Some(oldest),
            ..Self::new(
                StatusCode::GONE,
                "events_pruned",
                format!(
                    "events after {after} were deleted by retention; the oldest retained event is {oldest}: \
                     resync from /v1/builds and follow with after={}",
                    oldest.saturating_sub(1)
                ),
            )
        }
    }

    /// 400 `invalid_request`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 404 `build_not_found`.
    pub fn build_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "build_not_found",
            format!("build {id:?} not found"),
        )
    }

    /// 500 `internal` with a generic message; `detail` is logged.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error answering an API request");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the details are in the server log",
        )
    }

    /// 503 `unavailable`: a transient fault (database busy); retry later.
    pub fn unavailable(detail: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %detail, "transient error answering an API request");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "temporarily unavailable; retry shortly",
        )
    }

    /// The JSON body.
    pub fn body_json(&self) -> String {
        serde_json::to_string(&ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
                oldest_seq: self.oldest_seq,
            },
        })
        .unwrap_or_else(|_| r#"{"error":{"code":"internal","message":"internal error"}}"#.into())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            self.body_json(),
        )
            .into_response();
        match self.status {
            StatusCode::UNAUTHORIZED => {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer realm="stitch""#),
                );
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        resp
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match &e {
            ServiceError::UnknownQueue(_) => {
                Self::new(StatusCode::NOT_FOUND, e.code(), e.to_string())
            }
            ServiceError::Invalid(_) | ServiceError::BadRequest(_) => {
                Self::new(StatusCode::BAD_REQUEST, e.code(), e.to_string())
            }
            ServiceError::NotFound(id) => Self::build_not_found(id.as_str()),
            ServiceError::IdempotencyConflict { .. } => {
                Self::new(StatusCode::CONFLICT, e.code(), e.to_string())
            }
            ServiceError::WrongJobToken(_) => {
                Self::new(StatusCode::FORBIDDEN, e.code(), e.to_string())
            }
            ServiceError::PromisedDifferently { .. } => {
                Self::new(StatusCode::CONFLICT, e.code(), e.to_string())
            }
            ServiceError::NotRunning { .. } | ServiceError::NotStarted(_) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, e.code(), e.to_string())
            }
            ServiceError::Store(se) if se.is_retryable() => Self::unavailable(&e),
            ServiceError::Store(_) | ServiceError::Queue(_) => Self::internal(&e),
        }
    }
}

impl From<stitch_store::StoreError> for ApiError {
    fn from(e: stitch_store::StoreError) -> Self {
        match e {
            stitch_store::StoreError::EventsPruned { after, oldest } => {
                Self::events_pruned(after, oldest)
            }
            e => ServiceError::from(e).into(),
        }
    }
}

/// Fallback for unknown routes: 404 `not_found`.
pub(crate) async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {}", uri.path()),
    )
}

/// Fallback for a known route with another method: 405 `method_not_allowed`.
pub(crate) async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("method {method} is not allowed on this route"),
    )
}
