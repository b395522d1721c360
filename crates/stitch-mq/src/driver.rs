//! The storage contract every backend implements. The engine (`queue.rs`)
//! owns timing, wake-ups, leases' fair share and outcome batching; a driver
//! owns only durable state and makes each call atomic.
//!
//! Model (identical in every backend):
//! - `messages`: an immutable log; `seq` is a global, increasing position.
//!   Unique on (topic, partition_key, id) → idempotent publish.
//! - `partitions`: one row per (topic, group, partition): `cursor` (every
//!   message at or below it is done for the group), `next_due` (earliest time
//!   something may be deliverable; `None` = nothing pending), and the lease.
//! - `state`: per (group, message) past the cursor: attempt, invisible-until,
//!   postponed flag, done flag, and the delivery token that fences stale outcomes.
//! - `dead_letters`, `groups`, `subscribers` (heartbeats).
//!
//! Takeover: a subscriber whose lease on a partition expired *and* whose
//! heartbeat stopped is dead. A lease tick makes its partitions due at once
//! (their only pending work may be its in-flight deliveries, which are not
//! due before their visibility timeout), and the claim that acquires such a
//! partition makes the dead owner's in-flight deliveries deliverable in the
//! same transaction, as `recover` does for a restarted subscriber: the dead
//! delivery keeps its attempt, so the redelivery is attempt + 1, and its
//! token changes, so the dead owner's late outcomes are stale.

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::error::MqResult;
use crate::message::{Failure, Message, Millis};

/// One message to store, with the time it becomes deliverable.
#[derive(Clone, Debug)]
pub struct NewMessage {
    /// The message.
    pub message: Message,
    /// Epoch ms at which it may first be delivered (`publish_after`).
    pub available_at: Millis,
}

/// How many messages a publish stored and how many were duplicates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublishReport {
    /// Newly stored messages.
    pub stored: usize,
    /// Messages whose id was already stored for their (topic, partition).
    pub duplicates: usize,
}

/// Parameters of one claim: find due partitions this subscriber may serve
/// and mark their deliverable messages as delivered.
#[derive(Clone, Debug)]
pub struct ClaimRequest {
    pub topic: String,
    pub group: String,
    pub subscriber: String,
    pub now: Millis,
    /// Total messages to hand out at most.
    pub max_messages: usize,
    /// Per-partition window (unfinished messages in play).
    pub batch_size: u32,
    /// Delivered messages are invisible until `now + visibility_ms`.
    pub visibility_ms: Millis,
    /// Leases taken or kept run until `now + lease_ms`.
    pub lease_ms: Millis,
    /// How many partitions this subscriber may still acquire (fair share).
    pub may_acquire: usize,
    /// Redeliveries past this many attempts dead-letter (0 = never).
    pub max_attempts: u32,
}

/// A message handed to a consumer.
#[derive(Clone, Debug)]
pub struct ClaimedMessage {
    pub seq: i64,
    pub message: Message,
    pub published_at: Millis,
    /// 1-based; reset to 1 after a postpone.
    pub attempt: u32,
    /// Fences outcomes: only the live delivery's token matches.
    pub token: i64,
}

/// What a claim produced.
#[derive(Clone, Debug, Default)]
pub struct ClaimResult {
    pub messages: Vec<ClaimedMessage>,
    /// Messages dead-lettered because their redeliveries ran out (a consumer
    /// kept dying or timing out before finishing them).
    pub dead_lettered: usize,
    /// Partitions newly leased by this claim.
    pub acquired: usize,
    /// In-flight deliveries of dead previous owners made deliverable by this
    /// claim when it acquired their partitions (takeover).
    pub taken_over: usize,
    /// When to claim again: the earliest `next_due` among partitions this
    /// subscriber may serve with the share it has left (see [`claim_due`]).
    pub next_due: Option<Millis>,
    /// A partition this subscriber does not hold is due now, but its
    /// fair-share cap is spent: no claim can take that work before a lease
    /// tick recomputes the cap, so the engine ticks early instead of retrying.
    pub share_spent: bool,
}

