//! A stateful fake of Buildkite's REST API v2 and webhooks.
//!
//! Served by [`FakeBuildkite::start`] on `127.0.0.1:0`. It holds
//! organizations and pipelines, creates builds with per-pipeline numbers
//! and UUIDs, and moves them along a plan with time ([`Timing`]): scheduled
//! → running (job `build`, then job `test`, logs with `_bk;t=` markers) →
//! passed. A `stitch-bk=<plan>` marker in the build's `STITCH_HEAD` env
//! picks another plan: `fail` (a promised failure turns it `failing`, then
//! `failed`), `hang` (runs until cancelled), `unknown` (stays `waiting`),
//! `block` (passes with `blocked: true`).
//!
//! Like Buildkite it checks the bearer token, filters lists by
//! `meta_data[…]`, `branch`, `state[]` and `created_from`, paginates with a
//! `Link` header, sends `RateLimit-*` headers and 429s past the per-org
//! limit, refuses to cancel finished builds with 422, and sends `build.*`
//! and `job.*` webhooks signed with either scheme. Faults are injected per
//! endpoint ([`Fault`]), and every request is counted ([`FakeStats`]).
//!
//! Job logs are served as Buildkite documents them (`research/buildkite.md`
//! §1.6): JSON `{url, content, size, header_times}` by default, the raw log
//! for `log.txt` or `Accept: text/plain`; `HEAD` answers `Content-Length`
//! and `Accept-Ranges: bytes`; a raw read with `Range: bytes=-N` answers 206
//! with the last N bytes and `Content-Range: bytes a-b/total` (the whole log
//! when N ≥ its size); explicit or multipart ranges answer 400 and a tail
//! of an empty log 416. Each log request's `Range` is recorded
//! ([`FakeBuildkite::log_ranges`]).

mod world;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::{mpsc, watch};

use crate::faults::{AnswerFault, FaultRules};
pub use crate::faults::{Fault, FaultControl, Pause, ProviderFake};
use crate::serving::{encode, run_clock, send_webhooks, Clock, RateWindow, Tasks, Webhooks};
use world::{is_terminal, CreateBody, Transition, World};
pub use world::{Plan, MARKER};

/// How fast fake builds progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Time from create to running.
    pub schedule: Duration,
    /// Time from running to finished (two jobs, half each).
    pub run: Duration,
    /// Time from a cancel request to `canceled` (`canceling` meanwhile).
    pub cancel: Duration,
    /// How often the fake advances builds.
    pub tick: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            schedule: Duration::from_millis(100),
            run: Duration::from_millis(400),
            cancel: Duration::from_millis(50),
            tick: Duration::from_millis(10),
        }
    }
}

/// The API surface a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Create,
    GetBuild,
    ListBuilds,
    Cancel,
    JobLog,
    /// Any of the above.
    Any,
}

/// How webhooks prove their origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebhookAuth {
    /// `X-Buildkite-Token: <token>`.
    Token(String),
    /// `X-Buildkite-Signature: timestamp=…,signature=…` keyed with the secret.
    Signature(String),
}

/// Where and how the fake sends webhooks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookTarget {
    /// The receiver URL.
    pub url: String,
    /// The scheme and secret.
    pub auth: WebhookAuth,
    /// Send `job.*` events too (Buildkite lets each webhook choose).
    pub job_events: bool,
}

/// Counters the tests and the benchmark read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeStats {
    /// Requests by endpoint name (`create`, `get_build`, `list_builds`,
    /// `cancel`, `job_log`), 429s and faults included.
    pub requests: BTreeMap<&'static str, u64>,
    /// Requests answered 429.
    pub rate_limited: u64,
    /// Requests refused for a bad token.
    pub unauthorized: u64,
    /// Builds created.
    pub builds_created: u64,
    /// Webhooks delivered (any answer) and refused by the receiver (non-2xx).
    pub webhooks_sent: u64,
    pub webhooks_refused: u64,
}

impl FakeStats {
    /// Every API request.
    pub fn total_requests(&self) -> u64 {
        self.requests.values().sum()
    }
}

