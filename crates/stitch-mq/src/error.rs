//! The queue's typed errors. Callers branch on these (the consumer framework
//! decides retry vs dead-letter; the HTTP edge maps them to codes).

use std::time::Duration;

/// Everything that can go wrong in the message queue.
#[derive(Debug, thiserror::Error)]
pub enum MqError {
    /// A topic name outside `[a-z0-9_.-]{1,200}` (starting with a letter or digit).
    #[error("invalid topic name {0:?}: use 1-200 characters of a-z, 0-9, '_', '-', '.', starting with a letter or digit")]
    InvalidTopic(String),
    /// A consumer group or subscriber name that is empty or too long.
    #[error("invalid {kind} {value:?}: must be 1-200 printable characters")]
    InvalidName { kind: &'static str, value: String },
    /// A message id or partition key that is empty, too long or has control characters.
    #[error("invalid message {field}: {reason}")]
    InvalidMessage { field: &'static str, reason: String },
    /// A payload larger than the configured limit.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge { size: usize, limit: usize },
    /// A delay that must be positive was zero.
    #[error("invalid delay {0:?}: {1} needs a delay greater than zero")]
    InvalidDelay(Duration, &'static str),
    /// A subscription or retry setting that cannot work.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// Publishing (or subscribing) after the queue was closed.
    #[error("the queue is closed")]
    Closed,
    /// A second outcome on one delivery (every outcome is one-shot).
    #[error("delivery of message {0:?} was already finalized")]
    AlreadyFinalized(String),
    /// The delivery is no longer the live one: it was redelivered (visibility
    /// timeout) or finalized elsewhere, so this outcome was not applied.
    #[error("delivery of message {0:?} is stale: it was redelivered or finalized elsewhere")]
    StaleDelivery(String),
    /// A dead letter id that does not exist for the topic.
    #[error("no dead letter {id} in topic {topic:?}")]
    UnknownDeadLetter { topic: String, id: i64 },
    /// A topic no consumer group has subscribed to.
    #[error("unknown topic {0:?}: no consumer group has subscribed to it")]
    UnknownTopic(String),
    /// A consumer group that is not registered on the topic.
    #[error("topic {topic:?} has no consumer group {group:?} (its groups: {})", groups.join(", "))]
    UnknownGroup {
        topic: String,
        group: String,
        /// The groups the topic has.
        groups: Vec<String>,
    },
    /// A page size outside the accepted range.
    #[error("invalid limit {limit}: use 1 to {max}")]
    InvalidLimit { limit: usize, max: usize },
    /// A bug or a panic inside the queue (never caused by input).
    #[error("internal queue error: {0}")]
    Internal(String),
    /// Stored data that cannot be decoded (corruption or a newer schema).
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// The storage backend failed.
    #[error("storage error: {0}")]
    Storage(#[from] sqlx::Error),
    /// A statement run directly on a SQLite connection failed.
    #[error("sqlite error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Applying migrations failed.
    #[error("migration error: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
}

/// Why a storage call failed, as far as retrying it is concerned. Every
/// class but [`StorageFailure::Other`] is transient: the same call can succeed
/// once the connection is back, the lock is free or the failover is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageFailure {
    /// The connection broke or the server shut it down (I/O error, server
    /// restart, `pg_terminate_backend`, `KILL CONNECTION`).
    ConnectionLost,
    /// The database chose this transaction as a deadlock victim.
    Deadlock,
    /// A lock or statement wait ran out (`lock_timeout`,
    /// `innodb_lock_wait_timeout`, `statement_timeout`).
    LockTimeout,
    /// A serializable transaction conflicted with another one.
    SerializationFailure,
    /// The server accepts reads only: a replica promoted or demoted during a
    /// failover, or a server in read-only mode.
    ReadOnly,
    /// The database is busy: SQLite's BUSY/LOCKED, a pool with no free
    /// connection, or a server at its connection limit.
    Busy,
    /// Anything else (constraint violations, syntax, corruption): final.
    Other,
}

impl MqError {
    /// The storage failure class of this error, if it came from storage.
    pub fn storage_failure(&self) -> Option<StorageFailure> {
        match self {
            MqError::Storage(e) => Some(classify_sqlx(e)),
            MqError::Sqlite(e) => Some(classify_rusqlite(e)),
            _ => None,
        }
    }

    /// Whether retrying the same call later can succeed (lock contention, I/O,
    /// lost connections, deadlocks, failover). Validation errors and stale
    /// deliveries are final.
    pub fn is_retryable(&self) -> bool {
        self.storage_failure()
            .is_some_and(|f| f != StorageFailure::Other)
    }
}

/// Classifies a `sqlx` error from any of the three SQL backends.
pub fn classify_sqlx(e: &sqlx::Error) -> StorageFailure {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
            StorageFailure::ConnectionLost
        }
        sqlx::Error::PoolTimedOut => StorageFailure::Busy,
        sqlx::Error::Database(db) => {
            if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                classify_postgres(pg.code())
            } else if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
                classify_mysql(my.number())
            } else if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                // SQLite BUSY (5) / LOCKED (6) / IOERR (10) and their
                // extended codes (the primary code is the low byte).
                let code = db.code().unwrap_or_default();
                match code.parse::<i64>().map(|c| c & 0xff).unwrap_or(-1) {
                    5 | 6 => StorageFailure::Busy,
                    10 => StorageFailure::ConnectionLost,
                    _ => StorageFailure::Other,
                }
            } else {
                StorageFailure::Other
            }
        }
        _ => StorageFailure::Other,
    }
}

