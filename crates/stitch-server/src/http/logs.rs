//! `GET /v1/builds/{id}/logs`: a build's `LogLine` frames as WebSocket or
//! SSE, following a running build live.
//!
//! Source: the runner's `logs()` stream when the runner has one for this
//! build; otherwise log lines stored for the build (followed while the
//! build is not terminal). With neither, the answer is a plain 404 before
//! any upgrade, as Tangled's appview expects.

use std::collections::VecDeque;
use std::time::Duration;

use axum::extract::ws::{close_code, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::stream::{BoxStream, StreamExt};
use serde::Deserialize;
use stitch_core::{BuildHandle, BuildId, RunnerError};
use stitch_store::Build;
use utoipa::IntoParams;

use super::builds::parse_id;
use super::error::ApiError;
use super::extract::ApiQuery;
use super::streams::{self, WsItem};
use super::{Ctx, Shutdown};
use crate::service;
use crate::state::AppState;
use stitch_api::ErrorBody;
use stitch_core::LogLine;

/// Stored log lines read per query.
const LINE_BATCH: u32 = 500;
/// Longest wait for a runner to open a build's log.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Frames of a log: the JSON text of each `LogLine`, or why reading failed.
type LogFrames = BoxStream<'static, Result<String, String>>;

/// Query parameters of `GET /v1/builds/{id}/logs`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct LogParams {
    /// Skip this many frames (the number already received). For SSE a
    /// `Last-Event-ID` header wins over it.
    #[param(value_type = Option<u64>)]
    after: Option<String>,
}

/// A build's log.
///
/// WebSocket (`Upgrade: websocket`): one text frame per `LogLine`, ping
/// frames as keepalive, close 1000 `log stream complete` when the log
/// ends (close 1011 if reading it fails). Otherwise SSE: `event: log`
/// frames with `id: <n>` (the frame's 1-based position), then one
/// `event: end` frame, then the stream ends. For a build that is still
/// running, new lines follow as they are written.
#[utoipa::path(
    get,
    path = "/v1/builds/{id}/logs",
    tag = "streams",
    security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "Build id (`b_…`)"),
        LogParams,
        ("Last-Event-ID" = Option<u64>, Header, description = "SSE resume: the last frame `id` received (wins over `after`)")
    ),
    responses(
        (status = 200, description = "SSE stream of log frames", content_type = "text/event-stream", body = LogLine),
        (status = 101, description = "WebSocket: one text frame per log line"),
        (status = 400, description = "`invalid_request` (bad `after`)", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`build_not_found`, or `logs_not_found` (the runner has no logs for this build, or it has not started)", body = ErrorBody),
        (status = 502, description = "`runner_error`: the runner failed to open the log", body = ErrorBody)
    )
)]
pub(crate) async fn build_logs(
    State(ctx): State<Ctx>,
    Path(id): Path<String>,
    ApiQuery(p): ApiQuery<LogParams>,
    headers: HeaderMap,
    shutdown: Option<Extension<Shutdown>>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let mut skip = streams::parse_position("after", p.after.as_deref())?;
    let websocket = streams::wants_websocket(&headers);
    if !websocket {
        if let Some(n) = streams::last_event_id(&headers)? {
            skip = n;
        }
    }
    let ws = if websocket {
        Some(ws.map_err(|r| ApiError::invalid(r.body_text()))?)
    } else {
        None
    };
    let build = service::get_build(&ctx.state, &id).await?;
    // Everything that can fail with 404 happens here, before any upgrade.
    let source = open_source(&ctx, &build).await?;
    let skip_n = usize::try_from(skip).unwrap_or(usize::MAX);
    let source = source.skip(skip_n).boxed();
    let shutdown = shutdown.map(|Extension(s)| s.0).unwrap_or_default();
    let keepalive = ctx.options.keepalive;

    if let Some(ws) = ws {
        let guard = ctx.metrics.stream("logs", "websocket");
        let frames = source
            .map(|r| match r {
                Ok(json) => WsItem::Text(json),
                Err(reason) => WsItem::Fail(reason),
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
                (close_code::NORMAL, "log stream complete"),
                guard,
            )
        }));
    }

    let guard = ctx.metrics.stream("logs", "sse");
    let frames = futures::stream::unfold((source, skip, false), |(mut s, n, done)| async move {
        if done {
            return None;
        }
        match s.next().await {
            Some(Ok(json)) => {
                let n = n + 1;
                let frame = SseEvent::default()
                    .id(n.to_string())
                    .event("log")
                    .data(json);
                Some((frame, (s, n, false)))
            }
            Some(Err(reason)) => {
                let body = ApiError::new(StatusCode::BAD_GATEWAY, "log_stream_failed", reason);
                let frame = SseEvent::default().event("error").data(body.body_json());
                Some((frame, (s, n, true)))
            }
            None => {
                let frame = SseEvent::default()
                    .event("end")
                    .data(r#"{"status":"complete"}"#);
                Some((frame, (s, n, true)))
            }
        }
    });
    Ok(streams::sse_response(frames, keepalive, shutdown, guard).into_response())
}

