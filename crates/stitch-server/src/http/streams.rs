//! Transport plumbing shared by the event and log streams: choosing SSE or
//! WebSocket, keepalives, shutdown, and the durable event-log tail.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::ws::{close_code, CloseFrame, Message, Utf8Bytes, WebSocket};
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{BoxStream, Stream, StreamExt};
use stitch_store::{Event, StoreError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use super::metrics::StreamGuard;
use crate::state::AppState;

/// Events read from the store per query.
pub(crate) const EVENT_BATCH: u32 = 500;
/// Longest wait for a client to take one WebSocket frame before the
/// connection is given up as dead.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the client's answer to our close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Whether the request asks for a WebSocket (`Upgrade: websocket`).
pub(crate) fn wants_websocket(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
        })
}

/// Parses a stream position (`after=`, `Last-Event-ID`): a non-negative
/// integer; empty means 0.
pub(crate) fn parse_position(what: &str, raw: Option<&str>) -> Result<u64, ApiError> {
    match raw.map(str::trim) {
        None | Some("") => Ok(0),
        Some(s) => s.parse::<u64>().map_err(|_| {
            ApiError::invalid(format!(
                "invalid {what} {s:?}: expected a non-negative integer"
            ))
        }),
    }
}

/// The `Last-Event-ID` header, if present.
pub(crate) fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    match headers.get("last-event-id") {
        None => Ok(None),
        Some(v) => {
            let s = v
                .to_str()
                .map_err(|_| ApiError::invalid("invalid Last-Event-ID header"))?;
            parse_position("Last-Event-ID", Some(s)).map(Some)
        }
    }
}

/// An SSE response of `frames` with keepalive comments, ending when the
/// frames end or the server shuts down. `guard` counts the open stream.
pub(crate) fn sse_response<S>(
    frames: S,
    keepalive: Duration,
    shutdown: CancellationToken,
    guard: StreamGuard,
) -> Response
where
    S: Stream<Item = SseEvent> + Send + 'static,
{
    let frames = frames.take_until(shutdown.cancelled_owned()).map(move |e| {
        let _keep = &guard;
        Ok::<_, Infallible>(e)
    });
    let mut resp = Sse::new(frames)
        .keep_alive(KeepAlive::new().interval(keepalive).text("keepalive"))
        .into_response();
    // Tell reverse proxies (nginx) not to buffer the stream.
    resp.headers_mut()
        .insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    resp
}

/// What a WebSocket pump sends: text frames, then a close.
pub(crate) enum WsItem {
    /// One text frame.
    Text(String),
    /// End with close 1011 and this reason.
    Fail(String),
}

/// Sends `frames` as text frames with ping keepalives until the stream
/// ends (close with `end_code`/`end_reason`), fails (close 1011), the
/// client leaves, or the server shuts down (close 1001). Messages from the
/// client other than close are ignored.
pub(crate) async fn pump_websocket(
    mut socket: WebSocket,
    mut frames: BoxStream<'static, WsItem>,
    keepalive: Duration,
    shutdown: CancellationToken,
    end: (u16, &'static str),
    _guard: StreamGuard,
) {
    let start = tokio::time::Instant::now() + keepalive;
    let mut ping = tokio::time::interval_at(start, keepalive);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let close = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Some((close_code::AWAY, "server shutting down".to_string())),
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break None,
                Some(Ok(_)) => {}
            },
            _ = ping.tick() => {
                if !send(&mut socket, Message::Ping(Default::default())).await {
                    break None;
                }
            }
            item = frames.next() => match item {
                Some(WsItem::Text(t)) => {
                    if !send(&mut socket, Message::Text(t.into())).await {
                        break None;
                    }
                }
                Some(WsItem::Fail(reason)) => break Some((close_code::ERROR, reason)),
                None => break Some((end.0, end.1.to_string())),
            },
        }
    };
    if let Some((code, reason)) = close {
        let reason = truncate_reason(reason);
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        };
        if send(&mut socket, Message::Close(Some(frame))).await {
            // Let the client answer the close so it sees a clean shutdown.
            let _ = tokio::time::timeout(CLOSE_LINGER, async {
                while let Some(Ok(m)) = socket.recv().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
    }
}

async fn send(socket: &mut WebSocket, msg: Message) -> bool {
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, socket.send(msg)).await,
        Ok(Ok(()))
    )
}

/// Close reasons are limited to 123 bytes.
fn truncate_reason(mut s: String) -> String {
    if s.len() > 123 {
        let mut cut = 120;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// The event log from `after` on, forever: reads batches from the store;
/// when caught up, waits for the committed-seq notifier (or `recheck`, for
/// writers in other processes). Each reader keeps its own position in the
/// durable log, so a slow reader lags but never loses an event. Ends after
/// reporting a store error.
pub(crate) fn event_tail(
    state: AppState,
    after: u64,
    recheck: Duration,
) -> BoxStream<'static, Result<Event, StoreError>> {
    let tail = Tail {
        seq_rx: state.event_seq(),
        state,
        after,
        recheck,
        ready: VecDeque::new(),
        failed: false,
    };
    futures::stream::unfold(tail, Tail::next).boxed()
}

struct Tail {
    state: AppState,
    seq_rx: watch::Receiver<u64>,
    after: u64,
    recheck: Duration,
    ready: VecDeque<Event>,
    failed: bool,
}

impl Tail {
    async fn next(mut self) -> Option<(Result<Event, StoreError>, Self)> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                self.after = e.seq;
                return Some((Ok(e), self));
            }
            if self.failed {
                return None;
            }
            // Mark the current notification seen before reading, so a
            // commit after the read wakes the wait below.
            let _ = self.seq_rx.borrow_and_update();
            match self
                .state
                .store()
                .events_after(self.after, EVENT_BATCH)
                .await
            {
                Err(e) => {
                    self.failed = true;
                    return Some((Err(e), self));
                }
                Ok(batch) if !batch.is_empty() => {
                    // Defensive: never go backwards or repeat.
                    let after = self.after;
                    self.ready
                        .extend(batch.into_iter().filter(|e| e.seq > after));
                }
                Ok(_) => {
                    let recheck = self.recheck;
                    tokio::select! {
                        r = self.seq_rx.changed() => {
                            if r.is_err() {
                                // Notifier gone: fall back to polling.
                                tokio::time::sleep(recheck).await;
                            }
                        }
                        _ = tokio::time::sleep(recheck) => {}
                    }
                }
            }
        }
    }
}