struct Inner {
    world: World,
    faults: FaultRules<Endpoint>,
    stats: FakeStats,
    windows: HashMap<String, RateWindow>,
    /// Every API request's arrival time, per organization.
    arrivals: HashMap<String, Vec<Instant>>,
    storm_until: Option<Instant>,
    scopes: Vec<String>,
    /// Webhook receivers, taken in turn (one unless
    /// [`FakeBuildkite::set_webhooks`] gave several).
    webhooks: Vec<WebhookTarget>,
    /// How many webhooks were routed so far (picks the next receiver).
    webhooks_routed: usize,
    /// When the last webhook for (stitch build id, event) was sent.
    webhook_times: HashMap<(String, String), SystemTime>,
    /// The `Range` header of every job log request (`None`: no range).
    log_ranges: Vec<Option<String>>,
}

struct Shared {
    base: String,
    token: String,
    timing: Timing,
    rate_limit: Option<(u32, Duration)>,
    inner: Mutex<Inner>,
    webhooks: mpsc::UnboundedSender<Transition>,
    /// Bumped after each webhook delivery.
    webhooks_delivered: watch::Sender<u64>,
    /// Bumped after each tick that moved a build (every move is a
    /// transition).
    builds_moved: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Options of [`FakeBuildkite::start`].
#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// The API token requests must carry (`Authorization: Bearer …`).
    pub token: String,
    /// `(org, pipeline)` pairs that exist.
    pub pipelines: Vec<(String, String)>,
    pub timing: Timing,
    /// Per-organization limit: requests per window (Buildkite: 200 per
    /// minute). `None`: unlimited.
    pub rate_limit: Option<(u32, Duration)>,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            token: "bk-test-token".into(),
            pipelines: vec![("acme".into(), "app".into())],
            timing: Timing::default(),
            rate_limit: None,
        }
    }
}

/// The running fake. Stops when dropped.
pub struct FakeBuildkite {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Aborted when the fake is dropped.
    _tasks: Tasks,
}

impl FakeBuildkite {
    /// Starts the fake on `127.0.0.1:0`.
    pub async fn start(options: FakeOptions) -> std::io::Result<Self> {
        let (listener, addr) = crate::serving::bind().await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut world = World::default();
        for (org, p) in &options.pipelines {
            world
                .pipelines
                .insert((org.clone(), p.clone()), Default::default());
        }
        let shared = Arc::new(Shared {
            base: format!("http://{addr}"),
            token: options.token,
            timing: options.timing,
            rate_limit: options.rate_limit,
            inner: Mutex::new(Inner {
                world,
                faults: FaultRules::default(),
                stats: FakeStats::default(),
                windows: HashMap::new(),
                arrivals: HashMap::new(),
                storm_until: None,
                scopes: ["read_builds", "write_builds", "read_build_logs"]
                    .map(String::from)
                    .to_vec(),
                webhooks: Vec::new(),
                webhooks_routed: 0,
                webhook_times: HashMap::new(),
                log_ranges: Vec::new(),
            }),
            webhooks: tx,
            webhooks_delivered: watch::channel(0).0,
            builds_moved: watch::channel(0).0,
        });
        let builds = "/v2/organizations/{org}/pipelines/{pipeline}/builds";
        let app = Router::new()
            .route(builds, get(list_builds).post(create_build))
            .route(&format!("{builds}/{{number}}"), get(get_build))
            .route(&format!("{builds}/{{number}}/cancel"), put(cancel_build))
            .route(
                &format!("{builds}/{{number}}/jobs/{{job}}/{{file}}"),
                get(job_log).head(job_log),
            )
            .with_state(shared.clone());
        let mut tasks = Tasks::default();
        tasks.serve(listener, app);
        tasks.spawn(run_clock(shared.clone()));
        tasks.spawn(send_webhooks(shared.clone(), rx));
        Ok(Self {
            addr,
            shared,
            _tasks: tasks,
        })
    }

    /// The API root to configure as `api_url` (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        self.shared.base.clone()
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The accepted API token.
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// Returns once a webhook for `event` (`build.finished`, …) of the
    /// build stamped with `stitch_build_id` was delivered (answered).
    pub async fn webhook_delivered(&self, stitch_build_id: &str, event: &str) {
        crate::serving::until_delivered(&self.shared.webhooks_delivered, || {
            self.webhook_sent_at(stitch_build_id, event).is_some()
        })
        .await;
    }

    /// Returns once every webhook routed to a receiver so far was
    /// delivered (answered). After `set_webhook(None)` nothing more is
    /// routed, so from then on only the test's own requests reach the
    /// receiver.
    pub async fn webhooks_settled(&self) {
        crate::serving::until_delivered(&self.shared.webhooks_delivered, || {
            let inner = self.shared.lock();
            inner.stats.webhooks_sent >= inner.webhooks_routed as u64
        })
        .await;
    }

