//! The store's conformance harness: every suite test runs against a SQLite
//! file in a temp dir, a PostgreSQL schema of its own and a MariaDB/MySQL
//! database of its own (so the suite runs in parallel). The servers come from
//! `STITCH_TEST_POSTGRES_URL` / `STITCH_TEST_MYSQL_URL`; unset, those tests
//! are skipped — unless `STITCH_REQUIRE_DATABASES=1`, where they fail.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::Row;
use stitch_core::BuildId;
use stitch_store::{BackendKind, Metadata, NewBuild, Store, StorePool, TxConnection};
use tempfile::TempDir;

// The queue's per-test schema/database helpers, shared rather than copied.
#[path = "../../../stitch-mq/tests/support/mod.rs"]
mod support;

pub use support::{MySqlDatabase, PgDatabase};

/// The storage name every test uses inside its own fresh schema/database.
const NAME: &str = "store";

/// Where a test's database lives.
enum Place {
    Sqlite { _dir: TempDir, path: PathBuf },
    Postgres(PgDatabase),
    MySql(MySqlDatabase),
}

/// One test's database and a store on it.
pub struct TestDb {
    pub store: Store,
    place: Place,
}

impl TestDb {
    /// `n` builds of queue `app` created on this database's own store,
    /// their ids in creation order.
    pub async fn create_builds(&self, n: usize) -> Vec<BuildId> {
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            ids.push(
                self.store
                    .create_build(new_build("app"))
                    .await
                    .unwrap()
                    .into_build()
                    .id,
            );
        }
        ids
    }

    /// Which backend this test runs on.
    pub fn kind(&self) -> BackendKind {
        self.store.backend()
    }

    /// The SQLite file (SQLite-only checks).
    pub fn path(&self) -> Option<&PathBuf> {
        match &self.place {
            Place::Sqlite { path, .. } => Some(path),
            _ => None,
        }
    }

    /// A new pool on the same database, as another process would have
    /// (`client` names it; on PostgreSQL it becomes the application name).
    pub async fn pool_as(&self, client: &str) -> StorePool {
        match &self.place {
            Place::Sqlite { path, .. } => {
                StorePool::connect(&format!("sqlite://{}", path.display()))
                    .await
                    .unwrap()
            }
            Place::Postgres(db) => StorePool::Postgres(
                PgPoolOptions::new()
                    .max_connections(6)
                    .acquire_timeout(Duration::from_secs(30))
                    .connect_with(db.options_as(NAME, client).await)
                    .await
                    .unwrap(),
            ),
            Place::MySql(db) => StorePool::MySql(
                stitch_mq::mysql::pool_options()
                    .max_connections(6)
                    .acquire_timeout(Duration::from_secs(30))
                    .connect_with(db.options(NAME).await)
                    .await
                    .unwrap(),
            ),
        }
    }

    /// Another store handle on the same database with its own pool and
    /// committer: what a second `stitch serve` process would hold.
    pub async fn another_store(&self, client: &str) -> Store {
        Store::from_pool(self.pool_as(client).await).await.unwrap()
    }

    /// Runs one statement outside the store (no parameters: tests inline
    /// their own literals).
    pub async fn exec(&self, sql: &str) {
        exec_on(&self.store, sql).await;
    }

    /// The first column of every row of `sql`, as text.
    pub async fn strings(&self, sql: &str) -> Vec<String> {
        match self.store.pool() {
            StorePool::Sqlite(p) => sqlx::query(sql)
                .fetch_all(&p)
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<String, _>(0))
                .collect(),
            StorePool::Postgres(p) => sqlx::query(sql)
                .fetch_all(&p)
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<String, _>(0))
                .collect(),
            // Binary-collation columns come back as bytes.
            StorePool::MySql(p) => sqlx::query(sql)
                .fetch_all(&p)
                .await
                .unwrap()
                .iter()
                .map(|r| String::from_utf8(r.get::<Vec<u8>, _>(0)).unwrap())
                .collect(),
        }
    }

    /// The first column of every row of `sql`, as integers.
    pub async fn ints(&self, sql: &str) -> Vec<i64> {
        match self.store.pool() {
            StorePool::Sqlite(p) => sqlx::query_scalar(sql).fetch_all(&p).await.unwrap(),
            StorePool::Postgres(p) => sqlx::query_scalar(sql).fetch_all(&p).await.unwrap(),
            StorePool::MySql(p) => sqlx::query_scalar(sql).fetch_all(&p).await.unwrap(),
        }
    }

    /// PostgreSQL only: terminates every server connection of this test's
    /// main store (its pool's and its committer's); how many were ended.
    pub async fn terminate_connections(&self) -> i64 {
        match &self.place {
            Place::Postgres(db) => db.terminate_connections(NAME, "main").await,
            _ => panic!("terminate_connections is PostgreSQL-only"),
        }
    }

    /// Closes this test's store pool (the database stays).
    pub async fn close(&self) {
        self.store.close().await;
    }
}

