//! A stateful fake of GitHub's Actions REST API, App installation tokens
//! and webhooks.
//!
//! Served by [`FakeGithub::start`] on `127.0.0.1:0`, with a second listener
//! standing in for the log storage host that job-log redirects point at.
//! It holds repositories with one dispatchable workflow, creates runs from
//! dispatches (the `run-name` rendered from the inputs into
//! `display_title`), and moves them along a plan with time ([`Timing`]):
//! queued → in_progress (job `build`, then job `test`, logs in GitHub's
//! line format) → completed. A `stitch-gh=<plan>` marker in the
//! `stitch_head` input picks another plan ([`Plan`]).
//!
//! Like GitHub it checks bearer tokens (a fixed token, or installation
//! tokens minted for a valid RS256 App JWT that expire), validates
//! dispatches (ref, declared inputs, the 25-input limit, the API version
//! and `return_run_details` rules of both versions, or an **older server**
//! that refuses run details), answers 200 with run details or 204, lists
//! runs with filters and `Link` pagination, serves ETags and 304s, sends
//! `x-ratelimit-*` headers and refuses past the hourly limit, injects
//! secondary rate limits (403 with `retry-after`), answers 409 to cancels
//! of completed runs, redirects job logs to short-lived storage links, and
//! sends signed `workflow_run` / `workflow_job` webhooks. Faults are
//! injected per endpoint ([`Fault`]) and every request is counted
//! ([`FakeStats`]).

mod world;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use crate::faults::{proxy_page, AnswerFault, FaultRules};
pub use crate::faults::{Fault, FaultControl, Pause, ProviderFake};
use crate::serving::{encode, run_clock, send_webhooks, Clock, Tasks, Webhooks};
pub use world::{render_run_name, Plan, MARKER};
use world::{Transition, World};

/// The run-name of the fake's workflow unless told otherwise: the one line
/// stitch's docs ask workflows to carry.
pub const RUN_NAME: &str = "stitch ${{ inputs.stitch_build_id }}";
/// API versions the fake knows.
pub const API_VERSIONS: [&str; 2] = ["2022-11-28", "2026-03-10"];

/// How fast fake runs progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Time from dispatch to in_progress.
    pub queue: Duration,
    /// Time from in_progress to completed (two jobs, half each).
    pub run: Duration,
    /// Time from a cancel request to `completed` / `cancelled`.
    pub cancel: Duration,
    /// How long a new run stays out of run lists (GitHub: seconds).
    pub list_lag: Duration,
    /// How often the fake advances runs.
    pub tick: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            queue: Duration::from_millis(100),
            run: Duration::from_millis(400),
            cancel: Duration::from_millis(50),
            list_lag: Duration::ZERO,
            tick: Duration::from_millis(10),
        }
    }
}

/// The API surface a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Dispatch,
    GetRun,
    ListRuns,
    Cancel,
    ListJobs,
    JobLog,
    MintToken,
    /// Any of the above.
    Any,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Dispatch => "dispatch",
            Endpoint::GetRun => "get_run",
            Endpoint::ListRuns => "list_runs",
            Endpoint::Cancel => "cancel",
            Endpoint::ListJobs => "list_jobs",
            Endpoint::JobLog => "job_log",
            Endpoint::MintToken => "mint_token",
            Endpoint::Any => "any",
        }
    }
}

/// A GitHub App the fake knows.
#[derive(Clone, Debug)]
pub struct FakeApp {
    /// The App id (the JWT's `iss`).
    pub app_id: String,
    /// The App's public key (PEM), verifying its RS256 JWTs.
    pub public_key_pem: Vec<u8>,
    /// The installation tokens may be minted for.
    pub installation_id: u64,
    /// How long a minted token lives (GitHub: one hour).
    pub token_lifetime: Duration,
}

/// Where and how the fake sends webhooks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookTarget {
    /// The receiver URL.
    pub url: String,
    /// The webhook secret (HMAC key of `X-Hub-Signature-256`).
    pub secret: String,
    /// Send `workflow_job` events too.
    pub job_events: bool,
    /// Deliver every event twice with the same `X-GitHub-Delivery` (as a
    /// manual redelivery does).
    pub duplicate: bool,
}

