//! The queue engine on top of a [`Driver`]: publishing, subscriptions (claim
//! loop, leases, in-process wake-ups), deliveries with one-shot outcomes,
//! batched outcome writes and background garbage collection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::{QueueConfig, RetryPolicy, SubscriptionConfig};
use crate::driver::*;
use crate::error::{MqError, MqResult};
use crate::message::{validate_message, validate_name, validate_topic, Failure, Message, Millis};

/// Outcomes written per transaction at most (group commit).
const OUTCOME_BATCH: usize = 512;
/// Messages one claim hands out at most.
const CLAIM_MAX: usize = 512;
/// How soon a claim loop whose fair-share cap kept it from due work ticks
/// its lease again (at most; never later than the poll interval). The wait
/// bounds how long new partitions stay unserved while every node's cap is
/// stale; one tick is a short transaction, so even a loop capped
/// continuously adds 20 a second — where it used to retry the claim every
/// `LOCKED_RETRY_MS`.
const SHARE_RECHECK_MS: Millis = 50;
/// Partitions one [`Admin::partitions`] page lists at most.
pub const MAX_PARTITION_PAGE: usize = 1000;

/// Largest batch [`Admin::prune_dead_letters`] deletes in one transaction.
pub const MAX_PRUNE_BATCH: usize = 10_000;

type OutcomeRequest = (Outcome, oneshot::Sender<MqResult<()>>);

struct Shared {
    driver: Arc<dyn Driver>,
    config: QueueConfig,
    closed: AtomicBool,
    /// Subscriptions waiting per topic; woken on publish/wake (in-process push).
    wakers: Mutex<HashMap<String, Vec<Weak<Notify>>>>,
    outcomes: mpsc::UnboundedSender<OutcomeRequest>,
    shutdown: CancellationToken,
    /// Claim passes completed by this queue's subscriptions (a sync point,
    /// see [`Admin::claim_passes`]).
    claim_passes: watch::Sender<u64>,
    /// Outcomes the writer has finished with (a sync point, see
    /// [`Admin::outcomes_written`]); shared with the outcome writer.
    outcomes_written: Arc<AtomicU64>,
}

impl Shared {
    /// The time from the configured clock.
    fn now(&self) -> Millis {
        self.config.clock.now()
    }

    fn notify_topic(&self, topic: &str) {
        let mut wakers = self.wakers.lock();
        if let Some(list) = wakers.get_mut(topic) {
            list.retain(|w| match w.upgrade() {
                Some(n) => {
                    n.notify_one();
                    true
                }
                None => false,
            });
        }
    }

    fn notify_all(&self) {
        let topics: Vec<String> = self.wakers.lock().keys().cloned().collect();
        for t in topics {
            self.notify_topic(&t);
        }
    }

    fn ensure_open(&self) -> MqResult<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(MqError::Closed)
        } else {
            Ok(())
        }
    }

    async fn write_outcome(&self, outcome: Outcome) -> MqResult<()> {
        let (tx, rx) = oneshot::channel();
        self.outcomes
            .send((outcome, tx))
            .map_err(|_| MqError::Closed)?;
        rx.await.map_err(|_| MqError::Closed)?
    }
}

/// A message queue over one storage backend. Cheap to clone.
#[derive(Clone)]
pub struct Queue {
    shared: Arc<Shared>,
}

