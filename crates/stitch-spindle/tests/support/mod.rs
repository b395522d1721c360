//! Shared by the spindle tests: stateful fakes of Jetstream, a knot's event
//! stream and a PLC directory (with did:web documents), served over
//! loopback, and a real stitch server with the spindle mounted.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use futures::StreamExt;
use serde_json::{json, Value};
use stitch_server::config::{Config, FakeSection, QueueConfig, RunnerSection};
use stitch_server::state::AppState;
use stitch_spindle::did::{encode_multikey, DidKey};
use stitch_spindle::Settings;
use stitch_testkit::watch_until;
use tokio::sync::{broadcast, watch};
use tokio_tungstenite::tungstenite;
use tokio_util::sync::CancellationToken;

pub const HOSTNAME: &str = "spindle.test";
pub const OWNER: &str = "did:plc:owner";
/// Bounds every wait of a test.
pub const WAIT: Duration = Duration::from_secs(20);

/// Serves `router` on 127.0.0.1:0.
pub async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    addr
}

// ---------------------------------------------------------------------------
// A stream of JSON frames with a cursor: the model behind both fakes.

#[derive(Clone, Default)]
struct Log {
    inner: Arc<Mutex<LogInner>>,
}

#[derive(Default)]
struct LogInner {
    /// (cursor value, text frame)
    frames: Vec<(i64, String)>,
    live: Option<broadcast::Sender<(i64, String)>>,
    /// Cursor query of every connection, in order (`None`: no cursor).
    connections: Vec<Option<i64>>,
    kick: Option<watch::Sender<u64>>,
    /// Connections being served now.
    active: usize,
    /// Refusing connections (the service is down).
    down: bool,
    /// Bumped when a connection opens or closes: tests wait on it.
    moved: Option<watch::Sender<u64>>,
}

impl Log {
    fn new() -> Self {
        let (live, _) = broadcast::channel(1024);
        let (kick, _) = watch::channel(0);
        let (moved, _) = watch::channel(0);
        let log = Log::default();
        {
            let mut g = log.inner.lock().unwrap();
            g.live = Some(live);
            g.kick = Some(kick);
            g.moved = Some(moved);
        }
        log
    }

    fn push(&self, cursor: i64, text: String) {
        let g = &mut *self.inner.lock().unwrap();
        g.frames.push((cursor, text.clone()));
        if let Some(live) = &g.live {
            let _ = live.send((cursor, text));
        }
    }

    /// Serves one connection: frames matching `from` (inclusive or not),
    /// then live frames, until kicked or the client leaves.
    async fn serve(
        self,
        mut socket: WebSocket,
        cursor: Option<i64>,
        inclusive: bool,
        missing_means_all: bool,
    ) {
        let (backlog, mut live, mut kick) = {
            let g = &mut *self.inner.lock().unwrap();
            g.connections.push(cursor);
            g.active += 1;
            g.moved.as_ref().unwrap().send_modify(|n| *n += 1);
            let pass = |c: i64| match cursor {
                None => missing_means_all,
                Some(from) => {
                    if inclusive {
                        c >= from
                    } else {
                        c > from
                    }
                }
            };
            let backlog: Vec<String> = g
                .frames
                .iter()
                .filter(|(c, _)| pass(*c))
                .map(|(_, t)| t.clone())
                .collect();
            let live = g.live.as_ref().unwrap().subscribe();
            let kick = g.kick.as_ref().unwrap().subscribe();
            (backlog, live, kick)
        };
        self.clone()
            .pump(&mut socket, backlog, &mut live, &mut kick)
            .await;
        let mut g = self.inner.lock().unwrap();
        g.active -= 1;
        g.moved.as_ref().unwrap().send_modify(|n| *n += 1);
    }

    /// Changes whenever a connection opens or closes.
    fn moved(&self) -> watch::Receiver<u64> {
        self.inner
            .lock()
            .unwrap()
            .moved
            .as_ref()
            .unwrap()
            .subscribe()
    }

