//! `[queues.NAME.gitlab]`: the GitLab runner's part of `stitch.toml`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::http_budget::RateLimitSection;

/// `[queues.NAME.gitlab]`: the GitLab project a queue's builds run on as
/// pipelines.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GitlabSection {
    /// API root. Default `https://gitlab.com/api/v4`; a self-managed
    /// instance is `https://HOST/api/v4`.
    #[serde(default = "default_api_url")]
    pub api_url: String,
    /// The project: its numeric id or its path (`group/subgroup/name`).
    pub project: String,
    /// Branch or tag pipelines run on. Default `main`.
    #[serde(rename = "ref", default = "default_ref")]
    pub git_ref: String,
    /// Environment variable holding the API token (scope `api`: create,
    /// read and cancel pipelines, read job logs).
    #[serde(default = "default_token_env")]
    pub token_env: String,
    /// Environment variable holding a pipeline trigger token: pipelines
    /// are then created through the trigger endpoint with it, everything
    /// else still uses `token_env`.
    #[serde(default)]
    pub trigger_token_env: Option<String>,
    /// Extra pipeline variables; stitch's `STITCH_*` ones are reserved.
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    /// Request budget shared by every queue with the same `api_url` and
    /// `token_env`. Default 2,000 per minute (GitLab.com's authenticated
    /// API limit).
    #[serde(default = "default_rate_limit")]
    pub rate_limit: RateLimitSection,
    /// Timeout of one API request.
    #[serde(default = "thirty_seconds", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How often a followed build log re-reads the pipeline's jobs.
    #[serde(default = "two_seconds", with = "humantime_serde")]
    pub log_poll: Duration,
    /// How long stitch keeps looking (by pipeline name) for a pipeline
    /// whose create answer was lost before creating again.
    #[serde(default = "two_seconds", with = "humantime_serde")]
    pub lookup_settle: Duration,
    /// The most log bytes streamed for one build (all its jobs); past it
    /// the log ends with a truncation line. Default 16 MiB.
    #[serde(default = "default_max_log_bytes")]
    pub max_log_bytes: u64,
    /// Pipeline Hook verification; with it, polling slows to `webhook.poll`.
    #[serde(default)]
    pub webhook: Option<GitlabWebhookSection>,
}

/// `[queues.NAME.gitlab.webhook]`: GitLab project webhooks (Pipeline
/// events) with a secret token.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GitlabWebhookSection {
    /// Environment variable holding the webhook's secret token (GitLab
    /// sends it as `X-Gitlab-Token`).
    pub secret_env: String,
    /// The safety-net poll cadence while webhooks deliver the changes.
    #[serde(default = "one_minute", with = "humantime_serde")]
    pub poll: Duration,
}

fn default_api_url() -> String {
    "https://gitlab.com/api/v4".into()
}

fn default_ref() -> String {
    "main".into()
}

fn default_token_env() -> String {
    "GITLAB_TOKEN".into()
}

fn default_rate_limit() -> RateLimitSection {
    RateLimitSection {
        requests: 2000,
        window: Duration::from_secs(60),
    }
}

fn default_max_log_bytes() -> u64 {
    super::runner::DEFAULT_MAX_LOG_BYTES
}

fn thirty_seconds() -> Duration {
    Duration::from_secs(30)
}

fn two_seconds() -> Duration {
    Duration::from_secs(2)
}

fn one_minute() -> Duration {
    Duration::from_secs(60)
}