/// Counters the tests and the benchmark read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeStats {
    /// Requests by endpoint name (`dispatch`, `get_run`, `list_runs`,
    /// `cancel`, `list_jobs`, `job_log`, `mint_token`), refusals included.
    pub requests: BTreeMap<&'static str, u64>,
    /// Conditional GETs answered 304 (free of quota).
    pub not_modified: u64,
    /// Requests refused by a primary or secondary rate limit.
    pub rate_limited: u64,
    /// Requests refused for bad credentials.
    pub unauthorized: u64,
    /// Runs created by dispatches.
    pub runs_created: u64,
    /// Installation tokens minted.
    pub tokens_minted: u64,
    /// Log downloads from the storage host.
    pub log_downloads: u64,
    /// Storage requests that wrongly carried an `Authorization` header.
    pub storage_auth_leaks: u64,
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

/// Options of [`FakeGithub::start`].
#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// A fixed token requests may carry (`Authorization: Bearer …`).
    pub token: String,
    /// `(owner, repo)` pairs that exist; each has the workflow.
    pub repos: Vec<(String, String)>,
    /// The workflow's file name.
    pub workflow: String,
    /// The workflow's numeric id (dispatch accepts either).
    pub workflow_id: u64,
    /// Branches dispatches may name.
    pub branches: Vec<String>,
    /// The workflow's `run-name` (`None`: runs are titled by the workflow name).
    pub run_name: Option<String>,
    /// Inputs the workflow declares; others are refused with 422.
    pub declared_inputs: Vec<String>,
    /// The input count limit (GitHub: 25; older GHES: 10).
    pub max_inputs: usize,
    pub timing: Timing,
    /// An older GitHub Enterprise Server: no API version 2026-03-10, and
    /// `return_run_details` is "not a permitted key".
    pub older_server: bool,
    /// Primary limit: requests per hour per token. `None`: unlimited.
    pub rate_limit: Option<u32>,
    /// A GitHub App whose installation tokens are accepted.
    pub app: Option<FakeApp>,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            token: "ghp-test-token".into(),
            repos: vec![("acme".into(), "app".into())],
            workflow: "stitch.yml".into(),
            workflow_id: 84_210_375,
            branches: vec!["main".into()],
            run_name: Some(RUN_NAME.into()),
            declared_inputs: [
                "stitch_build_id",
                "stitch_queue",
                "stitch_base",
                "stitch_head",
                "stitch_metadata",
                "environment",
            ]
            .map(String::from)
            .to_vec(),
            max_inputs: 25,
            timing: Timing::default(),
            older_server: false,
            rate_limit: None,
            app: None,
        }
    }
}

struct Window {
    started: SystemTime,
    used: u32,
}

struct Inner {
    world: World,
    faults: FaultRules<Endpoint>,
    stats: FakeStats,
    windows: HashMap<String, Window>,
    secondary_left: u32,
    installation_tokens: HashMap<String, Instant>,
    log_links: HashMap<String, (String, Instant)>,
    webhook: Option<WebhookTarget>,
    /// How many deliveries were routed to a receiver so far (a duplicated
    /// webhook counts twice).
    webhooks_routed: u64,
    webhook_times: HashMap<(String, String), SystemTime>,
    storage_base: String,
}

