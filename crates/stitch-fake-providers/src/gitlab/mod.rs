//! A stateful fake of GitLab's REST API v4 (pipelines, jobs, traces) and
//! its Pipeline Hook webhooks.
//!
//! Served by [`FakeGitlab::start`] on `127.0.0.1:0` under `/api/v4`. It
//! holds projects (found by numeric id or URL-encoded path), creates
//! pipelines with instance-wide ids and per-project iids — through `POST
//! …/pipeline` (API token) or `POST …/trigger/pipeline` (trigger token) —
//! names them by expanding the project's `workflow:name` template
//! ([`FakeOptions::name_template`]) with the pipeline's variables, and
//! moves them along a plan with time ([`Timing`]): created → pending →
//! running (job `build`, then job `test`, traces with section markers and
//! runner timestamps) → success. A `stitch-gl=<plan>` marker in the
//! `STITCH_HEAD` variable picks another plan: `fail`, `hang` (runs until
//! cancelled), `unknown` (`waiting_for_callback`), `manual` (stops at a
//! blocking manual job).
//!
//! Like GitLab it checks `PRIVATE-TOKEN` (or a bearer token), filters
//! pipeline lists by `name`, `ref`, `status` and `updated_after`, pages
//! with `Link` and `X-Next-Page`, sends `RateLimit-*` headers (the reset
//! as a Unix time) and 429s with `Retry-After` past the per-token limit,
//! answers a cancel of a finished pipeline with the pipeline unchanged,
//! serves traces whole as plain text, and sends Pipeline Hook events with
//! `X-Gitlab-Token`. Faults are injected per endpoint ([`Fault`]), and
//! every request is counted ([`FakeStats`]).

mod world;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::faults::{AnswerFault, FaultRules};
pub use crate::faults::{Fault, FaultControl, Pause, ProviderFake};
use crate::serving::{encode, run_clock, send_webhooks, Clock, RateWindow, Tasks, Webhooks};
pub use world::{expand, Plan, MARKER};
use world::{is_terminal, Transition, World};

/// How fast fake pipelines progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Time from create to running.
    pub schedule: Duration,
    /// Time from running to finished (two jobs, half each).
    pub run: Duration,
    /// Time from a cancel request to `canceled` (`canceling` meanwhile).
    pub cancel: Duration,
    /// How often the fake advances pipelines.
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
    /// `POST …/pipeline` and `POST …/trigger/pipeline`.
    Create,
    GetPipeline,
    ListPipelines,
    Cancel,
    ListJobs,
    JobTrace,
    /// Any of the above.
    Any,
}

/// Where the fake sends Pipeline Hook events, with which secret token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookTarget {
    /// The receiver URL.
    pub url: String,
    /// Sent as `X-Gitlab-Token`.
    pub token: String,
}

/// Counters the tests and the benchmark read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeStats {
    /// Requests by endpoint name (`create_pipeline`, `trigger_pipeline`,
    /// `get_pipeline`, `list_pipelines`, `cancel`, `list_jobs`,
    /// `job_trace`), 429s and faults included.
    pub requests: BTreeMap<&'static str, u64>,
    /// Requests answered 429.
    pub rate_limited: u64,
    /// Requests refused for a bad token.
    pub unauthorized: u64,
    /// Pipelines created.
    pub pipelines_created: u64,
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
    window: Option<RateWindow>,
    /// Every API request's arrival time (one token: one budget).
    arrivals: Vec<Instant>,
    storm_until: Option<Instant>,
    webhook: Option<WebhookTarget>,
    webhooks_routed: u64,
    /// When the last hook for (stitch build id, status) was sent.
    webhook_times: HashMap<(String, String), SystemTime>,
}

