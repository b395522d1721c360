//! `/v1/queues/{queue}/builds`, `/v1/builds`, `/v1/builds/{id}`,
//! `/v1/builds/{id}/cancel`.

use axum::extract::{FromRequest, Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use stitch_api::{BuildList, BuildRecord, ErrorBody, PromiseFailureBody};
use stitch_core::{BuildId, BuildStatus};
use stitch_store::{BuildFilter, Cursor};
use utoipa::openapi::schema::{AnyOfBuilder, Object, ObjectBuilder, Schema, Type};
use utoipa::IntoParams;

use super::error::ApiError;
use super::extract::{non_empty, ApiJson, ApiQuery};
use super::Ctx;
use crate::service;
use crate::service::CreateBuild;

/// Parses a build id from a path; an id that cannot exist is not found.
pub(crate) fn parse_id(raw: &str) -> Result<BuildId, ApiError> {
    let id = raw
        .parse::<BuildId>()
        .map_err(|_| ApiError::build_not_found(raw))?;
    super::observe::record_build_id(&id);
    Ok(id)
}

/// Create a build on a queue.
///
/// Validates the change set and metadata, then records the build and its
/// trigger message in one transaction. The same `idempotency_key` on the
/// same queue returns the existing build with 200 and creates nothing.
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/builds",
    tag = "builds",
    security(("bearer" = [])),
    params(("queue" = String, Path, example = "default", description = "A configured build queue (`default` on the embedded configuration)")),
    request_body = CreateBuild,
    responses(
        (status = 202, description = "Build created (accepted)", body = BuildRecord, links(
            ("get_build" = (operation_id = "get_build", parameters(("id" = "$response.body#/id")), description = "The build's record: its status")),
            ("cancel_build" = (operation_id = "cancel_build", parameters(("id" = "$response.body#/id")), description = "Cancel the build")),
            ("build_logs" = (operation_id = "build_logs", parameters(("id" = "$response.body#/id")), description = "The build's log"))
        )),
        (status = 200, description = "Idempotent replay: the build created earlier with this key", body = BuildRecord, links(
            ("get_build" = (operation_id = "get_build", parameters(("id" = "$response.body#/id")), description = "The build's record: its status")),
            ("cancel_build" = (operation_id = "cancel_build", parameters(("id" = "$response.body#/id")), description = "Cancel the build")),
            ("build_logs" = (operation_id = "build_logs", parameters(("id" = "$response.body#/id")), description = "The build's log"))
        )),
        (status = 400, description = "`malformed_json` or `invalid_request`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`unknown_queue`", body = ErrorBody),
        (status = 409, description = "`idempotency_key_reused`: the key was used for a different request", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody)
    )
)]
pub(crate) async fn create_build(
    State(ctx): State<Ctx>,
    Path(queue): Path<String>,
    ApiJson(body): ApiJson<CreateBuild>,
) -> Result<(StatusCode, Json<BuildRecord>), ApiError> {
    let (build, created) = service::create_build(&ctx.state, &queue, body).await?;
    super::observe::record_build_id(&build.id);
    let status = if created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(build.record())))
}

/// One build record.
#[utoipa::path(
    get,
    path = "/v1/builds/{id}",
    tag = "builds",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Build id (`b_…`)")),
    responses(
        (status = 200, description = "The build", body = BuildRecord),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`build_not_found`", body = ErrorBody)
    )
)]
pub(crate) async fn get_build(
    State(ctx): State<Ctx>,
    Path(id): Path<String>,
) -> Result<Json<BuildRecord>, ApiError> {
    let id = parse_id(&id)?;
    Ok(Json(service::get_build(&ctx.state, &id).await?.record()))
}

/// Query parameters of `GET /v1/builds`. Empty values mean "not given".
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListParams {
    /// Only builds of this queue.
    queue: Option<String>,
    /// Only builds with this status (`unknown`, `accepted`, `running`,
    /// `succeeded`, `failed`, `cancelled`).
    #[param(schema_with = status_or_empty)]
    status: Option<String>,
    /// Page size, 1–1000 (default 50).
    #[param(schema_with = limit_or_empty)]
    limit: Option<String>,
    /// `next_cursor` of the previous page: a build id.
    #[param(schema_with = cursor_or_empty)]
    cursor: Option<String>,
}

// The list parameters' schemas: each also admits the empty value, which
// means "not given" (`?queue=&status=`).

fn empty() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .max_length(Some(0))
}

fn status_or_empty() -> Object {
    let names = BuildStatus::ALL.iter().map(|s| s.as_str()).chain([""]);
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(names))
        .build()
}

fn limit_or_empty() -> Schema {
    AnyOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(1))
                .maximum(Some(BuildFilter::MAX_LIMIT)),
        )
        .item(empty())
        .build()
        .into()
}

fn cursor_or_empty() -> Object {
    let id = BuildId::PATTERN
        .trim_start_matches('^')
        .trim_end_matches('$');
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(format!("^({id})?$")))
        .build()
}