struct Shared {
    base: String,
    options: FakeOptions,
    inner: Mutex<Inner>,
    webhooks: mpsc::UnboundedSender<Transition>,
    /// Bumped after each webhook delivery.
    webhooks_delivered: watch::Sender<u64>,
    /// Bumped after each tick that moved a run (every move is a transition).
    runs_moved: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running fake. Stops when dropped.
pub struct FakeGithub {
    shared: Arc<Shared>,
    /// Aborted when the fake is dropped.
    _tasks: Tasks,
}

impl FakeGithub {
    /// Starts the fake (API and log storage) on `127.0.0.1:0`.
    pub async fn start(options: FakeOptions) -> std::io::Result<Self> {
        let (listener, addr) = crate::serving::bind().await?;
        let (storage, storage_addr) = crate::serving::bind().await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            base: format!("http://{addr}"),
            options,
            inner: Mutex::new(Inner {
                world: World::default(),
                faults: FaultRules::default(),
                stats: FakeStats::default(),
                windows: HashMap::new(),
                secondary_left: 0,
                installation_tokens: HashMap::new(),
                log_links: HashMap::new(),
                webhook: None,
                webhooks_routed: 0,
                webhook_times: HashMap::new(),
                storage_base: format!("http://{storage_addr}"),
            }),
            webhooks: tx,
            webhooks_delivered: watch::channel(0).0,
            runs_moved: watch::channel(0).0,
        });
        let repo = "/repos/{owner}/{repo}/actions";
        let app = Router::new()
            .route(
                &format!("{repo}/workflows/{{workflow}}/dispatches"),
                post(dispatch),
            )
            .route(
                &format!("{repo}/workflows/{{workflow}}/runs"),
                get(list_runs),
            )
            .route(&format!("{repo}/runs/{{id}}"), get(get_run))
            .route(&format!("{repo}/runs/{{id}}/cancel"), post(cancel_run))
            .route(&format!("{repo}/runs/{{id}}/jobs"), get(list_jobs))
            .route(&format!("{repo}/jobs/{{id}}/logs"), get(job_log))
            .route("/app/installations/{id}/access_tokens", post(mint_token))
            .with_state(shared.clone());
        let storage_app = Router::new()
            .route("/logs/{token}", get(storage_log))
            .with_state(shared.clone());
        let mut tasks = Tasks::default();
        tasks.serve(listener, app);
        tasks.serve(storage, storage_app);
        tasks.spawn(run_clock(shared.clone()));
        tasks.spawn(send_webhooks(shared.clone(), rx));
        Ok(Self {
            shared,
            _tasks: tasks,
        })
    }

    /// The API root to configure as `api_url` (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        self.shared.base.clone()
    }

    /// The accepted fixed token.
    pub fn token(&self) -> &str {
        &self.shared.options.token
    }

    /// Returns once a `workflow_run` webhook with `action` (`completed`, …)
    /// for the run of `stitch_build_id` was delivered (answered).
    pub async fn webhook_delivered(&self, stitch_build_id: &str, action: &str) {
        crate::serving::until_delivered(&self.shared.webhooks_delivered, || {
            self.webhook_sent_at(stitch_build_id, action).is_some()
        })
        .await;
    }

    /// Returns once every webhook routed to the receiver so far was
    /// delivered (answered). After `set_webhook(None)` nothing more is
    /// routed, so from then on only the test's own requests reach the
    /// receiver.
    pub async fn webhooks_settled(&self) {
        crate::serving::until_delivered(&self.shared.webhooks_delivered, || {
            let inner = self.shared.lock();
            inner.stats.webhooks_sent >= inner.webhooks_routed
        })
        .await;
    }

    /// Changes after every tick of the fake's clock that moved a run (a
    /// status or a job changed): a test waits on it instead of re-reading
    /// on a timer.
    pub fn runs_moved(&self) -> watch::Receiver<u64> {
        self.shared.runs_moved.subscribe()
    }

    /// Returns the REST JSON of the run of `stitch_build_id` and of its jobs
    /// once `wanted(run, jobs)` holds, re-checking after every move.
    pub async fn run_until(
        &self,
        stitch_build_id: &str,
        wanted: impl Fn(&Value, &[Value]) -> bool,
    ) -> (Value, Vec<Value>) {
        let mut moved = self.runs_moved();
        loop {
            moved.borrow_and_update();
            let found = {
                let inner = self.shared.lock();
                inner
                    .world
                    .runs
                    .iter()
                    .find(|r| r.stitch_build_id() == Some(stitch_build_id))
                    .map(|r| {
                        let jobs = (0..r.jobs.len())
                            .map(|i| r.job_json(i, &self.shared.base))
                            .collect::<Vec<_>>();
                        (r.json(&self.shared.base), jobs)
                    })
            };
            if let Some((run, jobs)) = found {
                if wanted(&run, &jobs) {
                    return (run, jobs);
                }
            }
            // The sender lives in the fake, as long as `self`.
            let _ = moved.changed().await;
        }
    }

    /// Refuses the next `times` API requests with a secondary rate limit
    /// (403, `retry-after: 1`).
    pub fn secondary_limit(&self, times: u32) {
        self.shared.lock().secondary_left = times;
    }

    /// Revokes every installation token minted so far (GitHub answers 401
    /// to them from now on).
    pub fn revoke_installation_tokens(&self) {
        self.shared.lock().installation_tokens.clear();
    }

    /// Sends webhooks to `target` from now on (`None`: stop).
    pub fn set_webhook(&self, target: Option<WebhookTarget>) {
        self.shared.lock().webhook = target;
    }

    /// The counters so far.
    pub fn stats(&self) -> FakeStats {
        self.shared.lock().stats.clone()
    }

    /// How many runs were dispatched with `stitch_build_id` = `id`.
    pub fn runs_for(&self, stitch_build_id: &str) -> usize {
        self.shared
            .lock()
            .world
            .runs
            .iter()
            .filter(|r| r.stitch_build_id() == Some(stitch_build_id))
            .count()
    }

    /// The REST JSON of the (first) run dispatched for `stitch_build_id`.
    pub fn run_json(&self, stitch_build_id: &str) -> Option<Value> {
        let inner = self.shared.lock();
        let run = inner
            .world
            .runs
            .iter()
            .find(|r| r.stitch_build_id() == Some(stitch_build_id))?;
        Some(run.json(&self.shared.base))
    }

    /// The inputs the run of `stitch_build_id` was dispatched with.
    pub fn run_inputs(&self, stitch_build_id: &str) -> Option<BTreeMap<String, String>> {
        let inner = self.shared.lock();
        inner
            .world
            .runs
            .iter()
            .find(|r| r.stitch_build_id() == Some(stitch_build_id))
            .map(|r| r.inputs.clone())
    }

    /// When the last `workflow_run` webhook with `action` was sent for the
    /// run of `stitch_build_id`.
    pub fn webhook_sent_at(&self, stitch_build_id: &str, action: &str) -> Option<SystemTime> {
        self.shared
            .lock()
            .webhook_times
            .get(&(stitch_build_id.to_string(), action.to_string()))
            .copied()
    }

    /// Starts a run as someone else would (a push, the UI): its title
    /// names no stitch build. Returns its id.
    pub fn create_foreign_run(&self, owner: &str, repo: &str) -> u64 {
        let o = &self.shared.options;
        let mut inner = self.shared.lock();
        let run = inner.world.new_run(
            owner,
            repo,
            &o.workflow,
            o.workflow_id,
            "main",
            BTreeMap::from([("stitch_head".to_string(), format!("{MARKER}hang"))]),
            Some("Nightly docs build"),
            Instant::now(),
        );
        run.event = "schedule";
        run.id
    }
}

