//! A stateful fake of a Jenkins controller's remote-access API.
//!
//! Served by [`FakeJenkins::start`] on `127.0.0.1:0`. It holds jobs (full
//! names with folders, `team/app`) with their parameter definitions, a
//! queue and builds, and moves them along with time ([`Timing`]): a
//! `buildWithParameters` POST queues an item (answered `201` with
//! `Location: …/queue/item/N/`), which after `queue` leaves the queue as
//! build N of the job (`building: true`, console growing), which after
//! `run` ends `SUCCESS`. A `stitch-jk=<plan>` marker in the `STITCH_HEAD`
//! parameter picks another plan ([`Plan`]): `fail`, `unstable`,
//! `not_built`, `hang` (runs until stopped), `unknown` (ends with a result
//! stitch does not know), `queue` (waits for an executor until cancelled),
//! `stuck` (waits, `stuck: true`).
//!
//! Like Jenkins it checks basic auth (user and API token), drops
//! parameters a job does not declare and lists password parameters
//! without their values, merges a trigger identical to an item still
//! waiting into that item, forgets items a while after they left the
//! queue (`Timing::forget`; then 404), honours `tree=allBuilds[…]{a,b}`
//! ranges, serves `logText/progressiveText?start=N` with `X-Text-Size` and
//! `X-More-Data`, answers `stop` and `queue/cancelItem` with redirects, and
//! — when [`FakeOptions::require_crumb`] — refuses POSTs without the crumb
//! of `crumbIssuer/api/json` and the session cookie it is bound to. Faults
//! are injected per endpoint ([`Fault`]), 429 storms carry `Retry-After`,
//! and every request is counted ([`FakeStats`]).

mod world;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::faults::{AnswerFault, FaultRules};
pub use crate::faults::{Fault, FaultControl, Pause, ProviderFake};
use crate::serving::{run_clock, Clock, Tasks};
use world::{job_url, ItemState, World};
pub use world::{ParamKind, Plan, MARKER};

/// How fast fake items and builds progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Time an item waits in the queue before its build starts.
    pub queue: Duration,
    /// Time a build runs.
    pub run: Duration,
    /// Time from a `stop` to `ABORTED`.
    pub cancel: Duration,
    /// How long an item that left the queue is still served (Jenkins: 5
    /// minutes).
    pub forget: Duration,
    /// How often the fake advances.
    pub tick: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            queue: Duration::from_millis(100),
            run: Duration::from_millis(400),
            cancel: Duration::from_millis(50),
            forget: Duration::from_secs(300),
            tick: Duration::from_millis(10),
        }
    }
}

/// The API surface a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `buildWithParameters`.
    Trigger,
    /// `queue/item/N/api/json`.
    QueueItem,
    /// `queue/api/json`.
    Queue,
    /// `queue/cancelItem`.
    CancelItem,
    /// `job/…/N/api/json`.
    GetBuild,
    /// `job/…/api/json`.
    ListBuilds,
    /// `job/…/N/stop`.
    Stop,
    /// `job/…/N/logText/progressiveText`.
    Console,
    /// `crumbIssuer/api/json`.
    Crumb,
    /// Any of the above.
    Any,
}

/// Counters the tests and the benchmark read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeStats {
    /// Requests by endpoint name (`trigger`, `queue_item`, `queue`,
    /// `cancel_item`, `get_build`, `list_builds`, `stop`, `console`,
    /// `crumb`), refusals and faults included.
    pub requests: BTreeMap<&'static str, u64>,
    /// Requests answered 429.
    pub rate_limited: u64,
    /// Requests refused for bad credentials.
    pub unauthorized: u64,
    /// POSTs refused for a missing or stale crumb.
    pub crumb_refused: u64,
    /// Queue items created (merged triggers not counted).
    pub items_queued: u64,
}

impl FakeStats {
    /// Every API request.
    pub fn total_requests(&self) -> u64 {
        self.requests.values().sum()
    }
}

/// Options of [`FakeJenkins::start`].
#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// The user requests authenticate as.
    pub user: String,
    /// That user's API token.
    pub token: String,
    /// Jobs by full name, with the parameters each declares.
    pub jobs: Vec<(String, Vec<(String, ParamKind)>)>,
    pub timing: Timing,
    /// Refuse POSTs without a crumb (a controller that asks API clients
    /// for one).
    pub require_crumb: bool,
}

