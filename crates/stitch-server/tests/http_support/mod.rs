//! Shared by the `http_*` tests: a real server on 127.0.0.1:0 over a
//! temporary SQLite database, plus a raw SSE reader and WebSocket helpers.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use stitch_core::{BuildId, ChangeSet, RunnerRef, TriggerRequest};
use stitch_server::config::{Config, FakeSection, LocalSection, QueueConfig, RunnerSection};
use stitch_server::http::{self, HttpOptions};
use stitch_server::state::AppState;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Command of the `q-local` queue: two lines with a pause between them.
pub const LOCAL_COMMAND: &str = "echo hello; sleep 0.5; echo done";

pub struct Server {
    pub addr: SocketAddr,
    pub base: String,
    pub state: AppState,
    pub token: Option<String>,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

pub fn config(data_dir: PathBuf) -> Config {
    let mut queues = BTreeMap::new();
    queues.insert(
        "default".to_string(),
        QueueConfig {
            runner: RunnerSection::Fake(FakeSection {
                accept_delay: Duration::from_millis(50),
                run_duration: Duration::from_millis(600),
                slow_factor: 2,
            }),
            ..QueueConfig::default()
        },
    );
    queues.insert(
        "q-local".to_string(),
        QueueConfig {
            runner: RunnerSection::Local(LocalSection {
                command: LOCAL_COMMAND.to_string(),
                workdir: Some(PathBuf::from(".")),
                cancel_grace: Duration::from_secs(1),
                env: BTreeMap::new(),
                pass_env: Vec::new(),
                user: None,
                group: None,
            }),
            ..QueueConfig::default()
        },
    );
    queues.insert(
        "q-noop".to_string(),
        QueueConfig {
            runner: RunnerSection::Noop,
            ..QueueConfig::default()
        },
    );
    let mut config = Config {
        data_dir,
        queues,
        ..Config::default()
    };
    config.api.max_body_bytes = 4096;
    config
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(None, HttpOptions::default()).await
    }

    pub async fn start_with(token: Option<&str>, options: HttpOptions) -> Server {
        Self::start_configured(token, options, |_| {}).await
    }

    /// A server whose configuration [`config`] `edit` changed first (the
    /// `[http]` limits and `api.public_url` apply).
    pub async fn start_configured(
        token: Option<&str>,
        options: HttpOptions,
        edit: impl FnOnce(&mut Config),
    ) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = config(dir.path().join("data"));
        edit(&mut config);
        let limits = config.http.clone();
        let state = AppState::open(config).await.expect("open state");
        let tokens: Vec<String> = token.iter().map(|t| t.to_string()).collect();
        let router = http::router_with(state.clone(), tokens, options);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        state.set_bound_addr(addr);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(http::serve_with(listener, router, limits, async move {
            let _ = rx.await;
        }));
        Server {
            addr,
            base: format!("http://{addr}"),
            state,
            token: token.map(str::to_string),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("client"),
            shutdown: Some(tx),
            task: Some(task),
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.authed(self.client.get(self.url(path)))
    }

    /// `GET /metrics`: the Prometheus text.
    pub async fn metrics_text(&self) -> String {
        let resp = self.get("/metrics").send().await.expect("GET /metrics");
        assert_eq!(resp.status(), 200, "GET /metrics");
        resp.text().await.expect("the metrics text")
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.authed(self.client.post(self.url(path)))
    }

