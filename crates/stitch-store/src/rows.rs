//! Decoding stored rows into [`Build`] and [`Event`], once for every backend,
//! and the value conversions every backend's SQL shares (JSON text columns,
//! epoch-millisecond times, signed integer columns).
//!
//! Each backend only says how to read one column of its row type
//! ([`ReadRow`]); what the columns mean is decided here, so the three
//! backends cannot drift apart.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use stitch_core::BuildId;

use crate::error::{Result, StoreError};
use crate::model::{Build, Event, EventKind, FinishedBuild, FinishedCount, OpenBuildCount};

/// The build columns every backend selects, in this order.
pub(crate) const BUILD_COLUMNS: &str = "id, queue, status, base, head, caller_metadata, \
     runner_metadata, runner, runner_ref, idempotency_key, cancel_requested, \
     cancel_requested_at, job_token_hash, failure_reason, created_at, updated_at, started_at, \
     finished_at, version";

/// The event columns every backend selects.
pub(crate) const EVENT_COLUMNS: &str = "seq, build_id, queue, kind, status, metadata, at";

/// Reads one named column of a result row.
pub(crate) trait ReadRow {
    /// A text column (NULL is an error).
    fn text(&self, column: &str) -> Result<String>;
    /// A nullable text column.
    fn opt_text(&self, column: &str) -> Result<Option<String>>;
    /// An integer column (NULL is an error).
    fn int(&self, column: &str) -> Result<i64>;
    /// A nullable integer column.
    fn opt_int(&self, column: &str) -> Result<Option<i64>>;
    /// A boolean column (stored as a boolean or as 0/1).
    fn flag(&self, column: &str) -> Result<bool>;
    /// A binary column (NULL is an error).
    fn bytes(&self, column: &str) -> Result<Vec<u8>>;
}

impl ReadRow for rusqlite::Row<'_> {
    fn text(&self, column: &str) -> Result<String> {
        Ok(self.get(column)?)
    }
    fn opt_text(&self, column: &str) -> Result<Option<String>> {
        Ok(self.get(column)?)
    }
    fn int(&self, column: &str) -> Result<i64> {
        Ok(self.get(column)?)
    }
    fn opt_int(&self, column: &str) -> Result<Option<i64>> {
        Ok(self.get(column)?)
    }
    fn flag(&self, column: &str) -> Result<bool> {
        Ok(self.get(column)?)
    }
    fn bytes(&self, column: &str) -> Result<Vec<u8>> {
        Ok(self.get(column)?)
    }
}

impl ReadRow for sqlx::postgres::PgRow {
    fn text(&self, column: &str) -> Result<String> {
        Ok(sqlx::Row::try_get(self, column)?)
    }
    fn opt_text(&self, column: &str) -> Result<Option<String>> {
        Ok(sqlx::Row::try_get(self, column)?)
    }
    fn int(&self, column: &str) -> Result<i64> {
        Ok(sqlx::Row::try_get(self, column)?)
    }
    fn opt_int(&self, column: &str) -> Result<Option<i64>> {
        Ok(sqlx::Row::try_get(self, column)?)
    }
    fn flag(&self, column: &str) -> Result<bool> {
        Ok(sqlx::Row::try_get(self, column)?)
    }
    fn bytes(&self, column: &str) -> Result<Vec<u8>> {
        Ok(sqlx::Row::try_get(self, column)?)
    }
}

