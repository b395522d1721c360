//! `stitch-bench github`: a whole in-process `stitch serve` driving
//! `--builds` builds as runs on the stateful fake GitHub (loopback HTTP),
//! once with webhooks (`workflow_run`, 60 s safety-net polling) and once
//! with polling alone (the default cadence: 5 s while accepted, 2 s
//! running), the same shape as `stitch-bench buildkite`.
//!
//! Figures per mode: GitHub API calls per build (by endpoint), how many
//! polls GitHub answered 304 (free of quota), wall time until every build
//! is terminal, and the latency from a run completing at the fake to
//! stitch's terminal event (p50/p99/max). The request budget is set far
//! above the load so it measures stitch's own call pattern.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use stitch_fake_providers::github::{FakeGithub, FakeOptions, Timing, WebhookTarget};
use stitch_server::config::{
    Config, GithubSection, GithubWebhookSection, PollConfig, QueueConfig, RateLimitSection,
    RunnerSection, WebhooksConfig,
};

use crate::provider::{
    create_and_wait, latencies_to_terminal, one_queue_config, print_calls, print_latency, rfc3339,
    terminal_times, webhook_mode, Server,
};

const TOKEN_ENV: &str = "STITCH_BENCH_GH_TOKEN";
const SECRET_ENV: &str = "STITCH_BENCH_GH_WEBHOOK_SECRET";
const SECRET: &str = "bench-github-webhook-secret";

/// Options of the GitHub benchmark.
#[derive(clap::Args)]
pub struct GithubArgs {
    /// Builds per mode.
    #[arg(long, default_value_t = 1000)]
    builds: usize,
    /// Run time of each fake run, milliseconds (two jobs, half each).
    #[arg(long, default_value_t = 20_000)]
    run_ms: u64,
    /// Also send `workflow_job` events (each wakes a poll).
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
pub async fn run(args: GithubArgs) -> anyhow::Result<()> {
    // Read by the server's wiring (token_env / secret_env); set before any
    // server starts, from this single task.
    std::env::set_var(TOKEN_ENV, "bench-token");
    std::env::set_var(SECRET_ENV, SECRET);
    let tmp = tempfile::tempdir()?;
    let root = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    println!(
        "stitch-bench github: {} builds per mode, fake run {} ms",
        args.builds, args.run_ms
    );
    for mode in &args.only {
        let webhooks = webhook_mode(mode)?;
        one_mode(&args, root.join(mode), webhooks).await?;
    }
    Ok(())
}

async fn one_mode(args: &GithubArgs, data_dir: PathBuf, webhooks: bool) -> anyhow::Result<()> {
    let fake = FakeGithub::start(FakeOptions {
        token: "bench-token".into(),
        timing: Timing {
            queue: Duration::from_millis(500),
            run: Duration::from_millis(args.run_ms),
            ..Timing::default()
        },
        ..FakeOptions::default()
    })
    .await?;
    let queue = QueueConfig {
        runner: RunnerSection::Github(GithubSection {
            owner: "acme".into(),
            repo: "app".into(),
            workflow: "stitch.yml".into(),
            git_ref: "main".into(),
            token_env: Some(TOKEN_ENV.into()),
            app_id: None,
            private_key_file: None,
            installation_id: None,
            api_url: fake.url(),
            api_version: "2022-11-28".into(),
            inputs: BTreeMap::new(),
            max_inputs: 25,
            rate_limit: RateLimitSection {
                requests: 1_000_000,
                window: Duration::from_secs(1),
            },
            request_timeout: Duration::from_secs(10),
            log_poll: Duration::from_secs(5),
            lookup_settle: Duration::from_secs(10),
        }),
        poll: PollConfig::default(),
        ..QueueConfig::default()
    };
    let config = Config {
        webhooks: WebhooksConfig {
            github: webhooks.then(|| GithubWebhookSection {
                secret_env: SECRET_ENV.into(),
                poll: Duration::from_secs(60),
            }),
        },
        ..one_queue_config(data_dir, queue)
    };
    let server = Server::start(config).await?;
    let state = &server.state;
    if webhooks {
        fake.set_webhook(Some(WebhookTarget {
            url: format!("http://{}/webhooks/github", server.addr),
            secret: SECRET.into(),
            job_events: args.job_events,
            duplicate: false,
        }));
    }
    let run = create_and_wait(state, args.builds).await?;
    let stats = fake.stats();
    let mode = if webhooks { "webhooks" } else { "polling only" };
    print_calls(mode, "GitHub", &run, &stats.requests);
    let n = args.builds.max(1) as f64;
    println!(
        "{:<52} {:.2}",
        "  of which answered 304 (no quota) per build",
        stats.not_modified as f64 / n
    );
    let terminal_at = terminal_times(state).await?;
    let finish = latencies_to_terminal(&run, &terminal_at, |id| {
        fake.run_json(id).and_then(|r| rfc3339(&r["updated_at"]))
    });
    let hook = latencies_to_terminal(&run, &terminal_at, |id| {
        fake.webhook_sent_at(id, "completed")
            .map(DateTime::<Utc>::from)
    });
    // GitHub's times have whole seconds: this figure is coarse.
    print_latency("run completed → terminal event, ms (±1 s)", &finish)?;
    if webhooks {
        println!(
            "{:<52} {:.2}",
            "webhooks received per build",
            stats.webhooks_sent as f64 / n
        );
        print_latency("webhook-to-event latency, ms", &hook)?;
    }
    server.stop().await;
    Ok(())
}
