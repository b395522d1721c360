//! A handler that panics, behind the layers `serve_with` puts around every
//! route: the client gets 500 in the API's error shape with its request
//! id, the panic is logged in the request's span, and the server goes on
//! serving. (No production route panics on purpose, so the test brings its
//! own router to the real listener.)

use std::io::Write;
use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use parking_lot::Mutex;
use serde_json::Value;
use stitch_server::config::{HttpConfig, LogFormat};

/// Log lines written by the service's subscriber, kept for the test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<Value> {
        String::from_utf8_lossy(&self.0.lock())
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }
}

async fn blow_up() -> &'static str {
    panic!("the handler blew up")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_answers_500_and_is_logged() {
    let captured = Captured::default();
    let writer = captured.clone();
    let telemetry = stitch_server::telemetry::init(
        LogFormat::Json,
        None,
        "info,stitch_server::http=debug",
        move || writer.clone(),
    )
    .unwrap();

    let router = Router::new()
        .route("/boom/{part}", get(blow_up))
        .route("/fine", get(|| async { "fine" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let stopped = stop.clone();
    let server = tokio::spawn(stitch_server::http::serve_with(
        listener,
        router,
        HttpConfig::default(),
        async move { stopped.cancelled().await },
    ));

    let http = reqwest::Client::new();
    let r = http
        .get(format!("{base}/boom/1"))
        .header("x-request-id", "panic-request-7")
        .header("authorization", "Bearer never-logged-7")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(r.headers()["x-request-id"], "panic-request-7");
    assert_eq!(r.headers()["content-type"], "application/json");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "internal", "{body}");
    assert!(body["error"]["message"].as_str().is_some(), "{body}");

    // The panic took down neither the connection handling nor the server.
    let fine = http.get(format!("{base}/fine")).send().await.unwrap();
    assert_eq!(fine.status(), 200);
    assert!(fine.headers().contains_key("x-request-id"));

    stop.cancel();
    server.await.unwrap().unwrap();
    telemetry.shutdown();

    let lines = captured.lines();
    let logged = lines
        .iter()
        .find(|l| l["fields"]["message"] == "request handler panicked")
        .unwrap_or_else(|| panic!("the panic was not logged: {lines:#?}"));
    assert_eq!(logged["level"], "ERROR");
    assert_eq!(logged["fields"]["panic"], "the handler blew up");
    assert_eq!(logged["span"]["name"], "request");
    assert_eq!(logged["span"]["request_id"], "panic-request-7");
    assert_eq!(logged["span"]["route"], "/boom/{part}");
    assert_eq!(logged["span"]["method"], "GET");
    let answered = lines
        .iter()
        .find(|l| {
            l["fields"]["message"] == "answered" && l["span"]["request_id"] == "panic-request-7"
        })
        .unwrap_or_else(|| panic!("no answered line: {lines:#?}"));
    assert_eq!(answered["span"]["status"], 500);
    let text = String::from_utf8_lossy(&captured.0.lock()).into_owned();
    assert!(!text.contains("never-logged-7"), "{text}");
}
