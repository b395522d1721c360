//! Real database servers for the queue's tests: one PostgreSQL schema or one
//! MySQL database per test (so tests run in parallel), dropped when the
//! handle is dropped. With `STITCH_REQUIRE_DATABASES=1` (CI) a missing server
//! fails the test; otherwise the test is skipped with a notice.
#![allow(dead_code)] // each test binary uses part of this

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::mysql::MySqlConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor};
use stitch_mq::mysql::MySqlDriver;
use stitch_mq::postgres::PostgresDriver;

/// Test databases older than this are left over from killed runs: dropped.
const STALE_SECS: u64 = 3600;

fn required() -> bool {
    matches!(
        std::env::var("STITCH_REQUIRE_DATABASES").as_deref(),
        Ok("1") | Ok("true") | Ok("yes")
    )
}

fn epoch_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `None` = skip (printed); panics when the database is required.
fn unavailable<T>(what: &str, why: String) -> Option<T> {
    if required() {
        panic!("STITCH_REQUIRE_DATABASES is set but {what} is unavailable: {why}");
    }
    eprintln!("skipping: {what} is unavailable ({why}); set {what} to run this test");
    None
}

/// The value of environment variable `var`; `None` = skip (panics when the
/// databases are required).
pub fn url_from_env(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => unavailable(var, format!("{var} is not set")),
    }
}

/// A fresh name: `mqt_<epoch seconds>_<random>`.
fn fresh_name() -> String {
    format!("mqt_{}_{:08x}", epoch_secs(), rand::random::<u32>())
}

fn is_stale(name: &str) -> bool {
    name.strip_prefix("mqt_")
        .and_then(|rest| rest.split('_').next())
        .and_then(|secs| secs.parse::<u64>().ok())
        .is_some_and(|at| at + STALE_SECS < epoch_secs())
}

/// Identifier-safe suffix from a test's storage name.
fn suffix(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(30)
        .collect()
}

/// Runs `f` on a fresh single-thread runtime in its own thread: usable from
/// `Drop` inside a test's runtime.
fn run_detached<F>(f: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let handle = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(f);
        }
    });
    let _ = handle.join();
}

/// A PostgreSQL database for one test: every storage name gets its own schema.
pub struct PgDatabase {
    url: String,
    prefix: String,
    schemas: parking_lot::Mutex<Vec<String>>,
}

impl PgDatabase {
    /// Connects to `STITCH_TEST_POSTGRES_URL`; `None` = skip.
    pub async fn connect() -> Option<Self> {
        Self::connect_to("STITCH_TEST_POSTGRES_URL").await
    }

    /// Connects to the server the environment variable `var` names; `None`
    /// = skip.
    pub async fn connect_to(var: &str) -> Option<Self> {
        let url = url_from_env(var)?;
        let opts = match PgConnectOptions::from_str(&url) {
            Ok(o) => o,
            Err(e) => return unavailable(var, e.to_string()),
        };
        let mut conn = match tokio::time::timeout(Duration::from_secs(10), opts.connect()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return unavailable(var, e.to_string()),
            Err(_) => return unavailable(var, "connect timed out".into()),
        };
        // Leftovers of killed runs.
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'mqt\\_%'",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap_or_default();
        for n in names.into_iter().filter(|n| is_stale(n)) {
            let _ = conn
                .execute(format!("DROP SCHEMA IF EXISTS \"{n}\" CASCADE").as_str())
                .await;
        }
        let _ = conn.close().await;
        Some(Self {
            url,
            prefix: fresh_name(),
            schemas: parking_lot::Mutex::new(Vec::new()),
        })
    }

    /// The schema of storage `name`.
    pub fn schema(&self, name: &str) -> String {
        format!("{}_{}", self.prefix, suffix(name))
    }

    /// The application name the drivers of `name` connect with as `client`.
    pub fn application_name(&self, name: &str, client: &str) -> String {
        format!("{}/{client}", self.schema(name))
    }

    /// Connection options on the schema of `name` (created if missing).
    pub async fn options(&self, name: &str) -> PgConnectOptions {
        self.options_as(name, "main").await
    }

