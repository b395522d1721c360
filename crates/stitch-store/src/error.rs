//! Typed store errors: callers branch on the variant (404 / 409 / 422 / retry).

use stitch_core::{BuildId, BuildStatus};

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
    /// Whether running the same operation again may succeed: the database was
    /// busy/locked, an I/O or pool error occurred, or a concurrent writer won an
    /// optimistic-concurrency race. Everything else is permanent for that input.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Database(e) => is_retryable_sqlx(e),
            StoreError::Sqlite(e) => e.sqlite_error_code().is_some_and(|code| {
                use rusqlite::ErrorCode;
                matches!(
                    code,
                    ErrorCode::DatabaseBusy
                        | ErrorCode::DatabaseLocked
                        | ErrorCode::SystemIoFailure
                )
            }),
            StoreError::Conflict(Conflict::VersionMismatch { .. }) => true,
            StoreError::GroupCommit { retryable, .. } => *retryable,
            StoreError::Migrate(
                sqlx::migrate::MigrateError::Execute(e)
                | sqlx::migrate::MigrateError::ExecuteMigration(e, _),
            ) => is_retryable_sqlx(e),
            _ => false,
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

/// Classifies a driver error as transient.
fn is_retryable_sqlx(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| is_retryable_code(&code)),
        _ => false,
    }
}

/// SQLite reports its (extended) result code as a decimal string; PostgreSQL
/// and MySQL report a SQLSTATE.
fn is_retryable_code(code: &str) -> bool {
    const SQLITE_BUSY: i32 = 5;
    const SQLITE_LOCKED: i32 = 6;
    const SQLITE_IOERR: i32 = 10;
    // SQLSTATE serialization_failure, deadlock_detected, lock_not_available
    // (checked first: "40001" would also parse as a number).
    if matches!(code, "40001" | "40P01" | "55P03") {
        return true;
    }
    // Extended codes carry the primary code in the low byte
    // (SQLITE_BUSY_SNAPSHOT = 517, SQLITE_LOCKED_SHAREDCACHE = 262, …).
    code.parse::<i32>()
        .is_ok_and(|n| matches!(n & 0xff, SQLITE_BUSY | SQLITE_LOCKED | SQLITE_IOERR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_and_sqlstate_codes_classify() {
        assert!(is_retryable_code("5"));
        assert!(is_retryable_code("517"));
        assert!(is_retryable_code("262"));
        assert!(is_retryable_code("10"));
        assert!(is_retryable_code("40001"));
        assert!(!is_retryable_code("2067")); // SQLITE_CONSTRAINT_UNIQUE
        assert!(!is_retryable_code("23505"));
        assert!(StoreError::Database(sqlx::Error::PoolTimedOut).is_retryable());
        assert!(!StoreError::Database(sqlx::Error::RowNotFound).is_retryable());
        assert!(!StoreError::NotFound(BuildId::new()).is_retryable());
        let busy = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(5), None);
        assert!(StoreError::Sqlite(busy).is_retryable());
        let unique = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(2067), None);
        assert!(!StoreError::Sqlite(unique).is_retryable());
    }
}
