//! The behaviour every backend must show. Each check is a public async
//! function taking a [`Backend`]; [`conformance_tests!`](crate::conformance_tests)
//! expands to one `#[tokio::test]` per check so a backend's test file is one line.
//!
//! Checks use short timings with generous deadlines: they assert what
//! happens (and, for barriers and delays, that something does *not* happen
//! early), never how fast. They read Tokio's clock, so the timing checks
//! also run on paused time (`conformance_tests!(paused …)`), where a delay
//! costs no wall time.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::clock::Clock;
use crate::config::{QueueConfig, RetryPolicy, SubscriptionConfig};
use crate::driver::{
    ClaimRequest, ClaimResult, ClaimedMessage, Driver, GcReport, LeaseTick, NewMessage, Outcome,
    OutcomeKind, PartitionInfo, PartitionQuery, LOCKED_RETRY_MS,
};
use crate::error::MqError;
use crate::message::{now_millis, Failure, Message, Millis};
use crate::queue::{ClaimProgress, Delivery, NackOutcome, PartitionFilter, Queue, Subscription};

/// A backend under test.
#[async_trait]
pub trait Backend: Send + Sync {
    /// The driver on the storage named `name`: fresh the first time, the
    /// same stored state when opened again (a restart). Checks that drive
    /// time themselves (through `now` in requests) use it directly.
    async fn driver(&self, name: &str) -> Arc<dyn Driver>;

    /// A queue on the storage named `name` (see [`Backend::driver`]).
    async fn open(&self, name: &str, config: QueueConfig) -> Queue {
        Queue::new(self.driver(name).await, config)
    }
}

const T: &str = "topic";
const WAIT: Duration = Duration::from_secs(10);

fn quiet() -> QueueConfig {
    QueueConfig {
        gc_interval: None,
        ..QueueConfig::default()
    }
}

/// Short timings so lease and visibility behaviour shows within a test.
pub fn fast_config(group: &str) -> SubscriptionConfig {
    SubscriptionConfig {
        batch_size: 10,
        visibility_timeout: Duration::from_secs(30),
        lease_duration: Duration::from_millis(1500),
        lease_renewal: Duration::from_millis(100),
        poll_interval: Duration::from_millis(200),
        retry: RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            jitter: 0.0,
        },
        ..SubscriptionConfig::new(group)
    }
}

async fn recv(sub: &mut Subscription) -> Delivery {
    match tokio::time::timeout(WAIT, sub.recv()).await {
        Ok(Some(d)) => d,
        Ok(None) => panic!("subscription closed while waiting for a delivery"),
        Err(_) => panic!("no delivery within {WAIT:?}"),
    }
}

async fn recv_none(sub: &mut Subscription, for_: Duration) {
    if let Ok(Some(d)) = tokio::time::timeout(for_, sub.recv()).await {
        panic!("unexpected delivery {:?} (attempt {})", d.id(), d.attempt());
    }
}

fn msg(id: &str, partition: &str) -> Message {
    Message::new(id, partition, format!("payload-{id}").into_bytes())
}

async fn subscribe(q: &Queue, cfg: SubscriptionConfig) -> Subscription {
    q.subscriber().subscribe(T, cfg).await.expect("subscribe")
}

/// Waits until `sub`'s claim loop progress satisfies `what` (`why` names it
/// in the failure).
async fn progress_until(
    sub: &Subscription,
    why: &str,
    what: impl FnMut(&ClaimProgress) -> bool,
) -> ClaimProgress {
    let mut progress = sub.progress();
    let reached = match tokio::time::timeout(WAIT, progress.wait_for(what)).await {
        Ok(Ok(p)) => Some(*p),
        Ok(Err(_)) => panic!("subscription stopped before {why}"),
        Err(_) => None,
    };
    reached.unwrap_or_else(|| panic!("not {why} within {WAIT:?}: {:?}", *progress.borrow()))
}

/// A wall clock `by` ahead: a queue on it is the same process `by` later,
/// so a check sees retention horizons pass without waiting for them. Only
/// for checks on real time (the paused backends pin every queue's clock).
fn ahead(by: Duration) -> Clock {
    Clock::Tokio {
        epoch: now_millis() + by.as_millis() as Millis,
        start: Instant::now(),
    }
}

/// Runs the collector over queue `name`'s storage from a queue whose clock
/// reads `by` later than this process's (drivers take the time from the
/// engine), so retention horizons have passed however fast the check ran.
async fn gc_from_later(b: &dyn Backend, name: &str, cfg: QueueConfig, by: Duration) -> GcReport {
    let later = b
        .open(
            name,
            QueueConfig {
                clock: ahead(by),
                ..cfg
            },
        )
        .await;
    later.admin().gc().await.unwrap()
}

/// Payload and metadata round-trip; first attempt is 1.
pub async fn publish_round_trip(b: &dyn Backend) {
    let q = b.open("round-trip", quiet()).await;
    let m = Message::new("m1", "p", vec![0u8, 1, 2, 255])
        .with_meta("k", "v")
        .with_meta("trace", "abc");
    let r = q.publisher().publish(T, m.clone()).await.unwrap();
    assert_eq!((r.stored, r.duplicates), (1, 0));
    let mut sub = subscribe(&q, fast_config("g")).await;
    let d = recv(&mut sub).await;
    assert_eq!(d.message(), &m);
    assert_eq!(d.attempt(), 1);
    assert_eq!(d.topic(), T);
    assert!(d.published_at() > 0 && d.received_at() >= d.published_at());
    d.ack().await.unwrap();
}

/// Messages stored before a group first subscribes are delivered to it.
pub async fn late_subscriber_gets_history(b: &dyn Backend) {
    let q = b.open("late", quiet()).await;
    q.publisher()
        .publish_batch(T, (0..5).map(|i| msg(&format!("m{i}"), "p")).collect())
        .await
        .unwrap();
    let mut sub = subscribe(&q, fast_config("late-group")).await;
    for i in 0..5 {
        let d = recv(&mut sub).await;
        assert_eq!(d.id(), format!("m{i}"));
        d.ack().await.unwrap();
    }
}

/// A batch publish is one unit and keeps order; empty batch is a no-op.
pub async fn publish_batch_keeps_order(b: &dyn Backend) {
    let q = b.open("batch", quiet()).await;
    let mut sub = subscribe(&q, fast_config("g")).await;
    let r = q.publisher().publish_batch(T, vec![]).await.unwrap();
    assert_eq!(r.stored, 0);
    let r = q
        .publisher()
        .publish_batch(T, (0..50).map(|i| msg(&format!("m{i:02}"), "p")).collect())
        .await
        .unwrap();
    assert_eq!(r.stored, 50);
    for i in 0..50 {
        let d = recv(&mut sub).await;
        assert_eq!(d.id(), format!("m{i:02}"));
        d.ack().await.unwrap();
    }
}

/// `publish_after` holds a message back; it does not hold back the others.
pub async fn publish_after_delays_delivery(b: &dyn Backend) {
    let q = b.open("delayed", quiet()).await;
    let mut sub = subscribe(&q, fast_config("g")).await;
    let start = Instant::now();
    q.publisher()
        .publish_after(T, msg("late", "p"), Duration::from_millis(400))
        .await
        .unwrap();
    q.publisher().publish(T, msg("now", "p")).await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(d.id(), "now");
    d.ack().await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(d.id(), "late");
    assert!(
        start.elapsed() >= Duration::from_millis(390),
        "delivered after {:?}",
        start.elapsed()
    );
    d.ack().await.unwrap();
}

/// After `close`, publish and subscribe fail with `Closed`.
pub async fn publish_after_close_fails(b: &dyn Backend) {
    let q = b.open("closed", quiet()).await;
    q.close();
    assert!(matches!(
        q.publisher().publish(T, msg("m", "p")).await,
        Err(MqError::Closed)
    ));
    assert!(matches!(
        q.subscriber().subscribe(T, fast_config("g")).await,
        Err(MqError::Closed)
    ));
}

/// The same id twice in a partition is stored and delivered once, even after
/// it was consumed; another partition or a cause-qualified id is new.
pub async fn idempotent_publish(b: &dyn Backend) {
    let q = b.open("dedup", quiet()).await;
    let p = q.publisher();
    assert_eq!(p.publish(T, msg("same", "p")).await.unwrap().stored, 1);
    let r = p.publish(T, msg("same", "p")).await.unwrap();
    assert_eq!((r.stored, r.duplicates), (0, 1));
    let mut sub = subscribe(&q, fast_config("g")).await;
    let d = recv(&mut sub).await;
    assert_eq!(d.id(), "same");
    d.ack().await.unwrap();
    recv_none(&mut sub, Duration::from_millis(300)).await;
    // Still deduplicated after consumption.
    assert_eq!(p.publish(T, msg("same", "p")).await.unwrap().duplicates, 1);
    recv_none(&mut sub, Duration::from_millis(300)).await;
    // Scoped to (topic, partition): other partitions and new causes pass.
    assert_eq!(p.publish(T, msg("same", "other")).await.unwrap().stored, 1);
    assert_eq!(
        p.publish(T, msg("same/retry-1", "p")).await.unwrap().stored,
        1
    );
    let mut got = HashSet::new();
    for _ in 0..2 {
        let d = recv(&mut sub).await;
        got.insert((d.partition_key().to_string(), d.id().to_string()));
        d.ack().await.unwrap();
    }
    assert!(got.contains(&("other".into(), "same".into())));
    assert!(got.contains(&("p".into(), "same/retry-1".into())));
}

