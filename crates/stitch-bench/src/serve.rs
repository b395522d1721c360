//! `stitch-bench serve`: a whole `stitch serve` in this process (temporary
//! data dir, stages running, real HTTP on 127.0.0.1:0), driven by HTTP and
//! WebSocket clients over loopback, on each of `--backends` (SQLite, and a
//! fresh PostgreSQL schema / MariaDB database per scenario) in one run.
//!
//! Three scenarios (`--only create,inflight,subscribers`):
//!
//! - `create`: concurrent keep-alive clients POST builds to a `noop` queue
//!   for `--create-seconds`: requests/s, latency, errors, CPU.
//! - `inflight`: `--builds` builds on four `fake` queues (accept 5 s, run
//!   30/60/90/120 s, default poll cadence), then up to `--seconds` of
//!   sampling: CPU, RSS, status polls/s, terminal-to-event latency.
//! - `subscribers`: `--subscribers` WebSocket clients on `/v1/events` while
//!   builds are created at `--rate`/s: delivery latency per event per
//!   subscriber, and whether every subscriber got every event.
//!
//! The clients run on their own tokio runtime whose threads are named
//! `bench-client`, so the server's CPU share can be told apart from the load
//! generator's (both share the machine's cores). A database server on this
//! machine is measured from `/proc` by process name (`postgres`,
//! `mariadbd`). `create` and `inflight` end with a plain-sqlx baseline
//! writing the same build rows and events on the same backend
//! ([`crate::plain_writes`]) and the ratio.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use stitch_core::{BuildId, BuildStatus};
use stitch_server::config::{Config, FakeSection, QueueConfig, RunnerSection};
use stitch_server::state::AppState;
use stitch_server::{http, stages};
use tokio::runtime::Runtime;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;

use crate::plain_writes::{self, PlainLoad};
use crate::scratch_db::{Backend, Scratch};
use crate::sys::{cpu_time, peak_rss_mib, NamedProcesses, ProcessesCpu};

/// Name prefix of the load generator's threads (excluded from server CPU).
const CLIENT_THREADS: &str = "bench-client";
/// Accept delay of the fake queues in `inflight`.
const ACCEPT_DELAY: Duration = Duration::from_secs(5);
/// Run durations of the four fake queues in `inflight`.
const RUN_SECONDS: [u64; 4] = [30, 60, 90, 120];

/// Options of the server benchmark.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Run only these scenarios (comma-separated): create, inflight, subscribers.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Builds created for the in-flight scenario.
    #[arg(long, default_value_t = 10_000)]
    builds: usize,
    /// Longest sampling window of the in-flight scenario, seconds (it ends
    /// earlier once every build's terminal event was seen).
    #[arg(long, default_value_t = 150)]
    seconds: u64,
    /// Seconds of load in the create and subscriber scenarios.
    #[arg(long, default_value_t = 10)]
    create_seconds: u64,
    /// Concurrent HTTP clients creating builds.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// WebSocket subscribers on /v1/events.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Builds created per second in the subscriber scenario.
    #[arg(long, default_value_t = 20)]
    rate: u64,
    /// Directory for the data dirs (default: a fresh temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Backends to run every scenario on, in this order (comma-separated):
    /// sqlite, postgres, mysql. Each scenario gets a fresh schema
    /// (PostgreSQL) or database (MariaDB), dropped afterwards.
    #[arg(long, value_delimiter = ',', default_value = "sqlite")]
    backends: Vec<String>,
    /// PostgreSQL server for `--backends postgres` (a database the user may
    /// create schemas in).
    #[arg(
        long,
        env = "STITCH_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres_url: String,
    /// MySQL / MariaDB server for `--backends mysql` (the user may create
    /// databases).
    #[arg(
        long,
        env = "STITCH_BENCH_MYSQL_URL",
        default_value = "mysql://root@127.0.0.1:3306/test"
    )]
    mysql_url: String,
}

impl ServeArgs {
    fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == scenario)
    }
}

/// Figures by measure and backend, printed as they come and at the end as
/// one table with a column per backend.
#[derive(Default)]
struct Table {
    backends: Vec<&'static str>,
    measures: Vec<String>,
    values: HashMap<(String, &'static str), String>,
}

impl Table {
    /// Later rows belong to `backend`.
    fn begin(&mut self, backend: &'static str) {
        self.backends.push(backend);
    }

