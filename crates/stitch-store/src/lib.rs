//! stitch's build store: build records, idempotency keys, the event log and
//! log lines, on SQLite, PostgreSQL or MySQL/MariaDB.
//!
//! * [`Store`] is the handle (a connection pool), opened from a storage URL
//!   ([`Store::open_url`]) or a [`StorePool`] shared with the message queue.
//!   Reads run on the pool; convenience writes are group-committed.
//! * [`Store::begin`] returns a [`StoreTx`]: every write is available on it,
//!   and [`StoreTx::publish`] publishes queue messages in the same
//!   transaction (transactional outbox; docs/architecture.md); [`Store::write`] gives
//!   synchronous jobs a [`StoreWrite`] with the same powers.
//! * Each status change appends an [`Event`] in the same transaction, with a
//!   gapless database-wide `seq`.
//!
//! The store and the message queue share one database and one
//! `_sqlx_migrations` table: the store's migrations are versions 2001+, the
//! queue's 1001+, and each migrator ignores the other's.
//!
//! Layout: [`model`] value types; `logic` the rules, once for every backend,
//! over the `Ops` trait; `rows` the row decoding every backend shares;
//! `sqlite` SQLite's settings, migrations and SQL; `server` the SQL of the
//! server backends, once, over a `Dialect` that `postgres` and `mysql`
//! implement beside their pools and migrations; `group_commit` the committer; `pool` URLs and migrations. See
//! `docs/architecture.md` ("stitch-store") and ADR 0009.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod announce;
mod error;
mod group_commit;
mod hour_counts;
mod logic;
pub mod model;
mod mysql;
mod ops;
mod overview;
mod pool;
mod postgres;
mod retention;
mod rows;
mod sequencer;
mod server;
mod sqlite;
mod store;
mod write;

pub use announce::{CommitListener, Committed};
pub use error::{Conflict, Result, StoreError};
pub use model::{
    Build, BuildFilter, BuildRecord, CancelOutcome, CreateOutcome, Cursor, Event, EventKind,
    FinishedBuild, FinishedCount, FinishedHour, InvalidCursor, Metadata, NewBuild, OpenBuildCount,
    StoredLogLine, ERROR_KEY, URL_KEY,
};
pub use overview::HourlyHistory;
pub use pool::{migrate, StorePool};
pub use retention::{BuildsPruned, Prunable};
pub use stitch_mq::{BackendKind, StorageFailure};
pub use store::{Store, StoreTx, TxConnection};
pub use write::StoreWrite;
