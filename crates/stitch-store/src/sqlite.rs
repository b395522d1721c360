//! The SQLite backend: connection settings, migrations and every SQL
//! statement the store runs on SQLite. A PostgreSQL/MySQL module mirrors this
//! file (its own `migrations/<backend>/` and an [`Ops`] impl).

use std::path::Path;
use std::time::Duration;

use chrono::Utc;
use rusqlite::OptionalExtension;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use stitch_core::BuildId;
use stitch_mq::raw_sqlite::RawSqlite;

use crate::error::{Result, StoreError};
use crate::model::{
    Build, BuildFilter, Event, FinishedBuild, NewEvent, OpenBuildCount, StoredLogLine,
};
use crate::ops::Ops;
use crate::rows::{
    after_i64, build_from_row, event_from_row, finished_by_event_from_row, finished_counts_sql,
    finished_from_row, hour_count_from_row, millis, open_count_from_row, open_counts_sql,
    open_statuses_sql, to_i64, to_json, to_u64, HourCountRow, BUILD_COLUMNS, EVENT_COLUMNS,
    FINISHED_BY_EVENTS_SQL, NTH_RUN_TIME_SQL,
};

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
        // A new file only (see stitch_mq::sqlite::connect_options).
        .auto_vacuum(sqlx::sqlite::SqliteAutoVacuum::Incremental)
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

/// A write transaction run on a pooled connection's raw handle: `BEGIN
/// IMMEDIATE`, every statement and `COMMIT` execute synchronously on the
/// calling thread, so a whole transaction costs one hand-off to sqlx's worker
/// (to borrow the handle) instead of one per statement plus two. That matters
/// because the transaction runs under the process's single writer lock: every
/// hand-off inside it is time no other writer can use.
///
/// `BEGIN IMMEDIATE` can only wait (up to the busy timeout) on another
/// process's writer; writers inside this process queue on the writer lock
/// before they get here.
pub(crate) struct SqliteWriteTx {
    conn: RawSqlite,
    finished: bool,
}

impl std::fmt::Debug for SqliteWriteTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteWriteTx")
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl SqliteWriteTx {
    pub(crate) async fn begin(pool: &SqlitePool) -> Result<Self> {
        let conn = RawSqlite::acquire::<StoreError>(pool).await?;
        conn.handle().execute_batch(BEGIN_WRITE)?;
        Ok(Self {
            conn,
            finished: false,
        })
    }

    /// The raw connection, for statements that run synchronously.
    pub(crate) fn handle(&self) -> &rusqlite::Connection {
        self.conn.handle()
    }

    /// The sqlx connection, for another crate's async statements in this
    /// transaction.
    pub(crate) fn conn(&mut self) -> &mut SqliteConnection {
        self.conn.sqlx()
    }

    pub(crate) fn commit(mut self) -> Result<()> {
        self.finished = true;
        if let Err(e) = self.conn.handle().execute_batch("COMMIT") {
            self.abandon();
            return Err(e.into());
        }
        Ok(())
    }

    pub(crate) fn rollback(mut self) -> Result<()> {
        self.finished = true;
        let rolled_back = self.conn.handle().execute_batch("ROLLBACK");
        if rolled_back.is_err() {
            self.abandon();
        }
        Ok(rolled_back?)
    }

    /// Makes sure the connection does not go back to the pool inside a
    /// transaction: roll back, and if that does not end it, close it.
    fn abandon(&mut self) {
        if !self.conn.handle().is_autocommit() {
            let _ = self.conn.handle().execute_batch("ROLLBACK");
        }
        if !self.conn.handle().is_autocommit() {
            self.conn.close_on_drop();
        }
    }
}

impl Drop for SqliteWriteTx {
    fn drop(&mut self) {
        if !self.finished {
            self.abandon();
        }
    }
}

/// Drives a store operation over [`SqliteOps`] to completion in one poll.
/// `SqliteOps` never awaits (its statements run synchronously on the raw
/// handle), so the rules in `logic` — async to serve PostgreSQL/MySQL too —
/// finish at once here; a pending poll would be a bug in this module.
pub(crate) fn complete<T>(op: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    use futures::FutureExt;
    op.now_or_never().unwrap_or_else(|| {
        Err(StoreError::Internal(
            "a SQLite store operation tried to wait".into(),
        ))
    })
}

