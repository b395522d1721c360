//! Why a spindle operation failed.

use stitch_store::StoreError;

/// Errors of the spindle's own state and clients.
#[derive(Debug, thiserror::Error)]
pub enum SpindleError {
    /// The store (shared database) failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A spindle statement failed.
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A spindle read failed.
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// Applying the spindle's migrations failed.
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The spindle keeps its own tables in the store's SQLite database and
    /// runs its statements on the raw SQLite handle, so it refuses to start
    /// on a store on another backend (`storage.url` = `postgres://…` or
    /// `mysql://…`).
    #[error(
        "the spindle needs SQLite storage (storage.url = sqlite://PATH); this server's store is on {0:?}"
    )]
    UnsupportedStorage(stitch_store::BackendKind),
    /// A record could not be encoded.
    #[error("encoding: {0}")]
    Encode(#[from] serde_json::Error),
}
