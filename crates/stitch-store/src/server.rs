//! The SQL of the server backends (PostgreSQL, MySQL/MariaDB), once: an
//! [`Ops`] impl generic over a [`Dialect`] that says only what the two
//! servers write differently (placeholders, "insert unless taken",
//! `RETURNING`, the batch insert of events).
//!
//! Statements are written with `?` placeholders; PostgreSQL's dialect numbers
//! them. Values are bound as [`Arg`]s, so the shared code needs no sqlx
//! type bounds and the pools stay typed.
//!
//! Several stitch processes may write one database. Store writers lock the
//! rows they change and run side by side; a transaction's events take their
//! seqs from the one-row `event_seq` table as its last statements, and that
//! row stays locked until commit, which keeps seqs gapless and in commit
//! order (ADR 0009, ADR 0016).

use std::marker::PhantomData;

use chrono::Utc;
use sqlx::query::Query;
use sqlx::{Database, Encode, Type};
use stitch_core::BuildId;

use crate::error::Result;
use crate::model::{Build, BuildFilter, Event, FinishedBuild, OpenBuildCount, StoredLogLine};
use crate::ops::Ops;
use crate::rows::{
    after_i64, build_from_row, builds_from_rows, events_from_rows, finished_by_event_from_row,
    finished_counts_sql, finished_from_row, hour_count_from_row, millis, open_count_from_row,
    open_counts_sql, open_statuses_sql, to_i64, to_json, to_u64, HourCountRow, ReadRow,
    BUILD_COLUMNS, EVENT_COLUMNS, FINISHED_BY_EVENTS_SQL, NTH_RUN_TIME_SQL,
};