impl Queue {
    /// Starts the engine on `driver` (must be called inside a Tokio runtime):
    /// spawns the outcome writer and, if configured, the garbage collector.
    pub fn new(driver: Arc<dyn Driver>, config: QueueConfig) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            driver,
            config,
            closed: AtomicBool::new(false),
            wakers: Mutex::new(HashMap::new()),
            outcomes: tx,
            shutdown: CancellationToken::new(),
            claim_passes: watch::Sender::new(0),
            outcomes_written: Arc::new(AtomicU64::new(0)),
        });
        tokio::spawn(outcome_writer(
            shared.driver.clone(),
            shared.config.clock.clone(),
            shared.outcomes_written.clone(),
            rx,
        ));
        if let Some(wakeups) = shared.driver.wakeups() {
            tokio::spawn(forward_wakeups(Arc::downgrade(&shared), wakeups));
        }
        if let Some(every) = shared.config.gc_interval {
            tokio::spawn(gc_loop(
                Arc::downgrade(&shared),
                every,
                shared.shutdown.clone(),
            ));
        }
        Self { shared }
    }

    /// Backend name.
    pub fn backend(&self) -> &'static str {
        self.shared.driver.name()
    }

    /// The publishing side.
    pub fn publisher(&self) -> Publisher {
        Publisher {
            shared: self.shared.clone(),
        }
    }

    /// The consuming side.
    pub fn subscriber(&self) -> Subscriber {
        Subscriber {
            shared: self.shared.clone(),
        }
    }

    /// Operations: wake, dead letters, stats, garbage collection.
    pub fn admin(&self) -> Admin {
        Admin {
            shared: self.shared.clone(),
        }
    }

    /// Refuses further publishes and subscriptions and stops background work.
    /// Existing subscriptions keep running until closed themselves.
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.shutdown.cancel();
    }
}

/// Publishes messages. Thread-safe, cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
}

impl Publisher {
    /// Publishes one message, deliverable now. An id already stored for
    /// (topic, partition) is a silent success that stores nothing.
    pub async fn publish(&self, topic: &str, msg: Message) -> MqResult<PublishReport> {
        self.publish_at(topic, vec![msg], self.shared.now()).await
    }

    /// Publishes several messages in one transaction, deliverable now.
    pub async fn publish_batch(&self, topic: &str, msgs: Vec<Message>) -> MqResult<PublishReport> {
        self.publish_at(topic, msgs, self.shared.now()).await
    }

    /// Publishes a message that becomes deliverable after `delay` (> 0).
    pub async fn publish_after(
        &self,
        topic: &str,
        msg: Message,
        delay: Duration,
    ) -> MqResult<PublishReport> {
        if delay.is_zero() {
            return Err(MqError::InvalidDelay(delay, "publish_after"));
        }
        self.publish_at(
            topic,
            vec![msg],
            self.shared.now() + delay.as_millis() as Millis,
        )
        .await
    }

    async fn publish_at(
        &self,
        topic: &str,
        msgs: Vec<Message>,
        available_at: Millis,
    ) -> MqResult<PublishReport> {
        self.shared.ensure_open()?;
        let new = prepare(&self.shared.config, topic, msgs, available_at)?;
        if new.is_empty() {
            return Ok(PublishReport::default());
        }
        let report = self
            .shared
            .driver
            .publish(topic, &new, self.shared.now())
            .await?;
        if report.stored > 0 {
            self.shared.notify_topic(topic);
        }
        Ok(report)
    }

    /// Validates messages for a publish done inside a caller's transaction
    /// (the transactional outbox; see the SQLite backend's `publish_on_handle`).
    pub fn prepare(
        &self,
        topic: &str,
        msgs: Vec<Message>,
        delay: Option<Duration>,
    ) -> MqResult<Vec<NewMessage>> {
        self.shared.ensure_open()?;
        if delay.is_some_and(|d| d.is_zero()) {
            return Err(MqError::InvalidDelay(Duration::ZERO, "publish_after"));
        }
        let at = self.shared.now() + delay.map_or(0, |d| d.as_millis() as Millis);
        prepare(&self.shared.config, topic, msgs, at)
    }

    /// Tells this process's subscribers of `topic` that messages were
    /// committed by a transaction the queue did not run itself.
    pub fn notify_published(&self, topic: &str) {
        self.shared.notify_topic(topic);
    }
}

