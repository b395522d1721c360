//! `stitch`: run the service, drive builds, inspect the queue.
//!
//! Exit codes: 0 success; 1 the build failed or was cancelled (with `--wait`
//! and `watch`); 2 usage or input error; 3 server unreachable or internal error.
#![forbid(unsafe_code)]

mod client;
mod commands;
mod configured;
mod exit;
mod job;
mod partitions;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Drive builds on any CI through one contract.
#[derive(Parser)]
#[command(name = "stitch", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the stitch service (HTTP API + stages) on embedded defaults or a config file.
    Serve(ServeArgs),
    /// Trigger, inspect, watch and cancel builds on a running server.
    #[command(subcommand)]
    Build(BuildCommand),
    /// Commands a CI job runs inside a stitch build: the job API and early failure.
    #[command(subcommand)]
    Job(JobCommand),
    /// Inspect the internal message queue (dead letters, partitions and
    /// their leases) of a stitch database.
    #[command(subcommand)]
    Mq(MqCommand),
    /// Check a configuration file and print every problem with its key.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Apply the queue's and the store's migrations to the configured
    /// database (`storage.url`: SQLite, PostgreSQL or MySQL/MariaDB) and exit.
    Migrate(MigrateArgs),
    /// Run one retention pass now against the configured storage (the
    /// `[retention]` windows), printing what was removed per kind. With
    /// several servers on one database it waits for no one: if another
    /// process is pruning, it says so and removes nothing.
    Gc(GcArgs),
}

#[derive(Args)]
struct GcArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Print what would be removed; remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Machine-readable JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct MigrateArgs {
    #[command(flatten)]
    config: ConfigArgs,
}

/// Where the configuration comes from.
#[derive(Args, Clone)]
struct ConfigArgs {
    /// Configuration file (TOML). Without it: embedded defaults + STITCH_* environment.
    #[arg(long, short = 'c', env = "STITCH_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for the SQLite database and runner state (wins over the file).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Address to listen on (wins over the file), e.g. 127.0.0.1:7700.
    #[arg(long)]
    listen: Option<SocketAddr>,
}

/// How the client reaches the server.
#[derive(Args, Clone)]
struct ServerArgs {
    /// The stitch server's base URL.
    #[arg(
        long,
        env = "STITCH_SERVER",
        default_value = "http://127.0.0.1:7700",
        global = true
    )]
    server: String,
    /// Bearer token for the API.
    #[arg(long, env = "STITCH_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum BuildCommand {
    /// Create a build on a queue.
    Trigger {
        #[command(flatten)]
        server: ServerArgs,
        /// The build queue.
        #[arg(long, short = 'q', default_value = "default")]
        queue: String,
        /// A change URI assumed good (repeatable, in order).
        #[arg(long)]
        base: Vec<String>,
        /// A change URI under test (repeatable, in order; at least one).
        #[arg(long, required = true)]
        head: Vec<String>,
        /// Caller metadata KEY=VALUE (repeatable).
        #[arg(long = "meta", value_parser = parse_key_value)]
        meta: Vec<(String, String)>,
        /// Same key on the same queue returns the existing build.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Wait until the build is terminal, showing its progress.
        #[arg(long)]
        wait: bool,
    },
    /// Show one build.
    Status {
        #[command(flatten)]
        server: ServerArgs,
        id: String,
    },
    /// Ask for a build to be cancelled.
    Cancel {
        #[command(flatten)]
        server: ServerArgs,
        id: String,
    },
    /// List builds, newest first.
    List {
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, short = 'q')]
        queue: Option<String>,
        /// unknown, accepted, running, succeeded, failed or cancelled.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Continue from the `next cursor` a previous page printed.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Print a build's log (following it while the build runs).
    Logs {
        #[command(flatten)]
        server: ServerArgs,
        id: String,
    },
    /// Follow a build until it is terminal: status changes and log lines.
    Watch {
        #[command(flatten)]
        server: ServerArgs,
        id: String,
    },
}

impl BuildCommand {
    /// How this command reaches the server.
    fn server(&self) -> &ServerArgs {
        match self {
            BuildCommand::Trigger { server, .. }
            | BuildCommand::Status { server, .. }
            | BuildCommand::Cancel { server, .. }
            | BuildCommand::List { server, .. }
            | BuildCommand::Logs { server, .. }
            | BuildCommand::Watch { server, .. } => server,
        }
    }
}

