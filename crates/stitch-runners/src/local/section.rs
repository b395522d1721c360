//! `[queues.NAME.local]`: the local runner's part of `stitch.toml`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

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
