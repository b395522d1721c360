//! Typed store errors: callers branch on the variant (404 / 409 / 422 / retry).

use stitch_core::{BuildId, BuildStatus};
use stitch_mq::error::{classify_rusqlite, classify_sqlx};
use stitch_mq::{BackendKind, StorageFailure};

/// Result alias for store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Everything a store operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No build with this id exists.
    #[error("build {0} not found")]
    NotFound(BuildId),

    /// The write lost against another writer or contradicts existing state.
    #[error(transparent)]
    Conflict(#[from] Conflict),

    /// The build is terminal and terminal builds are write-once.
    #[error("build {id} is {from}, which is terminal: cannot {attempted}")]
    InvalidTransition {
        /// The build that was addressed.
        id: BuildId,
        /// Its current (terminal) status.
        from: BuildStatus,
        /// What the caller tried, for humans (`"move to running"`, …).
        attempted: String,
    },

    /// The request itself is malformed (empty queue name, empty key, …).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// A stored value could not be decoded (hand-edited row, foreign writer).
    #[error("stored {what} is corrupt: {detail}")]
    Corrupt {
        /// Which value (`"build b_… runner_metadata"`, …).
        what: String,
        /// The decoder's complaint.
        detail: String,
    },

    /// Applying the schema migrations failed.
    #[error("store migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// The database driver failed; see [`StoreError::is_retryable`].
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

    /// A SQLite statement run on the connection's raw handle failed (ADR 0002);
    /// see [`StoreError::is_retryable`].
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),

    /// The shared transaction a group-committed write ran in did not commit,
    /// so neither did the write.
    #[error("the shared write transaction failed: {message}")]
    GroupCommit {
        /// The transaction's error.
        message: String,
        /// Whether that error was transient.
        retryable: bool,
    },

    /// A message-queue operation on the store's database failed (an outbox
    /// publish in a store transaction); see [`StoreError::is_retryable`].
    #[error("queue: {0}")]
    Queue(#[from] stitch_mq::MqError),

    /// The storage URL is malformed or names an unsupported database.
    #[error("invalid storage URL: {0}")]
    InvalidUrl(String),

    /// The operation exists only on another database backend (the raw
    /// SQLite handle asked of a PostgreSQL store, say).
    #[error("{operation} needs a {needed:?} store, but this store is on {actual:?}")]
    WrongBackend {
        /// What was asked for.
        operation: &'static str,
        /// The backend it needs.
        needed: BackendKind,
        /// The store's backend.
        actual: BackendKind,
    },

    /// Events after `after` were deleted by retention: a reader resuming
    /// there would skip them. `oldest` is the oldest event still stored
    /// (the log's next seq when none is).
    #[error("events after {after} were pruned; the oldest retained event is {oldest}")]
    EventsPruned {
        /// The position the reader asked to resume after.
        after: u64,
        /// The oldest retained event's seq.
        oldest: u64,
    },

    /// A bug inside the store, not caused by the input or the database.
    #[error("internal store error: {0}")]
    Internal(String),
}

/// The kinds of [`StoreError::Conflict`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    /// A compare-and-set on the status failed (`expected_from` did not match).
    #[error("build {id} is {actual}, expected {expected}")]
    UnexpectedStatus {
        /// The build that was addressed.
        id: BuildId,
        /// The status the caller expected.
        expected: BuildStatus,
        /// The status it actually has.
        actual: BuildStatus,
    },
    /// The row changed between read and write (optimistic concurrency).
    #[error("build {id} was modified concurrently (expected version {expected})")]
    VersionMismatch {
        /// The build that was addressed.
        id: BuildId,
        /// The version the write was based on.
        expected: i64,
    },
    /// A create reused an existing build id for a different queue or key.
    #[error("build id {0} already exists with a different queue or idempotency key")]
    DuplicateId(BuildId),
}

impl StoreError {
    /// The storage failure class of a database error — the same
    /// classification the message queue uses (`stitch_mq::StorageFailure`):
    /// connection lost, deadlock, lock wait timeout, serialization failure,
    /// read-only server (failover) and busy are transient. `None` for errors
    /// that did not come from the database.
    pub fn storage_failure(&self) -> Option<StorageFailure> {
        match self {
            StoreError::Database(e) => Some(classify_sqlx(e)),
            StoreError::Sqlite(e) => Some(classify_rusqlite(e)),
            StoreError::Migrate(
                sqlx::migrate::MigrateError::Execute(e)
                | sqlx::migrate::MigrateError::ExecuteMigration(e, _),
            ) => Some(classify_sqlx(e)),
            StoreError::Queue(e) => e.storage_failure(),
            _ => None,
        }
    }

    /// Whether running the same operation again may succeed: a transient
    /// database failure (see [`StoreError::storage_failure`]), a shared
    /// transaction that failed for one, or a concurrent writer that won an
    /// optimistic-concurrency race. Everything else is permanent for that input.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Conflict(Conflict::VersionMismatch { .. }) => true,
            StoreError::GroupCommit { retryable, .. } => *retryable,
            _ => self
                .storage_failure()
                .is_some_and(|f| f != StorageFailure::Other),
        }
    }

    /// Whether the operation was refused for its input or the state it met
    /// (not found, conflict, terminal, invalid input), having written nothing;
    /// the surrounding transaction stays usable. Database and internal errors
    /// are not refusals.
    pub fn is_request_refusal(&self) -> bool {
        matches!(
            self,
            StoreError::NotFound(_)
                | StoreError::Conflict(_)
                | StoreError::InvalidTransition { .. }
                | StoreError::InvalidInput(_)
        )
    }

    /// Whether this is [`StoreError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound(_))
    }

    pub(crate) fn corrupt(what: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        StoreError::Corrupt {
            what: what.into(),
            detail: detail.to_string(),
        }
    }
}

/// A raw-handle operation asked of a transaction on another engine.
pub(crate) fn wrong_backend(operation: &'static str, actual: BackendKind) -> StoreError {
    StoreError::WrongBackend {
        operation,
        needed: BackendKind::Sqlite,
        actual,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_failures_classify_like_the_queue() {
        assert!(StoreError::Database(sqlx::Error::PoolTimedOut).is_retryable());
        assert!(
            StoreError::Database(sqlx::Error::Io(std::io::ErrorKind::BrokenPipe.into()))
                .is_retryable()
        );
        assert!(!StoreError::Database(sqlx::Error::RowNotFound).is_retryable());
        assert!(!StoreError::NotFound(BuildId::new()).is_retryable());
        let busy = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(5), None);
        assert_eq!(
            StoreError::Sqlite(busy).storage_failure(),
            Some(StorageFailure::Busy)
        );
        let io = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(10), None);
        assert!(StoreError::Sqlite(io).is_retryable());
        let unique = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(2067), None);
        assert!(!StoreError::Sqlite(unique).is_retryable());
        let wrong = StoreError::WrongBackend {
            operation: "the raw SQLite handle",
            needed: BackendKind::Sqlite,
            actual: BackendKind::Postgres,
        };
        assert!(!wrong.is_retryable());
        assert!(wrong.to_string().contains("Postgres"), "{wrong}");
    }
}
