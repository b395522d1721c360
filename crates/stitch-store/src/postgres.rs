//! The PostgreSQL backend: migrations and every SQL statement the store runs
//! on PostgreSQL, as an [`Ops`] impl on one connection.
//!
//! Several stitch processes may write one database. Store writers lock the
//! rows they change and run side by side; a transaction's events take their
//! seqs from the one-row `event_seq` table as its last statements, and that
//! row stays locked until commit, which keeps seqs gapless and in commit
//! order (ADR 0009, ADR 0016).

use std::time::Duration;

use chrono::Utc;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::PgConnection;
use stitch_core::BuildId;

use crate::error::Result;
use crate::model::{Build, BuildFilter, Event, FinishedBuild, OpenBuildCount, StoredLogLine};
use crate::ops::Ops;
use crate::rows::{
    after_i64, build_from_row, builds_from_rows, events_from_rows, finished_from_row, millis,
    open_count_from_row, open_counts_sql, open_statuses_sql, to_i64, to_json, to_u64,
    BUILD_COLUMNS, EVENT_COLUMNS,
};

/// Connections of a pool opened from a URL.
const POOL_SIZE: u32 = 10;

/// Opens a pool on `url` with stitch's application name (as the queue's
/// driver does, so the two can share it).
pub(crate) async fn open_pool(url: &str) -> Result<PgPool> {
    let options = stitch_mq::postgres::connect_options(url)?;
    Ok(PgPoolOptions::new()
        .max_connections(POOL_SIZE)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?)
}

/// Applies the store's migrations (versions 2001+) in the pool's schema;
/// the queue's versions in the same table are ignored.
pub(crate) async fn migrate(pool: &PgPool) -> Result<()> {
    let mut migrator = sqlx::migrate!("./migrations/postgres");
    migrator.set_ignore_missing(true);
    migrator.run(pool).await?;
    Ok(())
}

/// The queue's `NOTIFY` channel for the pool's schema, so a publish in a
/// store transaction wakes the queue's listeners in every process.
pub(crate) async fn notify_channel(pool: &PgPool) -> Result<String> {
    let schema: String = sqlx::query_scalar("SELECT current_schema()::text")
        .fetch_one(pool)
        .await?;
    Ok(stitch_mq::postgres::channel_for_schema(&schema))
}

/// Connection options of a pool, for the group committer's own connection.
pub(crate) fn committer_options(pool: &PgPool) -> PgConnectOptions {
    (*pool.connect_options()).clone()
}

/// [`Ops`] on one PostgreSQL connection (pooled, or inside a transaction).
pub(crate) struct PgOps<'c> {
    conn: &'c mut PgConnection,
}

impl<'c> PgOps<'c> {
    pub(crate) fn new(conn: &'c mut PgConnection) -> Self {
        Self { conn }
    }

    pub(crate) fn conn(&mut self) -> &mut PgConnection {
        self.conn
    }
}