/// The dedup horizon is the configured retention: once an acked message is
/// older than it and collected, the id is accepted again.
pub async fn dedup_horizon_is_bounded_by_retention(b: &dyn Backend) {
    let cfg = QueueConfig {
        dedup_retention: Duration::from_millis(200),
        ..quiet()
    };
    let q = b.open("horizon", cfg.clone()).await;
    let mut sub = subscribe(&q, fast_config("g")).await;
    q.publisher().publish(T, msg("m", "p")).await.unwrap();
    recv(&mut sub).await.ack().await.unwrap();
    // A claim pass after the ack moved the cursor past it: from here only
    // the horizon keeps the message.
    let written = q.admin().outcomes_written();
    progress_until(&sub, "a claim pass after the ack", |p| {
        p.outcomes_seen >= written
    })
    .await;
    // Inside the horizon: collected nothing, still a duplicate.
    assert_eq!(q.admin().gc().await.unwrap().messages, 0);
    assert_eq!(
        q.publisher()
            .publish(T, msg("m", "p"))
            .await
            .unwrap()
            .duplicates,
        1
    );
    // Past the horizon: the same storage collected 300 ms later.
    let report = gc_from_later(b, "horizon", cfg, Duration::from_millis(300)).await;
    assert_eq!(report.messages, 1);
    assert_eq!(
        q.publisher()
            .publish(T, msg("m", "p"))
            .await
            .unwrap()
            .stored,
        1
    );
    let d = recv(&mut sub).await;
    assert_eq!(d.id(), "m");
    d.ack().await.unwrap();
}

/// Per-partition order holds with many interleaved partitions.
pub async fn ordering_within_partition(b: &dyn Backend) {
    let q = b.open("ordering", quiet()).await;
    let mut sub = subscribe(&q, fast_config("g")).await;
    let mut msgs = Vec::new();
    for i in 0..30 {
        for p in ["a", "b", "c"] {
            msgs.push(msg(&format!("{p}-{i:02}"), p));
        }
    }
    q.publisher().publish_batch(T, msgs).await.unwrap();
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for _ in 0..90 {
        let d = recv(&mut sub).await;
        seen.entry(d.partition_key().to_string())
            .or_default()
            .push(d.id().to_string());
        d.ack().await.unwrap();
    }
    for (p, ids) in seen {
        let expected: Vec<String> = (0..30).map(|i| format!("{p}-{i:02}")).collect();
        assert_eq!(ids, expected, "partition {p}");
    }
}

/// An unfinished message in one partition never delays another partition.
pub async fn partitions_are_isolated(b: &dyn Backend) {
    let q = b.open("isolation", quiet()).await;
    let mut cfg = fast_config("g");
    cfg.batch_size = 1;
    let mut sub = subscribe(&q, cfg).await;
    q.publisher().publish(T, msg("a1", "a")).await.unwrap();
    q.publisher().publish(T, msg("a2", "a")).await.unwrap();
    let held = recv(&mut sub).await;
    assert_eq!(held.id(), "a1");
    q.publisher()
        .publish_batch(T, (0..5).map(|i| msg(&format!("b{i}"), "b")).collect())
        .await
        .unwrap();
    for i in 0..5 {
        let d = recv(&mut sub).await;
        assert_eq!(d.id(), format!("b{i}"));
        d.ack().await.unwrap();
    }
    held.ack().await.unwrap();
    assert_eq!(recv(&mut sub).await.id(), "a2");
}

/// `batch_size = 1`: one message of a partition in flight at a time, in order.
pub async fn batch_size_one_serializes(b: &dyn Backend) {
    let q = b.open("serial", quiet()).await;
    let mut cfg = fast_config("g");
    cfg.batch_size = 1;
    let mut sub = subscribe(&q, cfg).await;
    q.publisher()
        .publish_batch(T, (0..4).map(|i| msg(&format!("m{i}"), "p")).collect())
        .await
        .unwrap();
    for i in 0..4 {
        let d = recv(&mut sub).await;
        assert_eq!(d.id(), format!("m{i}"));
        recv_none(&mut sub, Duration::from_millis(150)).await;
        d.ack().await.unwrap();
    }
}

/// Consumer groups keep independent state: A's nack does not affect B.
pub async fn consumer_groups_are_independent(b: &dyn Backend) {
    let q = b.open("groups", quiet()).await;
    let mut a = subscribe(&q, fast_config("group-a")).await;
    let mut bsub = subscribe(&q, fast_config("group-b")).await;
    q.publisher().publish(T, msg("m", "p")).await.unwrap();
    let da = recv(&mut a).await;
    let db = recv(&mut bsub).await;
    assert_eq!((da.id(), db.id()), ("m", "m"));
    assert!(matches!(
        da.nack(Failure::new("a failed")).await.unwrap(),
        NackOutcome::RetryAt(_)
    ));
    db.ack().await.unwrap();
    let again = recv(&mut a).await;
    assert_eq!((again.id(), again.attempt()), ("m", 2));
    again.ack().await.unwrap();
    recv_none(&mut bsub, Duration::from_millis(300)).await;
}

/// Nack backoff honours initial, multiplier and cap, and is stored: a new
/// queue on the same storage (a restart) keeps the schedule.
pub async fn nack_backoff_is_persisted(b: &dyn Backend) {
    let q = b.open("backoff", quiet()).await;
    let mut cfg = fast_config("g");
    cfg.retry = RetryPolicy {
        max_attempts: 10,
        initial_backoff: Duration::from_millis(300),
        max_backoff: Duration::from_millis(700),
        multiplier: 2.0,
        jitter: 0.0,
    };
    let mut sub = subscribe(&q, cfg.clone()).await;
    q.publisher().publish(T, msg("m", "p")).await.unwrap();
    let d = recv(&mut sub).await;
    let t0 = Instant::now();
    d.nack(Failure::new("first")).await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(d.attempt(), 2);
    assert!(
        t0.elapsed() >= Duration::from_millis(290),
        "first retry after {:?}",
        t0.elapsed()
    );
    // Second failure: 600 ms. Restart the engine in between.
    let t1 = Instant::now();
    d.nack(Failure::new("second")).await.unwrap();
    sub.close().await;
    q.close();
    let q2 = b.open("backoff", quiet()).await;
    let mut sub2 = subscribe(&q2, cfg.clone()).await;
    let d = recv(&mut sub2).await;
    assert_eq!(d.attempt(), 3);
    assert!(
        t1.elapsed() >= Duration::from_millis(590),
        "second retry after {:?}",
        t1.elapsed()
    );
    // Third failure: 1200 ms capped to 700 ms.
    let t2 = Instant::now();
    d.nack(Failure::new("third")).await.unwrap();
    let d = recv(&mut sub2).await;
    let e = t2.elapsed();
    assert!(
        e >= Duration::from_millis(690) && e < Duration::from_millis(1150),
        "capped retry after {e:?}"
    );
    d.ack().await.unwrap();
}

/// `nack_after` waits the caller's delay, counts an attempt and dead-letters
/// on the last one like `nack`.
pub async fn nack_after_uses_callers_delay(b: &dyn Backend) {
    let q = b.open("nack-after", quiet()).await;
    let mut cfg = fast_config("g");
    cfg.retry.max_attempts = 2;
    let mut sub = subscribe(&q, cfg).await;
    q.publisher().publish(T, msg("m", "p")).await.unwrap();
    let d = recv(&mut sub).await;
    let t0 = Instant::now();
    assert!(matches!(
        d.nack_after(Failure::new("rate limited"), Duration::from_millis(400))
            .await
            .unwrap(),
        NackOutcome::RetryAt(_)
    ));
    let d = recv(&mut sub).await;
    assert_eq!(d.attempt(), 2);
    assert!(
        t0.elapsed() >= Duration::from_millis(390),
        "retried after {:?}",
        t0.elapsed()
    );
    assert_eq!(
        d.nack_after(Failure::new("again"), Duration::from_millis(10))
            .await
            .unwrap(),
        NackOutcome::DeadLettered
    );
    let dead = q.admin().dead_letters(T, 0, 10).await.unwrap();
    assert_eq!(dead[0].failure.message, "again");
}

