//! The pruner: deletes finished builds, events and dead letters older than
//! `[retention]`, the local runners' state of the deleted builds, and gives
//! SQLite's freed pages back. `stitch serve` runs a pass every `interval`
//! (the first one interval after start) on whichever process holds the
//! `retention` lease row at that moment (ADR 0013); `stitch gc` runs one
//! now. Every transaction is bounded in rows, and the row count adapts so a
//! batch stays short, so creates and polls never wait long behind a pass.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use stitch_core::BuildId;
use stitch_mq::Admin;
use stitch_store::{Store, StoreError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RetentionConfig};
use crate::state::{topics, AppState};

/// The lease row the pruners of processes sharing a database take turns on.
pub const LEASE: &str = "retention";
/// How long a pass holds the lease without renewing it; renewed between
/// batches once a tenth of it has passed, so only a pass whose process died
/// leaves it to expire.
const LEASE_TTL: Duration = Duration::from_secs(300);
/// Rows per transaction: the most, the least, and where a pass starts.
const MAX_BATCH: u32 = 500;
const MIN_BATCH: u32 = 10;
const FIRST_BATCH: u32 = 50;
/// A batch slower than this halves the next one; one faster than a fifth
/// of it doubles the next (up to [`MAX_BATCH`]). Short: on SQLite every
/// write (a create, a poll's outcome) waits behind a pruning transaction,
/// and 200 ms here put creates' p99 at 2–3× the pruning-off run in the soak.
const BATCH_BUDGET: Duration = Duration::from_millis(20);
/// The queue topics partitioned by build id: their messages are deleted with
/// their build.
const BUILD_TOPICS: &[&str] = &[topics::TRIGGER, topics::SIGNAL];
/// SQLite pages given back per transaction (4 KiB each: 8 MiB).
const VACUUM_PAGES: u64 = 2048;
/// Free SQLite pages a pass leaves for reuse (4 KiB each: 8 MiB). New rows
/// take free pages before the file grows, so at steady state (as much
/// pruned per pass as created between passes) the file stays flat without
/// giving anything back; moving pages to shrink the file only to grow it
/// again was a write transaction per pass that creates waited behind (the
/// soak's create p99 1.8× of the run without pruning). Only a larger drop
/// (the first passes over a big backlog, a shorter window) is given back.
const VACUUM_KEEP_FREE: u64 = 2048;

/// Counters of prometheus metrics the pruner records.
pub mod metric {
    /// Rows (or directories) deleted, by `kind`: `builds`, `events`,
    /// `log_lines`, `queue_messages`, `dead_letters`, `local_states`.
    pub const PRUNED: &str = stitch_core::metric::RETENTION_PRUNED;
    /// Passes by `outcome`: `ran`, `lease_held`, `failed`.
    pub const PASSES: &str = stitch_core::metric::RETENTION_PASSES;
    /// The oldest event still stored (the log's next seq when it is empty).
    pub const OLDEST_EVENT_SEQ: &str = stitch_core::metric::EVENTS_OLDEST_RETAINED_SEQ;
    /// The database's size in bytes, where the backend can tell it.
    pub const DATABASE_BYTES: &str = stitch_core::metric::DATABASE_SIZE;
}

/// Why a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The queue's dead letters could not be pruned.
    #[error("queue: {0}")]
    Queue(#[from] stitch_mq::MqError),
    /// Another process took the lease while this pass ran (this one stalled
    /// for longer than the lease): it stopped where it was.
    #[error("the retention lease was lost to {0:?} during the pass")]
    LeaseLost(Option<String>),
}

/// What a pass removed (or, for a dry run, would remove), per kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PassReport {
    /// True for a dry run: nothing was deleted.
    pub dry_run: bool,
    /// Set when another process held the lease: this pass did nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_held_by: Option<String>,
    pub builds: u64,
    pub events: u64,
    pub log_lines: u64,
    /// The pruned builds' `trigger` and `signal` queue messages (not
    /// counted by a dry run).
    pub queue_messages: u64,
    pub dead_letters: u64,
    /// Local runner state directories deleted (not counted by a dry run).
    pub local_states: u64,
    /// The oldest event stored after the pass.
    pub oldest_event_seq: u64,
    /// The database's size after the pass, where the backend tells it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_bytes: Option<u64>,
}

/// One process's pruner.
#[derive(Clone)]
pub struct Pruner {
    store: Store,
    admin: Admin,
    /// The state directories of the `local` queues: a pruned build's
    /// state may be in any of them.
    local_state_dirs: Vec<PathBuf>,
    config: RetentionConfig,
    /// This pruner's name on the lease row.
    owner: String,
}

impl std::fmt::Debug for Pruner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pruner")
            .field("owner", &self.owner)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn cutoff(now_ms: i64, window: Option<Duration>) -> Option<i64> {
    window.map(|w| now_ms.saturating_sub(i64::try_from(w.as_millis()).unwrap_or(i64::MAX)))
}

/// The rows per transaction, adapting to how long the last batch took.
struct BatchSize(u32);

