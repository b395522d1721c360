//! The primitive operations a SQL backend provides. The rules (idempotency,
//! terminal write-once, no-op detection, event append) live once in
//! [`crate::logic`] on top of this trait; a PostgreSQL or MySQL module mirrors
//! [`crate::sqlite`] by implementing it for its own connection type.
//!
//! Every method runs on one connection; the write methods are only ever called
//! inside a write transaction.

use stitch_core::BuildId;

use crate::error::Result;
use crate::model::{
    Build, BuildFilter, Event, FinishedBuild, NewEvent, OpenBuildCount, StoredLogLine,
};
use crate::rows::HourCountRow;

/// Primitive reads and writes of one backend, on one connection.
pub(crate) trait Ops {
    /// Loads a build. Inside a write transaction the backend must also make
    /// sure no other writer can change the row until commit (SQLite: the
    /// transaction began IMMEDIATE and holds the write lock; PostgreSQL/MySQL:
    /// `SELECT … FOR UPDATE`).
    async fn load_build_for_update(&mut self, id: &BuildId) -> Result<Option<Build>>;

    /// Loads a build without locking it.
    async fn load_build(&mut self, id: &BuildId) -> Result<Option<Build>>;

    /// Finds the build holding `(queue, key)`.
    async fn find_by_idempotency_key(&mut self, queue: &str, key: &str) -> Result<Option<Build>>;

    /// Inserts a build; `Ok(false)` when the id or `(queue, idempotency_key)`
    /// is already taken (nothing written, transaction still usable).
    async fn insert_build(&mut self, build: &Build) -> Result<bool>;

    /// Writes every mutable column of `build` (including its `version`) where
    /// the stored version is `expected_version`; `Ok(false)` when no row matched.
    async fn update_build(&mut self, build: &Build, expected_version: i64) -> Result<bool>;

    /// Appends a transaction's events, as its last statements before
    /// `COMMIT`. SQLite, whose write lock is held anyway, takes the event
    /// counter, numbers the events in order and inserts them: the counter
    /// held to the commit keeps seqs gapless and in commit order (ADR 0016).
    /// The server backends leave them for the sequencing pass (ADR 0020).
    async fn append_events(&mut self, staged: Vec<NewEvent>) -> Result<()>;

    /// Reserves `count` log line numbers for a build and returns the last one
    /// reserved (the first is `last - count + 1`); `None` for an unknown build.
    async fn reserve_log_lines(&mut self, id: &BuildId, count: u64) -> Result<Option<u64>>;

    /// Inserts one log line under a reserved number.
    async fn insert_log_line(&mut self, id: &BuildId, line_no: u64, json: &str) -> Result<()>;

    /// Number of log lines of a build; `None` for an unknown build.
    async fn log_line_count(&mut self, id: &BuildId) -> Result<Option<u64>>;

    /// Up to `limit` builds matching `filter` with ids below `before`, newest first.
    async fn list_builds(
        &mut self,
        filter: &BuildFilter,
        before: Option<&BuildId>,
        limit: u32,
    ) -> Result<Vec<Build>>;

    /// Every build whose status is not terminal, oldest first.
    async fn builds_not_terminal(&mut self) -> Result<Vec<Build>>;

    /// Per queue and non-terminal status: how many builds, and the oldest's
    /// creation time.
    async fn open_build_counts(&mut self) -> Result<Vec<OpenBuildCount>>;

    /// Up to `limit` builds that finished at or after `since_ms` (epoch
    /// milliseconds), in no particular order.
    async fn finished_since(&mut self, since_ms: i64, limit: u32) -> Result<Vec<FinishedBuild>>;

    /// Per hour, queue and status, the builds that finished in
    /// `[since_ms, until_ms)` (epoch milliseconds), counted by the
    /// database ([`crate::rows::finished_counts_sql`]).
    async fn finished_counts(&mut self, since_ms: i64, until_ms: i64) -> Result<Vec<HourCountRow>>;

    /// The `nth` (from 0) shortest run time in milliseconds of the builds
    /// that finished in `[from_ms, to_ms)` after starting
    /// ([`crate::rows::NTH_RUN_TIME_SQL`]); `None` past the last.
    async fn nth_run_time(&mut self, from_ms: i64, to_ms: i64, nth: u64) -> Result<Option<i64>>;

    /// Up to `limit` events with `seq > after`, in seq order, each as its
    /// seq and, when its build has finished, that build
    /// ([`crate::rows::FINISHED_BY_EVENTS_SQL`]).
    async fn finished_by_events(
        &mut self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<(u64, Option<FinishedBuild>)>>;

    /// Up to `limit` events with `seq > after`, in seq order.
    async fn events_after(&mut self, after: u64, limit: u32) -> Result<Vec<Event>>;

    /// Every event of one build, in seq order.
    async fn events_for_build(&mut self, id: &BuildId) -> Result<Vec<Event>>;

    /// The highest committed seq, 0 when the log is empty.
    async fn latest_seq(&mut self) -> Result<u64>;

    /// Stores `candidate` as secret `name` unless one is stored already,
    /// and returns the stored secret (the first ever stored wins).
    async fn ensure_secret(&mut self, name: &str, candidate: &[u8]) -> Result<Vec<u8>>;

    /// Up to `limit` log lines with `line_no > after`, in order.
    async fn log_lines(
        &mut self,
        id: &BuildId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<StoredLogLine>>;
}
