//! The store and the message queue share one SQLite database: a build row
//! and the message that drives it commit or roll back together.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestDb;
use stitch_core::BuildId;
use stitch_mq::mysql::MySqlDriver;
use stitch_mq::postgres::PostgresDriver;
use stitch_mq::sqlite::SqliteDriver;
use stitch_mq::{
    now_millis, Driver, Message, NewMessage, Queue, QueueConfig, Subscription, SubscriptionConfig,
};
use stitch_store::{StoreError, StorePool, StoreTx};

const TOPIC: &str = "trigger";

/// The queue's driver for the store's backend, on the store's own pool.
async fn queue_on(db: &TestDb) -> Queue {
    let driver: Arc<dyn Driver> = match db.store.pool() {
        StorePool::Sqlite(p) => Arc::new(SqliteDriver::from_pool(p).await.unwrap()),
        StorePool::Postgres(p) => Arc::new(PostgresDriver::from_pool(p).await.unwrap()),
        StorePool::MySql(p) => Arc::new(MySqlDriver::from_pool(p).await.unwrap()),
    };
    Queue::new(
        driver,
        QueueConfig {
            gc_interval: None,
            ..QueueConfig::default()
        },
    )
}

fn message_for(queue: &Queue, id: &BuildId) -> Vec<NewMessage> {
    queue
        .publisher()
        .prepare(
            TOPIC,
            vec![Message::new(id.to_string(), id.to_string(), b"{}".to_vec())],
            None,
        )
        .unwrap()
}

/// Opens a transaction holding a new build and its trigger message, not yet
/// committed; returns it with the build id.
async fn build_with_message<'s>(db: &'s TestDb, queue: &Queue) -> (StoreTx<'s>, BuildId, usize) {
    let new = common::new_build("ci");
    let id = new.id.clone();
    let mut tx = db.store.begin().await.unwrap();
    tx.create_build(new).await.unwrap();
    let msgs = message_for(queue, &id);
    let report = tx.publish(TOPIC, &msgs, now_millis()).await.unwrap();
    (tx, id, report.stored)
}

async fn subscribe(queue: &Queue) -> Subscription {
    queue
        .subscriber()
        .subscribe(TOPIC, SubscriptionConfig::new("trigger-stage"))
        .await
        .unwrap()
}

async fn build_and_message_commit_together(db: TestDb) {
    let queue = queue_on(&db).await;
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

async fn rollback_publishes_nothing_and_stores_nothing(db: TestDb) {
    let queue = queue_on(&db).await;
    let mut sub = subscribe(&queue).await;
    let (tx, id, _) = build_with_message(&db, &queue).await;
    tx.rollback().await.unwrap();
    let mut passes = queue.admin().claim_passes();
    let from = *passes.borrow_and_update();
    queue.publisher().notify_published(TOPIC);

    assert!(matches!(
        db.store.get_build(&id).await,
        Err(StoreError::NotFound(_))
    ));
    let stats = queue.admin().stats(TOPIC, "trigger-stage").await.unwrap();
    assert_eq!((stats.stored, stats.pending), (0, 0));
    // Two claim passes after the notify: the second began after it, and
    // whatever a pass delivers is handed over before it counts.
    tokio::time::timeout(Duration::from_secs(10), passes.wait_for(|n| *n >= from + 2))
        .await
        .expect("the subscription stopped claiming")
        .unwrap();
    assert!(
        sub.try_recv().is_none(),
        "a rolled-back message was delivered"
    );
}

/// The group-committed path: a job publishes in the shared transaction; a
/// job that fails after publishing takes its message back with its
/// savepoint, while its neighbour in the same batch commits.
async fn group_committed_writes_publish_in_their_savepoint(db: TestDb) {
    let queue = queue_on(&db).await;
    let mut sub = subscribe(&queue).await;
    let kept = common::new_build("ci");
    let dropped = common::new_build("ci");
    let (kept_id, dropped_id) = (kept.id.clone(), dropped.id.clone());
    let (kept_msgs, dropped_msgs) = (
        message_for(&queue, &kept_id),
        message_for(&queue, &dropped_id),
    );

    let failing = db.store.write(move |w| -> Result<(), StoreError> {
        w.create_build(dropped)?;
        w.publish(TOPIC, &dropped_msgs, now_millis())?;
        Err(StoreError::InvalidInput("changed my mind".into()))
    });
    let succeeding = db.store.write(move |w| -> Result<usize, StoreError> {
        w.create_build(kept)?;
        Ok(w.publish(TOPIC, &kept_msgs, now_millis())?.stored)
    });
    let (failed, stored) = tokio::join!(failing, succeeding);
    assert!(matches!(failed, Err(StoreError::InvalidInput(_))));
    assert_eq!(stored.unwrap(), 1);
    queue.publisher().notify_published(TOPIC);

    let d = tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.id(), kept_id.to_string());
    d.ack().await.unwrap();
    assert!(db
        .store
        .get_build(&dropped_id)
        .await
        .unwrap_err()
        .is_not_found());
    let stats = queue.admin().stats(TOPIC, "trigger-stage").await.unwrap();
    assert_eq!(stats.stored, 1, "the failed job's message was rolled back");
}