struct Shared {
    base: String,
    token: String,
    trigger_token: String,
    name_template: Option<String>,
    timing: Timing,
    rate_limit: Option<(u32, Duration)>,
    inner: Mutex<Inner>,
    webhooks: mpsc::UnboundedSender<Transition>,
    webhooks_delivered: watch::Sender<u64>,
    pipelines_moved: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Options of [`FakeGitlab::start`].
#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// The API token requests must carry (`PRIVATE-TOKEN`).
    pub token: String,
    /// The pipeline trigger token `…/trigger/pipeline` takes.
    pub trigger_token: String,
    /// `(id, path)` of the projects that exist.
    pub projects: Vec<(u64, String)>,
    /// The projects' `workflow:name` (`None`: pipelines have no name).
    pub name_template: Option<String>,
    pub timing: Timing,
    /// Per-token limit: requests per window (GitLab.com: 2,000 per
    /// minute). `None`: unlimited.
    pub rate_limit: Option<(u32, Duration)>,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            token: "glpat-test-token".into(),
            trigger_token: "glptt-test-trigger".into(),
            projects: vec![(42, "acme/app".into())],
            name_template: Some("$STITCH_PIPELINE_NAME".into()),
            timing: Timing::default(),
            rate_limit: None,
        }
    }
}

/// The running fake. Stops when dropped.
pub struct FakeGitlab {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Aborted when the fake is dropped.
    _tasks: Tasks,
}