    /// POST a build and return (status, body).
    pub async fn create(&self, queue: &str, body: Value) -> (u16, Value) {
        let resp = self
            .post(&format!("/v1/queues/{queue}/builds"))
            .json(&body)
            .send()
            .await
            .expect("send");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("json body"))
    }

    /// Create a build that must succeed; returns its id.
    pub async fn create_ok(&self, queue: &str, head: &str) -> String {
        let (status, body) = self
            .create(queue, serde_json::json!({"head": [head]}))
            .await;
        assert_eq!(status, 202, "{body}");
        body["id"].as_str().expect("id").to_string()
    }

    /// Every build in the store and the latest event seq: what bad input
    /// must not change.
    pub async fn snapshot(&self) -> (Vec<String>, u64) {
        let filter = stitch_store::BuildFilter {
            limit: 1000,
            ..Default::default()
        };
        let (builds, _) = self
            .state
            .store()
            .list_builds(&filter, None)
            .await
            .expect("list");
        let seq = self.state.store().latest_seq().await.expect("seq");
        (builds.into_iter().map(|b| b.id.to_string()).collect(), seq)
    }

    /// Triggers the build on its queue's runner directly (the trigger stage
    /// is not running in these tests) and records the ref.
    pub async fn trigger_on_runner(&self, queue: &str, id: &str, head: &str) -> RunnerRef {
        let id: BuildId = id.parse().expect("id");
        let rt = self.state.build_queue(queue).expect("queue");
        let req = TriggerRequest::new(id.clone(), queue, ChangeSet::head_only([head]));
        let r = rt.runner.trigger(&req).await.expect("trigger");
        self.state
            .store()
            .set_runner_ref(&id, &r)
            .await
            .expect("set ref");
        r
    }

    /// Stops the server; returns how long `serve` took to return.
    pub async fn stop(&mut self) -> Duration {
        let start = std::time::Instant::now();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("serve returns after shutdown")
                .expect("join")
                .expect("serve ok");
        }
        start.elapsed()
    }

    /// A WebSocket request with the server's token.
    pub fn ws_request(
        &self,
        path: &str,
    ) -> tokio_tungstenite::tungstenite::handshake::client::Request {
        let mut req = self.ws_url(path).into_client_request().expect("ws request");
        if let Some(t) = &self.token {
            req.headers_mut().insert(
                "authorization",
                format!("Bearer {t}").parse().expect("header"),
            );
        }
        req
    }
}

/// Error body code of a response.
pub async fn error_code(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("error body is JSON");
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.code in {body}"))
        .to_string();
    assert!(body["error"]["message"].is_string(), "{body}");
    (status, code)
}

/// One SSE frame (or a comment line group).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SseFrame {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
    pub comments: Vec<String>,
}

/// Parses `text/event-stream` from the raw byte stream.
pub struct SseReader {
    stream: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: Vec<u8>,
}

impl SseReader {
    pub fn new(resp: reqwest::Response) -> Self {
        assert_eq!(resp.status().as_u16(), 200);
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
        Self {
            stream: resp.bytes_stream().boxed(),
            buf: Vec::new(),
        }
    }

    /// The next frame, `None` at the end of the stream. Panics after `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<SseFrame> {
        tokio::time::timeout(wait, self.next_inner())
            .await
            .expect("timed out waiting for an SSE frame")
    }

    async fn next_inner(&mut self) -> Option<SseFrame> {
        loop {
            if let Some(pos) = find_blank_line(&self.buf) {
                let raw: Vec<u8> = self.buf.drain(..pos.0).collect();
                self.buf.drain(..pos.1);
                let text = String::from_utf8(raw).expect("utf-8 frame");
                return Some(parse_frame(&text));
            }
            match self.stream.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => panic!("SSE stream error: {e}"),
                None => return None,
            }
        }
    }

    /// The next frame that is not only comments.
    pub async fn next_event(&mut self, wait: Duration) -> Option<SseFrame> {
        loop {
            let f = self.next(wait).await?;
            if f.id.is_some() || f.event.is_some() || !f.data.is_empty() {
                return Some(f);
            }
        }
    }
}

/// (end of frame, length of the separator)
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let s = buf;
    for i in 0..s.len() {
        if s[i..].starts_with(b"\n\n") {
            return Some((i, 2));
        }
        if s[i..].starts_with(b"\r\n\r\n") {
            return Some((i, 4));
        }
    }
    None
}

fn parse_frame(text: &str) -> SseFrame {
    let mut f = SseFrame::default();
    let mut data = Vec::new();
    for line in text.lines() {
        if let Some(c) = line.strip_prefix(':') {
            f.comments.push(c.trim().to_string());
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((k, v)) => (k, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => f.id = Some(value.to_string()),
            "event" => f.event = Some(value.to_string()),
            "data" => data.push(value.to_string()),
            _ => {}
        }
    }
    f.data = data.join("\n");
    f
}