    async fn pump(
        self,
        socket: &mut WebSocket,
        backlog: Vec<String>,
        live: &mut broadcast::Receiver<(i64, String)>,
        kick: &mut watch::Receiver<u64>,
    ) {
        for text in backlog {
            if socket.send(Message::Text(text.into())).await.is_err() {
                return;
            }
        }
        loop {
            tokio::select! {
                biased;
                _ = kick.changed() => {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
                m = live.recv() => match m {
                    Ok((_, text)) => {
                        if socket.send(Message::Text(text.into())).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                },
                incoming = socket.recv() => match incoming {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(_)) => {}
                },
            }
        }
    }

    fn connections(&self) -> Vec<Option<i64>> {
        self.inner.lock().unwrap().connections.clone()
    }

    fn active(&self) -> usize {
        self.inner.lock().unwrap().active
    }

    fn kick(&self) {
        let g = self.inner.lock().unwrap();
        g.kick.as_ref().unwrap().send_modify(|n| *n += 1);
    }

    fn is_down(&self) -> bool {
        self.inner.lock().unwrap().down
    }

    /// Refuses new connections and closes the open ones; returns once none
    /// is served any more.
    async fn go_down(&self) {
        self.inner.lock().unwrap().down = true;
        self.kick();
        let log = self.clone();
        eventually("open connections to close", self.moved(), || {
            log.inner.lock().unwrap().active == 0
        })
        .await;
    }

    fn come_up(&self) {
        self.inner.lock().unwrap().down = false;
    }
}

/// Waits (bounded) until `check` holds, re-checking after every committed
/// write to the spindle's tables (a Jetstream or knot record applied, a
/// cursor advanced): the sync point [`SpindleDb::written`].
pub async fn until_written<F, Fut>(db: &stitch_spindle::db::SpindleDb, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut written = db.written();
    watch_until(&mut written, what, || {
        let done = check();
        async move { done.await.then_some(()) }
    })
    .await
}

/// Waits (bounded) until `f` holds, re-checking after every change `moved`
/// announces (a fake's [`FakeKnot::connections_moved`] or
/// [`FakeJetstream::connections_moved`]); spindle tables have
/// `until_written` instead.
pub async fn eventually(what: &str, mut moved: watch::Receiver<u64>, mut f: impl FnMut() -> bool) {
    watch_until(&mut moved, what, || std::future::ready(f().then_some(()))).await
}

// ---------------------------------------------------------------------------
// Jetstream

/// A fake Jetstream: `/subscribe?wantedCollections=…&cursor=<time_us>`
/// replays frames with `time_us >= cursor`, then follows live.
#[derive(Clone)]
pub struct FakeJetstream {
    log: Log,
    pub addr: SocketAddr,
    next_us: Arc<Mutex<i64>>,
}

impl FakeJetstream {
    pub async fn start() -> Self {
        let log = Log::new();
        let router = Router::new()
            .route("/subscribe", get(jetstream_subscribe))
            .with_state(log.clone());
        let addr = serve(router).await;
        Self {
            log,
            addr,
            next_us: Arc::new(Mutex::new(1_700_000_000_000_000)),
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/subscribe", self.addr)
    }

    /// Publishes a commit; returns its `time_us`.
    pub fn commit(
        &self,
        did: &str,
        op: &str,
        collection: &str,
        rkey: &str,
        record: Option<Value>,
    ) -> i64 {
        let time_us = {
            let mut n = self.next_us.lock().unwrap();
            *n += 1_000_000;
            *n
        };
        let mut commit = json!({"rev": "3l", "operation": op, "collection": collection, "rkey": rkey, "cid": "bafy"});
        if let Some(r) = record {
            commit["record"] = r;
        }
        let frame = json!({"did": did, "time_us": time_us, "kind": "commit", "commit": commit});
        self.log.push(time_us, frame.to_string());
        time_us
    }

    /// Publishes a raw text frame (malformed input).
    pub fn raw(&self, text: &str) {
        let c = *self.next_us.lock().unwrap();
        self.log.push(c, text.to_string());
    }

    pub fn connections(&self) -> Vec<Option<i64>> {
        self.log.connections()
    }

    /// Changes whenever a connection opens or closes.
    pub fn connections_moved(&self) -> watch::Receiver<u64> {
        self.log.moved()
    }

    pub fn kick(&self) {
        self.log.kick()
    }
}

async fn jetstream_subscribe(
    State(log): State<Log>,
    Query(q): Query<Vec<(String, String)>>,
    ws: WebSocketUpgrade,
) -> Response {
    let cursor = q
        .iter()
        .find(|(k, _)| k == "cursor")
        .and_then(|(_, v)| v.parse().ok());
    let wanted: Vec<&String> = q
        .iter()
        .filter(|(k, _)| k == "wantedCollections")
        .map(|(_, v)| v)
        .collect();
    if wanted.len() != 3 {
        return (StatusCode::BAD_REQUEST, "expected three wantedCollections").into_response();
    }
    ws.on_upgrade(move |s| log.serve(s, cursor, true, true))
}

// ---------------------------------------------------------------------------
// Knot

/// A fake knot: `/events?cursor=<nanos>` sends frames with `created >
/// cursor`, then follows live; a missing cursor means "now" (the old knot).
#[derive(Clone)]
pub struct FakeKnot {
    log: Log,
    pub addr: SocketAddr,
    last: Arc<Mutex<i64>>,
}

impl FakeKnot {
    pub async fn start() -> Self {
        let log = Log::new();
        let router = Router::new()
            .route("/events", get(knot_events))
            .with_state(log.clone());
        let addr = serve(router).await;
        Self {
            log,
            addr,
            last: Arc::new(Mutex::new(0)),
        }
    }

