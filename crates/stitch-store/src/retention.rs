//! Retention: deleting what is older than the configured windows, in small
//! transactions, and the lease row that lets one process of several do it.
//!
//! Every write here runs in a [`StoreTx`] of its own, bounded in rows by the
//! caller's `limit`, so creates and polls never wait long behind a pass. The event log only
//! ever loses its oldest part: what is retained stays a gapless run of seqs
//! ending at the newest event.

use serde::Serialize;
use stitch_core::BuildId;
use stitch_mq::BackendKind;

use crate::error::{Result, StoreError};
use crate::mysql::MySql;
use crate::pool::StorePool;
use crate::postgres::Postgres;
use crate::rows::ReadRow;
use crate::server::{bind, placeholders, Arg, Dialect};
use crate::store::{Store, StoreTx, TxConnection};

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn rusqlite_params<'a>(args: &'a [Arg<'a>]) -> Vec<&'a dyn rusqlite::ToSql> {
    args.iter()
        .map(|a| match a {
            Arg::Int(v) => v as &dyn rusqlite::ToSql,
            Arg::OptInt(v) => v as &dyn rusqlite::ToSql,
            Arg::Text(v) => v as &dyn rusqlite::ToSql,
            Arg::OptText(v) => v as &dyn rusqlite::ToSql,
            Arg::Flag(v) => v as &dyn rusqlite::ToSql,
            Arg::Bytes(v) => v as &dyn rusqlite::ToSql,
        })
        .collect()
}

/// The integer in column `index` of a row: `None` for NULL, and for a
/// column the row does not have.
fn int_at<R: sqlx::Row>(row: &R, index: usize) -> Result<Option<i64>>
where
    usize: sqlx::ColumnIndex<R>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    match row.try_get(index) {
        Ok(v) => Ok(v),
        Err(sqlx::Error::ColumnIndexOutOfBounds { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Rows of one or two integer columns (NULL and a missing second column
/// read 0).
fn int_pairs<R: sqlx::Row>(rows: &[R]) -> Result<Vec<(i64, i64)>>
where
    usize: sqlx::ColumnIndex<R>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    rows.iter()
        .map(|r| Ok((int_at(r, 0)?.unwrap_or(0), int_at(r, 1)?.unwrap_or(0))))
        .collect()
}

/// The text column `column` of every row.
fn texts(rows: &[impl ReadRow], column: &str) -> Result<Vec<String>> {
    rows.iter().map(|r| r.text(column)).collect()
}

/// A SQLite transaction whose raw handle is gone: cannot happen (a SQLite
/// [`StoreTx`] always has one), reported rather than panicked on.
fn no_handle<T>() -> Result<T> {
    Err(StoreError::Internal(
        "a SQLite transaction without its raw handle".into(),
    ))
}

/// Runs a statement in the transaction; rows affected.
async fn tx_execute(tx: &mut StoreTx<'_>, sql: &str, args: &[Arg<'_>]) -> Result<u64> {
    if let Ok(handle) = tx.sqlite_handle() {
        return Ok(handle.execute(sql, rusqlite_params(args).as_slice())? as u64);
    }
    match tx.connection() {
        TxConnection::Postgres(c) => Postgres::execute(c, sql, args).await,
        TxConnection::MySql(c) => MySql::execute(c, sql, args).await,
        TxConnection::Sqlite(_) => no_handle(),
    }
}

/// Rows of one or two integer columns (a missing second column reads 0) in
/// the transaction.
async fn tx_ints(tx: &mut StoreTx<'_>, sql: &str, args: &[Arg<'_>]) -> Result<Vec<(i64, i64)>> {
    if let Ok(handle) = tx.sqlite_handle() {
        let mut stmt = handle.prepare_cached(sql)?;
        let width = stmt.column_count();
        let rows = stmt.query_map(rusqlite_params(args).as_slice(), |r| {
            let a: Option<i64> = r.get(0)?;
            let b: Option<i64> = if width > 1 { r.get(1)? } else { None };
            Ok((a.unwrap_or(0), b.unwrap_or(0)))
        })?;
        return Ok(rows.collect::<std::result::Result<_, _>>()?);
    }
    match tx.connection() {
        TxConnection::Postgres(c) => int_pairs(&Postgres::fetch_all(c, sql, args).await?),
        TxConnection::MySql(c) => int_pairs(&MySql::fetch_all(c, sql, args).await?),
        TxConnection::Sqlite(_) => no_handle(),
    }
}

/// The text column `column` of every row of a query in the transaction.
async fn tx_texts(
    tx: &mut StoreTx<'_>,
    column: &str,
    sql: &str,
    args: &[Arg<'_>],
) -> Result<Vec<String>> {
    if let Ok(handle) = tx.sqlite_handle() {
        let mut stmt = handle.prepare_cached(sql)?;
        let rows = stmt.query_map(rusqlite_params(args).as_slice(), |r| r.get(column))?;
        return Ok(rows.collect::<std::result::Result<_, _>>()?);
    }
    match tx.connection() {
        TxConnection::Postgres(c) => texts(&Postgres::fetch_all(c, sql, args).await?, column),
        TxConnection::MySql(c) => texts(&MySql::fetch_all(c, sql, args).await?, column),
        TxConnection::Sqlite(_) => no_handle(),
    }
}

/// One nullable integer from a read on the pool.
async fn read_int(pool: &StorePool, sql: &str, args: &[Arg<'_>]) -> Result<Option<i64>> {
    let first = |pairs: Vec<Option<i64>>| pairs.into_iter().next().flatten();
    Ok(first(match pool {
        StorePool::Sqlite(p) => {
            let rows = bind::<sqlx::Sqlite>(sql, args).fetch_all(p).await?;
            rows.iter().map(|r| int_at(r, 0)).collect::<Result<_>>()?
        }
        StorePool::Postgres(p) => {
            let rows = Postgres::fetch_all(&mut *p.acquire().await?, sql, args).await?;
            rows.iter().map(|r| int_at(r, 0)).collect::<Result<_>>()?
        }
        StorePool::MySql(p) => {
            let rows = MySql::fetch_all(&mut *p.acquire().await?, sql, args).await?;
            rows.iter().map(|r| int_at(r, 0)).collect::<Result<_>>()?
        }
    }))
}

/// The text column `column` of every row of a query read on the pool (no
/// write lock).
async fn read_texts(
    pool: &StorePool,
    column: &str,
    sql: &str,
    args: &[Arg<'_>],
) -> Result<Vec<String>> {
    match pool {
        StorePool::Sqlite(p) => Ok(bind::<sqlx::Sqlite>(sql, args)
            .fetch_all(p)
            .await?
            .iter()
            .map(|r| sqlx::Row::try_get(r, column))
            .collect::<std::result::Result<_, _>>()?),
        StorePool::Postgres(p) => texts(
            &Postgres::fetch_all(&mut *p.acquire().await?, sql, args).await?,
            column,
        ),
        StorePool::MySql(p) => texts(
            &MySql::fetch_all(&mut *p.acquire().await?, sql, args).await?,
            column,
        ),
    }
}

/// What one call of [`Store::prune_builds`] deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BuildsPruned {
    /// The builds deleted (their local state can go now).
    pub builds: Vec<BuildId>,
    /// Events deleted so that the builds' events could go (the log only
    /// loses its oldest part, so older events of other builds go too).
    pub events: u64,
    /// Log lines of the deleted builds.
    pub log_lines: u64,
    /// Queue messages of the deleted builds (see
    /// [`Store::prune_builds_with_messages`]).
    pub queue_messages: u64,
}

/// What a pruning pass would delete now ([`Store::prunable`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Prunable {
    /// Builds terminal since before the builds cutoff.
    pub builds: u64,
    /// Their log lines.
    pub log_lines: u64,
    /// Events older than the events cutoff, and every event up to the last
    /// one of a prunable build.
    pub events: u64,
}

const TERMINAL_FINISHED_BEFORE: &str = "finished_at IS NOT NULL AND finished_at < ?";

impl Store {
    /// The oldest event still stored; when none is, the seq the next event
    /// will get. A reader at position `after` has lost events exactly when
    /// `after + 1 < oldest_retained_seq()`.
    pub async fn oldest_retained_seq(&self) -> Result<u64> {
        match read_int(&self.pool(), "SELECT MIN(seq) FROM events", &[]).await? {
            Some(seq) => Ok(to_u64(seq)),
            None => Ok(self.latest_seq().await? + 1),
        }
    }

    /// [`StoreError::EventsPruned`] when events after `after` were deleted
    /// by retention (a reader resuming there would skip some).
    pub async fn check_events_position(&self, after: u64) -> Result<()> {
        let oldest = self.oldest_retained_seq().await?;
        if after.saturating_add(1) < oldest {
            return Err(StoreError::EventsPruned { after, oldest });
        }
        Ok(())
    }

    /// Deletes up to `limit` of the oldest events whose time is before
    /// `before` (epoch ms), in one transaction, stopping at the first event
    /// that is not (so nothing newer goes, even if times are not in seq
    /// order). Returns how many; less than `limit` means done.
    pub async fn prune_events(&self, before: i64, limit: u32) -> Result<u64> {
        let limit = limit.max(1);
        // Nothing old enough (the usual case once a pass has run): answer
        // from a read, without taking the write lock creates wait on.
        let oldest_at = read_int(
            &self.pool(),
            "SELECT (SELECT at FROM events ORDER BY seq LIMIT 1)",
            &[],
        )
        .await?;
        if oldest_at.is_none_or(|at| at >= before) {
            return Ok(0);
        }
        let mut tx = self.begin().await?;
        let head = tx_ints(
            &mut tx,
            "SELECT seq, at FROM events ORDER BY seq LIMIT ?",
            &[Arg::Int(i64::from(limit))],
        )
        .await?;
        let last = head
            .iter()
            .take_while(|(_, at)| *at < before)
            .last()
            .map(|(seq, _)| *seq);
        let Some(last) = last else {
            return Ok(0);
        };
        let n = tx_execute(
            &mut tx,
            "DELETE FROM events WHERE seq <= ?",
            &[Arg::Int(last)],
        )
        .await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Deletes up to `limit` builds terminal since before `finished_before`
    /// (epoch ms), oldest first, with their log lines, events, idempotency
    /// keys and job-token hashes (all on the build row). Their events go by
    /// deleting every event up to the last of them, in transactions of at
    /// most `limit` rows; log lines likewise; the builds themselves in a
    /// last transaction that re-checks them. A build that got an event since
    /// (only a re-announcement can) waits for the next call.
    pub async fn prune_builds(&self, finished_before: i64, limit: u32) -> Result<BuildsPruned> {
        self.prune_builds_with_messages(finished_before, limit, &[])
            .await
    }

    /// [`Store::prune_builds`], and in the transaction that deletes the
    /// builds, their queue messages on `queue_topics` (topics whose
    /// partition key is the build id) that every consumer group is done
    /// with: a build's messages never outlive it, and a crash leaves both or
    /// neither. A message still pending stays (the queue's own collector
    /// takes it once done).
    pub async fn prune_builds_with_messages(
        &self,
        finished_before: i64,
        limit: u32,
        queue_topics: &[&str],
    ) -> Result<BuildsPruned> {
        let limit = limit.max(1);
        let mut out = BuildsPruned::default();
        // What to delete is read on the pool: the write transactions below
        // re-check it, and a pass that finds nothing takes no write lock.
        let pool = self.pool();
        let ids = read_texts(
            &pool,
            "id",
            &format!(
                "SELECT id FROM builds WHERE {TERMINAL_FINISHED_BEFORE} ORDER BY finished_at, id LIMIT ?"
            ),
            &[Arg::Int(finished_before), Arg::Int(i64::from(limit))],
        )
        .await?;
        if ids.is_empty() {
            return Ok(out);
        }
        let in_ids = placeholders(ids.len());
        let id_args: Vec<Arg<'_>> = ids.iter().map(|s| Arg::Text(s)).collect();
        let last_event = read_int(
            &pool,
            &format!("SELECT MAX(seq) FROM events WHERE build_id IN ({in_ids})"),
            &id_args,
        )
        .await?
        .unwrap_or(0);

        // The log's oldest part, up to the builds' last event, and the
        // builds' log lines: in chunks of `limit` rows while there are more
        // than that; a remainder of at most `limit` goes with the builds
        // in the last transaction (one write transaction per batch in the
        // steady state, where creates wait behind each).
        let delete_events = match self.backend() {
            BackendKind::MySql => "DELETE FROM events WHERE seq <= ? ORDER BY seq LIMIT ?",
            _ => "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE seq <= ? ORDER BY seq LIMIT ?)",
        };
        let count_events = "SELECT COUNT(*) FROM events WHERE seq <= ?";
        while read_int(&pool, count_events, &[Arg::Int(last_event)])
            .await?
            .unwrap_or(0)
            > i64::from(limit)
        {
            let mut tx = self.begin().await?;
            let n = tx_execute(
                &mut tx,
                delete_events,
                &[Arg::Int(last_event), Arg::Int(i64::from(limit))],
            )
            .await?;
            tx.commit().await?;
            out.events += n;
            if n == 0 {
                break;
            }
        }

        let delete_lines = match self.backend() {
            BackendKind::MySql => {
                format!("DELETE FROM log_lines WHERE build_id IN ({in_ids}) LIMIT ?")
            }
            BackendKind::Sqlite => format!(
                "DELETE FROM log_lines WHERE rowid IN \
                 (SELECT rowid FROM log_lines WHERE build_id IN ({in_ids}) LIMIT ?)"
            ),
            BackendKind::Postgres => format!(
                "DELETE FROM log_lines WHERE ctid IN \
                 (SELECT ctid FROM log_lines WHERE build_id IN ({in_ids}) LIMIT ?)"
            ),
        };
        let count_lines = format!("SELECT COUNT(*) FROM log_lines WHERE build_id IN ({in_ids})");
        let mut line_args = id_args.clone();
        line_args.push(Arg::Int(i64::from(limit)));
        while read_int(&pool, &count_lines, &id_args).await?.unwrap_or(0) > i64::from(limit) {
            let mut tx = self.begin().await?;
            let n = tx_execute(&mut tx, &delete_lines, &line_args).await?;
            tx.commit().await?;
            out.log_lines += n;
            if n == 0 {
                break;
            }
        }

        // The builds: still terminal long enough (always, once terminal),
        // and without events left (one appended since the read above).
        let mut tx = self.begin().await?;
        // What is left of the log up to the builds' last event (at most
        // `limit` rows after the chunks above, and events are only ever
        // appended after it).
        out.events += tx_execute(
            &mut tx,
            "DELETE FROM events WHERE seq <= ?",
            &[Arg::Int(last_event)],
        )
        .await?;
        // On the servers a build's last events may still wait for the
        // sequencing pass (ADR 0020): lock the builds first, so that no
        // writer adds pending events and no pass moves them into the log
        // while they are checked and deleted (both need the build row).
        let pending = if self.backend() == BackendKind::Sqlite {
            ""
        } else {
            tx_texts(
                &mut tx,
                "id",
                &format!("SELECT id FROM builds WHERE id IN ({in_ids}) ORDER BY id FOR UPDATE"),
                &id_args,
            )
            .await?;
            " AND NOT EXISTS (SELECT 1 FROM event_pending p WHERE p.build_id = builds.id)"
        };
        let mut args = id_args.clone();
        args.push(Arg::Int(finished_before));
        let doomed = tx_texts(
            &mut tx,
            "id",
            &format!(
                "SELECT id FROM builds WHERE id IN ({in_ids}) AND {TERMINAL_FINISHED_BEFORE} \
                 AND NOT EXISTS (SELECT 1 FROM events e WHERE e.build_id = builds.id){pending}"
            ),
            &args,
        )
        .await?;
        if doomed.is_empty() {
            // The events deleted above are older than a pruned build's and
            // prunable anyway; keep them deleted.
            tx.commit().await?;
            return Ok(out);
        }
        let in_doomed = placeholders(doomed.len());
        let doomed_args: Vec<Arg<'_>> = doomed.iter().map(|s| Arg::Text(s)).collect();
        // Lines appended after the chunks above (a runner's late output).
        out.log_lines += tx_execute(
            &mut tx,
            &format!("DELETE FROM log_lines WHERE build_id IN ({in_doomed})"),
            &doomed_args,
        )
        .await?;
        tx_execute(
            &mut tx,
            &format!("DELETE FROM builds WHERE id IN ({in_doomed})"),
            &doomed_args,
        )
        .await?;
        for topic in queue_topics {
            out.queue_messages += tx.forget_queue_partitions(topic, &doomed).await?;
        }
        tx.commit().await?;
        out.builds = doomed
            .iter()
            .map(|id| {
                id.parse::<BuildId>().map_err(|e| StoreError::Corrupt {
                    what: format!("build id {id:?}"),
                    detail: e.to_string(),
                })
            })
            .collect::<Result<_>>()?;
        Ok(out)
    }

    /// What a pass with these cutoffs (epoch ms; `None` = that kind is not
    /// pruned) would delete now. Reads only.
    pub async fn prunable(
        &self,
        builds_finished_before: Option<i64>,
        events_before: Option<i64>,
    ) -> Result<Prunable> {
        let pool = self.pool();
        let mut out = Prunable::default();
        let mut events_through = 0i64;
        if let Some(before) = builds_finished_before {
            let b = Arg::Int(before);
            out.builds = to_u64(
                read_int(
                    &pool,
                    &format!("SELECT COUNT(*) FROM builds WHERE {TERMINAL_FINISHED_BEFORE}"),
                    &[b],
                )
                .await?
                .unwrap_or(0),
            );
            out.log_lines = to_u64(
                read_int(
                    &pool,
                    &format!(
                        "SELECT COUNT(*) FROM log_lines WHERE build_id IN \
                         (SELECT id FROM builds WHERE {TERMINAL_FINISHED_BEFORE})"
                    ),
                    &[b],
                )
                .await?
                .unwrap_or(0),
            );
            events_through = read_int(
                &pool,
                &format!(
                    "SELECT MAX(seq) FROM events WHERE build_id IN \
                     (SELECT id FROM builds WHERE {TERMINAL_FINISHED_BEFORE})"
                ),
                &[b],
            )
            .await?
            .unwrap_or(0);
        }
        if let Some(before) = events_before {
            let first_kept = read_int(
                &pool,
                "SELECT MIN(seq) FROM events WHERE at >= ?",
                &[Arg::Int(before)],
            )
            .await?;
            let by_age = match first_kept {
                Some(seq) => seq - 1,
                None => to_i64(self.latest_seq().await?),
            };
            events_through = events_through.max(by_age);
        }
        if events_through > 0 {
            out.events = to_u64(
                read_int(
                    &pool,
                    "SELECT COUNT(*) FROM events WHERE seq <= ?",
                    &[Arg::Int(events_through)],
                )
                .await?
                .unwrap_or(0),
            );
        }
        Ok(out)
    }

    /// The database's size in bytes where the backend tells it: the SQLite
    /// file's pages, PostgreSQL's `pg_database_size` (the whole database,
    /// every schema), MySQL's data and index length of this database.
    pub async fn database_size(&self) -> Result<Option<u64>> {
        let sql = match self.backend() {
            BackendKind::Sqlite => {
                "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()"
            }
            BackendKind::Postgres => "SELECT pg_database_size(current_database())::BIGINT",
            BackendKind::MySql => {
                "SELECT CAST(SUM(data_length + index_length) AS SIGNED) \
                 FROM information_schema.tables WHERE table_schema = DATABASE()"
            }
        };
        Ok(read_int(&self.pool(), sql, &[]).await?.map(to_u64))
    }

    /// On SQLite with `auto_vacuum = INCREMENTAL` (new files), how many
    /// pages are free (what [`Store::incremental_vacuum`] could give back);
    /// elsewhere 0.
    pub async fn free_pages(&self) -> Result<u64> {
        if self.backend() != BackendKind::Sqlite {
            return Ok(0);
        }
        let pool = self.pool();
        if read_int(&pool, "PRAGMA auto_vacuum", &[]).await? != Some(2) {
            return Ok(0);
        }
        Ok(to_u64(
            read_int(&pool, "PRAGMA freelist_count", &[])
                .await?
                .unwrap_or(0),
        ))
    }

    /// On SQLite with `auto_vacuum = INCREMENTAL` (new files), gives up to
    /// `max_pages` free pages back to the file system in one write
    /// transaction and returns how many remain free; elsewhere (and on a
    /// file without incremental vacuum) does nothing and returns 0.
    pub async fn incremental_vacuum(&self, max_pages: u32) -> Result<u64> {
        if self.backend() != BackendKind::Sqlite {
            return Ok(0);
        }
        let pool = self.pool();
        if read_int(&pool, "PRAGMA auto_vacuum", &[]).await? != Some(2) {
            return Ok(0);
        }
        let tx = self.begin().await?;
        {
            // The pragma frees one page per step: step it to the end.
            let mut stmt = tx
                .sqlite_handle()?
                .prepare(&format!("PRAGMA incremental_vacuum({})", max_pages.max(1)))?;
            let mut rows = stmt.query([])?;
            while rows.next()?.is_some() {}
        }
        tx.commit().await?;
        Ok(to_u64(
            read_int(&pool, "PRAGMA freelist_count", &[])
                .await?
                .unwrap_or(0),
        ))
    }

    /// Takes or renews lease `name` for `owner` until `now + ttl_ms` (epoch
    /// ms), unless another owner holds it past `now`. True when `owner`
    /// holds it afterwards. The lease row is the one-node-at-a-time rule for
    /// periodic jobs of processes sharing the database (ADR 0013); the time
    /// is the caller's, so a test passes it in.
    pub async fn try_lease(&self, name: &str, owner: &str, now: i64, ttl_ms: i64) -> Result<bool> {
        if owner.is_empty() || name.is_empty() {
            return Err(StoreError::InvalidInput(
                "a lease needs a name and a non-empty owner".into(),
            ));
        }
        let until = now.saturating_add(ttl_ms.max(1));
        let mut tx = self.begin().await?;
        tx_execute(
            &mut tx,
            "UPDATE store_leases SET owner = ?, expires_at = ? \
             WHERE name = ? AND (owner = ? OR owner = '' OR expires_at <= ?)",
            &[
                Arg::Text(owner),
                Arg::Int(until),
                Arg::Text(name),
                Arg::Text(owner),
                Arg::Int(now),
            ],
        )
        .await?;
        // Read back rather than trust the row count: MySQL counts changed
        // rows, and a renewal at the same instant changes nothing.
        let held = tx_texts(
            &mut tx,
            "owner",
            "SELECT owner FROM store_leases WHERE name = ? AND owner = ? AND expires_at = ?",
            &[Arg::Text(name), Arg::Text(owner), Arg::Int(until)],
        )
        .await?;
        tx.commit().await?;
        Ok(!held.is_empty())
    }

    /// Who holds lease `name` at `now`, if anyone.
    pub async fn lease_holder(&self, name: &str, now: i64) -> Result<Option<String>> {
        let mut tx = self.begin().await?;
        let holder = tx_texts(
            &mut tx,
            "owner",
            "SELECT owner FROM store_leases WHERE name = ? AND owner <> '' AND expires_at > ?",
            &[Arg::Text(name), Arg::Int(now)],
        )
        .await?;
        tx.rollback().await?;
        Ok(holder.into_iter().next())
    }

    /// Gives lease `name` back if `owner` holds it.
    pub async fn release_lease(&self, name: &str, owner: &str) -> Result<()> {
        let mut tx = self.begin().await?;
        tx_execute(
            &mut tx,
            "UPDATE store_leases SET owner = '', expires_at = 0 WHERE name = ? AND owner = ?",
            &[Arg::Text(name), Arg::Text(owner)],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}