fn prepare(
    config: &QueueConfig,
    topic: &str,
    msgs: Vec<Message>,
    available_at: Millis,
) -> MqResult<Vec<NewMessage>> {
    validate_topic(topic)?;
    msgs.into_iter()
        .map(|m| {
            validate_message(&m, config.max_payload_bytes)?;
            Ok(NewMessage {
                message: m,
                available_at,
            })
        })
        .collect()
}

/// Opens subscriptions.
#[derive(Clone)]
pub struct Subscriber {
    shared: Arc<Shared>,
}

impl Subscriber {
    /// Starts consuming `topic` as `config.group`. Messages stored before the
    /// group's first subscription are delivered too.
    pub async fn subscribe(
        &self,
        topic: &str,
        config: SubscriptionConfig,
    ) -> MqResult<Subscription> {
        self.shared.ensure_open()?;
        validate_topic(topic)?;
        config.validate()?;
        self.shared
            .driver
            .register_group(topic, &config.group, self.shared.now())
            .await?;
        // A subscriber that kept its name across a restart takes back the
        // deliveries its previous incarnation died holding.
        let released = self
            .shared
            .driver
            .recover(topic, &config.group, &config.subscriber, self.shared.now())
            .await?;
        if released > 0 {
            tracing::info!(topic, group = %config.group, subscriber = %config.subscriber, released, "reclaimed unfinished deliveries");
        }
        let notify = Arc::new(Notify::new());
        self.shared
            .wakers
            .lock()
            .entry(topic.to_string())
            .or_default()
            .push(Arc::downgrade(&notify));
        let (tx, rx) = mpsc::channel(config.max_in_flight);
        let stop = CancellationToken::new();
        let sub = Arc::new(SubShared {
            queue: self.shared.clone(),
            topic: topic.to_string(),
            config,
            notify,
            permits: Arc::new(Semaphore::new(0)),
            progress: watch::Sender::new(ClaimProgress::default()),
        });
        sub.permits.add_permits(sub.config.max_in_flight);
        let task = tokio::spawn(claim_loop(sub.clone(), tx, stop.clone()));
        Ok(Subscription {
            rx,
            stop,
            task: Some(task),
            sub,
        })
    }
}

struct SubShared {
    queue: Arc<Shared>,
    topic: String,
    config: SubscriptionConfig,
    notify: Arc<Notify>,
    permits: Arc<Semaphore>,
    /// What the claim loop has done (a sync point, see [`Subscription::progress`]).
    progress: watch::Sender<ClaimProgress>,
}

impl SubShared {
    /// Counts a finished claim pass that began when `outcomes_seen`
    /// outcomes were written.
    fn pass_done(&self, outcomes_seen: u64) {
        self.queue.claim_passes.send_modify(|n| *n += 1);
        self.progress.send_modify(|p| {
            p.passes += 1;
            p.outcomes_seen = outcomes_seen;
        });
    }
}

/// What a subscription's claim loop has done so far, watched through
/// [`Subscription::progress`]: a sync point for tests and tools that must
/// know the loop acted ("a pass ran after my outcome and delivered
/// nothing", "both subscribers see each other") instead of waiting a while.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClaimProgress {
    /// Claim passes completed, counted as [`Admin::claim_passes`] counts them.
    pub passes: u64,
    /// [`Admin::outcomes_written`] when the latest completed pass began: that
    /// pass read storage with every one of those outcomes in it.
    pub outcomes_seen: u64,
    /// Active subscribers of the group (this one included) at the latest
    /// lease tick; 0 before the first.
    pub active_subscribers: usize,
}

/// A live subscription: receive deliveries, then close it.
pub struct Subscription {
    rx: mpsc::Receiver<Delivery>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    sub: Arc<SubShared>,
}

impl Subscription {
    /// The next delivery; `None` once the subscription stopped.
    pub async fn recv(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// The next delivery if one waits already.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        self.rx.try_recv().ok()
    }