/// Every run advances on each tick; its transitions are queued as
/// webhooks.
impl Clock for Shared {
    type Move = Transition;

    fn period(&self) -> Duration {
        self.options.timing.tick
    }

    fn moved(&self) -> &watch::Sender<u64> {
        &self.runs_moved
    }

    fn advance(&self, now: Instant) -> Vec<Transition> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        for r in inner.world.runs.iter_mut().filter(|r| !r.is_completed()) {
            out.extend(r.advance(now, &self.options.timing, &self.base));
        }
        out
    }

    fn hand_on(&self, t: Transition) {
        let _ = self.webhooks.send(t);
    }
}

/// Webhooks go to the one target (job events only if it takes them), as
/// GitHub delivers them: concurrently, in no guaranteed order, and twice
/// with the same delivery id where the target asks for duplicates.
impl Webhooks for Shared {
    type Transition = Transition;
    type Target = WebhookTarget;

    fn route(&self, t: &Transition) -> Option<WebhookTarget> {
        let mut inner = self.lock();
        let target = inner.webhook.clone()?;
        if t.event == "workflow_job" && !target.job_events {
            return None;
        }
        inner.webhooks_routed += if target.duplicate { 2 } else { 1 };
        Some(target)
    }

    async fn deliver(&self, http: &reqwest::Client, target: WebhookTarget, t: Transition) {
        let delivery = uuid_like();
        let times = if target.duplicate { 2 } else { 1 };
        for _ in 0..times {
            deliver(self, http, &target, &t, &delivery).await;
        }
    }
}

async fn deliver(
    shared: &Shared,
    http: &reqwest::Client,
    target: &WebhookTarget,
    t: &Transition,
    delivery: &str,
) {
    let bytes = t.body.to_string();
    let signature = sign(target.secret.as_bytes(), bytes.as_bytes());
    let sent_at = SystemTime::now();
    let answer = http
        .post(&target.url)
        .header("content-type", "application/json")
        .header("user-agent", "GitHub-Hookshot/9f6e1d2")
        .header("x-github-event", t.event)
        .header("x-github-delivery", delivery)
        .header("x-github-hook-id", "512883104")
        .header("x-github-hook-installation-target-type", "repository")
        .header("x-github-hook-installation-target-id", "733111774")
        .header("x-hub-signature-256", signature)
        .body(bytes)
        .send()
        .await;
    let mut inner = shared.lock();
    inner.stats.webhooks_sent += 1;
    if let (Some(id), "workflow_run") = (&t.stitch_build_id, t.event) {
        inner
            .webhook_times
            .insert((id.clone(), t.action.to_string()), sent_at);
    }
    if !answer.map(|r| r.status().is_success()).unwrap_or(false) {
        inner.stats.webhooks_refused += 1;
    }
    drop(inner);
    shared.webhooks_delivered.send_modify(|n| *n += 1);
}

/// `sha256=<hex HMAC-SHA256 of the body>`: GitHub's `X-Hub-Signature-256`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn message(status: StatusCode, text: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        json!({
            "message": text,
            "documentation_url": "https://docs.github.com/rest/actions",
            "status": status.as_u16().to_string()
        })
        .to_string(),
    )
        .into_response()
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        v.to_string(),
    )
        .into_response()
}

