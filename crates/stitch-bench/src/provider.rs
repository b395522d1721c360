//! What the provider benchmarks (`buildkite`, `github`) share: an
//! in-process `stitch serve` (stages and HTTP API on loopback) over a
//! configuration, creating builds and waiting for all of them to be
//! terminal, and printing API calls per build and latency percentiles.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use stitch_core::{BuildId, BuildStatus};
use stitch_server::config::{Config, QueueConfig};
use stitch_server::service::{create_build, CreateBuild};
use stitch_server::state::AppState;
use stitch_server::{http, stages};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running in-process server.
pub struct Server {
    pub state: AppState,
    pub addr: SocketAddr,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    http: JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Opens `config`'s state and starts the stages and the HTTP API.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let state = AppState::open(config).await?;
        let stop = CancellationToken::new();
        let tasks = stages::start(&state, stop.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let http = tokio::spawn(http::serve(
            listener,
            http::router(state.clone(), Vec::new()),
            stop.clone().cancelled_owned(),
        ));
        Ok(Self {
            state,
            addr,
            stop,
            tasks,
            http,
        })
    }

    /// Stops the stages and the API, finishing in-flight work.
    pub async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = self.http.await;
    }
}

/// Builds created and how long things took.
pub struct Run {
    pub ids: Vec<BuildId>,
    pub created: Duration,
    pub wall: Duration,
    pub not_succeeded: usize,
}

/// Creates `builds` builds on queue `ci` (heads `https://git.example/c/<i>`)
/// and waits (at most 600 s) until all are terminal.
pub async fn create_and_wait(state: &AppState, builds: usize) -> anyhow::Result<Run> {
    let started = Instant::now();
    let mut ids: Vec<BuildId> = Vec::with_capacity(builds);
    for i in 0..builds {
        let req = CreateBuild {
            head: vec![format!("https://git.example/c/{i}")],
            ..CreateBuild::default()
        };
        let (build, _) = create_build(state, "ci", req).await?;
        ids.push(build.id);
    }
    let created = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut pending = ids.clone();
    while !pending.is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} builds not terminal after 600 s",
            pending.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut still = Vec::new();
        for id in pending {
            if !state.store().get_build(&id).await?.status.is_terminal() {
                still.push(id);
            }
        }
        pending = still;
    }
    let wall = started.elapsed();
    let mut not_succeeded = 0;
    for id in &ids {
        if state.store().get_build(id).await?.status != BuildStatus::Succeeded {
            not_succeeded += 1;
        }
    }
    Ok(Run {
        ids,
        created,
        wall,
        not_succeeded,
    })
}

/// Prints the mode header, build count, wall time and API calls per build
/// (in total and by endpoint).
pub fn print_calls(mode: &str, provider: &str, run: &Run, requests: &BTreeMap<&'static str, u64>) {
    let n = run.ids.len().max(1) as f64;
    println!("\n== {mode}");
    let label = "builds (not succeeded)";
    println!("{label:<52} {} ({})", run.ids.len(), run.not_succeeded);
    println!(
        "{:<52} {:.1} s (creates {:.1} s)",
        "wall time to all terminal",
        run.wall.as_secs_f64(),
        run.created.as_secs_f64()
    );
    let total: u64 = requests.values().sum();
    println!(
        "{:<52} {:.2}",
        format!("{provider} API calls per build"),
        total as f64 / n
    );
    for (endpoint, count) in requests {
        println!(
            "{:<52} {:.2}",
            format!("  {endpoint} per build"),
            *count as f64 / n
        );
    }
}

/// A config serving `queue` as queue `ci` from `data_dir`, on an
/// ephemeral loopback port.
pub fn one_queue_config(data_dir: PathBuf, queue: QueueConfig) -> Config {
    Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir,
        queues: BTreeMap::from([("ci".to_string(), queue)]),
        ..Config::default()
    }
}

/// Whether a mode named in `--only` runs with webhooks (`webhooks`) or
/// without (`polling`).
pub fn webhook_mode(mode: &str) -> anyhow::Result<bool> {
    match mode {
        "webhooks" => Ok(true),
        "polling" => Ok(false),
        other => anyhow::bail!("unknown mode {other:?}; use webhooks or polling"),
    }
}

/// A provider's RFC 3339 time field (`finished_at`), if it holds one.
pub fn rfc3339(field: &serde_json::Value) -> Option<DateTime<Utc>> {
    let t = DateTime::parse_from_rfc3339(field.as_str()?).ok()?;
    Some(t.with_timezone(&Utc))
}

/// Microseconds from `since(build id)` (when the provider finished the
/// build, or sent its webhook) to the build's terminal event in stitch, for
/// each of `run`'s builds that has both (at least 1).
pub fn latencies_to_terminal(
    run: &Run,
    terminal_at: &BTreeMap<String, DateTime<Utc>>,
    mut since: impl FnMut(&str) -> Option<DateTime<Utc>>,
) -> Vec<u64> {
    let mut out = Vec::new();
    for id in &run.ids {
        let (Some(at), Some(from)) = (terminal_at.get(id.as_str()), since(id.as_str())) else {
            continue;
        };
        let micros = (*at - from).num_microseconds().unwrap_or(0);
        out.push(micros.max(1) as u64);
    }
    out
}

/// When each build's first terminal event was recorded.
pub async fn terminal_times(state: &AppState) -> anyhow::Result<BTreeMap<String, DateTime<Utc>>> {
    let events = state.store().events_after(0, u32::MAX).await?;
    let mut terminal_at = BTreeMap::new();
    for e in events.iter().filter(|e| e.status.is_terminal()) {
        terminal_at.entry(e.build_id.to_string()).or_insert(e.at);
    }
    Ok(terminal_at)
}

/// Prints p50/p99/max of `micros` (microseconds) in milliseconds.
pub fn print_latency(label: &str, micros: &[u64]) -> anyhow::Result<()> {
    let mut h = Histogram::<u64>::new(3)?;
    for m in micros {
        h.record((*m).max(1))?;
    }
    println!(
        "{label:<52} p50 {:.1}  p99 {:.1}  max {:.1}  (n={})",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
        h.len()
    );
    Ok(())
}