/// The nack that exhausts `max_attempts` dead-letters with the caller's failure.
pub async fn nack_exhaustion_dead_letters(b: &dyn Backend) {
    let q = b.open("exhaust", quiet()).await;
    let mut cfg = fast_config("g");
    cfg.retry.max_attempts = 3;
    let mut sub = subscribe(&q, cfg).await;
    let m = Message::new("m", "p", b"body".to_vec()).with_meta("k", "v");
    q.publisher().publish(T, m.clone()).await.unwrap();
    for attempt in 1..=3u32 {
        let d = recv(&mut sub).await;
        assert_eq!(d.attempt(), attempt);
        let out = d
            .nack(
                Failure::new(format!("failure {attempt}"))
                    .with_detail(serde_json::json!({"n": attempt})),
            )
            .await
            .unwrap();
        if attempt < 3 {
            assert!(matches!(out, NackOutcome::RetryAt(_)));
        } else {
            assert_eq!(out, NackOutcome::DeadLettered);
        }
    }
    recv_none(&mut sub, Duration::from_millis(300)).await;
    let dead = q.admin().dead_letters(T, 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.message, m);
    assert_eq!(d.original_topic, T);
    assert_eq!(d.group, "g");
    assert_eq!(d.attempts, 3);
    assert_eq!(d.failure.message, "failure 3");
    assert_eq!(d.failure.detail, serde_json::json!({"n": 3}));
    assert!(d.failed_at >= d.published_at && d.failed_at > 0);
}

/// Reject dead-letters at once; re-dead-lettering the same id is not an error.
pub async fn reject_dead_letters_now(b: &dyn Backend) {
    let q = b.open("reject", quiet()).await;
    let mut sub = subscribe(&q, fast_config("g")).await;
    q.publisher().publish(T, msg("poison", "p")).await.unwrap();
    let d = recv(&mut sub).await;
    d.reject(Failure::new("malformed")).await.unwrap();
    recv_none(&mut sub, Duration::from_millis(200)).await;
    let dead = q.admin().dead_letters(T, 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 1);
    assert_eq!(dead[0].failure, Failure::new("malformed"));
    // Replay, fail again: one dead letter, refreshed.
    q.admin()
        .replay_dead_letter(T, dead[0].dlq_id)
        .await
        .unwrap();
    let d = recv(&mut sub).await;
    assert_eq!((d.id(), d.attempt()), ("poison", 1));
    d.reject(Failure::new("still malformed")).await.unwrap();
    let dead = q.admin().dead_letters(T, 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].failure.message, "still malformed");
}

/// Dead letters are listable with paging and replayable; unknown ids error.
pub async fn dead_letters_list_and_replay(b: &dyn Backend) {
    let q = b.open("dlq", quiet()).await;
    let mut sub = subscribe(&q, fast_config("g")).await;
    q.publisher()
        .publish_batch(
            T,
            (0..3)
                .map(|i| msg(&format!("m{i}"), &format!("p{i}")))
                .collect(),
        )
        .await
        .unwrap();
    for _ in 0..3 {
        recv(&mut sub)
            .await
            .reject(Failure::new("bad"))
            .await
            .unwrap();
    }
    let all = q.admin().dead_letters(T, 0, 10).await.unwrap();
    assert_eq!(all.len(), 3);
    let page = q.admin().dead_letters(T, all[0].dlq_id, 1).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].dlq_id, all[1].dlq_id);
    assert!(q
        .admin()
        .dead_letters("other", 0, 10)
        .await
        .unwrap()
        .is_empty());
    let target = &all[1];
    q.admin()
        .replay_dead_letter(T, target.dlq_id)
        .await
        .unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(d.message(), &target.message);
    d.ack().await.unwrap();
    assert_eq!(q.admin().dead_letters(T, 0, 10).await.unwrap().len(), 2);
    assert!(matches!(
        q.admin().replay_dead_letter(T, target.dlq_id).await,
        Err(MqError::UnknownDeadLetter { .. })
    ));
    assert!(matches!(
        q.admin().replay_dead_letter(T, 999_999).await,
        Err(MqError::UnknownDeadLetter { .. })
    ));
}

/// Postpone is a barrier: later messages of the partition wait, the
/// postponed message comes back first as attempt 1.
pub async fn postpone_is_a_barrier(b: &dyn Backend) {
    let q = b.open("postpone", quiet()).await;
    let mut sub = subscribe(&q, fast_config("g")).await;
    q.publisher().publish(T, msg("m1", "p")).await.unwrap();
    let d = recv(&mut sub).await;
    let t0 = Instant::now();
    d.postpone(Duration::from_millis(500)).await.unwrap();
    q.publisher().publish(T, msg("m2", "p")).await.unwrap();
    q.publisher().publish(T, msg("x", "other")).await.unwrap();
    let other = recv(&mut sub).await;
    assert_eq!(other.id(), "x", "another partition is not blocked");
    other.ack().await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!((d.id(), d.attempt()), ("m1", 1));
    assert!(t0.elapsed() >= Duration::from_millis(490));
    d.ack().await.unwrap();
    assert_eq!(recv(&mut sub).await.id(), "m2");
}

/// After a postpone, `max_attempts` genuine failures still dead-letter.
pub async fn postpone_resets_failure_streak(b: &dyn Backend) {
    let q = b.open("streak", quiet()).await;
    let mut cfg = fast_config("g");
    cfg.retry.max_attempts = 2;
    let mut sub = subscribe(&q, cfg).await;
    q.publisher().publish(T, msg("m", "p")).await.unwrap();
    let d = recv(&mut sub).await;
    d.nack(Failure::new("1")).await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(d.attempt(), 2);
    d.postpone(Duration::from_millis(50)).await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(d.attempt(), 1, "postpone resets the streak");
    assert!(matches!(
        d.nack(Failure::new("2")).await.unwrap(),
        NackOutcome::RetryAt(_)
    ));
    let d = recv(&mut sub).await;
    assert_eq!(d.attempt(), 2);
    assert_eq!(
        d.nack(Failure::new("3")).await.unwrap(),
        NackOutcome::DeadLettered
    );
    assert_eq!(q.admin().dead_letters(T, 0, 10).await.unwrap().len(), 1);
}

/// `wake` makes a postponed message due now.
pub async fn wake_makes_postponed_due(b: &dyn Backend) {
    let q = b.open("wake", quiet()).await;
    let mut sub = subscribe(&q, fast_config("g")).await;
    q.publisher().publish(T, msg("m", "p")).await.unwrap();
    recv(&mut sub)
        .await
        .postpone(Duration::from_secs(3600))
        .await
        .unwrap();
    recv_none(&mut sub, Duration::from_millis(200)).await;
    assert_eq!(q.admin().wake(T, "other").await.unwrap(), 0);
    assert_eq!(q.admin().wake(T, "p").await.unwrap(), 1);
    let d = recv(&mut sub).await;
    assert_eq!((d.id(), d.attempt()), ("m", 1));
    d.ack().await.unwrap();
}

/// A wake that lands while the partition's message is in flight (claimed,
/// no outcome yet) is not lost: the delivery's postpone returns the
/// message due at once instead of after the hold. The wake comes through
/// a second handle on the same storage (another process on the SQL
/// servers), so nothing in-process can carry it. A new delivery clears the
/// mark: it started after the wake.
pub async fn wake_reaches_an_in_flight_delivery(b: &dyn Backend) {
    let q = b.open("wake-in-flight", quiet()).await;
    let other = b.open("wake-in-flight", quiet()).await;
    let mut sub = subscribe(&q, fast_config("g")).await;
    q.publisher().publish(T, msg("m", "p")).await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(other.admin().wake(T, "p").await.unwrap(), 1, "marked");
    // Marking twice counts once.
    assert_eq!(other.admin().wake(T, "p").await.unwrap(), 0);
    // An hour's hold: only the mark brings it back within WAIT.
    d.postpone(Duration::from_secs(3600)).await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!((d.id(), d.attempt()), ("m", 1));
    // This delivery began after the wake: its hold is a real hold.
    d.postpone(Duration::from_secs(3600)).await.unwrap();
    recv_none(&mut sub, Duration::from_millis(300)).await;
    // ... until the next wake, which finds it postponed.
    assert_eq!(other.admin().wake(T, "p").await.unwrap(), 1);
    let d = recv(&mut sub).await;
    assert_eq!((d.id(), d.attempt()), ("m", 1));
    d.ack().await.unwrap();
    other.close();
}

/// A wake makes a message delayed by `publish_after` available now.
pub async fn wake_makes_delayed_publish_due(b: &dyn Backend) {
    let q = b.open("wake-delayed", quiet()).await;
    let mut sub = subscribe(&q, fast_config("g")).await;
    q.publisher()
        .publish_after(T, msg("later", "p"), Duration::from_secs(3600))
        .await
        .unwrap();
    recv_none(&mut sub, Duration::from_millis(200)).await;
    assert_eq!(q.admin().wake(T, "p").await.unwrap(), 1);
    let d = recv(&mut sub).await;
    assert_eq!((d.id(), d.attempt()), ("later", 1));
    d.ack().await.unwrap();
}