impl FakeGitlab {
    /// Starts the fake on `127.0.0.1:0`.
    pub async fn start(options: FakeOptions) -> std::io::Result<Self> {
        let (listener, addr) = crate::serving::bind().await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut world = World::default();
        for (id, path) in &options.projects {
            world.projects.push(world::FakeProject {
                id: *id,
                path: path.clone(),
                next_iid: 0,
                pipelines: Vec::new(),
            });
        }
        let shared = Arc::new(Shared {
            base: format!("http://{addr}"),
            token: options.token,
            trigger_token: options.trigger_token,
            name_template: options.name_template,
            timing: options.timing,
            rate_limit: options.rate_limit,
            inner: Mutex::new(Inner {
                world,
                faults: FaultRules::default(),
                stats: FakeStats::default(),
                window: None,
                arrivals: Vec::new(),
                storm_until: None,
                webhook: None,
                webhooks_routed: 0,
                webhook_times: HashMap::new(),
            }),
            webhooks: tx,
            webhooks_delivered: watch::channel(0).0,
            pipelines_moved: watch::channel(0).0,
        });
        let project = "/api/v4/projects/{project}";
        let app = Router::new()
            .route(&format!("{project}/pipeline"), post(create_pipeline))
            .route(
                &format!("{project}/trigger/pipeline"),
                post(trigger_pipeline),
            )
            .route(&format!("{project}/pipelines"), get(list_pipelines))
            .route(&format!("{project}/pipelines/{{id}}"), get(get_pipeline))
            .route(
                &format!("{project}/pipelines/{{id}}/cancel"),
                post(cancel_pipeline),
            )
            .route(&format!("{project}/pipelines/{{id}}/jobs"), get(list_jobs))
            .route(&format!("{project}/jobs/{{job}}/trace"), get(job_trace))
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

    /// The API root to configure as `api_url` (`http://127.0.0.1:PORT/api/v4`).
    pub fn url(&self) -> String {
        format!("{}/api/v4", self.shared.base)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The accepted API token.
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// The accepted pipeline trigger token.
    pub fn trigger_token(&self) -> &str {
        &self.shared.trigger_token
    }

    /// Changes after every tick of the fake's clock that moved a pipeline.
    pub fn pipelines_moved(&self) -> watch::Receiver<u64> {
        self.shared.pipelines_moved.subscribe()
    }

    /// Returns the REST JSON of the pipeline of `stitch_build_id` once
    /// `wanted` holds for it, re-checking after every move.
    pub async fn pipeline_until(
        &self,
        stitch_build_id: &str,
        wanted: impl Fn(&Value) -> bool,
    ) -> Value {
        let mut moved = self.pipelines_moved();
        loop {
            moved.borrow_and_update();
            if let Some(p) = self.pipeline_json(stitch_build_id).filter(|p| wanted(p)) {
                return p;
            }
            let _ = moved.changed().await;
        }
    }

    /// Returns once a hook saying the pipeline of `stitch_build_id` reached
    /// `status` was delivered (answered).
    pub async fn webhook_delivered(&self, stitch_build_id: &str, status: &str) {
        crate::serving::until_delivered(&self.shared.webhooks_delivered, || {
            self.shared
                .lock()
                .webhook_times
                .contains_key(&(stitch_build_id.to_string(), status.to_string()))
        })
        .await;
    }

    /// When the last hook saying the pipeline of `stitch_build_id` reached
    /// `status` was sent.
    pub fn webhook_sent_at(&self, stitch_build_id: &str, status: &str) -> Option<SystemTime> {
        self.shared
            .lock()
            .webhook_times
            .get(&(stitch_build_id.to_string(), status.to_string()))
            .copied()
    }

    /// Returns once every hook routed so far was delivered (answered).
    pub async fn webhooks_settled(&self) {
        crate::serving::until_delivered(&self.shared.webhooks_delivered, || {
            let inner = self.shared.lock();
            inner.stats.webhooks_sent >= inner.webhooks_routed
        })
        .await;
    }

    /// Answers every request with 429 for `length` (`Retry-After`: the
    /// seconds left).
    pub fn rate_limit_storm(&self, length: Duration) {
        self.shared.lock().storm_until = Some(Instant::now() + length);
    }

    /// Sends Pipeline Hooks to `target` from now on (`None`: stop).
    pub fn set_webhook(&self, target: Option<WebhookTarget>) {
        self.shared.lock().webhook = target;
    }

    /// The counters so far.
    pub fn stats(&self) -> FakeStats {
        self.shared.lock().stats.clone()
    }

    /// The most requests the token sent within any span of `window`.
    pub fn max_requests_in(&self, window: Duration) -> usize {
        let inner = self.shared.lock();
        crate::serving::max_in_window(&inner.arrivals, window)
    }

    /// How many pipelines carry `STITCH_BUILD_ID = id`.
    pub fn pipelines_for(&self, stitch_build_id: &str) -> usize {
        self.shared
            .lock()
            .world
            .all_pipelines()
            .filter(|p| {
                p.variables.get("STITCH_BUILD_ID").map(String::as_str) == Some(stitch_build_id)
            })
            .count()
    }

    /// The REST JSON of the (first) pipeline of `stitch_build_id`.
    pub fn pipeline_json(&self, stitch_build_id: &str) -> Option<Value> {
        let inner = self.shared.lock();
        let p = inner.world.all_pipelines().find(|p| {
            p.variables.get("STITCH_BUILD_ID").map(String::as_str) == Some(stitch_build_id)
        })?;
        Some(p.json(&self.shared.base))
    }

    /// The variables the (first) pipeline of `stitch_build_id` was created with.
    pub fn pipeline_variables(&self, stitch_build_id: &str) -> Option<BTreeMap<String, String>> {
        let inner = self.shared.lock();
        let vars = inner
            .world
            .all_pipelines()
            .find(|p| {
                p.variables.get("STITCH_BUILD_ID").map(String::as_str) == Some(stitch_build_id)
            })
            .map(|p| p.variables.clone());
        vars
    }

    /// The Pipeline Hook body of the pipeline of `stitch_build_id` now.
    pub fn hook_json(&self, stitch_build_id: &str) -> Option<Value> {
        let inner = self.shared.lock();
        let p = inner.world.all_pipelines().find(|p| {
            p.variables.get("STITCH_BUILD_ID").map(String::as_str) == Some(stitch_build_id)
        })?;
        Some(p.hook_json(&self.shared.base))
    }

    /// Appends `text` to the trace of job `job` (0: `build`, 1: `test`) of
    /// the pipeline of `stitch_build_id`. False when there is none.
    pub fn append_trace(&self, stitch_build_id: &str, job: usize, text: &str) -> bool {
        let mut inner = self.shared.lock();
        let pipeline = inner
            .world
            .projects
            .iter_mut()
            .flat_map(|p| p.pipelines.iter_mut())
            .find(|p| {
                p.variables.get("STITCH_BUILD_ID").map(String::as_str) == Some(stitch_build_id)
            });
        match pipeline.and_then(|p| p.jobs.get_mut(job)) {
            Some(j) => {
                j.trace.push_str(text);
                true
            }
            None => false,
        }
    }

    /// When the first cancel request for each stitch pipeline arrived, by
    /// stitch build id.
    pub fn cancel_times(&self) -> HashMap<String, Instant> {
        self.shared
            .lock()
            .world
            .all_pipelines()
            .filter_map(|p| Some((p.variables.get("STITCH_BUILD_ID")?.clone(), p.cancel_at?)))
            .collect()
    }

    /// Creates a pipeline directly (a push, someone in the UI) with
    /// `variables`; returns its id.
    pub fn create_foreign_pipeline(
        &self,
        project: &str,
        variables: BTreeMap<String, String>,
    ) -> Option<u64> {
        let mut inner = self.shared.lock();
        let template = self.shared.name_template.as_deref();
        let p = inner.world.new_pipeline(
            project,
            "main",
            variables,
            template,
            "push",
            Instant::now(),
        )?;
        Some(p.id)
    }
}

impl FaultControl for FakeGitlab {
    type Endpoint = Endpoint;

    fn with_fault_rules<R>(&self, f: impl FnOnce(&mut FaultRules<Endpoint>) -> R) -> R {
        f(&mut self.shared.lock().faults)
    }
}

impl ProviderFake for FakeGitlab {
    const START: Endpoint = Endpoint::Create;
    const POLL: Endpoint = Endpoint::GetPipeline;

    fn builds_for(&self, stitch_build_id: &str) -> usize {
        self.pipelines_for(stitch_build_id)
    }

    fn builds_started(&self) -> u64 {
        self.stats().pipelines_created
    }
}

/// Every pipeline advances on each tick; its transitions are queued as
/// hooks.
impl Clock for Shared {
    type Move = Transition;

    fn period(&self) -> Duration {
        self.timing.tick
    }

    fn moved(&self) -> &watch::Sender<u64> {
        &self.pipelines_moved
    }

    fn advance(&self, now: Instant) -> Vec<Transition> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        for p in inner.world.projects.iter_mut() {
            for pl in p.pipelines.iter_mut().filter(|pl| !is_terminal(&pl.status)) {
                out.extend(pl.advance(now, &self.timing, &self.base));
            }
        }
        out
    }

    fn hand_on(&self, t: Transition) {
        let _ = self.webhooks.send(t);
    }
}

/// Hooks go to the one target (in no guaranteed order, as GitLab's
/// Sidekiq workers deliver them).
impl Webhooks for Shared {
    type Transition = Transition;
    type Target = WebhookTarget;