/// The parameters a stitch job declares: the `STITCH_*` set, the job
/// token as a password parameter.
pub fn stitch_parameters() -> Vec<(String, ParamKind)> {
    [
        ("STITCH_BUILD_ID", ParamKind::String),
        ("STITCH_QUEUE", ParamKind::String),
        ("STITCH_BASE", ParamKind::String),
        ("STITCH_HEAD", ParamKind::String),
        ("STITCH_METADATA", ParamKind::String),
        ("STITCH_SERVER", ParamKind::String),
        ("STITCH_JOB_TOKEN", ParamKind::Password),
    ]
    .into_iter()
    .map(|(n, k)| (n.to_string(), k))
    .collect()
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            user: "stitch".into(),
            token: "11f0e0c2d5b3a7e9c4d1f8a6b2e3c7d9a0".into(),
            jobs: vec![("team/app".into(), stitch_parameters())],
            timing: Timing::default(),
            require_crumb: false,
        }
    }
}

struct Inner {
    world: World,
    faults: FaultRules<Endpoint>,
    stats: FakeStats,
    arrivals: Vec<Instant>,
    storm_until: Option<Instant>,
    require_crumb: bool,
    /// Crumbs by session id.
    sessions: HashMap<String, String>,
    /// `(queue item id, STITCH_BUILD_ID)` of every item ever queued.
    queued: Vec<(u64, String)>,
    /// The `start` of every console request, in arrival order.
    console_starts: Vec<u64>,
}

struct Shared {
    base: String,
    /// `Basic base64(user:token)`.
    authorization: String,
    timing: Timing,
    inner: Mutex<Inner>,
    /// Bumped after each tick that moved an item or a build.
    moved: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running fake. Stops when dropped.
pub struct FakeJenkins {
    addr: SocketAddr,
    shared: Arc<Shared>,
    user: String,
    token: String,
    /// Aborted when the fake is dropped.
    _tasks: Tasks,
}

impl FakeJenkins {
    /// Starts the fake on `127.0.0.1:0`.
    pub async fn start(options: FakeOptions) -> std::io::Result<Self> {
        let (listener, addr) = crate::serving::bind().await?;
        let mut world = World::default();
        for (name, parameters) in &options.jobs {
            world.jobs.insert(
                name.clone(),
                world::FakeJob {
                    parameters: parameters.clone(),
                    ..Default::default()
                },
            );
        }
        let shared = Arc::new(Shared {
            base: format!("http://{addr}"),
            authorization: format!(
                "Basic {}",
                base64(format!("{}:{}", options.user, options.token).as_bytes())
            ),
            timing: options.timing,
            inner: Mutex::new(Inner {
                world,
                faults: FaultRules::default(),
                stats: FakeStats::default(),
                arrivals: Vec::new(),
                storm_until: None,
                require_crumb: options.require_crumb,
                sessions: HashMap::new(),
                queued: Vec::new(),
                console_starts: Vec::new(),
            }),
            moved: watch::channel(0).0,
        });
        let app = Router::new()
            .route("/job/{*rest}", get(job_get).post(job_post))
            .route("/queue/item/{id}/api/json", get(queue_item))
            .route("/queue/api/json", get(queue))
            .route("/queue/cancelItem", post(cancel_item))
            .route("/crumbIssuer/api/json", get(crumb))
            .with_state(shared.clone());
        let mut tasks = Tasks::default();
        tasks.serve(listener, app);
        tasks.spawn(run_clock(shared.clone()));
        Ok(Self {
            addr,
            shared,
            user: options.user,
            token: options.token,
            _tasks: tasks,
        })
    }

    /// The root URL to configure as `url` (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        self.shared.base.clone()
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The accepted user.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The accepted API token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Changes after every tick that moved an item or a build.
    pub fn builds_moved(&self) -> watch::Receiver<u64> {
        self.shared.moved.subscribe()
    }

    /// Answers every request with 429 and `Retry-After` for `length`.
    pub fn rate_limit_storm(&self, length: Duration) {
        self.shared.lock().storm_until = Some(Instant::now() + length);
    }

    /// Whether POSTs need a crumb from now on.
    pub fn set_require_crumb(&self, required: bool) {
        self.shared.lock().require_crumb = required;
    }

    /// Forgets every crumb issued (a controller restart): the next POST
    /// with one is refused.
    pub fn expire_crumbs(&self) {
        self.shared.lock().sessions.clear();
    }

