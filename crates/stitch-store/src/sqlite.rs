//! The SQLite backend: connection settings, migrations and every SQL
//! statement the store runs on SQLite. A PostgreSQL/MySQL module mirrors this
//! file (its own `migrations/<backend>/` and an [`Ops`] impl).

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};
use stitch_core::{BuildId, BuildStatus};

use crate::error::{Result, StoreError};
use crate::model::{Build, BuildFilter, Event, EventKind, StoredLogLine};
use crate::ops::Ops;

/// How long a writer waits for SQLite's write lock before `SQLITE_BUSY`.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Pool size: WAL lets readers run beside the one writer; more connections
/// than this only queue on the write lock.
const MAX_CONNECTIONS: u32 = 8;

/// `BEGIN IMMEDIATE` takes the write lock up front, so a writer waits on
/// `busy_timeout` instead of failing when a read transaction cannot upgrade.
pub(crate) const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

/// Connection settings for the store database file: created if missing, WAL,
/// `synchronous = NORMAL` (durable across process crashes; WAL keeps it
/// consistent across power loss), foreign keys on, busy timeout 10 s.
pub(crate) fn connect_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(BUSY_TIMEOUT)
}

pub(crate) async fn open_pool(path: &Path) -> Result<SqlitePool> {
    Ok(SqlitePoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .connect_with(connect_options(path))
        .await?)
}

/// Applies the store's migrations (versions 2001+). Other crates' versions in
/// the shared `_sqlx_migrations` table are ignored rather than reported missing.
pub(crate) async fn migrate(pool: &SqlitePool) -> Result<()> {
    let mut migrator = sqlx::migrate!("./migrations/sqlite");
    migrator.set_ignore_missing(true);
    migrator.run(pool).await?;
    Ok(())
}

/// [`Ops`] on one SQLite connection (pooled, or inside a transaction).
pub(crate) struct SqliteOps<'c> {
    conn: &'c mut SqliteConnection,
}

impl<'c> SqliteOps<'c> {
    pub(crate) fn new(conn: &'c mut SqliteConnection) -> Self {
        Self { conn }
    }
}

const BUILD_COLUMNS: &str = "id, queue, status, base, head, caller_metadata, runner_metadata, \
     runner, runner_ref, idempotency_key, cancel_requested, cancel_requested_at, job_token_hash, \
     failure_reason, created_at, updated_at, started_at, finished_at, version";

const EVENT_COLUMNS: &str = "seq, build_id, queue, kind, status, metadata, at";

