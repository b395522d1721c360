//! `stitch-bench jenkins`: a whole in-process `stitch serve` driving
//! `--builds` builds on the stateful fake Jenkins (loopback HTTP). Jenkins
//! sends stitch no webhooks, so builds are polled at the default cadence
//! (5 s while accepted, 2 s running).
//!
//! Figures: Jenkins API calls per build (by endpoint), wall time until every
//! build is terminal, the finish → terminal event latency, and the most
//! requests the fake saw in any one second against `--budget` (the queue's
//! `rate_limit`, requests per second; Jenkins has no limit of its own).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use chrono::DateTime;
use stitch_fake_providers::jenkins::{FakeJenkins, FakeOptions, Timing};
use stitch_server::config::{
    JenkinsSection, PollConfig, QueueConfig, RateLimitSection, RunnerSection,
};

use crate::provider::{
    create_and_wait, latencies_to_terminal, one_queue_config, print_calls, print_latency,
    terminal_times, Server,
};

const TOKEN_ENV: &str = "STITCH_BENCH_JENKINS_TOKEN";
const TOKEN: &str = "bench-jenkins-token";

/// Options of the Jenkins benchmark.
#[derive(clap::Args)]
pub struct JenkinsArgs {
    /// Builds, all in flight at once.
    #[arg(long, default_value_t = 1000)]
    builds: usize,
    /// Time each fake queue item waits for an executor, milliseconds.
    #[arg(long, default_value_t = 3_000)]
    queue_ms: u64,
    /// Run time of each fake build, milliseconds.
    #[arg(long, default_value_t = 20_000)]
    run_ms: u64,
    /// The queue's request budget, requests per second (`rate_limit`).
    #[arg(long, default_value_t = 1000)]
    budget: u32,
    /// Directory for the data dir (default: a fresh temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: JenkinsArgs) -> anyhow::Result<()> {
    // Read by the server's wiring (token_env); set before the server
    // starts, from this single task.
    std::env::set_var(TOKEN_ENV, TOKEN);
    let tmp = tempfile::tempdir()?;
    let data_dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    println!(
        "stitch-bench jenkins: {} builds, fake queue wait {} ms, run {} ms, budget {} requests/s",
        args.builds, args.queue_ms, args.run_ms, args.budget
    );
    let fake = FakeJenkins::start(FakeOptions {
        token: TOKEN.into(),
        timing: Timing {
            queue: Duration::from_millis(args.queue_ms),
            run: Duration::from_millis(args.run_ms),
            ..Timing::default()
        },
        ..FakeOptions::default()
    })
    .await?;
    let queue = QueueConfig {
        runner: RunnerSection::Jenkins(JenkinsSection {
            url: fake.url(),
            job: "team/app".into(),
            user: fake.user().to_string(),
            token_env: TOKEN_ENV.into(),
            parameters: BTreeMap::new(),
            rate_limit: RateLimitSection {
                requests: args.budget.max(2),
                window: Duration::from_secs(1),
            },
            request_timeout: Duration::from_secs(10),
            log_poll: Duration::from_secs(2),
            max_log_bytes: 16 * 1024 * 1024,
            lookup_depth: 1000,
        }),
        poll: PollConfig::default(),
        ..QueueConfig::default()
    };
    let config = one_queue_config(data_dir, queue);
    let server = Server::start(config).await?;
    let state = &server.state;
    let run = create_and_wait(state, args.builds).await?;
    let stats = fake.stats();
    print_calls(
        "polling (Jenkins sends no webhooks)",
        "Jenkins",
        &run,
        &stats.requests,
    );
    println!(
        "{:<52} {} (budget {})",
        "most requests in any one second",
        fake.max_requests_in(Duration::from_secs(1)),
        args.budget
    );
    let terminal_at = terminal_times(state).await?;
    let finish = latencies_to_terminal(&run, &terminal_at, |id| {
        let build = fake.build_json(id)?;
        let started = build["timestamp"].as_i64()?;
        DateTime::from_timestamp_millis(started + build["duration"].as_i64()?)
    });
    print_latency("build finished → terminal event, ms", &finish)?;
    server.stop().await;
    Ok(())
}
