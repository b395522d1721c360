//! The HTTP edge of `stitch serve` against real clients on loopback: slow
//! and idle clients are cut off by the `[http]` timeouts, connections over
//! `http.max_connections` are refused, oversized WebSocket messages close
//! the socket, and the token-less mode refuses foreign `Host`s and
//! cross-site writes. Raw TCP clients speak HTTP/1.1 by hand where the
//! test is about what a well-behaved client would never do.

mod http_support;

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use http_support::{error_code, Server};
use serde_json::{json, Value};
use stitch_server::http::HttpOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// Longest wait for something the server must do; a failing guard means
/// it did not (these tests configure timeouts of a few hundred ms).
const GUARD: Duration = Duration::from_secs(10);

/// Everything the server sends until it closes the connection. A reset
/// counts as closed too (what was read before it is returned).
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(GUARD, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("the server closes the connection");
    String::from_utf8_lossy(&buf).into_owned()
}

/// One response on a keep-alive connection: head and `Content-Length` body.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(GUARD, async {
        while !buf.ends_with(b"\r\n\r\n") {
            assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "closed early");
            buf.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await.unwrap();
        buf.extend_from_slice(&body);
    })
    .await
    .expect("a response");
    String::from_utf8_lossy(&buf).into_owned()
}

async fn connect(s: &Server) -> TcpStream {
    TcpStream::connect(s.addr).await.unwrap()
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

#[tokio::test]
async fn clients_that_stop_inside_their_headers_are_disconnected() {
    let s = Server::start_configured(None, HttpOptions::default(), |c| {
        c.http.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut c = connect(&s).await;
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            .await
            .unwrap();
        clients.push(c);
    }
    for mut c in clients {
        let answer = read_until_closed(&mut c).await;
        assert!(!answer.contains("200 OK"), "{answer}");
    }
    // A connection that sends nothing at all is closed the same way.
    let mut silent = connect(&s).await;
    assert_eq!(read_until_closed(&mut silent).await, "");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let s = Server::start_configured(None, HttpOptions::default(), |c| {
        c.http.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let mut c = connect(&s).await;
    for _ in 0..2 {
        c.write_all(HEALTHZ).await.unwrap();
        let answer = read_response(&mut c).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    assert_eq!(
        read_until_closed(&mut c).await,
        "",
        "idle after two answers: closed, nothing more sent"
    );
}

#[tokio::test]
async fn clients_that_stop_mid_body_get_408_and_are_disconnected() {
    let s = Server::start_configured(None, HttpOptions::default(), |c| {
        c.http.body_read_timeout = Duration::from_millis(300);
    })
    .await;
    let before = s.snapshot().await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut c = connect(&s).await;
        c.write_all(
            b"POST /v1/queues/default/builds HTTP/1.1\r\nHost: 127.0.0.1\r\n\
              Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"head\": [",
        )
        .await
        .unwrap();
        clients.push(c);
    }
    for mut c in clients {
        let answer = read_until_closed(&mut c).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");
    }
    assert_eq!(s.snapshot().await, before, "nothing was created");
    // A body that arrives in time still works.
    let (status, _) = s
        .create("default", json!({"head": ["https://example.com/c/1"]}))
        .await;
    assert_eq!(status, 202);
}

#[tokio::test]
async fn connections_over_the_cap_are_refused_with_503() {
    let s = Server::start_configured(None, HttpOptions::default(), |c| {
        c.http.max_connections = 2;
    })
    .await;
    // Two slots taken: an upgraded WebSocket keeps its slot, and a
    // keep-alive connection that answered once is surely accepted.
    let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_request("/v1/events"))
        .await
        .unwrap();
    let mut held = connect(&s).await;
    held.write_all(HEALTHZ).await.unwrap();
    assert!(read_response(&mut held).await.starts_with("HTTP/1.1 200"));

    let mut third = connect(&s).await;
    let answer = read_until_closed(&mut third).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "too_many_connections");
    // A client that sent its request before reading is refused the same way.
    let mut fourth = connect(&s).await;
    fourth.write_all(HEALTHZ).await.unwrap();
    assert!(read_until_closed(&mut fourth)
        .await
        .starts_with("HTTP/1.1 503"));

    // A closed WebSocket gives its slot back: a new connection is answered
    // once the server has seen the close (each attempt is one request; at
    // most 500 attempts).
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    let mut attempts = 0;
    loop {
        attempts += 1;
        assert!(attempts <= 500, "the slot never came back");
        let mut c = connect(&s).await;
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_until_closed(&mut c).await;
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    }
}

#[tokio::test]
async fn an_oversized_websocket_message_closes_the_socket_with_1009() {
    let s = Server::start_configured(None, HttpOptions::default(), |c| {
        c.http.ws_max_message_bytes = 1024;
    })
    .await;
    // A build whose log never ends, so only the limit can close its stream.
    let head = "https://example.com/c/1?stitch-fake=hang";
    let id = s.create_ok("default", head).await;
    s.trigger_on_runner("default", &id, head).await;
    for path in ["/v1/events".to_string(), format!("/v1/builds/{id}/logs")] {
        let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_request(&path))
            .await
            .unwrap();
        ws.send(Message::Text("small is fine".into()))
            .await
            .unwrap();
        ws.send(Message::Text("x".repeat(4096).into()))
            .await
            .unwrap();
        let closed = tokio::time::timeout(GUARD, async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Close(frame))) => break Some(frame.map(|f| f.code)),
                    Some(Ok(_)) => {}
                    // The server stops reading at the limit, so most of the
                    // 4 KiB is still unread in its socket when it closes:
                    // the kernel then answers with a reset, which may
                    // overtake the close frame on loopback. A reset is the
                    // server closing the socket too.
                    Some(Err(WsError::Io(e)))
                        if e.kind() == std::io::ErrorKind::ConnectionReset =>
                    {
                        break None;
                    }
                    Some(Err(e)) => panic!("{path}: no close frame before {e}"),
                    None => panic!("{path}: closed without a close frame"),
                }
            }
        })
        .await
        .expect("the server closes the socket");
        // `None`: reset (see above); a close frame that arrives says 1009.
        if let Some(code) = closed {
            assert_eq!(code, Some(CloseCode::Size), "{path}");
        }
    }
}