impl Ops for SqliteOps<'_> {
    async fn load_build_for_update(&mut self, id: &BuildId) -> Result<Option<Build>> {
        // The transaction began IMMEDIATE: it already holds the database write lock.
        self.load_build(id).await
    }

    async fn load_build(&mut self, id: &BuildId) -> Result<Option<Build>> {
        let sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = ?");
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .fetch_optional(&mut *self.conn)
            .await?;
        row.as_ref().map(build_from_row).transpose()
    }

    async fn find_by_idempotency_key(&mut self, queue: &str, key: &str) -> Result<Option<Build>> {
        let sql =
            format!("SELECT {BUILD_COLUMNS} FROM builds WHERE queue = ? AND idempotency_key = ?");
        let row = sqlx::query(&sql)
            .bind(queue)
            .bind(key)
            .fetch_optional(&mut *self.conn)
            .await?;
        row.as_ref().map(build_from_row).transpose()
    }

    async fn insert_build(&mut self, b: &Build) -> Result<bool> {
        let sql = format!(
            "INSERT INTO builds ({BUILD_COLUMNS}) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT DO NOTHING"
        );
        let done = sqlx::query(&sql)
            .bind(b.id.as_str())
            .bind(&b.queue)
            .bind(b.status.as_str())
            .bind(to_json(&b.base)?)
            .bind(to_json(&b.head)?)
            .bind(to_json(&b.caller_metadata)?)
            .bind(to_json(&b.runner_metadata)?)
            .bind(&b.runner)
            .bind(b.runner_ref.as_ref().map(to_json).transpose()?)
            .bind(b.idempotency_key.as_deref())
            .bind(b.cancel_requested)
            .bind(b.cancel_requested_at.map(millis))
            .bind(b.job_token_hash.as_deref())
            .bind(b.failure_reason.as_deref())
            .bind(millis(b.created_at))
            .bind(millis(b.updated_at))
            .bind(b.started_at.map(millis))
            .bind(b.finished_at.map(millis))
            .bind(b.version)
            .execute(&mut *self.conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn update_build(&mut self, b: &Build, expected_version: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE builds SET status = ?, runner_metadata = ?, runner_ref = ?, \
             cancel_requested = ?, cancel_requested_at = ?, job_token_hash = ?, \
             failure_reason = ?, updated_at = ?, started_at = ?, finished_at = ?, version = ? \
             WHERE id = ? AND version = ?",
        )
        .bind(b.status.as_str())
        .bind(to_json(&b.runner_metadata)?)
        .bind(b.runner_ref.as_ref().map(to_json).transpose()?)
        .bind(b.cancel_requested)
        .bind(b.cancel_requested_at.map(millis))
        .bind(b.job_token_hash.as_deref())
        .bind(b.failure_reason.as_deref())
        .bind(millis(b.updated_at))
        .bind(b.started_at.map(millis))
        .bind(b.finished_at.map(millis))
        .bind(b.version)
        .bind(b.id.as_str())
        .bind(expected_version)
        .execute(&mut *self.conn)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn next_event_seq(&mut self) -> Result<u64> {
        // Counter row, not AUTOINCREMENT: rolled back with the transaction,
        // so committed seqs have no gaps.
        let seq: i64 = sqlx::query_scalar(
            "UPDATE event_seq SET next = next + 1 WHERE id = 1 RETURNING next - 1",
        )
        .fetch_one(&mut *self.conn)
        .await?;
        to_u64(seq, "event_seq.next")
    }

    async fn insert_event(&mut self, e: &Event) -> Result<()> {
        sqlx::query(
            "INSERT INTO events (seq, build_id, queue, kind, status, metadata, at) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(to_i64(e.seq, "event seq")?)
        .bind(e.build_id.as_str())
        .bind(&e.queue)
        .bind(e.kind.as_str())
        .bind(e.status.as_str())
        .bind(to_json(&e.metadata)?)
        .bind(millis(e.at))
        .execute(&mut *self.conn)
        .await?;
        Ok(())
    }

    async fn reserve_log_lines(&mut self, id: &BuildId, count: u64) -> Result<Option<u64>> {
        let last: Option<i64> = sqlx::query_scalar(
            "UPDATE builds SET log_line_count = log_line_count + ? WHERE id = ? \
             RETURNING log_line_count",
        )
        .bind(to_i64(count, "log line count")?)
        .bind(id.as_str())
        .fetch_optional(&mut *self.conn)
        .await?;
        last.map(|n| to_u64(n, "builds.log_line_count")).transpose()
    }

    async fn insert_log_line(&mut self, id: &BuildId, line_no: u64, json: &str) -> Result<()> {
        sqlx::query("INSERT INTO log_lines (build_id, line_no, line) VALUES (?, ?, ?)")
            .bind(id.as_str())
            .bind(to_i64(line_no, "log line number")?)
            .bind(json)
            .execute(&mut *self.conn)
            .await?;
        Ok(())
    }

    async fn log_line_count(&mut self, id: &BuildId) -> Result<Option<u64>> {
        let count: Option<i64> =
            sqlx::query_scalar("SELECT log_line_count FROM builds WHERE id = ?")
                .bind(id.as_str())
                .fetch_optional(&mut *self.conn)
                .await?;
        count
            .map(|n| to_u64(n, "builds.log_line_count"))
            .transpose()
    }

    async fn list_builds(
        &mut self,
        filter: &BuildFilter,
        before: Option<&BuildId>,
        limit: u32,
    ) -> Result<Vec<Build>> {
        let mut qb: QueryBuilder<'_, Sqlite> =
            QueryBuilder::new(format!("SELECT {BUILD_COLUMNS} FROM builds WHERE 1 = 1"));
        if let Some(queue) = &filter.queue {
            qb.push(" AND queue = ").push_bind(queue.clone());
        }
        if let Some(status) = filter.status {
            qb.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(before) = before {
            qb.push(" AND id < ").push_bind(before.as_str().to_owned());
        }
        qb.push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from(limit));
        let rows = qb.build().fetch_all(&mut *self.conn).await?;
        rows.iter().map(build_from_row).collect()
    }

    async fn builds_not_terminal(&mut self) -> Result<Vec<Build>> {
        let mut qb: QueryBuilder<'_, Sqlite> = QueryBuilder::new(format!(
            "SELECT {BUILD_COLUMNS} FROM builds WHERE status IN ("
        ));
        let mut open = qb.separated(", ");
        for status in BuildStatus::ALL.into_iter().filter(|s| !s.is_terminal()) {
            open.push_bind(status.as_str());
        }
        qb.push(") ORDER BY id");
        let rows = qb.build().fetch_all(&mut *self.conn).await?;
        rows.iter().map(build_from_row).collect()
    }

    async fn events_after(&mut self, after: u64, limit: u32) -> Result<Vec<Event>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?");
        let rows = sqlx::query(&sql)
            // Beyond i64::MAX nothing can follow.
            .bind(i64::try_from(after).unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(&mut *self.conn)
            .await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn events_for_build(&mut self, id: &BuildId) -> Result<Vec<Event>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE build_id = ? ORDER BY seq");
        let rows = sqlx::query(&sql)
            .bind(id.as_str())
            .fetch_all(&mut *self.conn)
            .await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn latest_seq(&mut self) -> Result<u64> {
        // Every allocated seq below `next` is committed (allocation and insert
        // share a transaction), so this equals MAX(seq) without scanning.
        let next: i64 = sqlx::query_scalar("SELECT next FROM event_seq WHERE id = 1")
            .fetch_one(&mut *self.conn)
            .await?;
        to_u64(next - 1, "event_seq.next")
    }

    async fn ensure_secret(&mut self, name: &str, candidate: &[u8]) -> Result<Vec<u8>> {
        sqlx::query(
            "INSERT INTO server_secrets (name, secret, created_at) VALUES (?, ?, ?) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(candidate)
        .bind(millis(Utc::now()))
        .execute(&mut *self.conn)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT secret FROM server_secrets WHERE name = ?")
                .bind(name)
                .fetch_one(&mut *self.conn)
                .await?,
        )
    }

    async fn log_lines(
        &mut self,
        id: &BuildId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<StoredLogLine>> {
        let rows = sqlx::query(
            "SELECT line_no, line FROM log_lines WHERE build_id = ? AND line_no > ? \
             ORDER BY line_no LIMIT ?",
        )
        .bind(id.as_str())
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&mut *self.conn)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(StoredLogLine {
                    line_no: to_u64(row.try_get("line_no")?, "log_lines.line_no")?,
                    json: row.try_get("line")?,
                })
            })
            .collect()
    }
}