/// A wake of a partition with nothing pending (never published, or every
/// message done) does nothing, and leaves no mark behind: a message
/// published after it is delivered once and its hold is a real hold.
pub async fn wake_with_nothing_pending_does_nothing(b: &dyn Backend) {
    let q = b.open("wake-idle", quiet()).await;
    let mut sub = subscribe(&q, fast_config("g")).await;
    assert_eq!(q.admin().wake(T, "p").await.unwrap(), 0);
    q.publisher().publish(T, msg("m1", "p")).await.unwrap();
    recv(&mut sub).await.ack().await.unwrap();
    assert_eq!(q.admin().wake(T, "p").await.unwrap(), 0);
    q.publisher().publish(T, msg("m2", "p")).await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!((d.id(), d.attempt()), ("m2", 1));
    d.postpone(Duration::from_secs(3600)).await.unwrap();
    recv_none(&mut sub, Duration::from_millis(300)).await;
}

/// An unfinished delivery redelivers after the visibility timeout with
/// attempt + 1; `extend_visibility` prevents it.
pub async fn visibility_timeout_redelivers(b: &dyn Backend) {
    let q = b.open("visibility", quiet()).await;
    let mut cfg = fast_config("g");
    cfg.visibility_timeout = Duration::from_millis(300);
    let mut sub = subscribe(&q, cfg).await;
    q.publisher().publish(T, msg("dropped", "a")).await.unwrap();
    let d = recv(&mut sub).await;
    drop(d);
    let d = recv(&mut sub).await;
    assert_eq!((d.id(), d.attempt()), ("dropped", 2));
    d.ack().await.unwrap();

    q.publisher()
        .publish(T, msg("extended", "b"))
        .await
        .unwrap();
    let d = recv(&mut sub).await;
    d.extend_visibility(Duration::from_secs(2)).await.unwrap();
    recv_none(&mut sub, Duration::from_millis(800)).await;
    d.ack().await.unwrap();
}

/// Every outcome is one-shot.
pub async fn outcomes_are_one_shot(b: &dyn Backend) {
    let q = b.open("one-shot", quiet()).await;
    let mut sub = subscribe(&q, fast_config("g")).await;
    q.publisher().publish(T, msg("m", "p")).await.unwrap();
    let d = recv(&mut sub).await;
    d.ack().await.unwrap();
    assert!(matches!(d.ack().await, Err(MqError::AlreadyFinalized(_))));
    assert!(matches!(
        d.nack(Failure::new("x")).await,
        Err(MqError::AlreadyFinalized(_))
    ));
    assert!(matches!(
        d.reject(Failure::new("x")).await,
        Err(MqError::AlreadyFinalized(_))
    ));
    assert!(matches!(
        d.postpone(Duration::from_secs(1)).await,
        Err(MqError::AlreadyFinalized(_))
    ));
    assert!(matches!(
        d.extend_visibility(Duration::from_secs(1)).await,
        Err(MqError::AlreadyFinalized(_))
    ));
}

/// An outcome from a delivery that was since redelivered is refused.
pub async fn stale_delivery_is_fenced(b: &dyn Backend) {
    let q = b.open("stale", quiet()).await;
    let mut cfg = fast_config("g");
    cfg.visibility_timeout = Duration::from_millis(200);
    let mut sub = subscribe(&q, cfg).await;
    q.publisher().publish(T, msg("m", "p")).await.unwrap();
    let first = recv(&mut sub).await;
    let mut latest = recv(&mut sub).await;
    assert!(latest.attempt() >= 2);
    assert!(matches!(first.ack().await, Err(MqError::StaleDelivery(_))));
    // On a loaded machine the 200 ms can run out again before the ack:
    // then that delivery is stale too, and the next one must be acked.
    loop {
        match latest.ack().await {
            Ok(()) => break,
            Err(MqError::StaleDelivery(_)) => latest = recv(&mut sub).await,
            Err(e) => panic!("ack of the latest delivery: {e}"),
        }
    }
}

/// Two subscribers of one group split the partitions and every message is
/// delivered exactly once between them.
pub async fn subscribers_share_partitions(b: &dyn Backend) {
    let q = b.open("share", quiet()).await;
    let mut s1 = subscribe(&q, fast_config("g")).await;
    let mut s2 = subscribe(&q, fast_config("g")).await;
    // Both heartbeat and each one's lease tick counted the other before work
    // arrives, so the first does not take all.
    for s in [&s1, &s2] {
        progress_until(s, "both subscribers active", |p| p.active_subscribers >= 2).await;
    }
    let parts = ["p0", "p1", "p2", "p3"];
    let total = 200;
    let publisher = q.publisher();
    // Deliveries received so far: the feeder publishes a batch once the
    // previous one arrived, so publishes interleave with claims (the case
    // under test) by construction.
    let (received, mut arrived) = tokio::sync::watch::channel(0usize);
    let feeder = tokio::spawn(async move {
        for i in 0..total / 4 {
            let batch = parts
                .iter()
                .map(|p| msg(&format!("{p}-{i:03}"), p))
                .collect();
            publisher.publish_batch(T, batch).await.unwrap();
            // Ends when the consumer side gave up (the assertions tell why).
            if arrived.wait_for(|n| *n >= (i + 1) * 4).await.is_err() {
                return;
            }
        }
    });
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_sub = [HashSet::new(), HashSet::new()];
    let deadline = Instant::now() + WAIT * 2;
    while got.len() < total {
        let next = tokio::time::timeout_at(deadline, async {
            tokio::select! {
                Some(d) = s1.recv() => Some((0, d)),
                Some(d) = s2.recv() => Some((1, d)),
                else => None,
            }
        })
        .await;
        let Ok(Some((i, d))) = next else { break };
        per_sub[i].insert(d.partition_key().to_string());
        *got.entry(d.id().to_string()).or_default() += 1;
        d.ack().await.unwrap();
        received.send_modify(|n| *n += 1);
    }
    drop(received);
    feeder.await.unwrap();
    assert_eq!(got.len(), total, "every message delivered");
    assert!(got.values().all(|n| *n == 1), "no message delivered twice");
    assert!(
        !per_sub[0].is_empty() && !per_sub[1].is_empty(),
        "both subscribers served partitions: {per_sub:?}"
    );
}

/// A burst of new partitions raises a subscriber's fair-share cap at once,
/// not at its next lease renewal: `s2` renews only hourly, so without the
/// early recompute it would stay at the cap of 1 it got while nothing was
/// busy, and the burst's last partitions would wait an hour.
pub async fn a_burst_raises_the_fair_share_at_once(b: &dyn Backend) {
    let q = b.open("burst", quiet()).await;
    // s1 holds at most 5 deliveries, so s2 must serve the other half.
    let mut five = fast_config("g");
    five.max_in_flight = 5;
    let mut s1 = subscribe(&q, five).await;
    // s1's claim loop has ticked (heartbeat written) once it delivered.
    q.publisher().publish(T, msg("warm", "warm")).await.unwrap();
    recv(&mut s1).await.ack().await.unwrap();
    let mut hourly = fast_config("g");
    hourly.lease_duration = Duration::from_secs(3 * 3600);
    hourly.lease_renewal = Duration::from_secs(3600);
    let mut s2 = subscribe(&q, hourly).await;
    // s2's first tick sees s1 and nothing busy: a cap of 1. Its first
    // delivery proves that tick happened.
    q.publisher()
        .publish(T, msg("first", "p-first"))
        .await
        .unwrap();
    let mut held = Vec::new();
    let mut per_sub = [0usize, 0usize];
    let first = tokio::select! {
        Some(d) = s1.recv() => { per_sub[0] += 1; d }
        Some(d) = s2.recv() => { per_sub[1] += 1; d }
    };
    held.push(first);
    let burst: Vec<Message> = (0..9)
        .map(|i| msg(&format!("m{i}"), &format!("p{i}")))
        .collect();
    q.publisher().publish_batch(T, burst).await.unwrap();
    // Every partition's message is delivered and held (not acked), so each
    // stays busy and leased: s1 holds 5 at most, so s2's cap must have grown
    // from 1 to its share (5 of 10 busy partitions) for all 10 to arrive.
    let deadline = Instant::now() + WAIT;
    while held.len() < 10 {
        let next = tokio::time::timeout_at(deadline, async {
            tokio::select! {
                Some(d) = s1.recv() => (0, d),
                Some(d) = s2.recv() => (1, d),
            }
        })
        .await;
        match next {
            Ok((i, d)) => {
                per_sub[i] += 1;
                held.push(d);
            }
            Err(_) => panic!(
                "{} of 10 partitions delivered within {WAIT:?} (per subscriber {per_sub:?})",
                held.len()
            ),
        }
    }
    assert!(per_sub[1] >= 5, "s2's cap grew: {per_sub:?}");
    for d in held {
        d.ack().await.unwrap();
    }
}