impl Ops for PgOps<'_> {
    async fn load_build_for_update(&mut self, id: &BuildId) -> Result<Option<Build>> {
        let sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = $1 FOR UPDATE");
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .fetch_optional(&mut *self.conn)
            .await?;
        row.as_ref().map(build_from_row).transpose()
    }

    async fn load_build(&mut self, id: &BuildId) -> Result<Option<Build>> {
        let sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .fetch_optional(&mut *self.conn)
            .await?;
        row.as_ref().map(build_from_row).transpose()
    }

    async fn find_by_idempotency_key(&mut self, queue: &str, key: &str) -> Result<Option<Build>> {
        let sql =
            format!("SELECT {BUILD_COLUMNS} FROM builds WHERE queue = $1 AND idempotency_key = $2");
        let row = sqlx::query(&sql)
            .bind(queue)
            .bind(key)
            .fetch_optional(&mut *self.conn)
            .await?;
        row.as_ref().map(build_from_row).transpose()
    }

    async fn insert_build(&mut self, b: &Build) -> Result<bool> {
        let sql = format!(
            "INSERT INTO builds ({BUILD_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, \
             $10, $11, $12, $13, $14, $15, $16, $17, $18, $19) ON CONFLICT DO NOTHING"
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
            "UPDATE builds SET status = $1, runner_metadata = $2, runner_ref = $3, \
             cancel_requested = $4, cancel_requested_at = $5, job_token_hash = $6, \
             failure_reason = $7, updated_at = $8, started_at = $9, finished_at = $10, \
             version = $11 WHERE id = $12 AND version = $13",
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
        let first: i64 = sqlx::query_scalar(
            "UPDATE event_seq SET next_seq = next_seq + $1 WHERE id = 1 RETURNING next_seq - $1",
        )
        .bind(count)
        .fetch_one(&mut *self.conn)
        .await?;
        to_u64(first, "event_seq.next_seq")
    }

    async fn insert_events(&mut self, events: &[Event]) -> Result<()> {
        // One statement for the whole batch: it runs while the counter is held.
        let mut seqs = Vec::with_capacity(events.len());
        let mut builds = Vec::with_capacity(events.len());
        let mut queues = Vec::with_capacity(events.len());
        let mut kinds = Vec::with_capacity(events.len());
        let mut statuses = Vec::with_capacity(events.len());
        let mut metadata = Vec::with_capacity(events.len());
        let mut ats = Vec::with_capacity(events.len());
        for e in events {
            seqs.push(to_i64(e.seq, "event seq")?);
            builds.push(e.build_id.as_str());
            queues.push(e.queue.as_str());
            kinds.push(e.kind.as_str());
            statuses.push(e.status.as_str());
            metadata.push(to_json(&e.metadata)?);
            ats.push(millis(e.at));
        }
        sqlx::query(
            "INSERT INTO events (seq, build_id, queue, kind, status, metadata, at) \
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], \
                                  $5::text[], $6::text[], $7::bigint[])",
        )
        .bind(seqs)
        .bind(builds)
        .bind(queues)
        .bind(kinds)
        .bind(statuses)
        .bind(metadata)
        .bind(ats)
        .execute(&mut *self.conn)
        .await?;
        Ok(())
    }

    async fn reserve_log_lines(&mut self, id: &BuildId, count: u64) -> Result<Option<u64>> {
        let last: Option<i64> = sqlx::query_scalar(
            "UPDATE builds SET log_line_count = log_line_count + $1 WHERE id = $2 \
             RETURNING log_line_count",
        )
        .bind(to_i64(count, "log line count")?)
        .bind(id.as_str())
        .fetch_optional(&mut *self.conn)
        .await?;
        last.map(|n| to_u64(n, "builds.log_line_count")).transpose()
    }

    async fn insert_log_line(&mut self, id: &BuildId, line_no: u64, json: &str) -> Result<()> {
        sqlx::query("INSERT INTO log_lines (build_id, line_no, line) VALUES ($1, $2, $3)")
            .bind(id.as_str())
            .bind(to_i64(line_no, "log line number")?)
            .bind(json)
            .execute(&mut *self.conn)
            .await?;
        Ok(())
    }

    async fn log_line_count(&mut self, id: &BuildId) -> Result<Option<u64>> {
        let count: Option<i64> =
            sqlx::query_scalar("SELECT log_line_count FROM builds WHERE id = $1")
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
        // NULL parameters switch their filter off, so one statement serves
        // every combination.
        let sql = format!(
            "SELECT {BUILD_COLUMNS} FROM builds \
             WHERE ($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR status = $2) \
             AND ($3::text IS NULL OR id < $3) ORDER BY id DESC LIMIT $4"
        );
        let rows = sqlx::query(&sql)
            .bind(filter.queue.as_deref())
            .bind(filter.status.map(|s| s.as_str()))
            .bind(before.map(|b| b.as_str()))
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
             WHERE finished_at >= $1 LIMIT $2",
        )
        .bind(since_ms)
        .bind(i64::from(limit))
        .fetch_all(&mut *self.conn)
        .await?;
        rows.iter().map(finished_from_row).collect()
    }

    async fn events_after(&mut self, after: u64, limit: u32) -> Result<Vec<Event>> {
        let sql =
            format!("SELECT {EVENT_COLUMNS} FROM events WHERE seq > $1 ORDER BY seq LIMIT $2");
        let rows = sqlx::query(&sql)
            .bind(after_i64(after))
            .bind(i64::from(limit))
            .fetch_all(&mut *self.conn)
            .await?;
        events_from_rows(&rows)
    }

    async fn events_for_build(&mut self, id: &BuildId) -> Result<Vec<Event>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE build_id = $1 ORDER BY seq");
        let rows = sqlx::query(&sql)
            .bind(id.as_str())
            .fetch_all(&mut *self.conn)
            .await?;
        events_from_rows(&rows)
    }

    async fn latest_seq(&mut self) -> Result<u64> {
        // Every allocated seq below the counter is committed (allocation and
        // insert share a transaction), so this is MAX(seq) without a scan.
        let next: i64 = sqlx::query_scalar("SELECT next_seq FROM event_seq WHERE id = 1")
            .fetch_one(&mut *self.conn)
            .await?;
        to_u64(next - 1, "event_seq.next_seq")
    }

    async fn ensure_secret(&mut self, name: &str, candidate: &[u8]) -> Result<Vec<u8>> {
        sqlx::query(
            "INSERT INTO server_secrets (name, secret, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(candidate)
        .bind(millis(Utc::now()))
        .execute(&mut *self.conn)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT secret FROM server_secrets WHERE name = $1")
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
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT line_no, line FROM log_lines WHERE build_id = $1 AND line_no > $2 \
             ORDER BY line_no LIMIT $3",
        )
        .bind(id.as_str())
        .bind(after_i64(after))
        .bind(i64::from(limit))
        .fetch_all(&mut *self.conn)
        .await?;
        rows.into_iter()
            .map(|(line_no, json)| {
                Ok(StoredLogLine {
                    line_no: to_u64(line_no, "log_lines.line_no")?,
                    json,
                })
            })
            .collect()
    }
}
