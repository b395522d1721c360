//! A small client of stitch's HTTP API (`/v1`).

use std::time::{Duration, Instant};

use eventsource_stream::{Event as SseFrame, EventStreamError, Eventsource};
use futures::stream::BoxStream;
use futures::StreamExt;
use serde_json::Value;
use stitch_api::{BuildList, BuildRecord, CreateBuild, ErrorBody, Event};
use stitch_core::LogLine;

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
    /// 410 `events_pruned`: retention deleted the events after the position
    /// asked for.
    #[error("{message} (events_pruned, HTTP 410; oldest event kept: {oldest_seq})")]
    EventsPruned { oldest_seq: u64, message: String },
    /// A stream dropped and could not be resumed in time: exit 3.
    #[error("{what} was cut ({detail}) and could not be resumed within {}s", waited.as_secs_f64())]
    StreamCut {
        what: String,
        waited: Duration,
        detail: String,
    },
}

impl ClientError {
    /// A 404 `build_not_found`: an unknown id, or a build retention deleted.
    pub fn is_build_not_found(&self) -> bool {
        matches!(self, ClientError::Api { status: 404, code, .. } if code == "build_not_found")
    }

    /// The error code of an API answer (`build_not_found`, …).
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            ClientError::EventsPruned { .. } => Some("events_pruned"),
            _ => None,
        }
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
    /// For the long-lived streams: no overall deadline, but a read deadline
    /// well past the server's 15 s keepalives, so a connection that went
    /// silent (a peer gone without a FIN) counts as dropped and is resumed.
    streams: reqwest::Client,
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
        let streams = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(45))
            .build()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(Self {
            http,
            streams,
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
        Err(error_answer(status, &body))
    }

    fn decode<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, ClientError> {
        serde_json::from_value(v).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// A copy for another task (the HTTP client is shared).
    pub fn clone_for_task(&self) -> Client {
        Client {
            http: self.http.clone(),
            streams: self.streams.clone(),
            base: self.base.clone(),
            token: self.token.clone(),
        }
    }

    /// `POST /v1/queues/{queue}/builds`.
    pub async fn create(&self, queue: &str, req: &CreateBuild) -> Result<BuildRecord, ClientError> {
        let url = format!("{}/v1/queues/{}/builds", self.base, queue);
        Self::decode(self.send(self.http.post(url).json(req)).await?)
    }

    /// `GET /v1/events?after=…`.
    fn events_url(&self, after: &str) -> String {
        format!("{}/v1/events?after={after}", self.base)
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

/// How a log stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogsOutcome {
    /// The server sent the `end` frame: every line was delivered.
    Complete,
    /// The build has no log (yet): 404 `logs_not_found`.
    NoLog,
}

/// What [`BuildFeed::next`] yields.
#[derive(Debug)]
pub enum FeedItem {
    /// One event of the log (any build's).
    Event(Box<Event>),
    /// The feed had to start again from the newest event, so events may
    /// have been missed: re-read what the events stand for. Carries a note
    /// for the user when there is something to say (retention pruned the
    /// events after the last one read).
    Resynced(Option<String>),
}

/// A stream of parsed SSE frames.
type Frames = BoxStream<'static, Result<SseFrame, EventStreamError<reqwest::Error>>>;

/// When a dropped stream's reconnects stop: `give_up_after` after the drop.
/// Attempts wait `FIRST_RETRY` and double up to `MAX_RETRY` in between.
#[derive(Debug, Clone, Copy)]
pub struct Reconnect {
    pub give_up_after: Duration,
}

const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);
/// A reopened stream that stayed up this long before dropping again counts
/// as recovered: its drop starts a new reconnect window (a quiet stream may
/// be up for hours between drops). One that drops sooner continues the
/// window, so a server that accepts and closes at once is given up on.
const STABLE: Duration = Duration::from_secs(5);

/// The state of one dropped stream while it is being reconnected.
struct Cut {
    since: Instant,
    delay: Duration,
    why: String,
}

impl Cut {
    fn new(why: String) -> Self {
        Cut {
            since: Instant::now(),
            delay: FIRST_RETRY,
            why,
        }
    }

    /// The cut after a stream opened at `opened` dropped for `why`.
    fn after_drop(current: Option<Cut>, opened: Instant, why: String) -> Cut {
        match current {
            Some(mut c) if opened.elapsed() < STABLE => {
                c.why = why;
                c
            }
            _ => Cut::new(why),
        }
    }

    /// Waits before the next attempt, or says the stream is lost for good.
    async fn wait(&mut self, policy: Reconnect, what: &str) -> Result<(), ClientError> {
        if self.since.elapsed() >= policy.give_up_after {
            return Err(ClientError::StreamCut {
                what: what.to_string(),
                waited: policy.give_up_after,
                detail: self.why.clone(),
            });
        }
        // A timed back-off: the server is gone or restarting, and nothing
        // announces that it is back, so the only way to know is to try again.
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(MAX_RETRY);
        Ok(())
    }
}

/// Whether an error opening a stream again after a drop is worth another
/// attempt: the server is away or restarting (connection refused, 5xx).
fn is_transient(e: &ClientError) -> bool {
    match e {
        ClientError::Unreachable { .. } => true,
        ClientError::Api { status, .. } => *status >= 500,
        _ => false,
    }
}

impl Client {
    /// `GET url` as `text/event-stream`, resuming after `last_event_id` when
    /// given. Error answers (sent before any frame) become [`ClientError`]s.
    async fn open_sse(
        &self,
        url: String,
        last_event_id: Option<u64>,
    ) -> Result<Frames, ClientError> {
        let mut req = self.streams.get(url).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id.to_string());
        }
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
            return Err(error_answer(status, &body));
        }
        Ok(resp.bytes_stream().eventsource().boxed())
    }

    /// Streams `GET /v1/builds/{id}/logs` (SSE), calling `on` per line, until
    /// the server's `end` frame. A stream that drops before it is resumed
    /// after the last line received (`Last-Event-ID`), so no line is lost or
    /// repeated; when it cannot be resumed within `reconnect` the answer is
    /// [`ClientError::StreamCut`].
    pub async fn follow_logs(
        &self,
        id: &str,
        reconnect: Reconnect,
        mut on: impl FnMut(LogLine),
    ) -> Result<LogsOutcome, ClientError> {
        let what = format!("the log stream of {id}");
        let url = format!("{}/v1/builds/{}/logs", self.base, id);
        // Frames received so far (the 1-based `id` of the last one).
        let mut position = 0u64;
        let mut cut: Option<Cut> = None;
        loop {
            if let Some(c) = cut.as_mut() {
                c.wait(reconnect, &what).await?;
            }
            let resume = (position > 0).then_some(position);
            let opened = Instant::now();
            let mut frames = match self.open_sse(url.clone(), resume).await {
                Ok(frames) => frames,
                Err(e) if e.code() == Some("logs_not_found") && cut.is_none() => {
                    return Ok(LogsOutcome::NoLog)
                }
                Err(e) if cut.is_some() && is_transient(&e) => {
                    if let Some(c) = cut.as_mut() {
                        c.why = e.to_string();
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            let why = loop {
                match frames.next().await {
                    Some(Ok(frame)) => match frame.event.as_str() {
                        "log" => {
                            let line: LogLine = serde_json::from_str(&frame.data).map_err(|e| {
                                ClientError::Protocol(format!(
                                    "a log frame that is not a LogLine: {e}"
                                ))
                            })?;
                            position = frame.id.parse().unwrap_or(position + 1);
                            cut = None;
                            on(line);
                        }
                        "end" => return Ok(LogsOutcome::Complete),
                        "error" => {
                            return Err(ClientError::Protocol(format!(
                                "the server could not read the rest of {what}: {}",
                                frame.data
                            )))
                        }
                        _ => {}
                    },
                    Some(Err(e)) => break e.to_string(),
                    None => break "the connection ended before the log's end frame".to_string(),
                }
            };
            tracing::debug!(%why, position, "log stream dropped; resuming");
            cut = Some(Cut::after_drop(cut.take(), opened, why));
        }
    }
}

/// `GET /v1/events`, followed from the moment it was opened, reconnecting
/// after a drop (resuming after the last event read), and starting again
/// from the newest event when retention deleted the ones it needed.
pub struct BuildFeed {
    client: Client,
    reconnect: Reconnect,
    /// The `seq` of the last event read.
    position: Option<u64>,
    frames: Option<Frames>,
    /// When `frames` was opened.
    opened: Instant,
    cut: Option<Cut>,
}

impl BuildFeed {
    /// Subscribes at the newest event (`after=latest`). Read the state the
    /// events change (the build record) after this returns.
    pub async fn open(client: &Client, reconnect: Reconnect) -> Result<BuildFeed, ClientError> {
        let client = client.clone_for_task();
        let frames = client.open_sse(client.events_url("latest"), None).await?;
        Ok(BuildFeed {
            client,
            reconnect,
            position: None,
            frames: Some(frames),
            opened: Instant::now(),
            cut: None,
        })
    }

    /// The next event, or [`FeedItem::Resynced`] after a reconnect that
    /// could not resume where the feed stopped.
    pub async fn next(&mut self) -> Result<FeedItem, ClientError> {
        loop {
            if let Some(frames) = self.frames.as_mut() {
                let why = match frames.next().await {
                    Some(Ok(frame)) if frame.event == "build" => {
                        let event: Event = serde_json::from_str(&frame.data).map_err(|e| {
                            ClientError::Protocol(format!(
                                "an event frame that is not an event: {e}"
                            ))
                        })?;
                        self.position = Some(event.seq);
                        self.cut = None;
                        return Ok(FeedItem::Event(Box::new(event)));
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => e.to_string(),
                    None => "the server ended the event stream".to_string(),
                };
                tracing::debug!(%why, position = ?self.position, "event stream dropped; resuming");
                self.frames = None;
                self.cut = Some(Cut::after_drop(self.cut.take(), self.opened, why));
            }
            if let Some(c) = self.cut.as_mut() {
                c.wait(self.reconnect, "the event stream").await?;
            }
            let (url, resume) = match self.position {
                Some(seq) => (self.client.events_url(&seq.to_string()), Some(seq)),
                None => (self.client.events_url("latest"), None),
            };
            match self.client.open_sse(url, resume).await {
                Ok(frames) => {
                    self.frames = Some(frames);
                    self.opened = Instant::now();
                    if self.position.is_none() {
                        // Whatever happened between the drop and now is unseen.
                        return Ok(FeedItem::Resynced(None));
                    }
                }
                Err(ClientError::EventsPruned { oldest_seq, .. }) => {
                    let note = format!(
                        "the events after {} were deleted by the server's retention \
                         (the oldest kept is {oldest_seq}); following on from the newest \
                         event and re-reading the build",
                        self.position.unwrap_or(0)
                    );
                    self.position = None;
                    let frames = self
                        .client
                        .open_sse(self.client.events_url("latest"), None)
                        .await?;
                    self.frames = Some(frames);
                    self.opened = Instant::now();
                    return Ok(FeedItem::Resynced(Some(note)));
                }
                Err(e) if self.cut.is_some() && is_transient(&e) => {
                    if let Some(c) = self.cut.as_mut() {
                        c.why = e.to_string();
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The error an answer's status and body stand for.
fn error_answer(status: u16, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) if b.error.code == "events_pruned" => ClientError::EventsPruned {
            oldest_seq: b.error.oldest_seq.unwrap_or(0),
            message: b.error.message,
        },
        Ok(b) => ClientError::Api {
            status,
            code: b.error.code,
            message: b.error.message,
        },
        Err(_) => ClientError::Api {
            status,
            code: "http_error".into(),
            message: String::from_utf8_lossy(body).chars().take(200).collect(),
        },
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