/// Runs one statement on `store`'s pool, outside the store (no
/// parameters: tests inline their own literals).
#[allow(dead_code)] // not every test file runs statements on another store
pub async fn exec_on(store: &Store, sql: &str) {
    match store.pool() {
        StorePool::Sqlite(p) => drop(sqlx::query(sql).execute(&p).await.unwrap()),
        StorePool::Postgres(p) => drop(sqlx::query(sql).execute(&p).await.unwrap()),
        StorePool::MySql(p) => drop(sqlx::query(sql).execute(&p).await.unwrap()),
    }
}

/// Runs one statement inside a store transaction.
pub async fn tx_exec(conn: TxConnection<'_>, sql: &str) {
    match conn {
        TxConnection::Sqlite(c) => drop(sqlx::query(sql).execute(c).await.unwrap()),
        TxConnection::Postgres(c) => drop(sqlx::query(sql).execute(c).await.unwrap()),
        TxConnection::MySql(c) => drop(sqlx::query(sql).execute(c).await.unwrap()),
    }
}

/// A `COUNT(*)`-like integer inside a store transaction.
pub async fn tx_count(conn: TxConnection<'_>, sql: &str) -> i64 {
    match conn {
        TxConnection::Sqlite(c) => sqlx::query_scalar(sql).fetch_one(c).await.unwrap(),
        TxConnection::Postgres(c) => sqlx::query_scalar(sql).fetch_one(c).await.unwrap(),
        TxConnection::MySql(c) => sqlx::query_scalar(sql).fetch_one(c).await.unwrap(),
    }
}

/// A store on a fresh SQLite file.
pub async fn open_sqlite() -> TestDb {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stitch.db");
    let store = Store::open(&path).await.unwrap();
    TestDb {
        store,
        place: Place::Sqlite { _dir: dir, path },
    }
}

/// A store in a fresh PostgreSQL schema; `None` = skipped.
pub async fn open_postgres() -> Option<TestDb> {
    let db = PgDatabase::connect().await?;
    let pool = PgPoolOptions::new()
        .max_connections(6)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(db.options(NAME).await)
        .await
        .unwrap();
    let store = Store::from_pool(pool).await.unwrap();
    Some(TestDb {
        store,
        place: Place::Postgres(db),
    })
}

/// A store in a fresh MySQL/MariaDB database; `None` = skipped.
pub async fn open_mysql() -> Option<TestDb> {
    let db = MySqlDatabase::connect().await?;
    let pool = stitch_mq::mysql::pool_options()
        .max_connections(6)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(db.options(NAME).await)
        .await
        .unwrap();
    let store = Store::from_pool(pool).await.unwrap();
    Some(TestDb {
        store,
        place: Place::MySql(db),
    })
}

/// Expands each named `async fn name(db: TestDb)` of the calling file into
/// one test per backend: `sqlite::name`, `postgres::name`, `mysql::name`.
#[macro_export]
macro_rules! store_suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::open_sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = $crate::common::open_postgres().await else {
                        return;
                    };
                    super::$name(db).await;
                }
            )*
        }
        mod mysql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = $crate::common::open_mysql().await else {
                        return;
                    };
                    super::$name(db).await;
                }
            )*
        }
    };
}

pub fn new_build(queue: &str) -> NewBuild {
    NewBuild {
        id: BuildId::new(),
        queue: queue.to_owned(),
        runner: "fake".to_owned(),
        base: vec!["https://forge.example/acme/app/commit/aaa".to_owned()],
        head: vec![
            "https://forge.example/acme/app/pull/1".to_owned(),
            "https://forge.example/acme/app/pull/2".to_owned(),
        ],
        metadata: meta(&[("requested_by", "queue-bot")]),
        idempotency_key: None,
        job_token_hash: None,
    }
}

pub fn keyed(queue: &str, key: &str) -> NewBuild {
    NewBuild {
        idempotency_key: Some(key.to_owned()),
        job_token_hash: None,
        ..new_build(queue)
    }
}

pub fn meta(pairs: &[(&str, &str)]) -> Metadata {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect::<BTreeMap<_, _>>()
}