/// MySQL reports columns with a binary collation (`utf8mb4_bin`, used for
/// exact, case-sensitive names) as binary, which sqlx will not decode as a
/// `String`; their bytes are read and checked as UTF-8 instead.
impl ReadRow for sqlx::mysql::MySqlRow {
    fn text(&self, column: &str) -> Result<String> {
        let raw: Vec<u8> = sqlx::Row::try_get(self, column)?;
        utf8(raw, column)
    }
    fn opt_text(&self, column: &str) -> Result<Option<String>> {
        let raw: Option<Vec<u8>> = sqlx::Row::try_get(self, column)?;
        raw.map(|raw| utf8(raw, column)).transpose()
    }
    fn int(&self, column: &str) -> Result<i64> {
        Ok(sqlx::Row::try_get(self, column)?)
    }
    fn opt_int(&self, column: &str) -> Result<Option<i64>> {
        Ok(sqlx::Row::try_get(self, column)?)
    }
    fn flag(&self, column: &str) -> Result<bool> {
        Ok(sqlx::Row::try_get(self, column)?)
    }
    fn bytes(&self, column: &str) -> Result<Vec<u8>> {
        Ok(sqlx::Row::try_get(self, column)?)
    }
}

fn utf8(raw: Vec<u8>, column: &str) -> Result<String> {
    String::from_utf8(raw).map_err(|e| StoreError::corrupt(column, e))
}

/// A build from a row holding [`BUILD_COLUMNS`].
pub(crate) fn build_from_row(row: &impl ReadRow) -> Result<Build> {
    let raw_id = row.text("id")?;
    let id: BuildId = raw_id
        .parse()
        .map_err(|e| StoreError::corrupt("build id", e))?;
    let what = |column: &str| format!("build {id} {column}");
    let status = row.text("status")?;
    Ok(Build {
        status: status
            .parse()
            .map_err(|e| StoreError::corrupt(what("status"), e))?,
        base: from_json(row.text("base")?, || what("base"))?,
        head: from_json(row.text("head")?, || what("head"))?,
        caller_metadata: from_json(row.text("caller_metadata")?, || what("caller_metadata"))?,
        runner_metadata: from_json(row.text("runner_metadata")?, || what("runner_metadata"))?,
        runner_ref: row
            .opt_text("runner_ref")?
            .map(|text| from_json(text, || what("runner_ref")))
            .transpose()?,
        queue: row.text("queue")?,
        runner: row.text("runner")?,
        idempotency_key: row.opt_text("idempotency_key")?,
        cancel_requested: row.flag("cancel_requested")?,
        cancel_requested_at: opt_time(row.opt_int("cancel_requested_at")?, || {
            what("cancel_requested_at")
        })?,
        job_token_hash: row.opt_text("job_token_hash")?,
        failure_reason: row.opt_text("failure_reason")?,
        created_at: time(row.int("created_at")?, || what("created_at"))?,
        updated_at: time(row.int("updated_at")?, || what("updated_at"))?,
        started_at: opt_time(row.opt_int("started_at")?, || what("started_at"))?,
        finished_at: opt_time(row.opt_int("finished_at")?, || what("finished_at"))?,
        version: row.int("version")?,
        id,
    })
}

/// The columns of an [`OpenBuildCount`] row: `queue, status, n, oldest`.
pub(crate) fn open_count_from_row(row: &impl ReadRow) -> Result<OpenBuildCount> {
    let queue = row.text("queue")?;
    let what = |column: &str| format!("open build count of queue {queue:?} {column}");
    let status = row.text("status")?;
    Ok(OpenBuildCount {
        status: status
            .parse()
            .map_err(|e| StoreError::corrupt(what("status"), e))?,
        count: to_u64(row.int("n")?, "open build count")?,
        oldest_created_at: time(row.int("oldest")?, || what("oldest"))?,
        queue,
    })
}

/// The columns of a [`FinishedBuild`] row: `id, queue, status, started_at,
/// finished_at`.
pub(crate) fn finished_from_row(row: &impl ReadRow) -> Result<FinishedBuild> {
    let id: BuildId = row
        .text("id")?
        .parse()
        .map_err(|e| StoreError::corrupt("finished build id", e))?;
    let queue = row.text("queue")?;
    let what = |column: &str| format!("finished build {id} {column}");
    let status = row.text("status")?;
    Ok(FinishedBuild {
        id: id.clone(),
        status: status
            .parse()
            .map_err(|e| StoreError::corrupt(what("status"), e))?,
        started_at: opt_time(row.opt_int("started_at")?, || what("started_at"))?,
        finished_at: time(row.int("finished_at")?, || what("finished_at"))?,
        queue,
    })
}

