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
    pub api: ApiConfig,
    /// Build queues by name.
    pub queues: BTreeMap<String, QueueConfig>,
    /// `[spindle]`: serve as a Tangled spindle (see `docs/spindle.md`).
    /// Absent: no spindle.
    pub spindle: Option<SpindleConfig>,
}

impl Default for Config {
    fn default() -> Self {
        let mut queues = BTreeMap::new();
        queues.insert("default".to_string(), QueueConfig::default());
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            data_dir: PathBuf::from("./stitch-data"),
            storage: StorageConfig::default(),
            api: ApiConfig::default(),
            queues,
            spindle: None,
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

/// Which runner a queue uses.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RunnerName {
    Noop,
    #[default]
    Fake,
    Local,
}

impl From<RunnerName> for stitch_runners::RunnerKind {
    fn from(name: RunnerName) -> Self {
        match name {
            RunnerName::Noop => stitch_runners::RunnerKind::Noop,
            RunnerName::Fake => stitch_runners::RunnerKind::Fake,
            RunnerName::Local => stitch_runners::RunnerKind::Local,
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
    #[serde(default = "dot")]
    pub workdir: PathBuf,
    /// Between SIGTERM and SIGKILL on cancel.
    #[serde(default = "ten_seconds", with = "humantime_serde")]
    pub cancel_grace: Duration,
    /// Extra environment for the command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn dot() -> PathBuf {
    PathBuf::from(".")
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