impl BatchSize {
    fn after(&mut self, took: Duration) {
        if took > BATCH_BUDGET {
            self.0 = (self.0 / 2).max(MIN_BATCH);
        } else if took < BATCH_BUDGET / 5 {
            self.0 = (self.0 * 2).min(MAX_BATCH);
        }
    }
}

impl Pruner {
    /// A pruner named `owner` on the lease row.
    pub fn new(
        store: Store,
        admin: Admin,
        local_state_dirs: Vec<PathBuf>,
        config: RetentionConfig,
        owner: impl Into<String>,
    ) -> Self {
        Self {
            store,
            admin,
            local_state_dirs,
            config,
            owner: owner.into(),
        }
    }

    /// The pruner of a running service (see [`Pruner::for_config`]).
    pub fn for_service(state: &AppState) -> Self {
        Self::for_config(state.store().clone(), state.queue().admin(), state.config())
    }

    /// A pruner for `config`'s retention and `local` queues, named after
    /// its node, process and a random suffix (two pruners never share a
    /// name).
    pub fn for_config(store: Store, admin: Admin, config: &Config) -> Self {
        let owner = format!(
            "{}:{}:{:08x}",
            crate::stages::node_name(),
            std::process::id(),
            rand::random::<u32>()
        );
        Self::new(
            store,
            admin,
            crate::runners::local_state_dirs(config),
            config.retention.clone(),
            owner,
        )
    }

    /// This pruner's name on the lease row.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// What a pass at `now_ms` would delete. Reads only; takes no lease.
    pub async fn preview(&self, now_ms: i64) -> Result<PassReport, PruneError> {
        let builds_before = cutoff(now_ms, self.config.builds.duration());
        let events_before = cutoff(now_ms, self.config.events.duration());
        let would = self.store.prunable(builds_before, events_before).await?;
        let dead_letters = match cutoff(now_ms, self.config.dead_letters.duration()) {
            Some(before) => self.admin.count_dead_letters_before(before).await?,
            None => 0,
        };
        Ok(PassReport {
            dry_run: true,
            builds: would.builds,
            events: would.events,
            log_lines: would.log_lines,
            dead_letters,
            oldest_event_seq: self.store.oldest_retained_seq().await?,
            database_bytes: self.store.database_size().await?,
            ..PassReport::default()
        })
    }

    /// One pass at `now_ms` (epoch ms; the windows count back from it),
    /// if this process gets the lease; otherwise a report naming the
    /// holder, having deleted nothing. The lease is given back at the end.
    pub async fn run_pass(&self, now_ms: i64) -> Result<PassReport, PruneError> {
        let ttl = i64::try_from(LEASE_TTL.as_millis()).unwrap_or(i64::MAX);
        if !self
            .store
            .try_lease(LEASE, &self.owner, now_ms, ttl)
            .await?
        {
            let holder = self.store.lease_holder(LEASE, now_ms).await?;
            metrics::counter!(metric::PASSES, "outcome" => "lease_held").increment(1);
            return Ok(PassReport {
                lease_held_by: Some(holder.unwrap_or_default()),
                ..PassReport::default()
            });
        }
        let result = self.prune_holding_lease(now_ms, ttl).await;
        if let Err(e) = self.store.release_lease(LEASE, &self.owner).await {
            tracing::warn!(error = %e, "retention: could not release the lease; it expires by itself");
        }
        let outcome = if result.is_ok() { "ran" } else { "failed" };
        metrics::counter!(metric::PASSES, "outcome" => outcome).increment(1);
        let report = result?;
        for (kind, n) in [
            ("builds", report.builds),
            ("events", report.events),
            ("log_lines", report.log_lines),
            ("queue_messages", report.queue_messages),
            ("dead_letters", report.dead_letters),
            ("local_states", report.local_states),
        ] {
            metrics::counter!(metric::PRUNED, "kind" => kind).increment(n);
        }
        metrics::gauge!(metric::OLDEST_EVENT_SEQ).set(report.oldest_event_seq as f64);
        if let Some(bytes) = report.database_bytes {
            metrics::gauge!(metric::DATABASE_BYTES).set(bytes as f64);
        }
        Ok(report)
    }

    async fn prune_holding_lease(&self, now_ms: i64, ttl: i64) -> Result<PassReport, PruneError> {
        let started = Instant::now();
        let renewed = std::sync::Mutex::new(started);
        // Renews the lease between batches, at the pass's own clock, once a
        // tenth of its lifetime has passed since the last renewal: a renewal
        // is a write transaction creates would wait behind, and a pass of a
        // few batches needs none.
        let renew = || async {
            let due = renewed
                .lock()
                .map(|at| at.elapsed() >= LEASE_TTL / 10)
                .unwrap_or(true);
            if !due {
                return Ok(());
            }
            let now = now_ms
                .saturating_add(i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX));
            if self.store.try_lease(LEASE, &self.owner, now, ttl).await? {
                if let Ok(mut at) = renewed.lock() {
                    *at = Instant::now();
                }
                Ok(())
            } else {
                Err(PruneError::LeaseLost(
                    self.store.lease_holder(LEASE, now).await?,
                ))
            }
        };
        let mut report = PassReport::default();
        let mut batch = BatchSize(FIRST_BATCH);

