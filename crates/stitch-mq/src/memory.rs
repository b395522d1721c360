//! In-process backend: the same model as the SQL backends held in maps
//! behind one mutex. Not durable; for unit tests of other crates and for
//! running the conformance suite without a database.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::driver::*;
use crate::error::{MqError, MqResult};
use crate::message::{Failure, Message, Millis};
use crate::window::{exhausted_failure, plan_window, RowState, WindowLimits, WindowRow};

const SCAN_LIMIT_EXTRA: usize = 16;

#[derive(Clone, Debug)]
struct MsgRow {
    topic: String,
    message: Message,
    published_at: Millis,
    available_at: Millis,
    created_at: Millis,
}

#[derive(Clone, Debug, Default)]
struct PartRow {
    cursor: i64,
    next_due: Option<Millis>,
    lease_owner: Option<String>,
    lease_expires: Millis,
}

#[derive(Clone, Debug)]
struct StateRow {
    attempt: u32,
    invisible_until: Millis,
    postponed: bool,
    done: bool,
    claimed: bool,
    /// A wake came while this delivery was in flight: its postpone ends now.
    woken: bool,
    token: i64,
}

type PartKey = (String, String, String); // topic, group, partition

#[derive(Default)]
struct Inner {
    next_seq: i64,
    next_token: i64,
    next_dlq: i64,
    messages: BTreeMap<i64, MsgRow>,
    by_key: HashMap<(String, String, String), i64>,
    by_partition: HashMap<(String, String), BTreeSet<i64>>,
    groups: HashMap<String, BTreeSet<String>>,
    partitions: BTreeMap<PartKey, PartRow>,
    state: HashMap<(String, i64), StateRow>,
    subscribers: HashMap<(String, String, String), Millis>,
    dead: BTreeMap<i64, DeadLetter>,
}

/// The in-memory driver.
#[derive(Default)]
pub struct MemoryDriver {
    inner: Mutex<Inner>,
}

impl MemoryDriver {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

fn min_due(cur: Option<Millis>, t: Millis) -> Option<Millis> {
    Some(cur.map_or(t, |c| c.min(t)))
}

impl Inner {
    fn insert_message(&mut self, topic: &str, m: &NewMessage, now: Millis) -> bool {
        let key = (
            topic.to_string(),
            m.message.partition_key.clone(),
            m.message.id.clone(),
        );
        if self.by_key.contains_key(&key) {
            return false;
        }
        self.next_seq += 1;
        let seq = self.next_seq;
        self.by_key.insert(key, seq);
        self.by_partition
            .entry((topic.to_string(), m.message.partition_key.clone()))
            .or_default()
            .insert(seq);
        self.messages.insert(
            seq,
            MsgRow {
                topic: topic.to_string(),
                message: m.message.clone(),
                published_at: now,
                available_at: m.available_at,
                created_at: now,
            },
        );
        let groups: Vec<String> = self
            .groups
            .get(topic)
            .map(|g| g.iter().cloned().collect())
            .unwrap_or_default();
        for g in groups {
            let p = self
                .partitions
                .entry((topic.to_string(), g, m.message.partition_key.clone()))
                .or_default();
            p.next_due = min_due(p.next_due, m.available_at);
        }
        true
    }

    /// Whether `subscriber` of the partition's topic and group heartbeated
    /// after `since`.
    fn heartbeat_within(&self, key: &PartKey, subscriber: &str, since: Millis) -> bool {
        self.subscribers
            .get(&(key.0.clone(), key.1.clone(), subscriber.to_string()))
            .is_some_and(|hb| *hb > since)
    }

    /// Makes the partition's in-flight deliveries after `cursor` deliverable
    /// at `now` (attempt kept, as `recover` does); returns how many.
    fn release_in_flight(&mut self, key: &PartKey, cursor: i64, now: Millis) -> usize {
        let Some(seqs) = self.by_partition.get(&(key.0.clone(), key.2.clone())) else {
            return 0;
        };
        let mut released = 0;
        for seq in seqs.range(cursor + 1..) {
            if let Some(s) = self.state.get_mut(&(key.1.clone(), *seq)) {
                if s.claimed && !s.done && s.invisible_until > now {
                    s.invisible_until = now;
                    released += 1;
                }
            }
        }
        released
    }

