//! `stitch-bench cancel`: cancels and webhooks under load (issue #16).
//!
//! Real `stitch serve` child processes (the `stitch` binary beside this
//! one, or `--stitch-bin`) drive builds on the stateful fake Buildkite,
//! which runs in this process on loopback and sends signed `build.*`
//! webhooks. The queue's safety-net poll (`webhook.poll`) is 60 s, longer
//! than a build's run, so a wake that does not reach the build's poll loop
//! shows up as a lost cancel (the build runs to `succeeded`) or a late
//! terminal event.
//!
//! Each setup — one node on SQLite, and `--pg-nodes` nodes on one
//! PostgreSQL schema with requests and webhooks spread over them in turn —
//! runs two phases on the same servers:
//!
//! - **light** (the baseline): `--baseline-builds` cancelled and as many
//!   plain builds at `--baseline-rate` builds/s;
//! - **full**: `--cancelled` builds each cancelled at a random moment in
//!   its first `--cancel-within-ms`, and `--plain` builds that run
//!   `--run-ms` on the provider, created at `--rate` builds/s in a random
//!   mix.
//!
//! Figures per phase: lost cancels (a cancel answered 202 whose build did
//! not end `cancelled`, or whose provider build was never cancelled),
//! cancel request → provider cancel call, cancel request → `cancelled`
//! event, provider `build.finished` webhook → terminal event (as seen on
//! `/v1/events` SSE, followed on every node, and by the event's own `at`),
//! Buildkite calls per build, creates/s, and CPU and memory of each server
//! process and of the database server.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use stitch_fake_providers::buildkite::{
    FakeBuildkite, FakeOptions, FakeStats, Timing, WebhookAuth, WebhookTarget,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::pg_statements::Statements;
use crate::provider::print_latency;
use crate::scratch_db::{Backend, Scratch};
use crate::serve_child::{migrate, stitch_binary, ServeChild};
use crate::sys::{cpu_time, pid_cpu, pid_rss_mib, NamedProcesses, ProcessesCpu};

const TOKEN_ENV: &str = "STITCH_BENCH_BK_TOKEN";
const TOKEN: &str = "bench-token";
const SECRET_ENV: &str = "STITCH_BENCH_BK_WEBHOOK_SECRET";
const SECRET: &str = "bench-webhook-secret";
/// The secrets the servers read from their environment.
const CHILD_ENV: &[(&str, &str)] = &[(TOKEN_ENV, TOKEN), (SECRET_ENV, SECRET)];
/// The queue's safety-net poll with webhooks configured.
const SAFETY_NET_POLL: Duration = Duration::from_secs(60);

/// Options of the cancel benchmark.
#[derive(clap::Args)]
pub struct CancelArgs {
    /// Builds cancelled in the full phase.
    #[arg(long, default_value_t = 1000)]
    cancelled: usize,
    /// Builds left to finish on the provider in the full phase.
    #[arg(long, default_value_t = 1000)]
    plain: usize,
    /// Each cancel is sent at a random moment this long after its build's
    /// create was answered, at most (milliseconds).
    #[arg(long, default_value_t = 3000)]
    cancel_within_ms: u64,
    /// Run time of each fake build on Buildkite (milliseconds, after 0.5 s
    /// scheduled); longer than `--cancel-within-ms`, so a cancel must reach
    /// the provider before the build finishes.
    #[arg(long, default_value_t = 20_000)]
    run_ms: u64,
    /// Builds created per second in the full phase (the offered load).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Cancelled builds, and as many plain ones, in the light (baseline)
    /// phase.
    #[arg(long, default_value_t = 50)]
    baseline_builds: usize,
    /// Builds created per second in the light phase.
    #[arg(long, default_value_t = 10.0)]
    baseline_rate: f64,
    /// Setups to run (comma-separated): sqlite (one node), postgres
    /// (`--pg-nodes` nodes on one schema).
    #[arg(long, value_delimiter = ',', default_values_t = ["sqlite".to_string(), "postgres".to_string()])]
    only: Vec<String>,
    /// `stitch serve` processes on PostgreSQL.
    #[arg(long, default_value_t = 2)]
    pg_nodes: usize,
    /// `[cluster] lease` of the PostgreSQL servers, milliseconds (default:
    /// the server's, 30 s). Leases are renewed, and each node's fair share
    /// of partitions recomputed, every third of it.
    #[arg(long)]
    pg_lease_ms: Option<u64>,
    /// PostgreSQL server (a database the user may create schemas in).
    #[arg(
        long,
        env = "STITCH_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres_url: String,
    /// The `stitch` binary (default: `stitch` beside this program, e.g.
    /// `target/release/stitch`).
    #[arg(long)]
    stitch_bin: Option<PathBuf>,
    /// Small sizes to check the wiring: 100 + 100 builds at 50/s, 5 s runs,
    /// a 20 + 20 light phase.
    #[arg(long)]
    quick: bool,
    /// Seed of the build mix and cancel moments.
    #[arg(long, default_value_t = 16)]
    seed: u64,
    /// Directory for data dirs, configs and server logs (default: a fresh
    /// temp dir, deleted at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
}