/// A request to `path` with a `Host` header of our choosing.
fn with_host(
    s: &Server,
    method: reqwest::Method,
    path: &str,
    host: &str,
) -> reqwest::RequestBuilder {
    s.client.request(method, s.url(path)).header("host", host)
}

#[tokio::test]
async fn without_tokens_foreign_hosts_and_cross_site_writes_are_refused() {
    let s = Server::start_configured(None, HttpOptions::default(), |c| {
        c.api.public_url = Some("https://stitch.example.com".into());
    })
    .await;
    let port = s.addr.port();
    for host in [
        "evil.example".to_string(),
        format!("evil.example:{port}"),
        "localhost.evil.example".to_string(),
        "10.0.0.1".to_string(),
    ] {
        let resp = with_host(&s, reqwest::Method::GET, "/v1/builds", &host)
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(resp).await,
            (403, "forbidden_host".into()),
            "{host}"
        );
    }
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "127.9.9.9".to_string(),
        format!("[::1]:{port}"),
        "stitch.example.com".to_string(),
        "STITCH.example.com:443".to_string(),
    ] {
        let resp = with_host(&s, reqwest::Method::GET, "/v1/builds", &host)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{host}");
    }
    let mut req = s.ws_request("/v1/events");
    req.headers_mut()
        .insert("host", "evil.example".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("a WebSocket with a foreign Host was not refused: {other:?}"),
    }

    // Cross-site writes: refused, nothing changes.
    let id = s.create_ok("q-noop", "https://example.com/c/1").await;
    let before = s.snapshot().await;
    for origin in ["https://evil.example", "null", "http://stitch.example.com"] {
        let resp = s
            .post(&format!("/v1/builds/{id}/cancel"))
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(resp).await,
            (403, "forbidden_origin".into()),
            "{origin}"
        );
        let resp = s
            .post("/v1/queues/default/builds")
            .header("origin", origin)
            .json(&json!({"head": ["https://example.com/c/2"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(resp).await,
            (403, "forbidden_origin".into()),
            "{origin}"
        );
    }
    assert_eq!(s.snapshot().await, before, "refused writes change nothing");
    let record: Value = s
        .get(&format!("/v1/builds/{id}"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(record["cancel_requested"], false, "reads are not refused");
    let mut req = s.ws_request("/v1/events");
    req.headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("a cross-site WebSocket was not refused: {other:?}"),
    }
    for origin in ["http://localhost:5173", "https://stitch.example.com"] {
        let resp = s
            .post(&format!("/v1/builds/{id}/cancel"))
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202, "{origin}");
    }

    // Routes with their own credentials (or none) are not guarded.
    let resp = with_host(&s, reqwest::Method::GET, "/healthz", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = with_host(
        &s,
        reqwest::Method::POST,
        "/webhooks/github",
        "evil.example",
    )
    .header("origin", "https://evil.example")
    .body("{}")
    .send()
    .await
    .unwrap();
    assert_eq!(
        error_code(resp).await,
        (404, "webhooks_not_configured".into())
    );
    let resp = with_host(
        &s,
        reqwest::Method::POST,
        &format!("/v1/builds/{id}/promise-failure"),
        "evil.example",
    )
    .json(&json!({"exit_status": 1}))
    .send()
    .await
    .unwrap();
    assert_eq!(error_code(resp).await, (401, "unauthorized".into()));
}

#[tokio::test]
async fn with_api_tokens_host_and_origin_are_not_checked() {
    let s = Server::start_with(Some("s3cret-token"), HttpOptions::default()).await;
    let resp = with_host(&s, reqwest::Method::GET, "/v1/builds", "evil.example")
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = s.create_ok("q-noop", "https://example.com/c/1").await;
    let resp = s
        .post(&format!("/v1/builds/{id}/cancel"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
}
