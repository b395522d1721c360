//! `[queues.NAME.jenkins]`: the Jenkins runner's part of `stitch.toml`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::http_budget::RateLimitSection;

/// `[queues.NAME.jenkins]`: the parameterised job a queue's builds run as.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JenkinsSection {
    /// The controller's root URL (`https://ci.example.com`, or
    /// `https://host/jenkins` behind a path prefix).
    pub url: String,
    /// The job's full name: `app`, or `team/app` for a job in folder `team`.
    pub job: String,
    /// The Jenkins user the API token belongs to.
    pub user: String,
    /// Environment variable holding that user's API token.
    #[serde(default = "default_token_env")]
    pub token_env: String,
    /// Extra build parameters (strings); stitch's `STITCH_*` parameters win.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// Request budget shared by every queue on the same `url` and `user`.
    /// Jenkins has no rate limit of its own; this keeps stitch from
    /// crowding the controller. Default 600 requests per minute.
    #[serde(default = "default_rate_limit")]
    pub rate_limit: RateLimitSection,
    /// Timeout of one API request.
    #[serde(default = "thirty_seconds", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How often a followed console log is re-read.
    #[serde(default = "two_seconds", with = "humantime_serde")]
    pub log_poll: Duration,
    /// The most console bytes streamed for one build; past it the log ends
    /// with a truncation line. Default 16 MiB.
    #[serde(default = "default_max_log_bytes")]
    pub max_log_bytes: u64,
    /// How many of the job's newest builds a lookup by `STITCH_BUILD_ID`
    /// reads at most (after a lost trigger answer or a restart).
    #[serde(default = "default_lookup_depth")]
    pub lookup_depth: u32,
}

fn default_token_env() -> String {
    "JENKINS_API_TOKEN".into()
}

fn default_rate_limit() -> RateLimitSection {
    RateLimitSection {
        requests: 600,
        window: Duration::from_secs(60),
    }
}

fn thirty_seconds() -> Duration {
    Duration::from_secs(30)
}

fn two_seconds() -> Duration {
    Duration::from_secs(2)
}

fn default_max_log_bytes() -> u64 {
    super::runner::DEFAULT_MAX_LOG_BYTES
}

fn default_lookup_depth() -> u32 {
    super::runner::DEFAULT_LOOKUP_DEPTH
}
