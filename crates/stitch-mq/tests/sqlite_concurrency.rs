//! SQLite under concurrent use: many tasks in one process, and two
//! independent pools (as two processes would have) on one file, publishing,
//! consuming and administering at once — zero errors, nothing lost.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use stitch_mq::sqlite::SqliteDriver;
use stitch_mq::{Message, Queue, QueueConfig, SubscriptionConfig};

const TOPIC: &str = "busy";

async fn open(path: &std::path::Path) -> Queue {
    let driver = SqliteDriver::open(path).await.expect("open");
    Queue::new(
        Arc::new(driver),
        QueueConfig {
            gc_interval: Some(Duration::from_millis(50)),
            ..QueueConfig::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_one_file_never_fail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.db");
    // Two queues with separate pools and writer locks: they meet only in SQLite.
    let a = open(&path).await;
    let b = open(&path).await;
    let mut cfg = SubscriptionConfig::new("workers");
    cfg.lease_renewal = Duration::from_millis(50);
    cfg.lease_duration = Duration::from_millis(500);
    cfg.poll_interval = Duration::from_millis(20);
    let mut sub_a = a.subscriber().subscribe(TOPIC, cfg.clone()).await.unwrap();
    let mut sub_b = b.subscriber().subscribe(TOPIC, cfg).await.unwrap();

    const TASKS: usize = 16;
    const PER_TASK: usize = 50;
    let mut publishers = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let q = if t % 2 == 0 { a.clone() } else { b.clone() };
        publishers.spawn(async move {
            for i in 0..PER_TASK {
                let m = Message::new(
                    format!("t{t}-{i}"),
                    format!("p{}", (t + i) % 12),
                    vec![1u8; 32],
                );
                q.publisher().publish(TOPIC, m).await?;
                if i % 10 == 0 {
                    // Admin traffic in the mix.
                    q.admin().wake(TOPIC, &format!("p{}", i % 12)).await?;
                    q.admin().stats(TOPIC, "workers").await?;
                }
            }
            stitch_mq::MqResult::Ok(())
        });
    }
    let total = TASKS * PER_TASK;
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < total {
        let d = tokio::select! {
            Some(d) = sub_a.recv() => d,
            Some(d) = sub_b.recv() => d,
            _ = tokio::time::sleep_until(deadline) => panic!("only {} of {total} delivered", seen.len()),
        };
        d.ack().await.expect("ack under contention");
        seen.insert(d.id().to_string());
    }
    while let Some(r) = publishers.join_next().await {
        r.unwrap().expect("publish under contention");
    }
    assert_eq!(seen.len(), total);
    let stats = a.admin().stats(TOPIC, "workers").await.unwrap();
    assert_eq!(stats.pending, 0);
}