#[derive(Subcommand)]
enum JobCommand {
    /// Run a command with a job API beside it.
    ///
    /// Serves the job API on a Unix socket in a new private directory
    /// (mode 0700, socket 0600) and runs CMD with STITCH_JOB_API_SOCKET and
    /// STITCH_JOB_API_TOKEN set, so `stitch job promise-failure` calls inside
    /// it are debounced: one declaration per exit status reaches the stitch
    /// server however many tests fail. SIGTERM and SIGINT are forwarded to
    /// CMD; stitch exits with CMD's exit code (128+N when a signal N killed it).
    /// Declarations use STITCH_SERVER, STITCH_BUILD_ID and STITCH_JOB_TOKEN.
    /// Builds on the `local` runner already run under a job API.
    #[command(after_help = "Example:\n  stitch job exec -- cargo test --workspace")]
    Exec {
        /// The command and its arguments (after `--`).
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        command: Vec<std::ffi::OsString>,
    },
    /// Promise that this build will fail with a given exit status.
    ///
    /// Call it as soon as the job knows it will fail (say, on the first
    /// failing test) so the build shows as failing at once, and is failed
    /// and cancelled at once on a queue with `fail_fast = true`. Calling it
    /// again, even thousands of times, is cheap: through the job API each
    /// exit status is declared once. Without a reachable job API it
    /// declares directly to STITCH_SERVER with STITCH_JOB_TOKEN (safe: the
    /// same status again is a no-op).
    ///
    /// Exit codes: 0 the promise is recorded (now or earlier); 1 the server
    /// refused it (a different exit status was already promised, or the
    /// build is no longer running); 2 invalid input or not inside a stitch
    /// job; 3 the server could not be reached.
    #[command(
        after_help = "Example (in a test runner's failure hook):\n  stitch job promise-failure --exit-status 1 --reason \"test_login failed\" || true"
    )]
    PromiseFailure {
        /// The exit status the job will finish with (an integer > 0).
        #[arg(long, allow_negative_numbers = true, value_name = "N")]
        exit_status: i64,
        /// Why, for humans (shown on the build; the first reason per status wins).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
}

#[derive(Subcommand)]
enum MqCommand {
    /// Dead letters of a topic (`trigger` or `signal`).
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// List a topic's partitions: cursor, next due time, lease owner and
    /// expiry, in-flight deliveries (read-only).
    ///
    /// During a failover this shows which server holds which partitions:
    /// leases name the subscriber (`<stage>-stage@<node>`), and an expired
    /// lease still names the server that died holding it until a survivor
    /// takes the partition over.
    #[command(
        after_help = "Examples:\n  stitch mq partitions --topic signal\n  stitch mq partitions --topic signal --owner signal-stage@node-0 --json\n  stitch mq partitions --topic trigger --due --limit 20 --after KEY"
    )]
    Partitions(PartitionsArgs),
}

#[derive(Args)]
struct PartitionsArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The topic (`trigger` or `signal`).
    #[arg(long)]
    topic: String,
    /// The consumer group (default: the topic's only group).
    #[arg(long)]
    group: Option<String>,
    /// Only partitions whose lease names this subscriber, expired or not.
    #[arg(long, value_name = "NAME")]
    owner: Option<String>,
    /// Only partitions due now (work waiting for a claim).
    #[arg(long)]
    due: bool,
    /// Partitions per page.
    #[arg(
        long,
        default_value_t = 100,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..=stitch_mq::MAX_PARTITION_PAGE as i64)
    )]
    limit: u32,
    /// Start after this partition key (the last key of the previous page).
    #[arg(long, value_name = "KEY")]
    after: Option<String>,
    /// Machine-readable JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters.
    List {
        #[command(flatten)]
        config: ConfigArgs,
        topic: String,
        #[arg(long)]
        json: bool,
    },
    /// Publish dead letters again: one by id, or all of the topic.
    Replay {
        #[command(flatten)]
        config: ConfigArgs,
        topic: String,
        id: Option<i64>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load the configuration and report every problem (exit 2 if any).
    Check {
        #[command(flatten)]
        config: ConfigArgs,
    },
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let code = runtime.block_on(commands::run(cli));
    ExitCode::from(code)
}
