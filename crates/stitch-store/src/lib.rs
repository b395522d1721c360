//! stitch's build store: build records, idempotency keys, the event log and
//! log lines, on SQLite today and designed for PostgreSQL/MySQL later.
//!
//! * [`Store`] is the handle (a connection pool). Reads run on the pool;
//!   each convenience write runs in its own transaction.
//! * [`Store::begin`] returns a [`StoreTx`]: every write is available on it,
//!   and [`StoreTx::conn`] lets the message queue publish in the same
//!   transaction (transactional outbox, DESIGN §2).
//! * Each status change appends an [`Event`] in the same transaction, with a
//!   gapless database-wide `seq`.
//!
//! The store and the message queue share one database and one
//! `_sqlx_migrations` table: the store's migrations are versions 2001+, the
//! queue's 1001+, and each migrator ignores the other's.
//!
//! Layout: [`model`] value types; `logic` the rules, once for every backend,
//! over the `Ops` trait; `sqlite` the SQLite connection settings,
//! migrations and SQL. See `docs/architecture-store.md`.

#![warn(missing_docs)]

mod error;
mod group_commit;
mod logic;
pub mod model;
mod ops;
mod sqlite;
mod store;

pub use error::{Conflict, Result, StoreError};
pub use model::{
    Build, BuildFilter, BuildRecord, CancelOutcome, CreateOutcome, Cursor, Event, EventKind,
    InvalidCursor, Metadata, NewBuild, StoredLogLine, ERROR_KEY, URL_KEY,
};
pub use store::{Store, StoreTx, StoreWrite};