    fn route(&self, _: &Transition) -> Option<WebhookTarget> {
        let mut inner = self.lock();
        let target = inner.webhook.clone()?;
        inner.webhooks_routed += 1;
        Some(target)
    }

    async fn deliver(&self, http: &reqwest::Client, target: WebhookTarget, t: Transition) {
        deliver(self, http, &target, t).await;
    }
}

async fn deliver(shared: &Shared, http: &reqwest::Client, target: &WebhookTarget, t: Transition) {
    let sent_at = SystemTime::now();
    let answer = http
        .post(&target.url)
        .header("content-type", "application/json")
        .header("x-gitlab-event", "Pipeline Hook")
        .header("x-gitlab-token", &target.token)
        .header(
            "x-gitlab-event-uuid",
            hex::encode(rand::random::<[u8; 16]>()),
        )
        .header("x-gitlab-instance", &shared.base)
        .body(t.body.to_string())
        .send()
        .await;
    let mut inner = shared.lock();
    inner.stats.webhooks_sent += 1;
    if let Some(id) = &t.stitch_build_id {
        inner
            .webhook_times
            .insert((id.clone(), t.status.clone()), sent_at);
    }
    if !answer.map(|r| r.status().is_success()).unwrap_or(false) {
        inner.stats.webhooks_refused += 1;
    }
    drop(inner);
    shared.webhooks_delivered.send_modify(|n| *n += 1);
}

fn message(status: StatusCode, text: &str) -> Response {
    json_response(status, &json!({"message": text}))
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn not_found(what: &str) -> Response {
    message(StatusCode::NOT_FOUND, &format!("404 {what} Not Found"))
}

/// Auth (`check_token`: the API token; the trigger endpoint checks its own
/// token in the body), rate limit and faults, in GitLab's order. `Err` is
/// the answer.
#[allow(clippy::result_large_err)]
fn gate(
    shared: &Shared,
    headers: &HeaderMap,
    check_token: bool,
    endpoint: Endpoint,
    name: &'static str,
) -> Result<(AnswerFault, HeaderMap), Response> {
    let mut inner = shared.lock();
    *inner.stats.requests.entry(name).or_default() += 1;
    let now = Instant::now();
    inner.arrivals.push(now);
    if check_token {
        let presented = headers
            .get("private-token")
            .and_then(|v| v.to_str().ok())
            .or_else(|| {
                headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
            });
        if presented != Some(shared.token.as_str()) {
            inner.stats.unauthorized += 1;
            return Err(message(StatusCode::UNAUTHORIZED, "401 Unauthorized"));
        }
    }
    let mut rl = HeaderMap::new();
    let wall = chrono::Utc::now();
    let storm = inner.storm_until.filter(|u| *u > now);
    let limited = if let Some(until) = storm {
        Some(until - now)
    } else if let Some((limit, window)) = shared.rate_limit {
        let (count, reset) = inner
            .window
            .get_or_insert_with(|| RateWindow::starting(now))
            .count(now, window);
        let reset_at = wall.timestamp() + reset.as_secs_f64().ceil() as i64;
        rl.insert(
            "ratelimit-name",
            HeaderValue::from_static("throttle_authenticated_api"),
        );
        rl.insert("ratelimit-limit", HeaderValue::from(limit));
        rl.insert("ratelimit-observed", HeaderValue::from(count));
        rl.insert(
            "ratelimit-remaining",
            HeaderValue::from(limit.saturating_sub(count)),
        );
        rl.insert("ratelimit-reset", HeaderValue::from(reset_at));
        (count > limit).then_some(reset)
    } else {
        None
    };
    if let Some(reset) = limited {
        inner.stats.rate_limited += 1;
        let secs = reset.as_secs_f64().ceil().max(1.0) as u64;
        let mut resp = (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::CONTENT_TYPE, "text/plain")],
            "Retry later\n",
        )
            .into_response();
        resp.headers_mut().extend(rl);
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return Err(resp);
    }
    let answer = inner.faults.admit(endpoint, Endpoint::Any)?;
    Ok((answer, rl))
}