    /// The subscriber name holding this subscription's leases.
    pub fn subscriber_name(&self) -> &str {
        &self.sub.config.subscriber
    }

    /// This subscription's claim loop progress, watched (see
    /// [`ClaimProgress`]). The loop updates it once per pass whether or not
    /// anyone watches; it never waits for a watcher.
    pub fn progress(&self) -> watch::Receiver<ClaimProgress> {
        self.sub.progress.subscribe()
    }

    /// Graceful shutdown: stop claiming, hand buffered (unseen) deliveries
    /// back without counting an attempt, release leases and the heartbeat.
    /// Deliveries already received stay valid until their visibility lapses.
    pub async fn close(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.rx.close();
        while let Some(d) = self.rx.recv().await {
            let _ = d.finish(OutcomeKind::Release).await;
        }
        let c = &self.sub.config;
        if let Err(e) = self
            .sub
            .queue
            .driver
            .deregister(&self.sub.topic, &c.group, &c.subscriber)
            .await
        {
            tracing::warn!(topic = %self.sub.topic, error = %e, "releasing leases on close failed; they expire instead");
        }
    }

    /// Stops the subscription the way a crash would: no lease release, no
    /// hand-back. Peers take over after the lease and visibility timeouts.
    pub fn kill(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn claim_loop(sub: Arc<SubShared>, tx: mpsc::Sender<Delivery>, stop: CancellationToken) {
    let c = &sub.config;
    let driver = sub.queue.driver.clone();
    let renewal = c.lease_renewal.as_millis() as Millis;
    let poll = c.poll_interval.as_millis() as Millis;
    let mut lease = LeaseReport {
        cap: usize::MAX,
        owned: 0,
        active_subscribers: 1,
    };
    let mut next_tick: Millis = 0;
    let mut last_tick: Millis = 0;
    let mut next_renewal: Millis = 0;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let now = sub.queue.now();
        if now >= next_tick {
            last_tick = now;
            let is_renewal = now >= next_renewal;
            if is_renewal {
                next_renewal = now + renewal;
            }
            let tick = LeaseTick {
                topic: sub.topic.clone(),
                group: c.group.clone(),
                subscriber: c.subscriber.clone(),
                now,
                lease_ms: c.lease_duration.as_millis() as Millis,
                renewal: is_renewal,
            };
            match driver.lease_tick(&tick).await {
                Ok(r) => {
                    lease = r;
                    sub.progress.send_if_modified(|p| {
                        let changed = p.active_subscribers != r.active_subscribers;
                        p.active_subscribers = r.active_subscribers;
                        changed
                    });
                }
                Err(e) => tracing::warn!(topic = %sub.topic, error = %e, "lease tick failed"),
            }
            next_tick = now + renewal;
        }
        let room = sub.permits.available_permits().min(CLAIM_MAX);
        let mut wait_until = (now + poll).min(next_tick);
        if room > 0 {
            let req = ClaimRequest {
                topic: sub.topic.clone(),
                group: c.group.clone(),
                subscriber: c.subscriber.clone(),
                now,
                max_messages: room,
                batch_size: c.batch_size,
                visibility_ms: c.visibility_timeout.as_millis() as Millis,
                lease_ms: c.lease_duration.as_millis() as Millis,
                may_acquire: lease.cap.saturating_sub(lease.owned),
                max_attempts: c.retry.max_attempts,
            };
            // Read before the claim reads storage: that claim sees them all.
            let outcomes_seen = sub.queue.outcomes_written.load(Ordering::Acquire);
            match driver.claim(&req).await {
                Ok(res) => {
                    lease.owned += res.acquired;
                    if res.taken_over > 0 {
                        tracing::info!(topic = %sub.topic, group = %c.group, subscriber = %c.subscriber, taken_over = res.taken_over, "took over the in-flight deliveries of a dead subscriber");
                    }
                    let full = res.messages.len() >= room;
                    for m in res.messages {
                        let Ok(permit) = sub.permits.clone().try_acquire_owned() else {
                            break;
                        };
                        let d = Delivery::new(sub.clone(), m, permit);
                        if tx.send(d).await.is_err() {
                            return;
                        }
                    }
                    sub.pass_done(outcomes_seen);
                    if full {
                        continue;
                    }
                    // Work is due that this claim could not take because
                    // the fair-share cap is spent: the cap was computed when
                    // fewer partitions were busy (new builds arrive between
                    // ticks), so recompute it soon rather than at the next
                    // renewal. Until then the loop waits for held work or an
                    // event; another claim could not take that work anyway.
                    if res.share_spent {
                        next_tick = next_tick.min(last_tick + SHARE_RECHECK_MS.min(poll));
                    }
                    if let Some(due) = res.next_due {
                        wait_until = wait_until.min(due);
                    }
                }
                Err(e) => {
                    tracing::warn!(topic = %sub.topic, error = %e, "claim failed");
                    sub.pass_done(outcomes_seen);
                }
            }
        }
        let wait = Duration::from_millis(wait_until.saturating_sub(sub.queue.now()).max(0) as u64);
        if wait.is_zero() {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = sub.notify.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// What a `nack` led to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NackOutcome {
    /// Redelivered after the persisted backoff, at this epoch-ms time.
    RetryAt(Millis),
    /// The attempt exhausted `max_attempts`; the message is dead-lettered.
    DeadLettered,
}

/// One delivered message and its one-shot outcome.
pub struct Delivery {
    sub: Arc<SubShared>,
    claimed: ClaimedMessage,
    received_at: Millis,
    finalized: AtomicBool,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("topic", &self.sub.topic)
            .field("id", &self.claimed.message.id)
            .field("partition", &self.claimed.message.partition_key)
            .field("attempt", &self.claimed.attempt)
            .finish()
    }
}

impl Delivery {
    fn new(sub: Arc<SubShared>, claimed: ClaimedMessage, permit: OwnedSemaphorePermit) -> Self {
        Self {
            received_at: sub.queue.now(),
            sub,
            claimed,
            finalized: AtomicBool::new(false),
            permit: Mutex::new(Some(permit)),
        }
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.claimed.message
    }

    /// The message id.
    pub fn id(&self) -> &str {
        &self.claimed.message.id
    }

    /// The partition key.
    pub fn partition_key(&self) -> &str {
        &self.claimed.message.partition_key
    }

    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.claimed.message.payload
    }

    /// The topic it came from.
    pub fn topic(&self) -> &str {
        &self.sub.topic
    }

    /// 1-based delivery attempt (reset to 1 by a postpone).
    pub fn attempt(&self) -> u32 {
        self.claimed.attempt
    }

    /// When the message was stored (epoch ms).
    pub fn published_at(&self) -> Millis {
        self.claimed.published_at
    }

    /// When this delivery was handed out (epoch ms).
    pub fn received_at(&self) -> Millis {
        self.received_at
    }

    /// The backend's position of the message (unique per database).
    pub fn sequence(&self) -> i64 {
        self.claimed.seq
    }

    /// Processed: never redeliver.
    pub async fn ack(&self) -> MqResult<()> {
        self.finish(OutcomeKind::Ack).await
    }

    /// Failed: redeliver after the persisted exponential backoff, or
    /// dead-letter with `failure` if this attempt exhausts `max_attempts`.
    pub async fn nack(&self, failure: Failure) -> MqResult<NackOutcome> {
        let delay = self.sub.config.retry.backoff(self.claimed.attempt);
        self.nack_after(failure, delay).await
    }

    /// Failed: redeliver after `delay` chosen by the caller (a provider's
    /// `Retry-After`, a per-queue policy), persisted like `nack`'s backoff.
    /// Counts an attempt and dead-letters with `failure` on the attempt that
    /// exhausts `max_attempts`, exactly like [`Delivery::nack`].
    pub async fn nack_after(&self, failure: Failure, delay: Duration) -> MqResult<NackOutcome> {
        let retry: &RetryPolicy = &self.sub.config.retry;
        if retry.max_attempts > 0 && self.claimed.attempt >= retry.max_attempts {
            self.finish(OutcomeKind::DeadLetter { failure }).await?;
            return Ok(NackOutcome::DeadLettered);
        }
        let at = self.sub.queue.now() + delay.as_millis() as Millis;
        self.finish(OutcomeKind::Retry {
            retry_at: at,
            failure,
        })
        .await?;
        Ok(NackOutcome::RetryAt(at))
    }

    /// Poison: dead-letter now with `failure`.
    pub async fn reject(&self, failure: Failure) -> MqResult<()> {
        self.finish(OutcomeKind::DeadLetter { failure }).await
    }

    /// Processed for now, come back after `delay` (> 0). A barrier: later
    /// messages of the partition wait; the next delivery is attempt 1.
    pub async fn postpone(&self, delay: Duration) -> MqResult<()> {
        if delay.is_zero() {
            return Err(MqError::InvalidDelay(delay, "postpone"));
        }
        let until = self.sub.queue.now() + delay.as_millis() as Millis;
        self.finish(OutcomeKind::Postpone { until }).await
    }

    /// Still working: stay invisible for `by` from now. Not an outcome.
    pub async fn extend_visibility(&self, by: Duration) -> MqResult<()> {
        if by.is_zero() {
            return Err(MqError::InvalidDelay(by, "extend_visibility"));
        }
        if self.finalized.load(Ordering::Acquire) {
            return Err(MqError::AlreadyFinalized(self.id().to_string()));
        }
        let until = self.sub.queue.now() + by.as_millis() as Millis;
        self.sub
            .queue
            .write_outcome(self.outcome(OutcomeKind::Extend { until }))
            .await
    }

    fn outcome(&self, kind: OutcomeKind) -> Outcome {
        Outcome {
            topic: self.sub.topic.clone(),
            group: self.sub.config.group.clone(),
            partition_key: self.claimed.message.partition_key.clone(),
            message_id: self.claimed.message.id.clone(),
            seq: self.claimed.seq,
            token: self.claimed.token,
            attempt: self.claimed.attempt,
            kind,
        }
    }

    async fn finish(&self, kind: OutcomeKind) -> MqResult<()> {
        if self.finalized.swap(true, Ordering::AcqRel) {
            return Err(MqError::AlreadyFinalized(self.id().to_string()));
        }
        let res = self.sub.queue.write_outcome(self.outcome(kind)).await;
        match &res {
            // A storage failure left nothing written: let the caller try again.
            Err(e) if e.is_retryable() => self.finalized.store(false, Ordering::Release),
            _ => {
                self.permit.lock().take();
                self.sub.notify.notify_one();
            }
        }
        res
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        // Dropped without an outcome: the visibility timeout redelivers it.
        if self.permit.lock().take().is_some() {
            self.sub.notify.notify_one();
        }
    }
}

/// Operator and wiring operations.
#[derive(Clone)]
pub struct Admin {
    shared: Arc<Shared>,
}

impl Admin {
    /// The number of claim passes this queue's subscriptions have completed,
    /// watched. A pass counts once its deliveries are handed to their
    /// subscription (a failed claim counts too). A pass that starts after an
    /// outcome is written acts on it (moves the cursor past an ack), so a
    /// waiter that sees the count rise by two after an event knows a whole
    /// pass ran after it: "N passes ran and delivered nothing" instead of a
    /// timed look. A subscription with no room for deliveries makes no pass.
    pub fn claim_passes(&self) -> watch::Receiver<u64> {
        self.shared.claim_passes.subscribe()
    }