fn not_found() -> Response {
    message(StatusCode::NOT_FOUND, "Not Found")
}

/// What the gate lets through: the fault to apply after the work, the
/// rate-limit headers, and the rate-limit key (to refund a 304).
struct Pass {
    /// What the injected faults do to the answer.
    answer: AnswerFault,
    headers: HeaderMap,
    key: String,
}

fn epoch(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Auth, rate limits and faults, in GitHub's order. `Err` is the answer.
#[allow(clippy::result_large_err)]
fn gate(shared: &Shared, headers: &HeaderMap, endpoint: Endpoint) -> Result<Pass, Response> {
    let mut inner = shared.lock();
    *inner.stats.requests.entry(endpoint.name()).or_default() += 1;
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("token "))
        })
        .unwrap_or_default()
        .to_string();
    let now = Instant::now();
    let valid = presented == shared.options.token
        || inner
            .installation_tokens
            .get(&presented)
            .is_some_and(|exp| *exp > now);
    if !valid {
        inner.stats.unauthorized += 1;
        return Err(message(StatusCode::UNAUTHORIZED, "Bad credentials"));
    }
    let version = headers
        .get("x-github-api-version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("2022-11-28");
    let known = if shared.options.older_server {
        version == "2022-11-28"
    } else {
        API_VERSIONS.contains(&version)
    };
    if !known {
        return Err(message(
            StatusCode::BAD_REQUEST,
            &format!("The version you specified is not a supported version. (version: {version})"),
        ));
    }
    let mut rl = HeaderMap::new();
    if let Some(limit) = shared.options.rate_limit {
        let wall = SystemTime::now();
        let w = inner.windows.entry(presented.clone()).or_insert(Window {
            started: wall,
            used: 0,
        });
        if wall >= w.started + Duration::from_secs(3600) {
            w.started = wall;
            w.used = 0;
        }
        let reset = epoch(w.started + Duration::from_secs(3600));
        let refused = w.used >= limit;
        if !refused {
            w.used += 1;
        }
        let used = w.used;
        rl.insert("x-ratelimit-limit", HeaderValue::from(limit));
        rl.insert(
            "x-ratelimit-remaining",
            HeaderValue::from(limit.saturating_sub(used)),
        );
        rl.insert("x-ratelimit-used", HeaderValue::from(used));
        rl.insert("x-ratelimit-reset", HeaderValue::from(reset));
        rl.insert("x-ratelimit-resource", HeaderValue::from_static("core"));
        if refused {
            inner.stats.rate_limited += 1;
            let mut resp = message(
                StatusCode::FORBIDDEN,
                "API rate limit exceeded for installation. If you reach out to GitHub Support for help, please include the request ID.",
            );
            resp.headers_mut().extend(rl);
            return Err(resp);
        }
    }
    if inner.secondary_left > 0 {
        inner.secondary_left -= 1;
        inner.stats.rate_limited += 1;
        let mut resp = message(
            StatusCode::FORBIDDEN,
            "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.",
        );
        resp.headers_mut().extend(rl);
        resp.headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
        return Err(resp);
    }
    let answer = inner.faults.admit(endpoint, Endpoint::Any)?;
    Ok(Pass {
        answer,
        headers: rl,
        key: presented,
    })
}

async fn finish(pass: Pass, resp: Response) -> Response {
    pass.answer.finish(pass.headers, resp).await
}

/// A conditional GET: 304 when `If-None-Match` names the body's ETag
/// (refunded: 304s cost no quota), else the body with its ETag.
async fn conditional(shared: &Shared, headers: &HeaderMap, pass: Pass, body: Value) -> Response {
    let text = body.to_string();
    let etag = format!(
        "W/\"{}\"",
        &hex::encode(Sha256::digest(text.as_bytes()))[..32]
    );
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    if matches && !pass.answer.spoils() {
        {
            let mut inner = shared.lock();
            inner.stats.not_modified += 1;
            if let Some(w) = inner.windows.get_mut(&pass.key) {
                w.used = w.used.saturating_sub(1);
            }
        }
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        if let Ok(v) = HeaderValue::from_str(&etag) {
            resp.headers_mut().insert(header::ETAG, v);
        }
        return finish(pass, resp).await;
    }
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        text,
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    finish(pass, resp).await
}

fn repo_known(s: &Shared, owner: &str, repo: &str) -> bool {
    s.options.repos.iter().any(|(o, r)| o == owner && r == repo)
}

fn workflow_known(s: &Shared, workflow: &str) -> bool {
    workflow == s.options.workflow || workflow == s.options.workflow_id.to_string()
}

