//! The OpenAPI document: every route and the schemas it names (the wire
//! types of `stitch-api` and `stitch-core`), with the two bearer schemes.
//! Served at `/openapi.json` as [`document`] shapes it for the server's mode.

use serde_json::{json, Value};
use stitch_api::{
    BuildList, BuildRecord, CreateBuild, DeadLetterList, DeadLetterRecord, ErrorBody, ErrorDetail,
    Event, EventKind, HealthBody, HourBucket, PromiseFailureBody, QueueList, QueueSummary,
    StatusCounts, WebhookOutcome,
};
use stitch_core::{BuildId, BuildStatus, LogKind, LogLine, OutputStream, RunnerRef, StepStatus};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{builds, events, logs, ops, queues, webhooks, webhooks_gitlab};

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
        queues::list_queues,
        queues::list_dead_letters,
        queues::replay_dead_letter,
        ops::healthz,
        ops::readyz,
        ops::metrics,
        ops::openapi,
        webhooks::buildkite,
        webhooks::github,
        webhooks_gitlab::gitlab,
    ),
    components(schemas(
        CreateBuild,
        PromiseFailureBody,
        BuildId,
        BuildRecord,
        BuildStatus,
        RunnerRef,
        BuildList,
        Event,
        EventKind,
        LogLine,
        LogKind,
        OutputStream,
        StepStatus,
        ErrorBody,
        WebhookOutcome,
        ErrorDetail,
        HealthBody,
        QueueList,
        QueueSummary,
        StatusCounts,
        HourBucket,
        DeadLetterList,
        DeadLetterRecord
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "builds", description = "Create, read, list and cancel builds"),
        (name = "queues", description = "Queues with live counts, and the stages' dead letters"),
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
            API_TOKEN_SCHEME,
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

/// The name of the API-token scheme in the document.
const API_TOKEN_SCHEME: &str = "bearer";

/// The document as this server serves it. Without API tokens (the
/// loopback mode) no route asks for one, so the operations drop the
/// API-token requirement (the scheme stays described); the job-token route
/// keeps its own.
///
/// `queues` are the configured queues: the only values `/v1/events`
/// accepts for `queue=` (anything else is a 400), so the document lists them.
pub(crate) fn document(api_tokens: bool, queues: &[String]) -> String {
    let mut doc = match serde_json::to_value(ApiDoc::openapi()) {
        Ok(doc) => doc,
        Err(_) => return "{}".to_string(),
    };
    spell_links(&mut doc);
    optional_parameters_are_absent_not_null(&mut doc);
    describe_sse_frames(&mut doc);
    name_event_queues(&mut doc, queues);
    if !api_tokens {
        drop_api_token(&mut doc);
    }
    doc.to_string()
}

/// An optional parameter is left out, never sent as `null`; utoipa
/// describes an `Option<T>` parameter as nullable.
fn optional_parameters_are_absent_not_null(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    let parameters = paths
        .values_mut()
        .filter_map(Value::as_object_mut)
        .flat_map(|item| item.values_mut())
        .filter_map(|op| op.get_mut("parameters").and_then(Value::as_array_mut))
        .flat_map(|params| params.iter_mut());
    for param in parameters {
        if param.get("required") == Some(&Value::Bool(true)) {
            continue;
        }
        let Some(schema) = param.get_mut("schema").and_then(Value::as_object_mut) else {
            continue;
        };
        if let Some(types) = schema.get_mut("type").and_then(Value::as_array_mut) {
            types.retain(|t| t != "null");
            if let [only] = types.as_slice() {
                let only = only.clone();
                schema.insert("type".into(), only);
            }
        }
        let one_of = schema.remove("oneOf");
        if let Some(Value::Array(mut variants)) = one_of {
            variants.retain(|v| v.get("type").and_then(Value::as_str) != Some("null"));
            match <[Value; 1]>::try_from(variants) {
                Ok([only]) => {
                    if let Value::Object(only) = only {
                        schema.extend(only);
                    }
                }
                Err(variants) => {
                    schema.insert("oneOf".into(), Value::Array(variants));
                }
            }
        }
    }
}

/// The `queue` filter of `/v1/events` takes a configured queue's name, or
/// the empty value ("not given").
fn name_event_queues(doc: &mut Value, queues: &[String]) {
    let Some(params) = doc
        .pointer_mut("/paths/~1v1~1events/get/parameters")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    let names: Vec<&str> = queues.iter().map(String::as_str).chain([""]).collect();
    for param in params {
        if param.get("name").and_then(Value::as_str) == Some("queue") {
            param["schema"] = json!({"type": "string", "enum": names});
        }
    }
}

/// What one SSE frame of `/v1/events` and `/v1/builds/{id}/logs` is: the
/// `event` name and the JSON in `data` (the 200 answers name the frame's
/// payload type; this spells the frame out around it).
fn describe_sse_frames(doc: &mut Value) {
    let frame = |event: &str, schema: &str| {
        json!({
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "id": {"type": "string"},
                "event": {"const": event},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"$ref": format!("#/components/schemas/{schema}")}
                }
            }
        })
    };
    let events = frame("build", "Event");
    let logs = json!({
        "description": "`log` frames (one `LogLine` each, `id` its 1-based position), then one `end` frame; an `error` frame instead if reading the log fails",
        "oneOf": [
            frame("log", "LogLine"),
            frame("end", "HealthBody"),
            frame("error", "ErrorBody")
        ]
    });
    for (path, schema) in [("/v1/events", events), ("/v1/builds/{id}/logs", logs)] {
        let pointer = format!(
            "/paths/{}/get/responses/200/content/text~1event-stream/schema",
            path.replace('~', "~0").replace('/', "~1")
        );
        if let Some(slot) = doc.pointer_mut(&pointer) {
            *slot = schema;
        }
    }
}

/// utoipa 5 writes a link's target as `operation_id`/`operation_ref`;
/// OpenAPI spells them `operationId`/`operationRef`, and tools ignore a
/// link without them.
fn spell_links(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    let responses = paths
        .values_mut()
        .filter_map(Value::as_object_mut)
        .flat_map(|item| item.values_mut())
        .filter_map(|op| op.get_mut("responses").and_then(Value::as_object_mut))
        .flat_map(|responses| responses.values_mut());
    for response in responses {
        let Some(links) = response.get_mut("links").and_then(Value::as_object_mut) else {
            continue;
        };
        for link in links.values_mut().filter_map(Value::as_object_mut) {
            for (from, to) in [
                ("operation_id", "operationId"),
                ("operation_ref", "operationRef"),
            ] {
                if let Some(v) = link.remove(from) {
                    link.insert(to.to_string(), v);
                }
            }
        }
    }
}

fn drop_api_token(doc: &mut Value) {
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for operation in paths.values_mut().filter_map(Value::as_object_mut) {
            for op in operation.values_mut().filter_map(Value::as_object_mut) {
                let only_api_token =
                    op.get("security")
                        .and_then(Value::as_array)
                        .is_some_and(|reqs| {
                            reqs.iter().all(|r| {
                                r.get(API_TOKEN_SCHEME).is_some()
                                    && r.as_object().is_some_and(|o| o.len() == 1)
                            })
                        });
                if only_api_token {
                    op.remove("security");
                }
            }
        }
    }
}
