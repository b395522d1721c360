//! `stitch-bench buildkite`: a whole in-process `stitch serve` driving
//! `--builds` builds on the stateful fake Buildkite (loopback HTTP), once
//! with webhooks (signature scheme, 60 s safety-net polling) and once with
//! polling alone (the default cadence: 5 s while accepted, 2 s running).
//!
//! Figures per mode: Buildkite API calls per build (by endpoint), wall
//! time until every build is terminal, and for webhooks the latency from
//! the fake sending `build.finished` to stitch recording the terminal
//! event (p50/p99/max). The request budget is set far above the load so it
//! measures stitch's own call pattern, not the limiter.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
use stitch_core::{BuildId, BuildStatus};
use stitch_fake_providers::buildkite::{
    FakeBuildkite, FakeOptions, Timing, WebhookAuth, WebhookTarget,
};
use stitch_server::config::{
    BuildkiteSection, Config, PollConfig, QueueConfig, RateLimitSection, RunnerName,
    WebhookModeName, WebhookSection,
};
use stitch_server::service::{create_build, CreateBuild};
use stitch_server::state::AppState;
use stitch_server::{http, stages};
use tokio_util::sync::CancellationToken;

const TOKEN_ENV: &str = "STITCH_BENCH_BK_TOKEN";
const SECRET_ENV: &str = "STITCH_BENCH_BK_WEBHOOK_SECRET";
const SECRET: &str = "bench-webhook-secret";

/// Options of the Buildkite benchmark.
#[derive(clap::Args)]
pub struct BuildkiteArgs {
    /// Builds per mode.
    #[arg(long, default_value_t = 1000)]
    builds: usize,
    /// Run time of each fake build, milliseconds (two jobs, half each).
    #[arg(long, default_value_t = 20_000)]
    run_ms: u64,
    /// Also subscribe the webhook to `job.*` events (each wakes a poll).
    #[arg(long)]
    job_events: bool,
    /// Modes to run (comma-separated): webhooks, polling.
    #[arg(long, value_delimiter = ',', default_values_t = ["webhooks".to_string(), "polling".to_string()])]
    only: Vec<String>,
    /// Directory for the data dirs (default: a fresh temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: BuildkiteArgs) -> anyhow::Result<()> {
    // Read by the server's wiring (token_env / secret_env); set before any
    // server starts, from this single task.
    std::env::set_var(TOKEN_ENV, "bench-token");
    std::env::set_var(SECRET_ENV, SECRET);
    let tmp = tempfile::tempdir()?;
    let root = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    println!(
        "stitch-bench buildkite: {} builds per mode, fake run {} ms",
        args.builds, args.run_ms
    );
    for mode in &args.only {
        let webhooks = match mode.as_str() {
            "webhooks" => true,
            "polling" => false,
            other => anyhow::bail!("unknown mode {other:?}; use webhooks or polling"),
        };
        one_mode(&args, root.join(mode), webhooks).await?;
    }
    Ok(())
}

