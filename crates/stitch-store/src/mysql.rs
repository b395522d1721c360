//! The MySQL / MariaDB backend: its pool and migrations, and its
//! [`Dialect`]: what its SQL writes differently from PostgreSQL's (a
//! duplicate key caught instead of `ON CONFLICT`, a read-back instead of
//! `RETURNING`, events in multi-row inserts). The statements themselves are
//! shared ([`crate::server`]).
//!
//! Connections run at READ COMMITTED (the queue's `pool_options` set it;
//! the group committer's own connection sets it itself), so every statement
//! reads the latest commits and InnoDB takes no gap locks for our reads.
//! Events wait in `event_pending` for the sequencing pass to number them,
//! as on PostgreSQL (ADR 0009, ADR 0016, ADR 0020).

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlRow};
use sqlx::MySqlConnection;

use crate::error::Result;
use crate::model::Event;
use crate::rows::{millis, to_i64, to_json, ReadRow};
use crate::server::{bind, Arg, Dialect, EventTable, ServerOps};

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

/// [`crate::ops::Ops`] on one MySQL connection (pooled, or inside a
/// transaction).
pub(crate) type MySqlOps<'c> = ServerOps<'c, MySql>;

/// MySQL's (and MariaDB's) [`Dialect`].
pub(crate) struct MySql;

fn is_duplicate_key(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .is_some_and(|my| my.number() == DUPLICATE_KEY),
        _ => false,
    }
}

impl Dialect for MySql {
    type Conn = MySqlConnection;
    type Row = MySqlRow;

    async fn execute(conn: &mut MySqlConnection, sql: &str, args: &[Arg<'_>]) -> Result<u64> {
        let done = bind::<sqlx::MySql>(sql, args).execute(conn).await?;
        Ok(done.rows_affected())
    }

    async fn fetch_all(
        conn: &mut MySqlConnection,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Vec<MySqlRow>> {
        Ok(bind::<sqlx::MySql>(sql, args).fetch_all(conn).await?)
    }

    async fn insert_unless_taken(
        conn: &mut MySqlConnection,
        insert: &str,
        args: &[Arg<'_>],
    ) -> Result<bool> {
        // A plain INSERT: a duplicate key fails only this statement (InnoDB
        // keeps the transaction), and unlike INSERT IGNORE no other error
        // (a too-long value, say) is turned into a silent warning.
        match Self::execute(conn, insert, args).await {
            Ok(affected) => Ok(affected == 1),
            Err(crate::error::StoreError::Database(e)) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn add_returning(
        conn: &mut MySqlConnection,
        table: &str,
        column: &str,
        by: i64,
        id: Arg<'_>,
    ) -> Result<Option<i64>> {
        // No RETURNING: the UPDATE locks the row, so reading it back in the
        // same transaction sees exactly this change.
        let update = format!("UPDATE {table} SET {column} = {column} + ? WHERE id = ?");
        if Self::execute(conn, &update, &[Arg::Int(by), id]).await? == 0 {
            return Ok(None);
        }
        let select = format!("SELECT {column} FROM {table} WHERE id = ?");
        let rows = Self::fetch_all(conn, &select, &[id]).await?;
        rows.first().map(|row| row.int(column)).transpose()
    }

    async fn insert_events(
        conn: &mut MySqlConnection,
        into: EventTable,
        events: &[Event],
    ) -> Result<()> {
        // Multi-row inserts. Chunks keep a statement well under MySQL's
        // 65,535 placeholders. A multi-row insert takes its auto-increment
        // ids in row order, so pending ids follow the events' order.
        let head = match into {
            EventTable::Log => {
                "INSERT INTO events (seq, build_id, queue, kind, status, metadata, at) "
            }
            EventTable::Pending => {
                "INSERT INTO event_pending (build_id, queue, kind, status, metadata, at) "
            }
        };
        for chunk in events.chunks(1000) {
            let mut insert = sqlx::QueryBuilder::new(head);
            let mut rows = Vec::with_capacity(chunk.len());
            for e in chunk {
                rows.push((to_i64(e.seq, "event seq")?, to_json(&e.metadata)?, e));
            }
            insert.push_values(rows, |mut row, (seq, metadata, e)| {
                if into == EventTable::Log {
                    row.push_bind(seq);
                }
                row.push_bind(e.build_id.as_str())
                    .push_bind(e.queue.as_str())
                    .push_bind(e.kind.as_str())
                    .push_bind(e.status.as_str())
                    .push_bind(metadata)
                    .push_bind(millis(e.at));
            });
            insert.build().execute(&mut *conn).await?;
        }
        Ok(())
    }
}
