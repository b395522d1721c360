//! `stitch`: run the service, drive builds, inspect the queue.
//!
//! Exit codes: see [`exit::EXIT_CODES_HELP`] (printed by `stitch --help`).
#![forbid(unsafe_code)]

mod client;
mod commands;
mod configured;
mod exit;
mod job;
mod partitions;
mod reference;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Drive builds on any CI through one contract.
#[derive(Parser)]
#[command(
    name = "stitch",
    version,
    about,
    long_about = None,
    after_help = exit::EXIT_CODES_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Form of the log lines `serve` and `job` write: `text` (one line per
    /// event) or `json` (one JSON object per line). Wins over the
    /// configuration's `telemetry.log_format`; the filter is `STITCH_LOG`,
    /// else `RUST_LOG`.
    #[arg(long, value_enum, value_name = "FORMAT", global = true)]
    log_format: Option<LogFormatArg>,
}

/// A log format, as `--log-format` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormatArg {
    /// Human-readable lines, spans as a prefix.
    Text,
    /// One JSON object per line with the current span and the span stack.
    Json,
}

impl LogFormatArg {
    fn as_format(self) -> stitch_server::config::LogFormat {
        match self {
            LogFormatArg::Text => stitch_server::config::LogFormat::Text,
            LogFormatArg::Json => stitch_server::config::LogFormat::Json,
        }
    }
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
    /// Print a shell completion script for bash, zsh or fish.
    #[command(after_help = "Examples:\n  \
        stitch completions bash > /etc/bash_completion.d/stitch\n  \
        stitch completions zsh > \"${fpath[1]}/_stitch\"\n  \
        stitch completions fish > ~/.config/fish/completions/stitch.fish")]
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    /// Print the manual page (roff) of stitch and its subcommands.
    #[command(after_help = "Example:\n  stitch man | man -l -")]
    Man,
    /// Print this command-line reference as Markdown (docs/cli.md).
    #[command(hide = true)]
    CliReference,
}

/// Shells `stitch completions` writes scripts for.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// A build status, as `--status` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum StatusArg {
    /// The provider reported a state stitch cannot map.
    Unknown,
    /// Created; not running on the provider yet.
    Accepted,
    /// Running on the provider.
    Running,
    /// Finished successfully.
    Succeeded,
    /// Finished unsuccessfully.
    Failed,
    /// Cancelled before it finished.
    Cancelled,
}

impl StatusArg {
    /// The status as the API spells it.
    fn as_status(self) -> stitch_core::BuildStatus {
        use stitch_core::BuildStatus;
        match self {
            StatusArg::Unknown => BuildStatus::Unknown,
            StatusArg::Accepted => BuildStatus::Accepted,
            StatusArg::Running => BuildStatus::Running,
            StatusArg::Succeeded => BuildStatus::Succeeded,
            StatusArg::Failed => BuildStatus::Failed,
            StatusArg::Cancelled => BuildStatus::Cancelled,
        }
    }
}

/// How long a dropped stream (`logs`, `watch`, `--wait`) is retried.
#[derive(Args, Clone, Copy)]
struct ReconnectArgs {
    /// When a stream from the server drops, keep trying to resume it for
    /// this many seconds before giving up (exit 3).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    reconnect_for: u64,
}

