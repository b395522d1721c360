//! Several consumers (each with its own pool, as separate processes would
//! have) on one set of partitions in PostgreSQL: every message delivered
//! exactly once, and a claim never waits for a partition someone else holds.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::Connection;
use stitch_mq::{Message, Queue, QueueConfig, SubscriptionConfig};
use support::PgDatabase;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "busy";

fn queue(driver: stitch_mq::postgres::PostgresDriver) -> Queue {
    Queue::new(
        Arc::new(driver),
        QueueConfig {
            gc_interval: Some(Duration::from_millis(200)),
            ..QueueConfig::default()
        },
    )
}

fn config() -> SubscriptionConfig {
    SubscriptionConfig {
        batch_size: 4,
        visibility_timeout: Duration::from_secs(60),
        // Long enough that a consumer starved of CPU on a loaded machine
        // keeps its partitions (an expired lease is a legitimate takeover
        // and redelivery, which this suite's "never twice" would call a
        // failure); renewals stay frequent so partitions are shared early.
        lease_duration: Duration::from_secs(5),
        lease_renewal: Duration::from_millis(100),
        poll_interval: Duration::from_millis(50),
        ..SubscriptionConfig::new("workers")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_on_one_partition_set_never_double_deliver() {
    let Some(db) = PgDatabase::connect().await else {
        return;
    };
    const CONSUMERS: usize = 4;
    const PUBLISHERS: usize = 4;
    const PER_PUBLISHER: usize = 400;
    const PARTITIONS: usize = 6;
    let mut queues = Vec::new();
    for c in 0..CONSUMERS {
        queues.push(queue(db.driver_as("busy", &format!("c{c}")).await));
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, String, u32)>();
    let stop = CancellationToken::new();
    let mut consumers = tokio::task::JoinSet::new();
    for (c, q) in queues.iter().enumerate() {
        let mut sub = q.subscriber().subscribe(TOPIC, config()).await.unwrap();
        let tx = tx.clone();
        let stop = stop.clone();
        consumers.spawn(async move {
            loop {
                let d = tokio::select! {
                    d = sub.recv() => d,
                    _ = stop.cancelled() => {
                        // Hand on whatever the last passes delivered.
                        while let Some(d) = sub.try_recv() {
                            let _ = tx.send((c, d.id().to_string(), d.attempt()));
                        }
                        break;
                    }
                };
                let Some(d) = d else { break };
                let _ = tx.send((c, d.id().to_string(), d.attempt()));
                d.ack().await.expect("ack");
            }
            sub.close().await;
        });
    }
    drop(tx);
    let mut publishers = tokio::task::JoinSet::new();
    for p in 0..PUBLISHERS {
        let q = queues[p % CONSUMERS].clone();
        publishers.spawn(async move {
            for i in 0..PER_PUBLISHER {
                let m = Message::new(
                    format!("t{p}-{i:04}"),
                    format!("k{}", (p + i) % PARTITIONS),
                    vec![0u8; 32],
                );
                q.publisher().publish(TOPIC, m).await?;
                if i % 50 == 0 {
                    q.admin()
                        .wake(TOPIC, &format!("k{}", i % PARTITIONS))
                        .await?;
                }
            }
            stitch_mq::MqResult::Ok(())
        });
    }
    let total = PUBLISHERS * PER_PUBLISHER;
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut by_consumer = [0usize; CONSUMERS];
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < total {
        let (c, id, attempt) = tokio::time::timeout_at(deadline.into(), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {total} delivered", seen.len()))
            .expect("consumers stopped");
        assert_eq!(
            attempt, 1,
            "{id} redelivered: no consumer failed or timed out"
        );
        *seen.entry(id.clone()).or_default() += 1;
        by_consumer[c] += 1;
    }
    while let Some(r) = publishers.join_next().await {
        r.unwrap().expect("publish under contention");
    }
    // A second delivery would come from a later claim pass: every consumer
    // runs three more whole passes (a pass already under way when counting
    // starts is not one of them), then hands on what they delivered.
    for q in &queues {
        let mut passes = q.admin().claim_passes();
        let from = *passes.borrow_and_update();
        tokio::time::timeout(Duration::from_secs(30), passes.wait_for(|n| *n >= from + 4))
            .await
            .expect("a consumer stopped claiming")
            .unwrap();
    }
    stop.cancel();
    while let Some(r) = consumers.join_next().await {
        r.unwrap();
    }
    while let Ok((_, id, _)) = rx.try_recv() {
        *seen.entry(id).or_default() += 1;
    }
    assert_eq!(seen.len(), total);
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert!(
        by_consumer.iter().filter(|n| **n > 0).count() >= 2,
        "the partitions were shared: {by_consumer:?}"
    );
    let stats = queues[0].admin().stats(TOPIC, "workers").await.unwrap();
    assert_eq!(stats.pending, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_partition_does_not_block_claims() {
    let Some(db) = PgDatabase::connect().await else {
        return;
    };
    let q = queue(db.driver_as("held", "main").await);
    // Register the group first so publishes create its partition rows.
    let sub = q.subscriber().subscribe(TOPIC, config()).await.unwrap();
    sub.close().await;
    let msgs: Vec<Message> = ["a", "b", "c"]
        .iter()
        .flat_map(|p| (0..3).map(move |i| Message::new(format!("{p}{i}"), *p, vec![])))
        .collect();
    q.publisher().publish_batch(TOPIC, msgs).await.unwrap();
    // Another session holds partition "a" in an open transaction.
    let mut other = sqlx::PgConnection::connect_with(&db.options_as("held", "other").await)
        .await
        .unwrap();
    let mut hold = other.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM mq_partitions WHERE partition_key = 'a' FOR UPDATE")
        .execute(&mut *hold)
        .await
        .unwrap();
    let mut sub = q.subscriber().subscribe(TOPIC, config()).await.unwrap();
    for _ in 0..6 {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .expect("claims went on past the held partition")
            .unwrap();
        assert_ne!(d.partition_key(), "a", "the held partition was claimed");
        d.ack().await.unwrap();
    }
    hold.rollback().await.unwrap();
    for i in 0..3 {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .expect("the released partition is served")
            .unwrap();
        assert_eq!(d.id(), format!("a{i}"));
        d.ack().await.unwrap();
    }
    sub.close().await;
}