    /// Changes after every tick of the fake's clock that moved a build (its
    /// state or a job's changed): a test waits on it instead of re-reading
    /// on a timer.
    pub fn builds_moved(&self) -> watch::Receiver<u64> {
        self.shared.builds_moved.subscribe()
    }

    /// Returns the REST JSON of the build stamped with `stitch_build_id`
    /// once `wanted` holds for it, re-checking after every move.
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

    /// Answers every request with 429 for `length`, each carrying the
    /// seconds left until the storm ends as `RateLimit-Reset`.
    pub fn rate_limit_storm(&self, length: Duration) {
        self.shared.lock().storm_until = Some(Instant::now() + length);
    }

    /// The token's scopes (default: read_builds, write_builds, read_build_logs).
    pub fn set_scopes(&self, scopes: &[&str]) {
        self.shared.lock().scopes = scopes.iter().map(|s| s.to_string()).collect();
    }

    /// Sends webhooks to `target` from now on (`None`: stop).
    pub fn set_webhook(&self, target: Option<WebhookTarget>) {
        self.shared.lock().webhooks = target.into_iter().collect();
    }

    /// Sends each webhook to the next of `targets` in turn from now on, as
    /// a load balancer in front of several servers would (empty: stop).
    pub fn set_webhooks(&self, targets: Vec<WebhookTarget>) {
        self.shared.lock().webhooks = targets;
    }

    /// The counters so far.
    pub fn stats(&self) -> FakeStats {
        self.shared.lock().stats.clone()
    }

    /// The most requests `org` sent within any span of `window`.
    pub fn max_requests_in(&self, org: &str, window: Duration) -> usize {
        let inner = self.shared.lock();
        let Some(times) = inner.arrivals.get(org) else {
            return 0;
        };
        crate::serving::max_in_window(times, window)
    }

    /// How many builds carry `meta_data["stitch:build_id"] = id`.
    pub fn builds_for(&self, stitch_build_id: &str) -> usize {
        self.shared
            .lock()
            .world
            .all_builds()
            .filter(|b| {
                b.meta_data.get("stitch:build_id").map(String::as_str) == Some(stitch_build_id)
            })
            .count()
    }

    /// `(stitch build id, state)` of every build that carries one.
    pub fn stitch_builds(&self) -> Vec<(String, String)> {
        self.shared
            .lock()
            .world
            .all_builds()
            .filter_map(|b| Some((b.meta_data.get("stitch:build_id")?.clone(), b.state.clone())))
            .collect()
    }

    /// The REST JSON of the build stamped with `stitch_build_id`.
    pub fn build_json(&self, stitch_build_id: &str) -> Option<Value> {
        let inner = self.shared.lock();
        let b = inner.world.all_builds().find(|b| {
            b.meta_data.get("stitch:build_id").map(String::as_str) == Some(stitch_build_id)
        })?;
        Some(b.json(&self.shared.base, true))
    }

    /// The `Range` header of every job log request so far, in arrival order.
    pub fn log_ranges(&self) -> Vec<Option<String>> {
        self.shared.lock().log_ranges.clone()
    }

    /// Appends `text` to the log of job `job` (0: `build`, 1: `test`) of
    /// the build stamped with `stitch_build_id`, as an agent uploading more
    /// output would. False when there is no such build or job.
    pub fn append_job_log(&self, stitch_build_id: &str, job: usize, text: &str) -> bool {
        let mut inner = self.shared.lock();
        let build = inner
            .world
            .pipelines
            .values_mut()
            .flat_map(|p| p.builds.iter_mut())
            .find(|b| {
                b.meta_data.get("stitch:build_id").map(String::as_str) == Some(stitch_build_id)
            });
        match build.and_then(|b| b.jobs.get_mut(job)) {
            Some(j) => {
                j.log.push_str(text);
                true
            }
            None => false,
        }
    }

    /// When the last `event` webhook for `stitch_build_id` was sent.
    pub fn webhook_sent_at(&self, stitch_build_id: &str, event: &str) -> Option<SystemTime> {
        self.shared
            .lock()
            .webhook_times
            .get(&(stitch_build_id.to_string(), event.to_string()))
            .copied()
    }