    /// How many outcomes (acks, nacks, postpones, …, visibility extensions)
    /// this queue's outcome writer has finished with: stored, or refused with
    /// an error. Read after an outcome returned, it counts that outcome, so a subscription whose
    /// [`ClaimProgress::outcomes_seen`] reaches it has run a whole claim pass
    /// on storage holding it.
    pub fn outcomes_written(&self) -> u64 {
        self.shared.outcomes_written.load(Ordering::Acquire)
    }

    /// Wakes `partition_key` in every group: postponed or delayed messages
    /// are due now, and an in-flight delivery's next postpone makes it due
    /// now instead of holding it. Recorded in storage, so a wake from any
    /// process reaches the one holding the delivery (ADR 0012).
    pub async fn wake(&self, topic: &str, partition_key: &str) -> MqResult<u64> {
        validate_topic(topic)?;
        let n = self
            .shared
            .driver
            .wake(topic, partition_key, self.shared.now())
            .await?;
        self.shared.notify_topic(topic);
        Ok(n)
    }

    /// Dead letters of `topic` with ids above `after_id`, oldest first.
    pub async fn dead_letters(
        &self,
        topic: &str,
        after_id: i64,
        limit: usize,
    ) -> MqResult<Vec<DeadLetter>> {
        validate_topic(topic)?;
        self.shared
            .driver
            .dead_letters(topic, after_id, limit)
            .await
    }