/// [`Ops`] on one SQLite connection's raw handle (pooled, or inside a
/// transaction). Every method completes without awaiting.
pub(crate) struct SqliteOps<'c> {
    conn: &'c rusqlite::Connection,
}

impl<'c> SqliteOps<'c> {
    pub(crate) fn new(conn: &'c rusqlite::Connection) -> Self {
        Self { conn }
    }

    pub(crate) fn conn(&self) -> &'c rusqlite::Connection {
        self.conn
    }

    fn builds(&self, sql: &str, params: impl rusqlite::Params) -> Result<Vec<Build>> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(build_from_row(row)?);
        }
        Ok(out)
    }

    fn one_build(&self, sql: &str, params: impl rusqlite::Params) -> Result<Option<Build>> {
        Ok(self.builds(sql, params)?.into_iter().next())
    }

    fn events(&self, sql: &str, params: impl rusqlite::Params) -> Result<Vec<Event>> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(event_from_row(row)?);
        }
        Ok(out)
    }
}

impl SqliteOps<'_> {
    /// Takes `count` consecutive event seqs; the first.
    fn allocate_event_seqs(&mut self, count: u64) -> Result<u64> {
        // Counter row, not AUTOINCREMENT: rolled back with the transaction,
        // so committed seqs have no gaps.
        let mut stmt = self.conn.prepare_cached(
            "UPDATE event_seq SET next = next + ?1 WHERE id = 1 RETURNING next - ?1",
        )?;
        let first: i64 = stmt.query_row([to_i64(count, "event count")?], |row| row.get(0))?;
        to_u64(first, "event_seq.next")
    }

    /// Inserts numbered events, in order.
    fn insert_events(&mut self, events: &[Event]) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO events (seq, build_id, queue, kind, status, metadata, at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for e in events {
            stmt.execute(rusqlite::params![
                to_i64(e.seq, "event seq")?,
                e.build_id.as_str(),
                &e.queue,
                e.kind.as_str(),
                e.status.as_str(),
                to_json(&e.metadata)?,
                millis(e.at),
            ])?;
        }
        Ok(())
    }
}