    /// Forgets every item that left the queue, as Jenkins does minutes
    /// later: their `queue/item/N` answers 404 from now on.
    pub fn forget_left_items(&self) {
        self.shared
            .lock()
            .world
            .items
            .retain(|i| i.state == ItemState::Waiting);
    }

    /// The counters so far.
    pub fn stats(&self) -> FakeStats {
        self.shared.lock().stats.clone()
    }

    /// The most requests sent within any span of `window`.
    pub fn max_requests_in(&self, window: Duration) -> usize {
        let inner = self.shared.lock();
        crate::serving::max_in_window(&inner.arrivals, window)
    }

    /// How many queue items were ever made for `STITCH_BUILD_ID = id`
    /// (each becomes at most one build).
    pub fn items_for(&self, stitch_build_id: &str) -> usize {
        self.shared
            .lock()
            .queued
            .iter()
            .filter(|(_, id)| id == stitch_build_id)
            .count()
    }

    /// `(STITCH_BUILD_ID, result or "building")` of every build carrying one.
    pub fn stitch_builds(&self) -> Vec<(String, String)> {
        self.shared
            .lock()
            .world
            .all_builds()
            .filter_map(|b| {
                let state = b.result.unwrap_or("building");
                Some((
                    b.parameter("STITCH_BUILD_ID")?.to_string(),
                    state.to_string(),
                ))
            })
            .collect()
    }

    /// The `api/json` of the build carrying `STITCH_BUILD_ID = id`.
    pub fn build_json(&self, stitch_build_id: &str) -> Option<Value> {
        let inner = self.shared.lock();
        inner.world.jobs.iter().find_map(|(name, job)| {
            let b = job
                .builds
                .iter()
                .find(|b| b.parameter("STITCH_BUILD_ID") == Some(stitch_build_id))?;
            Some(inner.world.build_json(&self.shared.base, name, b))
        })
    }

    /// The `api/json` of the newest queue item carrying `STITCH_BUILD_ID = id`,
    /// while Jenkins still serves it.
    pub fn item_json(&self, stitch_build_id: &str) -> Option<Value> {
        let inner = self.shared.lock();
        let item = inner.world.items.iter().rev().find(|i| {
            i.parameters
                .iter()
                .any(|(n, v)| n == "STITCH_BUILD_ID" && v == stitch_build_id)
        })?;
        Some(inner.world.item_json(&self.shared.base, item))
    }

    /// Returns the build's JSON once `wanted` holds for it, re-checking
    /// after every move.
    pub async fn build_until(
        &self,
        stitch_build_id: &str,
        wanted: impl Fn(&Value) -> bool,
    ) -> Value {
        let mut moved = self.builds_moved();
        loop {
            moved.borrow_and_update();
            if let Some(b) = self.build_json(stitch_build_id).filter(|b| wanted(b)) {
                return b;
            }
            // The sender lives in the fake, as long as `self`.
            let _ = moved.changed().await;
        }
    }

    /// The `start` of every console request so far.
    pub fn console_starts(&self) -> Vec<u64> {
        self.shared.lock().console_starts.clone()
    }

    /// Queues a build directly (as someone in the UI would): not stitch's
    /// unless its parameters say so. Returns the queue item id.
    pub fn queue_foreign_build(&self, job: &str, parameters: &[(&str, &str)]) -> Option<u64> {
        let given: Vec<(String, String)> = parameters
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        let mut inner = self.shared.lock();
        inner
            .world
            .queue_build(job, &given, Instant::now())
            .map(|(id, _)| id)
    }
}

impl FaultControl for FakeJenkins {
    type Endpoint = Endpoint;

    fn with_fault_rules<R>(&self, f: impl FnOnce(&mut FaultRules<Endpoint>) -> R) -> R {
        f(&mut self.shared.lock().faults)
    }
}

impl ProviderFake for FakeJenkins {
    const START: Endpoint = Endpoint::Trigger;
    const POLL: Endpoint = Endpoint::GetBuild;

    fn builds_for(&self, stitch_build_id: &str) -> usize {
        self.items_for(stitch_build_id)
    }

    fn builds_started(&self) -> u64 {
        self.stats().items_queued
    }
}

/// Items and builds advance on each tick (Jenkins sends no webhooks: a
/// tick that moved anything is one move, handed on to nobody).
impl Clock for Shared {
    type Move = ();

