//! `stitch.toml`: the service configuration. Types and defaults live here;
//! loading (file + `STITCH_*` environment overrides) and validation with key
//! paths live in [`load`].

pub mod load;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use load::{api_tokens, load, render_problems, ConfigError, ConfigProblem, LoadOptions};

/// The whole configuration. Unknown keys are errors.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP API listens on (`--listen` wins).
    pub listen: SocketAddr,
    /// Where the SQLite database and runner state live (`--data-dir` wins).
    pub data_dir: PathBuf,
    pub storage: StorageConfig,
    /// `[cluster]`: how the stages of several processes on one database
    /// share the work.
    pub cluster: ClusterConfig,
    pub api: ApiConfig,
    /// Build queues by name.
    pub queues: BTreeMap<String, QueueConfig>,
    /// `[webhooks.*]`: provider webhooks that speak for every queue of
    /// their runner.
    pub webhooks: WebhooksConfig,
    /// `[spindle]`: serve as a Tangled spindle (see `docs/spindle.md`).
    /// Absent: no spindle.
    pub spindle: Option<SpindleConfig>,
    /// `[http]`: limits of the HTTP listener (every route on it: the API,
    /// webhooks and the spindle's).
    pub http: HttpConfig,
    /// `[retention]`: how long finished builds, events and dead letters
    /// are kept, and how often the pruner runs.
    pub retention: RetentionConfig,
}

impl Default for Config {
    fn default() -> Self {
        let mut queues = BTreeMap::new();
        queues.insert("default".to_string(), QueueConfig::default());
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            data_dir: PathBuf::from("./stitch-data"),
            storage: StorageConfig::default(),
            cluster: ClusterConfig::default(),
            api: ApiConfig::default(),
            queues,
            webhooks: WebhooksConfig::default(),
            spindle: None,
            http: HttpConfig::default(),
            retention: RetentionConfig::default(),
        }
    }
}

/// `[storage]`
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `sqlite://path` (default: `sqlite://<data_dir>/stitch.db`).
    pub url: Option<String>,
}

/// `[retention]`: the data lifecycle. Each key is a duration (`"30d"`,
/// `"12h"`) or `"off"` (keep forever; for `interval`: no background pass).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// A build terminal for longer than this is deleted with its events,
    /// log lines, idempotency key, job-token hash and local state directory.
    pub builds: RetentionSetting,
    /// Events older than this are deleted, oldest first.
    pub events: RetentionSetting,
    /// Dead letters older than this are deleted.
    pub dead_letters: RetentionSetting,
    /// How often the background pruning pass runs.
    pub interval: RetentionSetting,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Self {
            builds: RetentionSetting::After(Duration::from_secs(30 * DAY)),
            events: RetentionSetting::After(Duration::from_secs(7 * DAY)),
            dead_letters: RetentionSetting::After(Duration::from_secs(30 * DAY)),
            interval: RetentionSetting::After(Duration::from_secs(600)),
        }
    }
}

/// A retention key's value: a duration, or `"off"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetentionSetting {
    /// Prune what is older than this (for `interval`: run this often).
    After(Duration),
    /// Never prune this kind (for `interval`: no background pass).
    Off,
}

impl RetentionSetting {
    /// The duration, `None` when off.
    pub fn duration(self) -> Option<Duration> {
        match self {
            RetentionSetting::After(d) => Some(d),
            RetentionSetting::Off => None,
        }
    }
}

impl<'de> Deserialize<'de> for RetentionSetting {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.trim().eq_ignore_ascii_case("off") {
            return Ok(RetentionSetting::Off);
        }
        humantime_serde::re::humantime::parse_duration(text.trim())
            .map(RetentionSetting::After)
            .map_err(|_| {
                serde::de::Error::invalid_value(
                    serde::de::Unexpected::Str(&text),
                    &"\"off\" or a duration",
                )
            })
    }
}

/// `[cluster]`: the stages' partition leases and delivery timeouts. They
/// matter when several processes share one database: a process that dies
/// loses its partitions to the survivors once its `lease` ran out, and the
/// messages it was processing are delivered again after `delivery_timeout`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// A partition lease not renewed within this may be taken by another
    /// process (renewed every third of it).
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// A message handed to a stage and not finished within this is
    /// delivered again (to any process).
    #[serde(with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// How often a stage looks for work published by other processes when
    /// nothing woke it (PostgreSQL pushes wake-ups; MySQL relies on this).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            delivery_timeout: Duration::from_secs(300),
            poll_interval: Duration::from_millis(500),
        }
    }
}

