//! `GET /events`: the spindle's record stream for the appview.
//!
//! One JSON text frame per record, `{"rkey","nsid","event","created"}`,
//! never anything else as text. `?cursor=<nanos>` sends every record with
//! `created > cursor`, draining all of them (not one batch per wake-up); a
//! missing cursor means 0, i.e. replay everything (newer upstream's choice:
//! the appview de-duplicates on rkey, and nothing is lost for a consumer
//! that has no cursor yet). Pings every `ping_interval`.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::value::RawValue;

use stitch_server::http::close_websocket;

use crate::records::EventFrame;
use crate::Spindle;

/// Records read per query.
const BATCH: u32 = 500;

#[derive(Debug, Deserialize)]
pub(crate) struct EventParams {
    cursor: Option<String>,
}

pub(crate) async fn events(
    State(spindle): State<Spindle>,
    Query(params): Query<EventParams>,
    ws: WebSocketUpgrade,
) -> Response {
    let cursor = match params.cursor.as_deref().map(str::trim) {
        None | Some("") => 0,
        Some(c) => match c.parse::<i64>() {
            Ok(n) if n >= 0 => n,
            _ => {
                return (
                    StatusCode::BAD_REQUEST,
                    "cursor must be unix nanoseconds (a non-negative integer)",
                )
                    .into_response()
            }
        },
    };
    let ws = stitch_server::http::limit_websocket(ws, &spindle.state.config().http);
    ws.on_upgrade(move |socket| stream(spindle, socket, cursor))
}

async fn stream(spindle: Spindle, mut socket: WebSocket, mut cursor: i64) {
    let mut appended = spindle.db.appended();
    let mut ping = tokio::time::interval(spindle.settings.ping_interval);
    ping.reset();
    loop {
        // Drain: read batches until one comes back short.
        loop {
            let batch = match spindle.db.events_after(cursor, BATCH).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "spindle /events: reading records failed");
                    close_websocket(&mut socket, None).await;
                    return;
                }
            };
            let short = batch.len() < BATCH as usize;
            for ev in batch {
                let Ok(raw) = RawValue::from_string(ev.event.clone()) else {
                    tracing::error!(rkey = %ev.rkey, "spindle /events: a stored record is not JSON; skipped");
                    cursor = ev.created;
                    continue;
                };
                let frame = EventFrame {
                    rkey: &ev.rkey,
                    nsid: &ev.nsid,
                    event: &raw,
                    created: ev.created,
                };
                let Ok(text) = serde_json::to_string(&frame) else {
                    continue;
                };
                if socket.send(Message::Text(text.into())).await.is_err() {
                    return;
                }
                cursor = ev.created;
            }
            if short {
                break;
            }
        }
        tokio::select! {
            _ = spindle.stop.cancelled() => {
                close_websocket(&mut socket, None).await;
                return;
            }
            changed = appended.changed() => {
                if changed.is_err() {
                    return;
                }
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
        }
    }
}
