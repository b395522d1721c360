//! The OpenAPI document: every route and the schemas it names, with the
//! two bearer schemes. Served at `/openapi.json`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::schema::{
    BuildList, BuildRecord, BuildStatus, ErrorBody, ErrorDetail, Event, EventKind, HealthBody,
    LogLine,
};
use super::{builds, events, logs, ops, webhooks};
use crate::service::CreateBuild;

/// The OpenAPI document of the API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "stitch",
        description = "Drive builds on any CI through one contract. See docs/api.md."
    ),
    paths(
        builds::create_build,
        builds::list_builds,
        builds::get_build,
        builds::cancel_build,
        builds::promise_failure,
        logs::build_logs,
        events::events,
        ops::healthz,
        ops::readyz,
        ops::metrics,
        ops::openapi,
        webhooks::buildkite,
        webhooks::github,
    ),
    components(schemas(
        CreateBuild,
        builds::PromiseFailureBody,
        BuildRecord,
        BuildStatus,
        BuildList,
        Event,
        EventKind,
        LogLine,
        ErrorBody,
        webhooks::WebhookOutcome,
        ErrorDetail,
        HealthBody
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "builds", description = "Create, read, list and cancel builds"),
        (name = "streams", description = "Event and log streams (SSE or WebSocket)"),
        (name = "operations", description = "Health, readiness, metrics, this document"),
        (name = "webhooks", description = "Provider webhooks that wake a build's poll loop")
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "job_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The build's job token (STITCH_JOB_TOKEN)"))
                    .build(),
            ),
        );
    }
}
