//! `GET /logs/{knot}/{rkey}/{workflow}`: a workflow's `LogLine` frames
//! (stitch's `LogLine` already is the stock spindle's wire shape, integer
//! `step_kind` included).
//!
//! Everything that can fail is resolved before the upgrade: an unknown
//! tuple is a plain 404, a runner that fails to open the log a 502. Then:
//! the runner's live log if it has one, else the lines stored for the
//! build, followed until the build is terminal; close 1000 at the end. A
//! workflow that failed without any log gets its error as one step.

use std::collections::VecDeque;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::stream::{BoxStream, StreamExt};
use stitch_core::{BuildHandle, BuildId, LogLine, OutputStream, RunnerError, StepKind};
use stitch_server::http::close_websocket;

use crate::Spindle;

/// Stored lines read per query.
const LINE_BATCH: u32 = 500;
/// How often a caught-up stored log is re-read.
const RECHECK: Duration = Duration::from_millis(200);
/// Longest wait for a runner to open a log.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Frames: a line's JSON, or why reading failed.
type Frames = BoxStream<'static, Result<String, String>>;

pub(crate) async fn logs(
    State(spindle): State<Spindle>,
    Path((knot, rkey, workflow)): Path<(String, String, String)>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // Resolved first: an unknown tuple is a 404 whatever the request.
    let frames = match resolve(&spindle, &knot, &rkey, &workflow).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    match ws {
        Ok(ws) => stitch_server::http::limit_websocket(ws, &spindle.state.config().http)
            .on_upgrade(move |socket| pump(spindle, socket, frames)),
        Err(rejection) => rejection.into_response(),
    }
}

fn plain(status: StatusCode, message: impl Into<String>) -> Response {
    (status, message.into()).into_response()
}

/// Picks the log source, or answers 404/5xx.
async fn resolve(
    spindle: &Spindle,
    knot: &str,
    rkey: &str,
    workflow: &str,
) -> Result<Frames, Response> {
    let internal = |e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, "spindle /logs: lookup failed");
        plain(StatusCode::INTERNAL_SERVER_ERROR, "lookup failed")
    };
    let run = spindle
        .db
        .run(knot, rkey, workflow)
        .await
        .map_err(|e| internal(&e))?
        .ok_or_else(|| plain(StatusCode::NOT_FOUND, "logs not found"))?;
    let Some(build_id) = run.build_id else {
        return match run.error {
            Some(error) => Ok(error_step(error)),
            // Claimed, build not created yet: nothing to show so far.
            None => Err(plain(StatusCode::NOT_FOUND, "logs not found")),
        };
    };
    let build = spindle
        .state
        .store()
        .get_build(&build_id)
        .await
        .map_err(|e| internal(&e))?;
    let mut handle = BuildHandle::new(build.id.clone(), build.queue.clone());
    if let Some(r) = build.runner_ref {
        handle = handle.with_ref(r);
    }
    if let Some(rt) = spindle.state.build_queue(&build.queue) {
        let opened = tokio::time::timeout(OPEN_TIMEOUT, rt.runner.logs(&handle))
            .await
            .unwrap_or_else(|_| Err(RunnerError::Transport("timed out opening the log".into())));
        match opened {
            Ok(stream) => {
                let lines = stream.map(|r| match r {
                    Ok(line) => serde_json::to_string(&line).map_err(|e| e.to_string()),
                    Err(e) => Err(format!("the runner's log stream failed: {e}")),
                });
                return Ok(with_error_fallback(
                    spindle.clone(),
                    build_id,
                    lines.boxed(),
                ));
            }
            Err(RunnerError::NotSupported | RunnerError::NotFound(_)) => {}
            Err(e) => {
                tracing::warn!(build = %build.id, error = %e, "spindle /logs: the runner could not open the log");
                return Err(plain(
                    StatusCode::BAD_GATEWAY,
                    format!("the runner could not open the log: {e}"),
                ));
            }
        }
    }
    Ok(with_error_fallback(
        spindle.clone(),
        build_id.clone(),
        stored_tail(spindle.clone(), build_id),
    ))
}