    fn remove_message(&mut self, seq: i64) {
        if let Some(row) = self.messages.remove(&seq) {
            self.by_key.remove(&(
                row.topic.clone(),
                row.message.partition_key.clone(),
                row.message.id.clone(),
            ));
            let pk = (row.topic, row.message.partition_key);
            if let Some(set) = self.by_partition.get_mut(&pk) {
                set.remove(&seq);
                if set.is_empty() {
                    self.by_partition.remove(&pk);
                }
            }
        }
    }

    fn dead_letter(
        &mut self,
        topic: &str,
        group: &str,
        seq: i64,
        attempts: u32,
        failure: Failure,
        now: Millis,
    ) {
        let Some(row) = self.messages.get(&seq) else {
            return;
        };
        let existing = self.dead.iter().find_map(|(id, d)| {
            (d.original_topic == topic
                && d.group == group
                && d.message.partition_key == row.message.partition_key
                && d.message.id == row.message.id)
                .then_some(*id)
        });
        let id = existing.unwrap_or_else(|| {
            self.next_dlq += 1;
            self.next_dlq
        });
        self.dead.insert(
            id,
            DeadLetter {
                dlq_id: id,
                original_topic: topic.to_string(),
                group: group.to_string(),
                message: row.message.clone(),
                failure,
                attempts,
                published_at: row.published_at,
                failed_at: now,
            },
        );
    }
}

#[async_trait]
impl Driver for MemoryDriver {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn publish(
        &self,
        topic: &str,
        msgs: &[NewMessage],
        now: Millis,
    ) -> MqResult<PublishReport> {
        let mut inner = self.inner.lock();
        let mut report = PublishReport::default();
        for m in msgs {
            if inner.insert_message(topic, m, now) {
                report.stored += 1;
            } else {
                report.duplicates += 1;
            }
        }
        Ok(report)
    }

    async fn register_group(&self, topic: &str, group: &str, _now: Millis) -> MqResult<()> {
        let mut inner = self.inner.lock();
        if !inner
            .groups
            .entry(topic.to_string())
            .or_default()
            .insert(group.to_string())
        {
            return Ok(());
        }
        let partitions: Vec<String> = inner
            .by_partition
            .keys()
            .filter(|(t, _)| t == topic)
            .map(|(_, p)| p.clone())
            .collect();
        for p in partitions {
            let row = inner
                .partitions
                .entry((topic.to_string(), group.to_string(), p))
                .or_default();
            row.next_due = min_due(row.next_due, 0);
        }
        Ok(())
    }

    async fn lease_tick(&self, t: &LeaseTick) -> MqResult<LeaseReport> {
        let mut inner = self.inner.lock();
        inner.subscribers.insert(
            (t.topic.clone(), t.group.clone(), t.subscriber.clone()),
            t.now,
        );
        let mut active: Vec<String> = inner
            .subscribers
            .iter()
            .filter(|((tp, g, _), hb)| *tp == t.topic && *g == t.group && **hb > t.now - t.lease_ms)
            .map(|((_, _, s), _)| s.clone())
            .collect();
        active.sort();
        let in_scope = |k: &PartKey| k.0 == t.topic && k.1 == t.group;
        let busy = inner
            .partitions
            .iter()
            .filter(|(k, p)| {
                in_scope(k)
                    && (p.next_due.is_some()
                        || (p.lease_owner.is_some() && p.lease_expires > t.now))
            })
            .count();
        let cap = fair_share_cap(busy, &active, &t.subscriber);
        let mut mine: Vec<PartKey> = Vec::new();
        for (k, p) in inner.partitions.iter_mut() {
            if in_scope(k) && p.lease_owner.as_deref() == Some(t.subscriber.as_str()) {
                if p.next_due.is_none() {
                    // Idle: nothing pending, give the lease back.
                    p.lease_owner = None;
                    p.lease_expires = 0;
                } else {
                    p.lease_expires = t.now + t.lease_ms;
                    mine.push(k.clone());
                }
            }
        }
        if mine.len() > cap {
            for k in mine.split_off(cap) {
                if let Some(p) = inner.partitions.get_mut(&k) {
                    p.lease_owner = None;
                    p.lease_expires = 0;
                }
            }
        }
        if mine.len() < cap {
            // Dead owners' partitions whose only pending work may be their
            // in-flight deliveries: due now, so a claim takes them over.
            for (k, p) in inner.partitions.iter_mut() {
                let dead_owner = p
                    .lease_owner
                    .as_ref()
                    .is_some_and(|o| p.lease_expires <= t.now && !active.contains(o));
                if in_scope(k) && dead_owner && p.next_due.is_some_and(|d| d > t.now) {
                    p.next_due = Some(t.now);
                }
            }
        }
        Ok(LeaseReport {
            cap,
            owned: mine.len(),
            active_subscribers: active.len().max(1),
        })
    }

