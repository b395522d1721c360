//! `stitch.toml`: the service configuration. The service's types and
//! defaults live here, a queue's in [`queue`], each runner's section with
//! its runner (`stitch_runners::*::section`). Loading: [`load`] (the
//! entry), `layers` (defaults, file, `STITCH_*`), `extract` (every type
//! error), `problems` (key paths), `runner_tables` and `validate` (the
//! rules, one module per runner).

mod extract;
mod layers;
pub mod load;
mod problems;
pub mod queue;
mod runner_tables;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use layers::{ENV_PREFIX, ENV_SEPARATOR, TOP_LEVEL_KEYS};
pub use load::{api_tokens, load, LoadOptions};
pub use problems::{render_problems, ConfigError, ConfigProblem};
pub use queue::{PollConfig, QueueConfig, RetryConfig, RunnerSection};
pub use stitch_runners::buildkite::{BuildkiteSection, WebhookModeName, WebhookSection};
pub use stitch_runners::fake::FakeSection;
pub use stitch_runners::github::GithubSection;
pub use stitch_runners::gitlab::{GitlabSection, GitlabWebhookSection};
pub use stitch_runners::http_budget::RateLimitSection;
pub use stitch_runners::jenkins::JenkinsSection;
pub use stitch_runners::local::LocalSection;
pub use stitch_runners::RunnerKind;

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
    /// `[telemetry]`: the log format and the optional OTLP span export.
    pub telemetry: TelemetryConfig,
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
            telemetry: TelemetryConfig::default(),
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

/// What a retention key takes; problems quote it, so that a wrong value
/// names the right form.
pub(crate) const RETENTION_FORM: &str = "a duration like \"30d\", \"12h\", \"10m\", or \"off\"";

impl<'de> Deserialize<'de> for RetentionSetting {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RetentionSetting;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "a string ({RETENTION_FORM})")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
                if text.trim().eq_ignore_ascii_case("off") {
                    return Ok(RetentionSetting::Off);
                }
                humantime_serde::re::humantime::parse_duration(text.trim())
                    .map(RetentionSetting::After)
                    .map_err(|_| {
                        E::invalid_value(serde::de::Unexpected::Str(text), &RETENTION_FORM)
                    })
            }
        }
        deserializer.deserialize_str(Visitor)
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

/// `[telemetry]`: how the service reports what it does.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The form of the log lines (`--log-format` wins).
    pub log_format: LogFormat,
    /// `[telemetry.otlp]`: export every span to an OpenTelemetry
    /// collector. Absent: no export.
    pub otlp: Option<OtlpConfig>,
}

/// The form of the service's log lines.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event, its spans as a prefix.
    #[default]
    Text,
    /// One JSON object per line: the event's fields, its current span and
    /// the span stack.
    Json,
}

/// `[telemetry.otlp]`: OTLP span export over HTTP (protobuf).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector's OTLP/HTTP base URL (`http://collector:4318`); spans
    /// are posted to `<endpoint>/v1/traces`.
    pub endpoint: String,
    /// `service.name` of the exported spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// How long one export request may take.
    #[serde(default = "ten_seconds", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_service_name() -> String {
    "stitch".to_string()
}

fn ten_seconds() -> Duration {
    Duration::from_secs(10)
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

fn one_minute() -> Duration {
    Duration::from_secs(60)
}

fn default_jetstream_url() -> String {
    "wss://jetstream1.us-west.bsky.network/subscribe".to_string()
}

fn default_plc_url() -> String {
    "https://plc.directory".to_string()
}