    /// When the first cancel request for each stitch-stamped build arrived
    /// (the fake's clock: comparable with `Instant`s of this process), by
    /// stitch build id. Builds never cancelled are absent.
    pub fn cancel_times(&self) -> HashMap<String, Instant> {
        self.shared
            .lock()
            .world
            .all_builds()
            .filter_map(|b| Some((b.meta_data.get("stitch:build_id")?.clone(), b.cancel_at?)))
            .collect()
    }

    /// When each `GET` of each stitch-stamped build arrived, in order (the
    /// fake's clock, like [`cancel_times`](Self::cancel_times)), by stitch
    /// build id.
    pub fn read_times(&self) -> HashMap<String, Vec<Instant>> {
        self.shared
            .lock()
            .world
            .all_builds()
            .filter_map(|b| Some((b.meta_data.get("stitch:build_id")?.clone(), b.reads.clone())))
            .collect()
    }

    /// When each stitch-stamped build was created (its create request
    /// arrived; the fake's clock, like [`cancel_times`](Self::cancel_times)),
    /// by stitch build id.
    pub fn created_times(&self) -> HashMap<String, Instant> {
        self.shared
            .lock()
            .world
            .all_builds()
            .filter_map(|b| Some((b.meta_data.get("stitch:build_id")?.clone(), b.born)))
            .collect()
    }

    /// Creates a build directly (as someone else would, in the UI): not
    /// stitch's unless `meta_data` says so. Returns its number.
    pub fn create_foreign_build(
        &self,
        org: &str,
        pipeline: &str,
        meta_data: BTreeMap<String, String>,
    ) -> Option<u64> {
        let body = CreateBody {
            commit: "HEAD".into(),
            branch: "main".into(),
            message: "a build stitch did not make".into(),
            env: BTreeMap::new(),
            meta_data,
        };
        let mut inner = self.shared.lock();
        let b = inner
            .world
            .new_build(org, pipeline, &body, Instant::now())?;
        Some(b.number)
    }
}

impl FaultControl for FakeBuildkite {
    type Endpoint = Endpoint;

    fn with_fault_rules<R>(&self, f: impl FnOnce(&mut FaultRules<Endpoint>) -> R) -> R {
        f(&mut self.shared.lock().faults)
    }
}

impl ProviderFake for FakeBuildkite {
    const START: Endpoint = Endpoint::Create;
    const POLL: Endpoint = Endpoint::GetBuild;

    fn builds_for(&self, stitch_build_id: &str) -> usize {
        FakeBuildkite::builds_for(self, stitch_build_id)
    }

    fn builds_started(&self) -> u64 {
        self.stats().builds_created
    }
}

/// Every build advances on each tick; its transitions are queued as
/// webhooks.
impl Clock for Shared {
    type Move = Transition;

    fn period(&self) -> Duration {
        self.timing.tick
    }

    fn moved(&self) -> &watch::Sender<u64> {
        &self.builds_moved
    }

    fn advance(&self, now: Instant) -> Vec<Transition> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        for p in inner.world.pipelines.values_mut() {
            for b in p.builds.iter_mut().filter(|b| !is_terminal(&b.state)) {
                out.extend(b.advance(now, &self.timing, &self.base));
            }
        }
        out
    }

    fn hand_on(&self, t: Transition) {
        let _ = self.webhooks.send(t);
    }
}

/// Webhooks go to the targets in turn (job events only to those that
/// take them).
impl Webhooks for Shared {
    type Transition = Transition;
    type Target = WebhookTarget;

    fn route(&self, t: &Transition) -> Option<WebhookTarget> {
        let mut inner = self.lock();
        if inner.webhooks.is_empty() {
            return None;
        }
        let next = inner.webhooks_routed % inner.webhooks.len();
        let target = inner.webhooks[next].clone();
        if t.job.is_some() && !target.job_events {
            return None;
        }
        inner.webhooks_routed += 1;
        Some(target)
    }

    async fn deliver(&self, http: &reqwest::Client, target: WebhookTarget, t: Transition) {
        deliver(self, http, &target, t).await;
    }
}