    fn period(&self) -> Duration {
        self.timing.tick
    }

    fn moved(&self) -> &watch::Sender<u64> {
        &self.moved
    }

    fn advance(&self, now: Instant) -> Vec<()> {
        let moved = self.lock().world.advance(now, &self.timing);
        if moved {
            vec![()]
        } else {
            Vec::new()
        }
    }

    fn hand_on(&self, (): ()) {}
}

/// Standard base64 (RFC 4648, padded): what basic auth carries.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn html(status: StatusCode, text: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html;charset=utf-8")],
        format!(
            "<html><head><title>Error {}</title></head><body><h2>HTTP ERROR {} {text}</h2></body></html>",
            status.as_u16(),
            status.as_u16()
        ),
    )
        .into_response()
}

fn json_response(v: &Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json;charset=utf-8")],
        v.to_string(),
    )
        .into_response()
}

fn redirect(status: StatusCode, location: &str) -> Response {
    let mut resp = status.into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// The session a request's cookie names, if any.
fn session_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            name.starts_with("JSESSIONID").then(|| value.to_string())
        })
}

/// Auth, rate limit, crumb and faults, in Jenkins' order. `Err` is the
/// answer.
#[allow(clippy::result_large_err)]
fn gate(
    shared: &Shared,
    headers: &HeaderMap,
    method: &Method,
    endpoint: Endpoint,
    name: &'static str,
) -> Result<AnswerFault, Response> {
    let mut inner = shared.lock();
    *inner.stats.requests.entry(name).or_default() += 1;
    let now = Instant::now();
    inner.arrivals.push(now);
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if presented != Some(shared.authorization.as_str()) {
        inner.stats.unauthorized += 1;
        let mut resp = html(StatusCode::UNAUTHORIZED, "Invalid password/token for user");
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"Jenkins\""),
        );
        return Err(resp);
    }
    if let Some(until) = inner.storm_until.filter(|u| *u > now) {
        inner.stats.rate_limited += 1;
        let secs = (until - now).as_secs_f64().ceil().max(1.0) as u64;
        let mut resp = html(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests");
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return Err(resp);
    }
    if *method == Method::POST && inner.require_crumb {
        let sent = headers.get("jenkins-crumb").and_then(|v| v.to_str().ok());
        let expected = session_of(headers).and_then(|s| inner.sessions.get(&s).cloned());
        if sent.is_none() || sent != expected.as_deref() {
            inner.stats.crumb_refused += 1;
            return Err(html(
                StatusCode::FORBIDDEN,
                "No valid crumb was included in the request",
            ));
        }
    }
    inner.faults.admit(endpoint, Endpoint::Any)
}