/// `(next_due, share_spent)` of a claim, from the earliest due time among
/// the partitions the subscriber holds (`held_due`) and among all it may
/// serve — held, free or expired (`any_due`) — and how many partitions it
/// may still acquire after the claim (`may_acquire`). The one rule every
/// driver applies:
/// - share left, or nothing servable due yet → `any_due` (a free partition
///   that becomes due later is worth waking for);
/// - share spent and a held partition due now → come back at once;
/// - share spent and only partitions it does not hold are due now → wait
///   for a held one (or an event) and report `share_spent`: retrying the
///   claim cannot take them (it did so every `LOCKED_RETRY_MS` before, a few
///   hundred empty claims a second per capped node).
pub fn claim_due(
    now: Millis,
    may_acquire: usize,
    held_due: Option<Millis>,
    any_due: Option<Millis>,
) -> (Option<Millis>, bool) {
    let due_now = |at: Option<Millis>| at.is_some_and(|at| at <= now);
    if may_acquire > 0 || !due_now(any_due) {
        (any_due, false)
    } else {
        (held_due, !due_now(held_due))
    }
}

/// The outcome of one delivery, as stored.
#[derive(Clone, Debug)]
pub enum OutcomeKind {
    /// Done; never redeliver.
    Ack,
    /// Failed; deliverable again at `retry_at`.
    Retry { retry_at: Millis, failure: Failure },
    /// Dead-letter now with this failure.
    DeadLetter { failure: Failure },
    /// Barrier until `until`; the next delivery is attempt 1.
    Postpone { until: Millis },
    /// Still working: stay invisible until `until`.
    Extend { until: Millis },
    /// Never processed (graceful shutdown): deliverable now, attempt not counted.
    Release,
}

/// An outcome addressed to one live delivery.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub topic: String,
    pub group: String,
    pub partition_key: String,
    pub message_id: String,
    pub seq: i64,
    pub token: i64,
    pub attempt: u32,
    pub kind: OutcomeKind,
}

/// When a claim found due partitions but could lock none of them (a
/// publisher or an outcome holds them), the SQL drivers report them due this
/// long from now, so the engine comes back then instead of spinning.
pub const LOCKED_RETRY_MS: Millis = 2;

/// Result of a lease tick: the fair-share cap and what this subscriber holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseReport {
    /// Partitions this subscriber may hold (`usize::MAX` = unlimited).
    pub cap: usize,
    /// Partitions it holds after renewing and shedding.
    pub owned: usize,
    /// Active subscribers in the group (including this one).
    pub active_subscribers: usize,
}

/// Parameters of a lease tick.
#[derive(Clone, Debug)]
pub struct LeaseTick {
    pub topic: String,
    pub group: String,
    pub subscriber: String,
    pub now: Millis,
    pub lease_ms: Millis,
    /// A scheduled renewal (every `lease_renewal`), not an early recheck of
    /// the fair share after a claim reported `share_spent`. A recheck must
    /// report the cap and what the subscriber holds; drivers may skip the
    /// rest on it (PostgreSQL only reads: no heartbeat, lease extension,
    /// shedding or sweep), so the extra ticks of a capped subscriber stay
    /// cheap and lock nothing.
    pub renewal: bool,
}

/// A dead-lettered message.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    /// The dead letter's own id (for replay).
    pub dlq_id: i64,
    /// The topic it was published to.
    pub original_topic: String,
    /// The consumer group that gave up on it.
    pub group: String,
    pub message: Message,
    pub failure: Failure,
    /// Attempts made before it was dead-lettered.
    pub attempts: u32,
    pub published_at: Millis,
    pub failed_at: Millis,
}

/// Counts for one topic and group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TopicStats {
    /// Stored messages (acked ones stay until the dedup retention passes).
    pub stored: u64,
    /// Messages not yet done for the group.
    pub pending: u64,
    /// Partitions rows for the group.
    pub partitions: u64,
    /// Partitions currently leased.
    pub leased: u64,
    /// Dead letters of the topic.
    pub dead_letters: u64,
}

/// Which partitions of a topic and group to list, one page at a time.
#[derive(Clone, Debug)]
pub struct PartitionQuery {
    pub topic: String,
    pub group: String,
    /// Only partitions whose lease names this subscriber (expired or not).
    pub owner: Option<String>,
    /// Only partitions due at or before this time (`next_due <= due_by`).
    pub due_by: Option<Millis>,
    /// Only partition keys after this one (the last key of the previous page).
    pub after: Option<String>,
    /// Rows at most.
    pub limit: usize,
    /// Deliveries still invisible at this time count as in flight.
    pub now: Millis,
}