async fn deliver(shared: &Shared, http: &reqwest::Client, target: &WebhookTarget, t: Transition) {
    let mut body = json!({
        "event": t.event,
        "build": t.build,
        "pipeline": {"slug": t.build["pipeline"]["slug"], "name": t.build["pipeline"]["name"]},
        "sender": {"id": "c9f8372d-c0cd-43dc-9269-bcbb7f308e3f", "name": "Buildkite"},
    });
    if let Some(job) = t.job {
        body["job"] = job;
    }
    let bytes = body.to_string();
    let req = http
        .post(&target.url)
        .header("content-type", "application/json")
        .header("x-buildkite-event", &t.event);
    let req = match &target.auth {
        WebhookAuth::Token(token) => req.header("x-buildkite-token", token),
        WebhookAuth::Signature(secret) => {
            let now = chrono::Utc::now().timestamp();
            req.header(
                "x-buildkite-signature",
                format!(
                    "timestamp={now},signature={}",
                    sign(secret.as_bytes(), now, bytes.as_bytes())
                ),
            )
        }
    };
    let sent_at = SystemTime::now();
    let answer = req.body(bytes).send().await;
    let mut inner = shared.lock();
    inner.stats.webhooks_sent += 1;
    if let Some(id) = &t.stitch_build_id {
        inner
            .webhook_times
            .insert((id.clone(), t.event.clone()), sent_at);
    }
    if !answer.map(|r| r.status().is_success()).unwrap_or(false) {
        inner.stats.webhooks_refused += 1;
    }
    drop(inner);
    shared.webhooks_delivered.send_modify(|n| *n += 1);
}

/// HMAC-SHA256 over `"<timestamp>.<body>"`, hex: Buildkite's webhook signature.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fn message(status: StatusCode, text: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"message": text}).to_string(),
    )
        .into_response()
}

/// Auth, rate limit and faults, in Buildkite's order. `Err` is the answer
/// (a response, large but built once per refused request).
#[allow(clippy::result_large_err)]
fn gate(
    shared: &Shared,
    headers: &HeaderMap,
    org: &str,
    endpoint: Endpoint,
    name: &'static str,
) -> Result<(AnswerFault, HeaderMap), Response> {
    let mut inner = shared.lock();
    *inner.stats.requests.entry(name).or_default() += 1;
    let now = Instant::now();
    inner.arrivals.entry(org.to_string()).or_default().push(now);
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if presented != Some(shared.token.as_str()) {
        inner.stats.unauthorized += 1;
        return Err(message(StatusCode::UNAUTHORIZED, "Authentication required. Please supply a valid API Access Token: https://buildkite.com/docs/apis/rest-api#authentication"));
    }
    let mut rl = HeaderMap::new();
    let storm = inner.storm_until.filter(|u| *u > now);
    let limited = if let Some(until) = storm {
        Some((until - now, 0u32))
    } else if let Some((limit, window)) = shared.rate_limit {
        let (count, reset) = inner
            .windows
            .entry(org.to_string())
            .or_insert_with(|| RateWindow::starting(now))
            .count(now, window);
        let remaining = limit.saturating_sub(count);
        rl.insert("ratelimit-limit", HeaderValue::from(limit));
        rl.insert("ratelimit-remaining", HeaderValue::from(remaining));
        rl.insert(
            "ratelimit-reset",
            HeaderValue::from(reset.as_secs_f64().ceil() as u64),
        );
        (count > limit).then_some((reset, limit))
    } else {
        None
    };
    rl.insert("ratelimit-scope", HeaderValue::from_static("rest"));
    if let Some((reset, limit)) = limited {
        inner.stats.rate_limited += 1;
        let secs = reset.as_secs_f64().ceil().max(1.0) as u64;
        let mut resp = (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::CONTENT_TYPE, "application/json")],
            json!({
                "message": format!("You have exceeded your API rate limit. Please wait {secs} seconds before making more requests."),
                "scope": "rest", "limit": limit, "current": limit + 1, "reset": secs
            })
            .to_string(),
        )
            .into_response();
        resp.headers_mut().extend(rl);
        resp.headers_mut()
            .insert("ratelimit-reset", HeaderValue::from(secs));
        resp.headers_mut().insert(
            "ratelimit-warning",
            HeaderValue::from_static("You have exceeded your API rate limit"),
        );
        return Err(resp);
    }
    let answer = inner.faults.admit(endpoint, Endpoint::Any)?;
    Ok((answer, rl))
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn not_found() -> Response {
    message(StatusCode::NOT_FOUND, "Not Found")
}