#[derive(serde::Deserialize)]
struct CreateBody {
    #[serde(rename = "ref", default)]
    git_ref: String,
    #[serde(default)]
    variables: Vec<CreateVariable>,
}

#[derive(serde::Deserialize)]
struct CreateVariable {
    key: String,
    #[serde(default)]
    value: String,
}

#[derive(serde::Deserialize)]
struct TriggerBody {
    #[serde(default)]
    token: String,
    #[serde(rename = "ref", default)]
    git_ref: String,
    #[serde(default)]
    variables: BTreeMap<String, String>,
}

/// Makes the pipeline, or says why not (the same for both create routes).
#[allow(clippy::result_large_err)]
fn new_pipeline(
    s: &Shared,
    project: &str,
    git_ref: &str,
    variables: BTreeMap<String, String>,
    source: &'static str,
) -> Result<Value, Response> {
    if git_ref.is_empty() {
        return Err(json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "ref is missing"}),
        ));
    }
    if git_ref != "main" {
        return Err(json_response(
            StatusCode::BAD_REQUEST,
            &json!({"message": {"base": ["Reference not found"]}}),
        ));
    }
    let mut inner = s.lock();
    let template = s.name_template.as_deref();
    let json = inner
        .world
        .new_pipeline(
            project,
            git_ref,
            variables,
            template,
            source,
            Instant::now(),
        )
        .map(|p| p.json(&s.base))
        .ok_or_else(|| not_found("Project"))?;
    inner.stats.pipelines_created += 1;
    Ok(json)
}