    fn print(&self) {
        println!("\n| measure | {} |", self.backends.join(" | "));
        println!("|---|{}", "---|".repeat(self.backends.len()));
        for m in &self.measures {
            let cells: Vec<&str> = self
                .backends
                .iter()
                .map(|b| {
                    self.values
                        .get(&(m.clone(), *b))
                        .map(String::as_str)
                        .unwrap_or("—")
                })
                .collect();
            println!("| {m} | {} |", cells.join(" | "));
        }
    }
}

fn row(rows: &mut Table, name: impl Into<String>, value: impl Into<String>) {
    let (name, value) = (name.into(), value.into());
    println!("{name:<62} {value}");
    let Some(backend) = rows.backends.last().copied() else {
        return;
    };
    if !rows.measures.contains(&name) {
        rows.measures.push(name.clone());
    }
    rows.values.insert((name, backend), value);
}

/// Milliseconds at quantile `q` of a histogram of microseconds.
fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn lat(h: &Histogram<u64>) -> String {
    format!(
        "p50 {:.1}  p99 {:.1}  max {:.1}",
        ms(h, 0.5),
        ms(h, 0.99),
        h.max() as f64 / 1000.0
    )
}

fn hist() -> Histogram<u64> {
    // Auto-resizing; three significant digits.
    Histogram::<u64>::new(3).expect("3 significant digits is a valid histogram")
}

// ---------------------------------------------------------------------------
// Process figures beyond `sys`: per-thread CPU, current RSS, peak reset.

/// CPU time of this process's threads whose name starts with `prefix`.
fn threads_cpu(prefix: &str) -> Duration {
    let tick = crate::sys::clock_ticks_per_second();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    let mut secs = 0.0;
    for entry in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        // After "(comm) ": state is field 3, utime 14, stime 15.
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let get = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        secs += (get(11) + get(12)) / tick;
    }
    Duration::from_secs_f64(secs)
}

/// Current resident set size in MiB (VmRSS).
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Resets VmHWM to the current RSS so each scenario reports its own peak.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Wall time, whole-process CPU, the server's share (process minus the
/// load generator's threads) and the database server's CPU of one measured
/// section.
struct Meter {
    wall: Instant,
    total: Duration,
    client: Duration,
    database: Option<(NamedProcesses, ProcessesCpu)>,
}

struct Usage {
    wall: f64,
    /// Cores busy on average, whole process.
    total: f64,
    /// Cores busy on average, everything but the client threads.
    server: f64,
    /// The database server's process name and cores busy on average.
    database: Option<(String, f64)>,
}

impl Usage {
    /// CPU-seconds of stitch (the server's share) plus the database server.
    fn server_and_database_seconds(&self) -> f64 {
        (self.server + self.database.as_ref().map_or(0.0, |d| d.1)) * self.wall
    }
}

impl Meter {
    fn start(database: Option<&NamedProcesses>) -> Self {
        Self {
            wall: Instant::now(),
            total: cpu_time(),
            client: threads_cpu(CLIENT_THREADS),
            database: database.map(|d| (d.clone(), d.cpu())),
        }
    }

    fn stop(&self) -> Usage {
        let wall = self.wall.elapsed().as_secs_f64().max(1e-9);
        let total = cpu_time().saturating_sub(self.total).as_secs_f64();
        let client = threads_cpu(CLIENT_THREADS)
            .saturating_sub(self.client)
            .as_secs_f64();
        Usage {
            wall,
            total: total / wall,
            server: (total - client).max(0.0) / wall,
            database: self.database.as_ref().map(|(d, before)| {
                (
                    d.name().to_string(),
                    d.cpu().since(before).as_secs_f64() / wall,
                )
            }),
        }
    }
}

fn cpu(u: &Usage) -> String {
    let database = match &u.database {
        Some((name, cores)) => format!("; {name} {cores:.2}"),
        None => String::new(),
    };
    format!(
        "stitch {:.2} cores (process {:.2}){database}",
        u.server, u.total
    )
}

/// The memory of the database server's processes, or where the database is.
fn database_memory(target: &Target) -> String {
    match (&target.backend, &target.database) {
        (Backend::Sqlite, _) => "in the stitch process".to_string(),
        (_, Some(d)) => format!("{:.1}  ({}, PSS)", d.memory_mib(), d.name()),
        (_, None) => "n/a (no server process on this machine)".to_string(),
    }
}

/// One backend of the run and its server's processes.
struct Target {
    backend: Backend,
    database: Option<NamedProcesses>,
}

// ---------------------------------------------------------------------------
// The server under test.