/// The two frames the stock spindle sends for a workflow that failed
/// without logs: a user step, and the error as its one line.
fn error_step(error: String) -> Frames {
    let now = Utc::now();
    let lines = [
        LogLine::step_start(0, "error", StepKind::User, None, now),
        LogLine::data(0, OutputStream::Stderr, error, now),
    ];
    let frames: Vec<Result<String, String>> = lines
        .iter()
        .map(|l| serde_json::to_string(l).map_err(|e| e.to_string()))
        .collect();
    futures::stream::iter(frames).boxed()
}

/// `frames`, and when they were empty and the build failed with an error,
/// that error as one step.
fn with_error_fallback(spindle: Spindle, id: BuildId, frames: Frames) -> Frames {
    let fallback = futures::stream::once(async move {
        match spindle.state.store().get_build(&id).await {
            Ok(b) if b.status == stitch_core::BuildStatus::Failed => b
                .failure_reason
                .or_else(|| b.runner_metadata.get(stitch_store::ERROR_KEY).cloned())
                .map(error_step),
            _ => None,
        }
    })
    .filter_map(|x| async move { x })
    .flatten();
    let mut seen = false;
    let mut fallback = Some(fallback.boxed());
    let mut frames = Some(frames);
    futures::stream::poll_fn(move |cx| {
        use std::task::Poll;
        if let Some(f) = frames.as_mut() {
            match f.poll_next_unpin(cx) {
                Poll::Ready(Some(item)) => {
                    seen = true;
                    return Poll::Ready(Some(item));
                }
                Poll::Ready(None) => frames = None,
                Poll::Pending => return Poll::Pending,
            }
        }
        if seen {
            return Poll::Ready(None);
        }
        match fallback.as_mut() {
            Some(f) => f.poll_next_unpin(cx),
            None => Poll::Ready(None),
        }
    })
    .boxed()
}

/// Lines stored for the build, followed until it is terminal and every
/// line was read.
fn stored_tail(spindle: Spindle, id: BuildId) -> Frames {
    struct Tail {
        spindle: Spindle,
        id: BuildId,
        after: u64,
        ready: VecDeque<String>,
        done: bool,
    }
    let tail = Tail {
        spindle,
        id,
        after: 0,
        ready: VecDeque::new(),
        done: false,
    };
    futures::stream::unfold(tail, |mut t| async move {
        loop {
            if let Some(line) = t.ready.pop_front() {
                return Some((Ok(line), t));
            }
            if t.done {
                return None;
            }
            // Status first: lines written before it turned terminal are then
            // certainly in the read that follows.
            let store = t.spindle.state.store();
            let terminal = match store.get_build(&t.id).await {
                Ok(b) => b.status.is_terminal(),
                Err(e) => {
                    t.done = true;
                    return Some((Err(format!("reading the build failed: {e}")), t));
                }
            };
            match store.log_lines(&t.id, t.after, LINE_BATCH).await {
                Err(e) => {
                    t.done = true;
                    return Some((Err(format!("reading the log failed: {e}")), t));
                }
                Ok(lines) if !lines.is_empty() => {
                    if let Some(last) = lines.last() {
                        t.after = last.line_no;
                    }
                    t.ready.extend(lines.into_iter().map(|l| l.json));
                }
                Ok(_) if terminal => t.done = true,
                Ok(_) => tokio::time::sleep(RECHECK).await,
            }
        }
    })
    .boxed()
}

/// Sends frames, pinging while idle; close 1000 at the end, 1011 when the
/// source failed, 1001 on shutdown.
async fn pump(spindle: Spindle, mut socket: WebSocket, mut frames: Frames) {
    let mut ping = tokio::time::interval(spindle.settings.ping_interval);
    ping.reset();
    let close = |code, reason: &'static str| {
        Some(CloseFrame {
            code,
            reason: reason.into(),
        })
    };
    loop {
        tokio::select! {
            _ = spindle.stop.cancelled() => {
                close_websocket(&mut socket, close(close_code::AWAY, "server shutting down")).await;
                return;
            }
            _ = ping.tick() => {
                if socket.send(Message::Ping(Vec::new().into())).await.is_err() {
                    return;
                }
            }
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
            next = frames.next() => match next {
                Some(Ok(text)) => {
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                Some(Err(reason)) => {
                    tracing::warn!(reason, "spindle /logs: log source failed");
                    close_websocket(&mut socket, close(close_code::ERROR, "log stream failed")).await;
                    return;
                }
                None => {
                    close_websocket(&mut socket, close(close_code::NORMAL, "log stream complete")).await;
                    return;
                }
            },
        }
    }
}