    /// Publishes dead letter `dlq_id` to its topic again (same id, payload,
    /// partition and metadata; every group of the topic receives it).
    pub async fn replay_dead_letter(&self, topic: &str, dlq_id: i64) -> MqResult<()> {
        validate_topic(topic)?;
        self.shared
            .driver
            .replay_dead_letter(topic, dlq_id, self.shared.now())
            .await?;
        self.shared.notify_topic(topic);
        Ok(())
    }

    /// Deletes up to `limit` (1 to [`MAX_PRUNE_BATCH`]) dead letters of
    /// every topic that failed before `failed_before`, oldest first, in one
    /// transaction; returns how many. Retention runs it in a loop, so a
    /// large backlog never holds one long transaction.
    pub async fn prune_dead_letters(&self, failed_before: Millis, limit: usize) -> MqResult<u64> {
        if limit == 0 || limit > MAX_PRUNE_BATCH {
            return Err(MqError::InvalidLimit {
                limit,
                max: MAX_PRUNE_BATCH,
            });
        }
        self.shared
            .driver
            .prune_dead_letters(failed_before, limit)
            .await
    }

    /// How many dead letters of every topic failed before `failed_before`
    /// (what [`Admin::prune_dead_letters`] would delete).
    pub async fn count_dead_letters_before(&self, failed_before: Millis) -> MqResult<u64> {
        self.shared
            .driver
            .count_dead_letters_before(failed_before)
            .await
    }