/// `[api]`
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Names of environment variables holding accepted bearer tokens. None:
    /// no authentication, and the server refuses to bind a non-loopback address.
    pub tokens_env: Vec<String>,
    /// How CI jobs reach this server (given to jobs as `STITCH_SERVER`).
    pub public_url: Option<String>,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            tokens_env: Vec::new(),
            public_url: None,
            max_body_bytes: 1024 * 1024,
        }
    }
}

/// `[http]`: what a client may hold of the listener. Slow or idle clients
/// are cut off, the number of open connections is capped, and WebSocket
/// clients may send only small messages.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Time a connection has to send a complete request head, counted from
    /// when it opened or its previous response was sent; so also how long
    /// an idle keep-alive connection stays open.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Time a request has to send its whole body, counted from its head.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Connections open at once (streams and WebSockets included); more are
    /// answered 503 `too_many_connections` and closed.
    pub max_connections: usize,
    /// Largest WebSocket message (and frame) a client may send, in bytes.
    pub ws_max_message_bytes: usize,
}

impl HttpConfig {
    /// The smallest `ws_max_message_bytes`: a control frame (close, ping)
    /// carries up to 125 bytes.
    pub const MIN_WS_MESSAGE_BYTES: usize = 125;
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 4096,
            ws_max_message_bytes: 64 * 1024,
        }
    }
}

/// Which runner a queue uses.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RunnerName {
    Noop,
    #[default]
    Fake,
    Local,
    Buildkite,
    Github,
}

impl From<RunnerName> for stitch_runners::RunnerKind {
    fn from(name: RunnerName) -> Self {
        match name {
            RunnerName::Noop => stitch_runners::RunnerKind::Noop,
            RunnerName::Fake => stitch_runners::RunnerKind::Fake,
            RunnerName::Local => stitch_runners::RunnerKind::Local,
            RunnerName::Buildkite => stitch_runners::RunnerKind::Buildkite,
            RunnerName::Github => stitch_runners::RunnerKind::Github,
        }
    }
}

/// `[queues.NAME]`
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    pub runner: RunnerName,
    /// Builds running at once (local runner); the rest wait as accepted.
    pub concurrency: Option<u32>,
    /// A promised failure fails the build at once and cancels it.
    pub fail_fast: bool,
    /// Still accepted after this → cancel + failed.
    #[serde(with = "humantime_serde")]
    pub accepted_timeout: Option<Duration>,
    /// Not terminal after this → cancel + failed.
    #[serde(with = "humantime_serde")]
    pub max_duration: Option<Duration>,
    pub poll: PollConfig,
    pub retry: RetryConfig,
    pub local: Option<LocalSection>,
    pub fake: Option<FakeSection>,
    pub buildkite: Option<BuildkiteSection>,
    pub github: Option<GithubSection>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            runner: RunnerName::Fake,
            concurrency: None,
            fail_fast: false,
            accepted_timeout: None,
            max_duration: None,
            poll: PollConfig::default(),
            retry: RetryConfig::default(),
            local: None,
            fake: None,
            buildkite: None,
            github: None,
        }
    }
}

/// `poll = { accepted = "5s", running = "2s" }`: delay between status polls.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PollConfig {
    #[serde(with = "humantime_serde")]
    pub accepted: Duration,
    #[serde(with = "humantime_serde")]
    pub running: Duration,
}

impl Default for PollConfig {
    fn default() -> Self {
        Self {
            accepted: Duration::from_secs(5),
            running: Duration::from_secs(2),
        }
    }
}

/// `retry = { max_attempts = 10, initial = "1s", max = "5m" }`: trigger and
/// status errors the runner reports as retryable.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 10,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
        }
    }
}

