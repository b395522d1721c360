//! The workspace's one `unsafe` (ADR 0002): a pooled sqlx SQLite
//! connection whose raw handle is borrowed as a `rusqlite::Connection`, so a
//! whole operation or transaction runs synchronously on the calling thread
//! in one hand-off to sqlx's worker instead of one per statement.
#![allow(unsafe_code)]

use sqlx::pool::PoolConnection;
use sqlx::{Sqlite, SqliteConnection, SqlitePool};

/// A pooled connection owned for as long as its raw handle is borrowed.
///
/// Use [`handle`](Self::handle) for synchronous statements and
/// [`sqlx`](Self::sqlx) for another crate's async statements on the same
/// connection (the same transaction); the borrow rules keep the two apart.
pub struct RawSqlite {
    // Declared before `conn`: dropped first, since it borrows conn's handle.
    raw: rusqlite::Connection,
    conn: PoolConnection<Sqlite>,
}

impl std::fmt::Debug for RawSqlite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawSqlite").finish_non_exhaustive()
    }
}

impl RawSqlite {
    /// Takes a connection from `pool` and borrows its raw handle (one
    /// hand-off to the connection's sqlx worker).
    pub async fn acquire<E>(pool: &SqlitePool) -> Result<Self, E>
    where
        E: From<sqlx::Error> + From<rusqlite::Error>,
    {
        let mut conn = pool.acquire().await?;
        let raw = {
            let mut locked = conn.lock_handle().await?;
            let handle = locked.as_raw_handle();
            // SAFETY: the one safety argument for every raw-handle use in
            // stitch.
            // - One thread at a time: `conn` is owned by this value for its
            //   whole life, so commands reach its sqlx worker only through
            //   `sqlx()`, which takes `&mut self` and so excludes any live
            //   borrow of `raw` (`handle()` takes `&self`); each such command
            //   is awaited to completion before the borrow ends. sqlx's
            //   worker does not touch the handle between commands.
            // - Never closed twice or used after close: `raw` is dropped
            //   before `conn` (field order), and a connection made with
            //   `from_handle` never closes the handle it borrows.
            // - Same library: rusqlite and sqlx link the same
            //   `libsqlite3-sys` (one version in Cargo.lock), so the handle
            //   type is the same.
            unsafe { rusqlite::Connection::from_handle(handle.as_ptr()) }?
        };
        Ok(Self { raw, conn })
    }

    /// The raw connection, for statements that run synchronously.
    pub fn handle(&self) -> &rusqlite::Connection {
        &self.raw
    }

    /// The sqlx connection, for async statements on the same connection.
    pub fn sqlx(&mut self) -> &mut SqliteConnection {
        &mut self.conn
    }

    /// Closes the connection when this value is dropped instead of
    /// returning it to the pool (it may be left inside a transaction).
    pub fn close_on_drop(&mut self) {
        self.conn.close_on_drop();
    }
}