struct Server {
    addr: SocketAddr,
    state: AppState,
    stop: CancellationToken,
    stages: Vec<JoinHandle<()>>,
    http: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(
        scratch: &Scratch,
        queues: BTreeMap<String, QueueConfig>,
    ) -> anyhow::Result<Self> {
        let mut config = Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: scratch.data_dir.clone(),
            queues,
            ..Config::default()
        };
        config.storage.url = scratch.storage_url.clone();
        let state = AppState::open(config).await?;
        let stop = CancellationToken::new();
        let stages = stages::start(&state, stop.clone());
        let router = http::router(state.clone(), Vec::new());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let http = tokio::spawn(http::serve(
            listener,
            router,
            stop.clone().cancelled_owned(),
        ));
        Ok(Self {
            addr,
            state,
            stop,
            stages,
            http,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Stops HTTP and the stages (bounded: stages drain for at most 30 s),
    /// then closes the database pool so the scratch database can be dropped.
    async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.http).await;
        for t in self.stages {
            let _ = tokio::time::timeout(Duration::from_secs(35), t).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.state.store().close()).await;
    }

    /// Builds not yet terminal (stops counting at `cap` per status).
    async fn open_builds(&self, cap: u32) -> anyhow::Result<usize> {
        let mut n = 0;
        for status in [
            BuildStatus::Accepted,
            BuildStatus::Running,
            BuildStatus::Unknown,
        ] {
            let filter = stitch_store::BuildFilter {
                status: Some(status),
                limit: cap,
                ..Default::default()
            };
            n += self.state.store().list_builds(&filter, None).await?.0.len();
        }
        Ok(n)
    }
}

fn queue(runner: RunnerSection) -> QueueConfig {
    QueueConfig {
        runner,
        ..QueueConfig::default()
    }
}

fn http_client(conns: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(conns.max(1))
        .timeout(Duration::from_secs(30))
        .build()?)
}

