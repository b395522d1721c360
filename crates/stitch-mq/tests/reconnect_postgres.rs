//! PostgreSQL connections dropped mid-run (`pg_terminate_backend` on every
//! connection of the queue's processes, the listener's included): the
//! drivers reconnect, publishers and consumers retry what failed, and no
//! message is lost.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stitch_mq::{Delivery, Message, MqError, MqResult, Queue, QueueConfig, SubscriptionConfig};
use support::PgDatabase;
use tokio::sync::mpsc;

const TOPIC: &str = "work";

fn queue(driver: stitch_mq::postgres::PostgresDriver) -> Queue {
    Queue::new(
        Arc::new(driver),
        QueueConfig {
            gc_interval: None,
            ..QueueConfig::default()
        },
    )
}

fn config() -> SubscriptionConfig {
    SubscriptionConfig {
        batch_size: 8,
        visibility_timeout: Duration::from_secs(5),
        lease_duration: Duration::from_secs(3),
        lease_renewal: Duration::from_millis(300),
        poll_interval: Duration::from_millis(200),
        ..SubscriptionConfig::new("workers")
    }
}

/// Retries a call while it fails with a retryable error (bounded).
async fn retrying<T, F, Fut>(mut call: F) -> MqResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = MqResult<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match call().await {
            // Only connections are killed, never the server: the retry takes
            // a fresh connection from the pool, and its connect is the wait.
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::task::yield_now().await;
            }
            other => return other,
        }
    }
}

/// Acks with retries. A retried ack whose first attempt did commit (the
/// reply was lost with the connection) is reported stale: it is done.
async fn ack(d: &Delivery) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match d.ack().await {
            Ok(()) => return true,
            Err(MqError::StaleDelivery(_)) => return false,
            // As in `retrying`: the retry's fresh connection is the wait.
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("ack failed for good: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_lose_no_message() {
    let Some(db) = PgDatabase::connect().await else {
        return;
    };
    const TOTAL: usize = 3000;
    let producer = queue(db.driver_as("work", "producer").await);
    let consumers = [
        queue(db.driver_as("work", "consumer-a").await),
        queue(db.driver_as("work", "consumer-b").await),
    ];
    // Each consumer reports the ids it received on one channel.
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let mut tasks = Vec::new();
    for q in &consumers {
        let mut sub = q.subscriber().subscribe(TOPIC, config()).await.unwrap();
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(d) = sub.recv().await {
                ack(&d).await;
                if tx.send(d.id().to_string()).is_err() {
                    break;
                }
            }
        }));
    }
    let publisher = producer.publisher();
    // How many messages the consumers delivered: the feeder keeps at most
    // `AHEAD` in flight, so the work is still flowing when the kills come.
    const AHEAD: usize = 200;
    let (delivered_tx, mut delivered) = tokio::sync::watch::channel(0usize);
    let feeder = tokio::spawn(async move {
        for b in 0..TOTAL / 20 {
            // The sender lives until every message was seen.
            let _ = delivered.wait_for(|n| n + AHEAD >= b * 20).await;
            let batch: Vec<Message> = (b * 20..(b + 1) * 20)
                .map(|i| Message::new(format!("m{i}"), format!("p{}", i % 16), vec![1u8; 16]))
                .collect();
            retrying(|| publisher.publish_batch(TOPIC, batch.clone()))
                .await
                .expect("publish with retries");
        }
    });

    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut terminated = 0;
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < TOTAL {
        let id = tokio::time::timeout_at(deadline.into(), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {TOTAL} delivered", seen.len()))
            .expect("consumers stopped");
        *seen.entry(id).or_default() += 1;
        delivered_tx.send_replace(seen.len());
        // Drop every connection of every client twice while work flows.
        if (seen.len() == TOTAL / 4 && kills == 0) || (seen.len() == TOTAL / 2 && kills == 1) {
            kills += 1;
            for client in ["producer", "consumer-a", "consumer-b"] {
                terminated += db.terminate_connections("work", client).await;
            }
        }
    }
    feeder.await.unwrap();
    assert!(terminated >= 6, "terminated only {terminated} connections");
    assert_eq!(seen.len(), TOTAL, "every message delivered");
    let admin = producer.admin();
    let stats = retrying(|| admin.stats(TOPIC, "workers")).await.unwrap();
    assert_eq!(stats.pending, 0, "{stats:?}");
    assert_eq!(stats.dead_letters, 0, "{stats:?}");
    for t in tasks {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_reconnects_after_its_connection_is_killed() {
    let Some(db) = PgDatabase::connect().await else {
        return;
    };
    let consumer = queue(db.driver_as("listen", "consumer").await);
    let producer = queue(db.driver_as("listen", "producer").await);
    let mut cfg = config();
    // Polling alone would take a minute: only a notification can be this fast.
    cfg.poll_interval = Duration::from_secs(60);
    cfg.lease_renewal = Duration::from_secs(20);
    cfg.lease_duration = Duration::from_secs(60);
    let mut sub = consumer.subscriber().subscribe(TOPIC, cfg).await.unwrap();
    // The first message proves the listener is up (another process published it).
    round_trip(&mut sub, &producer, "before").await;
    let killed = db.terminate_connections("listen", "consumer").await;
    assert!(killed >= 1, "the listener's connection was not found");
    round_trip(&mut sub, &producer, "after").await;
    sub.close().await;
}

/// Publishes `id` from `producer` and expects `sub` to get it well before
/// its minute-long poll: only a notification can be that fast.
async fn round_trip(sub: &mut stitch_mq::Subscription, producer: &Queue, id: &str) {
    let publisher = producer.publisher();
    retrying(|| publisher.publish(TOPIC, Message::new(id, "p", vec![])))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(15), sub.recv())
        .await
        .expect("delivered by notification, not by the minute-long poll")
        .expect("subscription open");
    assert_eq!(d.id(), id);
    assert!(ack(&d).await);
}