/// `[queues.NAME.local]`
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LocalSection {
    /// Run with `sh -c` in `workdir`.
    pub command: String,
    /// Shared by every build of the queue. Unset: each build gets a fresh
    /// private directory under the system temporary directory, removed
    /// when it ends.
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// Between SIGTERM and SIGKILL on cancel.
    #[serde(default = "ten_seconds", with = "humantime_serde")]
    pub cancel_grace: Duration,
    /// Extra environment for the command (builds never inherit stitch's
    /// own environment beyond a short allow-list).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Names of stitch's own environment variables handed to builds.
    #[serde(default)]
    pub pass_env: Vec<String>,
    /// Account builds run as (name or uid); needs stitch to run as root.
    #[serde(default)]
    pub user: Option<String>,
    /// Group builds run as (name or gid); default the user's primary group.
    #[serde(default)]
    pub group: Option<String>,
}

fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}

/// `[queues.NAME.fake]`
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FakeSection {
    #[serde(with = "humantime_serde")]
    pub accept_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub run_duration: Duration,
    pub slow_factor: u32,
}

impl Default for FakeSection {
    fn default() -> Self {
        Self {
            accept_delay: Duration::from_secs(1),
            run_duration: Duration::from_secs(5),
            slow_factor: 6,
        }
    }
}

/// `[queues.NAME.buildkite]`: the pipeline a queue's builds run on.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BuildkiteSection {
    /// Organization slug.
    pub org: String,
    /// Pipeline slug.
    pub pipeline: String,
    /// Branch builds run on. Default `main`.
    #[serde(default = "default_branch")]
    pub branch: String,
    /// Commit builds run on. Default `HEAD` (the branch's head).
    #[serde(default = "default_commit")]
    pub commit: String,
    /// Let caller metadata `commit` / `branch` override the two above.
    #[serde(default)]
    pub allow_ref_override: bool,
    /// Environment variable holding the API token (scopes `read_builds`,
    /// `write_builds`, `read_build_logs`).
    #[serde(default = "default_token_env")]
    pub token_env: String,
    /// API root. Default `https://api.buildkite.com`.
    #[serde(default = "default_api_url")]
    pub api_url: String,
    /// The organization's request budget, shared by every queue on the
    /// same `api_url` and `org` (the smallest configured one wins).
    #[serde(default)]
    pub rate_limit: RateLimitSection,
    /// Timeout of one API request.
    #[serde(default = "thirty_seconds", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How often a followed build log is re-read.
    #[serde(default = "two_seconds", with = "humantime_serde")]
    pub log_poll: Duration,
    /// The most log bytes streamed for one build (all its jobs); past it
    /// the log ends with a truncation line. Default 16 MiB.
    #[serde(default = "default_max_log_bytes")]
    pub max_log_bytes: u64,
    /// Webhook verification; with it, polling slows to `webhook.poll`.
    #[serde(default)]
    pub webhook: Option<WebhookSection>,
}

fn default_branch() -> String {
    "main".into()
}

fn default_commit() -> String {
    "HEAD".into()
}

fn default_token_env() -> String {
    "BUILDKITE_API_TOKEN".into()
}

fn default_max_log_bytes() -> u64 {
    stitch_runners::buildkite::runner::DEFAULT_MAX_LOG_BYTES
}

fn default_api_url() -> String {
    "https://api.buildkite.com".into()
}

fn thirty_seconds() -> Duration {
    Duration::from_secs(30)
}

fn two_seconds() -> Duration {
    Duration::from_secs(2)
}

/// `rate_limit = { requests = 200, window = "1m" }`
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSection {
    pub requests: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for RateLimitSection {
    fn default() -> Self {
        Self {
            requests: 200,
            window: Duration::from_secs(60),
        }
    }
}

/// How Buildkite webhooks prove their origin.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WebhookModeName {
    /// `X-Buildkite-Signature` (HMAC-SHA256, replay window).
    #[default]
    Signature,
    /// `X-Buildkite-Token` (clear text).
    Token,
}

/// `[queues.NAME.buildkite.webhook]`
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookSection {
    #[serde(default)]
    pub mode: WebhookModeName,
    /// Environment variable holding the webhook token (the HMAC key in
    /// signature mode).
    pub secret_env: String,
    /// Signature replay window.
    #[serde(default = "five_minutes", with = "humantime_serde")]
    pub max_age: Duration,
    /// The safety-net poll cadence while webhooks deliver the changes.
    #[serde(default = "one_minute", with = "humantime_serde")]
    pub poll: Duration,
}

fn five_minutes() -> Duration {
    Duration::from_secs(300)
}

fn one_minute() -> Duration {
    Duration::from_secs(60)
}