/// Picks where the build's log comes from, or answers 404/502.
async fn open_source(ctx: &Ctx, build: &Build) -> Result<LogFrames, ApiError> {
    let mut handle = BuildHandle::new(build.id.clone(), build.queue.clone());
    if let Some(r) = &build.runner_ref {
        handle = handle.with_ref(r.clone());
    }
    let mut why_none = String::new();
    let mut runner_failure = None;
    match ctx.state.build_queue(&build.queue) {
        None => {
            why_none = format!("queue {:?} is no longer configured", build.queue);
        }
        Some(rt) => match tokio::time::timeout(OPEN_TIMEOUT, rt.runner.logs(&handle))
            .await
            .unwrap_or_else(|_| {
                Err(RunnerError::Transport(
                    "timed out opening the log".to_string(),
                ))
            }) {
            Ok(stream) => {
                let id = build.id.clone();
                return Ok(stream
                    .map(move |r| match r {
                        Ok(line) => serde_json::to_string(&line)
                            .map_err(|e| format!("cannot encode a log line: {e}")),
                        Err(e) => {
                            tracing::warn!(build = %id, error = %e, "runner log stream failed");
                            Err(format!("the runner's log stream failed: {e}"))
                        }
                    })
                    .boxed());
            }
            Err(RunnerError::NotSupported) => {
                why_none = format!("the {} runner does not provide logs", rt.runner_name);
            }
            Err(RunnerError::NotFound(_)) => {
                why_none = if handle.runner_ref.is_none() {
                    "the build has not started on its runner yet".to_string()
                } else {
                    format!("the {} runner has no log for this build", rt.runner_name)
                };
            }
            Err(e) => runner_failure = Some(e),
        },
    }
    if ctx.state.store().has_logs(&build.id).await? {
        return Ok(stored_tail(
            ctx.state.clone(),
            build.id.clone(),
            ctx.options.recheck.min(Duration::from_millis(500)),
        ));
    }
    if let Some(e) = runner_failure {
        tracing::warn!(build = %build.id, error = %e, "opening the runner's log failed");
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "runner_error",
            format!("the runner could not open the log: {e}"),
        ));
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "logs_not_found",
        format!("build {} has no logs: {why_none}", build.id),
    ))
}

/// Log lines stored for the build, followed until the build is terminal
/// and every stored line was sent.
fn stored_tail(state: AppState, id: BuildId, recheck: Duration) -> LogFrames {
    let tail = StoredTail {
        state,
        id,
        after_line: 0,
        recheck,
        ready: VecDeque::new(),
        done: false,
    };
    futures::stream::unfold(tail, StoredTail::next).boxed()
}

struct StoredTail {
    state: AppState,
    id: BuildId,
    after_line: u64,
    recheck: Duration,
    ready: VecDeque<String>,
    done: bool,
}

impl StoredTail {
    async fn next(mut self) -> Option<(Result<String, String>, Self)> {
        loop {
            if let Some(line) = self.ready.pop_front() {
                return Some((Ok(line), self));
            }
            if self.done {
                return None;
            }
            // Status first: lines written before the build turned terminal
            // are then certainly in the read that follows.
            let terminal = match self.state.store().get_build(&self.id).await {
                Ok(b) => b.status.is_terminal(),
                Err(e) => return Some(self.fail(e)),
            };
            match self
                .state
                .store()
                .log_lines(&self.id, self.after_line, LINE_BATCH)
                .await
            {
                Err(e) => return Some(self.fail(e)),
                Ok(lines) if !lines.is_empty() => {
                    if let Some(last) = lines.last() {
                        self.after_line = last.line_no;
                    }
                    self.ready.extend(lines.into_iter().map(|l| l.json));
                }
                Ok(_) if terminal => self.done = true,
                Ok(_) => tokio::time::sleep(self.recheck).await,
            }
        }
    }

    fn fail(mut self, e: stitch_store::StoreError) -> (Result<String, String>, Self) {
        tracing::error!(build = %self.id, error = %e, "reading stored log lines failed");
        self.done = true;
        (Err("reading the stored log failed".to_string()), self)
    }
}