impl Ops for SqliteOps<'_> {
    async fn load_build_for_update(&mut self, id: &BuildId) -> Result<Option<Build>> {
        // The transaction began IMMEDIATE: it already holds the database write lock.
        self.load_build(id).await
    }

    async fn load_build(&mut self, id: &BuildId) -> Result<Option<Build>> {
        let sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = ?1");
        self.one_build(&sql, [id.as_str()])
    }

    async fn find_by_idempotency_key(&mut self, queue: &str, key: &str) -> Result<Option<Build>> {
        let sql =
            format!("SELECT {BUILD_COLUMNS} FROM builds WHERE queue = ?1 AND idempotency_key = ?2");
        self.one_build(&sql, [queue, key])
    }

    async fn insert_build(&mut self, b: &Build) -> Result<bool> {
        let sql = format!(
            "INSERT INTO builds ({BUILD_COLUMNS}) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19) \
             ON CONFLICT DO NOTHING"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let changed = stmt.execute(rusqlite::params![
            b.id.as_str(),
            &b.queue,
            b.status.as_str(),
            to_json(&b.base)?,
            to_json(&b.head)?,
            to_json(&b.caller_metadata)?,
            to_json(&b.runner_metadata)?,
            &b.runner,
            b.runner_ref.as_ref().map(to_json).transpose()?,
            b.idempotency_key.as_deref(),
            b.cancel_requested,
            b.cancel_requested_at.map(millis),
            b.job_token_hash.as_deref(),
            b.failure_reason.as_deref(),
            millis(b.created_at),
            millis(b.updated_at),
            b.started_at.map(millis),
            b.finished_at.map(millis),
            b.version,
        ])?;
        Ok(changed == 1)
    }

    async fn update_build(&mut self, b: &Build, expected_version: i64) -> Result<bool> {
        let mut stmt = self.conn.prepare_cached(
            "UPDATE builds SET status = ?1, runner_metadata = ?2, runner_ref = ?3, \
             cancel_requested = ?4, cancel_requested_at = ?5, job_token_hash = ?6, \
             failure_reason = ?7, updated_at = ?8, started_at = ?9, finished_at = ?10, \
             version = ?11 WHERE id = ?12 AND version = ?13",
        )?;
        let changed = stmt.execute(rusqlite::params![
            b.status.as_str(),
            to_json(&b.runner_metadata)?,
            b.runner_ref.as_ref().map(to_json).transpose()?,
            b.cancel_requested,
            b.cancel_requested_at.map(millis),
            b.job_token_hash.as_deref(),
            b.failure_reason.as_deref(),
            millis(b.updated_at),
            b.started_at.map(millis),
            b.finished_at.map(millis),
            b.version,
            b.id.as_str(),
            expected_version,
        ])?;
        Ok(changed == 1)
    }

    async fn append_events(&mut self, staged: Vec<NewEvent>) -> Result<()> {
        let count = u64::try_from(staged.len())
            .map_err(|_| StoreError::InvalidInput("too many events in one transaction".into()))?;
        let first = self.allocate_event_seqs(count)?;
        let events: Vec<_> = (first..)
            .zip(staged)
            .map(|(seq, event)| event.with_seq(seq))
            .collect();
        self.insert_events(&events)
    }

    async fn reserve_log_lines(&mut self, id: &BuildId, count: u64) -> Result<Option<u64>> {
        let mut stmt = self.conn.prepare_cached(
            "UPDATE builds SET log_line_count = log_line_count + ?1 WHERE id = ?2 \
             RETURNING log_line_count",
        )?;
        let last: Option<i64> = stmt
            .query_row(
                rusqlite::params![to_i64(count, "log line count")?, id.as_str()],
                |row| row.get(0),
            )
            .optional()?;
        last.map(|n| to_u64(n, "builds.log_line_count")).transpose()
    }

    async fn insert_log_line(&mut self, id: &BuildId, line_no: u64, json: &str) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO log_lines (build_id, line_no, line) VALUES (?1, ?2, ?3)",
        )?;
        stmt.execute(rusqlite::params![
            id.as_str(),
            to_i64(line_no, "log line number")?,
            json
        ])?;
        Ok(())
    }

    async fn log_line_count(&mut self, id: &BuildId) -> Result<Option<u64>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT log_line_count FROM builds WHERE id = ?1")?;
        let count: Option<i64> = stmt.query_row([id.as_str()], |row| row.get(0)).optional()?;
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
        let (sql, values) = filter.listing(BUILD_COLUMNS, before);
        let params = values
            .into_iter()
            .map(|v| rusqlite::types::Value::Text(v.to_string()))
            .chain([rusqlite::types::Value::Integer(i64::from(limit))]);
        self.builds(&sql, rusqlite::params_from_iter(params))
    }

    async fn builds_not_terminal(&mut self) -> Result<Vec<Build>> {
        let sql = format!(
            "SELECT {BUILD_COLUMNS} FROM builds WHERE status IN ({}) ORDER BY id",
            open_statuses_sql()
        );
        self.builds(&sql, [])
    }

    async fn open_build_counts(&mut self) -> Result<Vec<OpenBuildCount>> {
        let mut stmt = self.conn.prepare_cached(&open_counts_sql())?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(open_count_from_row(row)?);
        }
        Ok(out)
    }

    async fn finished_since(&mut self, since_ms: i64, limit: u32) -> Result<Vec<FinishedBuild>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, queue, status, started_at, finished_at FROM builds \
             WHERE finished_at >= ?1 LIMIT ?2",
        )?;
        let mut rows = stmt.query(rusqlite::params![since_ms, i64::from(limit)])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(finished_from_row(row)?);
        }
        Ok(out)
    }

    async fn finished_counts(&mut self, since_ms: i64, until_ms: i64) -> Result<Vec<HourCountRow>> {
        let mut stmt = self.conn.prepare_cached(&finished_counts_sql())?;
        let mut rows = stmt.query(rusqlite::params![since_ms, until_ms])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(hour_count_from_row(row)?);
        }
        Ok(out)
    }

    async fn nth_run_time(&mut self, from_ms: i64, to_ms: i64, nth: u64) -> Result<Option<i64>> {
        let mut stmt = self.conn.prepare_cached(NTH_RUN_TIME_SQL)?;
        let nth = to_i64(nth, "offset")?;
        Ok(stmt
            .query_row(rusqlite::params![from_ms, to_ms, nth], |row| row.get(0))
            .optional()?)
    }

    async fn finished_by_events(
        &mut self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<(u64, Option<FinishedBuild>)>> {
        let mut stmt = self.conn.prepare_cached(FINISHED_BY_EVENTS_SQL)?;
        let mut rows = stmt.query(rusqlite::params![after_i64(after), i64::from(limit)])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(finished_by_event_from_row(row)?);
        }
        Ok(out)
    }

    async fn events_after(&mut self, after: u64, limit: u32) -> Result<Vec<Event>> {
        let sql =
            format!("SELECT {EVENT_COLUMNS} FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2");
        self.events(&sql, rusqlite::params![after_i64(after), i64::from(limit)])
    }

    async fn events_for_build(&mut self, id: &BuildId) -> Result<Vec<Event>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE build_id = ?1 ORDER BY seq");
        self.events(&sql, [id.as_str()])
    }

    async fn latest_seq(&mut self) -> Result<u64> {
        // Every allocated seq below `next` is committed (allocation and insert
        // share a transaction), so this equals MAX(seq) without scanning.
        let mut stmt = self
            .conn
            .prepare_cached("SELECT next FROM event_seq WHERE id = 1")?;
        let next: i64 = stmt.query_row([], |row| row.get(0))?;
        to_u64(next - 1, "event_seq.next")
    }

    async fn ensure_secret(&mut self, name: &str, candidate: &[u8]) -> Result<Vec<u8>> {
        self.conn
            .prepare_cached(
                "INSERT INTO server_secrets (name, secret, created_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name) DO NOTHING",
            )?
            .execute(rusqlite::params![name, candidate, millis(Utc::now())])?;
        let mut stmt = self
            .conn
            .prepare_cached("SELECT secret FROM server_secrets WHERE name = ?1")?;
        Ok(stmt.query_row([name], |row| row.get(0))?)
    }

    async fn log_lines(
        &mut self,
        id: &BuildId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<StoredLogLine>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT line_no, line FROM log_lines WHERE build_id = ?1 AND line_no > ?2 \
             ORDER BY line_no LIMIT ?3",
        )?;
        let mut rows = stmt.query(rusqlite::params![
            id.as_str(),
            after_i64(after),
            i64::from(limit)
        ])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(StoredLogLine {
                line_no: to_u64(row.get("line_no")?, "log_lines.line_no")?,
                json: row.get("line")?,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod listing_plan_tests {
    use crate::rows::BUILD_COLUMNS;
    use crate::{BuildFilter, Store};
    use stitch_core::{BuildId, BuildStatus};

    /// SQLite's plan for a listing page: each filter combination walks the
    /// index that starts with its columns instead of every build.
    #[tokio::test]
    async fn each_filter_combination_uses_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("plan.db")).await.unwrap();
        let pool = store.sqlite_pool().unwrap();
        let before = BuildId::new();
        let cases = [
            (
                Some("q"),
                Some(BuildStatus::Accepted),
                "builds_queue_status_id",
            ),
            (Some("q"), None, "(queue=?"),
            (None, Some(BuildStatus::Failed), "(status=?"),
        ];
        for (queue, status, expected) in cases {
            let filter = BuildFilter {
                queue: queue.map(str::to_string),
                status,
                limit: 50,
            };
            let (sql, values) = filter.listing(BUILD_COLUMNS, Some(&before));
            let explain = format!("EXPLAIN QUERY PLAN {sql}");
            let mut query = sqlx::query_as::<_, (i64, i64, i64, String)>(&explain);
            for v in values {
                query = query.bind(v);
            }
            let plan: Vec<String> = query
                .bind(50i64)
                .fetch_all(pool)
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.3)
                .collect();
            let plan = plan.join(" | ");
            assert!(
                plan.contains("USING INDEX") && plan.contains(expected),
                "{queue:?}/{status:?}: {plan}"
            );
        }
    }
}
