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

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use stitch_fake_providers::buildkite::{
    FakeBuildkite, FakeOptions, Timing, WebhookAuth, WebhookTarget,
};
use stitch_server::config::{
    BuildkiteSection, PollConfig, QueueConfig, RateLimitSection, RunnerSection, WebhookModeName,
    WebhookSection,
};

use crate::provider::{
    create_and_wait, latencies_to_terminal, one_queue_config, print_calls, print_latency, rfc3339,
    terminal_times, webhook_mode, Server,
};

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
        let webhooks = webhook_mode(mode)?;
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
        runner: RunnerSection::Buildkite(BuildkiteSection {
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
            max_log_bytes: 16 * 1024 * 1024,
            webhook: webhooks.then(|| WebhookSection {
                mode: WebhookModeName::Signature,
                secret_env: SECRET_ENV.into(),
                max_age: Duration::from_secs(300),
                poll: Duration::from_secs(60),
            }),
        }),
        poll: PollConfig::default(),
        ..QueueConfig::default()
    };
    let config = one_queue_config(data_dir, queue);
    let server = Server::start(config).await?;
    let state = &server.state;
    if webhooks {
        fake.set_webhook(Some(WebhookTarget {
            url: format!("http://{}/webhooks/buildkite", server.addr),
            auth: WebhookAuth::Signature(SECRET.into()),
            job_events: args.job_events,
        }));
    }
    let run = create_and_wait(state, args.builds).await?;
    let stats = fake.stats();
    let mode = if webhooks { "webhooks" } else { "polling only" };
    print_calls(mode, "Buildkite", &run, &stats.requests);
    let terminal_at = terminal_times(state).await?;
    // Finish at Buildkite → terminal event in stitch, for both modes.
    let finish = latencies_to_terminal(&run, &terminal_at, |id| {
        fake.build_json(id).and_then(|b| rfc3339(&b["finished_at"]))
    });
    print_latency("build finished → terminal event, ms", &finish)?;
    if webhooks {
        println!(
            "{:<52} {:.2}",
            "webhooks received per build",
            stats.webhooks_sent as f64 / args.builds.max(1) as f64
        );
        let lat = latencies_to_terminal(&run, &terminal_at, |id| {
            fake.webhook_sent_at(id, "build.finished")
                .map(DateTime::<Utc>::from)
        });
        print_latency("webhook-to-event latency, ms", &lat)?;
    }
    server.stop().await;
    Ok(())
}