async fn create_pipeline(
    State(s): State<Arc<Shared>>,
    Path(project): Path<String>,
    req: Request,
) -> Response {
    let (after, rl) = match gate(&s, req.headers(), true, Endpoint::Create, "create_pipeline") {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let Ok(bytes) = axum::body::to_bytes(req.into_body(), 1 << 20).await else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "body is invalid"}),
        );
    };
    let Ok(body) = serde_json::from_slice::<CreateBody>(&bytes) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "variables is invalid"}),
        );
    };
    let vars = body
        .variables
        .into_iter()
        .map(|v| (v.key, v.value))
        .collect();
    match new_pipeline(&s, &project, &body.git_ref, vars, "api") {
        Ok(json) => {
            after
                .finish(rl, json_response(StatusCode::CREATED, &json))
                .await
        }
        Err(resp) => resp,
    }
}

async fn trigger_pipeline(
    State(s): State<Arc<Shared>>,
    Path(project): Path<String>,
    req: Request,
) -> Response {
    let (after, rl) = match gate(
        &s,
        req.headers(),
        false,
        Endpoint::Create,
        "trigger_pipeline",
    ) {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let Ok(bytes) = axum::body::to_bytes(req.into_body(), 1 << 20).await else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "body is invalid"}),
        );
    };
    let Ok(body) = serde_json::from_slice::<TriggerBody>(&bytes) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "variables is invalid"}),
        );
    };
    if body.token != s.trigger_token {
        s.lock().stats.unauthorized += 1;
        return not_found("");
    }
    match new_pipeline(&s, &project, &body.git_ref, body.variables, "trigger") {
        Ok(json) => {
            after
                .finish(rl, json_response(StatusCode::CREATED, &json))
                .await
        }
        Err(resp) => resp,
    }
}