async fn one_mode(args: &BuildkiteArgs, data_dir: PathBuf, webhooks: bool) -> anyhow::Result<()> {
    let fake = FakeBuildkite::start(FakeOptions {
        token: "bench-token".into(),
        timing: Timing {
            schedule: Duration::from_millis(500),
            run: Duration::from_millis(args.run_ms),
            ..Timing::default()
        },
        ..FakeOptions::default()
    })
    .await?;
    let queue = QueueConfig {
        runner: RunnerName::Buildkite,
        poll: PollConfig::default(),
        buildkite: Some(BuildkiteSection {
            org: "acme".into(),
            pipeline: "app".into(),
            branch: "main".into(),
            commit: "HEAD".into(),
            allow_ref_override: false,
            token_env: TOKEN_ENV.into(),
            api_url: fake.url(),
            rate_limit: RateLimitSection {
                requests: 1_000_000,
                window: Duration::from_secs(1),
            },
            request_timeout: Duration::from_secs(10),
            log_poll: Duration::from_secs(2),
            webhook: webhooks.then(|| WebhookSection {
                mode: WebhookModeName::Signature,
                secret_env: SECRET_ENV.into(),
                max_age: Duration::from_secs(300),
                poll: Duration::from_secs(60),
            }),
        }),
        ..QueueConfig::default()
    };
    let config = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir,
        queues: BTreeMap::from([("ci".to_string(), queue)]),
        ..Config::default()
    };
    let state = AppState::open(config).await?;
    let stop = CancellationToken::new();
    let stage_tasks = stages::start(&state, stop.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(http::serve(
        listener,
        http::router(state.clone(), Vec::new()),
        stop.clone().cancelled_owned(),
    ));
    if webhooks {
        fake.set_webhook(Some(WebhookTarget {
            url: format!("http://{addr}/webhooks/buildkite"),
            auth: WebhookAuth::Signature(SECRET.into()),
            job_events: args.job_events,
        }));
    }

    let started = Instant::now();
    let mut ids: Vec<BuildId> = Vec::with_capacity(args.builds);
    for i in 0..args.builds {
        let req = CreateBuild {
            head: vec![format!("https://git.example/c/{i}")],
            ..CreateBuild::default()
        };
        let (build, _) = create_build(&state, "ci", req).await?;
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
    let stats = fake.stats();
    let failed = {
        let mut n = 0;
        for id in &ids {
            if state.store().get_build(id).await?.status != BuildStatus::Succeeded {
                n += 1;
            }
        }
        n
    };

    let mode = if webhooks { "webhooks" } else { "polling only" };
    let per = |n: u64| n as f64 / args.builds as f64;
    println!("\n== {mode}");
    let label = "builds (not succeeded)";
    println!("{label:<52} {} ({failed})", args.builds);
    println!(
        "{:<52} {:.1} s (creates {:.1} s)",
        "wall time to all terminal",
        wall.as_secs_f64(),
        created.as_secs_f64()
    );
    println!(
        "{:<52} {:.2}",
        "Buildkite API calls per build",
        per(stats.total_requests())
    );
    for (endpoint, n) in &stats.requests {
        println!("{:<52} {:.2}", format!("  {endpoint} per build"), per(*n));
    }
    let events = state.store().events_after(0, u32::MAX).await?;
    let mut terminal_at = BTreeMap::new();
    for e in events.iter().filter(|e| e.status.is_terminal()) {
        terminal_at.entry(e.build_id.to_string()).or_insert(e.at);
    }
    // Finish at Buildkite → terminal event in stitch, for both modes.
    let mut finish = Histogram::<u64>::new(3)?;
    for id in &ids {
        let finished = fake
            .build_json(id.as_str())
            .and_then(|b| b["finished_at"].as_str().map(str::to_string))
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok());
        if let (Some(f), Some(at)) = (finished, terminal_at.get(id.as_str())) {
            let micros = (*at - f.with_timezone(&chrono::Utc))
                .num_microseconds()
                .unwrap_or(0);
            finish.record(micros.max(1) as u64)?;
        }
    }
    println!(
        "{:<52} p50 {:.1}  p99 {:.1}  max {:.1}",
        "build finished → terminal event, ms",
        finish.value_at_quantile(0.5) as f64 / 1000.0,
        finish.value_at_quantile(0.99) as f64 / 1000.0,
        finish.max() as f64 / 1000.0,
    );
    if webhooks {
        println!(
            "{:<52} {:.2}",
            "webhooks received per build",
            per(stats.webhooks_sent)
        );
        let mut h = Histogram::<u64>::new(3)?;
        for id in &ids {
            let (Some(sent), Some(at)) = (
                fake.webhook_sent_at(id.as_str(), "build.finished"),
                terminal_at.get(id.as_str()),
            ) else {
                continue;
            };
            let at = SystemTime::from(*at);
            let micros = at.duration_since(sent).unwrap_or_default().as_micros() as u64;
            h.record(micros.max(1))?;
        }
        println!(
            "{:<52} p50 {:.1}  p99 {:.1}  max {:.1}  (n={})",
            "webhook-to-event latency, ms",
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0,
            h.len()
        );
    }
    stop.cancel();
    for t in stage_tasks {
        let _ = t.await;
    }
    let _ = server.await;
    Ok(())
}
