//! The store and the message queue share one SQLite database: a build row
//! and the message that drives it commit or roll back together.

mod common;

use std::sync::Arc;
use std::time::Duration;

use stitch_core::BuildId;
use stitch_mq::sqlite::SqliteDriver;
use stitch_mq::{now_millis, Message, Queue, QueueConfig, Subscription, SubscriptionConfig};
use stitch_store::{StoreError, StoreTx};

const TOPIC: &str = "trigger";

async fn queue_on(db: &common::TestDb) -> (Queue, SqliteDriver) {
    let driver = SqliteDriver::from_pool(db.store.pool().clone())
        .await
        .unwrap();
    let queue = Queue::new(
        Arc::new(driver.clone()),
        QueueConfig {
            gc_interval: None,
            ..QueueConfig::default()
        },
    );
    (queue, driver)
}

/// Opens a transaction holding a new build and its trigger message, not yet
/// committed; returns it with the build id.
async fn build_with_message<'s>(
    db: &'s common::TestDb,
    queue: &Queue,
) -> (StoreTx<'s>, BuildId, usize) {
    let new = common::new_build("ci");
    let id = new.id.clone();
    let mut tx = db.store.begin().await.unwrap();
    tx.create_build(new).await.unwrap();
    let msgs = queue
        .publisher()
        .prepare(
            TOPIC,
            vec![Message::new(id.to_string(), id.to_string(), b"{}".to_vec())],
            None,
        )
        .unwrap();
    let report = SqliteDriver::publish_in_tx(tx.conn(), TOPIC, &msgs, now_millis())
        .await
        .unwrap();
    (tx, id, report.stored)
}

async fn subscribe(queue: &Queue) -> Subscription {
    queue
        .subscriber()
        .subscribe(TOPIC, SubscriptionConfig::new("trigger-stage"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_and_message_commit_together() {
    let db = common::open().await;
    let (queue, _driver) = queue_on(&db).await;
    let mut sub = subscribe(&queue).await;
    let (tx, id, stored) = build_with_message(&db, &queue).await;
    assert_eq!(stored, 1);
    tx.commit().await.unwrap();
    queue.publisher().notify_published(TOPIC);

    let d = tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.id(), id.to_string());
    assert_eq!(db.store.get_build(&id).await.unwrap().id, id);
    d.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_publishes_nothing_and_stores_nothing() {
    let db = common::open().await;
    let (queue, _driver) = queue_on(&db).await;
    let mut sub = subscribe(&queue).await;
    let (tx, id, _) = build_with_message(&db, &queue).await;
    tx.rollback().await.unwrap();
    queue.publisher().notify_published(TOPIC);

    assert!(matches!(
        db.store.get_build(&id).await,
        Err(StoreError::NotFound(_))
    ));
    let stats = queue.admin().stats(TOPIC, "trigger-stage").await.unwrap();
    assert_eq!((stats.stored, stats.pending), (0, 0));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sub.recv())
            .await
            .is_err(),
        "a rolled-back message was delivered"
    );
}
