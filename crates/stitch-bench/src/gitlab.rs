//! `stitch-bench gitlab`: a whole in-process `stitch serve` driving
//! `--builds` builds as pipelines on the stateful fake GitLab (loopback
//! HTTP), once with Pipeline Hooks (60 s safety-net polling) and once with
//! polling alone (the default cadence: 5 s while accepted, 2 s running).
//!
//! Unlike the Buildkite benchmark the budget is real: the fake enforces
//! GitLab.com's per-user limit (`--rate-limit` requests per minute) and
//! stitch is configured with the same budget, so the figures say whether
//! all builds in flight fit it — API calls per build (by endpoint), the
//! most requests in any minute, 429s (none expected), wall time, and the
//! latency from the fake finishing a pipeline to stitch's terminal event.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use stitch_fake_providers::gitlab::{FakeGitlab, FakeOptions, Timing, WebhookTarget};
use stitch_server::config::{
    GitlabSection, GitlabWebhookSection, PollConfig, QueueConfig, RateLimitSection, RunnerSection,
};

use crate::provider::{
    create_and_wait, latencies_to_terminal, one_queue_config, print_calls, print_latency, rfc3339,
    terminal_times, webhook_mode, Server,
};

const TOKEN_ENV: &str = "STITCH_BENCH_GL_TOKEN";
const SECRET_ENV: &str = "STITCH_BENCH_GL_WEBHOOK_SECRET";
const SECRET: &str = "bench-webhook-secret";
const TOKEN: &str = "bench-token";

/// Options of the GitLab benchmark.
#[derive(clap::Args)]
pub struct GitlabArgs {
    /// Builds per mode (all created at once: all in flight together).
    #[arg(long, default_value_t = 1000)]
    builds: usize,
    /// Run time of each fake pipeline, milliseconds (two jobs, half each).
    #[arg(long, default_value_t = 20_000)]
    run_ms: u64,
    /// The token's limit, requests per minute (GitLab.com: 2,000), at the
    /// fake and in stitch's budget.
    #[arg(long, default_value_t = 2000)]
    rate_limit: u32,
    /// Modes to run (comma-separated): webhooks, polling.
    #[arg(long, value_delimiter = ',', default_values_t = ["webhooks".to_string(), "polling".to_string()])]
    only: Vec<String>,
    /// Directory for the data dirs (default: a fresh temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: GitlabArgs) -> anyhow::Result<()> {
    // Read by the server's wiring (token_env / secret_env); set before any
    // server starts, from this single task.
    std::env::set_var(TOKEN_ENV, TOKEN);
    std::env::set_var(SECRET_ENV, SECRET);
    let tmp = tempfile::tempdir()?;
    let root = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    println!(
        "stitch-bench gitlab: {} builds per mode, fake run {} ms, budget {} requests per minute",
        args.builds, args.run_ms, args.rate_limit
    );
    for mode in &args.only {
        let webhooks = webhook_mode(mode)?;
        one_mode(&args, root.join(mode), webhooks).await?;
    }
    Ok(())
}

async fn one_mode(args: &GitlabArgs, data_dir: PathBuf, webhooks: bool) -> anyhow::Result<()> {
    let minute = Duration::from_secs(60);
    let fake = FakeGitlab::start(FakeOptions {
        token: TOKEN.into(),
        timing: Timing {
            schedule: Duration::from_millis(500),
            run: Duration::from_millis(args.run_ms),
            ..Timing::default()
        },
        rate_limit: Some((args.rate_limit, minute)),
        ..FakeOptions::default()
    })
    .await?;
    let queue = QueueConfig {
        runner: RunnerSection::Gitlab(GitlabSection {
            api_url: fake.url(),
            project: "acme/app".into(),
            git_ref: "main".into(),
            token_env: TOKEN_ENV.into(),
            trigger_token_env: None,
            variables: BTreeMap::new(),
            rate_limit: RateLimitSection {
                requests: args.rate_limit,
                window: minute,
            },
            request_timeout: Duration::from_secs(10),
            log_poll: Duration::from_secs(2),
            lookup_settle: Duration::from_secs(2),
            max_log_bytes: 16 * 1024 * 1024,
            webhook: webhooks.then(|| GitlabWebhookSection {
                secret_env: SECRET_ENV.into(),
                poll: minute,
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
            url: format!("http://{}/webhooks/gitlab", server.addr),
            token: SECRET.into(),
        }));
    }
    let run = create_and_wait(state, args.builds).await?;
    let stats = fake.stats();
    let mode = if webhooks { "webhooks" } else { "polling only" };
    print_calls(mode, "GitLab", &run, &stats.requests);
    println!(
        "{:<52} {} (budget {})",
        "most requests in any minute",
        fake.max_requests_in(minute),
        args.rate_limit
    );
    println!("{:<52} {}", "answered 429", stats.rate_limited);
    let terminal_at = terminal_times(state).await?;
    let finish = latencies_to_terminal(&run, &terminal_at, |id| {
        fake.pipeline_json(id)
            .and_then(|p| rfc3339(&p["finished_at"]))
    });
    print_latency("pipeline finished → terminal event, ms", &finish)?;
    if webhooks {
        println!(
            "{:<52} {:.2}",
            "Pipeline Hooks received per build",
            stats.webhooks_sent as f64 / args.builds.max(1) as f64
        );
        let lat = latencies_to_terminal(&run, &terminal_at, |id| {
            ["success", "failed"]
                .iter()
                .find_map(|s| fake.webhook_sent_at(id, s))
                .map(DateTime::<Utc>::from)
        });
        print_latency("hook-to-event latency, ms", &lat)?;
    }
    server.stop().await;
    Ok(())
}
