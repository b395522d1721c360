//! The MySQL / MariaDB backend: migrations and every SQL statement the store
//! runs there, as an [`Ops`] impl on one connection.
//!
//! Connections run at READ COMMITTED (the queue's `pool_options` set it;
//! the group committer's own connection sets it itself), so every statement
//! reads the latest commits and InnoDB takes no gap locks for our reads.
//! Events take their seqs from the `event_seq` row as a transaction's last
//! statements, as on PostgreSQL (ADR 0009, ADR 0016).

use chrono::Utc;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool};
use sqlx::MySqlConnection;
use stitch_core::BuildId;

use crate::error::Result;
use crate::model::{Build, BuildFilter, Event, FinishedBuild, OpenBuildCount, StoredLogLine};
use crate::ops::Ops;
use crate::rows::{
    after_i64, build_from_row, builds_from_rows, events_from_rows, finished_from_row, millis,
    open_count_from_row, open_counts_sql, open_statuses_sql, to_i64, to_json, to_u64, ReadRow,
    BUILD_COLUMNS, EVENT_COLUMNS,
};

/// ER_DUP_ENTRY: a unique key already holds the value.
const DUPLICATE_KEY: u16 = 1062;

/// The session setting every store connection runs with.
pub(crate) const READ_COMMITTED: &str = "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED";

/// Opens a pool on `url` with the queue's session settings, so the two can
/// share it.
pub(crate) async fn open_pool(url: &str) -> Result<MySqlPool> {
    let options = stitch_mq::mysql::connect_options(url)?;
    Ok(stitch_mq::mysql::pool_options()
        .connect_with(options)
        .await?)
}

/// Applies the store's migrations (versions 2001+) in the pool's database;
/// the queue's versions in the same table are ignored.
pub(crate) async fn migrate(pool: &MySqlPool) -> Result<()> {
    let mut migrator = sqlx::migrate!("./migrations/mysql");
    migrator.set_ignore_missing(true);
    migrator.run(pool).await?;
    Ok(())
}

/// Connection options of a pool, for the group committer's own connection.
pub(crate) fn committer_options(pool: &MySqlPool) -> MySqlConnectOptions {
    (*pool.connect_options()).clone()
}

/// [`Ops`] on one MySQL connection (pooled, or inside a transaction).
pub(crate) struct MySqlOps<'c> {
    conn: &'c mut MySqlConnection,
}

impl<'c> MySqlOps<'c> {
    pub(crate) fn new(conn: &'c mut MySqlConnection) -> Self {
        Self { conn }
    }

    pub(crate) fn conn(&mut self) -> &mut MySqlConnection {
        self.conn
    }
}

fn is_duplicate_key(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .is_some_and(|my| my.number() == DUPLICATE_KEY),
        _ => false,
    }
}