async fn get_pipeline(
    State(s): State<Arc<Shared>>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let (after, rl) = match gate(&s, &headers, true, Endpoint::GetPipeline, "get_pipeline") {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let found = id.parse().ok().and_then(|id| {
        s.lock()
            .world
            .pipeline_mut(&project, id)
            .map(|p| p.json(&s.base))
    });
    match found {
        Some(json) => after.finish(rl, json_response(StatusCode::OK, &json)).await,
        None => not_found(""),
    }
}

async fn list_pipelines(
    State(s): State<Arc<Shared>>,
    Path(project): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let (after, rl) = match gate(
        &s,
        &headers,
        true,
        Endpoint::ListPipelines,
        "list_pipelines",
    ) {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let (mut name, mut git_ref, mut status, mut updated_after) = (None, None, None, None);
    let (mut page, mut per_page) = (1usize, 20usize);
    for (k, v) in &query {
        match k.as_str() {
            "name" => name = Some(v.clone()),
            "ref" => git_ref = Some(v.clone()),
            "status" => status = Some(v.clone()),
            "updated_after" => match chrono::DateTime::parse_from_rfc3339(v) {
                Ok(t) => updated_after = Some(t.with_timezone(&chrono::Utc)),
                Err(_) => {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        &json!({"error": "updated_after is invalid"}),
                    )
                }
            },
            "page" => page = v.parse().unwrap_or(1).max(1),
            "per_page" => per_page = v.parse().unwrap_or(20).clamp(1, 100),
            _ => {}
        }
    }
    let (items, total) = {
        let inner = s.lock();
        let Some(p) = inner.world.project(&project) else {
            return not_found("Project");
        };
        let matching: Vec<_> = p
            .pipelines
            .iter()
            .rev()
            .filter(|pl| name.as_ref().is_none_or(|n| pl.name.as_ref() == Some(n)))
            .filter(|pl| git_ref.as_ref().is_none_or(|r| &pl.git_ref == r))
            .filter(|pl| status.as_ref().is_none_or(|st| &pl.status == st))
            .filter(|pl| updated_after.is_none_or(|t| pl.updated_at > t))
            .collect();
        let items: Vec<Value> = matching
            .iter()
            .skip((page - 1) * per_page)
            .take(per_page)
            .map(|pl| pl.json(&s.base))
            .collect();
        (items, matching.len())
    };
    let mut resp = json_response(StatusCode::OK, &Value::Array(items));
    let h = resp.headers_mut();
    h.insert("x-page", HeaderValue::from(page));
    h.insert("x-per-page", HeaderValue::from(per_page));
    h.insert("x-total", HeaderValue::from(total));
    if total > page * per_page {
        h.insert("x-next-page", HeaderValue::from(page + 1));
        let mut next: Vec<(String, String)> =
            query.into_iter().filter(|(k, _)| k != "page").collect();
        next.push(("page".into(), (page + 1).to_string()));
        let qs: Vec<String> = next
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect();
        let link = format!(
            "<{}/api/v4/projects/{}/pipelines?{}>; rel=\"next\"",
            s.base,
            encode(&project),
            qs.join("&")
        );
        if let Ok(v) = HeaderValue::from_str(&link) {
            h.insert(header::LINK, v);
        }
    }
    after.finish(rl, resp).await
}

async fn cancel_pipeline(
    State(s): State<Arc<Shared>>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let (after, rl) = match gate(&s, &headers, true, Endpoint::Cancel, "cancel") {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let answer = {
        let mut inner = s.lock();
        let Some(p) = id
            .parse()
            .ok()
            .and_then(|id| inner.world.pipeline_mut(&project, id))
        else {
            return not_found("");
        };
        // GitLab cancels what can be cancelled and answers the pipeline;
        // a finished one comes back as it was.
        if !is_terminal(&p.status) && p.cancel_at.is_none() {
            p.cancel_at = Some(Instant::now());
            p.status = "canceling".into();
            p.updated_at = chrono::Utc::now();
        }
        p.json(&s.base)
    };
    after
        .finish(rl, json_response(StatusCode::CREATED, &answer))
        .await
}

async fn list_jobs(
    State(s): State<Arc<Shared>>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let (after, rl) = match gate(&s, &headers, true, Endpoint::ListJobs, "list_jobs") {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let jobs = id.parse().ok().and_then(|id| {
        s.lock()
            .world
            .pipeline_mut(&project, id)
            .map(|p| p.jobs_json(&s.base))
    });
    match jobs {
        Some(jobs) => {
            after
                .finish(rl, json_response(StatusCode::OK, &Value::Array(jobs)))
                .await
        }
        None => not_found(""),
    }
}

async fn job_trace(
    State(s): State<Arc<Shared>>,
    Path((project, job)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let (after, rl) = match gate(&s, &headers, true, Endpoint::JobTrace, "job_trace") {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let trace = job
        .parse()
        .ok()
        .and_then(|job| s.lock().world.job(&project, job).map(|j| j.trace.clone()));
    match trace {
        Some(trace) => {
            let resp = (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "text/plain")],
                trace,
            )
                .into_response();
            after.finish(rl, resp).await
        }
        None => not_found(""),
    }
}