    /// The knot's hostname as repos name it (`127.0.0.1:PORT`).
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Publishes a record; returns its `created`.
    pub fn publish(&self, rkey: &str, nsid: &str, event: Value) -> i64 {
        let created = self.next_created();
        let frame = json!({"rkey": rkey, "nsid": nsid, "event": event, "created": created});
        self.log.push(created, frame.to_string());
        created
    }

    /// Publishes a raw text frame (malformed input).
    pub fn raw(&self, text: &str) {
        let created = self.next_created();
        self.log.push(created, text.to_string());
    }

    fn next_created(&self) -> i64 {
        let mut last = self.last.lock().unwrap();
        let now = chrono::Utc::now().timestamp_nanos_opt().unwrap();
        *last = now.max(*last + 1);
        *last
    }

    pub fn connections(&self) -> Vec<Option<i64>> {
        self.log.connections()
    }

    /// Streams served now.
    pub fn active(&self) -> usize {
        self.log.active()
    }

    /// Changes whenever a connection opens or closes.
    pub fn connections_moved(&self) -> watch::Receiver<u64> {
        self.log.moved()
    }

    pub fn kick(&self) {
        self.log.kick()
    }

    /// Closes every stream and refuses new ones until [`FakeKnot::come_up`].
    pub async fn go_down(&self) {
        self.log.go_down().await
    }

    pub fn come_up(&self) {
        self.log.come_up()
    }
}

async fn knot_events(
    State(log): State<Log>,
    Query(q): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    if log.is_down() {
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    let cursor = q.get("cursor").and_then(|v| v.parse().ok());
    ws.on_upgrade(move |s| log.serve(s, cursor, false, false))
}

// ---------------------------------------------------------------------------
// PLC directory and did:web

/// A signing identity of a test.
#[derive(Clone)]
pub enum TestKey {
    K256(k256::ecdsa::SigningKey),
    P256(p256::ecdsa::SigningKey),
}

impl TestKey {
    pub fn k256() -> Self {
        TestKey::K256(k256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng))
    }

    pub fn p256() -> Self {
        TestKey::P256(p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng))
    }

    fn public(&self) -> DidKey {
        match self {
            TestKey::K256(k) => DidKey::K256(*k.verifying_key()),
            TestKey::P256(k) => DidKey::P256(*k.verifying_key()),
        }
    }

    /// A compact service-auth JWT with `claims`.
    pub fn sign_jwt(&self, claims: &Value) -> String {
        let alg = match self {
            TestKey::K256(_) => "ES256K",
            TestKey::P256(_) => "ES256",
        };
        let header = URL_SAFE_NO_PAD.encode(json!({"typ": "JWT", "alg": alg}).to_string());
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signed = format!("{header}.{payload}");
        let sig = match self {
            TestKey::K256(k) => {
                use k256::ecdsa::signature::Signer;
                let s: k256::ecdsa::Signature = k.sign(signed.as_bytes());
                s.to_bytes().to_vec()
            }
            TestKey::P256(k) => {
                use p256::ecdsa::signature::Signer;
                let s: p256::ecdsa::Signature = k.sign(signed.as_bytes());
                s.to_bytes().to_vec()
            }
        };
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig))
    }
}