impl CancelArgs {
    fn apply_quick(&mut self) {
        if self.quick {
            self.cancelled = 100;
            self.plain = 100;
            self.run_ms = 5_000;
            self.rate = 50.0;
            self.baseline_builds = 20;
        }
    }
}

/// One phase's sizes.
struct PhaseSpec {
    label: &'static str,
    cancelled: usize,
    plain: usize,
    rate: f64,
}

pub async fn run(mut args: CancelArgs) -> anyhow::Result<()> {
    args.apply_quick();
    anyhow::ensure!(
        args.run_ms > args.cancel_within_ms,
        "--run-ms must exceed --cancel-within-ms (a cancel must be able to reach a running build)"
    );
    anyhow::ensure!(
        args.rate > 0.0 && args.baseline_rate > 0.0,
        "rates must be > 0"
    );
    let stitch = stitch_binary(args.stitch_bin.as_deref())?;
    let tmp = tempfile::tempdir()?;
    let root = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    println!(
        "stitch-bench cancel: full phase {} cancelled + {} plain builds at {}/s, cancel within {} ms, \
         run {} ms; light phase {} + {} at {}/s; webhooks signed, safety-net poll {} s; {}",
        args.cancelled,
        args.plain,
        args.rate,
        args.cancel_within_ms,
        args.run_ms,
        args.baseline_builds,
        args.baseline_builds,
        args.baseline_rate,
        SAFETY_NET_POLL.as_secs(),
        stitch.display()
    );
    let mut rng = StdRng::seed_from_u64(args.seed);
    for setup in &args.only {
        let (backend, nodes) = match setup.as_str() {
            "sqlite" => (Backend::Sqlite, 1),
            "postgres" | "postgresql" => (
                Backend::Postgres(args.postgres_url.clone()),
                args.pg_nodes.max(1),
            ),
            other => anyhow::bail!("unknown setup {other:?}: use sqlite or postgres"),
        };
        run_setup(&args, &stitch, &root, backend, nodes, &mut rng).await?;
    }
    Ok(())
}

async fn run_setup(
    args: &CancelArgs,
    stitch: &Path,
    root: &Path,
    backend: Backend,
    nodes: usize,
    rng: &mut StdRng,
) -> anyhow::Result<()> {
    let scratch = backend.scratch(root, "cancel").await?;
    let result = run_on(args, stitch, &scratch, nodes, rng).await;
    if let Err(e) = scratch.drop_database().await {
        eprintln!("warning: {e:#}");
    }
    result
}

