//! `[queues.NAME.fake]`: the fake runner's part of `stitch.toml`.

use std::time::Duration;

use serde::Deserialize;

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
