//! The in-process fan-out of committed events: one task reads each event
//! from the durable log once, encodes it once, and broadcasts it to every
//! event stream of this process. A stream that falls behind the broadcast
//! (or starts in the past) reads the log itself from its own position, so a
//! slow client lags but never loses or repeats an event.
//!
//! Without it, every commit woke every stream and each ran its own query:
//! with 1,000 subscribers, 1,000 reads and encodings per event.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use stitch_store::{Event, Store, StoreError};
use tokio::sync::{broadcast, watch};

/// Events read per query, by the feed and by streams catching up.
pub(crate) const EVENT_BATCH: u32 = 500;

/// Events the broadcast holds for slow streams before they must catch up
/// from the database.
const FEED_CAPACITY: usize = 4096;

/// How often the feed re-reads the log without a wake-up: events committed
/// by other processes on the same database.
const FEED_RECHECK: Duration = Duration::from_secs(1);

/// One committed event and its JSON encoding, shared by every stream.
#[derive(Debug)]
pub struct FeedEvent {
    /// The event.
    pub event: Event,
    /// `serde_json` encoding of `event`, as sent on the wire.
    pub json: String,
}

impl FeedEvent {
    fn new(event: Event) -> Result<Arc<Self>, StoreError> {
        let json = serde_json::to_string(&event)
            .map_err(|e| StoreError::Internal(format!("cannot encode event: {e}")))?;
        Ok(Arc::new(Self { event, json }))
    }
}

/// Handle to the feed task; the task ends when the commit notifier it
/// watches is dropped (the service state is gone).
pub(crate) struct EventFeed {
    feed: broadcast::Sender<Arc<FeedEvent>>,
}

impl EventFeed {
    /// Starts the feed at the log's current end. `commits` changes whenever
    /// events were committed in this process.
    pub(crate) async fn start(
        store: Store,
        commits: watch::Receiver<u64>,
    ) -> Result<Self, StoreError> {
        Self::with_capacity(store, commits, FEED_CAPACITY).await
    }

    /// The start position is read before the feed exists: a stream can only
    /// subscribe afterwards, so its own first read of the log reaches at
    /// least that position and the feed broadcasts everything after it. (Read
    /// by the task instead, a stream that subscribed first could wait for
    /// events between its read and the feed's start that are never sent.)
    async fn with_capacity(
        store: Store,
        commits: watch::Receiver<u64>,
        capacity: usize,
    ) -> Result<Self, StoreError> {
        let after = store.latest_seq().await?;
        let (feed, _) = broadcast::channel(capacity);
        tokio::spawn(run(store, commits, feed.clone(), after));
        Ok(Self { feed })
    }

    /// Every event with `seq > after`, forever, in order: from the database
    /// until caught up, then from the broadcast. Ends after reporting a
    /// store error, or when the service shuts down.
    pub(crate) fn stream(
        &self,
        store: Store,
        after: u64,
    ) -> BoxStream<'static, Result<Arc<FeedEvent>, StoreError>> {
        // Subscribed before the first read: whatever that read misses is
        // committed later, so it reaches the broadcast after this point.
        let tail = Tail {
            feed: self.feed.subscribe(),
            store,
            after,
            ready: VecDeque::new(),
            from_database: true,
            failed: false,
        };
        futures::stream::unfold(tail, Tail::next).boxed()
    }
}

async fn run(
    store: Store,
    mut commits: watch::Receiver<u64>,
    feed: broadcast::Sender<Arc<FeedEvent>>,
    mut after: u64,
) {
    loop {
        // Mark the notification seen before reading, so a commit after the
        // read wakes the wait below.
        let _ = commits.borrow_and_update();
        if let Some(seq) = position_if_unwatched(&store, &feed).await {
            // Nobody listens: keep the position current without reading events.
            after = after.max(seq);
        } else {
            match store.events_after(after, EVENT_BATCH).await {
                Ok(batch) => {
                    let full = batch.len() == EVENT_BATCH as usize;
                    for event in batch {
                        after = event.seq;
                        match FeedEvent::new(event) {
                            // No receivers left is fine; they catch up from the log.
                            Ok(item) => drop(feed.send(item)),
                            Err(e) => tracing::error!(error = %e, "event feed: skipping an event"),
                        }
                    }
                    if full {
                        continue;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "event feed: reading the log failed; retrying")
                }
            }
        }
        tokio::select! {
            changed = commits.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(FEED_RECHECK) => {}
        }
    }
}

/// The log's end, if no stream listened from before reading it until after.
/// A stream that subscribes later reads the database itself after
/// subscribing, so it sees at least up to this position and the feed may
/// skip to it; one that subscribed meanwhile makes the feed read normally.
async fn position_if_unwatched(
    store: &Store,
    feed: &broadcast::Sender<Arc<FeedEvent>>,
) -> Option<u64> {
    if feed.receiver_count() > 0 {
        return None;
    }
    let seq = store.latest_seq().await.ok()?;
    (feed.receiver_count() == 0).then_some(seq)
}

struct Tail {
    feed: broadcast::Receiver<Arc<FeedEvent>>,
    store: Store,
    after: u64,
    ready: VecDeque<Arc<FeedEvent>>,
    /// Read the database next: at the start, after a gap, after lagging.
    from_database: bool,
    failed: bool,
}