/// The raw SQLite handle is a SQLite-only door: elsewhere it is a typed
/// refusal, not a panic.
async fn the_sqlite_handle_is_refused_on_other_backends(db: TestDb) {
    let kind = db.kind();
    let handle_ok = db
        .store
        .write(|w| -> Result<bool, StoreError> { Ok(w.sqlite_handle().is_ok()) })
        .await
        .unwrap();
    let tx = db.store.begin().await.unwrap();
    let tx_handle = tx.sqlite_handle().map(|_| ());
    tx.rollback().await.unwrap();
    let pool = db.store.sqlite_pool().map(|_| ());
    if kind == stitch_store::BackendKind::Sqlite {
        assert!(handle_ok && tx_handle.is_ok() && pool.is_ok());
    } else {
        assert!(!handle_ok);
        for err in [tx_handle.unwrap_err(), pool.unwrap_err()] {
            assert!(
                matches!(err, StoreError::WrongBackend { actual, .. } if actual == kind),
                "{err:?}"
            );
        }
    }
}

/// A write job that panics fails alone; the committer keeps serving.
async fn a_panicking_write_fails_alone(db: TestDb) {
    let new = common::new_build("ci");
    let id = new.id.clone();
    let panicked = db
        .store
        .write(move |w| -> Result<(), StoreError> {
            w.create_build(new)?;
            panic!("a bug in a write job");
        })
        .await;
    assert!(
        matches!(panicked, Err(StoreError::Internal(_))),
        "{panicked:?}"
    );
    assert!(db.store.get_build(&id).await.unwrap_err().is_not_found());
    let next = db
        .store
        .create_build(common::new_build("ci"))
        .await
        .unwrap();
    assert!(next.is_created());
    assert_eq!(db.store.latest_seq().await.unwrap(), 1);
}