/// A crashed subscriber's partitions and unfinished messages are taken over
/// once its lease runs out, long before their visibility timeout.
pub async fn crashed_subscriber_is_taken_over(b: &dyn Backend) {
    let q = b.open("takeover", quiet()).await;
    let mut cfg = fast_config("g");
    cfg.visibility_timeout = Duration::from_secs(60);
    cfg.lease_duration = Duration::from_millis(600);
    let mut a = subscribe(&q, cfg.clone()).await;
    q.publisher()
        .publish_batch(
            T,
            (0..3)
                .map(|i| msg(&format!("m{i}"), &format!("p{i}")))
                .collect(),
        )
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(recv(&mut a).await);
    }
    a.kill();
    let start = Instant::now();
    // A survivor under another name (the same name would be a restart,
    // which `recover` handles).
    cfg.subscriber = "survivor".into();
    let mut b2 = subscribe(&q, cfg).await;
    let mut ids = HashSet::new();
    for _ in 0..3 {
        let d = recv(&mut b2).await;
        assert_eq!(d.attempt(), 2);
        ids.insert(d.id().to_string());
        d.ack().await.unwrap();
    }
    assert_eq!(ids.len(), 3);
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "takeover waited for the visibility timeout: {:?}",
        start.elapsed()
    );
    // The dead subscriber's late outcomes are fenced.
    for d in held {
        assert!(matches!(d.ack().await, Err(MqError::StaleDelivery(_))));
    }
}

/// A subscriber restarted under the same name gets the deliveries its dead
/// incarnation held at once (not after the visibility timeout); messages
/// backing off after a nack keep their schedule.
pub async fn restarted_subscriber_reclaims_its_work(b: &dyn Backend) {
    let q = b.open("reclaim", quiet()).await;
    let mut cfg = fast_config("g");
    cfg.subscriber = "worker-1".into();
    cfg.visibility_timeout = Duration::from_secs(60);
    cfg.lease_duration = Duration::from_secs(60);
    cfg.lease_renewal = Duration::from_secs(20);
    cfg.retry.initial_backoff = Duration::from_secs(60);
    cfg.retry.max_backoff = Duration::from_secs(60);
    let mut sub = subscribe(&q, cfg.clone()).await;
    q.publisher().publish(T, msg("held", "a")).await.unwrap();
    q.publisher()
        .publish(T, msg("backing-off", "b"))
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(recv(&mut sub).await);
    }
    for d in &got {
        if d.id() == "backing-off" {
            d.nack(Failure::new("later")).await.unwrap();
        }
    }
    sub.kill();
    drop(got);
    q.close();
    let q2 = b.open("reclaim", quiet()).await;
    let mut sub2 = subscribe(&q2, cfg).await;
    let start = Instant::now();
    let d = recv(&mut sub2).await;
    assert_eq!((d.id(), d.attempt()), ("held", 2));
    assert!(start.elapsed() < Duration::from_secs(30));
    d.ack().await.unwrap();
    recv_none(&mut sub2, Duration::from_millis(500)).await;
}

/// Graceful close releases leases at once: a peer serves the partition
/// long before the lease would have expired.
pub async fn graceful_close_releases_leases(b: &dyn Backend) {
    let q = b.open("release", quiet()).await;
    let mut cfg = fast_config("g");
    cfg.lease_duration = Duration::from_secs(60);
    cfg.lease_renewal = Duration::from_secs(20);
    let mut a = subscribe(&q, cfg.clone()).await;
    q.publisher().publish(T, msg("m1", "p")).await.unwrap();
    q.publisher().publish(T, msg("m2", "p")).await.unwrap();
    recv(&mut a).await.ack().await.unwrap();
    // m2 may sit buffered in `a`; close hands it back without an attempt.
    a.close().await;
    let mut b2 = subscribe(&q, cfg).await;
    let start = Instant::now();
    let d = recv(&mut b2).await;
    assert_eq!((d.id(), d.attempt()), ("m2", 1));
    assert!(start.elapsed() < Duration::from_secs(30));
    d.ack().await.unwrap();
}

/// Reject, the retry limit and an unfinished earlier message in one window:
/// a restart still delivers the unfinished message (no watermark skip).
pub async fn no_message_lost_across_dead_letters(b: &dyn Backend) {
    let q = b.open("no-loss", quiet()).await;
    let mut cfg = fast_config("g");
    cfg.retry.max_attempts = 1;
    // Long enough that no delivery times out before the test finalizes it
    // (500 ms failed once on a loaded machine: a late ack was stale); the
    // restart below takes m1 back through `recover` (same subscriber name),
    // not through its visibility timeout.
    cfg.visibility_timeout = Duration::from_secs(30);
    let mut sub = subscribe(&q, cfg.clone()).await;
    q.publisher()
        .publish_batch(T, (1..=5).map(|i| msg(&format!("m{i}"), "p")).collect())
        .await
        .unwrap();
    let mut ds = Vec::new();
    for _ in 0..5 {
        ds.push(recv(&mut sub).await);
    }
    let ids: Vec<&str> = ds.iter().map(|d| d.id()).collect();
    assert_eq!(ids, ["m1", "m2", "m3", "m4", "m5"]);
    ds[1].reject(Failure::new("poison")).await.unwrap();
    assert_eq!(
        ds[2].nack(Failure::new("once")).await.unwrap(),
        NackOutcome::DeadLettered
    );
    ds[3].ack().await.unwrap();
    ds[4].ack().await.unwrap();
    // m1 never finished: crash and restart.
    sub.kill();
    drop(ds);
    q.close();
    let q2 = b.open("no-loss", quiet()).await;
    cfg.retry.max_attempts = 5;
    let mut sub2 = subscribe(&q2, cfg).await;
    let d = recv(&mut sub2).await;
    assert_eq!((d.id(), d.attempt()), ("m1", 2));
    d.ack().await.unwrap();
    recv_none(&mut sub2, Duration::from_millis(300)).await;
    let dead: Vec<String> = q2
        .admin()
        .dead_letters(T, 0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.message.id)
        .collect();
    assert_eq!(dead, ["m2", "m3"]);
    let stats = q2.admin().stats(T, "g").await.unwrap();
    assert_eq!(stats.pending, 0);
}

/// A message redelivered `max_attempts` times without any outcome (its
/// consumer keeps dying) is dead-lettered instead of looping forever.
pub async fn redelivery_limit_dead_letters(b: &dyn Backend) {
    let q = b.open("redelivery-limit", quiet()).await;
    let mut cfg = fast_config("g");
    cfg.retry.max_attempts = 2;
    cfg.visibility_timeout = Duration::from_millis(150);
    let mut sub = subscribe(&q, cfg).await;
    q.publisher().publish(T, msg("m", "p")).await.unwrap();
    assert_eq!(recv(&mut sub).await.attempt(), 1);
    assert_eq!(recv(&mut sub).await.attempt(), 2);
    recv_none(&mut sub, Duration::from_millis(600)).await;
    let dead = q.admin().dead_letters(T, 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 2);
    assert!(dead[0].failure.message.contains("without an outcome"));
}

/// Acked messages past the retention are collected; unfinished ones stay;
/// empty partitions are removed and idle partitions hold no lease.
pub async fn garbage_collection_and_idle_partitions(b: &dyn Backend) {
    let cfg = QueueConfig {
        dedup_retention: Duration::ZERO,
        ..quiet()
    };
    let q = b.open("gc", cfg.clone()).await;
    let mut sub = subscribe(&q, fast_config("g")).await;
    q.publisher()
        .publish_batch(
            T,
            (0..10)
                .map(|i| msg(&format!("m{i}"), &format!("p{i}")))
                .collect(),
        )
        .await
        .unwrap();
    let mut keep = None;
    for _ in 0..10 {
        let d = recv(&mut sub).await;
        if d.id() == "m0" {
            keep = Some(d);
        } else {
            d.ack().await.unwrap();
        }
    }
    // A claim pass after the acks advances the cursors past them ...
    let written = q.admin().outcomes_written();
    progress_until(&sub, "a claim pass after the acks", |p| {
        p.outcomes_seen >= written
    })
    .await;
    // ... and a lease tick sheds the idle leases: checked after each pass of
    // the claim loop (which ticks first when a tick is due), until a deadline.
    let mut passes = sub.progress();
    let deadline = Instant::now() + WAIT;
    let mut checks = 0;
    loop {
        let stats = q.admin().stats(T, "g").await.unwrap();
        checks += 1;
        if stats.leased == 1 {
            break;
        }
        let more = tokio::time::timeout_at(deadline, passes.changed()).await;
        assert!(
            matches!(more, Ok(Ok(()))),
            "only the busy partition keeps a lease: {stats:?} after {checks} checks, {:?}",
            *passes.borrow()
        );
    }
    // The collector takes acks strictly older than `now - retention` (0
    // here): collected a second later, the last ack is past it.
    let report = gc_from_later(b, "gc", cfg, Duration::from_secs(1)).await;
    assert_eq!(report.messages, 9);
    assert_eq!(report.partitions, 9);
    let stats = q.admin().stats(T, "g").await.unwrap();
    assert_eq!((stats.stored, stats.pending, stats.partitions), (1, 1, 1));
    if let Some(d) = keep {
        d.ack().await.unwrap();
    }
}

