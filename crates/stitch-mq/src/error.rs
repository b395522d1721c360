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

impl MqError {
    /// Whether retrying the same call later can succeed (lock contention, I/O,
    /// lost connections). Validation errors and stale deliveries are final.
    pub fn is_retryable(&self) -> bool {
        match self {
            MqError::Storage(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                sqlx::Error::Database(db) => {
                    // SQLite BUSY (5) / LOCKED (6) and their extended codes.
                    let code = db.code().unwrap_or_default();
                    let primary = code.parse::<i64>().map(|c| c & 0xff).unwrap_or(-1);
                    primary == 5 || primary == 6
                }
                _ => false,
            },
            MqError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy
                    | rusqlite::ErrorCode::DatabaseLocked
                    | rusqlite::ErrorCode::SystemIoFailure
            ),
            _ => false,
        }
    }
}

/// Result alias for the queue.
pub type MqResult<T> = Result<T, MqError>;