/// PostgreSQL: group-committed publishes wake another process's
/// subscriber through `NOTIFY` (sent once per batch, before its commit),
/// including after a job whose publish was rolled back released the topic
/// lock the batch had taken. The other process polls (and renews leases)
/// only once a minute, so a delivery within seconds can only come from the
/// wake-up.
async fn group_committed_publishes_wake_other_processes(db: TestDb) {
    let StorePool::Postgres(pool) = db.store.pool() else {
        return; // LISTEN/NOTIFY is PostgreSQL's; the others poll.
    };
    let other_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let other = Queue::new(
        Arc::new(PostgresDriver::from_pool(other_pool).await.unwrap()),
        QueueConfig {
            gc_interval: None,
            ..QueueConfig::default()
        },
    );
    let mut sub = other
        .subscriber()
        .subscribe(
            TOPIC,
            SubscriptionConfig {
                poll_interval: Duration::from_secs(60),
                // Lease ticks also look for work: keep them out of the way.
                lease_duration: Duration::from_secs(180),
                lease_renewal: Duration::from_secs(60),
                ..SubscriptionConfig::new("trigger-stage")
            },
        )
        .await
        .unwrap();
    let queue = queue_on(&db).await;
    // A probe published the queue's own way proves the other process's
    // listener is up (it wakes every topic when it connects, which would
    // hide a missing NOTIFY below).
    queue
        .publisher()
        .publish(TOPIC, Message::new("probe", "probe", b"{}".to_vec()))
        .await
        .unwrap();
    let probe = tokio::time::timeout(Duration::from_secs(30), sub.recv())
        .await
        .expect("the probe did not arrive")
        .unwrap();
    assert_eq!(probe.id(), "probe");
    probe.ack().await.unwrap();
    let mut writes = Vec::new();
    let mut expected = std::collections::BTreeSet::new();
    for i in 0..6 {
        let new = common::new_build("ci");
        let msgs = message_for(&queue, &new.id);
        let fail = i % 3 == 0;
        if !fail {
            expected.insert(new.id.to_string());
        }
        writes.push(db.store.write(move |w| -> Result<(), StoreError> {
            w.create_build(new)?;
            w.publish(TOPIC, &msgs, now_millis())?;
            if fail {
                return Err(StoreError::InvalidInput("changed my mind".into()));
            }
            Ok(())
        }));
    }
    let results = futures::future::join_all(writes).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 4);
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < expected.len() {
        let d = tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .expect("no wake-up reached the other process")
            .unwrap();
        seen.insert(d.id().to_string());
        d.ack().await.unwrap();
    }
    assert_eq!(seen, expected);
}

/// Records what the store announces.
#[derive(Default)]
struct Announcements(std::sync::Mutex<Vec<stitch_store::Committed>>);

impl stitch_store::CommitListener for Announcements {
    fn committed(&self, what: &stitch_store::Committed) {
        self.0.lock().unwrap().push(what.clone());
    }
}

impl Announcements {
    fn take(&self) -> Vec<stitch_store::Committed> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }

    /// Everything announced since the last take, as one announcement: on
    /// PostgreSQL/MySQL a commit's publishes are announced at once and its
    /// events once the sequencing pass has numbered them (ADR 0020).
    fn take_merged(&self) -> stitch_store::Committed {
        let mut all = stitch_store::Committed::default();
        for a in self.take() {
            all.published.extend(a.published);
            all.events |= a.events;
        }
        all
    }
}

fn announced(topics: &[&str], events: bool) -> stitch_store::Committed {
    stitch_store::Committed {
        published: topics.iter().map(|t| t.to_string()).collect(),
        events,
    }
}

/// The store announces its own commits — the topics published to and
/// whether events were appended — after they commit, and nothing for a
/// rolled-back transaction or savepoint, or a write that changed nothing.
async fn commits_are_announced_by_the_store(db: TestDb) {
    let queue = queue_on(&db).await;
    let heard = Arc::new(Announcements::default());
    assert!(db.store.announce_commits_to(heard.clone()));
    assert!(!db.store.announce_commits_to(heard.clone()), "one listener");

    // A transaction: announced at its commit, not before.
    let (tx, _, _) = build_with_message(&db, &queue).await;
    assert!(heard.take().is_empty());
    tx.commit().await.unwrap();
    assert_eq!(heard.take_merged(), announced(&[TOPIC], true));
    // Rolled back: nothing.
    let (tx, _, _) = build_with_message(&db, &queue).await;
    tx.rollback().await.unwrap();
    assert!(heard.take().is_empty());

    // Group commit: a failed job's publish is not announced; the others are
    // (once per batch, so possibly merged).
    let mut writes = Vec::new();
    for fail in [true, false] {
        let new = common::new_build("ci");
        let msgs = message_for(&queue, &new.id);
        let store = db.store.clone();
        writes.push(async move {
            store
                .write(move |w| -> Result<(), StoreError> {
                    if fail {
                        w.publish("other-topic", &msgs, now_millis())?;
                        return Err(StoreError::InvalidInput("changed my mind".into()));
                    }
                    w.create_build(new)?;
                    w.publish(TOPIC, &msgs, now_millis())?;
                    Ok(())
                })
                .await
        });
    }
    futures::future::join_all(writes).await;
    assert_eq!(heard.take_merged(), announced(&[TOPIC], true));

    // A write with no event and no publish announces nothing.
    let id = db
        .store
        .create_build(common::new_build("ci"))
        .await
        .unwrap()
        .into_build()
        .id;
    heard.take();
    db.store.request_cancel(&id).await.unwrap();
    assert!(heard.take().is_empty());
}