/// A publish or wake reaches a waiting subscriber without a polling tick.
pub async fn wake_ups_are_event_driven(b: &dyn Backend) {
    let q = b.open("push", quiet()).await;
    let mut cfg = fast_config("g");
    // Polling alone would take a minute.
    cfg.poll_interval = Duration::from_secs(60);
    cfg.lease_renewal = Duration::from_secs(20);
    cfg.lease_duration = Duration::from_secs(60);
    let mut sub = subscribe(&q, cfg).await;
    // The first (empty) claim is over, so only the push can bring what is
    // published next (a publish during the loop's wait wakes it; one before
    // the wait makes the wait end at once).
    progress_until(&sub, "the first claim pass done", |p| p.passes >= 1).await;
    let start = Instant::now();
    q.publisher().publish(T, msg("m", "p")).await.unwrap();
    let d = recv(&mut sub).await;
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "publish wake-up took {:?}",
        start.elapsed()
    );
    d.postpone(Duration::from_secs(3600)).await.unwrap();
    // As above: a claim pass has run on storage holding the postpone (and
    // found nothing due) before the wake is sent.
    let written = q.admin().outcomes_written();
    progress_until(&sub, "a claim pass after the postpone", |p| {
        p.outcomes_seen >= written
    })
    .await;
    let start = Instant::now();
    q.admin().wake(T, "p").await.unwrap();
    let d = recv(&mut sub).await;
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "wake took {:?}",
        start.elapsed()
    );
    d.ack().await.unwrap();
}

/// Bad input gets a typed error and changes nothing.
pub async fn bad_input_is_rejected(b: &dyn Backend) {
    let cfg = QueueConfig {
        max_payload_bytes: 64,
        ..quiet()
    };
    let q = b.open("bad-input", cfg).await;
    let p = q.publisher();
    assert!(matches!(
        p.publish("Bad Topic", msg("m", "p")).await,
        Err(MqError::InvalidTopic(_))
    ));
    assert!(matches!(
        p.publish("", msg("m", "p")).await,
        Err(MqError::InvalidTopic(_))
    ));
    assert!(matches!(
        p.publish(T, Message::new("m", "p", vec![0u8; 65])).await,
        Err(MqError::PayloadTooLarge {
            size: 65,
            limit: 64
        })
    ));
    assert!(matches!(
        p.publish(T, Message::new("", "p", vec![])).await,
        Err(MqError::InvalidMessage { .. })
    ));
    assert!(matches!(
        p.publish_after(T, msg("m", "p"), Duration::ZERO).await,
        Err(MqError::InvalidDelay(..))
    ));
    // A batch with one bad message stores none of it.
    let batch = vec![msg("ok", "p"), Message::new("big", "p", vec![0u8; 100])];
    assert!(p.publish_batch(T, batch).await.is_err());
    assert!(matches!(
        q.admin().replay_dead_letter(T, 42).await,
        Err(MqError::UnknownDeadLetter { id: 42, .. })
    ));
    let mut bad = fast_config("g");
    bad.batch_size = 0;
    assert!(matches!(
        q.subscriber().subscribe(T, bad).await,
        Err(MqError::InvalidConfig(_))
    ));
    assert!(matches!(
        q.subscriber().subscribe("UPPER", fast_config("g")).await,
        Err(MqError::InvalidTopic(_))
    ));
    assert_eq!(q.admin().stats(T, "g").await.unwrap().stored, 0);
    let mut sub = subscribe(&q, fast_config("g")).await;
    p.publish(T, msg("m", "p")).await.unwrap();
    let d = recv(&mut sub).await;
    assert!(matches!(
        d.postpone(Duration::ZERO).await,
        Err(MqError::InvalidDelay(..))
    ));
    assert!(matches!(
        d.extend_visibility(Duration::ZERO).await,
        Err(MqError::InvalidDelay(..))
    ));
    // The rejected postpone did not use up the one outcome.
    d.ack().await.unwrap();
}

/// Lease of the checks that drive time themselves; deliveries there stay
/// invisible for a minute, so only a takeover brings them back early.
const LEASE_MS: Millis = 1_000;
const VISIBILITY_MS: Millis = 60_000;

fn claim_at(subscriber: &str, now: Millis, lease_ms: Millis, may_acquire: usize) -> ClaimRequest {
    ClaimRequest {
        topic: T.into(),
        group: "g".into(),
        subscriber: subscriber.into(),
        now,
        max_messages: 100,
        batch_size: 10,
        visibility_ms: VISIBILITY_MS,
        lease_ms,
        may_acquire,
        max_attempts: 2,
    }
}

fn tick_at(subscriber: &str, now: Millis) -> LeaseTick {
    LeaseTick {
        topic: T.into(),
        group: "g".into(),
        subscriber: subscriber.into(),
        now,
        lease_ms: LEASE_MS,
        renewal: true,
    }
}

async fn publish_at(d: &dyn Driver, id: &str, partition: &str, now: Millis, available_at: Millis) {
    let m = NewMessage {
        message: msg(id, partition),
        available_at,
    };
    d.publish(T, &[m], now).await.expect("publish");
}

/// The one message of a claim, which must be `id`.
fn single(res: &ClaimResult, id: &str) -> ClaimedMessage {
    let ids: Vec<&str> = res.messages.iter().map(|m| m.message.id.as_str()).collect();
    assert_eq!(ids, [id], "claim result {res:?}");
    res.messages[0].clone()
}

fn outcome(m: &ClaimedMessage, kind: OutcomeKind) -> Outcome {
    Outcome {
        topic: T.into(),
        group: "g".into(),
        partition_key: m.message.partition_key.clone(),
        message_id: m.message.id.clone(),
        seq: m.seq,
        token: m.token,
        attempt: m.attempt,
        kind,
    }
}

async fn apply_one(d: &dyn Driver, o: Outcome, now: Millis) -> Result<(), MqError> {
    let mut results = d.apply(&[o], now).await.expect("apply");
    assert_eq!(results.len(), 1);
    results.remove(0)
}

fn list_at(now: Millis) -> PartitionQuery {
    PartitionQuery {
        topic: T.into(),
        group: "g".into(),
        owner: None,
        due_by: None,
        after: None,
        limit: 100,
        now,
    }
}

fn keys(page: &[PartitionInfo]) -> Vec<&str> {
    page.iter().map(|p| p.partition_key.as_str()).collect()
}

/// Takeover is immediate: the claim that acquires a partition from a dead
/// subscriber (lease expired, heartbeat stopped) delivers the deliveries it
/// died holding at once, as the next attempt (counted once), and the dead
/// owner's late outcomes are stale. A partition whose lease is still valid,
/// or whose owner still heartbeats, keeps its deliveries.
pub async fn takeover_releases_dead_owners_deliveries(b: &dyn Backend) {
    let d = b.driver("takeover-release").await;
    let d = d.as_ref();
    let t0 = now_millis();
    d.register_group(T, "g", t0).await.unwrap();

    // A takes partition a and stops heartbeating after t0 (it died).
    d.lease_tick(&tick_at("A", t0)).await.unwrap();
    publish_at(d, "m-a", "a", t0, t0).await;
    let a_m = single(
        &d.claim(&claim_at("A", t0, LEASE_MS, 1)).await.unwrap(),
        "m-a",
    );
    assert_eq!(a_m.attempt, 1);
    // C holds partition c on a long lease (and never heartbeats).
    publish_at(d, "m-c", "c", t0 + 10, t0 + 10).await;
    let c_m = single(
        &d.claim(&claim_at("C", t0 + 10, 60_000, 1)).await.unwrap(),
        "m-c",
    );
    // D heartbeats, but its lease on d lapses at t0 + 1450 (in production: a
    // renewal that found the row busy).
    d.lease_tick(&tick_at("D", t0 + 600)).await.unwrap();
    // A took partition e just before dying: that lease is valid past t0 + 1500.
    publish_at(d, "m-e", "e", t0 + 1390, t0 + 1390).await;
    let e_m = single(
        &d.claim(&claim_at("A", t0 + 1390, LEASE_MS, 1))
            .await
            .unwrap(),
        "m-e",
    );
    publish_at(d, "m-d1", "d", t0 + 1400, t0 + 1400).await;
    let d1 = single(
        &d.claim(&claim_at("D", t0 + 1400, 50, 1)).await.unwrap(),
        "m-d1",
    );
    publish_at(d, "m-d2", "d", t0 + 1460, t0 + 1460).await;

    // B at t0 + 1500: A's lease on a ran out and its heartbeat is stale. Its
    // tick makes a due (its only pending work is A's delivery) and the claim
    // takes a and d over.
    let now = t0 + 1500;
    let lease = d.lease_tick(&tick_at("B", now)).await.unwrap();
    assert_eq!((lease.cap, lease.owned), (2, 0), "{lease:?}");
    let res = d.claim(&claim_at("B", now, LEASE_MS, 2)).await.unwrap();
    let got: BTreeMap<&str, u32> = res
        .messages
        .iter()
        .map(|m| (m.message.id.as_str(), m.attempt))
        .collect();
    // m-a comes back at once as attempt 2 (not 3: with max_attempts = 2 a
    // double count would have dead-lettered it); D's m-d1 stays D's.
    assert_eq!(got, BTreeMap::from([("m-a", 2), ("m-d2", 1)]), "{res:?}");
    assert_eq!((res.acquired, res.taken_over, res.dead_lettered), (2, 1, 0));
    let b_m = res
        .messages
        .iter()
        .find(|m| m.message.id == "m-a")
        .cloned()
        .unwrap();
    let b_d2 = res
        .messages
        .iter()
        .find(|m| m.message.id == "m-d2")
        .cloned()
        .unwrap();
    assert_ne!(b_m.token, a_m.token);

    // Every delivery is still in flight where it was, and a's is now B's.
    let page = d.partitions(&list_at(now)).await.unwrap();
    let view: Vec<(&str, Option<&str>, u64)> = page
        .iter()
        .map(|p| {
            (
                p.partition_key.as_str(),
                p.lease_owner.as_deref(),
                p.in_flight,
            )
        })
        .collect();
    assert_eq!(
        view,
        [
            ("a", Some("B"), 1),
            ("c", Some("C"), 1),
            ("d", Some("B"), 2),
            ("e", Some("A"), 1),
        ]
    );

    // A's late outcomes are stale and leave B's delivery live.
    assert!(matches!(
        apply_one(d, outcome(&a_m, OutcomeKind::Ack), now + 10).await,
        Err(MqError::StaleDelivery(_))
    ));
    let late_retry = OutcomeKind::Retry {
        retry_at: now + 10,
        failure: Failure::new("late"),
    };
    assert!(matches!(
        apply_one(d, outcome(&a_m, late_retry), now + 10).await,
        Err(MqError::StaleDelivery(_))
    ));
    let extend = OutcomeKind::Extend {
        until: now + VISIBILITY_MS,
    };
    apply_one(d, outcome(&b_m, extend), now + 20).await.unwrap();
    apply_one(d, outcome(&b_m, OutcomeKind::Ack), now + 20)
        .await
        .unwrap();
    // The untouched deliveries kept their tokens.
    for m in [&e_m, &c_m, &d1, &b_d2] {
        apply_one(d, outcome(m, OutcomeKind::Ack), now + 30)
            .await
            .unwrap_or_else(|e| panic!("ack of {}: {e}", m.message.id));
    }
    let again = d
        .claim(&claim_at("B", now + 100, LEASE_MS, 2))
        .await
        .unwrap();
    assert!(again.messages.is_empty(), "{again:?}");
    assert!(d.dead_letters(T, 0, 10).await.unwrap().is_empty());
}

