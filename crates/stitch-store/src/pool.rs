//! From a storage URL to a connection pool, and the store's migrations on
//! it. The pool is what the store and the message queue share: one database,
//! one `_sqlx_migrations` table (the queue's versions 1001+, the store's
//! 2001+), and one transaction for "record intent + publish".

use std::path::Path;

use sqlx::mysql::MySqlPool;
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;
use stitch_mq::BackendKind;

use crate::error::{Result, StoreError};
use crate::{mysql, postgres, sqlite};

/// A connection pool on one of the store's databases. Cheap to clone.
#[derive(Debug, Clone)]
pub enum StorePool {
    /// An embedded SQLite file.
    Sqlite(SqlitePool),
    /// A PostgreSQL server (the schema is the connection's `search_path`).
    Postgres(PgPool),
    /// A MySQL or MariaDB server (the database named in the URL).
    MySql(MySqlPool),
}

impl StorePool {
    /// Connects to the database `url` names, without migrating it:
    /// `sqlite://PATH` (or `sqlite:PATH`; the file is created if missing),
    /// `postgres://…` / `postgresql://…`, `mysql://…` / `mariadb://…`.
    /// Pools get the settings the message queue relies on, so the queue's
    /// driver can be built on the same pool. A malformed URL or an unknown
    /// scheme is [`StoreError::InvalidUrl`], with any password masked.
    pub async fn connect(url: &str) -> Result<StorePool> {
        let kind = BackendKind::of_url(url).map_err(|_| {
            StoreError::InvalidUrl(format!(
                "{:?}: use sqlite://PATH, postgres://… or mysql://…",
                stitch_mq::open::redact(url)
            ))
        })?;
        let invalid = |e: StoreError| match e {
            StoreError::Queue(stitch_mq::MqError::Storage(sqlx::Error::Configuration(e))) => {
                StoreError::InvalidUrl(format!("{}: {e}", stitch_mq::open::redact(url)))
            }
            StoreError::Database(sqlx::Error::Configuration(e)) => {
                StoreError::InvalidUrl(format!("{}: {e}", stitch_mq::open::redact(url)))
            }
            other => other,
        };
        if kind != BackendKind::Sqlite {
            check_tls_files(url)?;
        }
        Ok(match kind {
            BackendKind::Sqlite => {
                let path = sqlite_path(url)?;
                let pool = stitch_mq::sqlite::open_pool(path)
                    .await
                    .map_err(|e| match e {
                        stitch_mq::MqError::Storage(e) => StoreError::Database(e),
                        other => other.into(),
                    })?;
                StorePool::Sqlite(pool)
            }
            BackendKind::Postgres => {
                StorePool::Postgres(postgres::open_pool(url).await.map_err(invalid)?)
            }
            BackendKind::MySql => {
                let url = match url.strip_prefix("mariadb:") {
                    Some(rest) => format!("mysql:{rest}"),
                    None => url.to_string(),
                };
                StorePool::MySql(mysql::open_pool(&url).await.map_err(invalid)?)
            }
        })
    }

    /// Which database engine this is.
    pub fn kind(&self) -> BackendKind {
        match self {
            StorePool::Sqlite(_) => BackendKind::Sqlite,
            StorePool::Postgres(_) => BackendKind::Postgres,
            StorePool::MySql(_) => BackendKind::MySql,
        }
    }

    /// Closes the pool, waiting for checked-out connections to come back.
    pub async fn close(&self) {
        match self {
            StorePool::Sqlite(p) => p.close().await,
            StorePool::Postgres(p) => p.close().await,
            StorePool::MySql(p) => p.close().await,
        }
    }
}

impl From<SqlitePool> for StorePool {
    fn from(pool: SqlitePool) -> Self {
        StorePool::Sqlite(pool)
    }
}

impl From<PgPool> for StorePool {
    fn from(pool: PgPool) -> Self {
        StorePool::Postgres(pool)
    }
}

impl From<MySqlPool> for StorePool {
    fn from(pool: MySqlPool) -> Self {
        StorePool::MySql(pool)
    }
}

/// Applies the store's migrations for the pool's backend (versions 2001+ from
/// `migrations/<backend>/`) and nothing else: what `stitch migrate` runs
/// beside the queue's. Applying them twice is a no-op; other components'
/// versions in the shared table are ignored.
pub async fn migrate(pool: &StorePool) -> Result<()> {
    match pool {
        StorePool::Sqlite(p) => sqlite::migrate(p).await,
        StorePool::Postgres(p) => postgres::migrate(p).await,
        StorePool::MySql(p) => mysql::migrate(p).await,
    }
}

/// URL parameters that name a certificate or key file, PostgreSQL's and
/// MySQL's spellings (sqlx accepts both on either backend).
const TLS_FILE_PARAMS: &[&str] = &[
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
];

/// Refuses a server URL whose TLS file parameters (`sslrootcert=`,
/// `ssl-ca=`, client certificate and key) name a file stitch cannot read.
/// sqlx would only report the bare I/O error ("No such file or directory")
/// once connecting, without saying which file.
fn check_tls_files(url: &str) -> Result<()> {
    // A URL sqlx cannot parse gets sqlx's own error when connecting.
    let Ok(parsed) = url::Url::parse(url) else {
        return Ok(());
    };
    for (key, path) in parsed.query_pairs() {
        if !TLS_FILE_PARAMS.contains(&key.as_ref()) {
            continue;
        }
        if let Err(e) = std::fs::File::open(path.as_ref()) {
            return Err(StoreError::InvalidUrl(format!(
                "{}: cannot read the {key} file {path:?}: {e}",
                stitch_mq::open::redact(url)
            )));
        }
    }
    Ok(())
}

/// The file path of a `sqlite://PATH` or `sqlite:PATH` URL.
fn sqlite_path(url: &str) -> Result<&Path> {
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or_default();
    if path.is_empty() {
        return Err(StoreError::InvalidUrl(
            "sqlite URL without a path: use sqlite://PATH".into(),
        ));
    }
    Ok(Path::new(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_urls_are_refused_without_the_password() {
        for url in ["redis://user:secret@host/0", "no-scheme", "sqlite://"] {
            let err = StorePool::connect(url).await.unwrap_err();
            assert!(matches!(err, StoreError::InvalidUrl(_)), "{url}: {err:?}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }

    #[tokio::test]
    async fn unreadable_tls_files_are_named_without_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-ca.crt");
        for (url, key) in [
            (
                format!(
                    "postgres://stitch:secret@127.0.0.1:1/db?sslmode=verify-full&sslrootcert={}",
                    missing.display()
                ),
                "sslrootcert",
            ),
            (
                format!(
                    "mysql://stitch:secret@127.0.0.1:1/db?ssl-mode=VERIFY_IDENTITY&ssl-ca={}",
                    missing.display()
                ),
                "ssl-ca",
            ),
        ] {
            // Port 1: nothing is contacted, the check comes first.
            let err = StorePool::connect(&url).await.unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, StoreError::InvalidUrl(_)), "{err:?}");
            assert!(text.contains(key), "{text}");
            assert!(text.contains(&missing.display().to_string()), "{text}");
            assert!(!text.contains("secret"), "{text}");
        }
    }

    #[tokio::test]
    async fn a_sqlite_url_opens_and_migrates_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("s.db").display());
        let pool = StorePool::connect(&url).await.unwrap();
        assert_eq!(pool.kind(), BackendKind::Sqlite);
        migrate(&pool).await.unwrap();
        migrate(&pool).await.unwrap();
        assert!(dir.path().join("s.db").exists());
    }
}
