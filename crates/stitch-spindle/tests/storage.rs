//! The spindle keeps its tables in the store's SQLite database and runs its
//! statements on the raw SQLite handle: on a PostgreSQL or MySQL store it
//! refuses to start with a typed error instead of failing later.

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use stitch_spindle::db::SpindleDb;
use stitch_spindle::error::SpindleError;
use stitch_store::{BackendKind, Store};

// The queue's per-test schema/database helpers, shared rather than copied.
#[path = "../../stitch-mq/tests/support/mod.rs"]
mod support;

#[tokio::test]
async fn the_spindle_refuses_a_postgres_store() {
    let Some(db) = support::PgDatabase::connect().await else {
        return;
    };
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(20))
        .connect_with(db.options("spindle").await)
        .await
        .unwrap();
    let store = Store::from_pool(pool).await.unwrap();
    let err = SpindleDb::open(store.clone()).await.err().unwrap();
    assert!(
        matches!(err, SpindleError::UnsupportedStorage(BackendKind::Postgres)),
        "{err:?}"
    );
    assert!(err.to_string().contains("sqlite://"), "{err}");
    store.close().await;
}

#[tokio::test]
async fn the_spindle_refuses_a_mysql_store() {
    let Some(db) = support::MySqlDatabase::connect().await else {
        return;
    };
    let pool = stitch_mq::mysql::pool_options()
        .max_connections(2)
        .connect_with(db.options("spindle").await)
        .await
        .unwrap();
    let store = Store::from_pool(pool).await.unwrap();
    let err = SpindleDb::open(store.clone()).await.err().unwrap();
    assert!(
        matches!(err, SpindleError::UnsupportedStorage(BackendKind::MySql)),
        "{err:?}"
    );
    store.close().await;
}

#[tokio::test]
async fn the_spindle_opens_on_a_sqlite_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.db")).await.unwrap();
    let db = SpindleDb::open(store).await.unwrap();
    assert_eq!(db.cursor("jetstream").await.unwrap(), None);
}
