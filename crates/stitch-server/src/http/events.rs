//! `GET /v1/events?after=SEQ`: the event log as SSE or WebSocket.

use axum::extract::ws::{close_code, WebSocketUpgrade};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::StreamExt;
use serde::Deserialize;
use stitch_store::StoreError;
use utoipa::IntoParams;

use super::error::ApiError;
use super::extract::{non_empty, ApiQuery};
use super::streams::{self, WsItem};
use super::{Ctx, Shutdown};
use stitch_api::{ErrorBody, Event};
use stitch_core::BuildId;

/// Query parameters of `GET /v1/events`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct EventParams {
    /// Send events with `seq` greater than this (default 0: everything), or
    /// `latest`: only events committed after this request (the position is
    /// the newest `seq` when the request arrives). For SSE a `Last-Event-ID`
    /// header wins over it.
    #[param(schema_with = after_schema)]
    after: Option<String>,
    /// Only events of builds of this configured queue.
    queue: Option<String>,
    /// Only events of this build (`b_…`).
    #[param(schema_with = build_id_or_empty)]
    build: Option<String>,
}

/// A build id, or the empty value ("not given").
fn build_id_or_empty() -> utoipa::openapi::Object {
    let id = BuildId::PATTERN
        .trim_start_matches('^')
        .trim_end_matches('$');
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .pattern(Some(format!("^({id})?$")))
        .build()
}

/// Which events a stream sends: `queue=` and `build=` narrow it; both
/// given, an event must match both.
#[derive(Debug, Default, Clone)]
struct EventFilter {
    queue: Option<String>,
    build: Option<BuildId>,
}

impl EventFilter {
    fn parse(ctx: &Ctx, queue: Option<String>, build: Option<String>) -> Result<Self, ApiError> {
        let queue = match non_empty(queue) {
            None => None,
            Some(q) if ctx.state.build_queue(&q).is_some() => Some(q),
            Some(q) => {
                let known: Vec<&str> = ctx.state.build_queues().map(|r| r.name.as_str()).collect();
                return Err(ApiError::invalid(format!(
                    "invalid queue {q:?}: not a configured queue (configured: {})",
                    known.join(", ")
                )));
            }
        };
        let build = match non_empty(build) {
            None => None,
            Some(b) => Some(b.parse::<BuildId>().map_err(|_| {
                ApiError::invalid(format!(
                    "invalid build {b:?}: expected a build id (b_ and 26 base32 characters)"
                ))
            })?),
        };
        Ok(Self { queue, build })
    }

    fn matches(&self, e: &stitch_store::Event) -> bool {
        self.queue.as_ref().is_none_or(|q| *q == e.queue)
            && self.build.as_ref().is_none_or(|b| *b == e.build_id)
    }
}

/// `after`: an int64 position, or `latest`.
fn after_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat, Type};
    OneOfBuilder::new()
        .description(Some(
            "Send events with `seq` greater than this (default 0: everything), or `latest`: \
             only events committed after the request. A `Last-Event-ID` header wins over it.",
        ))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                .minimum(Some(0)),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["latest"])),
        )
        .build()
        .into()
}

/// The event stream.
///
/// Without an upgrade: `text/event-stream`, one frame per event
/// (`id: <seq>`, `event: build`, `data: <event JSON>`), a `: keepalive`
/// comment every 15 s, resumable with `Last-Event-ID`. With
/// `Upgrade: websocket`: one text frame per event (the event JSON), ping
/// frames as keepalive, resumable with `?after=`. Events come in `seq`
/// order without gaps or duplicates. `queue=` and `build=` send only the
/// events of that queue or build (replay included).
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "streams",
    security(("bearer" = [])),
    params(
        EventParams,
        ("Last-Event-ID" = Option<u64>, Header, description = "SSE resume: the last `seq` received (wins over `after`)")
    ),
    responses(
        (status = 200, description = "SSE stream of events", content_type = "text/event-stream", body = Event),
        (status = 101, description = "WebSocket: one text frame per event"),
        (status = 400, description = "`invalid_request` (bad `after` or `Last-Event-ID`, a `queue` that is not configured, a `build` that is not a build id)", body = ErrorBody),
        (status = 410, description = "`events_pruned`: events after the position were deleted by retention; `oldest_seq` is the oldest retained", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody)
    )
)]
pub(crate) async fn events(
    State(ctx): State<Ctx>,
    ApiQuery(p): ApiQuery<EventParams>,
    headers: HeaderMap,
    shutdown: Option<Extension<Shutdown>>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // `latest` lets a client follow one build from now on without replaying
    // the whole log: it reads the build's record after this answer arrives,
    // so no change falls between the record and the stream.
    let mut after = match p.after.as_deref().map(str::trim) {
        Some("latest") => ctx.state.store().latest_seq().await?,
        raw => streams::parse_position("after", raw)?,
    };
    let filter = EventFilter::parse(&ctx, p.queue, p.build)?;
    if let Some(id) = streams::last_event_id(&headers)? {
        after = id;
    }
    // Before any upgrade: a position retention has passed is a 410 on
    // every transport, so the client knows to resync.
    ctx.state.store().check_events_position(after).await?;
    let shutdown = shutdown.map(|Extension(s)| s.0).unwrap_or_default();
    let keepalive = ctx.options.keepalive;
    // Errors pass: they end the stream whatever the filter.
    let tail = ctx
        .state
        .event_stream(after)
        .filter(move |r| std::future::ready(r.as_ref().map_or(true, |e| filter.matches(&e.event))));

    if streams::wants_websocket(&headers) {
        let ws = ws.map_err(|r| ApiError::invalid(r.body_text()))?;
        let guard = ctx.metrics.stream("events", "websocket");
        let frames = tail
            .map(|r| match r {
                Ok(e) => WsItem::Text(e.json.clone()),
                Err(err @ StoreError::EventsPruned { .. }) => {
                    tracing::info!(error = %err, "event stream: the client fell behind retention");
                    WsItem::Fail(format!("events_pruned: {err}"))
                }
                Err(err) => {
                    tracing::error!(error = %err, "event stream: reading the event log failed");
                    WsItem::Fail("reading the event log failed; reconnect with ?after=".into())
                }
            })
            .boxed();
        // Clients only send pings and closes: a small read buffer keeps an idle
        // connection cheap (the default re-zeroes 128 KiB per read).
        let ws = streams::limit_websocket(ws, &ctx.state.config().http);
        return Ok(ws.read_buffer_size(4096).on_upgrade(move |socket| {
            streams::pump_websocket(
                socket,
                frames,
                keepalive,
                shutdown,
                (close_code::NORMAL, "event stream ended"),
                guard,
            )
        }));
    }

    let guard = ctx.metrics.stream("events", "sse");
    let frames = tail
        .take_while(|r| {
            match r {
                // The client reconnects with Last-Event-ID and gets the 410.
                Err(err @ StoreError::EventsPruned { .. }) => {
                    tracing::info!(error = %err, "event stream: the client fell behind retention")
                }
                Err(err) => {
                    tracing::error!(error = %err, "event stream: reading the event log failed")
                }
                Ok(_) => {}
            }
            std::future::ready(r.is_ok())
        })
        .filter_map(|r| {
            std::future::ready(r.ok().map(|e| {
                SseEvent::default()
                    .id(e.event.seq.to_string())
                    .event("build")
                    .data(&e.json)
            }))
        });
    Ok(streams::sse_response(frames, keepalive, shutdown, guard).into_response())
}