/// The SQL of [`crate::Store::open_build_counts`], the same on every backend.
pub(crate) fn open_counts_sql() -> String {
    format!(
        "SELECT queue, status, COUNT(*) AS n, MIN(created_at) AS oldest FROM builds \
         WHERE status IN ({}) GROUP BY queue, status",
        open_statuses_sql()
    )
}

/// One row of [`finished_counts_sql`]: builds of one queue that finished
/// with one status in one hour, and how many of them had started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HourCountRow {
    /// The hour's start, epoch milliseconds.
    pub hour_ms: i64,
    pub count: FinishedCount,
    /// Of `count.count`, those with a `started_at` (a run time).
    pub started: u64,
}

/// Epoch milliseconds in an hour: UTC hours start at multiples of it.
pub(crate) const HOUR_MS: i64 = 3_600_000;

/// The SQL of [`crate::ops::Ops::finished_counts`], the same on every
/// backend (binds: since, until). The hour is `finished_at` rounded down
/// with `%`, which is integer arithmetic on all three (`/` is not on
/// MySQL); the aggregation runs in the database, so only
/// hours × queues × statuses rows come back, not a day of builds.
pub(crate) fn finished_counts_sql() -> String {
    let hour = format!("finished_at - finished_at % {HOUR_MS}");
    format!(
        "SELECT {hour} AS hour_start, queue, status, COUNT(*) AS n, \
         COUNT(started_at) AS started FROM builds \
         WHERE finished_at >= ? AND finished_at < ? GROUP BY {hour}, queue, status"
    )
}

/// The SQL of [`crate::ops::Ops::nth_run_time`], the same on every backend
/// (binds: from, to, nth). The median is read as one row at an offset
/// rather than with a median aggregate: PostgreSQL has
/// `percentile_disc`, MariaDB only a window `MEDIAN`, MySQL and SQLite
/// none; and a window `ROW_NUMBER` over the day was measured slower than
/// one such read per hour (docs/benchmarks.md).
pub(crate) const NTH_RUN_TIME_SQL: &str = "SELECT finished_at - started_at AS d FROM builds \
     WHERE finished_at >= ? AND finished_at < ? AND started_at IS NOT NULL \
     ORDER BY finished_at - started_at LIMIT 1 OFFSET ?";

/// The SQL of [`crate::ops::Ops::finished_by_events`], the same on every
/// backend (binds: after, limit): each event after a seq, with its build's
/// columns when that build has finished (NULL otherwise, and for a build
/// retention deleted). Every event comes back, so a reader can tell a gap
/// (events retention deleted) from events about open builds.
pub(crate) const FINISHED_BY_EVENTS_SQL: &str = "SELECT e.seq AS seq, b.id AS id, \
     b.queue AS queue, b.status AS status, b.started_at AS started_at, \
     b.finished_at AS finished_at FROM events e \
     LEFT JOIN builds b ON b.id = e.build_id AND b.finished_at IS NOT NULL \
     WHERE e.seq > ? ORDER BY e.seq LIMIT ?";

/// A [`FINISHED_BY_EVENTS_SQL`] row: the event's seq and, when its build
/// has finished, the build.
pub(crate) fn finished_by_event_from_row(
    row: &impl ReadRow,
) -> Result<(u64, Option<FinishedBuild>)> {
    let seq = to_u64(row.int("seq")?, "events.seq")?;
    let finished = match row.opt_int("finished_at")? {
        Some(_) => Some(finished_from_row(row)?),
        None => None,
    };
    Ok((seq, finished))
}