/// One partition of a consumer group as stored, for operators.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PartitionInfo {
    pub partition_key: String,
    /// Every message at or below this position is done for the group.
    pub cursor: i64,
    /// Earliest time something may be deliverable; `None` = nothing pending.
    pub next_due: Option<Millis>,
    /// The subscriber named on the lease (it may have expired).
    pub lease_owner: Option<String>,
    /// When the lease runs out; `None` when nobody holds it.
    pub lease_expires: Option<Millis>,
    /// Deliveries handed out, without an outcome, not yet timed out.
    pub in_flight: u64,
}

impl PartitionInfo {
    /// A listing row from the stored columns: the lease expiry is shown only
    /// with an owner (an unowned row keeps a stale or zero value), and a
    /// count below zero (SQL arithmetic) is none.
    pub fn from_stored(
        partition_key: String,
        cursor: i64,
        next_due: Option<Millis>,
        lease_owner: Option<String>,
        lease_expires: Millis,
        in_flight: i64,
    ) -> Self {
        Self {
            partition_key,
            cursor,
            next_due,
            lease_expires: lease_owner.as_ref().map(|_| lease_expires),
            lease_owner,
            in_flight: in_flight.max(0) as u64,
        }
    }
}

/// What a garbage collection pass removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub messages: u64,
    pub partitions: u64,
    pub subscribers: u64,
}

/// Sent on [`Driver::wakeups`] when every topic may have new work (the
/// channel was down and notifications were missed).
pub const WAKE_ALL: &str = "*";

/// Durable storage for the queue. Every method is one atomic unit.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// Backend name (`memory`, `sqlite`, …).
    fn name(&self) -> &'static str;

    /// Topics with new work committed by other processes (PostgreSQL's
    /// LISTEN/NOTIFY), or [`WAKE_ALL`]. `None` for backends without such a
    /// channel: the claim loop's polling covers other processes there.
    fn wakeups(&self) -> Option<broadcast::Receiver<String>> {
        None
    }

    /// Stores messages; ids already stored for (topic, partition) are skipped.
    async fn publish(
        &self,
        topic: &str,
        msgs: &[NewMessage],
        now: Millis,
    ) -> MqResult<PublishReport>;

    /// Makes `group` a consumer of `topic`; its state starts at the oldest
    /// stored message, so messages published before it subscribed are delivered.
    async fn register_group(&self, topic: &str, group: &str, now: Millis) -> MqResult<()>;

    /// Heartbeat, renew own leases, compute the fair-share cap and shed leases
    /// above it (the lexicographically last partitions, idle ones first).
    /// With room below the cap, also makes partitions of dead subscribers
    /// (lease expired, no heartbeat within `lease_ms`) that have pending work
    /// due now, so a claim takes them over (see the module docs).
    async fn lease_tick(&self, tick: &LeaseTick) -> MqResult<LeaseReport>;

    /// Releases every lease and the heartbeat of a subscriber (graceful exit).
    async fn deregister(&self, topic: &str, group: &str, subscriber: &str) -> MqResult<()>;

    /// Makes the unfinished deliveries in partitions leased by `subscriber`
    /// due now, so a restarted subscriber (same name) takes back its dead
    /// incarnation's work without waiting for visibility timeouts. Messages
    /// backing off after a nack or postponed keep their time. Returns how
    /// many deliveries were released.
    async fn recover(
        &self,
        topic: &str,
        group: &str,
        subscriber: &str,
        now: Millis,
    ) -> MqResult<u64>;

    /// Finds due partitions and marks their deliverable messages delivered.
    /// Acquiring a partition from a dead subscriber (another name, lease
    /// expired, no heartbeat within `lease_ms`) first makes its in-flight
    /// deliveries deliverable, as `recover` does (see the module docs).
    async fn claim(&self, req: &ClaimRequest) -> MqResult<ClaimResult>;

    /// Applies outcomes in one transaction; one result per outcome, in order.
    /// A stale token yields `MqError::StaleDelivery` for that outcome only.
    async fn apply(&self, outcomes: &[Outcome], now: Millis) -> MqResult<Vec<MqResult<()>>>;

    /// Wakes a partition (every group) so that nothing announced before the
    /// wake waits for a hold (ADR 0012): postponed messages become due now;
    /// in-flight deliveries (claimed, no outcome) are marked so that their
    /// postpone makes them due now; messages delayed by `publish_after`
    /// become available now. Nothing pending: nothing to do. Returns how
    /// many messages it changed.
    async fn wake(&self, topic: &str, partition_key: &str, now: Millis) -> MqResult<u64>;

    /// Dead letters of a topic, oldest first, after `after_id`.
    async fn dead_letters(
        &self,
        topic: &str,
        after_id: i64,
        limit: usize,
    ) -> MqResult<Vec<DeadLetter>>;

    /// Publishes a dead letter again (same id, payload, partition, metadata)
    /// and removes it from the dead letters. Unknown id → `UnknownDeadLetter`.
    async fn replay_dead_letter(&self, topic: &str, dlq_id: i64, now: Millis) -> MqResult<()>;

    /// Deletes up to `limit` dead letters of any topic that failed before
    /// `failed_before`, lowest id first, in one transaction; returns how
    /// many. Retention calls it until it returns less than `limit`.
    async fn prune_dead_letters(&self, failed_before: Millis, limit: usize) -> MqResult<u64>;

    /// How many dead letters of any topic failed before `failed_before`.
    async fn count_dead_letters_before(&self, failed_before: Millis) -> MqResult<u64>;

    /// Deletes messages done for every group and older than `retention_ms`,
    /// partitions with no stored messages, and heartbeats idle for `stale_ms`.
    async fn gc(&self, now: Millis, retention_ms: Millis, stale_ms: Millis) -> MqResult<GcReport>;

    /// Counts for one topic and group.
    async fn stats(&self, topic: &str, group: &str) -> MqResult<TopicStats>;

    /// The consumer groups registered on `topic`, sorted.
    async fn groups(&self, topic: &str) -> MqResult<Vec<String>>;

    /// A page of a group's partitions, by partition key (byte-wise).
    async fn partitions(&self, query: &PartitionQuery) -> MqResult<Vec<PartitionInfo>>;
}