    async fn deregister(&self, topic: &str, group: &str, subscriber: &str) -> MqResult<()> {
        let mut inner = self.inner.lock();
        inner
            .subscribers
            .remove(&(topic.to_string(), group.to_string(), subscriber.to_string()));
        for (k, p) in inner.partitions.iter_mut() {
            if k.0 == topic && k.1 == group && p.lease_owner.as_deref() == Some(subscriber) {
                p.lease_owner = None;
                p.lease_expires = 0;
            }
        }
        Ok(())
    }

    async fn recover(
        &self,
        topic: &str,
        group: &str,
        subscriber: &str,
        now: Millis,
    ) -> MqResult<u64> {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        let mut released = 0;
        let owned: Vec<PartKey> = inner
            .partitions
            .iter()
            .filter(|(k, p)| {
                k.0 == topic && k.1 == group && p.lease_owner.as_deref() == Some(subscriber)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in owned {
            let seqs: Vec<i64> = inner
                .by_partition
                .get(&(key.0.clone(), key.2.clone()))
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default();
            for seq in seqs {
                if let Some(s) = inner.state.get_mut(&(group.to_string(), seq)) {
                    if s.claimed && !s.done && s.invisible_until > now {
                        s.invisible_until = now;
                        released += 1;
                    }
                }
            }
            if let Some(p) = inner.partitions.get_mut(&key) {
                if p.next_due.is_some() {
                    p.next_due = min_due(p.next_due, now);
                }
            }
        }
        Ok(released)
    }

    async fn claim(&self, req: &ClaimRequest) -> MqResult<ClaimResult> {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        let now = req.now;
        let me = req.subscriber.as_str();
        let servable = |p: &PartRow| match &p.lease_owner {
            Some(o) if p.lease_expires > now => o == me,
            _ => true,
        };
        let mut due: Vec<(Millis, PartKey)> = inner
            .partitions
            .iter()
            .filter(|(k, p)| {
                k.0 == req.topic
                    && k.1 == req.group
                    && p.next_due.is_some_and(|d| d <= now)
                    && servable(p)
            })
            .map(|(k, p)| (p.next_due.unwrap_or(now), k.clone()))
            .collect();
        due.sort();
        let mut result = ClaimResult::default();
        let mut may_acquire = req.may_acquire;
        for (_, key) in due {
            if result.messages.len() >= req.max_messages {
                break;
            }
            let Some(part) = inner.partitions.get(&key).cloned() else {
                continue;
            };
            let owned = part.lease_owner.as_deref() == Some(me) && part.lease_expires > now;
            if !owned {
                if may_acquire == 0 {
                    continue;
                }
                may_acquire -= 1;
                result.acquired += 1;
                let dead_owner = part.lease_owner.as_deref().is_some_and(|o| {
                    o != me && !inner.heartbeat_within(&key, o, now - req.lease_ms)
                });
                if dead_owner {
                    result.taken_over += inner.release_in_flight(&key, part.cursor, now);
                }
            }
            let scan = req.batch_size as usize + SCAN_LIMIT_EXTRA;
            let seqs: Vec<i64> = inner
                .by_partition
                .get(&(key.0.clone(), key.2.clone()))
                .map(|s| s.range(part.cursor + 1..).take(scan + 1).copied().collect())
                .unwrap_or_default();
            let truncated = seqs.len() > scan;
            let rows: Vec<WindowRow> = seqs
                .iter()
                .take(scan)
                .filter_map(|seq| {
                    let m = inner.messages.get(seq)?;
                    let st = inner
                        .state
                        .get(&(req.group.clone(), *seq))
                        .map(|s| RowState {
                            attempt: s.attempt,
                            invisible_until: s.invisible_until,
                            postponed: s.postponed,
                            done: s.done,
                        });
                    Some(WindowRow {
                        seq: *seq,
                        available_at: m.available_at,
                        state: st,
                    })
                })
                .collect();
            let plan = plan_window(
                part.cursor,
                &rows,
                truncated,
                WindowLimits::for_claim(req, result.messages.len()),
            );
            for (seq, attempts) in &plan.exhausted {
                inner.dead_letter(
                    &req.topic,
                    &req.group,
                    *seq,
                    *attempts,
                    exhausted_failure(*attempts),
                    now,
                );
                if let Some(s) = inner.state.get_mut(&(req.group.clone(), *seq)) {
                    s.done = true;
                }
                result.dead_lettered += 1;
            }
            for (seq, attempt) in &plan.deliver {
                inner.next_token += 1;
                let token = inner.next_token;
                inner.state.insert(
                    (req.group.clone(), *seq),
                    StateRow {
                        attempt: *attempt,
                        invisible_until: now + req.visibility_ms,
                        postponed: false,
                        done: false,
                        claimed: true,
                        woken: false,
                        token,
                    },
                );
                if let Some(m) = inner.messages.get(seq) {
                    result.messages.push(ClaimedMessage {
                        seq: *seq,
                        message: m.message.clone(),
                        published_at: m.published_at,
                        attempt: *attempt,
                        token,
                    });
                }
            }
            if plan.cursor > part.cursor {
                let group = req.group.clone();
                for seq in inner
                    .by_partition
                    .get(&(key.0.clone(), key.2.clone()))
                    .map(|s| s.range(..=plan.cursor).copied().collect::<Vec<_>>())
                    .unwrap_or_default()
                {
                    inner.state.remove(&(group.clone(), seq));
                }
            }
            if let Some(p) = inner.partitions.get_mut(&key) {
                p.cursor = plan.cursor;
                p.next_due = plan.next_due;
                p.lease_owner = Some(me.to_string());
                p.lease_expires = if owned {
                    p.lease_expires
                } else {
                    now + req.lease_ms
                };
            }
        }
        let (mut held_due, mut any_due) = (None, None);
        for (_, p) in inner
            .partitions
            .iter()
            .filter(|(k, p)| k.0 == req.topic && k.1 == req.group && servable(p))
        {
            let Some(due) = p.next_due else { continue };
            any_due = min_due(any_due, due);
            if p.lease_owner.as_deref() == Some(me) && p.lease_expires > now {
                held_due = min_due(held_due, due);
            }
        }
        (result.next_due, result.share_spent) = claim_due(now, may_acquire, held_due, any_due);
        Ok(result)
    }

    async fn apply(&self, outcomes: &[Outcome], now: Millis) -> MqResult<Vec<MqResult<()>>> {
        let mut inner = self.inner.lock();
        let mut results = Vec::with_capacity(outcomes.len());
        for o in outcomes {
            let key = (o.group.clone(), o.seq);
            let live = inner
                .state
                .get(&key)
                .is_some_and(|s| s.token == o.token && !s.done);
            if !live {
                results.push(Err(MqError::StaleDelivery(o.message_id.clone())));
                continue;
            }
            let woken = inner.state.get(&key).is_some_and(|s| s.woken);
            let mut due = now;
            match &o.kind {
                OutcomeKind::DeadLetter { failure } => {
                    inner.dead_letter(&o.topic, &o.group, o.seq, o.attempt, failure.clone(), now);
                }
                OutcomeKind::Retry { retry_at, .. } => due = *retry_at,
                // A wake during the delivery ends the hold now (ADR 0012).
                OutcomeKind::Postpone { until } if !woken => due = *until,
                _ => {}
            }
            if let Some(s) = inner.state.get_mut(&key) {
                if !matches!(o.kind, OutcomeKind::Extend { .. }) {
                    s.claimed = false;
                }
                match &o.kind {
                    OutcomeKind::Ack | OutcomeKind::DeadLetter { .. } => s.done = true,
                    OutcomeKind::Retry { retry_at, .. } => {
                        s.invisible_until = *retry_at;
                        s.postponed = false;
                    }
                    OutcomeKind::Postpone { .. } => {
                        s.invisible_until = due;
                        s.postponed = true;
                        s.attempt = 0;
                        s.woken = false;
                    }
                    OutcomeKind::Extend { until } => s.invisible_until = *until,
                    OutcomeKind::Release => {
                        s.invisible_until = now;
                        s.attempt = s.attempt.saturating_sub(1);
                    }
                }
            }
            if !matches!(o.kind, OutcomeKind::Extend { .. }) {
                if let Some(p) = inner.partitions.get_mut(&(
                    o.topic.clone(),
                    o.group.clone(),
                    o.partition_key.clone(),
                )) {
                    p.next_due = min_due(p.next_due, due);
                }
            }
            results.push(Ok(()));
        }
        Ok(results)
    }

    async fn wake(&self, topic: &str, partition_key: &str, now: Millis) -> MqResult<u64> {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        let seqs: Vec<i64> = inner
            .by_partition
            .get(&(topic.to_string(), partition_key.to_string()))
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        // Postponed → due now; in flight → marked, its postpone ends at
        // once; delayed by `publish_after` → available now (ADR 0012).
        let mut woken = 0;
        for ((_, seq), s) in inner.state.iter_mut() {
            if s.done || seqs.binary_search(seq).is_err() {
                continue;
            }
            if s.postponed && s.invisible_until > now {
                s.invisible_until = now;
                woken += 1;
            } else if s.claimed && !s.woken {
                s.woken = true;
                woken += 1;
            }
        }
        for seq in &seqs {
            if let Some(m) = inner.messages.get_mut(seq) {
                if m.available_at > now {
                    m.available_at = now;
                    woken += 1;
                }
            }
        }
        for (k, p) in inner.partitions.iter_mut() {
            if k.0 == topic && k.2 == partition_key && p.next_due.is_some() {
                p.next_due = min_due(p.next_due, now);
            }
        }
        Ok(woken)
    }

    async fn dead_letters(
        &self,
        topic: &str,
        after_id: i64,
        limit: usize,
    ) -> MqResult<Vec<DeadLetter>> {
        let inner = self.inner.lock();
        Ok(inner
            .dead
            .range(after_id + 1..)
            .filter(|(_, d)| d.original_topic == topic)
            .take(limit)
            .map(|(_, d)| d.clone())
            .collect())
    }

    async fn replay_dead_letter(&self, topic: &str, dlq_id: i64, now: Millis) -> MqResult<()> {
        let mut inner = self.inner.lock();
        let Some(dead) = inner
            .dead
            .get(&dlq_id)
            .filter(|d| d.original_topic == topic)
            .cloned()
        else {
            return Err(MqError::UnknownDeadLetter {
                topic: topic.to_string(),
                id: dlq_id,
            });
        };
        let key = (
            topic.to_string(),
            dead.message.partition_key.clone(),
            dead.message.id.clone(),
        );
        if let Some(old) = inner.by_key.get(&key).copied() {
            inner.remove_message(old);
        }
        inner.insert_message(
            topic,
            &NewMessage {
                message: dead.message,
                available_at: now,
            },
            now,
        );
        inner.dead.remove(&dlq_id);
        Ok(())
    }

    async fn prune_dead_letters(&self, failed_before: Millis, limit: usize) -> MqResult<u64> {
        let mut inner = self.inner.lock();
        let doomed: Vec<i64> = inner
            .dead
            .iter()
            .filter(|(_, d)| d.failed_at < failed_before)
            .take(limit)
            .map(|(id, _)| *id)
            .collect();
        for id in &doomed {
            inner.dead.remove(id);
        }
        Ok(doomed.len() as u64)
    }

    async fn count_dead_letters_before(&self, failed_before: Millis) -> MqResult<u64> {
        let inner = self.inner.lock();
        Ok(inner
            .dead
            .values()
            .filter(|d| d.failed_at < failed_before)
            .count() as u64)
    }

    async fn gc(&self, now: Millis, retention_ms: Millis, stale_ms: Millis) -> MqResult<GcReport> {
        let mut inner = self.inner.lock();
        let mut report = GcReport::default();
        let mut min_cursor: HashMap<(String, String), i64> = HashMap::new();
        for (k, p) in &inner.partitions {
            let e = min_cursor
                .entry((k.0.clone(), k.2.clone()))
                .or_insert(i64::MAX);
            *e = (*e).min(p.cursor);
        }
        let doomed: Vec<i64> = inner
            .messages
            .iter()
            .filter(|(seq, m)| {
                m.created_at < now - retention_ms
                    && min_cursor
                        .get(&(m.topic.clone(), m.message.partition_key.clone()))
                        .is_some_and(|c| **seq <= *c)
            })
            .map(|(s, _)| *s)
            .collect();
        for seq in doomed {
            inner.remove_message(seq);
            report.messages += 1;
        }
        let empty: Vec<PartKey> = inner
            .partitions
            .iter()
            .filter(|(k, p)| {
                p.next_due.is_none()
                    && p.lease_owner.is_none()
                    && !inner.by_partition.contains_key(&(k.0.clone(), k.2.clone()))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in empty {
            inner.partitions.remove(&k);
            report.partitions += 1;
        }
        let before = inner.subscribers.len();
        inner.subscribers.retain(|_, hb| *hb > now - stale_ms);
        report.subscribers = (before - inner.subscribers.len()) as u64;
        Ok(report)
    }

    async fn stats(&self, topic: &str, group: &str) -> MqResult<TopicStats> {
        let inner = self.inner.lock();
        let mut stats = TopicStats {
            stored: inner.messages.values().filter(|m| m.topic == topic).count() as u64,
            dead_letters: inner
                .dead
                .values()
                .filter(|d| d.original_topic == topic)
                .count() as u64,
            ..TopicStats::default()
        };
        for (k, p) in &inner.partitions {
            if k.0 != topic || k.1 != group {
                continue;
            }
            stats.partitions += 1;
            if p.lease_owner.is_some() {
                stats.leased += 1;
            }
            if let Some(set) = inner.by_partition.get(&(k.0.clone(), k.2.clone())) {
                stats.pending += set
                    .range(p.cursor + 1..)
                    .filter(|seq| {
                        !inner
                            .state
                            .get(&(group.to_string(), **seq))
                            .is_some_and(|s| s.done)
                    })
                    .count() as u64;
            }
        }
        Ok(stats)
    }

    async fn groups(&self, topic: &str) -> MqResult<Vec<String>> {
        let inner = self.inner.lock();
        Ok(inner
            .groups
            .get(topic)
            .map(|g| g.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn partitions(&self, q: &PartitionQuery) -> MqResult<Vec<PartitionInfo>> {
        let inner = self.inner.lock();
        let mut page = Vec::new();
        for ((topic, group, key), p) in &inner.partitions {
            if page.len() >= q.limit {
                break;
            }
            if *topic != q.topic
                || *group != q.group
                || q.after.as_ref().is_some_and(|a| key <= a)
                || q.owner
                    .as_ref()
                    .is_some_and(|o| p.lease_owner.as_ref() != Some(o))
                || q.due_by.is_some_and(|by| p.next_due.is_none_or(|d| d > by))
            {
                continue;
            }
            let in_flight = inner
                .by_partition
                .get(&(topic.clone(), key.clone()))
                .map_or(0, |seqs| {
                    seqs.range(p.cursor + 1..)
                        .filter(|seq| {
                            inner
                                .state
                                .get(&(group.clone(), **seq))
                                .is_some_and(|s| s.claimed && !s.done && s.invisible_until > q.now)
                        })
                        .count()
                });
            page.push(PartitionInfo::from_stored(
                key.clone(),
                p.cursor,
                p.next_due,
                p.lease_owner.clone(),
                p.lease_expires,
                in_flight as i64,
            ));
        }
        Ok(page)
    }
}
