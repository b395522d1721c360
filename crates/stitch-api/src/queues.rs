//! Queues and dead letters on the wire (`GET /v1/queues`,
//! `GET /v1/dead-letters`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use stitch_core::BuildId;
use utoipa::ToSchema;

/// The answer of `GET /v1/queues`: every configured queue, and the last
/// 24 hours of finished builds across them, hour by hour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueueList {
    /// When the counts were read.
    pub at: DateTime<Utc>,
    /// The latest event `seq` before the counts were read: follow
    /// `/v1/events?after=` it to hear of every change since.
    pub event_seq: u64,
    /// Every configured queue, by name.
    pub queues: Vec<QueueSummary>,
    /// 24 hourly buckets, oldest first, of builds of every queue that
    /// finished in the last 24 hours; the last bucket is the current hour
    /// so far.
    pub last_24h: Vec<HourBucket>,
}

/// One queue: its configuration summary and live counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueueSummary {
    /// The queue's name (`[queues.NAME]`).
    pub name: String,
    /// The runner kind: `noop`, `fake`, `local`, `buildkite`, `github`.
    pub runner: String,
    /// Builds that may run at once; null when the runner sets no limit.
    #[schema(required = true)]
    pub concurrency: Option<u32>,
    /// Builds in each status now (`accepted`, `running`, `unknown`), and
    /// builds that finished in the last 24 hours per outcome.
    pub counts: StatusCounts,
    /// Creation time of the oldest build still `accepted` (waiting for its
    /// runner); null when none waits.
    #[schema(required = true)]
    pub oldest_waiting_at: Option<DateTime<Utc>>,
    /// Seconds since `oldest_waiting_at`; null when none waits.
    #[schema(required = true)]
    pub oldest_waiting_seconds: Option<u64>,
}

/// Builds per status. The non-terminal statuses count builds now; the
/// terminal ones count builds that finished in the last 24 hours.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StatusCounts {
    /// Waiting for the runner.
    pub accepted: u64,
    /// Running at the provider.
    pub running: u64,
    /// In a provider state stitch does not understand.
    pub unknown: u64,
    /// Succeeded in the last 24 hours.
    pub succeeded: u64,
    /// Failed in the last 24 hours.
    pub failed: u64,
    /// Cancelled in the last 24 hours.
    pub cancelled: u64,
}

/// Builds that finished in one hour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HourBucket {
    /// Start of the hour.
    pub start: DateTime<Utc>,
    /// Builds that finished `succeeded`.
    pub succeeded: u64,
    /// Builds that finished `failed`.
    pub failed: u64,
    /// Builds that finished `cancelled`.
    pub cancelled: u64,
    /// Median run time (start on the runner to finish) of the builds that
    /// finished in this hour and had started; null when there were none.
    #[schema(required = true)]
    pub median_duration_ms: Option<u64>,
}

/// A page of `GET /v1/dead-letters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterList {
    /// Oldest first.
    pub dead_letters: Vec<DeadLetterRecord>,
    /// Pass as `after=` for the next page; null on the last page.
    #[schema(required = true)]
    pub next_after: Option<i64>,
}

/// A message a stage gave up on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterRecord {
    /// The dead letter's id, for replay.
    pub id: i64,
    /// The stage topic it was published to: `trigger` or `signal`.
    pub topic: String,
    /// The consumer group that gave up on it.
    pub group: String,
    /// The message's own id.
    pub message_id: String,
    /// The build the message is about, when its partition names one.
    #[schema(required = true)]
    pub build_id: Option<BuildId>,
    /// Deliveries made before it was dead-lettered.
    pub attempts: u32,
    /// Why the stage gave up.
    pub failure: String,
    /// More about the failure, when the stage gave any.
    #[schema(required = true)]
    pub detail: Option<String>,
    /// When it was published.
    pub published_at: DateTime<Utc>,
    /// When it was dead-lettered.
    pub failed_at: DateTime<Utc>,
}