/// Pruning a build deletes its queue messages that every group is done
/// with, in the transaction that deletes the build; a message still pending
/// stays (its consumer finishes it), and so do other builds' messages.
async fn pruned_builds_take_their_done_messages_along(db: TestDb) {
    let queue = queue_on(&db).await;
    let mut sub = subscribe(&queue).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (tx, id, _) = build_with_message(&db, &queue).await;
        tx.commit().await.unwrap();
        ids.push(id);
    }
    queue.publisher().notify_published(TOPIC);
    let (done, pending, retained) = (&ids[0], &ids[1], &ids[2]);
    let mut held = None;
    for _ in 0..3 {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .unwrap()
            .unwrap();
        if d.id() == pending.to_string() {
            held = Some(d);
        } else {
            d.ack().await.unwrap();
        }
    }
    let stored =
        |id: &BuildId| format!("SELECT COUNT(*) FROM mq_messages WHERE partition_key = '{id}'");
    let cursor = match db.kind() {
        stitch_store::BackendKind::MySql => "`cursor`",
        _ => "cursor",
    };
    let passed = format!(
        "SELECT COUNT(*) FROM mq_partitions WHERE partition_key = '{done}' AND {cursor} > 0"
    );
    // The subscriber's next claim pass moves the cursor past the ack:
    // re-read after each pass.
    let mut passes = queue.admin().claim_passes();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        passes.borrow_and_update();
        if db.ints(&passed).await == vec![1] {
            break;
        }
        tokio::time::timeout_at(deadline, passes.changed())
            .await
            .expect("the cursor never passed the ack")
            .unwrap();
    }
    for id in [done, pending] {
        db.exec(&format!(
            "UPDATE builds SET finished_at = 1 WHERE id = '{id}'"
        ))
        .await;
    }

    let out = db
        .store
        .prune_builds_with_messages(2, 10, &[TOPIC])
        .await
        .unwrap();
    let pruned: Vec<&BuildId> = out.builds.iter().collect();
    assert_eq!(pruned.len(), 2, "{out:?}");
    assert!(pruned.contains(&done) && pruned.contains(&pending));
    assert_eq!(out.queue_messages, 1, "{out:?}");
    assert_eq!(db.ints(&stored(done)).await, vec![0]);
    assert_eq!(db.ints(&stored(pending)).await, vec![1], "pending: kept");
    assert_eq!(
        db.ints(&stored(retained)).await,
        vec![1],
        "not pruned: kept"
    );
    // The pending message's consumer still finishes it.
    held.unwrap().ack().await.unwrap();
}

store_suite!(
    pruned_builds_take_their_done_messages_along,
    a_panicking_write_fails_alone,
    build_and_message_commit_together,
    rollback_publishes_nothing_and_stores_nothing,
    group_committed_writes_publish_in_their_savepoint,
    the_sqlite_handle_is_refused_on_other_backends,
    group_committed_publishes_wake_other_processes,
    commits_are_announced_by_the_store,
);
