//! PostgreSQL: the store survives its connections being terminated (a
//! server restart, a failover, `pg_terminate_backend`). A group committer
//! whose connection died finds out at `BEGIN`, before any write ran, and
//! begins again on a new connection, so no write fails; reads go through
//! the pool, which replaces dead connections.

mod common;

use stitch_core::BuildStatus;
use stitch_store::{Metadata, StorageFailure};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_reads_recover_after_connections_are_terminated() {
    let Some(db) = common::open_postgres().await else {
        return;
    };
    let id = db
        .store
        .create_build(common::new_build("app"))
        .await
        .unwrap()
        .into_build()
        .id;
    for round in 0..2 {
        assert!(db.terminate_connections().await >= 1, "round {round}");
        let recorded = db
            .store
            .record_status(
                &id,
                None,
                BuildStatus::Running,
                &common::meta(&[("round", &round.to_string())]),
                None,
            )
            .await
            .expect("a write after the connections were terminated");
        assert!(recorded);
    }
    let b = db.store.get_build(&id).await.unwrap();
    assert_eq!(b.status, BuildStatus::Running);
    assert_eq!(db.store.latest_seq().await.unwrap(), 3);
    let mut tx = db.store.begin().await.unwrap();
    tx.record_status(&id, None, BuildStatus::Succeeded, &Metadata::new(), None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // The classification the consumer framework relies on.
    let lost = stitch_store::StoreError::Database(sqlx::Error::Io(
        std::io::ErrorKind::ConnectionReset.into(),
    ));
    assert_eq!(lost.storage_failure(), Some(StorageFailure::ConnectionLost));
}