/// Claims of a cancel call by `iss`, valid for a minute.
pub fn cancel_claims(iss: &str) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({
        "iss": iss,
        "aud": format!("did:web:{HOSTNAME}"),
        "lxm": "sh.tangled.pipeline.cancelPipeline",
        "iat": now,
        "exp": now + 60,
        "jti": "t1",
    })
}

/// A fake PLC directory (`GET /<did>`) that also serves the did:web
/// document of its own host (`GET /.well-known/did.json`).
#[derive(Clone)]
pub struct FakePlc {
    docs: Arc<Mutex<HashMap<String, Value>>>,
    pub addr: SocketAddr,
}

impl FakePlc {
    pub async fn start() -> Self {
        let docs: Arc<Mutex<HashMap<String, Value>>> = Arc::default();
        let router = Router::new()
            .route("/.well-known/did.json", get(did_web_doc))
            .route("/{did}", get(plc_doc))
            .with_state(docs.clone());
        let addr = serve(router).await;
        Self { docs, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The did:web identity this server hosts.
    pub fn web_did(&self) -> String {
        format!("did:web:{}", self.addr.to_string().replace(':', "%3A"))
    }

    /// Publishes `did`'s document with `key` as its atproto key.
    pub fn register(&self, did: &str, key: &TestKey) {
        let doc = json!({
            "@context": ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/multikey/v1"],
            "id": did,
            "alsoKnownAs": ["at://someone.test"],
            "verificationMethod": [{
                "id": format!("{did}#atproto"),
                "type": "Multikey",
                "controller": did,
                "publicKeyMultibase": encode_multikey(&key.public()),
            }],
            "service": [],
        });
        self.docs.lock().unwrap().insert(did.to_string(), doc);
    }
}

async fn plc_doc(
    State(docs): State<Arc<Mutex<HashMap<String, Value>>>>,
    Path(did): Path<String>,
) -> Response {
    match docs.lock().unwrap().get(&did) {
        Some(doc) => Json(doc.clone()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"message": "DID not registered"})),
        )
            .into_response(),
    }
}