/// Builds, newest first, one page at a time.
#[utoipa::path(
    get,
    path = "/v1/builds",
    tag = "builds",
    security(("bearer" = [])),
    params(ListParams),
    responses(
        (status = 200, description = "A page of builds; `next_cursor` is null on the last page", body = BuildList),
        (status = 400, description = "`invalid_request` (bad status, limit or cursor, unknown parameter)", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody)
    )
)]
pub(crate) async fn list_builds(
    State(ctx): State<Ctx>,
    ApiQuery(p): ApiQuery<ListParams>,
) -> Result<Json<BuildList>, ApiError> {
    let status = match non_empty(p.status) {
        None => None,
        Some(s) => Some(s.parse::<BuildStatus>().map_err(|_| {
            ApiError::invalid(format!(
                "invalid status {s:?}: expected one of unknown, accepted, running, succeeded, \
                 failed, cancelled"
            ))
        })?),
    };
    let limit = match non_empty(p.limit) {
        None => BuildFilter::DEFAULT_LIMIT,
        Some(l) => match l.parse::<u32>() {
            Ok(n) if (1..=BuildFilter::MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::invalid(format!(
                    "invalid limit {l:?}: expected an integer from 1 to {}",
                    BuildFilter::MAX_LIMIT
                )))
            }
        },
    };
    let cursor = match non_empty(p.cursor) {
        None => None,
        Some(c) => Some(
            c.parse::<Cursor>()
                .map_err(|_| ApiError::invalid(format!("invalid cursor {c:?}")))?,
        ),
    };
    let filter = BuildFilter {
        queue: non_empty(p.queue),
        status,
        limit,
    };
    let (builds, next) = service::list_builds(&ctx.state, &filter, cursor.as_ref()).await?;
    Ok(Json(BuildList {
        builds: builds.iter().map(|b| b.record()).collect(),
        next_cursor: next.map(Cursor::into_build_id),
    }))
}

/// Request cancellation.
///
/// Records the intent and wakes the build's poll loop; the signal stage
/// cancels it at the provider and records `cancelled`. Idempotent; on a
/// terminal build nothing changes and the record is returned as it is.
#[utoipa::path(
    post,
    path = "/v1/builds/{id}/cancel",
    tag = "builds",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Build id (`b_…`)")),
    responses(
        (status = 202, description = "Cancel recorded (or the build is already terminal); the build as it is now", body = BuildRecord),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`build_not_found`", body = ErrorBody)
    )
)]
pub(crate) async fn cancel_build(
    State(ctx): State<Ctx>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<BuildRecord>), ApiError> {
    let id = parse_id(&id)?;
    let build = service::cancel_build(&ctx.state, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(build.record())))
}

/// Promise that the build's job will fail.
///
/// Called by the CI job (through `stitch job promise-failure`), authenticated
/// by the build's job token (`STITCH_JOB_TOKEN`) only — API tokens are not
/// accepted here. Records `promised_exit_status`, `promised_exit_status_at`
/// and `promised_exit_status_reason` in the build's metadata and appends a
/// `failing` event; on a `fail_fast` queue the build is failed at once and
/// its CI build cancelled. The same status again is a no-op (204).
#[utoipa::path(
    post,
    path = "/v1/builds/{id}/promise-failure",
    tag = "builds",
    security(("job_token" = [])),
    params(("id" = String, Path, description = "Build id (`b_…`)")),
    request_body = PromiseFailureBody,
    responses(
        (status = 204, description = "Promise recorded (or the same exit status was already promised)"),
        (status = 400, description = "`malformed_json` or `invalid_request` (exit_status not an integer from 1 to 2147483647, reason too long, unknown field)", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no job token", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token is not this build's job token", body = ErrorBody),
        (status = 404, description = "`build_not_found`", body = ErrorBody),
        (status = 409, description = "`different_exit_status_promised`", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 422, description = "`build_not_running` (terminal) or `build_not_started` (not triggered yet)", body = ErrorBody)
    )
)]
pub(crate) async fn promise_failure(
    State(ctx): State<Ctx>,
    Path(id): Path<String>,
    request: axum::extract::Request,
) -> Result<StatusCode, ApiError> {
    // Credentials before work: the token is checked before the body is read
    // and without the database (a build's token is derived from its id and
    // the server key), so an unauthenticated caller never gets a parse, a
    // query or the store's write lock out of the server.
    let token = super::auth::bearer(request.headers())
        .map_err(|message| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message))?
        .to_string();
    let id = parse_id(&id)?;
    if !ctx.state.job_tokens().verify(&id, &token, None) {
        return Err(service::ServiceError::WrongJobToken(id).into());
    }
    let ApiJson(body) = ApiJson::<PromiseFailureBody>::from_request(request, &ctx).await?;
    let promise = stitch_job::PromiseFailure::new(body.exit_status, body.reason)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let recorded = service::promise_failure(&ctx.state, &id, &token, &promise).await?;
    if recorded == service::PromiseRecorded::Declared {
        tracing::info!(build = %id, exit_status = promise.exit_status, "promised failure recorded");
    }
    Ok(StatusCode::NO_CONTENT)
}