/// Dead-letter retention: exactly the dead letters that failed before the
/// cutoff go, oldest first, at most `limit` per call; newer ones stay.
pub async fn dead_letters_prune_by_age(b: &dyn Backend) {
    let d = b.driver("dlq-prune").await;
    let d = d.as_ref();
    let t0 = now_millis();
    d.register_group(T, "g", t0).await.unwrap();
    // Four messages on four partitions, dead-lettered at t0+1000 … t0+4000.
    for (i, p) in ["a", "b", "c", "e"].iter().enumerate() {
        publish_at(d, &format!("m-{p}"), p, t0, t0).await;
        let now = t0 + 1000 * (i as Millis + 1);
        let m = single(
            &d.claim(&claim_at("A", now, 60_000, 1)).await.unwrap(),
            &format!("m-{p}"),
        );
        let kind = OutcomeKind::DeadLetter {
            failure: Failure::new("bad"),
        };
        apply_one(d, outcome(&m, kind), now).await.unwrap();
    }
    let failed: Vec<Millis> = d
        .dead_letters(T, 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|x| x.failed_at)
        .collect();
    assert_eq!(failed, [t0 + 1000, t0 + 2000, t0 + 3000, t0 + 4000]);

    // Cutoff t0+3000: the first two are older (strictly before it).
    let cutoff = t0 + 3000;
    assert_eq!(d.count_dead_letters_before(cutoff).await.unwrap(), 2);
    assert_eq!(d.prune_dead_letters(cutoff, 1).await.unwrap(), 1);
    let left: Vec<String> = d
        .dead_letters(T, 0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|x| x.message.id)
        .collect();
    assert_eq!(left, ["m-b", "m-c", "m-e"], "the oldest went first");
    assert_eq!(d.prune_dead_letters(cutoff, 1).await.unwrap(), 1);
    assert_eq!(d.prune_dead_letters(cutoff, 1).await.unwrap(), 0);
    assert_eq!(d.count_dead_letters_before(cutoff).await.unwrap(), 0);
    let left: Vec<String> = d
        .dead_letters(T, 0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|x| x.message.id)
        .collect();
    assert_eq!(left, ["m-c", "m-e"], "nothing newer than the cutoff went");

    // Through the admin handle: bad limits are refused and delete nothing.
    let q = Queue::new(b.driver("dlq-prune").await, quiet());
    for limit in [0, crate::MAX_PRUNE_BATCH + 1] {
        assert!(matches!(
            q.admin().prune_dead_letters(t0 + 10_000, limit).await,
            Err(MqError::InvalidLimit { .. })
        ));
    }
    assert_eq!(
        q.admin()
            .count_dead_letters_before(t0 + 10_000)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        q.admin().prune_dead_letters(t0 + 10_000, 10).await.unwrap(),
        2
    );
    assert!(d.dead_letters(T, 0, 10).await.unwrap().is_empty());
}

/// A claim whose fair-share cap is spent reports free work it could not
/// take as `share_spent` and waits for what it holds instead of retrying
/// every `LOCKED_RETRY_MS` (a capped node's loop did, until its next lease
/// tick); with share left, the same claim takes that work.
pub async fn a_capped_claim_waits_for_held_work(b: &dyn Backend) {
    let d = b.driver("capped").await;
    let d = d.as_ref();
    let t0 = now_millis();
    d.register_group(T, "g", t0).await.unwrap();
    publish_at(d, "held-1", "p-held", t0, t0).await;
    publish_at(d, "free-1", "p-free", t0, t0 + 10).await;

    // A takes its one partition; the free one is due later: worth waking
    // for, since A's share may have grown by then.
    let first = d.claim(&claim_at("A", t0, 60_000, 1)).await.unwrap();
    let held = single(&first, "held-1");
    assert_eq!(first.next_due, Some(t0 + 10), "{first:?}");
    assert!(!first.share_spent, "{first:?}");

    // Capped, only the free partition due: nothing taken, no retry soon.
    let now = t0 + 20;
    let capped = d.claim(&claim_at("A", now, 60_000, 0)).await.unwrap();
    assert!(capped.messages.is_empty(), "{capped:?}");
    assert!(capped.share_spent, "{capped:?}");
    assert!(
        capped.next_due.is_none_or(|at| at > now + LOCKED_RETRY_MS),
        "a capped claim must not come back for work it cannot take: {capped:?}"
    );

    // Held work still goes out while capped.
    apply_one(d, outcome(&held, OutcomeKind::Ack), t0 + 21)
        .await
        .unwrap();
    publish_at(d, "held-2", "p-held", t0 + 22, t0 + 22).await;
    let served = d.claim(&claim_at("A", t0 + 23, 60_000, 0)).await.unwrap();
    single(&served, "held-2");
    assert!(served.share_spent, "{served:?}");

    // With share left, the free partition is taken.
    let grown = d.claim(&claim_at("A", t0 + 24, 60_000, 1)).await.unwrap();
    single(&grown, "free-1");
    assert!(!grown.share_spent, "{grown:?}");
}

