//! What a vendor runner remembers, in this process, of the builds it
//! triggered: [`TriggerBook`] (the provider ref each stitch build was
//! triggered as, and one trigger at a time per build) over [`BuildCache`]
//! (a bounded map keyed by stitch build id, also used for a runner's other
//! per-build facts).
//!
//! Everything here is a cache: the provider is the record, and a runner
//! that forgets (a restart, a cache cleared at its limit) finds the build
//! again by its lookup. That is why a full cache is simply cleared rather
//! than evicted entry by entry: the cost of forgetting is one lookup.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use stitch_core::{BuildId, RunnerRef};

/// Entries a [`BuildCache`] keeps before it is cleared.
pub const CACHE_LIMIT: usize = 50_000;

/// A poisoned lock only means another task panicked mid-update of a
/// cache; the cache is still usable, at worst missing that entry.
fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A map from stitch build id to what a runner learnt of the build,
/// cleared whole once it holds its limit (see the module docs).
#[derive(Debug)]
pub struct BuildCache<V> {
    limit: usize,
    map: Mutex<HashMap<BuildId, V>>,
}

impl<V> Default for BuildCache<V> {
    fn default() -> Self {
        Self::with_limit(CACHE_LIMIT)
    }
}

impl<V> BuildCache<V> {
    /// An empty cache of [`CACHE_LIMIT`] entries.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty cache cleared once it holds `limit` entries.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            limit,
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<V: Clone> BuildCache<V> {
    /// What is remembered for `id`.
    pub fn get(&self, id: &BuildId) -> Option<V> {
        locked(&self.map).get(id).cloned()
    }

    /// Remembers `value` for `id` (clearing the cache first if it is full).
    pub fn insert(&self, id: &BuildId, value: V) {
        self.update(id, |_| value);
    }

    /// Remembers `f(what is remembered now)` for `id`, in one step, so no
    /// other write comes between the read and the write. A full cache is
    /// cleared first, so `f` then sees `None`.
    pub fn update(&self, id: &BuildId, f: impl FnOnce(Option<&V>) -> V) {
        let mut map = locked(&self.map);
        if map.len() >= self.limit {
            map.clear();
        }
        let value = f(map.get(id));
        map.insert(id.clone(), value);
    }

    /// Forgets `id`.
    pub fn remove(&self, id: &BuildId) {
        locked(&self.map).remove(id);
    }
}

/// Which provider ref each stitch build was triggered as (or found as),
/// and one trigger at a time per build.
///
/// A vendor runner's `trigger` holds [`TriggerBook::lock`] for the build
/// while it looks the build up and creates it, so two concurrent triggers
/// of one id in this process (a redelivery racing the first delivery)
/// cannot both create: the second waits, then finds the first one's ref
/// with [`TriggerBook::cached`].
#[derive(Debug, Default)]
pub struct TriggerBook {
    refs: BuildCache<RunnerRef>,
    /// One lock per build being triggered; an entry nobody holds is
    /// dropped on the next [`TriggerBook::lock`], so the map stays as
    /// small as the triggers in flight.
    triggering: Mutex<HashMap<BuildId, Arc<tokio::sync::Mutex<()>>>>,
}

impl TriggerBook {
    /// An empty book whose refs cache holds [`CACHE_LIMIT`] entries.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty book whose refs cache is cleared at `limit` entries.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            refs: BuildCache::with_limit(limit),
            triggering: Mutex::new(HashMap::new()),
        }
    }

    /// The ref remembered for `id`, if this process triggered or found it
    /// (and has not cleared it since).
    pub fn cached(&self, id: &BuildId) -> Option<RunnerRef> {
        self.refs.get(id)
    }

    /// Remembers that `id` is the provider's `r`.
    pub fn remember(&self, id: &BuildId, r: &RunnerRef) {
        self.refs.insert(id, r.clone());
    }

    /// Waits until no other trigger of `id` in this process holds the
    /// build, then holds it until the guard is dropped.
    pub async fn lock(&self, id: &BuildId) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = locked(&self.triggering);
            // A lock only the map holds is nobody's: neither held nor
            // waited for.
            map.retain(|_, lock| Arc::strong_count(lock) > 1);
            map.entry(id.clone()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// `n` distinct build ids.
    fn ids(n: usize) -> Vec<BuildId> {
        (0..n).map(|_| BuildId::new()).collect()
    }

    #[test]
    fn a_cache_remembers_until_it_reaches_its_limit_then_starts_over() {
        let id = ids(4);
        let book = TriggerBook::with_limit(3);
        for (n, id) in id[..3].iter().enumerate() {
            book.remember(id, &RunnerRef::new(n.to_string()));
        }
        for (n, id) in id[..3].iter().enumerate() {
            assert_eq!(book.cached(id).map(|r| r.id), Some(n.to_string()));
        }
        // The fourth entry finds the cache full: it is cleared, then holds
        // only the newcomer.
        book.remember(&id[3], &RunnerRef::new("3"));
        assert_eq!(book.cached(&id[3]).map(|r| r.id), Some("3".into()));
        for (n, id) in id[..3].iter().enumerate() {
            assert_eq!(book.cached(id), None, "build {n} kept");
        }
    }

    #[test]
    fn a_cache_updates_in_one_step_and_forgets() {
        let id = ids(3);
        let cache: BuildCache<u32> = BuildCache::with_limit(2);
        cache.insert(&id[0], 1);
        cache.update(&id[0], |old| old.copied().unwrap_or(0) + 10);
        assert_eq!(cache.get(&id[0]), Some(11));
        cache.remove(&id[0]);
        assert_eq!(cache.get(&id[0]), None);
        // A full cache is cleared before the update reads it.
        cache.insert(&id[1], 1);
        cache.insert(&id[2], 2);
        cache.update(&id[1], |old| {
            assert_eq!(old, None);
            5
        });
        assert_eq!(cache.get(&id[1]), Some(5));
        assert_eq!(cache.get(&id[2]), None);
    }

    #[tokio::test]
    async fn one_trigger_at_a_time_per_build_and_builds_apart() {
        let id = ids(3);
        let book = TriggerBook::new();
        let held = book.lock(&id[1]).await;
        // Another build is not held up by build 1.
        let other = tokio::time::timeout(Duration::from_secs(5), book.lock(&id[2])).await;
        assert!(other.is_ok(), "build 2 waited for build 1's lock");
        // Build 1 again waits while its lock is held ...
        let mut second = Box::pin(book.lock(&id[1]));
        assert!(futures::poll!(second.as_mut()).is_pending());
        // ... and gets it once the holder lets go.
        drop(held);
        let again = tokio::time::timeout(Duration::from_secs(5), second).await;
        assert!(again.is_ok(), "build 1's lock was not handed on");
    }

    #[tokio::test]
    async fn locks_nobody_holds_are_dropped() {
        let book = TriggerBook::new();
        let id = ids(11);
        for id in &id[..10] {
            drop(book.lock(id).await);
        }
        let _held = book.lock(&id[10]).await;
        assert_eq!(locked(&book.triggering).len(), 1);
    }
}
