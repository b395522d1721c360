//! Following one event stream over a WebSocket, for the Jetstream consumer
//! and every knot client alike: connect (from the stream's saved cursor),
//! hand each text frame to the stream, and reconnect with backoff when the
//! connection cannot be made, fails or closes, until `stop`.
//!
//! The seam: what a stream connects to and what it does with a frame is
//! an [`EventStream`]; the connection, the backoff and the stopping are
//! written once, here.

use std::future::Future;

use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::config::Backoff;

/// What to do after a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AfterFrame {
    /// Read the next frame.
    Next,
    /// Drop the connection and reconnect (after the backoff) from the
    /// saved cursor: the frame was not applied and comes again.
    Reconnect,
}

/// One followed stream.
pub(crate) trait EventStream: Send {
    /// Which stream, for the logs (`jetstream`, a knot's host).
    fn name(&self) -> &str;

    /// The URL to connect to now, with the saved cursor; `None` when the
    /// stream cannot be followed at all (it stops; the reason is logged).
    fn url(&mut self) -> impl Future<Output = Option<String>> + Send;

    /// Handles one text frame.
    fn frame(&mut self, text: &str) -> impl Future<Output = AfterFrame> + Send;
}

/// Follows `stream` until `stop` (or until it has no URL).
pub(crate) async fn follow<S: EventStream>(
    mut stream: S,
    mut backoff: Backoff,
    stop: CancellationToken,
) {
    loop {
        let Some(url) = stream.url().await else {
            return;
        };
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio_tungstenite::connect_async(url.as_str()) => r,
        };
        match connected {
            Err(e) => {
                tracing::warn!(stream = stream.name(), error = %e, "spindle: connecting to an event stream failed")
            }
            Ok((mut socket, _)) => {
                backoff.reset();
                loop {
                    let msg = tokio::select! {
                        _ = stop.cancelled() => {
                            let _ = socket.close(None).await;
                            return;
                        }
                        m = socket.next() => m,
                    };
                    let text = match msg {
                        None | Some(Ok(Message::Close(_))) => break,
                        Some(Err(e)) => {
                            tracing::warn!(stream = stream.name(), error = %e, "spindle: an event stream failed");
                            break;
                        }
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(_)) => continue,
                    };
                    if stream.frame(text.as_str()).await == AfterFrame::Reconnect {
                        break;
                    }
                }
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