/// A bind value of a statement written with `?` placeholders.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg<'a> {
    Int(i64),
    OptInt(Option<i64>),
    Text(&'a str),
    OptText(Option<&'a str>),
    Flag(bool),
    Bytes(&'a [u8]),
}

/// `?, ?, …` for `n` values.
pub(crate) fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// `sql` with its `?` placeholders bound to `args`, in order, for any
/// database that encodes the [`Arg`] types.
pub(crate) fn bind<'q, DB: Database>(
    sql: &'q str,
    args: &[Arg<'q>],
) -> Query<'q, DB, DB::Arguments<'q>>
where
    i64: Encode<'q, DB> + Type<DB>,
    Option<i64>: Encode<'q, DB> + Type<DB>,
    &'q str: Encode<'q, DB> + Type<DB>,
    Option<&'q str>: Encode<'q, DB> + Type<DB>,
    bool: Encode<'q, DB> + Type<DB>,
    &'q [u8]: Encode<'q, DB> + Type<DB>,
{
    args.iter()
        .fold(sqlx::query::<DB>(sql), |query, arg| match *arg {
            Arg::Int(v) => query.bind(v),
            Arg::OptInt(v) => query.bind(v),
            Arg::Text(v) => query.bind(v),
            Arg::OptText(v) => query.bind(v),
            Arg::Flag(v) => query.bind(v),
            Arg::Bytes(v) => query.bind(v),
        })
}

/// What PostgreSQL and MySQL do differently, as the few primitives the
/// shared statements of [`ServerOps`] run on. Every statement given to it is
/// written with `?` placeholders.
pub(crate) trait Dialect {
    /// The connection statements run on.
    type Conn;
    /// A result row.
    type Row: ReadRow;

    /// Runs a statement; rows affected.
    async fn execute(conn: &mut Self::Conn, sql: &str, args: &[Arg<'_>]) -> Result<u64>;

    /// Runs a query; every row.
    async fn fetch_all(
        conn: &mut Self::Conn,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Vec<Self::Row>>;

    /// Runs an `INSERT`; `Ok(false)` when a unique key already holds one of
    /// its values (nothing written, transaction still usable).
    async fn insert_unless_taken(
        conn: &mut Self::Conn,
        insert: &str,
        args: &[Arg<'_>],
    ) -> Result<bool>;

    /// Adds `by` to the integer `column` of the row of `table` whose `id` is
    /// `id`, and returns the column's new value; `None` when no row has
    /// that id. The row stays locked until commit.
    async fn add_returning(
        conn: &mut Self::Conn,
        table: &str,
        column: &str,
        by: i64,
        id: Arg<'_>,
    ) -> Result<Option<i64>>;

    /// Inserts events (seqs already allocated) as few statements as the
    /// server allows: they run while the event counter is held.
    async fn insert_events(conn: &mut Self::Conn, events: &[Event]) -> Result<()>;
}

/// [`Ops`] on one connection of a server backend (pooled, or inside a
/// transaction).
pub(crate) struct ServerOps<'c, D: Dialect> {
    conn: &'c mut D::Conn,
    dialect: PhantomData<D>,
}

impl<'c, D: Dialect> ServerOps<'c, D> {
    pub(crate) fn new(conn: &'c mut D::Conn) -> Self {
        Self {
            conn,
            dialect: PhantomData,
        }
    }

    pub(crate) fn conn(&mut self) -> &mut D::Conn {
        self.conn
    }

    async fn fetch_all(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<D::Row>> {
        D::fetch_all(self.conn, sql, args).await
    }

    async fn fetch_optional(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Option<D::Row>> {
        Ok(self.fetch_all(sql, args).await?.into_iter().next())
    }

    async fn one_build(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Option<Build>> {
        let row = self.fetch_optional(sql, args).await?;
        row.as_ref().map(build_from_row).transpose()
    }
}

impl<D: Dialect> Ops for ServerOps<'_, D> {
    async fn load_build_for_update(&mut self, id: &BuildId) -> Result<Option<Build>> {
        let sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = ? FOR UPDATE");
        self.one_build(&sql, &[Arg::Text(id.as_str())]).await
    }

    async fn load_build(&mut self, id: &BuildId) -> Result<Option<Build>> {
        let sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = ?");
        self.one_build(&sql, &[Arg::Text(id.as_str())]).await
    }

    async fn find_by_idempotency_key(&mut self, queue: &str, key: &str) -> Result<Option<Build>> {
        let sql =
            format!("SELECT {BUILD_COLUMNS} FROM builds WHERE queue = ? AND idempotency_key = ?");
        self.one_build(&sql, &[Arg::Text(queue), Arg::Text(key)])
            .await
    }

    async fn insert_build(&mut self, b: &Build) -> Result<bool> {
        let sql = format!(
            "INSERT INTO builds ({BUILD_COLUMNS}) VALUES ({})",
            placeholders(19)
        );
        let (base, head) = (to_json(&b.base)?, to_json(&b.head)?);
        let caller_metadata = to_json(&b.caller_metadata)?;
        let runner_metadata = to_json(&b.runner_metadata)?;
        let runner_ref = b.runner_ref.as_ref().map(to_json).transpose()?;
        let args = [
            Arg::Text(b.id.as_str()),
            Arg::Text(&b.queue),
            Arg::Text(b.status.as_str()),
            Arg::Text(&base),
            Arg::Text(&head),
            Arg::Text(&caller_metadata),
            Arg::Text(&runner_metadata),
            Arg::Text(&b.runner),
            Arg::OptText(runner_ref.as_deref()),
            Arg::OptText(b.idempotency_key.as_deref()),
            Arg::Flag(b.cancel_requested),
            Arg::OptInt(b.cancel_requested_at.map(millis)),
            Arg::OptText(b.job_token_hash.as_deref()),
            Arg::OptText(b.failure_reason.as_deref()),
            Arg::Int(millis(b.created_at)),
            Arg::Int(millis(b.updated_at)),
            Arg::OptInt(b.started_at.map(millis)),
            Arg::OptInt(b.finished_at.map(millis)),
            Arg::Int(b.version),
        ];
        D::insert_unless_taken(self.conn, &sql, &args).await
    }

    async fn update_build(&mut self, b: &Build, expected_version: i64) -> Result<bool> {
        // `version` always changes, so a matched row is a changed row and
        // counts as affected (also under MySQL's "changed rows" counting).
        let runner_metadata = to_json(&b.runner_metadata)?;
        let runner_ref = b.runner_ref.as_ref().map(to_json).transpose()?;
        let affected = D::execute(
            self.conn,
            "UPDATE builds SET status = ?, runner_metadata = ?, runner_ref = ?, \
             cancel_requested = ?, cancel_requested_at = ?, job_token_hash = ?, \
             failure_reason = ?, updated_at = ?, started_at = ?, finished_at = ?, \
             version = ? WHERE id = ? AND version = ?",
            &[
                Arg::Text(b.status.as_str()),
                Arg::Text(&runner_metadata),
                Arg::OptText(runner_ref.as_deref()),
                Arg::Flag(b.cancel_requested),
                Arg::OptInt(b.cancel_requested_at.map(millis)),
                Arg::OptText(b.job_token_hash.as_deref()),
                Arg::OptText(b.failure_reason.as_deref()),
                Arg::Int(millis(b.updated_at)),
                Arg::OptInt(b.started_at.map(millis)),
                Arg::OptInt(b.finished_at.map(millis)),
                Arg::Int(b.version),
                Arg::Text(b.id.as_str()),
                Arg::Int(expected_version),
            ],
        )
        .await?;
        Ok(affected == 1)
    }

    async fn allocate_event_seqs(&mut self, count: u64) -> Result<u64> {
        // Locks the counter row until commit: the last statements of a
        // transaction (ADR 0016), so its holder waits on no one else.
        let count = to_i64(count, "event count")?;
        let next = D::add_returning(self.conn, "event_seq", "next_seq", count, Arg::Int(1))
            .await?
            .ok_or_else(|| crate::error::StoreError::corrupt("event_seq", "the row is missing"))?;
        to_u64(next - count, "event_seq.next_seq")
    }

    async fn insert_events(&mut self, events: &[Event]) -> Result<()> {
        D::insert_events(self.conn, events).await
    }

    async fn reserve_log_lines(&mut self, id: &BuildId, count: u64) -> Result<Option<u64>> {
        let count = to_i64(count, "log line count")?;
        let last = D::add_returning(
            self.conn,
            "builds",
            "log_line_count",
            count,
            Arg::Text(id.as_str()),
        )
        .await?;
        last.map(|n| to_u64(n, "builds.log_line_count")).transpose()
    }

    async fn insert_log_line(&mut self, id: &BuildId, line_no: u64, json: &str) -> Result<()> {
        D::execute(
            self.conn,
            "INSERT INTO log_lines (build_id, line_no, line) VALUES (?, ?, ?)",
            &[
                Arg::Text(id.as_str()),
                Arg::Int(to_i64(line_no, "log line number")?),
                Arg::Text(json),
            ],
        )
        .await?;
        Ok(())
    }

    async fn log_line_count(&mut self, id: &BuildId) -> Result<Option<u64>> {
        let row = self
            .fetch_optional(
                "SELECT log_line_count FROM builds WHERE id = ?",
                &[Arg::Text(id.as_str())],
            )
            .await?;
        row.map(|row| to_u64(row.int("log_line_count")?, "builds.log_line_count"))
            .transpose()
    }

    async fn list_builds(
        &mut self,
        filter: &BuildFilter,
        before: Option<&BuildId>,
        limit: u32,
    ) -> Result<Vec<Build>> {
        let (sql, values) = filter.listing(BUILD_COLUMNS, before);
        let args: Vec<Arg> = values
            .into_iter()
            .map(Arg::Text)
            .chain([Arg::Int(i64::from(limit))])
            .collect();
        builds_from_rows(&self.fetch_all(&sql, &args).await?)
    }

    async fn builds_not_terminal(&mut self) -> Result<Vec<Build>> {
        let sql = format!(
            "SELECT {BUILD_COLUMNS} FROM builds WHERE status IN ({}) ORDER BY id",
            open_statuses_sql()
        );
        builds_from_rows(&self.fetch_all(&sql, &[]).await?)
    }

    async fn open_build_counts(&mut self) -> Result<Vec<OpenBuildCount>> {
        let rows = self.fetch_all(&open_counts_sql(), &[]).await?;
        rows.iter().map(open_count_from_row).collect()
    }

    async fn finished_since(&mut self, since_ms: i64, limit: u32) -> Result<Vec<FinishedBuild>> {
        let rows = self
            .fetch_all(
                "SELECT id, queue, status, started_at, finished_at FROM builds \
                 WHERE finished_at >= ? LIMIT ?",
                &[Arg::Int(since_ms), Arg::Int(i64::from(limit))],
            )
            .await?;
        rows.iter().map(finished_from_row).collect()
    }

    async fn finished_counts(&mut self, since_ms: i64, until_ms: i64) -> Result<Vec<HourCountRow>> {
        let args = [Arg::Int(since_ms), Arg::Int(until_ms)];
        let rows = self.fetch_all(&finished_counts_sql(), &args).await?;
        rows.iter().map(hour_count_from_row).collect()
    }

    async fn nth_run_time(&mut self, from_ms: i64, to_ms: i64, nth: u64) -> Result<Option<i64>> {
        let args = [
            Arg::Int(from_ms),
            Arg::Int(to_ms),
            Arg::Int(to_i64(nth, "offset")?),
        ];
        let row = self.fetch_optional(NTH_RUN_TIME_SQL, &args).await?;
        row.map(|r| r.int("d")).transpose()
    }

    async fn finished_by_events(
        &mut self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<(u64, Option<FinishedBuild>)>> {
        let args = [Arg::Int(after_i64(after)), Arg::Int(i64::from(limit))];
        let rows = self.fetch_all(FINISHED_BY_EVENTS_SQL, &args).await?;
        rows.iter().map(finished_by_event_from_row).collect()
    }

    async fn events_after(&mut self, after: u64, limit: u32) -> Result<Vec<Event>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?");
        let args = [Arg::Int(after_i64(after)), Arg::Int(i64::from(limit))];
        events_from_rows(&self.fetch_all(&sql, &args).await?)
    }

    async fn events_for_build(&mut self, id: &BuildId) -> Result<Vec<Event>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE build_id = ? ORDER BY seq");
        events_from_rows(&self.fetch_all(&sql, &[Arg::Text(id.as_str())]).await?)
    }

    async fn latest_seq(&mut self) -> Result<u64> {
        // Every allocated seq below the counter is committed (allocation and
        // insert share a transaction), so this is MAX(seq) without a scan.
        let row = self
            .fetch_optional("SELECT next_seq FROM event_seq WHERE id = 1", &[])
            .await?
            .ok_or_else(|| crate::error::StoreError::corrupt("event_seq", "the row is missing"))?;
        to_u64(row.int("next_seq")? - 1, "event_seq.next_seq")
    }

    async fn ensure_secret(&mut self, name: &str, candidate: &[u8]) -> Result<Vec<u8>> {
        // A secret already stored stays: the first ever stored wins.
        D::insert_unless_taken(
            self.conn,
            "INSERT INTO server_secrets (name, secret, created_at) VALUES (?, ?, ?)",
            &[
                Arg::Text(name),
                Arg::Bytes(candidate),
                Arg::Int(millis(Utc::now())),
            ],
        )
        .await?;
        let row = self
            .fetch_optional(
                "SELECT secret FROM server_secrets WHERE name = ?",
                &[Arg::Text(name)],
            )
            .await?
            .ok_or_else(|| {
                crate::error::StoreError::corrupt(format!("server secret {name:?}"), "not stored")
            })?;
        row.bytes("secret")
    }

    async fn log_lines(
        &mut self,
        id: &BuildId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<StoredLogLine>> {
        let rows = self
            .fetch_all(
                "SELECT line_no, line FROM log_lines WHERE build_id = ? AND line_no > ? \
                 ORDER BY line_no LIMIT ?",
                &[
                    Arg::Text(id.as_str()),
                    Arg::Int(after_i64(after)),
                    Arg::Int(i64::from(limit)),
                ],
            )
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
