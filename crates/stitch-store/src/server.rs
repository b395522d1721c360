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
//! rows they change and run side by side; a transaction's events go to
//! `event_pending` without a seq, and a sequencing pass
//! ([`ServerOps::sequence_pending`]) numbers the committed ones under the
//! one-row `event_seq` table, which keeps seqs gapless and in the order the
//! events became visible without making every writer wait for that row
//! (ADR 0009, ADR 0016, ADR 0020).

use std::marker::PhantomData;

use chrono::Utc;
use sqlx::query::Query;
use sqlx::{Database, Encode, Type};
use stitch_core::BuildId;

use crate::error::Result;
use crate::model::{
    Build, BuildFilter, Event, FinishedBuild, NewEvent, OpenBuildCount, StoredLogLine,
};
use crate::ops::Ops;
use crate::rows::{
    after_i64, build_from_row, builds_from_rows, event_from_row, events_from_rows,
    finished_by_event_from_row, finished_counts_sql, finished_from_row, hour_count_from_row,
    millis, open_count_from_row, open_counts_sql, open_statuses_sql, to_i64, to_json, to_u64,
    HourCountRow, ReadRow, BUILD_COLUMNS, EVENT_COLUMNS, FINISHED_BY_EVENTS_SQL, NTH_RUN_TIME_SQL,
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

    /// Inserts events as few statements as the server allows: into the log
    /// with their seqs (the sequencing pass, holding the event counter), or
    /// into `event_pending` without them (a writer; the table numbers them
    /// in insertion order).
    async fn insert_events(conn: &mut Self::Conn, into: EventTable, events: &[Event])
        -> Result<()>;
}

/// Where [`Dialect::insert_events`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventTable {
    /// `events`, seqs given.
    Log,
    /// `event_pending`, seqs ignored (the pass gives them).
    Pending,
}

/// Most pending events one statement of a sequencing pass moves.
const SEQUENCE_CHUNK: usize = 1000;

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

impl<D: Dialect> ServerOps<'_, D> {
    /// Whether any events wait in `event_pending` (a read, no lock).
    pub(crate) async fn any_pending(&mut self) -> Result<bool> {
        Ok(!self
            .fetch_all("SELECT id FROM event_pending LIMIT 1", &[])
            .await?
            .is_empty())
    }

    /// A sequencing pass, inside a transaction the caller opened and
    /// commits: takes the `event_seq` row (waiting for another process's
    /// pass), then moves every committed pending event into the log with
    /// the next seqs, oldest `id` first; events of builds that are gone
    /// (pruned meanwhile) are dropped. Returns how many it moved. Statements
    /// after the lock each read what is committed by then (READ COMMITTED on
    /// both servers), so a pass that took the lock after a writer committed
    /// moves that writer's events, unless an earlier pass did.
    pub(crate) async fn sequence_pending(&mut self) -> Result<u64> {
        let next = self
            .fetch_optional(
                "SELECT next_seq FROM event_seq WHERE id = 1 FOR UPDATE",
                &[],
            )
            .await?
            .ok_or_else(|| crate::error::StoreError::corrupt("event_seq", "the row is missing"))?
            .int("next_seq")?;
        let mut next = to_u64(next, "event_seq.next_seq")?;
        let mut moved = 0u64;
        let chunk = i64::try_from(SEQUENCE_CHUNK).unwrap_or(i64::MAX);
        loop {
            // The pending id stands in the seq column until renumbered;
            // `live` is NULL for a build pruned since its events were
            // written: those events go with it (the log's foreign key
            // would refuse them).
            let sql =
                "SELECT p.id AS seq, p.build_id, p.queue, p.kind, p.status, p.metadata, p.at, \
                       b.id AS live FROM event_pending p LEFT JOIN builds b ON b.id = p.build_id \
                       ORDER BY p.id LIMIT ?";
            let rows = self.fetch_all(sql, &[Arg::Int(chunk)]).await?;
            if rows.is_empty() {
                break;
            }
            let mut ids = Vec::with_capacity(rows.len());
            let mut events = Vec::with_capacity(rows.len());
            for row in &rows {
                let id = row.int("seq")?;
                ids.push(id);
                if row.opt_text("live")?.is_none() {
                    continue;
                }
                // A row stitch did not write (or a newer version's) cannot
                // hold up every later event: it is dropped, loudly.
                match event_from_row(row) {
                    Ok(mut event) => {
                        event.seq = next;
                        next += 1;
                        events.push(event);
                    }
                    Err(e) => tracing::error!(
                        pending_id = id,
                        error = %e,
                        "dropping an unreadable pending event"
                    ),
                }
            }
            let id_args: Vec<Arg<'_>> = ids.iter().map(|id| Arg::Int(*id)).collect();
            let in_ids = placeholders(ids.len());
            if !events.is_empty() {
                D::insert_events(self.conn, EventTable::Log, &events).await?;
            }
            D::execute(
                self.conn,
                &format!("DELETE FROM event_pending WHERE id IN ({in_ids})"),
                &id_args,
            )
            .await?;
            moved += events.len() as u64;
            if ids.len() < SEQUENCE_CHUNK {
                break;
            }
        }
        if moved > 0 {
            D::execute(
                self.conn,
                "UPDATE event_seq SET next_seq = ? WHERE id = 1",
                &[Arg::Int(to_i64(next, "event_seq.next_seq")?)],
            )
            .await?;
        }
        Ok(moved)
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

    async fn append_events(&mut self, staged: Vec<NewEvent>) -> Result<()> {
        // No seq and no shared lock here: the sequencing pass numbers them
        // once this transaction has committed (ADR 0020).
        let events: Vec<Event> = staged.into_iter().map(|e| e.with_seq(0)).collect();
        D::insert_events(self.conn, EventTable::Pending, &events).await
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
