//! Backend-agnostic value types: what callers put in and get back.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use stitch_core::{BuildId, BuildStatus, RunnerRef};

pub use stitch_api::{BuildRecord, Event, EventKind, Metadata};

/// The runner metadata key whose value becomes the record's `url`.
pub const URL_KEY: &str = "url";
/// The runner metadata key a failure reason is mirrored into.
pub const ERROR_KEY: &str = "error";

/// What a caller supplies to create a build. The build starts `accepted`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBuild {
    /// Minted by the caller before the insert, so it can be stamped on the provider's build.
    pub id: BuildId,
    /// The build queue (configuration binding), e.g. `"app"`.
    pub queue: String,
    /// Name of the runner kind that runs the queue (`"buildkite"`, `"local"`, …).
    pub runner: String,
    /// Change URIs assumed good, in order.
    pub base: Vec<String>,
    /// Change URIs under test, in order.
    pub head: Vec<String>,
    /// Caller metadata, echoed back in the record.
    pub metadata: Metadata,
    /// Same key on the same queue returns the existing build instead of a new one.
    pub idempotency_key: Option<String>,
    /// Hash of the build's job token, when the caller can mint it before the
    /// build exists (it is then stored with the insert, not by a later write).
    pub job_token_hash: Option<String>,
}

/// A stored build. [`Build::record`] is what the API shows of it; the
/// internal fields (version, token hash, cancel time, …) are not part of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Build {
    /// The build's id.
    pub id: BuildId,
    /// Its queue.
    pub queue: String,
    /// Its current status.
    pub status: BuildStatus,
    /// Change URIs assumed good.
    pub base: Vec<String>,
    /// Change URIs under test.
    pub head: Vec<String>,
    /// Metadata the caller supplied at creation (immutable).
    pub caller_metadata: Metadata,
    /// Metadata the runner and stages reported (`url`, `error`, …).
    pub runner_metadata: Metadata,
    /// Name of the runner kind for this build's queue.
    pub runner: String,
    /// The provider's identity of the build, opaque to the store; a cache.
    pub runner_ref: Option<RunnerRef>,
    /// The idempotency key it was created with, if any.
    pub idempotency_key: Option<String>,
    /// Whether cancellation was requested.
    pub cancel_requested: bool,
    /// When cancellation was first requested.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// Hash of the build-scoped job token, if one was issued.
    pub job_token_hash: Option<String>,
    /// Why the build failed or was cancelled by stitch, if it says.
    pub failure_reason: Option<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Time of the last write to the row.
    pub updated_at: DateTime<Utc>,
    /// First time it was recorded `running`.
    pub started_at: Option<DateTime<Utc>>,
    /// Time it became terminal.
    pub finished_at: Option<DateTime<Utc>>,
    /// Incremented on every write; the optimistic-concurrency token.
    pub version: i64,
}

impl Build {
    /// The record view of metadata: caller keys overlaid with runner keys
    /// (the runner's facts about the build win on a clash).
    pub fn metadata(&self) -> Metadata {
        let mut merged = self.caller_metadata.clone();
        merged.extend(
            self.runner_metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        merged
    }

    /// The provider's web URL (runner metadata key `url`).
    pub fn url(&self) -> Option<&str> {
        self.runner_metadata.get(URL_KEY).map(String::as_str)
    }

    /// The API record view of this build.
    pub fn record(&self) -> BuildRecord {
        BuildRecord {
            id: self.id.clone(),
            queue: self.queue.clone(),
            status: self.status,
            base: self.base.clone(),
            head: self.head.clone(),
            metadata: self.metadata(),
            runner_ref: self.runner_ref.clone(),
            created_at: self.created_at,
            updated_at: self.updated_at,
            finished_at: self.finished_at,
            url: self.url().map(str::to_owned),
            cancel_requested: self.cancel_requested,
        }
    }
}

/// What [`crate::Store::create_build`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum CreateOutcome {
    /// A new build was inserted (the API answers 202).
    Created(Build),
    /// The (queue, idempotency key) pair, or the id, was already taken by this
    /// build; nothing was written (the API answers 200).
    Existing(Build),
}