/// The columns of a [`finished_counts_sql`] row.
pub(crate) fn hour_count_from_row(row: &impl ReadRow) -> Result<HourCountRow> {
    let queue = row.text("queue")?;
    let what = |column: &str| format!("finished count of queue {queue:?} {column}");
    let status = row.text("status")?;
    Ok(HourCountRow {
        hour_ms: row.int("hour_start")?,
        started: to_u64(row.int("started")?, "finished count started")?,
        count: FinishedCount {
            status: status
                .parse()
                .map_err(|e| StoreError::corrupt(what("status"), e))?,
            count: to_u64(row.int("n")?, "finished count")?,
            queue,
        },
    })
}

/// An event from a row holding [`EVENT_COLUMNS`].
/// Every row of a result as a [`Build`].
pub(crate) fn builds_from_rows(rows: &[impl ReadRow]) -> Result<Vec<Build>> {
    rows.iter().map(build_from_row).collect()
}

/// Every row of a result as an [`Event`].
pub(crate) fn events_from_rows(rows: &[impl ReadRow]) -> Result<Vec<Event>> {
    rows.iter().map(event_from_row).collect()
}

pub(crate) fn event_from_row(row: &impl ReadRow) -> Result<Event> {
    let seq = to_u64(row.int("seq")?, "events.seq")?;
    let what = |column: &str| format!("event {seq} {column}");
    let build_id = row.text("build_id")?;
    let kind = row.text("kind")?;
    let status = row.text("status")?;
    Ok(Event {
        build_id: build_id
            .parse()
            .map_err(|e| StoreError::corrupt(what("build_id"), e))?,
        queue: row.text("queue")?,
        kind: kind
            .parse::<EventKind>()
            .map_err(|e| StoreError::corrupt(what("kind"), e))?,
        status: status
            .parse()
            .map_err(|e| StoreError::corrupt(what("status"), e))?,
        metadata: from_json(row.text("metadata")?, || what("metadata"))?,
        at: time(row.int("at")?, || what("at"))?,
        seq,
    })
}

pub(crate) fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String> {
    // Only our own plain types (string lists, string maps, JSON values) reach
    // here, and those always serialize; the error path is for completeness.
    serde_json::to_string(value).map_err(|e| StoreError::InvalidInput(e.to_string()))
}

pub(crate) fn from_json<T: DeserializeOwned>(
    text: String,
    what: impl FnOnce() -> String,
) -> Result<T> {
    serde_json::from_str(&text).map_err(|e| StoreError::corrupt(what(), e))
}

pub(crate) fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn time(ms: i64, what: impl FnOnce() -> String) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| StoreError::corrupt(what(), format!("{ms} ms is out of range")))
}

fn opt_time(ms: Option<i64>, what: impl FnOnce() -> String) -> Result<Option<DateTime<Utc>>> {
    ms.map(|ms| time(ms, what)).transpose()
}

pub(crate) fn to_u64(n: i64, what: &str) -> Result<u64> {
    u64::try_from(n).map_err(|_| StoreError::corrupt(what, format!("negative value {n}")))
}

pub(crate) fn to_i64(n: u64, what: &str) -> Result<i64> {
    i64::try_from(n).map_err(|_| StoreError::InvalidInput(format!("{what} {n} is too large")))
}

/// A resume position as a signed column value: beyond `i64::MAX` nothing can follow.
pub(crate) fn after_i64(after: u64) -> i64 {
    i64::try_from(after).unwrap_or(i64::MAX)
}

/// The statuses that are not terminal, as a SQL list of literals (constants
/// of our own, never input).
pub(crate) fn open_statuses_sql() -> String {
    stitch_core::BuildStatus::ALL
        .into_iter()
        .filter(|s| !s.is_terminal())
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn serialize_lines<T: serde::Serialize>(lines: &[T]) -> Result<Vec<String>> {
    lines
        .iter()
        .map(|line| {
            serde_json::to_string(line)
                .map_err(|e| StoreError::InvalidInput(format!("log line is not serializable: {e}")))
        })
        .collect()
}