async fn run_on(
    args: &CancelArgs,
    stitch: &Path,
    scratch: &Scratch,
    nodes: usize,
    rng: &mut StdRng,
) -> anyhow::Result<()> {
    let backend = scratch.backend();
    let mut setup = format!(
        "{}, {nodes} node{}",
        backend.label(),
        if nodes == 1 { "" } else { "s" }
    );
    if let (Some(ms), Some(_)) = (args.pg_lease_ms, &scratch.storage_url) {
        setup.push_str(&format!(", lease {ms} ms"));
    }
    let fake = FakeBuildkite::start(FakeOptions {
        token: TOKEN.into(),
        timing: Timing {
            schedule: Duration::from_millis(500),
            run: Duration::from_millis(args.run_ms),
            ..Timing::default()
        },
        ..FakeOptions::default()
    })
    .await?;
    let config_path = scratch.data_dir.join("stitch.toml");
    std::fs::write(
        &config_path,
        config_text(scratch, &fake.url(), args.pg_lease_ms),
    )?;
    if scratch.storage_url.is_some() {
        // Several servers on one database: migrate once before they start
        // (docs/operations.md), so they do not race to create the schema.
        migrate(stitch, &config_path, CHILD_ENV).await?;
    }
    let mut servers = Vec::new();
    for i in 0..nodes {
        servers.push(ServeChild::spawn(
            stitch,
            &config_path,
            &scratch.data_dir,
            &format!("node-{i}"),
            CHILD_ENV,
        )?);
    }
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()?;
    for s in &mut servers {
        s.wait_healthy(&http).await?;
    }
    fake.set_webhooks(
        servers
            .iter()
            .map(|s| WebhookTarget {
                url: format!("{}/webhooks/buildkite", s.base),
                auth: WebhookAuth::Signature(SECRET.into()),
                job_events: false,
            })
            .collect(),
    );
    let feed = Arc::new(Feed::default());
    let stop = CancellationToken::new();
    let followers: Vec<_> = servers
        .iter()
        .map(|s| {
            tokio::spawn(follow_events(
                http.clone(),
                s.base.clone(),
                feed.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let database = backend.server_processes();
    let statements = match backend {
        Backend::Postgres(url) => Statements::open(url).await,
        _ => None,
    };
    println!("\n######## {setup}");
    let phases = [
        PhaseSpec {
            label: "light (baseline)",
            cancelled: args.baseline_builds,
            plain: args.baseline_builds,
            rate: args.baseline_rate,
        },
        PhaseSpec {
            label: "full",
            cancelled: args.cancelled,
            plain: args.plain,
            rate: args.rate,
        },
    ];
    let mut result = Ok(());
    for (n, spec) in phases.iter().enumerate() {
        let ctx = PhaseCtx {
            args,
            setup: &setup,
            phase: n,
            fake: &fake,
            http: &http,
            servers: &servers,
            feed: &feed,
            database: database.as_ref(),
            statements: statements.as_ref(),
        };
        if let Err(e) = run_phase(&ctx, spec, rng).await {
            result = Err(e);
            break;
        }
    }
    stop.cancel();
    for f in followers {
        let _ = f.await;
    }
    for s in servers {
        s.stop().await;
    }
    result
}

fn config_text(scratch: &Scratch, api_url: &str, lease_ms: Option<u64>) -> String {
    let mut storage = String::new();
    if let Some(url) = &scratch.storage_url {
        storage.push_str(&format!("[storage]\nurl = \"{url}\"\n"));
        if let Some(ms) = lease_ms {
            storage.push_str(&format!("[cluster]\nlease = \"{ms}ms\"\n"));
        }
    }
    format!(
        r#"data_dir = "{data}"
{storage}
[queues.ci]
runner = "buildkite"

[queues.ci.buildkite]
org = "acme"
pipeline = "app"
token_env = "{TOKEN_ENV}"
api_url = "{api_url}"
# Far above the load: the benchmark measures stitch, not the limiter.
rate_limit = {{ requests = 1000000, window = "1s" }}
request_timeout = "10s"

[queues.ci.buildkite.webhook]
mode = "signature"
secret_env = "{SECRET_ENV}"
poll = "{poll}s"
"#,
        data = scratch.data_dir.display(),
        poll = SAFETY_NET_POLL.as_secs(),
    )
}

/// The first terminal event of a build seen on any node's `/v1/events`.
#[derive(Clone, Copy)]
struct Seen {
    cancelled: bool,
    succeeded: bool,
    /// The event's own time (when the server recorded it; milliseconds).
    at: DateTime<Utc>,
    /// When this process read it from the stream.
    seen: SystemTime,
}

/// Terminal events by build id, from every node's event stream.
struct Feed {
    terminal: Mutex<HashMap<String, Seen>>,
    /// Bumped for every new terminal event (the phases wait on it).
    changed: watch::Sender<u64>,
}

impl Default for Feed {
    fn default() -> Self {
        Self {
            terminal: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
        }
    }
}

impl Feed {
    fn get(&self, id: &str) -> Option<Seen> {
        self.terminal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
    }

    fn count_missing(&self, ids: &[&str]) -> usize {
        let seen = self.terminal.lock().unwrap_or_else(|p| p.into_inner());
        ids.iter().filter(|id| !seen.contains_key(**id)).count()
    }
}

#[derive(Deserialize)]
struct EventJson {
    seq: u64,
    build_id: String,
    kind: String,
    status: String,
    at: DateTime<Utc>,
}

/// Follows `base`'s `/v1/events` SSE stream until `stop`, recording each
/// build's first terminal event; reconnects from the last `seq` if the
/// stream ends.
async fn follow_events(
    http: reqwest::Client,
    base: String,
    feed: Arc<Feed>,
    stop: CancellationToken,
) {
    let mut after = 0u64;
    while !stop.is_cancelled() {
        let request = http
            .get(format!("{base}/v1/events?after={after}"))
            .header("accept", "text/event-stream")
            // The stream never ends by itself: no overall timeout.
            .timeout(Duration::from_secs(24 * 3600))
            .send();
        let mut resp = tokio::select! {
            r = request => match r {
                Ok(r) if r.status().is_success() => r,
                _ => {
                    // The server is going away or busy; retry shortly
                    // (nothing to wait on but time).
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let mut buf = String::new();
        loop {
            let chunk = tokio::select! {
                c = resp.chunk() => c,
                _ = stop.cancelled() => return,
            };
            let Ok(Some(chunk)) = chunk else { break };
            let seen = SystemTime::now();
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let frame: String = buf.drain(..end + 2).collect();
                for data in frame.lines().filter_map(|l| l.strip_prefix("data:")) {
                    let Ok(e) = serde_json::from_str::<EventJson>(data.trim()) else {
                        continue;
                    };
                    after = after.max(e.seq);
                    let terminal =
                        matches!(e.status.as_str(), "succeeded" | "failed" | "cancelled");
                    if e.kind != "status" || !terminal {
                        continue;
                    }
                    let new = {
                        let mut map = feed.terminal.lock().unwrap_or_else(|p| p.into_inner());
                        let fresh = !map.contains_key(&e.build_id);
                        map.entry(e.build_id).or_insert(Seen {
                            cancelled: e.status == "cancelled",
                            succeeded: e.status == "succeeded",
                            at: e.at,
                            seen,
                        });
                        fresh
                    };
                    if new {
                        feed.changed.send_modify(|n| *n += 1);
                    }
                }
            }
        }
    }
}

struct PhaseCtx<'a> {
    args: &'a CancelArgs,
    setup: &'a str,
    phase: usize,
    fake: &'a FakeBuildkite,
    http: &'a reqwest::Client,
    servers: &'a [ServeChild],
    feed: &'a Feed,
    database: Option<&'a NamedProcesses>,
    /// The database server's statement counters, where it has them.
    statements: Option<&'a Statements>,
}

/// What happened to one build on the client side.
#[derive(Default)]
struct Outcome {
    id: Option<String>,
    cancel: bool,
    create_error: Option<String>,
    create_micros: u64,
    /// When the create was answered.
    created_at: Option<Instant>,
    /// When the cancel request was sent (both clocks) and how long its
    /// answer took.
    cancel_sent: Option<(Instant, SystemTime)>,
    cancel_status: Option<u16>,
    cancel_micros: u64,
}

#[derive(Deserialize)]
struct Created {
    id: String,
}

/// CPU and memory of the processes involved, at one moment.
struct Usage {
    nodes: Vec<Option<Duration>>,
    database: Option<ProcessesCpu>,
    bench: Duration,
    at: Instant,
}

impl Usage {
    fn now(ctx: &PhaseCtx<'_>) -> Self {
        Self {
            nodes: ctx.servers.iter().map(|s| pid_cpu(s.pid)).collect(),
            database: ctx.database.map(NamedProcesses::cpu),
            bench: cpu_time(),
            at: Instant::now(),
        }
    }
}

async fn run_phase(ctx: &PhaseCtx<'_>, spec: &PhaseSpec, rng: &mut StdRng) -> anyhow::Result<()> {
    let total = spec.cancelled + spec.plain;
    let mut kinds = vec![true; spec.cancelled];
    kinds.extend(vec![false; spec.plain]);
    kinds.shuffle(rng);
    let within_us = ctx.args.cancel_within_ms * 1000;
    let plan: Vec<(bool, Duration)> = kinds
        .into_iter()
        .map(|cancel| (cancel, Duration::from_micros(rng.gen_range(0..=within_us))))
        .collect();
    if let Some(st) = ctx.statements {
        st.reset().await?;
    }
    let stats_before = ctx.fake.stats();
    let before = Usage::now(ctx);
    let started = Instant::now();
    // Paces the creates at the phase's offered rate (a load shape, not a
    // wait for something to happen).
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / spec.rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(total);
    let nodes: Vec<String> = ctx.servers.iter().map(|s| s.base.clone()).collect();
    for (k, (cancel, delay)) in plan.into_iter().enumerate() {
        ticks.tick().await;
        let create_on = nodes[k % nodes.len()].clone();
        // The cancel goes to another node than the create when there are
        // several (a request may land anywhere).
        let cancel_on = nodes[(k + 1) % nodes.len()].clone();
        let head = format!(
            "https://git.example/{}/{}/{k}",
            ctx.setup.replace([',', ' '], ""),
            ctx.phase
        );
        let http = ctx.http.clone();
        tasks.push(tokio::spawn(one_build(
            http,
            create_on,
            cancel_on,
            head,
            cancel.then_some(delay),
        )));
    }
    let mut outcomes = Vec::with_capacity(total);
    for t in tasks {
        outcomes.push(t.await?);
    }
    // The load's own window (creates and cancels sent, every answer in):
    // the phase's averages below also cover the builds' quiet run after it,
    // which hides how busy the machine was while requests came in.
    let busy = Usage::now(ctx);
    // The creates' own span (the last answer), not the cancels after them.
    let creates_done = outcomes
        .iter()
        .filter_map(|o| o.created_at)
        .max()
        .map_or(Duration::ZERO, |last| last - started);
    let ids: Vec<&str> = outcomes.iter().filter_map(|o| o.id.as_deref()).collect();
    // Every build ends within its run (plus the fake's schedule) unless a
    // wake was lost and it waits out a safety-net poll; past that, give up
    // and count what is missing.
    let deadline = Instant::now()
        + Duration::from_millis(ctx.args.run_ms)
        + SAFETY_NET_POLL
        + Duration::from_secs(30);
    let mut changed = ctx.feed.changed.subscribe();
    loop {
        if ctx.feed.count_missing(&ids) == 0 {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || tokio::time::timeout(left, changed.changed()).await.is_err() {
            break;
        }
    }
    let wall = started.elapsed();
    let after = Usage::now(ctx);
    let stats_after = ctx.fake.stats();
    report(
        ctx,
        spec,
        &outcomes,
        creates_done,
        wall,
        [&before, &busy, &after],
        &stats_before,
        &stats_after,
    )?;
    if let Some(st) = ctx.statements {
        st.print_top(15).await?;
    }
    Ok(())
}

async fn one_build(
    http: reqwest::Client,
    create_on: String,
    cancel_on: String,
    head: String,
    cancel_after: Option<Duration>,
) -> Outcome {
    let mut out = Outcome {
        cancel: cancel_after.is_some(),
        ..Outcome::default()
    };
    let sent = Instant::now();
    let answer = http
        .post(format!("{create_on}/v1/queues/ci/builds"))
        .json(&serde_json::json!({ "head": [head] }))
        .send()
        .await;
    let created = match answer {
        Ok(r) if r.status().as_u16() == 202 => r.json::<Created>().await.map_err(|e| e.to_string()),
        Ok(r) => Err(format!("create answered {}", r.status())),
        Err(e) => Err(e.to_string()),
    };
    let created_at = Instant::now();
    out.create_micros = (created_at - sent).as_micros() as u64;
    out.created_at = Some(created_at);
    let id = match created {
        Ok(c) => c.id,
        Err(e) => {
            out.create_error = Some(e);
            return out;
        }
    };
    out.id = Some(id.clone());
    let Some(delay) = cancel_after else {
        return out;
    };
    // The scenario's random cancel moment in the build's first seconds.
    tokio::time::sleep_until((created_at + delay).into()).await;
    let sent = (Instant::now(), SystemTime::now());
    let answer = http
        .post(format!("{cancel_on}/v1/builds/{id}/cancel"))
        .send()
        .await;
    out.cancel_micros = sent.0.elapsed().as_micros() as u64;
    out.cancel_sent = Some(sent);
    out.cancel_status = answer.ok().map(|r| r.status().as_u16());
    out
}

/// [`print_latency`] in this report's label width.
fn latency(label: &str, micros: &[u64]) -> anyhow::Result<()> {
    print_latency(&format!("{label:<72}"), micros)
}

fn micros_since(later: SystemTime, earlier: SystemTime) -> u64 {
    later
        .duration_since(earlier)
        .unwrap_or_default()
        .as_micros() as u64
}

#[allow(clippy::too_many_arguments)]
fn report(
    ctx: &PhaseCtx<'_>,
    spec: &PhaseSpec,
    outcomes: &[Outcome],
    creates_done: Duration,
    wall: Duration,
    [before, busy, after]: [&Usage; 3],
    stats_before: &FakeStats,
    stats_after: &FakeStats,
) -> anyhow::Result<()> {
    let cancel_times = ctx.fake.cancel_times();
    let created_times = ctx.fake.created_times();
    let read_times = ctx.fake.read_times();
    let mut to_trigger = Vec::new();
    let (mut lost_status, mut lost_provider, mut lost_unfinished) = (0, 0, 0);
    let (mut before_trigger, mut refused, mut accepted) = (0, 0, 0);
    let (mut plain_wrong, mut plain_unfinished) = (0, 0);
    let mut to_provider = Vec::new();
    // The cancel's path split at the status read the signal stage made
    // just before its cancel call: the request's own answer, answer →
    // that read (wake, the owning node's claim, the stage's store read),
    // read → cancel call (status answer, the stage's decision).
    let mut answered_to_read = Vec::new();
    let mut read_to_cancel = Vec::new();
    let mut to_cancelled_event = Vec::new();
    let mut webhook_to_seen = Vec::new();
    let mut webhook_to_at = Vec::new();
    let mut create_lat = Vec::new();
    let mut cancel_lat = Vec::new();
    let mut create_errors = 0;
    let mut lost_examples = Vec::new();
    for o in outcomes {
        let Some(id) = o.id.as_deref() else {
            create_errors += 1;
            if create_errors == 1 {
                eprintln!("create failed: {:?}", o.create_error);
            }
            continue;
        };
        create_lat.push(o.create_micros);
        if let (Some(answered), Some(born)) = (o.created_at, created_times.get(id)) {
            to_trigger.push(born.saturating_duration_since(answered).as_micros() as u64);
        }
        let seen = ctx.feed.get(id);
        if !o.cancel {
            match seen {
                None => plain_unfinished += 1,
                Some(s) if !s.succeeded => plain_wrong += 1,
                Some(s) => {
                    if let Some(sent) = ctx.fake.webhook_sent_at(id, "build.finished") {
                        webhook_to_seen.push(micros_since(s.seen, sent));
                        webhook_to_at.push(micros_since(s.at.into(), sent));
                    }
                }
            }
            continue;
        }
        let (Some((sent, sent_wall)), Some(202)) = (o.cancel_sent, o.cancel_status) else {
            refused += 1;
            continue;
        };
        accepted += 1;
        cancel_lat.push(o.cancel_micros);
        let provider = ctx.fake.build_json(id);
        let provider_cancelled = provider
            .as_ref()
            .is_some_and(|b| b["state"] == "canceled" && cancel_times.contains_key(id));
        let lost = match seen {
            None => {
                lost_unfinished += 1;
                true
            }
            Some(s) if !s.cancelled => {
                lost_status += 1;
                true
            }
            Some(_) if provider.is_some() && !provider_cancelled => {
                lost_provider += 1;
                true
            }
            Some(_) => false,
        };
        if lost && lost_examples.len() < 3 {
            lost_examples.push(id.to_string());
        }
        if provider.is_none() {
            before_trigger += 1;
        }
        if let Some(at) = cancel_times.get(id) {
            to_provider.push(at.saturating_duration_since(sent).as_micros() as u64);
            let read = read_times
                .get(id)
                .and_then(|reads| reads.iter().rev().find(|r| *r <= at));
            if let Some(read) = read {
                let answered = sent + Duration::from_micros(o.cancel_micros);
                answered_to_read.push(read.saturating_duration_since(answered).as_micros() as u64);
                read_to_cancel.push(at.saturating_duration_since(*read).as_micros() as u64);
            }
        }
        if let Some(s) = seen.filter(|s| s.cancelled) {
            to_cancelled_event.push(micros_since(s.seen, sent_wall));
        }
    }
    let built = outcomes.len() - create_errors;
    let lost = lost_status + lost_provider + lost_unfinished;

    println!("\n== {} / {} phase", ctx.setup, spec.label);
    let line = |label: &str, value: String| println!("{label:<72} {value}");
    line(
        "builds created (cancelled + plain), create errors",
        format!(
            "{built} ({} + {}), {create_errors}",
            spec.cancelled, spec.plain
        ),
    );
    line(
        "creates: offered rate, achieved (first sent to last answered)",
        format!(
            "{:.0}/s, {:.1}/s over {:.1} s",
            spec.rate,
            built as f64 / creates_done.as_secs_f64().max(1e-9),
            creates_done.as_secs_f64()
        ),
    );
    line(
        "wall time to every terminal event",
        format!("{:.1} s", wall.as_secs_f64()),
    );
    line(
        "cancels accepted (202), refused or failed",
        format!("{accepted}, {refused}"),
    );
    line(
        "LOST CANCELS (must be 0)",
        format!(
            "{lost}  (ended otherwise {lost_status}, provider build not cancelled {lost_provider}, \
             no terminal event {lost_unfinished})"
        ),
    );
    if !lost_examples.is_empty() {
        line("  e.g.", lost_examples.join(" "));
    }
    line(
        "cancels before the build reached Buildkite",
        before_trigger.to_string(),
    );
    line(
        "plain builds not succeeded, without terminal event",
        format!("{plain_wrong}, {plain_unfinished}"),
    );
    latency(
        "cancel request → provider cancel call, ms (target p99 ≤ 100)",
        &to_provider,
    )?;
    latency("  of which: cancel request answered, ms", &cancel_lat)?;
    latency(
        "  of which: answered → the stage's status read (wake, claim), ms",
        &answered_to_read,
    )?;
    latency("  of which: status read → cancel call, ms", &read_to_cancel)?;
    latency(
        "cancel request → `cancelled` event seen (SSE), ms",
        &to_cancelled_event,
    )?;
    latency(
        "finish webhook sent → terminal event seen (SSE), ms (target p99 ≤ 100)",
        &webhook_to_seen,
    )?;
    latency(
        "finish webhook sent → terminal event `at` (ms clock), ms",
        &webhook_to_at,
    )?;
    latency("create answered, ms", &create_lat)?;
    latency(
        "create answered → provider create call (trigger), ms",
        &to_trigger,
    )?;
    let n = built.max(1) as f64;
    let mut calls: BTreeMap<&str, u64> = BTreeMap::new();
    for (k, v) in &stats_after.requests {
        let old = stats_before.requests.get(k).copied().unwrap_or(0);
        calls.insert(k, v - old);
    }
    line(
        "Buildkite API calls per build",
        format!(
            "{:.2}  ({})",
            calls.values().sum::<u64>() as f64 / n,
            calls
                .iter()
                .map(|(k, v)| format!("{k} {:.2}", *v as f64 / n))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    line(
        "webhooks per build (refused)",
        format!(
            "{:.2} ({})",
            (stats_after.webhooks_sent - stats_before.webhooks_sent) as f64 / n,
            stats_after.webhooks_refused - stats_before.webhooks_refused
        ),
    );
    for (window, from, to) in [
        ("load (first create to last cancel answered)", before, busy),
        ("phase (to every terminal event)", before, after),
    ] {
        print_usage(ctx, window, from, to);
    }
    Ok(())
}

/// CPU of every process between two snapshots, and memory now.
fn print_usage(ctx: &PhaseCtx<'_>, window: &str, before: &Usage, after: &Usage) {
    let line = |label: &str, value: String| println!("{label:<72} {value}");
    let secs = after.at.duration_since(before.at).as_secs_f64().max(1e-9);
    println!("CPU over the {window}, {secs:.1} s:");
    for (i, s) in ctx.servers.iter().enumerate() {
        let cpu = match (before.nodes[i], after.nodes[i]) {
            (Some(a), Some(b)) => b.saturating_sub(a).as_secs_f64(),
            _ => f64::NAN,
        };
        let (rss, peak) = pid_rss_mib(s.pid).unwrap_or((f64::NAN, f64::NAN));
        line(
            &format!("  stitch serve node-{i}: CPU s (cores), RSS now / peak MiB"),
            format!("{cpu:.1} ({:.2}), {rss:.1} / {peak:.1}", cpu / secs),
        );
    }
    if let (Some(db), Some(a), Some(b)) = (ctx.database, &before.database, &after.database) {
        let cpu = b.since(a).as_secs_f64();
        line(
            &format!(
                "  database server ({}): CPU s (cores), memory MiB",
                db.name()
            ),
            format!("{cpu:.1} ({:.2}), {:.0}", cpu / secs, db.memory_mib()),
        );
    }
    let bench = after.bench.saturating_sub(before.bench).as_secs_f64();
    line(
        "  this program (load + fake Buildkite): CPU s (cores)",
        format!("{bench:.1} ({:.2})", bench / secs),
    );
}