impl ReconnectArgs {
    fn policy(self) -> client::Reconnect {
        client::Reconnect {
            give_up_after: std::time::Duration::from_secs(self.reconnect_for),
        }
    }
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
        /// Wait until the build is terminal, showing its progress (exit 1
        /// if it fails or is cancelled).
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        reconnect: ReconnectArgs,
    },
    /// Show one build.
    Status {
        #[command(flatten)]
        server: ServerArgs,
        /// The build id (`b_…`).
        id: String,
    },
    /// Ask for a build to be cancelled.
    Cancel {
        #[command(flatten)]
        server: ServerArgs,
        /// The build id (`b_…`).
        id: String,
    },
    /// List builds, newest first.
    ///
    /// With `--json` the answer is one object: `builds` (the records) and
    /// `next_cursor` (pass it to `--cursor` for the next page; `null` on the
    /// last page, and always with `--all`).
    #[command(after_help = "Examples:\n  \
        stitch build list --queue ci --status failed\n  \
        stitch build list --all --json | jq '.builds[].id'")]
    List {
        #[command(flatten)]
        server: ServerArgs,
        /// Only builds of this queue.
        #[arg(long, short = 'q')]
        queue: Option<String>,
        /// Only builds with this status.
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
        /// Builds per page (1–1000).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// Continue from the `next cursor` a previous page printed.
        #[arg(long)]
        cursor: Option<String>,
        /// Follow the cursors to the last page and print every build.
        #[arg(long)]
        all: bool,
    },
    /// Print a build's log, following it while the build runs.
    ///
    /// A stream that drops is resumed after the last line printed; if it
    /// cannot be resumed within `--reconnect-for` seconds, or the server
    /// reports it could not read the rest, the exit code is 3 (the log
    /// printed is incomplete).
    Logs {
        #[command(flatten)]
        server: ServerArgs,
        /// The build id (`b_…`).
        id: String,
        #[command(flatten)]
        reconnect: ReconnectArgs,
    },
    /// Follow a build until it is terminal: status changes and log lines.
    ///
    /// Follows the server's event stream (`/v1/events`); exit 0 when the
    /// build succeeds, 1 when it fails or is cancelled.
    Watch {
        #[command(flatten)]
        server: ServerArgs,
        /// The build id (`b_…`).
        id: String,
        #[command(flatten)]
        reconnect: ReconnectArgs,
    },
    /// Trigger a build again: a new build on the same queue with the same
    /// base, head and caller metadata.
    ///
    /// Metadata that stitch or the runner wrote (`url`, `error`,
    /// `exit_status`, `signal`, `promised_exit_status*`, `buildkite_*`,
    /// `github_*`, `gitlab_*`, `fake_*`, `provider_state`) is not copied; the new
    /// build's `rerun_of` metadata names the old one. Prints the new id.
    Rerun {
        #[command(flatten)]
        server: ServerArgs,
        /// The build to run again (`b_…`).
        id: String,
        /// Wait until the new build is terminal, showing its progress (exit 1
        /// if it fails or is cancelled).
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        reconnect: ReconnectArgs,
    },
    /// Print the build's page on its provider (Buildkite, GitHub, …).
    ///
    /// With `--json`: `{"id": …, "url": …}`. Exit 2 when the build has no URL yet (it has not reached its
    /// provider, or its runner has no web page).
    Open {
        #[command(flatten)]
        server: ServerArgs,
        /// The build id (`b_…`).
        id: String,
        /// Also open the URL with the program named by `$BROWSER`.
        #[arg(long)]
        browser: bool,
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
            | BuildCommand::Watch { server, .. }
            | BuildCommand::Rerun { server, .. }
            | BuildCommand::Open { server, .. } => server,
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
        /// The topic (`trigger` or `signal`).
        topic: String,
        /// Machine-readable JSON output (one object per line).
        #[arg(long)]
        json: bool,
    },
    /// Publish dead letters again: one by id, or all of the topic.
    Replay {
        #[command(flatten)]
        config: ConfigArgs,
        /// The topic (`trigger` or `signal`).
        topic: String,
        /// The dead letter's id (as `dlq list` prints it); all when omitted.
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every argument of every command, with the command's path.
    fn walk<'a>(cmd: &'a clap::Command, path: &str, out: &mut Vec<(String, &'a clap::Arg)>) {
        let path = format!("{path} {}", cmd.get_name()).trim().to_string();
        for arg in cmd.get_arguments() {
            out.push((path.clone(), arg));
        }
        for sub in cmd.get_subcommands() {
            walk(sub, &path, out);
        }
    }

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_argument_and_command_has_help_text() {
        let mut cmd = Cli::command();
        cmd.build();
        let mut args = Vec::new();
        walk(&cmd, "", &mut args);
        let missing: Vec<String> = args
            .iter()
            .filter(|(_, a)| !a.is_hide_set())
            .filter(|(_, a)| a.get_help().is_none() && a.get_long_help().is_none())
            .map(|(path, a)| format!("{path}: {}", a.get_id()))
            .collect();
        assert!(missing.is_empty(), "arguments without help: {missing:#?}");
        fn commands_without_about(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
            for sub in cmd.get_subcommands() {
                let path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    out.push(path.clone());
                }
                commands_without_about(sub, &path, out);
            }
        }
        let mut bare = Vec::new();
        commands_without_about(&cmd, "stitch", &mut bare);
        assert!(bare.is_empty(), "commands without help: {bare:#?}");
    }

    #[test]
    fn docs_cli_md_is_rendered_from_the_current_definitions() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/cli.md");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        let rendered = crate::reference::render_markdown(Cli::command());
        assert!(
            on_disk == rendered,
            "docs/cli.md is stale: regenerate it with \
             `cargo run -q -p stitch-cli -- cli-reference > docs/cli.md`"
        );
    }
}