/// `[queues.NAME.github]`: the GitHub Actions workflow a queue's builds
/// run as. Authentication is `token_env`, or a GitHub App (`app_id`,
/// `private_key_file`, `installation_id`), not both.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GithubSection {
    /// Repository owner (user or organization).
    pub owner: String,
    /// Repository name.
    pub repo: String,
    /// Workflow file name (`stitch.yml`) or numeric id.
    pub workflow: String,
    /// Branch or tag the workflow runs on. Default `main`.
    #[serde(rename = "ref", default = "default_branch")]
    pub git_ref: String,
    /// Environment variable holding a token (fine-grained: Actions
    /// read/write on the repository).
    #[serde(default)]
    pub token_env: Option<String>,
    /// GitHub App id (or client id): the JWT issuer.
    #[serde(default)]
    pub app_id: Option<String>,
    /// The App's private key (PEM).
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    /// The App installation on the repository's owner.
    #[serde(default)]
    pub installation_id: Option<u64>,
    /// REST root. Default `https://api.github.com`; GitHub Enterprise
    /// Server: `https://HOST/api/v3`.
    #[serde(default = "default_github_api_url")]
    pub api_url: String,
    /// `X-GitHub-Api-Version`. Default `2022-11-28` (asks for run details
    /// on dispatch); `2026-03-10` always gets them.
    #[serde(default = "default_github_api_version")]
    pub api_version: String,
    /// Extra workflow inputs (strings); stitch's `stitch_*` inputs win.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    /// Most inputs a dispatch may carry: 25 on github.com, 10 on older GHES.
    #[serde(default = "default_max_inputs")]
    pub max_inputs: usize,
    /// Request budget shared by every queue with the same `api_url` and
    /// credentials. Default 5,000 per hour (a token's primary limit).
    #[serde(default = "github_rate_limit")]
    pub rate_limit: RateLimitSection,
    /// Timeout of one API request.
    #[serde(default = "thirty_seconds", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How often a followed build log re-reads the run's jobs.
    #[serde(default = "five_seconds", with = "humantime_serde")]
    pub log_poll: Duration,
    /// How long stitch keeps looking for a dispatched run (by its
    /// `run-name`) before it counts as missing.
    #[serde(default = "ten_seconds", with = "humantime_serde")]
    pub lookup_settle: Duration,
}

fn default_github_api_url() -> String {
    "https://api.github.com".into()
}

fn default_github_api_version() -> String {
    stitch_runners::github::API_VERSION_2022.into()
}

fn default_max_inputs() -> usize {
    25
}

fn github_rate_limit() -> RateLimitSection {
    RateLimitSection {
        requests: 5000,
        window: Duration::from_secs(3600),
    }
}

fn five_seconds() -> Duration {
    Duration::from_secs(5)
}

/// `[webhooks]`
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// `[webhooks.github]`: GitHub webhooks for every `github` queue.
    pub github: Option<GithubWebhookSection>,
}

/// `[webhooks.github]`
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GithubWebhookSection {
    /// Environment variable holding the webhook secret.
    pub secret_env: String,
    /// The safety-net poll cadence of `github` queues while webhooks
    /// deliver the changes.
    #[serde(default = "one_minute", with = "humantime_serde")]
    pub poll: Duration,
}

/// `[spindle]`: stitch as a Tangled spindle, run by the `stitch-spindle`
/// crate on the API's listener.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SpindleConfig {
    /// The spindle's hostname as registered on Tangled (no scheme); repos
    /// name it in their `spindle` field, and service-auth tokens must be
    /// addressed to `did:web:<hostname>`.
    pub hostname: String,
    /// The operator's DID, served by `sh.tangled.owner`.
    pub owner: String,
    /// The queue of workflows without a `stitch: {queue: NAME}` block.
    pub default_queue: String,
    /// Jetstream subscription endpoint.
    #[serde(default = "default_jetstream_url")]
    pub jetstream_url: String,
    /// PLC directory that resolves `did:plc` identities.
    #[serde(default = "default_plc_url")]
    pub plc_url: String,
    /// Dial knots with `ws://` and resolve `did:web` with `http://` (local
    /// development only).
    #[serde(default)]
    pub dev: bool,
}

fn default_jetstream_url() -> String {
    "wss://jetstream1.us-west.bsky.network/subscribe".to_string()
}

fn default_plc_url() -> String {
    "https://plc.directory".to_string()
}