impl CreateOutcome {
    /// The build, new or existing.
    pub fn build(&self) -> &Build {
        match self {
            CreateOutcome::Created(b) | CreateOutcome::Existing(b) => b,
        }
    }

    /// The build, new or existing, by value.
    pub fn into_build(self) -> Build {
        match self {
            CreateOutcome::Created(b) | CreateOutcome::Existing(b) => b,
        }
    }

    /// Whether a new build was inserted.
    pub fn is_created(&self) -> bool {
        matches!(self, CreateOutcome::Created(_))
    }
}

/// What [`crate::Store::request_cancel`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct CancelOutcome {
    /// The build after the request.
    pub build: Build,
    /// False when cancel had already been requested or the build is terminal.
    pub newly_requested: bool,
}

/// How many builds of one queue are in one non-terminal status, and when
/// the oldest of them was created ([`crate::Store::open_build_counts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenBuildCount {
    /// The build queue.
    pub queue: String,
    /// A non-terminal status (`accepted`, `running`, `unknown`).
    pub status: BuildStatus,
    /// Builds of the queue in that status.
    pub count: u64,
    /// Creation time of the oldest of them.
    pub oldest_created_at: DateTime<Utc>,
}

/// A build that finished, reduced to what the overview's chart needs
/// ([`crate::Store::finished_since`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedBuild {
    /// The build.
    pub id: BuildId,
    /// The build queue.
    pub queue: String,
    /// Its terminal status.
    pub status: BuildStatus,
    /// When it was handed to its runner; `None` when it never was (a build
    /// cancelled or failed while accepted).
    pub started_at: Option<DateTime<Utc>>,
    /// When it became terminal.
    pub finished_at: DateTime<Utc>,
}

/// One hour of finished builds, counted in the database
/// ([`crate::Store::finished_hours`]): the overview's chart and its
/// per-queue totals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedHour {
    /// The start of the hour (UTC, on the hour); builds whose `finished_at`
    /// is in `[start, start + 1 h)`.
    pub start: DateTime<Utc>,
    /// Per queue and terminal status, the builds that finished in the hour;
    /// queues and statuses without builds are absent.
    pub counts: Vec<FinishedCount>,
    /// The median run time (`finished_at - started_at`, the lower middle
    /// one of an even count, never below 0) of the builds that finished in
    /// the hour after starting; `None` when none started.
    pub median_duration_ms: Option<u64>,
}

/// How many builds of one queue finished with one status in a
/// [`FinishedHour`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedCount {
    /// The build queue.
    pub queue: String,
    /// A terminal status.
    pub status: BuildStatus,
    /// Builds of the queue that finished with it in the hour.
    pub count: u64,
}

/// Filter and page size for [`crate::Store::list_builds`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildFilter {
    /// Only builds of this queue.
    pub queue: Option<String>,
    /// Only builds with this status.
    pub status: Option<BuildStatus>,
    /// Page size; clamped to `1..=`[`BuildFilter::MAX_LIMIT`].
    pub limit: u32,
}

impl BuildFilter {
    /// Page size when the caller gives none.
    pub const DEFAULT_LIMIT: u32 = 50;
    /// Largest page served.
    pub const MAX_LIMIT: u32 = 1000;

    pub(crate) fn effective_limit(&self) -> u32 {
        self.limit.clamp(1, Self::MAX_LIMIT)
    }

