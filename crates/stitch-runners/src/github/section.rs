//! `[queues.NAME.github]`: the GitHub runner's part of `stitch.toml`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::http_budget::RateLimitSection;

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
    #[serde(rename = "ref", default = "default_ref")]
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
    #[serde(default = "default_api_url")]
    pub api_url: String,
    /// `X-GitHub-Api-Version`. Default `2022-11-28` (asks for run details
    /// on dispatch); `2026-03-10` always gets them.
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// Extra workflow inputs (strings); stitch's `stitch_*` inputs win.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    /// Most inputs a dispatch may carry: 25 on github.com, 10 on older GHES.
    #[serde(default = "default_max_inputs")]
    pub max_inputs: usize,
    /// Request budget shared by every queue with the same `api_url` and
    /// credentials. Default 5,000 per hour (a token's primary limit).
    #[serde(default = "default_rate_limit")]
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

fn default_ref() -> String {
    "main".into()
}

fn default_api_url() -> String {
    "https://api.github.com".into()
}

fn default_api_version() -> String {
    super::API_VERSION_2022.into()
}

fn default_max_inputs() -> usize {
    25
}

fn default_rate_limit() -> RateLimitSection {
    RateLimitSection {
        requests: 5000,
        window: Duration::from_secs(3600),
    }
}

fn thirty_seconds() -> Duration {
    Duration::from_secs(30)
}

fn five_seconds() -> Duration {
    Duration::from_secs(5)
}

fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}