    /// Runs one garbage-collection pass now.
    pub async fn gc(&self) -> MqResult<GcReport> {
        run_gc(&self.shared).await
    }

    /// Counts for one topic and group.
    pub async fn stats(&self, topic: &str, group: &str) -> MqResult<TopicStats> {
        validate_topic(topic)?;
        self.shared.driver.stats(topic, group).await
    }

    /// The consumer groups subscribed to `topic`, sorted (none: nobody
    /// consumes it).
    pub async fn groups(&self, topic: &str) -> MqResult<Vec<String>> {
        validate_topic(topic)?;
        self.shared.driver.groups(topic).await
    }

    /// One page of a group's partitions by key: cursor, next due time, lease
    /// owner and expiry, in-flight deliveries. A topic nobody subscribed to
    /// is `UnknownTopic`, a group not on it `UnknownGroup`.
    pub async fn partitions(
        &self,
        topic: &str,
        group: &str,
        filter: &PartitionFilter,
    ) -> MqResult<Vec<PartitionInfo>> {
        validate_topic(topic)?;
        validate_name("consumer group", group)?;
        if let Some(owner) = &filter.owner {
            validate_name("subscriber name", owner)?;
        }
        if filter.limit == 0 || filter.limit > MAX_PARTITION_PAGE {
            return Err(MqError::InvalidLimit {
                limit: filter.limit,
                max: MAX_PARTITION_PAGE,
            });
        }
        let groups = self.shared.driver.groups(topic).await?;
        if groups.is_empty() {
            return Err(MqError::UnknownTopic(topic.to_string()));
        }
        if !groups.iter().any(|g| g == group) {
            return Err(MqError::UnknownGroup {
                topic: topic.to_string(),
                group: group.to_string(),
                groups,
            });
        }
        let now = self.shared.now();
        self.shared
            .driver
            .partitions(&PartitionQuery {
                topic: topic.to_string(),
                group: group.to_string(),
                owner: filter.owner.clone(),
                due_by: filter.due.then_some(now),
                after: filter.after.clone(),
                limit: filter.limit,
                now,
            })
            .await
    }
}

/// Which partitions [`Admin::partitions`] lists, and the page.
#[derive(Clone, Debug)]
pub struct PartitionFilter {
    /// Only partitions whose lease names this subscriber (expired or not).
    pub owner: Option<String>,
    /// Only partitions due now.
    pub due: bool,
    /// Only partition keys after this one: the last key of the previous page.
    pub after: Option<String>,
    /// Rows at most, 1 to [`MAX_PARTITION_PAGE`].
    pub limit: usize,
}

impl Default for PartitionFilter {
    fn default() -> Self {
        Self {
            owner: None,
            due: false,
            after: None,
            limit: 100,
        }
    }
}

async fn run_gc(shared: &Shared) -> MqResult<GcReport> {
    let retention = shared.config.dedup_retention.as_millis() as Millis;
    // Heartbeats of subscribers gone for ten minutes are only clutter.
    shared.driver.gc(shared.now(), retention, 600_000).await
}

/// Wakes this process's subscriptions for work other processes committed.
/// Ends when the driver's channel closes or the queue is gone.
async fn forward_wakeups(shared: Weak<Shared>, mut rx: tokio::sync::broadcast::Receiver<String>) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let next = rx.recv().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match next {
            Ok(topic) if topic == WAKE_ALL => shared.notify_all(),
            Ok(topic) => shared.notify_topic(&topic),
            Err(RecvError::Lagged(_)) => shared.notify_all(),
            Err(RecvError::Closed) => return,
        }
    }
}

