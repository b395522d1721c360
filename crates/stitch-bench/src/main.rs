//! stitch benchmark programs. Each prints figures; none asserts timings.
//!
//! `cargo run --release -p stitch-bench -- mq` measures the message queue on
//! SQLite; `cargo run --release -p stitch-bench -- serve` measures a whole
//! in-process `stitch serve` over real HTTP (see `docs/benchmarks.md` for
//! recorded figures).

mod buildkite;
mod counting;
mod mq;
mod serve;
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
    /// The durable message queue on SQLite: publish throughput, end-to-end
    /// throughput by partition count, publish-to-delivery and wake latency,
    /// a plain-SQLite baseline with the same row writes, CPU and peak RSS.
    Mq(mq::MqArgs),
    /// A whole in-process `stitch serve` over loopback HTTP: build-create
    /// throughput (noop runner), 10,000 in-flight builds on the fake runner
    /// (CPU, RSS, polls/s, terminal-to-event latency), and 1,000 WebSocket
    /// event subscribers (delivery latency).
    Serve(serve::ServeArgs),
    /// `stitch serve` driving builds on the fake Buildkite: API calls per
    /// build with webhooks vs polling only, webhook-to-event latency.
    Buildkite(buildkite::BuildkiteArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Mq(args) => rt.block_on(mq::run(args)),
        Command::Serve(args) => rt.block_on(serve::run(args)),
        Command::Buildkite(args) => rt.block_on(buildkite::run(args)),
    }
}