    /// [`Self::options`] for one of several clients (processes) of a schema.
    pub async fn options_as(&self, name: &str, client: &str) -> PgConnectOptions {
        let schema = self.schema(name);
        let base = PgConnectOptions::from_str(&self.url).expect("postgres url");
        let mut admin = base.connect().await.expect("connect to postgres");
        admin
            .execute(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"").as_str())
            .await
            .expect("create schema");
        let _ = admin.close().await;
        {
            let mut s = self.schemas.lock();
            if !s.contains(&schema) {
                s.push(schema.clone());
            }
        }
        base.options([("search_path", schema.as_str())])
            .application_name(&self.application_name(name, client))
    }

    /// A driver on the schema of `name` (the same stored state each time).
    pub async fn driver(&self, name: &str) -> PostgresDriver {
        self.driver_as(name, "main").await
    }

    /// A driver on the schema of `name` for `client`: its own pool and
    /// listener, as another process would have.
    pub async fn driver_as(&self, name: &str, client: &str) -> PostgresDriver {
        let pool = PgPoolOptions::new()
            .max_connections(6)
            .acquire_timeout(Duration::from_secs(20))
            .connect_with(self.options_as(name, client).await)
            .await
            .expect("postgres pool");
        PostgresDriver::from_pool(pool)
            .await
            .expect("postgres driver")
    }

    /// Terminates every server connection of `client`'s drivers on `name`
    /// (the listener's included); returns how many were terminated.
    pub async fn terminate_connections(&self, name: &str, client: &str) -> i64 {
        let mut admin = PgConnectOptions::from_str(&self.url)
            .expect("postgres url")
            .connect()
            .await
            .expect("connect to postgres");
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 AND pid <> pg_backend_pid()) t",
        )
        .bind(self.application_name(name, client))
        .fetch_one(&mut admin)
        .await
        .expect("terminate backends");
        let _ = admin.close().await;
        n
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let schemas = std::mem::take(&mut *self.schemas.lock());
        if schemas.is_empty() {
            return;
        }
        let url = self.url.clone();
        run_detached(async move {
            let Ok(opts) = PgConnectOptions::from_str(&url) else {
                return;
            };
            let Ok(mut conn) = opts.connect().await else {
                return;
            };
            // Connections still open on the schema (a subscription left
            // running) would hold locks: end them first.
            for s in schemas {
                let _ = sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE $1 || '/%'",
                )
                .bind(&s)
                .execute(&mut conn)
                .await;
                let _ = conn
                    .execute(format!("DROP SCHEMA IF EXISTS \"{s}\" CASCADE").as_str())
                    .await;
            }
            let _ = conn.close().await;
        });
    }
}

/// A MySQL / MariaDB server for one test: every storage name gets its own database.
pub struct MySqlDatabase {
    url: String,
    prefix: String,
    databases: parking_lot::Mutex<Vec<String>>,
}

impl MySqlDatabase {
    /// Connects to `STITCH_TEST_MYSQL_URL`; `None` = skip.
    pub async fn connect() -> Option<Self> {
        Self::connect_to("STITCH_TEST_MYSQL_URL").await
    }

    /// Connects to the server the environment variable `var` names; `None`
    /// = skip.
    pub async fn connect_to(var: &str) -> Option<Self> {
        let url = url_from_env(var)?;
        let opts = match MySqlConnectOptions::from_str(&url) {
            Ok(o) => o,
            Err(e) => return unavailable(var, e.to_string()),
        };
        let mut conn = match tokio::time::timeout(Duration::from_secs(10), opts.connect()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return unavailable(var, e.to_string()),
            Err(_) => return unavailable(var, "connect timed out".into()),
        };
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT CAST(schema_name AS CHAR) FROM information_schema.schemata WHERE schema_name LIKE 'mqt\\_%'",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap_or_default();
        for n in names.into_iter().filter(|n| is_stale(n)) {
            let _ = conn
                .execute(format!("DROP DATABASE IF EXISTS `{n}`").as_str())
                .await;
        }
        let _ = conn.close().await;
        Some(Self {
            url,
            prefix: fresh_name(),
            databases: parking_lot::Mutex::new(Vec::new()),
        })
    }

    /// The database of storage `name`.
    pub fn database(&self, name: &str) -> String {
        format!("{}_{}", self.prefix, suffix(name))
    }

    /// Connection options on the database of `name` (created if missing).
    pub async fn options(&self, name: &str) -> MySqlConnectOptions {
        let db = self.database(name);
        let base = MySqlConnectOptions::from_str(&self.url).expect("mysql url");
        let mut admin = base.connect().await.expect("connect to mysql");
        admin
            .execute(format!("CREATE DATABASE IF NOT EXISTS `{db}`").as_str())
            .await
            .expect("create database");
        let _ = admin.close().await;
        {
            let mut d = self.databases.lock();
            if !d.contains(&db) {
                d.push(db.clone());
            }
        }
        base.database(&db)
    }

    /// A driver on the database of `name` (the same stored state each time).
    pub async fn driver(&self, name: &str) -> MySqlDriver {
        let pool = stitch_mq::mysql::pool_options()
            .max_connections(6)
            .acquire_timeout(Duration::from_secs(20))
            .connect_with(self.options(name).await)
            .await
            .expect("mysql pool");
        MySqlDriver::from_pool(pool).await.expect("mysql driver")
    }
}

impl Drop for MySqlDatabase {
    fn drop(&mut self) {
        let dbs = std::mem::take(&mut *self.databases.lock());
        if dbs.is_empty() {
            return;
        }
        let url = self.url.clone();
        run_detached(async move {
            let Ok(opts) = MySqlConnectOptions::from_str(&url) else {
                return;
            };
            let Ok(mut conn) = opts.connect().await else {
                return;
            };
            for d in dbs {
                let _ = conn
                    .execute(format!("DROP DATABASE IF EXISTS `{d}`").as_str())
                    .await;
            }
            let _ = conn.close().await;
        });
    }
}
