//! The listener's `[http]` limits reach the spindle's WebSocket routes: a
//! client message over `http.ws_max_message_bytes` (64 KiB by default)
//! closes the socket instead of being buffered.

mod support;

use futures::{SinkExt, StreamExt};
use support::*;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_client_message_on_events_closes_the_socket() {
    let h = Harness::start().await;
    let (mut socket, _) = tokio_tungstenite::connect_async(h.ws("/events"))
        .await
        .expect("connect /events");
    socket
        .send(Message::Text("small messages are ignored".into()))
        .await
        .unwrap();
    socket
        .send(Message::Binary(vec![0u8; 100 * 1024].into()))
        .await
        .unwrap();
    // Pings come every 30 s here, so within WAIT the only way for the
    // stream to end is the server closing it.
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the server kept the socket open");
}