impl Tail {
    async fn next(mut self) -> Option<(Result<Arc<FeedEvent>, StoreError>, Self)> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                // Never go backwards or repeat.
                if item.event.seq <= self.after {
                    continue;
                }
                self.after = item.event.seq;
                return Some((Ok(item), self));
            }
            if self.failed {
                return None;
            }
            if self.from_database {
                let batch = match self.store.events_after(self.after, EVENT_BATCH).await {
                    Ok(batch) => batch,
                    Err(e) => {
                        self.failed = true;
                        return Some((Err(e), self));
                    }
                };
                // Retention deleted what this stream had not read yet:
                // skipping it silently would break the no-gap promise.
                if let Some(first) = batch.first() {
                    if first.seq > self.after.saturating_add(1) {
                        self.failed = true;
                        let err = StoreError::EventsPruned {
                            after: self.after,
                            oldest: first.seq,
                        };
                        return Some((Err(err), self));
                    }
                }
                self.from_database = batch.len() == EVENT_BATCH as usize;
                for event in batch {
                    match FeedEvent::new(event) {
                        Ok(item) => self.ready.push_back(item),
                        Err(e) => {
                            self.failed = true;
                            return Some((Err(e), self));
                        }
                    }
                }
                continue;
            }
            match self.feed.recv().await {
                Ok(item) if item.event.seq <= self.after => {}
                Ok(item) if item.event.seq == self.after + 1 => self.ready.push_back(item),
                // A gap: what lies between is in the database.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => self.from_database = true,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stitch_core::BuildId;
    use stitch_store::NewBuild;

    struct Log {
        store: Store,
        commits: watch::Sender<u64>,
        _dir: tempfile::TempDir,
    }

    impl Log {
        async fn open() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("feed.db")).await.unwrap();
            Self {
                store,
                commits: watch::channel(0).0,
                _dir: dir,
            }
        }

        /// Commits one event (a build's creation) and wakes the feed.
        async fn commit(&self) {
            self.store
                .create_build(NewBuild {
                    id: BuildId::new(),
                    queue: "q".into(),
                    runner: "noop".into(),
                    base: vec![],
                    head: vec!["h".into()],
                    metadata: Default::default(),
                    idempotency_key: None,
                    job_token_hash: None,
                })
                .await
                .unwrap();
            self.commits.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    async fn take(
        stream: &mut BoxStream<'static, Result<Arc<FeedEvent>, StoreError>>,
        n: usize,
    ) -> Vec<u64> {
        let mut seqs = Vec::with_capacity(n);
        while seqs.len() < n {
            let item = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("an event within 10 s")
                .expect("the stream goes on")
                .expect("no store error");
            assert_eq!(item.json, serde_json::to_string(&item.event).unwrap());
            seqs.push(item.event.seq);
        }
        seqs
    }

    /// A stream that falls further behind than the broadcast holds catches
    /// up from the database: every event once, in order.
    #[tokio::test]
    async fn a_stream_that_lags_past_the_broadcast_catches_up_from_the_log() {
        let log = Log::open().await;
        let feed = EventFeed::with_capacity(log.store.clone(), log.commits.subscribe(), 4)
            .await
            .unwrap();
        let mut stream = feed.stream(log.store.clone(), 0);
        log.commit().await;
        assert_eq!(take(&mut stream, 1).await, vec![1]);
        for _ in 0..40 {
            log.commit().await;
        }
        assert_eq!(take(&mut stream, 40).await, (2..=41).collect::<Vec<_>>());
    }

    /// A stream whose next events were deleted by retention ends with
    /// `EventsPruned` instead of skipping them.
    #[tokio::test]
    async fn a_stream_behind_retention_ends_with_events_pruned() {
        let log = Log::open().await;
        let feed = EventFeed::with_capacity(log.store.clone(), log.commits.subscribe(), 4)
            .await
            .unwrap();
        for _ in 0..5 {
            log.commit().await;
        }
        let mut behind = feed.stream(log.store.clone(), 1);
        let mut current = feed.stream(log.store.clone(), 3);
        let far_future = chrono::Utc::now().timestamp_millis() + 1_000_000;
        // Only the first three go: a batch of 3.
        assert_eq!(log.store.prune_events(far_future, 3).await.unwrap(), 3);
        match behind.next().await {
            Some(Err(StoreError::EventsPruned {
                after: 1,
                oldest: 4,
            })) => {}
            other => panic!("expected EventsPruned, got {other:?}"),
        }
        assert!(behind.next().await.is_none(), "the stream ended");
        assert_eq!(take(&mut current, 2).await, vec![4, 5]);
    }

    /// Streams that start while events are being committed — each from the
    /// position it read — see a gapless run of every later event exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_started_during_commits_miss_and_repeat_nothing() {
        let log = Arc::new(Log::open().await);
        let feed = Arc::new(
            EventFeed::with_capacity(log.store.clone(), log.commits.subscribe(), 64)
                .await
                .unwrap(),
        );
        let total = 300u64;
        let writer = {
            let log = log.clone();
            tokio::spawn(async move {
                for _ in 0..total {
                    log.commit().await;
                }
            })
        };
        let mut readers = Vec::new();
        for i in 0..20u64 {
            let (log, feed) = (log.clone(), feed.clone());
            readers.push(tokio::spawn(async move {
                // Start at staggered moments, from wherever the log is then.
                tokio::task::yield_now().await;
                for _ in 0..i {
                    tokio::task::yield_now().await;
                }
                let from = log.store.latest_seq().await.unwrap();
                let mut stream = feed.stream(log.store.clone(), from);
                let seqs = take(&mut stream, (total - from) as usize).await;
                assert_eq!(seqs, (from + 1..=total).collect::<Vec<_>>());
            }));
        }
        writer.await.unwrap();
        for r in readers {
            r.await.unwrap();
        }
    }
}