impl Ops for MySqlOps<'_> {
    async fn load_build_for_update(&mut self, id: &BuildId) -> Result<Option<Build>> {
        let sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = ? FOR UPDATE");
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .fetch_optional(&mut *self.conn)
            .await?;
        row.as_ref().map(build_from_row).transpose()
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
        // A plain INSERT: a duplicate key fails only this statement (InnoDB
        // keeps the transaction), and unlike INSERT IGNORE no other error
        // (a too-long value, say) is turned into a silent warning.
        let sql = format!(
            "INSERT INTO builds ({BUILD_COLUMNS}) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        );
        let inserted = sqlx::query(&sql)
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
            .await;
        match inserted {
            Ok(done) => Ok(done.rows_affected() == 1),
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn update_build(&mut self, b: &Build, expected_version: i64) -> Result<bool> {
        // `version` always changes, so a matched row is a changed row and
        // counts as affected whatever the connection's FOUND_ROWS setting.
        let done = sqlx::query(
            "UPDATE builds SET status = ?, runner_metadata = ?, runner_ref = ?, \
             cancel_requested = ?, cancel_requested_at = ?, job_token_hash = ?, \
             failure_reason = ?, updated_at = ?, started_at = ?, finished_at = ?, \
             version = ? WHERE id = ? AND version = ?",
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

    async fn allocate_event_seqs(&mut self, count: u64) -> Result<u64> {
        // Locks the counter row until commit: the last statements of a
        // transaction (ADR 0016), so its holder waits on no one else.
        let count = to_i64(count, "event count")?;
        sqlx::query("UPDATE event_seq SET next_seq = next_seq + ? WHERE id = 1")
            .bind(count)
            .execute(&mut *self.conn)
            .await?;
        let first: i64 = sqlx::query_scalar("SELECT next_seq - ? FROM event_seq WHERE id = 1")
            .bind(count)
            .fetch_one(&mut *self.conn)
            .await?;
        to_u64(first, "event_seq.next_seq")
    }

    async fn insert_events(&mut self, events: &[Event]) -> Result<()> {
        // Multi-row inserts: they run while the counter is held. Chunks keep
        // a statement well under MySQL's 65,535 placeholders.
        for chunk in events.chunks(1000) {
            let mut insert = sqlx::QueryBuilder::new(
                "INSERT INTO events (seq, build_id, queue, kind, status, metadata, at) ",
            );
            let mut rows = Vec::with_capacity(chunk.len());
            for e in chunk {
                rows.push((to_i64(e.seq, "event seq")?, to_json(&e.metadata)?, e));
            }
            insert.push_values(rows, |mut row, (seq, metadata, e)| {
                row.push_bind(seq)
                    .push_bind(e.build_id.as_str())
                    .push_bind(e.queue.as_str())
                    .push_bind(e.kind.as_str())
                    .push_bind(e.status.as_str())
                    .push_bind(metadata)
                    .push_bind(millis(e.at));
            });
            insert.build().execute(&mut *self.conn).await?;
        }
        Ok(())
    }

    async fn reserve_log_lines(&mut self, id: &BuildId, count: u64) -> Result<Option<u64>> {
        let done =
            sqlx::query("UPDATE builds SET log_line_count = log_line_count + ? WHERE id = ?")
                .bind(to_i64(count, "log line count")?)
                .bind(id.as_str())
                .execute(&mut *self.conn)
                .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        self.log_line_count(id).await
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
        let sql = format!(
            "SELECT {BUILD_COLUMNS} FROM builds \
             WHERE (? IS NULL OR queue = ?) AND (? IS NULL OR status = ?) \
             AND (? IS NULL OR id < ?) ORDER BY id DESC LIMIT ?"
        );
        let (queue, status) = (filter.queue.as_deref(), filter.status.map(|s| s.as_str()));
        let before = before.map(|b| b.as_str());
        let rows = sqlx::query(&sql)
            .bind(queue)
            .bind(queue)
            .bind(status)
            .bind(status)
            .bind(before)
            .bind(before)
            .bind(i64::from(limit))
            .fetch_all(&mut *self.conn)
            .await?;
        builds_from_rows(&rows)
    }

    async fn builds_not_terminal(&mut self) -> Result<Vec<Build>> {
        let sql = format!(
            "SELECT {BUILD_COLUMNS} FROM builds WHERE status IN ({}) ORDER BY id",
            open_statuses_sql()
        );
        let rows = sqlx::query(&sql).fetch_all(&mut *self.conn).await?;
        builds_from_rows(&rows)
    }

    async fn open_build_counts(&mut self) -> Result<Vec<OpenBuildCount>> {
        let rows = sqlx::query(&open_counts_sql())
            .fetch_all(&mut *self.conn)
            .await?;
        rows.iter().map(open_count_from_row).collect()
    }

    async fn finished_since(&mut self, since_ms: i64, limit: u32) -> Result<Vec<FinishedBuild>> {
        let rows = sqlx::query(
            "SELECT queue, status, started_at, finished_at FROM builds \
             WHERE finished_at >= ? LIMIT ?",
        )
        .bind(since_ms)
        .bind(i64::from(limit))
        .fetch_all(&mut *self.conn)
        .await?;
        rows.iter().map(finished_from_row).collect()
    }

    async fn events_after(&mut self, after: u64, limit: u32) -> Result<Vec<Event>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?");
        let rows = sqlx::query(&sql)
            .bind(after_i64(after))
            .bind(i64::from(limit))
            .fetch_all(&mut *self.conn)
            .await?;
        events_from_rows(&rows)
    }

    async fn events_for_build(&mut self, id: &BuildId) -> Result<Vec<Event>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE build_id = ? ORDER BY seq");
        let rows = sqlx::query(&sql)
            .bind(id.as_str())
            .fetch_all(&mut *self.conn)
            .await?;
        events_from_rows(&rows)
    }

    async fn latest_seq(&mut self) -> Result<u64> {
        let next: i64 = sqlx::query_scalar("SELECT next_seq FROM event_seq WHERE id = 1")
            .fetch_one(&mut *self.conn)
            .await?;
        to_u64(next - 1, "event_seq.next_seq")
    }

    async fn ensure_secret(&mut self, name: &str, candidate: &[u8]) -> Result<Vec<u8>> {
        // Assigning a column to itself keeps the stored secret (first wins).
        sqlx::query(
            "INSERT INTO server_secrets (name, secret, created_at) VALUES (?, ?, ?) \
             ON DUPLICATE KEY UPDATE name = name",
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
        .bind(after_i64(after))
        .bind(i64::from(limit))
        .fetch_all(&mut *self.conn)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(StoredLogLine {
                    line_no: to_u64(row.int("line_no")?, "log_lines.line_no")?,
                    json: row.text("line")?,
                })
            })
            .collect()
    }
}