    /// The listing statement for this filter and cursor, with `?`
    /// placeholders, and the text values to bind in order (the page size is
    /// bound last). Only the filters present appear: written as
    /// `(? IS NULL OR queue = ?)`, one statement served every combination
    /// but hid the `(queue, status, id)` index from the planner, so a
    /// selective filter walked every build (p50 77 ms, p99 218 ms at
    /// 100,000 builds on SQLite).
    pub(crate) fn listing<'a>(
        &'a self,
        columns: &str,
        before: Option<&'a BuildId>,
    ) -> (String, Vec<&'a str>) {
        let mut conditions = Vec::new();
        let mut values = Vec::new();
        if let Some(queue) = self.queue.as_deref() {
            conditions.push("queue = ?");
            values.push(queue);
        }
        if let Some(status) = self.status {
            conditions.push("status = ?");
            values.push(status.as_str());
        }
        if let Some(before) = before {
            conditions.push("id < ?");
            values.push(before.as_str());
        }
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        };
        (
            format!("SELECT {columns} FROM builds{filter} ORDER BY id DESC LIMIT ?"),
            values,
        )
    }
}

impl Default for BuildFilter {
    fn default() -> Self {
        Self {
            queue: None,
            status: None,
            limit: Self::DEFAULT_LIMIT,
        }
    }
}

/// Opaque position in a newest-first build listing. Renders as a string for
/// the `cursor=` query parameter and parses back from it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cursor(pub(crate) BuildId);

/// A `cursor=` value that this store did not hand out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cursor {0:?}")]
pub struct InvalidCursor(pub String);

impl Cursor {
    /// The id of the last build of the previous page: what the API sends
    /// as `next_cursor`.
    pub fn into_build_id(self) -> BuildId {
        self.0
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The id of the last build on the previous page; ids are time-ordered and unique.
        f.write_str(self.0.as_str())
    }
}

impl FromStr for Cursor {
    type Err = InvalidCursor;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<BuildId>()
            .map(Cursor)
            .map_err(|_| InvalidCursor(s.to_owned()))
    }
}

impl TryFrom<String> for Cursor {
    type Error = InvalidCursor;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Cursor> for String {
    fn from(c: Cursor) -> String {
        c.0.into()
    }
}

/// One stored log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLogLine {
    /// 1-based, per build, gapless within a build.
    pub line_no: u64,
    /// The line as the JSON text it was appended as (a `LogLine` frame).
    pub json: String,
}

impl StoredLogLine {
    /// Decodes the stored JSON into the caller's line type.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.json)
    }
}

/// Current wall-clock time at the millisecond precision the store keeps, so a
/// returned value equals the one read back later.
pub(crate) fn now() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        let id = BuildId::new();
        let c = Cursor(id.clone());
        assert_eq!(c.to_string().parse::<Cursor>().unwrap(), c);
        assert!("nope".parse::<Cursor>().is_err());
        assert_eq!(String::from(c), id.to_string());
    }

    #[test]
    fn filter_limit_is_clamped() {
        let mut f = BuildFilter {
            limit: 0,
            ..BuildFilter::default()
        };
        assert_eq!(f.effective_limit(), 1);
        f.limit = 1_000_000;
        assert_eq!(f.effective_limit(), BuildFilter::MAX_LIMIT);
    }
}

/// An event a write transaction will append when it commits. Its sequence
/// number is allocated then, as the transaction's last statements (ADR 0016),
/// so a write holds the database-wide event counter only for its commit.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NewEvent {
    pub build_id: BuildId,
    pub queue: String,
    pub kind: EventKind,
    pub status: BuildStatus,
    pub metadata: Metadata,
    pub at: DateTime<Utc>,
}

impl NewEvent {
    /// An event snapshotting `build` as it is now.
    pub(crate) fn of(build: &Build, kind: EventKind, at: DateTime<Utc>) -> Self {
        Self {
            build_id: build.id.clone(),
            queue: build.queue.clone(),
            kind,
            status: build.status,
            metadata: build.metadata(),
            at,
        }
    }

    /// The event under its allocated sequence number.
    pub(crate) fn with_seq(self, seq: u64) -> Event {
        Event {
            seq,
            build_id: self.build_id,
            queue: self.queue,
            kind: self.kind,
            status: self.status,
            metadata: self.metadata,
            at: self.at,
        }
    }
}