        if let Some(before) = cutoff(now_ms, self.config.builds.duration()) {
            loop {
                let t = Instant::now();
                // A build's queue messages go with it, in its transaction.
                let out = self
                    .store
                    .prune_builds_with_messages(before, batch.0, BUILD_TOPICS)
                    .await?;
                batch.after(t.elapsed());
                report.events += out.events;
                report.log_lines += out.log_lines;
                report.queue_messages += out.queue_messages;
                report.builds += out.builds.len() as u64;
                report.local_states += self.forget_local_state(&out.builds).await;
                renew().await?;
                if out.builds.is_empty() {
                    break;
                }
            }
        }
        if let Some(before) = cutoff(now_ms, self.config.events.duration()) {
            loop {
                let t = Instant::now();
                let size = batch.0;
                let n = self.store.prune_events(before, size).await?;
                batch.after(t.elapsed());
                report.events += n;
                renew().await?;
                if n < u64::from(size) {
                    break;
                }
            }
        }
        if let Some(before) = cutoff(now_ms, self.config.dead_letters.duration()) {
            loop {
                let size = batch.0;
                let t = Instant::now();
                let n = self.admin.prune_dead_letters(before, size as usize).await?;
                batch.after(t.elapsed());
                report.dead_letters += n;
                renew().await?;
                if n < u64::from(size) {
                    break;
                }
            }
        }
        // Give freed SQLite pages beyond the reserve back, a bounded
        // number per transaction.
        let mut free = self.store.free_pages().await?;
        while free > VACUUM_KEEP_FREE {
            let pages = (free - VACUUM_KEEP_FREE).min(VACUUM_PAGES);
            let left = self
                .store
                .incremental_vacuum(u32::try_from(pages).unwrap_or(u32::MAX))
                .await?;
            if left >= free {
                break;
            }
            free = left;
        }
        report.oldest_event_seq = self.store.oldest_retained_seq().await?;
        report.database_bytes = self.store.database_size().await?;
        Ok(report)
    }

    /// Deletes the pruned builds' local runner state; counts what went. A
    /// failure is logged and leaves that state for the operator (the build
    /// record is gone already, so nothing retries it).
    async fn forget_local_state(&self, ids: &[BuildId]) -> u64 {
        if ids.is_empty() || self.local_state_dirs.is_empty() {
            return 0;
        }
        let (dirs, ids) = (self.local_state_dirs.clone(), ids.to_vec());
        let forget = move || {
            let mut n = 0;
            for id in &ids {
                for dir in &dirs {
                    match stitch_runners::local::forget_build(dir, id) {
                        Ok(true) => n += 1,
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(build_id = %id, dir = %dir.display(), error = %e, "retention: local state of a pruned build stays")
                        }
                    }
                }
            }
            n
        };
        tokio::task::spawn_blocking(forget)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "retention: forgetting local state failed");
                0
            })
    }
}

/// Starts the background pruner of `stitch serve`: a pass every
/// `[retention] interval` until `stop`; `None` when the interval is off.
pub fn start(state: &AppState, stop: CancellationToken) -> Option<JoinHandle<()>> {
    let every = state.config().retention.interval.duration()?;
    let pruner = Pruner::for_service(state);
    Some(tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let now = chrono::Utc::now().timestamp_millis();
            let pass = tokio::select! {
                _ = stop.cancelled() => return,
                pass = pruner.run_pass(now) => pass,
            };
            match pass {
                Ok(r) if r.lease_held_by.is_some() => {
                    tracing::debug!(holder = ?r.lease_held_by, "retention: another process is pruning")
                }
                Ok(r) => tracing::info!(
                    builds = r.builds,
                    events = r.events,
                    log_lines = r.log_lines,
                    dead_letters = r.dead_letters,
                    local_states = r.local_states,
                    oldest_event_seq = r.oldest_event_seq,
                    "retention pass done"
                ),
                Err(e) => tracing::warn!(error = %e, "retention pass failed; the next one retries"),
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_size_adapts_within_bounds() {
        let mut b = BatchSize(MAX_BATCH);
        b.after(BATCH_BUDGET * 2);
        assert_eq!(b.0, MAX_BATCH / 2);
        for _ in 0..20 {
            b.after(BATCH_BUDGET * 2);
        }
        assert_eq!(b.0, MIN_BATCH);
        b.after(Duration::ZERO);
        assert_eq!(b.0, MIN_BATCH * 2);
        for _ in 0..20 {
            b.after(Duration::ZERO);
        }
        assert_eq!(b.0, MAX_BATCH);
        b.after(BATCH_BUDGET / 2);
        assert_eq!(b.0, MAX_BATCH, "in between: unchanged");
    }

    #[test]
    fn cutoffs_count_back_from_now_and_off_is_none() {
        assert_eq!(cutoff(10_000, Some(Duration::from_secs(3))), Some(7_000));
        assert_eq!(cutoff(10_000, None), None);
    }
}
