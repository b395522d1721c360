//! `[queues.NAME.buildkite]`: the Buildkite runner's part of `stitch.toml`.

use std::time::Duration;

use serde::Deserialize;

use crate::http_budget::RateLimitSection;

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
    super::runner::DEFAULT_MAX_LOG_BYTES
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
