//! The event log on the wire (`GET /v1/events`).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use stitch_core::{BuildId, BuildStatus};
use utoipa::ToSchema;

/// What an event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The build's status (or its metadata) changed.
    Status,
    /// A running job promised the build will fail.
    Failing,
}

impl EventKind {
    /// The stable wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Status => "status",
            EventKind::Failing => "failing",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "status" => Ok(EventKind::Status),
            "failing" => Ok(EventKind::Failing),
            other => Err(format!("unknown event kind {other:?}")),
        }
    }
}

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Gapless, database-wide sequence number, starting at 1; resume after
    /// it with `after=` or `Last-Event-ID`.
    pub seq: u64,
    /// The build it is about.
    pub build_id: BuildId,
    /// That build's queue.
    pub queue: String,
    /// Status change or promised failure.
    pub kind: EventKind,
    /// The build's status after the change.
    pub status: BuildStatus,
    /// The build's merged (caller + runner) metadata after the change.
    pub metadata: BTreeMap<String, String>,
    /// When it was recorded.
    pub at: DateTime<Utc>,
}
