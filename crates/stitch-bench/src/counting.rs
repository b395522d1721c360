//! A driver wrapper that counts transactions and rows, so the plain-database
//! baselines can replay the same writes in the same transaction sizes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use stitch_mq::driver::*;
use stitch_mq::{Millis, MqResult};

#[derive(Default, Debug)]
pub struct Counts {
    pub publish_txs: AtomicU64,
    pub published: AtomicU64,
    pub claim_txs: AtomicU64,
    pub claimed: AtomicU64,
    pub apply_txs: AtomicU64,
    pub applied: AtomicU64,
    /// Microseconds spent inside each call kind (includes waiting for the writer).
    pub publish_us: AtomicU64,
    pub claim_us: AtomicU64,
    pub apply_us: AtomicU64,
    pub claim_calls: AtomicU64,
}

impl Counts {
    pub fn get(&self, c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

pub struct CountingDriver<D> {
    pub inner: D,
    pub counts: Arc<Counts>,
}

#[async_trait]
impl<D: Driver> Driver for CountingDriver<D> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn wakeups(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        self.inner.wakeups()
    }
    async fn publish(
        &self,
        topic: &str,
        msgs: &[NewMessage],
        now: Millis,
    ) -> MqResult<PublishReport> {
        self.counts.publish_txs.fetch_add(1, Ordering::Relaxed);
        self.counts
            .published
            .fetch_add(msgs.len() as u64, Ordering::Relaxed);
        let t = std::time::Instant::now();
        let r = self.inner.publish(topic, msgs, now).await;
        self.counts
            .publish_us
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        r
    }
    async fn register_group(&self, topic: &str, group: &str, now: Millis) -> MqResult<()> {
        self.inner.register_group(topic, group, now).await
    }
    async fn lease_tick(&self, tick: &LeaseTick) -> MqResult<LeaseReport> {
        self.inner.lease_tick(tick).await
    }
    async fn deregister(&self, topic: &str, group: &str, subscriber: &str) -> MqResult<()> {
        self.inner.deregister(topic, group, subscriber).await
    }
    async fn recover(
        &self,
        topic: &str,
        group: &str,
        subscriber: &str,
        now: Millis,
    ) -> MqResult<u64> {
        self.inner.recover(topic, group, subscriber, now).await
    }
    async fn claim(&self, req: &ClaimRequest) -> MqResult<ClaimResult> {
        let t = std::time::Instant::now();
        let r = self.inner.claim(req).await?;
        self.counts
            .claim_us
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.counts.claim_calls.fetch_add(1, Ordering::Relaxed);
        if !r.messages.is_empty() {
            self.counts.claim_txs.fetch_add(1, Ordering::Relaxed);
            self.counts
                .claimed
                .fetch_add(r.messages.len() as u64, Ordering::Relaxed);
        }
        Ok(r)
    }
    async fn apply(&self, outcomes: &[Outcome], now: Millis) -> MqResult<Vec<MqResult<()>>> {
        self.counts.apply_txs.fetch_add(1, Ordering::Relaxed);
        self.counts
            .applied
            .fetch_add(outcomes.len() as u64, Ordering::Relaxed);
        let t = std::time::Instant::now();
        let r = self.inner.apply(outcomes, now).await;
        self.counts
            .apply_us
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        r
    }
    async fn wake(&self, topic: &str, partition_key: &str, now: Millis) -> MqResult<u64> {
        self.inner.wake(topic, partition_key, now).await
    }
    async fn dead_letters(
        &self,
        topic: &str,
        after_id: i64,
        limit: usize,
    ) -> MqResult<Vec<DeadLetter>> {
        self.inner.dead_letters(topic, after_id, limit).await
    }
    async fn replay_dead_letter(&self, topic: &str, dlq_id: i64, now: Millis) -> MqResult<()> {
        self.inner.replay_dead_letter(topic, dlq_id, now).await
    }
    async fn gc(&self, now: Millis, retention_ms: Millis, stale_ms: Millis) -> MqResult<GcReport> {
        self.inner.gc(now, retention_ms, stale_ms).await
    }
    async fn prune_dead_letters(&self, failed_before: Millis, limit: usize) -> MqResult<u64> {
        self.inner.prune_dead_letters(failed_before, limit).await
    }
    async fn count_dead_letters_before(&self, failed_before: Millis) -> MqResult<u64> {
        self.inner.count_dead_letters_before(failed_before).await
    }
    async fn stats(&self, topic: &str, group: &str) -> MqResult<TopicStats> {
        self.inner.stats(topic, group).await
    }
    async fn groups(&self, topic: &str) -> MqResult<Vec<String>> {
        self.inner.groups(topic).await
    }
    async fn partitions(&self, query: &PartitionQuery) -> MqResult<Vec<PartitionInfo>> {
        self.inner.partitions(query).await
    }
}
