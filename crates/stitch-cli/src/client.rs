//! A small client of stitch's HTTP API (`/v1`).

use std::time::Duration;

use serde_json::Value;
use stitch_api::{BuildList, BuildRecord, CreateBuild, ErrorBody};

/// Why a request failed; decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connection refused, DNS, timeout: exit 3.
    #[error("cannot reach the stitch server at {server}: {detail}")]
    Unreachable { server: String, detail: String },
    /// The server answered with an error body.
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// The server answered something this client does not understand: exit 3.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
}

impl ClientError {
    /// A 404 `build_not_found`: an unknown id, or a build retention deleted.
    pub fn is_build_not_found(&self) -> bool {
        matches!(self, ClientError::Api { status: 404, code, .. } if code == "build_not_found")
    }

    /// 2 for requests the server refused (4xx), 3 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Api { status, .. } if (400..500).contains(status) => 2,
            _ => 3,
        }
    }
}

/// The API client.
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client of `server` (base URL) authenticating with `token`.
    pub fn new(server: &str, token: Option<String>) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(Self {
            http,
            base: server.trim_end_matches('/').to_string(),
            token,
        })
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req.send().await.map_err(|e| ClientError::Unreachable {
            server: self.base.clone(),
            detail: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| ClientError::Unreachable {
            server: self.base.clone(),
            detail: e.to_string(),
        })?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(e.to_string()));
        }
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(b) => Err(ClientError::Api {
                status,
                code: b.error.code,
                message: b.error.message,
            }),
            Err(_) => Err(ClientError::Api {
                status,
                code: "http_error".into(),
                message: String::from_utf8_lossy(&body).chars().take(200).collect(),
            }),
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, ClientError> {
        serde_json::from_value(v).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// A copy for another task (the HTTP client is shared).
    pub fn clone_for_task(&self) -> Client {
        Client {
            http: self.http.clone(),
            base: self.base.clone(),
            token: self.token.clone(),
        }
    }

    /// `POST /v1/queues/{queue}/builds`.
    pub async fn create(&self, queue: &str, req: &CreateBuild) -> Result<BuildRecord, ClientError> {
        let url = format!("{}/v1/queues/{}/builds", self.base, queue);
        Self::decode(self.send(self.http.post(url).json(req)).await?)
    }

    /// `GET /v1/builds/{id}`.
    pub async fn get(&self, id: &str) -> Result<BuildRecord, ClientError> {
        Self::decode(
            self.send(self.http.get(format!("{}/v1/builds/{}", self.base, id)))
                .await?,
        )
    }

    /// `POST /v1/builds/{id}/cancel`.
    pub async fn cancel(&self, id: &str) -> Result<BuildRecord, ClientError> {
        Self::decode(
            self.send(
                self.http
                    .post(format!("{}/v1/builds/{}/cancel", self.base, id)),
            )
            .await?,
        )
    }

    /// `GET /v1/builds?…`.
    pub async fn list(
        &self,
        queue: Option<&str>,
        status: Option<&str>,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<BuildList, ClientError> {
        let mut query: Vec<(&str, String)> = vec![("limit", limit.to_string())];
        if let Some(c) = cursor {
            query.push(("cursor", c.to_string()));
        }
        if let Some(q) = queue {
            query.push(("queue", q.to_string()));
        }
        if let Some(s) = status {
            query.push(("status", s.to_string()));
        }
        let url = format!("{}/v1/builds", self.base);
        let qs: Vec<String> = query
            .iter()
            .map(|(k, v)| format!("{k}={}", urlencode(v)))
            .collect();
        Self::decode(
            self.send(self.http.get(format!("{url}?{}", qs.join("&"))))
                .await?,
        )
    }
}

/// What the log stream yielded.
pub enum LogEvent {
    /// One `LogLine` frame.
    Line(stitch_core::LogLine),
    /// The log is complete.
    End,
}

impl Client {
    /// Streams `GET /v1/builds/{id}/logs` (SSE), calling `on` per frame.
    /// Returns `Ok(false)` when the build has no log yet (404 `logs_not_found`).
    pub async fn stream_logs(
        &self,
        id: &str,
        mut on: impl FnMut(LogEvent),
    ) -> Result<bool, ClientError> {
        use futures::StreamExt;
        let mut req = self
            .http
            .get(format!("{}/v1/builds/{}/logs", self.base, id))
            .header("accept", "text/event-stream")
            .timeout(Duration::from_secs(24 * 3600));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| ClientError::Unreachable {
            server: self.base.clone(),
            detail: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let body = resp.bytes().await.unwrap_or_default();
            let err = serde_json::from_slice::<ErrorBody>(&body).ok();
            if status == 404
                && err
                    .as_ref()
                    .is_some_and(|e| e.error.code == "logs_not_found")
            {
                return Ok(false);
            }
            return Err(match err {
                Some(b) => ClientError::Api {
                    status,
                    code: b.error.code,
                    message: b.error.message,
                },
                None => ClientError::Protocol(format!("HTTP {status} from the log stream")),
            });
        }
        let mut stream = resp.bytes_stream();
        let mut buf = String::new();
        let (mut event, mut data) = (String::new(), String::new());
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ClientError::Unreachable {
                server: self.base.clone(),
                detail: e.to_string(),
            })?;
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(pos) = buf.find('\n') {
                let line: String = buf.drain(..=pos).collect();
                let line = line.trim_end_matches(['\r', '\n']);
                if line.is_empty() {
                    match event.as_str() {
                        "log" => {
                            if let Ok(l) = serde_json::from_str(&data) {
                                on(LogEvent::Line(l));
                            }
                        }
                        "end" => {
                            on(LogEvent::End);
                            return Ok(true);
                        }
                        "error" => {
                            return Err(ClientError::Protocol(format!("log stream failed: {data}")))
                        }
                        _ => {}
                    }
                    event.clear();
                    data.clear();
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
        }
        Ok(true)
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