async fn gc_loop(shared: Weak<Shared>, every: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if let Err(e) = run_gc(&shared).await {
            tracing::warn!(error = %e, "queue garbage collection failed");
        }
    }
}

async fn outcome_writer(
    driver: Arc<dyn Driver>,
    clock: Clock,
    written: Arc<AtomicU64>,
    mut rx: mpsc::UnboundedReceiver<OutcomeRequest>,
) {
    let mut batch: Vec<OutcomeRequest> = Vec::with_capacity(OUTCOME_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < OUTCOME_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let ops: Vec<Outcome> = batch.iter().map(|(o, _)| o.clone()).collect();
        match driver.apply(&ops, clock.now()).await {
            Ok(results) => {
                // Counted before anyone is answered (see `Admin::outcomes_written`).
                written.fetch_add(ops.len() as u64, Ordering::Release);
                for ((_, reply), result) in batch.drain(..).zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(_) => {
                // The batch transaction failed as a whole: apply one by one so
                // each caller gets its own answer and one bad row spoils nothing.
                for (op, reply) in batch.drain(..) {
                    let result = match driver.apply(std::slice::from_ref(&op), clock.now()).await {
                        Ok(mut r) => r.pop().unwrap_or(Ok(())),
                        Err(e) => Err(e),
                    };
                    written.fetch_add(1, Ordering::Release);
                    let _ = reply.send(result);
                }
            }
        }
    }
}