async fn crumb(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let after = match gate(&s, &headers, &Method::GET, Endpoint::Crumb, "crumb") {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let session = hex::encode(rand::random::<[u8; 12]>());
    let value = hex::encode(rand::random::<[u8; 32]>());
    s.lock().sessions.insert(session.clone(), value.clone());
    let mut resp = json_response(&json!({
        "_class": "hudson.security.csrf.DefaultCrumbIssuer",
        "crumb": value,
        "crumbRequestField": "Jenkins-Crumb",
    }));
    if let Ok(cookie) =
        HeaderValue::from_str(&format!("JSESSIONID.fake={session}; Path=/; HttpOnly"))
    {
        resp.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    after.apply(resp).await
}

/// A job URL's rest (`team/job/app/4/stop`): the job's full name and what
/// follows it.
fn split_job(rest: &str) -> (String, Vec<String>) {
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let mut names = Vec::new();
    let mut i = 0;
    if let Some(first) = segments.first() {
        names.push(first.to_string());
        i = 1;
    }
    while i + 1 < segments.len() && segments[i] == "job" {
        names.push(segments[i + 1].to_string());
        i += 2;
    }
    (
        names.join("/"),
        segments[i..].iter().map(|s| s.to_string()).collect(),
    )
}

async fn job_get(
    State(s): State<Arc<Shared>>,
    Path(rest): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let (job, tail) = split_job(&rest);
    let tail: Vec<&str> = tail.iter().map(String::as_str).collect();
    match tail.as_slice() {
        ["api", "json"] => list_builds(&s, &job, &query, &headers).await,
        [n, "api", "json"] => get_build(&s, &job, n, &headers).await,
        [n, "logText", "progressiveText"] => console(&s, &job, n, &query, &headers).await,
        _ => html(StatusCode::NOT_FOUND, "Not Found"),
    }
}

async fn job_post(
    State(s): State<Arc<Shared>>,
    Path(rest): Path<String>,
    req: Request,
) -> Response {
    let (job, tail) = split_job(&rest);
    let tail: Vec<&str> = tail.iter().map(String::as_str).collect();
    match tail.as_slice() {
        ["buildWithParameters"] => trigger(&s, &job, req).await,
        [n, "stop"] => stop(&s, &job, n, req.headers()).await,
        _ => html(StatusCode::NOT_FOUND, "Not Found"),
    }
}

async fn trigger(s: &Shared, job: &str, req: Request) -> Response {
    let after = match gate(
        s,
        req.headers(),
        &Method::POST,
        Endpoint::Trigger,
        "trigger",
    ) {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    // Jenkins reads parameters from the query and the form body alike.
    let mut given: Vec<(String, String)> = req.uri().query().map(parse_form).unwrap_or_default();
    let Ok(body) = axum::body::to_bytes(req.into_body(), 1 << 20).await else {
        return html(StatusCode::BAD_REQUEST, "Bad Request");
    };
    given.extend(parse_form(&String::from_utf8_lossy(&body)));
    let queued = {
        let mut inner = s.lock();
        let made = inner.world.queue_build(job, &given, Instant::now());
        if let Some((id, true)) = made {
            inner.stats.items_queued += 1;
            let stitch_id = given
                .iter()
                .find(|(n, _)| n == "STITCH_BUILD_ID")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            inner.queued.push((id, stitch_id));
        }
        made
    };
    let Some((id, _)) = queued else {
        return html(StatusCode::NOT_FOUND, "Not Found");
    };
    let resp = redirect(StatusCode::CREATED, &format!("{}/queue/item/{id}/", s.base));
    after.apply(resp).await
}

/// `application/x-www-form-urlencoded` pairs.
fn parse_form(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn queue_item(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let after = match gate(
        &s,
        &headers,
        &Method::GET,
        Endpoint::QueueItem,
        "queue_item",
    ) {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let found = {
        let inner = s.lock();
        id.parse::<u64>().ok().and_then(|id| {
            let item = inner.world.items.iter().find(|i| i.id == id)?;
            Some(inner.world.item_json(&s.base, item))
        })
    };
    match found {
        Some(v) => after.apply(json_response(&v)).await,
        None => html(StatusCode::NOT_FOUND, "Not Found"),
    }
}

async fn queue(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let after = match gate(&s, &headers, &Method::GET, Endpoint::Queue, "queue") {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let items: Vec<Value> = {
        let inner = s.lock();
        inner
            .world
            .items
            .iter()
            .filter(|i| i.state == ItemState::Waiting)
            .map(|i| inner.world.item_json(&s.base, i))
            .collect()
    };
    let v = json!({"_class": "hudson.model.Queue", "discoverableItems": [], "items": items});
    after.apply(json_response(&v)).await
}

async fn cancel_item(
    State(s): State<Arc<Shared>>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let after = match gate(
        &s,
        &headers,
        &Method::POST,
        Endpoint::CancelItem,
        "cancel_item",
    ) {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let id = query
        .iter()
        .find(|(k, _)| k == "id")
        .and_then(|(_, v)| v.parse::<u64>().ok());
    {
        let mut inner = s.lock();
        let now = Instant::now();
        if let Some(item) = inner
            .world
            .items
            .iter_mut()
            .find(|i| Some(i.id) == id && i.state == ItemState::Waiting)
        {
            item.state = ItemState::Cancelled;
            item.left_at = Some(now);
        }
    }
    // Jenkins forwards to the previous page whether or not the item waited.
    after
        .apply(redirect(StatusCode::FOUND, &format!("{}/queue/", s.base)))
        .await
}

async fn get_build(s: &Shared, job: &str, n: &str, headers: &HeaderMap) -> Response {
    let after = match gate(s, headers, &Method::GET, Endpoint::GetBuild, "get_build") {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let found = {
        let mut inner = s.lock();
        n.parse().ok().and_then(|n| {
            let b = inner.world.build_mut(job, n)?.clone();
            Some(inner.world.build_json(&s.base, job, &b))
        })
    };
    match found {
        Some(v) => after.apply(json_response(&v)).await,
        None => html(StatusCode::NOT_FOUND, "Not Found"),
    }
}

/// `{from,to}` at the end of a `tree` value.
fn tree_range(tree: &str) -> Option<(usize, usize)> {
    let open = tree.rfind('{')?;
    let (from, to) = tree[open + 1..].strip_suffix('}')?.split_once(',')?;
    Some((from.parse().ok()?, to.parse().ok()?))
}

async fn list_builds(
    s: &Shared,
    job: &str,
    query: &[(String, String)],
    headers: &HeaderMap,
) -> Response {
    let after = match gate(
        s,
        headers,
        &Method::GET,
        Endpoint::ListBuilds,
        "list_builds",
    ) {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let tree = query
        .iter()
        .find(|(k, _)| k == "tree")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    let (from, to) = tree_range(tree).unwrap_or((0, usize::MAX));
    let v = {
        let inner = s.lock();
        let Some(fake_job) = inner.world.jobs.get(job) else {
            return html(StatusCode::NOT_FOUND, "Not Found");
        };
        let builds: Vec<Value> = fake_job
            .builds
            .iter()
            .rev()
            .skip(from)
            .take(to.saturating_sub(from))
            .map(|b| inner.world.build_json(&s.base, job, b))
            .collect();
        json!({
            "_class": "org.jenkinsci.plugins.workflow.job.WorkflowJob",
            "allBuilds": builds,
        })
    };
    after.apply(json_response(&v)).await
}

async fn stop(s: &Shared, job: &str, n: &str, headers: &HeaderMap) -> Response {
    let after = match gate(s, headers, &Method::POST, Endpoint::Stop, "stop") {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let url = {
        let mut inner = s.lock();
        let Some(b) = n.parse().ok().and_then(|n| inner.world.build_mut(job, n)) else {
            return html(StatusCode::NOT_FOUND, "Not Found");
        };
        if b.building && b.stop_at.is_none() {
            b.stop_at = Some(Instant::now());
        }
        format!("{}{}/", job_url(&s.base, job), b.number)
    };
    after.apply(redirect(StatusCode::FOUND, &url)).await
}

async fn console(
    s: &Shared,
    job: &str,
    n: &str,
    query: &[(String, String)],
    headers: &HeaderMap,
) -> Response {
    let after = match gate(s, headers, &Method::GET, Endpoint::Console, "console") {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let start = query
        .iter()
        .find(|(k, _)| k == "start")
        .and_then(|(_, v)| v.parse::<u64>().ok())
        .unwrap_or(0);
    let (text, building) = {
        let mut inner = s.lock();
        inner.console_starts.push(start);
        let Some(b) = n.parse().ok().and_then(|n| inner.world.build_mut(job, n)) else {
            return html(StatusCode::NOT_FOUND, "Not Found");
        };
        (b.console.clone().into_bytes(), b.building)
    };
    let size = text.len();
    // Jenkins starts over when asked past the end (the log rolled over).
    let from = usize::try_from(start)
        .ok()
        .filter(|s| *s <= size)
        .unwrap_or(0);
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain;charset=utf-8")],
        text[from..].to_vec(),
    )
        .into_response();
    resp.headers_mut()
        .insert("x-text-size", HeaderValue::from(size as u64));
    if building {
        resp.headers_mut()
            .insert("x-more-data", HeaderValue::from_static("true"));
    }
    after.apply(resp).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_pads_as_basic_auth_needs() {
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b""), "");
    }

    #[test]
    fn job_urls_split_into_name_and_action() {
        assert_eq!(
            split_job("team/job/app/4/stop"),
            (
                "team/app".to_string(),
                vec!["4".to_string(), "stop".to_string()]
            )
        );
        assert_eq!(
            split_job("app/buildWithParameters"),
            ("app".to_string(), vec!["buildWithParameters".to_string()])
        );
        assert_eq!(tree_range("allBuilds[number]{0,100}"), Some((0, 100)));
        assert_eq!(tree_range("allBuilds[number]"), None);
        assert_eq!(
            parse_form("A=%5B%22x%22%5D&B=a+b&C"),
            vec![
                ("A".to_string(), "[\"x\"]".to_string()),
                ("B".to_string(), "a b".to_string()),
                ("C".to_string(), String::new())
            ]
        );
    }
}