async fn create_build(
    State(s): State<Arc<Shared>>,
    Path((org, pipeline)): Path<(String, String)>,
    req: Request,
) -> Response {
    let (after, rl) = match gate(&s, req.headers(), &org, Endpoint::Create, "create") {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let Ok(bytes) = axum::body::to_bytes(req.into_body(), 1 << 20).await else {
        return message(StatusCode::BAD_REQUEST, "Problems parsing JSON");
    };
    let Ok(body) = serde_json::from_slice::<CreateBody>(&bytes) else {
        return message(StatusCode::BAD_REQUEST, "Problems parsing JSON");
    };
    let missing: Vec<Value> = [("commit", &body.commit), ("branch", &body.branch)]
        .iter()
        .filter(|(_, v)| v.is_empty())
        .map(|(f, _)| json!({"field": f, "code": "missing"}))
        .collect();
    if !missing.is_empty() {
        return json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({"message": "Validation Failed", "errors": missing}),
        );
    }
    let created = {
        let mut inner = s.lock();
        let built = inner
            .world
            .new_build(&org, &pipeline, &body, Instant::now())
            .map(|b| b.json(&s.base, true));
        if built.is_some() {
            inner.stats.builds_created += 1;
        }
        built
    };
    let Some(json) = created else {
        return not_found();
    };
    after
        .finish(rl, json_response(StatusCode::CREATED, &json))
        .await
}