async fn dispatch(
    State(s): State<Arc<Shared>>,
    Path((owner, repo, workflow)): Path<(String, String, String)>,
    req: Request,
) -> Response {
    let headers = req.headers().clone();
    let pass = match gate(&s, &headers, Endpoint::Dispatch) {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    if !repo_known(&s, &owner, &repo) || !workflow_known(&s, &workflow) {
        return not_found();
    }
    let Ok(bytes) = axum::body::to_bytes(req.into_body(), 1 << 20).await else {
        return message(StatusCode::BAD_REQUEST, "Problems parsing JSON");
    };
    let Ok(body) = serde_json::from_slice::<Value>(&bytes) else {
        return message(StatusCode::BAD_REQUEST, "Problems parsing JSON");
    };
    let version = headers
        .get("x-github-api-version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("2022-11-28");
    let wants_details = body.get("return_run_details").is_some();
    if wants_details && (s.options.older_server || version != "2022-11-28") {
        return message(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid request.\n\n\"return_run_details\" is not a permitted key.",
        );
    }
    let Some(git_ref) = body.get("ref").and_then(Value::as_str) else {
        return message(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid request.\n\n\"ref\" wasn't supplied.",
        );
    };
    if !s.options.branches.iter().any(|b| b == git_ref) {
        return message(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!("No ref found for: {git_ref}"),
        );
    }
    let mut inputs = BTreeMap::new();
    if let Some(map) = body.get("inputs").and_then(Value::as_object) {
        for (k, v) in map {
            let Some(v) = v.as_str() else {
                return message(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &format!("Invalid request.\n\nFor 'properties/{k}', {v} is not a string."),
                );
            };
            inputs.insert(k.clone(), v.to_string());
        }
    }
    if inputs.len() > s.options.max_inputs {
        return message(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!(
                "you may only define up to {} `inputs` for a `workflow_dispatch` event",
                s.options.max_inputs
            ),
        );
    }
    let unexpected: Vec<String> = inputs
        .keys()
        .filter(|k| !s.options.declared_inputs.contains(k))
        .map(|k| format!("{k:?}"))
        .collect();
    if !unexpected.is_empty() {
        return message(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!("Unexpected inputs provided: [{}]", unexpected.join(", ")),
        );
    }
    let (answer, requested) = {
        let mut inner = s.lock();
        inner.stats.runs_created += 1;
        let run = inner.world.new_run(
            &owner,
            &repo,
            &s.options.workflow,
            s.options.workflow_id,
            git_ref,
            inputs,
            s.options.run_name.as_deref(),
            Instant::now(),
        );
        let details = json!({
            "workflow_run_id": run.id,
            "run_url": format!("{}/repos/{owner}/{repo}/actions/runs/{}", s.base, run.id),
            "html_url": run.html_url(),
        });
        (details, run.requested(&s.base))
    };
    let _ = s.webhooks.send(requested);
    let resp = if wants_details || version != "2022-11-28" {
        json_response(StatusCode::OK, &answer)
    } else {
        StatusCode::NO_CONTENT.into_response()
    };
    finish(pass, resp).await
}

async fn get_run(
    State(s): State<Arc<Shared>>,
    Path((owner, repo, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let pass = match gate(&s, &headers, Endpoint::GetRun) {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let found = id.parse().ok().and_then(|n| {
        s.lock()
            .world
            .run_mut(&owner, &repo, n)
            .map(|r| r.json(&s.base))
    });
    match found {
        Some(json) => conditional(&s, &headers, pass, json).await,
        None => not_found(),
    }
}

/// `created` filter: `>=T`, `>T`, `<=T`, `<T`, `A..B` or a bare date.
fn created_filter(raw: &str) -> Option<Box<dyn Fn(DateTime<Utc>) -> bool + Send>> {
    let parse = |s: &str| -> Option<DateTime<Utc>> {
        let s = s.trim();
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .ok()
            .or_else(|| {
                chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
                    .ok()
                    .and_then(|d| d.and_hms_opt(0, 0, 0))
                    .map(|n| n.and_utc())
            })
    };
    if let Some(t) = raw.strip_prefix(">=") {
        let t = parse(t)?;
        return Some(Box::new(move |c| c >= t));
    }
    if let Some(t) = raw.strip_prefix('>') {
        let t = parse(t)?;
        return Some(Box::new(move |c| c > t));
    }
    if let Some(t) = raw.strip_prefix("<=") {
        let t = parse(t)?;
        return Some(Box::new(move |c| c <= t));
    }
    if let Some(t) = raw.strip_prefix('<') {
        let t = parse(t)?;
        return Some(Box::new(move |c| c < t));
    }
    if let Some((a, b)) = raw.split_once("..") {
        let (a, b) = (parse(a)?, parse(b)?);
        return Some(Box::new(move |c| c >= a && c <= b));
    }
    let t = parse(raw)?;
    Some(Box::new(move |c| c >= t))
}

async fn list_runs(
    State(s): State<Arc<Shared>>,
    Path((owner, repo, workflow)): Path<(String, String, String)>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let pass = match gate(&s, &headers, Endpoint::ListRuns) {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    if !repo_known(&s, &owner, &repo) || !workflow_known(&s, &workflow) {
        return not_found();
    }
    let (mut event, mut branch, mut status, mut created) = (None, None, None, None);
    let (mut page, mut per_page) = (1usize, 30usize);
    for (k, v) in &query {
        match k.as_str() {
            "event" => event = Some(v.clone()),
            "branch" => branch = Some(v.clone()),
            "status" => status = Some(v.clone()),
            "created" => match created_filter(v) {
                Some(f) => created = Some(f),
                None => {
                    return message(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        &format!("Invalid created filter: {v}"),
                    )
                }
            },
            "page" => page = v.parse().unwrap_or(1).max(1),
            "per_page" => per_page = v.parse().unwrap_or(30).clamp(1, 100),
            _ => {}
        }
    }
    let now = Instant::now();
    let lag = s.options.timing.list_lag;
    let (items, total) = {
        let inner = s.lock();
        let matching: Vec<_> = inner
            .world
            .runs
            .iter()
            .rev()
            .filter(|r| r.owner == owner && r.repo == repo)
            .filter(|r| now >= r.born + lag)
            .filter(|r| event.as_deref().is_none_or(|e| e == r.event))
            .filter(|r| branch.as_ref().is_none_or(|b| &r.branch == b))
            .filter(|r| {
                status
                    .as_deref()
                    .is_none_or(|st| r.status == st || r.conclusion == Some(st))
            })
            .filter(|r| created.as_ref().is_none_or(|f| f(r.created_at)))
            .collect();
        let items: Vec<Value> = matching
            .iter()
            .skip((page - 1) * per_page)
            .take(per_page)
            .map(|r| r.json(&s.base))
            .collect();
        (items, matching.len())
    };
    let last = total.div_ceil(per_page).max(1);
    let body = json!({"total_count": total, "workflow_runs": items});
    let mut resp = conditional(&s, &headers, pass, body).await;
    if page < last {
        let link_to = |p: usize| {
            let mut q: Vec<(String, String)> =
                query.iter().filter(|(k, _)| k != "page").cloned().collect();
            q.push(("page".into(), p.to_string()));
            let qs: Vec<String> = q
                .iter()
                .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
                .collect();
            format!(
                "{}/repos/{owner}/{repo}/actions/workflows/{workflow}/runs?{}",
                s.base,
                qs.join("&")
            )
        };
        let link = format!(
            "<{}>; rel=\"next\", <{}>; rel=\"last\"",
            link_to(page + 1),
            link_to(last)
        );
        if let Ok(v) = HeaderValue::from_str(&link) {
            resp.headers_mut().insert(header::LINK, v);
        }
    }
    resp
}

async fn cancel_run(
    State(s): State<Arc<Shared>>,
    Path((owner, repo, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let pass = match gate(&s, &headers, Endpoint::Cancel) {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    {
        let mut inner = s.lock();
        let Some(run) = id
            .parse()
            .ok()
            .and_then(|n| inner.world.run_mut(&owner, &repo, n))
        else {
            return not_found();
        };
        if run.is_completed() {
            return message(
                StatusCode::CONFLICT,
                "Cannot cancel a workflow run that is completed.",
            );
        }
        if run.cancel_at.is_none() {
            run.cancel_at = Some(Instant::now());
        }
    }
    finish(pass, json_response(StatusCode::ACCEPTED, &json!({}))).await
}

async fn list_jobs(
    State(s): State<Arc<Shared>>,
    Path((owner, repo, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let pass = match gate(&s, &headers, Endpoint::ListJobs) {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let found = id.parse().ok().and_then(|n| {
        let mut inner = s.lock();
        let run = inner.world.run_mut(&owner, &repo, n)?;
        // Jobs exist once the run has left the queue (or was cancelled).
        let jobs: Vec<Value> = (0..run.jobs.len())
            .filter(|i| run.status != "queued" || run.jobs[*i].status != "queued")
            .map(|i| run.job_json(i, &s.base))
            .collect();
        Some(json!({"total_count": jobs.len(), "jobs": jobs}))
    });
    match found {
        Some(body) => conditional(&s, &headers, pass, body).await,
        None => not_found(),
    }
}

async fn job_log(
    State(s): State<Arc<Shared>>,
    Path((owner, repo, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let pass = match gate(&s, &headers, Endpoint::JobLog) {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let link = {
        let mut inner = s.lock();
        let Some(log) = id.parse().ok().and_then(|n| {
            let (run, i) = inner.world.job(&owner, &repo, n)?;
            let job = &run.jobs[i];
            (job.status == "completed").then(|| job.log.clone())
        }) else {
            return not_found();
        };
        let token = uuid_like();
        inner.log_links.insert(
            token.clone(),
            (log, Instant::now() + Duration::from_secs(60)),
        );
        format!("{}/logs/{token}", inner.storage_base)
    };
    let mut resp = StatusCode::FOUND.into_response();
    if let Ok(v) = HeaderValue::from_str(&link) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    finish(pass, resp).await
}

/// The storage host: serves a log link once it is asked, for a minute, and
/// refuses requests that carry GitHub credentials.
async fn storage_log(
    State(s): State<Arc<Shared>>,
    Path(token): Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut inner = s.lock();
    if headers.contains_key(header::AUTHORIZATION) {
        inner.stats.storage_auth_leaks += 1;
        return (
            StatusCode::BAD_REQUEST,
            "<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed</Message></Error>",
        )
            .into_response();
    }
    let Some((log, expires)) = inner.log_links.get(&token).cloned() else {
        return (
            StatusCode::NOT_FOUND,
            "<Error><Code>BlobNotFound</Code></Error>",
        )
            .into_response();
    };
    if Instant::now() > expires {
        return (StatusCode::FORBIDDEN, "<Error><Code>AuthenticationFailed</Code><Message>Signed expiry time has passed</Message></Error>").into_response();
    }
    inner.stats.log_downloads += 1;
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        log,
    )
        .into_response()
}

impl FaultControl for FakeGithub {
    type Endpoint = Endpoint;

    fn with_fault_rules<R>(&self, f: impl FnOnce(&mut FaultRules<Endpoint>) -> R) -> R {
        f(&mut self.shared.lock().faults)
    }
}

impl ProviderFake for FakeGithub {
    const START: Endpoint = Endpoint::Dispatch;
    const POLL: Endpoint = Endpoint::GetRun;

    fn builds_for(&self, stitch_build_id: &str) -> usize {
        self.runs_for(stitch_build_id)
    }

    fn builds_started(&self) -> u64 {
        self.stats().runs_created
    }
}

async fn mint_token(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    {
        let mut inner = s.lock();
        *inner.stats.requests.entry("mint_token").or_default() += 1;
        if let Some(Fault::Status(code)) = inner.faults.take(Endpoint::MintToken, Endpoint::Any) {
            return proxy_page(code);
        }
    }
    let Some(app) = &s.options.app else {
        return not_found();
    };
    let jwt = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let Ok(key) = jsonwebtoken::DecodingKey::from_rsa_pem(&app.public_key_pem) else {
        return message(
            StatusCode::INTERNAL_SERVER_ERROR,
            "fake: bad App public key",
        );
    };
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_required_spec_claims(&["exp", "iat", "iss"]);
    validation.set_issuer(&[app.app_id.as_str()]);
    let claims = match jsonwebtoken::decode::<Value>(jwt, &key, &validation) {
        Ok(d) => d.claims,
        Err(_) => {
            s.lock().stats.unauthorized += 1;
            return message(
                StatusCode::UNAUTHORIZED,
                "A JSON web token could not be decoded",
            );
        }
    };
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap_or(0),
        claims["exp"].as_i64().unwrap_or(0),
    );
    if exp - iat > 600 {
        s.lock().stats.unauthorized += 1;
        return message(
            StatusCode::UNAUTHORIZED,
            "'Expiration time' claim ('exp') is too far in the future",
        );
    }
    if id != app.installation_id.to_string() {
        return not_found();
    }
    let token = format!("ghs_{}", uuid_like().replace('-', ""));
    let expires_at = Utc::now()
        + chrono::Duration::from_std(app.token_lifetime).unwrap_or(chrono::Duration::hours(1));
    {
        let mut inner = s.lock();
        inner.stats.tokens_minted += 1;
        inner
            .installation_tokens
            .insert(token.clone(), Instant::now() + app.token_lifetime);
    }
    json_response(
        StatusCode::CREATED,
        &json!({
            "token": token,
            "expires_at": expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "permissions": {"actions": "write", "metadata": "read"},
            "repository_selection": "selected"
        }),
    )
}

/// A random GUID-shaped id.
fn uuid_like() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}