/// The partition listing: key order, cursor, next due, lease owner and
/// expiry, in-flight count; owner and due filters; pages by key.
pub async fn partitions_list_pages_and_filters(b: &dyn Backend) {
    let d = b.driver("partitions").await;
    let d = d.as_ref();
    let t0 = now_millis();
    d.register_group(T, "g", t0).await.unwrap();
    publish_at(d, "m1", "p1", t0, t0).await;
    publish_at(d, "m2", "p2", t0 + 1, t0 + 1).await;
    publish_at(d, "m2b", "p2", t0 + 1, t0 + 1).await;
    publish_at(d, "m3", "p3", t0 + 2, t0 + 2).await;
    publish_at(d, "m4", "p4", t0 + 3, t0 + 3).await;
    publish_at(d, "m5", "p5", t0 + 4, t0 + 100_000).await;
    d.register_group(T, "h", t0 + 5).await.unwrap();

    // A takes p1 and p2 on long leases and finishes p1; B takes p3 on a
    // short lease; p4 is due and unclaimed; p5 is due later.
    let a = d.claim(&claim_at("A", t0 + 10, 60_000, 2)).await.unwrap();
    let ids: Vec<&str> = a.messages.iter().map(|m| m.message.id.as_str()).collect();
    assert_eq!(ids, ["m1", "m2", "m2b"]);
    let m1 = a.messages[0].clone();
    apply_one(d, outcome(&m1, OutcomeKind::Ack), t0 + 20)
        .await
        .unwrap();
    let again = d.claim(&claim_at("A", t0 + 40, 60_000, 0)).await.unwrap();
    assert!(again.messages.is_empty(), "{again:?}");
    single(
        &d.claim(&claim_at("B", t0 + 50, LEASE_MS, 1)).await.unwrap(),
        "m3",
    );

    let now = t0 + 2000;
    let page = d.partitions(&list_at(now)).await.unwrap();
    let info =
        |key: &str, cursor, next_due, owner: Option<(&str, Millis)>, in_flight| PartitionInfo {
            partition_key: key.into(),
            cursor,
            next_due,
            lease_owner: owner.map(|o| o.0.into()),
            lease_expires: owner.map(|o| o.1),
            in_flight,
        };
    assert_eq!(
        page,
        [
            info("p1", m1.seq, None, Some(("A", t0 + 60_010)), 0),
            info(
                "p2",
                0,
                Some(t0 + 10 + VISIBILITY_MS),
                Some(("A", t0 + 60_010)),
                2
            ),
            info(
                "p3",
                0,
                Some(t0 + 50 + VISIBILITY_MS),
                Some(("B", t0 + 1050)),
                1
            ),
            info("p4", 0, Some(t0 + 3), None, 0),
            info("p5", 0, Some(t0 + 100_000), None, 0),
        ]
    );

    let with = |f: &dyn Fn(&mut PartitionQuery)| {
        let mut q = list_at(now);
        f(&mut q);
        q
    };
    let owned_by_a = d
        .partitions(&with(&|q| q.owner = Some("A".into())))
        .await
        .unwrap();
    assert_eq!(keys(&owned_by_a), ["p1", "p2"]);
    // An expired lease still names its owner: that is who died holding it.
    let owned_by_b = d
        .partitions(&with(&|q| q.owner = Some("B".into())))
        .await
        .unwrap();
    assert_eq!(keys(&owned_by_b), ["p3"]);
    let nobody = d
        .partitions(&with(&|q| q.owner = Some("nobody".into())))
        .await
        .unwrap();
    assert!(nobody.is_empty());
    let due = d
        .partitions(&with(&|q| q.due_by = Some(now)))
        .await
        .unwrap();
    assert_eq!(keys(&due), ["p4"]);

    // Pages: limit, then the last key of a page as `after`.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = d
            .partitions(&with(&|q| {
                q.limit = 2;
                q.after = after.clone();
            }))
            .await
            .unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        after = Some(last.partition_key.clone());
        seen.extend(page.iter().map(|p| p.partition_key.clone()));
    }
    assert_eq!(seen, ["p1", "p2", "p3", "p4", "p5"]);
    let filtered_page = d
        .partitions(&with(&|q| {
            q.owner = Some("A".into());
            q.after = Some("p1".into());
        }))
        .await
        .unwrap();
    assert_eq!(keys(&filtered_page), ["p2"]);

    // Timed-out deliveries are no longer in flight.
    let later = d.partitions(&list_at(t0 + 200_000)).await.unwrap();
    assert!(later.iter().all(|p| p.in_flight == 0), "{later:?}");
    // Groups are independent: h has every partition, nothing leased.
    let h = d
        .partitions(&with(&|q| q.group = "h".into()))
        .await
        .unwrap();
    assert_eq!(keys(&h), ["p1", "p2", "p3", "p4", "p5"]);
    assert!(h
        .iter()
        .all(|p| p.lease_owner.is_none() && p.lease_expires.is_none() && p.in_flight == 0));
    assert_eq!(d.groups(T).await.unwrap(), ["g", "h"]);
    assert!(d.groups("other").await.unwrap().is_empty());
}

/// `Admin::partitions` names an unknown topic or group and refuses bad
/// input with a typed error; it shows a live subscription's lease.
pub async fn partitions_listing_rejects_bad_input(b: &dyn Backend) {
    let q = b.open("partitions-input", quiet()).await;
    let admin = q.admin();
    let all = PartitionFilter::default();
    assert!(matches!(
        admin.partitions(T, "g", &all).await,
        Err(MqError::UnknownTopic(t)) if t == T
    ));
    // Messages alone do not make a topic known: nobody consumes it.
    q.publisher().publish(T, msg("m", "p")).await.unwrap();
    assert!(matches!(
        admin.partitions(T, "g", &all).await,
        Err(MqError::UnknownTopic(_))
    ));
    let cfg = fast_config("g");
    let subscriber = cfg.subscriber.clone();
    let mut sub = subscribe(&q, cfg).await;
    let d = recv(&mut sub).await;
    match admin.partitions(T, "other", &all).await {
        Err(MqError::UnknownGroup { group, groups, .. }) => {
            assert_eq!((group.as_str(), groups), ("other", vec!["g".to_string()]));
        }
        other => panic!("expected UnknownGroup, got {other:?}"),
    }
    assert!(matches!(
        admin.partitions("Bad Topic", "g", &all).await,
        Err(MqError::InvalidTopic(_))
    ));
    for limit in [0, crate::queue::MAX_PARTITION_PAGE + 1] {
        let f = PartitionFilter {
            limit,
            ..PartitionFilter::default()
        };
        assert!(matches!(
            admin.partitions(T, "g", &f).await,
            Err(MqError::InvalidLimit { .. })
        ));
    }
    let f = PartitionFilter {
        owner: Some(String::new()),
        ..PartitionFilter::default()
    };
    assert!(matches!(
        admin.partitions(T, "g", &f).await,
        Err(MqError::InvalidName { .. })
    ));
    assert_eq!(admin.groups(T).await.unwrap(), ["g"]);
    let page = admin.partitions(T, "g", &all).await.unwrap();
    assert_eq!(keys(&page), ["p"]);
    assert_eq!(page[0].lease_owner.as_deref(), Some(subscriber.as_str()));
    assert!(page[0].lease_expires.is_some_and(|e| e > now_millis()));
    assert_eq!(page[0].in_flight, 1);
    let mine = PartitionFilter {
        owner: Some(subscriber),
        ..PartitionFilter::default()
    };
    assert_eq!(keys(&admin.partitions(T, "g", &mine).await.unwrap()), ["p"]);
    d.ack().await.unwrap();
}

/// Expands to one `#[tokio::test]` per conformance check for a backend.
/// `$backend` is an expression giving something that implements [`Backend`].
#[macro_export]
///
/// `optional FUTURE` takes a future giving `Option<backend>` instead, for
/// backends on a server that may be absent: `None` skips the test (the
/// future prints why, or panics where the server is required).
///
/// `paused BACKEND` runs the timing checks (delays, backoff, visibility,
/// leases) on Tokio's paused clock instead: for a backend whose queues read
/// [`Clock::Tokio`](crate::Clock::Tokio) and never idle the runtime while
/// working (the memory driver).
macro_rules! conformance_tests {
    (optional $backend:expr) => {
        $crate::conformance_tests!(@names @optional $backend);
    };
    ($backend:expr) => {
        $crate::conformance_tests!(@names @each $backend);
    };
    (@names @$arm:ident $backend:expr) => {
        $crate::conformance_tests!(@$arm $backend;
            publish_round_trip, late_subscriber_gets_history, publish_batch_keeps_order,
            publish_after_delays_delivery, publish_after_close_fails, idempotent_publish,
            dedup_horizon_is_bounded_by_retention, ordering_within_partition,
            partitions_are_isolated, batch_size_one_serializes, consumer_groups_are_independent,
            nack_backoff_is_persisted, nack_after_uses_callers_delay, nack_exhaustion_dead_letters, reject_dead_letters_now,
            dead_letters_list_and_replay, dead_letters_prune_by_age, postpone_is_a_barrier, postpone_resets_failure_streak,
            wake_makes_postponed_due, wake_reaches_an_in_flight_delivery,
            wake_makes_delayed_publish_due, wake_with_nothing_pending_does_nothing,
            visibility_timeout_redelivers, outcomes_are_one_shot,
            stale_delivery_is_fenced, subscribers_share_partitions,
            a_burst_raises_the_fair_share_at_once,
            crashed_subscriber_is_taken_over, restarted_subscriber_reclaims_its_work,
            graceful_close_releases_leases, takeover_releases_dead_owners_deliveries,
            partitions_list_pages_and_filters, partitions_listing_rejects_bad_input,
            a_capped_claim_waits_for_held_work,
            no_message_lost_across_dead_letters, redelivery_limit_dead_letters,
            garbage_collection_and_idle_partitions, wake_ups_are_event_driven,
            bad_input_is_rejected
        );
    };
    (paused $backend:expr) => {
        $crate::conformance_tests!(@paused $backend;
            publish_after_delays_delivery, nack_backoff_is_persisted,
            nack_after_uses_callers_delay, postpone_is_a_barrier,
            postpone_resets_failure_streak, wake_makes_postponed_due,
            wake_makes_delayed_publish_due, visibility_timeout_redelivers,
            crashed_subscriber_is_taken_over, restarted_subscriber_reclaims_its_work,
            graceful_close_releases_leases, redelivery_limit_dead_letters
        );
    };
    (@paused $backend:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(start_paused = true)]
            async fn $name() {
                let backend = $backend;
                $crate::conformance::$name(&backend).await;
            }
        )*
    };
    (@each $backend:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let backend = $backend;
                $crate::conformance::$name(&backend).await;
            }
        )*
    };
    (@optional $backend:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(backend) = $backend.await else {
                    return;
                };
                $crate::conformance::$name(&backend).await;
            }
        )*
    };
}