/// Fair share of `partitions` among the sorted `active` subscribers for `me`:
/// ⌊P/N⌋ plus one for the first P mod N ranks, so the caps sum to P. A
/// subscriber missing from `active` (its heartbeat not visible yet) assumes
/// it is one more. One subscriber alone gets no cap.
pub fn fair_share_cap(partitions: usize, active: &[String], me: &str) -> usize {
    match active.iter().position(|s| s == me) {
        Some(_) if active.len() <= 1 => usize::MAX,
        Some(rank) => {
            let n = active.len();
            (partitions / n + usize::from(rank < partitions % n)).max(1)
        }
        None => partitions.div_ceil(active.len() + 1).max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::fair_share_cap;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("s{i}")).collect()
    }

    #[test]
    fn a_claim_waits_for_work_it_can_take() {
        use super::claim_due;
        // Share left: any servable partition counts.
        assert_eq!(claim_due(100, 1, Some(500), Some(90)), (Some(90), false));
        // Share spent, free work due later: wake then to notice it.
        assert_eq!(claim_due(100, 0, Some(500), Some(300)), (Some(300), false));
        // Share spent, a held partition due now: at once.
        assert_eq!(claim_due(100, 0, Some(100), Some(50)), (Some(100), false));
        // Share spent, only free work due now: wait for held work, tick early.
        assert_eq!(claim_due(100, 0, Some(500), Some(50)), (Some(500), true));
        assert_eq!(claim_due(100, 0, None, Some(50)), (None, true));
        // Nothing pending.
        assert_eq!(claim_due(100, 0, None, None), (None, false));
    }

    #[test]
    fn fair_share_sums_to_partitions() {
        let subs = names(5);
        let caps: Vec<usize> = subs.iter().map(|s| fair_share_cap(12, &subs, s)).collect();
        assert_eq!(caps, vec![3, 3, 2, 2, 2]);
        assert_eq!(caps.iter().sum::<usize>(), 12);
        let two = names(2);
        assert_eq!(fair_share_cap(4, &two, "s0"), 2);
        assert_eq!(fair_share_cap(5, &two, "s1"), 2);
        assert_eq!(fair_share_cap(5, &two, "s0"), 3);
        assert_eq!(fair_share_cap(2, &names(4), "s3"), 1);
        assert_eq!(fair_share_cap(7, &names(1), "s0"), usize::MAX);
        assert_eq!(fair_share_cap(9, &two, "new"), 3);
    }
}