fn create_body(i: usize) -> String {
    format!(r#"{{"head":["https://example.com/change/{i}"]}}"#)
}

/// Sum of `stitch_stage_outcomes_total{stage="signal"}`: one per status poll
/// the signal stage finished (hold, ack, retry, dead-letter).
fn signal_outcomes(metrics: Option<&PrometheusHandle>) -> f64 {
    let Some(h) = metrics else { return 0.0 };
    h.render()
        .lines()
        .filter(|l| l.starts_with("stitch_stage_outcomes_total{") && l.contains("stage=\"signal\""))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// What the event stream carries that the benchmark reads.
#[derive(Deserialize)]
struct WireEvent {
    build_id: BuildId,
    queue: String,
    status: BuildStatus,
    at: DateTime<Utc>,
}

/// Small client buffers (tungstenite's default is 128 KiB each way), so
/// RSS with 1,000 subscribers is mostly the server's.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

fn micros_between(later: DateTime<Utc>, earlier: DateTime<Utc>) -> u64 {
    (later - earlier).num_microseconds().unwrap_or(0).max(1) as u64
}

// ---------------------------------------------------------------------------

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Before the client runtime exists: an early return must not drop it
    // inside this async context.
    let backends = args
        .backends
        .iter()
        .map(|b| Backend::parse(b, &args.postgres_url, &args.mysql_url))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    // The stages record their outcomes through the global `metrics`
    // recorder. Installing it here (before any router) makes every scenario
    // count through the same handle; the routers keep local recorders.
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let metrics = metrics::set_global_recorder(recorder).ok().map(|_| handle);
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(CLIENT_THREADS)
        .enable_all()
        .build()?;
    println!(
        "stitch-bench serve: {} cores, backends {}, data dirs under {}, loopback HTTP; load generator on its own 2-thread runtime",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        args.backends.join(","),
        dir.display()
    );
    let mut rows = Table::default();
    let result = async {
        for backend in backends {
            let target = Target {
                database: backend.server_processes(),
                backend,
            };
            let label = target.backend.label();
            rows.begin(label);
            println!(
                "\n== {label}{}",
                target
                    .database
                    .as_ref()
                    .map(|d| format!(" (server processes named {:?} measured)", d.name()))
                    .unwrap_or_default()
            );
            for scenario in ["create", "inflight", "subscribers"] {
                if !args.wants(scenario) {
                    continue;
                }
                let scratch = target.backend.scratch(&dir, scenario).await?;
                let outcome = match scenario {
                    "create" => {
                        create_scenario(&args, &target, &scratch, &clients, &mut rows).await
                    }
                    "inflight" => {
                        inflight_scenario(
                            &args,
                            &target,
                            &scratch,
                            &clients,
                            metrics.as_ref(),
                            &mut rows,
                        )
                        .await
                    }
                    _ => subscriber_scenario(&args, &target, &scratch, &clients, &mut rows).await,
                };
                let dropped = scratch.drop_database().await;
                outcome?;
                dropped?;
            }
        }
        anyhow::Ok(())
    }
    .await;
    clients.shutdown_background();
    result?;
    rows.print();
    Ok(())
}

// ---------------------------------------------------------------------------
// (a) create throughput

async fn create_scenario(
    args: &ServeArgs,
    target: &Target,
    scratch: &Scratch,
    rt: &Runtime,
    rows: &mut Table,
) -> anyhow::Result<()> {
    let mut queues = BTreeMap::new();
    queues.insert("noop".to_string(), queue(RunnerSection::Noop));
    let server = Server::start(scratch, queues).await?;
    let url = server.url("/v1/queues/noop/builds");
    let client = http_client(args.clients)?;
    // Warm the connection pool and the database (on the client runtime, so
    // the connections' tasks live there).
    let warm = (0..args.clients)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            rt.spawn(async move {
                client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(create_body(i))
                    .send()
                    .await?
                    .error_for_status()?;
                anyhow::Ok(())
            })
        })
        .collect::<Vec<_>>();
    for w in warm {
        w.await??;
    }
    reset_peak_rss();
    let seconds = args.create_seconds;
    println!(
        "create: {} clients POST /v1/queues/noop/builds for {seconds} s",
        args.clients
    );
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let m = Meter::start(target.database.as_ref());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let (client, url, first_error) = (client.clone(), url.clone(), first_error.clone());
        tasks.push(rt.spawn(async move {
            let mut h = hist();
            let (mut ok, mut errors) = (0u64, 0u64);
            let mut i = c * 10_000_000;
            while Instant::now() < deadline {
                i += 1;
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(create_body(i))
                    .send()
                    .await;
                let fail = match r {
                    Ok(resp) if resp.status().as_u16() == 202 => {
                        // Read the body so the connection is reused.
                        resp.bytes().await.err().map(|e| e.to_string())
                    }
                    Ok(resp) => Some(format!(
                        "HTTP {}: {}",
                        resp.status(),
                        resp.text().await.unwrap_or_default()
                    )),
                    Err(e) => Some(e.to_string()),
                };
                match fail {
                    None => {
                        ok += 1;
                        h.record((t.elapsed().as_micros() as u64).max(1)).ok();
                    }
                    Some(e) => {
                        errors += 1;
                        first_error.lock().expect("lock").get_or_insert(e);
                    }
                }
            }
            (h, ok, errors)
        }));
    }
    let mut h = hist();
    let (mut ok, mut errors) = (0u64, 0u64);
    for t in tasks {
        let (th, tok, terr) = t.await?;
        h.add(th).ok();
        ok += tok;
        errors += terr;
    }
    let u = m.stop();
    // The stages keep working after the load: time until every build is terminal.
    let drain_start = Instant::now();
    let drain_deadline = drain_start + Duration::from_secs(120);
    let mut open = server.open_builds(1000).await?;
    while open > 0 && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        open = server.open_builds(1000).await?;
    }
    let drain = drain_start.elapsed().as_secs_f64();
    row(
        rows,
        format!(
            "create: POST builds, {} keep-alive clients (req/s)",
            args.clients
        ),
        format!("{:.0}  ({})", ok as f64 / u.wall, cpu(&u)),
    );
    row(rows, "create: request latency (ms)", lat(&h));
    row(
        rows,
        "create: errors",
        match first_error.lock().expect("lock").take() {
            None => errors.to_string(),
            Some(e) => format!("{errors} (first: {e})"),
        },
    );
    row(
        rows,
        "create: every build terminal after the load (s)",
        if open == 0 {
            format!(
                "{drain:.1}  (end-to-end {:.0} builds/s)",
                ok as f64 / (u.wall + drain)
            )
        } else {
            format!("{open}+ builds still open after {drain:.0} s")
        },
    );
    row(
        rows,
        "create: peak RSS of stitch (MiB)",
        format!("{:.1}", peak_rss_mib()),
    );
    row(
        rows,
        "create: database server memory at the end (MiB)",
        database_memory(target),
    );
    server.stop().await;

    // The same build rows and `accepted` events through plain sqlx.
    let plain = plain_writes::run(
        scratch,
        &PlainLoad {
            builds: ok as usize,
            changes: 0,
            concurrency: args.clients,
        },
        target.database.as_ref(),
    )
    .await?;
    row(
        rows,
        "create: plain sqlx, build row + event per tx, same count (tx/s)",
        format!("{:.0}  ({} tasks)", plain.creates_per_s, args.clients),
    );
    row(
        rows,
        "create: stitch creates/s / plain tx/s",
        format!("{:.2}", ok as f64 / u.wall / plain.creates_per_s.max(1e-9)),
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// (b) many in-flight builds on the fake runner

/// What the event watcher of the in-flight scenario collects.
#[derive(Default)]
struct Watch {
    /// Last status per build.
    status: HashMap<BuildId, BuildStatus>,
    accepted: usize,
    running: usize,
    succeeded: usize,
    other_terminal: usize,
    /// Event receive time minus the fake's terminal instant (µs).
    to_event: Option<Histogram<u64>>,
    /// Event `at` minus the fake's terminal instant (µs).
    to_record: Option<Histogram<u64>>,
    /// Event receive time minus event `at` (µs).
    delivery: Option<Histogram<u64>>,
    /// First `running` event's `at` minus the fake's start instant (id
    /// time + accept delay), µs: trigger delay plus the first hold's lag.
    to_running: Option<Histogram<u64>>,
    events: u64,
}

impl Watch {
    fn apply(
        &mut self,
        e: &WireEvent,
        received: DateTime<Utc>,
        terminal_at: Option<DateTime<Utc>>,
    ) {
        self.events += 1;
        let count = |w: &mut Watch, s: BuildStatus, d: isize| {
            let slot = match s {
                BuildStatus::Accepted | BuildStatus::Unknown => &mut w.accepted,
                BuildStatus::Running => &mut w.running,
                BuildStatus::Succeeded => &mut w.succeeded,
                _ => &mut w.other_terminal,
            };
            *slot = slot.saturating_add_signed(d);
        };
        match self.status.insert(e.build_id.clone(), e.status) {
            Some(prev) if prev == e.status => return,
            Some(prev) => count(self, prev, -1),
            None => {}
        }
        count(self, e.status, 1);
        if e.status == BuildStatus::Running {
            let started = e.build_id.created_at()
                + chrono::Duration::from_std(ACCEPT_DELAY).unwrap_or_default();
            self.to_running
                .get_or_insert_with(hist)
                .record(micros_between(e.at, started))
                .ok();
        }
        if e.status.is_terminal() {
            if let Some(t) = terminal_at {
                let add = |h: &mut Option<Histogram<u64>>, v: u64| {
                    h.get_or_insert_with(hist).record(v).ok();
                };
                add(&mut self.to_event, micros_between(received, t));
                add(&mut self.to_record, micros_between(e.at, t));
            }
        }
        self.delivery
            .get_or_insert_with(hist)
            .record(micros_between(received, e.at))
            .ok();
    }

    fn terminal(&self) -> usize {
        self.succeeded + self.other_terminal
    }
}

async fn inflight_scenario(
    args: &ServeArgs,
    target: &Target,
    scratch: &Scratch,
    rt: &Runtime,
    metrics: Option<&PrometheusHandle>,
    rows: &mut Table,
) -> anyhow::Result<()> {
    let mut queues = BTreeMap::new();
    let mut run_of: HashMap<String, Duration> = HashMap::new();
    for secs in RUN_SECONDS {
        let name = format!("fake-{secs}s");
        queues.insert(
            name.clone(),
            QueueConfig {
                runner: RunnerSection::Fake(FakeSection {
                    accept_delay: ACCEPT_DELAY,
                    run_duration: Duration::from_secs(secs),
                    ..FakeSection::default()
                }),
                ..QueueConfig::default()
            },
        );
        run_of.insert(name, Duration::from_secs(secs));
    }
    let names: Arc<Vec<String>> = Arc::new(queues.keys().cloned().collect());
    let server = Server::start(scratch, queues).await?;
    let n = args.builds;
    println!(
        "inflight: {n} builds over {} fake queues (accept {} s, run {:?} s, poll 5 s accepted / 2 s running), sampling up to {} s",
        names.len(),
        ACCEPT_DELAY.as_secs(),
        RUN_SECONDS,
        args.seconds
    );

    // The event watcher: one WebSocket on /v1/events from the start.
    let watch = Arc::new(Mutex::new(Watch::default()));
    let stop_watch = CancellationToken::new();
    let (ws, _) = rt
        .spawn(tokio_tungstenite::connect_async(
            server.ws_url("/v1/events"),
        ))
        .await??;
    let watcher = {
        let (watch, stop, run_of) = (watch.clone(), stop_watch.clone(), run_of.clone());
        rt.spawn(async move {
            let (mut tx, mut rx) = ws.split();
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = rx.next() => m,
                };
                let received = Utc::now();
                match msg {
                    Some(Ok(WsMessage::Text(t))) => {
                        let Ok(e) = serde_json::from_str::<WireEvent>(&t) else {
                            continue;
                        };
                        let terminal_at = run_of.get(&e.queue).map(|run| {
                            e.build_id.created_at()
                                + chrono::Duration::from_std(ACCEPT_DELAY + *run)
                                    .unwrap_or_default()
                        });
                        watch.lock().expect("lock").apply(&e, received, terminal_at);
                    }
                    Some(Ok(_)) => {}
                    _ => break,
                }
            }
            let _ = tx.close().await;
        })
    };

    reset_peak_rss();
    let m_all = Meter::start(target.database.as_ref());
    // Create the builds: the same keep-alive clients as `create`.
    let client = http_client(args.clients)?;
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let m = Meter::start(target.database.as_ref());
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
        let (client, next, errors, first_error, names) = (
            client.clone(),
            next.clone(),
            errors.clone(),
            first_error.clone(),
            names.clone(),
        );
        let base = server.url("/v1/queues/");
        tasks.push(rt.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let url = format!("{base}{}/builds", names[i % names.len()]);
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(create_body(i))
                    .send()
                    .await;
                let fail = match r {
                    Ok(resp) if resp.status().as_u16() == 202 => {
                        resp.bytes().await.err().map(|e| e.to_string())
                    }
                    Ok(resp) => Some(format!("HTTP {}", resp.status())),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(e) = fail {
                    errors.fetch_add(1, Ordering::Relaxed);
                    first_error.lock().expect("lock").get_or_insert(e);
                }
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(600), t).await??;
    }
    let created_u = m.stop();
    let errors = errors.load(Ordering::Relaxed);
    let created = n - errors as usize;
    println!(
        "  created {created} builds in {:.1} s ({errors} errors); sampling",
        created_u.wall
    );

    // The window: sample once a second until every build's terminal event
    // was seen or --seconds passed.
    let m = Meter::start(target.database.as_ref());
    let polls0 = signal_outcomes(metrics);
    let (mut expected_polls, mut max_rss, mut max_polls_s, mut max_cores) =
        (0.0, 0.0f64, 0.0f64, 0.0f64);
    let mut last = (
        Instant::now(),
        polls0,
        cpu_time(),
        threads_cpu(CLIENT_THREADS),
    );
    let database = target.database.as_ref();
    let mut last_database = database.map(NamedProcesses::cpu);
    let (mut max_database_cores, mut max_database_mib) = (0.0f64, 0.0f64);
    let window_end = Instant::now() + Duration::from_secs(args.seconds);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = Instant::now();
        let dt = (now - last.0).as_secs_f64();
        let (polls, total, client) = (
            signal_outcomes(metrics),
            cpu_time(),
            threads_cpu(CLIENT_THREADS),
        );
        let (accepted, running, terminal) = {
            let w = watch.lock().expect("lock");
            (w.accepted, w.running, w.terminal())
        };
        // What the configured cadence asks for right now.
        expected_polls += dt * (running as f64 / 2.0 + accepted as f64 / 5.0);
        let polls_s = (polls - last.1) / dt;
        let cores = ((total.saturating_sub(last.2)).as_secs_f64()
            - client.saturating_sub(last.3).as_secs_f64())
            / dt;
        max_polls_s = max_polls_s.max(polls_s);
        max_cores = max_cores.max(cores);
        max_rss = max_rss.max(rss_mib());
        let database_cores = match (database, last_database.as_mut()) {
            (Some(d), Some(before)) => {
                let now_cpu = d.cpu();
                let cores = now_cpu.since(before).as_secs_f64() / dt;
                *before = now_cpu;
                max_database_cores = max_database_cores.max(cores);
                max_database_mib = max_database_mib.max(d.memory_mib());
                format!("  {} cores {cores:.2}", d.name())
            }
            _ => String::new(),
        };
        let elapsed = m.wall.elapsed().as_secs();
        if elapsed % 10 == 0 {
            println!(
                "  t={elapsed:>3}s accepted {accepted:>5} running {running:>5} terminal {terminal:>5}  polls/s {polls_s:>6.0}  stitch cores {cores:.2}{database_cores}  rss {:.0} MiB",
                rss_mib()
            );
        }
        last = (now, polls, total, client);
        if terminal >= created || now >= window_end {
            break;
        }
    }
    let u = m.stop();
    let polls = signal_outcomes(metrics) - polls0;
    let all = m_all.stop();
    stop_watch.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), watcher).await;
    let w = std::mem::take(&mut *watch.lock().expect("lock"));

    row(
        rows,
        format!("inflight: create {n} builds over HTTP (builds/s)"),
        format!(
            "{:.0}  ({} errors{}; {})",
            created as f64 / created_u.wall,
            errors,
            first_error
                .lock()
                .expect("lock")
                .take()
                .map(|e| format!(", first: {e}"))
                .unwrap_or_default(),
            cpu(&created_u)
        ),
    );
    row(
        rows,
        "inflight: CPU over the sampling window (cores)",
        format!(
            "{}; busiest second stitch {max_cores:.2}{}; window {:.0} s",
            cpu(&u),
            database
                .map(|d| format!(", {} {max_database_cores:.2}", d.name()))
                .unwrap_or_default(),
            u.wall
        ),
    );
    row(
        rows,
        "inflight: CPU from first create to window end (cores)",
        cpu(&all),
    );
    row(
        rows,
        "inflight: peak RSS of stitch (MiB)",
        format!("{:.1}  (largest 1-s sample {max_rss:.1})", peak_rss_mib()),
    );
    row(
        rows,
        "inflight: database server memory, largest 1-s sample (MiB)",
        match database {
            Some(d) => format!("{max_database_mib:.1}  ({}, PSS)", d.name()),
            None => database_memory(target),
        },
    );
    row(
        rows,
        "inflight: status polls/s (signal stage outcomes)",
        if metrics.is_some() {
            format!(
                "{:.0} avg, {max_polls_s:.0} busiest second; {:.2} of what the cadence asks for",
                polls / u.wall,
                polls / expected_polls.max(1.0)
            )
        } else {
            "n/a (global metrics recorder unavailable)".into()
        },
    );
    row(
        rows,
        "inflight: terminal events seen",
        format!(
            "{} of {created} ({} succeeded, {} other terminal; {} events)",
            w.terminal(),
            w.succeeded,
            w.other_terminal,
            w.events
        ),
    );
    let none = || "n/a (no terminal events)".to_string();
    row(
        rows,
        "inflight: terminal-to-event latency, fake terminal -> event received (ms)",
        w.to_event.as_ref().map(lat).unwrap_or_else(none),
    );
    row(
        rows,
        "inflight:   of which terminal -> recorded (event `at`) (ms)",
        w.to_record.as_ref().map(lat).unwrap_or_else(none),
    );
    row(
        rows,
        "inflight: accept-to-running lag, fake start -> `running` recorded (ms)",
        w.to_running.as_ref().map(lat).unwrap_or_else(none),
    );
    row(
        rows,
        "inflight:   event `at` -> received, all events (ms)",
        w.delivery.as_ref().map(lat).unwrap_or_else(none),
    );
    server.stop().await;

    // The same builds and status changes through plain sqlx.
    let builds = created;
    let plain = plain_writes::run(
        scratch,
        &PlainLoad {
            builds,
            changes: (w.events as usize).saturating_sub(builds),
            concurrency: args.clients,
        },
        database,
    )
    .await?;
    let plain_seconds = plain.process_cpu_s + plain.server_cpu_s.unwrap_or(0.0);
    row(
        rows,
        "inflight: plain sqlx, same builds + status changes, one tx each",
        format!(
            "{:.0} creates/s, {:.0} changes/s; CPU {:.1} s bench process{}",
            plain.creates_per_s,
            plain.changes_per_s,
            plain.process_cpu_s,
            match (database, plain.server_cpu_s) {
                (Some(d), Some(s)) => format!(" + {s:.1} s {}", d.name()),
                _ => String::new(),
            }
        ),
    );
    row(
        rows,
        "inflight: create builds/s, stitch / plain",
        format!(
            "{:.2}",
            created as f64 / created_u.wall / plain.creates_per_s.max(1e-9)
        ),
    );
    row(
        rows,
        "inflight: CPU-seconds for the same rows, stitch+database / plain+database",
        format!(
            "{:.2}  ({:.1} s / {plain_seconds:.1} s)",
            all.server_and_database_seconds() / plain_seconds.max(1e-9),
            all.server_and_database_seconds()
        ),
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// (c) many WebSocket subscribers

async fn subscriber_scenario(
    args: &ServeArgs,
    target: &Target,
    scratch: &Scratch,
    rt: &Runtime,
    rows: &mut Table,
) -> anyhow::Result<()> {
    let mut queues = BTreeMap::new();
    queues.insert("noop".to_string(), queue(RunnerSection::Noop));
    let server = Server::start(scratch, queues).await?;
    let start_seq = server.state.store().latest_seq().await?;
    let subs = args.subscribers;
    println!(
        "subscribers: {subs} WebSockets on /v1/events?after={start_seq}, then {}/s noop builds for {} s",
        args.rate, args.create_seconds
    );
    reset_peak_rss();

    // Connect everyone (64 handshakes at a time).
    let (end_tx, end_rx) = watch::channel(u64::MAX);
    let connected = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(64));
    let give_up = CancellationToken::new();
    let url = server.ws_url(&format!("/v1/events?after={start_seq}"));
    let rss_before = rss_mib();
    let t_connect = Instant::now();
    let mut tasks = Vec::with_capacity(subs);
    for _ in 0..subs {
        let (url, gate, connected, mut end_rx, give_up) = (
            url.clone(),
            gate.clone(),
            connected.clone(),
            end_rx.clone(),
            give_up.clone(),
        );
        tasks.push(rt.spawn(async move {
            let ws = {
                let _permit = gate.acquire().await?;
                tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true)
                    .await?
                    .0
            };
            connected.fetch_add(1, Ordering::Relaxed);
            let (mut tx, mut rx) = ws.split();
            let mut h = hist();
            let (mut count, mut last) = (0u64, 0u64);
            loop {
                if last >= *end_rx.borrow() {
                    break;
                }
                let msg = tokio::select! {
                    _ = give_up.cancelled() => break,
                    r = end_rx.changed() => {
                        if r.is_err() {
                            break;
                        }
                        continue;
                    }
                    m = rx.next() => m,
                };
                let received = Utc::now();
                match msg {
                    Some(Ok(WsMessage::Text(t))) => {
                        #[derive(Deserialize)]
                        struct Seq {
                            seq: u64,
                            at: DateTime<Utc>,
                        }
                        if let Ok(e) = serde_json::from_str::<Seq>(&t) {
                            h.record(micros_between(received, e.at)).ok();
                            count += 1;
                            last = e.seq;
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => break,
                }
            }
            let _ = tx.close().await;
            anyhow::Ok((h, count, last))
        }));
    }
    let connect_deadline = Instant::now() + Duration::from_secs(120);
    while connected.load(Ordering::Relaxed) < subs && Instant::now() < connect_deadline {
        if tasks.iter().all(|t| t.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_s = t_connect.elapsed().as_secs_f64();
    let n_connected = connected.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_connected = rss_mib();
    println!(
        "  {n_connected} connected in {connect_s:.1} s; RSS {rss_before:.0} -> {rss_connected:.0} MiB"
    );

    // Offer builds at --rate for --create-seconds.
    let m = Meter::start(target.database.as_ref());
    let client = http_client(8)?;
    let url = server.url("/v1/queues/noop/builds");
    let total = (args.rate * args.create_seconds) as usize;
    let rate = args.rate.max(1);
    let create_errors = rt
        .spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut inflight = tokio::task::JoinSet::new();
            for i in 0..total {
                tick.tick().await;
                let (client, url) = (client.clone(), url.clone());
                inflight.spawn(async move {
                    match client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(create_body(i))
                        .send()
                        .await
                    {
                        Ok(r) if r.status().as_u16() == 202 => r.bytes().await.is_err() as u64,
                        _ => 1,
                    }
                });
            }
            let mut errors = 0;
            while let Some(r) = inflight.join_next().await {
                errors += r.unwrap_or(1);
            }
            errors
        })
        .await?;
    // Wait until every build is terminal; the last seq is then final.
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.open_builds(1000).await? > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let end_seq = server.state.store().latest_seq().await?;
    let _ = end_tx.send(end_seq);
    let expected = end_seq - start_seq;
    // Subscribers stop at end_seq; bounded.
    let mut h = hist();
    let (mut complete, mut events, mut failed) = (0usize, 0u64, 0usize);
    let (mut min_count, mut max_count) = (u64::MAX, 0u64);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for t in tasks {
        let r = tokio::select! {
            r = t => r,
            _ = tokio::time::sleep_until(deadline) => {
                give_up.cancel();
                continue;
            }
        };
        match r {
            Ok(Ok((th, count, last))) => {
                h.add(th).ok();
                events += count;
                min_count = min_count.min(count);
                max_count = max_count.max(count);
                if count == expected && last == end_seq {
                    complete += 1;
                }
            }
            _ => failed += 1,
        }
    }
    give_up.cancel();
    let u = m.stop();
    row(
        rows,
        format!("subscribers: {subs} WebSockets connected (s)"),
        format!(
            "{connect_s:.1}  ({n_connected} connected; RSS {rss_before:.0} -> {rss_connected:.0} MiB idle)"
        ),
    );
    row(
        rows,
        format!("subscribers: {total} builds at {}/s", args.rate),
        format!(
            "{expected} events each; {create_errors} create errors; {}",
            cpu(&u)
        ),
    );
    row(
        rows,
        "subscribers: delivery latency, event `at` -> received (ms)",
        format!("{}  ({events} deliveries)", lat(&h)),
    );
    row(
        rows,
        "subscribers: got every event",
        format!(
            "{complete} of {subs} (events per subscriber min {} max {max_count}; {failed} failed)",
            if min_count == u64::MAX { 0 } else { min_count }
        ),
    );
    row(
        rows,
        "subscribers: peak RSS of stitch (MiB)",
        format!("{:.1}", peak_rss_mib()),
    );
    row(
        rows,
        "subscribers: database server memory at the end (MiB)",
        database_memory(target),
    );
    server.stop().await;
    Ok(())
}
