//! The outbound clients speak TLS: real providers (`https://api.buildkite.com`,
//! `wss://` Jetstream, `https://plc.directory`) are never plain HTTP. A
//! listener that accepts and hangs up stands in for the remote end: the
//! clients must try a handshake (and fail it), not refuse the scheme.

use tokio::net::TcpListener;

async fn hang_up_listener() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            drop(socket);
        }
    });
    addr
}

#[tokio::test]
async fn the_http_client_dials_https() {
    let addr = hang_up_listener().await;
    let err = reqwest::Client::new()
        .get(format!("https://{addr}/"))
        .send()
        .await
        .unwrap_err();
    // Without TLS support this is a builder error ("scheme is not http").
    assert!(!err.is_builder(), "{err:?}");
    assert!(err.is_connect() || err.is_request(), "{err:?}");
}

#[tokio::test]
async fn the_websocket_client_dials_wss() {
    let addr = hang_up_listener().await;
    let err = tokio_tungstenite::connect_async(format!("wss://{addr}/"))
        .await
        .unwrap_err();
    assert!(
        !matches!(
            err,
            tokio_tungstenite::tungstenite::Error::Url(
                tokio_tungstenite::tungstenite::error::UrlError::TlsFeatureNotEnabled
            )
        ),
        "{err:?}"
    );
}