async fn get_build(
    State(s): State<Arc<Shared>>,
    Path((org, pipeline, number)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let (after, rl) = match gate(&s, &headers, &org, Endpoint::GetBuild, "get_build") {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let arrived = Instant::now();
    let found = number.parse().ok().and_then(|n| {
        s.lock().world.build_mut(&org, &pipeline, n).map(|b| {
            b.reads.push(arrived);
            b.json(&s.base, true)
        })
    });
    match found {
        Some(json) => after.finish(rl, json_response(StatusCode::OK, &json)).await,
        None => not_found(),
    }
}

async fn list_builds(
    State(s): State<Arc<Shared>>,
    Path((org, pipeline)): Path<(String, String)>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let (after, rl) = match gate(&s, &headers, &org, Endpoint::ListBuilds, "list_builds") {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let mut meta = Vec::new();
    let (mut branch, mut states, mut created_from) = (None, Vec::new(), None);
    let (mut page, mut per_page, mut exclude_jobs) = (1usize, 30usize, false);
    for (k, v) in &query {
        if let Some(key) = k
            .strip_prefix("meta_data[")
            .and_then(|r| r.strip_suffix(']'))
        {
            meta.push((key.to_string(), v.clone()));
        }
        match k.as_str() {
            "branch" => branch = Some(v.clone()),
            "state" | "state[]" => states.push(v.clone()),
            "created_from" => match chrono::DateTime::parse_from_rfc3339(v) {
                Ok(t) => created_from = Some(t.with_timezone(&chrono::Utc)),
                Err(_) => {
                    return message(
                        StatusCode::BAD_REQUEST,
                        "created_from must be an ISO 8601 timestamp",
                    )
                }
            },
            "page" => page = v.parse().unwrap_or(1).max(1),
            "per_page" => per_page = v.parse().unwrap_or(30).clamp(1, 100),
            "exclude_jobs" => exclude_jobs = v == "true",
            _ => {}
        }
    }
    let (items, more) = {
        let inner = s.lock();
        let Some(p) = inner.world.pipelines.get(&(org.clone(), pipeline.clone())) else {
            return not_found();
        };
        let matching: Vec<_> = p
            .builds
            .iter()
            .rev()
            .filter(|b| meta.iter().all(|(k, v)| b.meta_data.get(k) == Some(v)))
            .filter(|b| branch.as_ref().is_none_or(|br| &b.branch == br))
            .filter(|b| {
                states.is_empty()
                    || states
                        .iter()
                        .any(|st| *st == b.state || (st == "finished" && is_terminal(&b.state)))
            })
            .filter(|b| created_from.is_none_or(|from| b.created_at >= from))
            .collect();
        let start = (page - 1) * per_page;
        let items: Vec<Value> = matching
            .iter()
            .skip(start)
            .take(per_page)
            .map(|b| b.json(&s.base, !exclude_jobs))
            .collect();
        (items, matching.len() > start + per_page)
    };
    let mut resp = json_response(StatusCode::OK, &Value::Array(items));
    if more {
        let mut next: Vec<(String, String)> =
            query.into_iter().filter(|(k, _)| k != "page").collect();
        next.push(("page".into(), (page + 1).to_string()));
        let qs: Vec<String> = next
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect();
        let link = format!(
            "<{}/v2/organizations/{org}/pipelines/{pipeline}/builds?{}>; rel=\"next\"",
            s.base,
            qs.join("&")
        );
        if let Ok(v) = HeaderValue::from_str(&link) {
            resp.headers_mut().insert(header::LINK, v);
        }
    }
    after.finish(rl, resp).await
}

async fn cancel_build(
    State(s): State<Arc<Shared>>,
    Path((org, pipeline, number)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let (after, rl) = match gate(&s, &headers, &org, Endpoint::Cancel, "cancel") {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let answer = {
        let mut inner = s.lock();
        let Some(b) = number
            .parse()
            .ok()
            .and_then(|n| inner.world.build_mut(&org, &pipeline, n))
        else {
            return not_found();
        };
        if is_terminal(&b.state) {
            return message(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Build can't be canceled because it's already finished.",
            );
        }
        if !matches!(
            b.state.as_str(),
            "scheduled" | "running" | "failing" | "canceling"
        ) {
            return message(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!("Build can't be canceled because it's {}.", b.state),
            );
        }
        if b.cancel_at.is_none() {
            b.cancel_at = Some(Instant::now());
            b.state = "canceling".into();
        }
        b.json(&s.base, true)
    };
    after
        .finish(rl, json_response(StatusCode::OK, &answer))
        .await
}

async fn job_log(
    State(s): State<Arc<Shared>>,
    Path((org, pipeline, number, job, file)): Path<(String, String, String, String, String)>,
    method: axum::http::Method,
    headers: HeaderMap,
) -> Response {
    let (after, rl) = match gate(&s, &headers, &org, Endpoint::JobLog, "job_log") {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    if file != "log" && file != "log.txt" {
        return not_found();
    }
    let range = headers
        .get(header::RANGE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let (log, url) = {
        let mut inner = s.lock();
        inner.log_ranges.push(range.clone());
        if !inner.scopes.iter().any(|sc| sc == "read_build_logs") {
            return message(
                StatusCode::FORBIDDEN,
                "Your access token is missing the read_build_logs scope",
            );
        }
        let Some(b) = number
            .parse()
            .ok()
            .and_then(|n| inner.world.build_mut(&org, &pipeline, n))
        else {
            return not_found();
        };
        let Some(j) = b.jobs.iter().find(|j| j.id == job) else {
            return message(StatusCode::NOT_FOUND, "No job found");
        };
        (
            j.log.clone(),
            format!(
                "{}/v2/organizations/{org}/pipelines/{pipeline}/builds/{number}/jobs/{job}/log",
                s.base
            ),
        )
    };
    if method == axum::http::Method::HEAD {
        let resp = (
            StatusCode::OK,
            [
                (header::CONTENT_LENGTH, log.len().to_string()),
                (header::ACCEPT_RANGES, "bytes".to_string()),
            ],
        )
            .into_response();
        return after.finish(rl, resp).await;
    }
    let raw = file == "log.txt"
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/plain"));
    let resp = match (raw, range) {
        (true, Some(range)) => tail_response(log, &range),
        (true, None) => {
            (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], log).into_response()
        }
        (false, _) => json_response(
            StatusCode::OK,
            &json!({"url": url, "content": log, "size": log.len(), "header_times": []}),
        ),
    };
    after.finish(rl, resp).await
}

/// A raw log read with a `Range` header: only a suffix range
/// (`bytes=-N`, N > 0) of a non-empty log is served.
fn tail_response(log: String, range: &str) -> Response {
    let suffix = range
        .strip_prefix("bytes=-")
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|n| *n > 0);
    let Some(suffix) = suffix else {
        return message(
            StatusCode::BAD_REQUEST,
            "Only a single suffix byte range (bytes=-N) is supported",
        );
    };
    let total = log.len();
    if total == 0 {
        return (
            StatusCode::RANGE_NOT_SATISFIABLE,
            [(header::CONTENT_RANGE, "bytes */0".to_string())],
        )
            .into_response();
    }
    let start = total - usize::try_from(suffix).unwrap_or(usize::MAX).min(total);
    let body = log.into_bytes().split_off(start);
    (
        StatusCode::PARTIAL_CONTENT,
        [
            (header::CONTENT_TYPE, "text/plain".to_string()),
            (
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{total}", total - 1),
            ),
        ],
        body,
    )
        .into_response()
}