fn build_from_row(row: &SqliteRow) -> Result<Build> {
    let raw_id: String = row.try_get("id")?;
    let id: BuildId = raw_id
        .parse()
        .map_err(|e| StoreError::corrupt("build id", e))?;
    let what = |column: &str| format!("build {id} {column}");
    let status: String = row.try_get("status")?;
    let runner_ref: Option<String> = row.try_get("runner_ref")?;
    Ok(Build {
        status: status
            .parse()
            .map_err(|e| StoreError::corrupt(what("status"), e))?,
        base: from_json(row.try_get("base")?, || what("base"))?,
        head: from_json(row.try_get("head")?, || what("head"))?,
        caller_metadata: from_json(row.try_get("caller_metadata")?, || what("caller_metadata"))?,
        runner_metadata: from_json(row.try_get("runner_metadata")?, || what("runner_metadata"))?,
        runner_ref: runner_ref
            .map(|text| from_json(text, || what("runner_ref")))
            .transpose()?,
        queue: row.try_get("queue")?,
        runner: row.try_get("runner")?,
        idempotency_key: row.try_get("idempotency_key")?,
        cancel_requested: row.try_get("cancel_requested")?,
        cancel_requested_at: opt_time(row.try_get("cancel_requested_at")?, || {
            what("cancel_requested_at")
        })?,
        job_token_hash: row.try_get("job_token_hash")?,
        failure_reason: row.try_get("failure_reason")?,
        created_at: time(row.try_get("created_at")?, || what("created_at"))?,
        updated_at: time(row.try_get("updated_at")?, || what("updated_at"))?,
        started_at: opt_time(row.try_get("started_at")?, || what("started_at"))?,
        finished_at: opt_time(row.try_get("finished_at")?, || what("finished_at"))?,
        version: row.try_get("version")?,
        id,
    })
}

fn event_from_row(row: &SqliteRow) -> Result<Event> {
    let seq = to_u64(row.try_get("seq")?, "events.seq")?;
    let what = |column: &str| format!("event {seq} {column}");
    let build_id: String = row.try_get("build_id")?;
    let kind: String = row.try_get("kind")?;
    let status: String = row.try_get("status")?;
    Ok(Event {
        build_id: build_id
            .parse()
            .map_err(|e| StoreError::corrupt(what("build_id"), e))?,
        queue: row.try_get("queue")?,
        kind: kind
            .parse::<EventKind>()
            .map_err(|e| StoreError::corrupt(what("kind"), e))?,
        status: status
            .parse()
            .map_err(|e| StoreError::corrupt(what("status"), e))?,
        metadata: from_json(row.try_get("metadata")?, || what("metadata"))?,
        at: time(row.try_get("at")?, || what("at"))?,
        seq,
    })
}

fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String> {
    // Only our own plain types (string lists, string maps, JSON values) reach
    // here, and those always serialize; the error path is for completeness.
    serde_json::to_string(value).map_err(|e| StoreError::InvalidInput(e.to_string()))
}

fn from_json<T: DeserializeOwned>(text: String, what: impl FnOnce() -> String) -> Result<T> {
    serde_json::from_str(&text).map_err(|e| StoreError::corrupt(what(), e))
}

fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn time(ms: i64, what: impl FnOnce() -> String) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| StoreError::corrupt(what(), format!("{ms} ms is out of range")))
}

fn opt_time(ms: Option<i64>, what: impl FnOnce() -> String) -> Result<Option<DateTime<Utc>>> {
    ms.map(|ms| time(ms, what)).transpose()
}

fn to_u64(n: i64, what: &str) -> Result<u64> {
    u64::try_from(n).map_err(|_| StoreError::corrupt(what, format!("negative value {n}")))
}

fn to_i64(n: u64, what: &str) -> Result<i64> {
    i64::try_from(n).map_err(|_| StoreError::InvalidInput(format!("{what} {n} is too large")))
}