async fn did_web_doc(State(docs): State<Arc<Mutex<HashMap<String, Value>>>>) -> Response {
    let doc = docs
        .lock()
        .unwrap()
        .iter()
        .find(|(k, _)| k.starts_with("did:web:"))
        .map(|(_, v)| v.clone());
    match doc {
        Some(doc) => Json(doc).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

// ---------------------------------------------------------------------------
// The stitch server with the spindle

pub struct Harness {
    pub jetstream: FakeJetstream,
    pub knot: FakeKnot,
    pub plc: FakePlc,
    pub state: AppState,
    pub spindle: stitch_spindle::Spindle,
    pub addr: SocketAddr,
    pub stop: CancellationToken,
    pub client: reqwest::Client,
    _dir: tempfile::TempDir,
}

fn queues() -> BTreeMap<String, QueueConfig> {
    let fake = |run_ms: u64| QueueConfig {
        runner: RunnerSection::Fake(FakeSection {
            accept_delay: Duration::from_millis(50),
            run_duration: Duration::from_millis(run_ms),
            slow_factor: 2,
        }),
        ..QueueConfig::default()
    };
    let mut q = BTreeMap::new();
    // Runs long enough (polled every 50 ms) that a loaded machine still
    // sees each build `running` before it ends: 400 / 200 ms runs were
    // seen going from pending straight to success under load.
    let mut default = fake(1_500);
    default.poll.accepted = Duration::from_millis(50);
    default.poll.running = Duration::from_millis(50);
    let mut fast = default.clone();
    fast.runner = RunnerSection::Fake(FakeSection {
        run_duration: Duration::from_millis(1_000),
        accept_delay: Duration::from_millis(50),
        slow_factor: 2,
    });
    let mut slow = fake(60_000);
    slow.poll.accepted = Duration::from_millis(50);
    slow.poll.running = Duration::from_millis(50);
    q.insert("default".to_string(), default);
    q.insert("fast".to_string(), fast);
    let mut deadline = slow.clone();
    // Counted from the build's creation: long enough that a loaded machine
    // still shows the build `running` before the deadline ends it (300 ms
    // skipped `running` under load in e2e's live-logs test).
    deadline.max_duration = Some(Duration::from_secs(5));
    q.insert("slow".to_string(), slow);
    q.insert("deadline".to_string(), deadline);
    q
}

impl Harness {
    /// Fakes, plus a server whose owner's repo `myrepo` on the fake knot
    /// names this spindle (already on Jetstream before the spindle starts).
    pub async fn start() -> Harness {
        Self::start_pinging(Duration::from_secs(30)).await
    }

    /// [`Harness::start`] with WebSocket pings every `ping`.
    pub async fn start_pinging(ping: Duration) -> Harness {
        let jetstream = FakeJetstream::start().await;
        let knot = FakeKnot::start().await;
        let plc = FakePlc::start().await;
        jetstream.commit(
            OWNER,
            "create",
            "sh.tangled.repo",
            "repo1",
            Some(json!({"$type": "sh.tangled.repo", "name": "myrepo", "knot": knot.host(), "spindle": HOSTNAME, "createdAt": "2026-01-02T03:04:05Z"})),
        );
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_with(jetstream, knot, plc, dir, ping, true).await
    }

    /// [`Harness::start`] with `dev = false`: knots and did:web hosts must
    /// be DNS names (the fakes, on 127.0.0.1, are refused).
    pub async fn start_not_dev() -> Harness {
        let jetstream = FakeJetstream::start().await;
        let knot = FakeKnot::start().await;
        let plc = FakePlc::start().await;
        jetstream.commit(
            OWNER,
            "create",
            "sh.tangled.repo",
            "repo1",
            Some(json!({"$type": "sh.tangled.repo", "name": "myrepo", "knot": knot.host(), "spindle": HOSTNAME, "createdAt": "2026-01-02T03:04:05Z"})),
        );
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_with(jetstream, knot, plc, dir, Duration::from_secs(30), false).await
    }

    /// A server on an existing database and fakes (a restart).
    pub async fn start_on(
        jetstream: FakeJetstream,
        knot: FakeKnot,
        plc: FakePlc,
        dir: tempfile::TempDir,
    ) -> Harness {
        Self::start_with(jetstream, knot, plc, dir, Duration::from_secs(30), true).await
    }

    async fn start_with(
        jetstream: FakeJetstream,
        knot: FakeKnot,
        plc: FakePlc,
        dir: tempfile::TempDir,
        ping: Duration,
        dev: bool,
    ) -> Harness {
        let config = Config {
            data_dir: dir.path().join("data"),
            queues: queues(),
            ..Config::default()
        };
        let state = AppState::open(config).await.expect("open state");
        let stop = CancellationToken::new();
        stitch_server::stages::start(&state, stop.clone());
        let settings = Settings {
            hostname: HOSTNAME.to_string(),
            owner: OWNER.to_string(),
            default_queue: "default".to_string(),
            jetstream_url: jetstream.url(),
            plc_url: plc.url(),
            dev,
            ping_interval: ping,
            reconnect_min: Duration::from_millis(20),
            reconnect_max: Duration::from_millis(200),
            jetstream_rewind: Duration::from_secs(5),
        };
        let started = stitch_spindle::start(state.clone(), settings, stop.clone())
            .await
            .expect("start spindle");
        let router = stitch_server::http::router(state.clone(), Vec::new()).merge(started.router);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let http_stop = stop.clone();
        tokio::spawn(stitch_server::http::serve(listener, router, async move {
            http_stop.cancelled().await
        }));
        Harness {
            jetstream,
            knot,
            plc,
            state,
            spindle: started.spindle,
            addr,
            stop,
            client: reqwest::Client::builder()
                .timeout(WAIT)
                .build()
                .expect("client"),
            _dir: dir,
        }
    }

    /// Stops the server (keeping its database and the fakes).
    pub fn shutdown(self) -> (FakeJetstream, FakeKnot, FakePlc, tempfile::TempDir) {
        self.stop.cancel();
        (self.jetstream, self.knot, self.plc, self._dir)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Waits until the spindle follows the knot (`n` connections so far).
    pub async fn knot_connections(&self, n: usize) {
        let knot = self.knot.clone();
        eventually(
            "the spindle to connect to the knot",
            knot.connections_moved(),
            || knot.connections().len() >= n,
        )
        .await;
    }

    /// Publishes a push trigger for `repo` of `did` with `workflows`
    /// (name, raw YAML).
    pub fn push_trigger(
        &self,
        rkey: &str,
        knot: &str,
        did: &str,
        repo: &str,
        workflows: &[(&str, &str)],
    ) -> i64 {
        self.knot.publish(
            rkey,
            "sh.tangled.pipeline",
            trigger(knot, did, repo, workflows),
        )
    }

    pub async fn events(&self, cursor: Option<i64>) -> EventsClient {
        let path = match cursor {
            Some(c) => format!("/events?cursor={c}"),
            None => "/events".to_string(),
        };
        let (socket, _) = tokio_tungstenite::connect_async(self.ws(&path))
            .await
            .expect("connect /events");
        EventsClient {
            socket,
            frames: Vec::new(),
            texts: Vec::new(),
        }
    }

    /// Reads a whole log over /logs: (text frames, close code).
    pub async fn read_logs(
        &self,
        knot: &str,
        rkey: &str,
        workflow: &str,
    ) -> (Vec<String>, Option<u16>) {
        let url = self.ws(&format!("/logs/{knot}/{rkey}/{workflow}"));
        let (mut socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect /logs");
        let mut frames = Vec::new();
        loop {
            let msg = tokio::time::timeout(WAIT, socket.next())
                .await
                .expect("log frame in time");
            match msg {
                Some(Ok(tungstenite::Message::Text(t))) => frames.push(t.to_string()),
                Some(Ok(tungstenite::Message::Close(c))) => {
                    return (frames, c.map(|c| u16::from(c.code)))
                }
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return (frames, None),
            }
        }
    }
}

/// A `sh.tangled.pipeline` push trigger record.
pub fn trigger(knot: &str, did: &str, repo: &str, workflows: &[(&str, &str)]) -> Value {
    let wf: Vec<Value> = workflows
        .iter()
        .map(|(name, raw)| json!({"name": name, "engine": "nixery", "clone": {"skip": false, "depth": 1, "submodules": false}, "raw": raw}))
        .collect();
    json!({
        "$type": "",
        "triggerMetadata": {
            "kind": "push",
            "repo": {"knot": knot, "did": did, "repo": repo, "defaultBranch": ""},
            "push": {"ref": "refs/heads/main", "newSha": "a".repeat(40), "oldSha": "b".repeat(40)}
        },
        "workflows": wf,
    })
}

/// A client of the spindle's /events.
pub struct EventsClient {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    /// Every text frame received, parsed.
    pub frames: Vec<Value>,
    /// The same frames as received, byte for byte.
    pub texts: Vec<String>,
}

impl EventsClient {
    /// Reads until `done(frames)` holds (bounded).
    pub async fn until(&mut self, what: &str, done: impl Fn(&[Value]) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done(&self.frames) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let msg = tokio::time::timeout(left, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}; got {:#?}", self.frames));
            match msg {
                Some(Ok(tungstenite::Message::Text(t))) => {
                    let v: Value =
                        serde_json::from_str(t.as_str()).expect("every /events text frame is JSON");
                    self.frames.push(v);
                    self.texts.push(t.to_string());
                }
                Some(Ok(_)) => {}
                other => panic!("/events ended while waiting for {what}: {other:?}"),
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

/// The statuses of `workflow` of pipeline `rkey`, in order.
pub fn statuses(frames: &[Value], rkey: &str, workflow: &str) -> Vec<String> {
    frames
        .iter()
        .filter(|f| {
            f["event"]["workflow"] == workflow
                && f["event"]["pipeline"]
                    .as_str()
                    .is_some_and(|p| p.ends_with(&format!("/{rkey}")))
        })
        .map(|f| {
            f["event"]["status"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// Whether `workflow` of `rkey` reached `status`.
pub fn reached(frames: &[Value], rkey: &str, workflow: &str, status: &str) -> bool {
    statuses(frames, rkey, workflow).iter().any(|s| s == status)
}

pub fn data_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}