/// Classifies an error of a statement run on a raw SQLite handle.
pub fn classify_rusqlite(e: &rusqlite::Error) -> StorageFailure {
    match e {
        rusqlite::Error::SqliteFailure(e, _) => match e.code {
            rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked => {
                StorageFailure::Busy
            }
            rusqlite::ErrorCode::SystemIoFailure => StorageFailure::ConnectionLost,
            _ => StorageFailure::Other,
        },
        _ => StorageFailure::Other,
    }
}

/// PostgreSQL SQLSTATE → class.
fn classify_postgres(sqlstate: &str) -> StorageFailure {
    match sqlstate {
        // connection_exception class; admin_shutdown, crash_shutdown,
        // cannot_connect_now (a restarting or recovering server).
        s if s.starts_with("08") => StorageFailure::ConnectionLost,
        "57P01" | "57P02" | "57P03" => StorageFailure::ConnectionLost,
        "40P01" => StorageFailure::Deadlock,
        "40001" => StorageFailure::SerializationFailure,
        // lock_not_available (lock_timeout, NOWAIT), query_canceled (statement_timeout).
        "55P03" | "57014" => StorageFailure::LockTimeout,
        // read_only_sql_transaction: a hot standby, e.g. the old primary after a failover.
        "25006" => StorageFailure::ReadOnly,
        // too_many_connections
        "53300" => StorageFailure::Busy,
        _ => StorageFailure::Other,
    }
}

/// MySQL / MariaDB error number → class.
fn classify_mysql(number: u16) -> StorageFailure {
    match number {
        1213 => StorageFailure::Deadlock,
        // ER_LOCK_WAIT_TIMEOUT, ER_LOCK_NOWAIT
        1205 | 3572 => StorageFailure::LockTimeout,
        // ER_OPTION_PREVENTS_STATEMENT (--read-only), ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION,
        // ER_READ_ONLY_MODE
        1290 | 1792 | 1836 => StorageFailure::ReadOnly,
        // ER_SERVER_SHUTDOWN, ER_CONNECTION_KILLED (MariaDB), CR_SERVER_GONE_ERROR,
        // CR_SERVER_LOST, ER_CLIENT_INTERACTION_TIMEOUT (MySQL 8)
        1053 | 1927 | 2006 | 2013 | 4031 => StorageFailure::ConnectionLost,
        // ER_CON_COUNT_ERROR, ER_TOO_MANY_USER_CONNECTIONS
        1040 | 1203 => StorageFailure::Busy,
        _ => StorageFailure::Other,
    }
}

/// Result alias for the queue.
pub type MqResult<T> = Result<T, MqError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_codes() {
        assert_eq!(classify_postgres("40P01"), StorageFailure::Deadlock);
        assert_eq!(
            classify_postgres("40001"),
            StorageFailure::SerializationFailure
        );
        assert_eq!(classify_postgres("55P03"), StorageFailure::LockTimeout);
        assert_eq!(classify_postgres("25006"), StorageFailure::ReadOnly);
        assert_eq!(classify_postgres("57P01"), StorageFailure::ConnectionLost);
        assert_eq!(classify_postgres("08006"), StorageFailure::ConnectionLost);
        assert_eq!(classify_postgres("23505"), StorageFailure::Other);
    }

    #[test]
    fn mysql_numbers() {
        assert_eq!(classify_mysql(1213), StorageFailure::Deadlock);
        assert_eq!(classify_mysql(1205), StorageFailure::LockTimeout);
        assert_eq!(classify_mysql(1792), StorageFailure::ReadOnly);
        assert_eq!(classify_mysql(1927), StorageFailure::ConnectionLost);
        assert_eq!(classify_mysql(1062), StorageFailure::Other);
    }
}
