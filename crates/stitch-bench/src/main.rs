//! stitch benchmark programs. Each prints figures; none asserts timings.
//!
//! `cargo run --release -p stitch-bench -- mq` measures the message queue on
//! SQLite, PostgreSQL and MySQL/MariaDB; `cargo run --release -p stitch-bench
//! -- serve` measures a whole in-process `stitch serve` over real HTTP on the
//! same three backends (see `docs/benchmarks.md` for recorded figures).
#![forbid(unsafe_code)]

mod buildkite;
mod cancel;
mod counting;
mod dashboard;
mod github;
mod gitlab;
mod jenkins;
mod mq;
mod pg_statements;
mod plain_writes;
mod promise;
mod provider;
mod scratch_db;
mod serve;
mod serve_child;
mod soak;
mod sys;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "stitch-bench",
    about = "Benchmark programs for stitch; they print figures"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The durable message queue on SQLite, PostgreSQL and MySQL/MariaDB
    /// (server URLs from --postgres-url / --mysql-url or the
    /// STITCH_TEST_*_URL variables): publish throughput, end-to-end
    /// throughput by partition count, publish-to-delivery and wake latency,
    /// a plain-database baseline with the same row writes per backend, CPU
    /// and peak RSS.
    Mq(mq::MqArgs),
    /// A whole in-process `stitch serve` over loopback HTTP, on SQLite,
    /// PostgreSQL and/or MariaDB (--backends): build-create throughput (noop
    /// runner), 10,000 in-flight builds on the fake runner (CPU of stitch and
    /// of the database server, memory, polls/s, terminal-to-event latency),
    /// and 1,000 WebSocket event subscribers (delivery latency); plain-sqlx
    /// baselines writing the same rows, with the ratio.
    Serve(serve::ServeArgs),
    /// 10,000 concurrent `promise-failure` calls through one job API over
    /// its real Unix socket against a real upstream HTTP server: how many
    /// declarations reach the server (must be 1), latency p50/p99 of the
    /// declaring and the debounced callers, CPU and peak RSS of the job API
    /// process. The callers run in a child process (file descriptors).
    PromiseFailure(promise::PromiseArgs),
    /// The load-generating child of `promise-failure` (internal).
    #[command(hide = true)]
    PromiseFailureLoad(promise::LoadArgs),
    /// `stitch serve` driving builds on the fake Buildkite: API calls per
    /// build with webhooks vs polling only, webhook-to-event latency.
    Buildkite(buildkite::BuildkiteArgs),
    /// Cancels and webhooks under load (issue #16): `stitch serve` child
    /// processes (one on SQLite, two on one PostgreSQL schema) drive builds
    /// on the fake Buildkite with signed webhooks and a 60 s safety-net
    /// poll; 1,000 builds cancelled in their first 3 s and 1,000 plain
    /// ones. Lost cancels, cancel → provider cancel call and finish webhook
    /// → terminal event latency, CPU and RSS of each server; a light phase
    /// on the same servers as the baseline.
    Cancel(cancel::CancelArgs),
    /// `stitch serve` driving builds as runs on the fake GitHub: API calls
    /// per build with webhooks vs polling only (304s counted apart),
    /// webhook-to-event latency.
    Github(github::GithubArgs),
    /// `stitch serve` driving builds as pipelines on the fake GitLab under
    /// GitLab.com's per-token limit: API calls per build with Pipeline
    /// Hooks vs polling only, the busiest minute, hook-to-event latency.
    Gitlab(gitlab::GitlabArgs),
    /// `stitch serve` driving builds as runs of a job on the fake Jenkins
    /// (polled: Jenkins sends no webhooks): API calls per build, the peak
    /// requests per second against the queue's budget.
    Jenkins(jenkins::JenkinsArgs),
    /// Retention over time: two `stitch serve` child processes on SQLite
    /// with builds created at a steady rate on `noop` and `fake` queues,
    /// one with short retention (--window, --interval) and one without;
    /// per --sample: database and data dir size, RSS, create p99.
    Soak(soak::SoakArgs),
    /// The dashboard's server side at scale: a `stitch serve` child on
    /// SQLite; the requests of each dashboard page (p50/p99) with a small
    /// store and with 100,000 builds; 200 emulated browsers following the
    /// live builds and overview pages: stitch's idle CPU with and without
    /// them, event delivery to all of them against one subscriber, RSS.
    Dashboard(dashboard::DashboardArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Mq(args) => rt.block_on(mq::run(args)),
        Command::Serve(args) => rt.block_on(serve::run(args)),
        Command::PromiseFailure(args) => rt.block_on(promise::run(args)),
        Command::PromiseFailureLoad(args) => rt.block_on(promise::load(args)),
        Command::Buildkite(args) => rt.block_on(buildkite::run(args)),
        Command::Cancel(args) => rt.block_on(cancel::run(args)),
        Command::Github(args) => rt.block_on(github::run(args)),
        Command::Gitlab(args) => rt.block_on(gitlab::run(args)),
        Command::Jenkins(args) => rt.block_on(jenkins::run(args)),
        Command::Soak(args) => rt.block_on(soak::run(args)),
        Command::Dashboard(args) => rt.block_on(dashboard::run(args)),
    }
}
