//! Transport plumbing shared by the event and log streams: choosing SSE or
//! WebSocket, keepalives and shutdown.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::ws::{close_code, CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{BoxStream, Stream, StreamExt};
use futures::{FutureExt, SinkExt};
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use super::metrics::StreamGuard;
use crate::config::HttpConfig;

/// Longest wait for a client to take one WebSocket frame before the
/// connection is given up as dead.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Most frames written under one flush.
const MAX_FRAMES_PER_FLUSH: usize = 64;
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

/// Applies `http.ws_max_message_bytes` to a WebSocket upgrade: a client
/// message or frame over it closes the connection (1009 where the route
/// reads through [`pump_websocket`]). Every WebSocket route of the listener
/// goes through this (the spindle's too).
pub fn limit_websocket(ws: WebSocketUpgrade, limits: &HttpConfig) -> WebSocketUpgrade {
    ws.max_message_size(limits.ws_max_message_bytes)
        .max_frame_size(limits.ws_max_message_bytes)
}

/// Parses a stream position (`after=`, `Last-Event-ID`): a non-negative
/// integer; empty means 0.
pub(crate) fn parse_position(what: &str, raw: Option<&str>) -> Result<u64, ApiError> {
    match raw.map(str::trim) {
        None | Some("") => Ok(0),
        // Positions are int64 on the wire (and in every database), so
        // what the schema cannot carry is refused rather than read.
        Some(s) => s
            .parse::<u64>()
            .ok()
            .filter(|n| i64::try_from(*n).is_ok())
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "invalid {what} {s:?}: expected an integer from 0 to {}",
                    i64::MAX
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
            // Unlike an empty `?after=` (not given), a header that is sent
            // must be a position: an EventSource never sends an empty one.
            if s.trim().is_empty() {
                return Err(ApiError::invalid(
                    "invalid Last-Event-ID header: empty (omit it to start from `after`)",
                ));
            }
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
/// client other than close are ignored; one over the size limit closes with
/// 1009 (see [`limit_websocket`]).
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
                Some(Ok(Message::Close(_))) | None => break None,
                Some(Err(e)) if too_big(&e) => {
                    break Some((close_code::SIZE, "message too big".to_string()))
                }
                Some(Err(_)) => break None,
                Some(Ok(_)) => {}
            },
            _ = ping.tick() => {
                if !send(&mut socket, Message::Ping(Default::default())).await {
                    break None;
                }
            }
            item = frames.next() => match item {
                Some(WsItem::Text(t)) => {
                    // Frames that are already waiting go out with this one
                    // under a single flush: one write for a burst, not one each.
                    let mut batch = vec![Message::Text(t.into())];
                    let mut ended = None;
                    while batch.len() < MAX_FRAMES_PER_FLUSH {
                        match frames.next().now_or_never() {
                            Some(Some(WsItem::Text(t))) => batch.push(Message::Text(t.into())),
                            Some(Some(WsItem::Fail(reason))) => {
                                ended = Some((close_code::ERROR, reason));
                                break;
                            }
                            Some(None) => {
                                ended = Some((end.0, end.1.to_string()));
                                break;
                            }
                            None => break,
                        }
                    }
                    if !send_all(&mut socket, batch).await {
                        break None;
                    }
                    if let Some(close) = ended {
                        break Some(close);
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
        close_websocket(&mut socket, Some(frame)).await;
    }
}

/// Ends a WebSocket with the closing handshake: sends `frame`, then reads
/// (and drops) what the client still sends until its own close, for at most
/// a second. Dropping the connection right after the close frame would be
/// quicker but unsafe: a frame the client sent meanwhile (a pong, its close
/// reply) left unread makes the kernel answer with a TCP reset, and a reset
/// can discard the close frame still in the client's receive buffer, so the
/// client sees a dropped connection instead of the close code.
pub async fn close_websocket(socket: &mut WebSocket, frame: Option<CloseFrame>) {
    if send(socket, Message::Close(frame)).await {
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

/// Whether a read failed because the client sent a message or frame over
/// `http.ws_max_message_bytes`.
fn too_big(e: &axum::Error) -> bool {
    use std::error::Error as _;
    matches!(
        e.source()
            .and_then(|inner| inner.downcast_ref::<tungstenite::Error>()),
        Some(tungstenite::Error::Capacity(_))
    )
}

/// Queues every frame and flushes once; false when the client is gone or
/// did not take them within [`SEND_TIMEOUT`].
async fn send_all(socket: &mut WebSocket, frames: Vec<Message>) -> bool {
    let write = async {
        for frame in frames {
            socket.feed(frame).await?;
        }
        socket.flush().await
    };
    matches!(tokio::time::timeout(SEND_TIMEOUT, write).await, Ok(Ok(())))
}

async fn send(socket: &mut WebSocket, msg: Message) -> bool {
    send_all(socket, vec![msg]).await
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderValue, StatusCode};
    use proptest::prelude::*;

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    proptest! {
        #![proptest_config(config())]

        /// `after=` and `Last-Event-ID` take an integer from 0 to
        /// `i64::MAX` (or nothing); anything else is a 400, never a panic.
        #[test]
        fn positions_of_any_text_parse_or_are_400(raw in ".{0,24}|[0-9]{1,25}| *[0-9]{1,5} *") {
            let trimmed = raw.trim();
            let in_range = trimmed
                .parse::<u64>()
                .ok()
                .filter(|n| i64::try_from(*n).is_ok());
            match parse_position("after", Some(&raw)) {
                Ok(n) if trimmed.is_empty() => prop_assert_eq!(n, 0),
                Ok(n) => prop_assert_eq!(Some(n), in_range),
                Err(e) => {
                    prop_assert_eq!(e.status, StatusCode::BAD_REQUEST);
                    prop_assert!(in_range.is_none());
                }
            }
        }

        #[test]
        fn last_event_id_headers_of_any_bytes_parse_or_are_400(raw in prop::collection::vec(any::<u8>(), 0..32)) {
            let Ok(value) = HeaderValue::from_bytes(&raw) else {
                return Ok(());
            };
            let mut headers = HeaderMap::new();
            headers.insert("last-event-id", value);
            match last_event_id(&headers) {
                Ok(Some(_)) => {}
                Ok(None) => prop_assert!(false, "the header is there"),
                Err(e) => prop_assert_eq!(e.status, StatusCode::BAD_REQUEST),
            }
        }
    }
}
