//! Retention: pruning builds and events in bounded batches, the gapless
//! retained event log, the one-holder lease, and a pass racing with live
//! writers — one suite, run against SQLite, PostgreSQL and MySQL/MariaDB.
//! Ages are written into the rows (`finished_at`, `at`), never waited for.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::{keyed, new_build, TestDb};
use stitch_core::{BuildId, BuildStatus};
use stitch_store::{Metadata, NewBuild, Prunable, StoreError};

const DAY: i64 = 24 * 3600 * 1000;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn finish(db: &TestDb, id: &BuildId, finished_at: i64) {
    db.store
        .record_status(id, None, BuildStatus::Succeeded, &Metadata::new(), None)
        .await
        .unwrap();
    db.exec(&format!(
        "UPDATE builds SET finished_at = {finished_at} WHERE id = '{id}'"
    ))
    .await;
}

async fn create(db: &TestDb, new: NewBuild) -> BuildId {
    let id = new.id.clone();
    db.store.create_build(new).await.unwrap();
    db.store
        .append_log_lines(&id, &["one".to_string(), "two".to_string()])
        .await
        .unwrap();
    id
}

async fn seqs(db: &TestDb) -> Vec<u64> {
    db.store
        .events_after(0, 10_000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect()
}

/// The retained events are one run of seqs without a hole, ending at the
/// newest event.
async fn assert_gapless_suffix(db: &TestDb) {
    let seqs = seqs(db).await;
    let latest = db.store.latest_seq().await.unwrap();
    let oldest = db.store.oldest_retained_seq().await.unwrap();
    assert_eq!(seqs, (oldest..=latest).collect::<Vec<_>>());
}

/// Exactly the builds terminal for longer than the window go (one per call
/// with `limit = 1`), with their log lines, events (and every older event)
/// and idempotency keys; newer terminal builds and live builds stay.
async fn prune_builds_removes_exactly_the_older_terminal_builds(db: TestDb) {
    let now = now_ms();
    let cutoff = now - 30 * DAY;
    let old_a = create(
        &db,
        NewBuild {
            job_token_hash: Some("sha256:old".into()),
            ..keyed("app", "old-key")
        },
    )
    .await;
    let live_old = create(&db, new_build("app")).await;
    let old_b = create(&db, new_build("app")).await;
    let young = create(&db, new_build("app")).await;
    let live = create(&db, new_build("app")).await;
    finish(&db, &old_a, cutoff - DAY).await;
    finish(&db, &old_b, cutoff - 1).await;
    finish(&db, &young, cutoff + 1).await;
    // A live build created long ago is never pruned.
    db.exec(&format!(
        "UPDATE builds SET created_at = {}, updated_at = {} WHERE id = '{live_old}'",
        cutoff - 10 * DAY,
        cutoff - 10 * DAY
    ))
    .await;

    let preview = db.store.prunable(Some(cutoff), None).await.unwrap();
    let events_of_old_b = db.store.events_for_build(&old_b).await.unwrap();
    let through = events_of_old_b.last().unwrap().seq;
    assert_eq!(
        preview,
        Prunable {
            builds: 2,
            log_lines: 4,
            events: through,
        }
    );
    // The preview changed nothing.
    assert_eq!(
        db.store.prunable(Some(cutoff), None).await.unwrap(),
        preview
    );
    assert!(db.store.get_build(&old_a).await.is_ok());

    let first = db.store.prune_builds(cutoff, 1).await.unwrap();
    assert_eq!(first.builds, vec![old_a.clone()], "the oldest goes first");
    assert_eq!(first.log_lines, 2);
    let second = db.store.prune_builds(cutoff, 1).await.unwrap();
    assert_eq!(second.builds, vec![old_b.clone()]);
    assert_eq!(first.events + second.events, through);
    let third = db.store.prune_builds(cutoff, 1).await.unwrap();
    assert!(third.builds.is_empty(), "{third:?}");
    assert_eq!((third.events, third.log_lines), (0, 0));

    for gone in [&old_a, &old_b] {
        assert!(matches!(
            db.store.get_build(gone).await,
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            db.store.log_lines(gone, 0, 10).await,
            Err(StoreError::NotFound(_))
        ));
    }
    for kept in [&live_old, &young, &live] {
        db.store.get_build(kept).await.unwrap();
        assert_eq!(db.store.log_lines(kept, 0, 10).await.unwrap().len(), 2);
    }
    assert_eq!(
        db.ints("SELECT COUNT(*) FROM log_lines").await,
        vec![6],
        "only the pruned builds' lines went"
    );
    assert_gapless_suffix(&db).await;
    assert_eq!(db.store.oldest_retained_seq().await.unwrap(), through + 1);
    // The idempotency key is free again: the same key creates a new build.
    let again = db
        .store
        .create_build(keyed("app", "old-key"))
        .await
        .unwrap();
    assert!(again.is_created());
    assert_eq!(
        db.store.prunable(Some(cutoff), None).await.unwrap(),
        Prunable::default()
    );
}

/// Events go oldest first, only while they are older than the cutoff (an
/// old event behind a newer one stays), `limit` per call; what is retained
/// is gapless, and a position inside the pruned part is reported.
async fn prune_events_keeps_a_gapless_suffix(db: TestDb) {
    for _ in 0..6 {
        db.store.create_build(new_build("app")).await.unwrap();
    }
    let now = now_ms();
    let cutoff = now - 7 * DAY;
    for (seq, at) in [
        (1, cutoff - 5 * DAY),
        (2, cutoff - 4 * DAY),
        (3, cutoff - 1),
        (4, cutoff),
        (5, cutoff - DAY),
        (6, now),
    ] {
        db.exec(&format!("UPDATE events SET at = {at} WHERE seq = {seq}"))
            .await;
    }
    assert_eq!(
        db.store.prunable(None, Some(cutoff)).await.unwrap().events,
        3
    );
    assert_eq!(db.store.prune_events(cutoff, 2).await.unwrap(), 2);
    assert_eq!(seqs(&db).await, [3, 4, 5, 6]);
    assert_eq!(db.store.prune_events(cutoff, 2).await.unwrap(), 1);
    assert_eq!(db.store.prune_events(cutoff, 2).await.unwrap(), 0);
    assert_eq!(seqs(&db).await, [4, 5, 6], "nothing at or after the cutoff");
    assert_gapless_suffix(&db).await;
    assert_eq!(db.store.oldest_retained_seq().await.unwrap(), 4);

    assert!(matches!(
        db.store.check_events_position(2).await,
        Err(StoreError::EventsPruned {
            after: 2,
            oldest: 4
        })
    ));
    db.store.check_events_position(3).await.unwrap();
    db.store.check_events_position(6).await.unwrap();
    // The builds themselves are untouched by event retention.
    assert_eq!(db.ints("SELECT COUNT(*) FROM builds").await, vec![6]);

    // Every event pruned: the oldest retained is the next to be written.
    db.store.prune_events(now + DAY, 100).await.unwrap();
    assert!(seqs(&db).await.is_empty());
    assert_eq!(db.store.oldest_retained_seq().await.unwrap(), 7);
    db.store.check_events_position(6).await.unwrap();
    assert!(db.store.check_events_position(0).await.is_err());
    db.store.create_build(new_build("app")).await.unwrap();
    assert_eq!(
        seqs(&db).await,
        [7],
        "numbering goes on after the pruned part"
    );
}

/// The lease: one owner at a time, renewable by its owner, free once it
/// expired or was released; time is the caller's. Two stores on their own
/// pools stand for two processes.
async fn the_lease_has_one_holder_at_a_time(db: TestDb) {
    let a = db.store.clone();
    let b = db.another_store("other-process").await;
    const TTL: i64 = 60_000;
    assert_eq!(a.lease_holder("retention", 1_000).await.unwrap(), None);
    assert!(a
        .try_lease("retention", "node-a", 1_000, TTL)
        .await
        .unwrap());
    assert!(!b
        .try_lease("retention", "node-b", 2_000, TTL)
        .await
        .unwrap());
    assert_eq!(
        b.lease_holder("retention", 2_000).await.unwrap().as_deref(),
        Some("node-a")
    );
    // Renewed by its holder (also at the same instant).
    assert!(a
        .try_lease("retention", "node-a", 3_000, TTL)
        .await
        .unwrap());
    assert!(a
        .try_lease("retention", "node-a", 3_000, TTL)
        .await
        .unwrap());
    assert!(!b
        .try_lease("retention", "node-b", 3_000 + TTL - 1, TTL)
        .await
        .unwrap());
    // Expired: taken over.
    assert!(b
        .try_lease("retention", "node-b", 3_000 + TTL, TTL)
        .await
        .unwrap());
    assert!(!a
        .try_lease("retention", "node-a", 3_001 + TTL, TTL)
        .await
        .unwrap());
    // A release by a non-holder does nothing; the holder's frees it.
    a.release_lease("retention", "node-a").await.unwrap();
    assert!(!a
        .try_lease("retention", "node-a", 3_002 + TTL, TTL)
        .await
        .unwrap());
    b.release_lease("retention", "node-b").await.unwrap();
    assert!(a
        .try_lease("retention", "node-a", 3_003 + TTL, TTL)
        .await
        .unwrap());
    assert!(matches!(
        a.try_lease("retention", "", 0, TTL).await,
        Err(StoreError::InvalidInput(_))
    ));
}

/// A pruning loop with a cutoff in the future (every terminal build and
/// every event counts as old) racing with creates and status updates: no
/// live build is lost, every finished build the pass saw went whole, and
/// the retained events stay gapless.
async fn pruning_racing_with_writers_loses_no_live_build(db: TestDb) {
    let store = db.store.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut live = Vec::new();
            let mut finished = Vec::new();
            for i in 0..120 {
                let new = new_build("app");
                let id = new.id.clone();
                store.create_build(new).await.unwrap();
                store
                    .append_log_lines(&id, &[format!("line {i}")])
                    .await
                    .unwrap();
                if i % 2 == 0 {
                    store
                        .record_status(&id, None, BuildStatus::Running, &Metadata::new(), None)
                        .await
                        .unwrap();
                    live.push(id);
                } else {
                    store
                        .record_status(&id, None, BuildStatus::Failed, &Metadata::new(), None)
                        .await
                        .unwrap();
                    finished.push(id);
                }
            }
            (live, finished)
        })
    };
    let pruner = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let mut passes = 0u32;
            let mut pruned = BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) || passes == 0 {
                let cutoff = now_ms() + DAY;
                store.prune_events(cutoff, 7).await.unwrap();
                let out = store.prune_builds(cutoff, 5).await.unwrap();
                pruned.extend(out.builds);
                passes += 1;
            }
            (passes, pruned)
        })
    };
    let (live, finished) = writer.await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (passes, pruned) = pruner.await.unwrap();
    assert!(passes >= 1);
    for id in &live {
        let b = store.get_build(id).await.unwrap();
        assert_eq!(b.status, BuildStatus::Running, "{id} kept its state");
        assert_eq!(store.log_lines(id, 0, 10).await.unwrap().len(), 1);
        assert!(!pruned.contains(id));
    }
    for id in &pruned {
        assert!(finished.contains(id), "only finished builds are pruned");
        assert!(matches!(
            store.get_build(id).await,
            Err(StoreError::NotFound(_))
        ));
    }
    // One more pass after the writers stopped finishes the job.
    loop {
        let cutoff = now_ms() + DAY;
        let out = store.prune_builds(cutoff, 50).await.unwrap();
        if out.builds.is_empty() {
            break;
        }
    }
    let remaining: BTreeSet<String> = db
        .strings("SELECT id FROM builds")
        .await
        .into_iter()
        .collect();
    let live_ids: BTreeSet<String> = live.iter().map(|id| id.to_string()).collect();
    assert_eq!(remaining, live_ids);
    assert_gapless_suffix(&db).await;
}

crate::store_suite!(
    prune_builds_removes_exactly_the_older_terminal_builds,
    prune_events_keeps_a_gapless_suffix,
    the_lease_has_one_holder_at_a_time,
    pruning_racing_with_writers_loses_no_live_build,
);

/// SQLite: a new file uses incremental auto-vacuum, and after pruning the
/// freed pages go back to the file system (the file shrinks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_gives_freed_pages_back_after_pruning() {
    let db = common::open_sqlite().await;
    assert_eq!(db.ints("PRAGMA auto_vacuum").await, vec![2], "INCREMENTAL");
    let line = "x".repeat(2000);
    let mut ids = Vec::new();
    for _ in 0..40 {
        let new = new_build("app");
        ids.push(new.id.clone());
        db.store.create_build(new).await.unwrap();
        let lines: Vec<String> = (0..20).map(|_| line.clone()).collect();
        db.store
            .append_log_lines(&ids[ids.len() - 1], &lines)
            .await
            .unwrap();
    }
    for id in &ids {
        finish(&db, id, 1).await;
    }
    let before = db.ints("PRAGMA page_count").await[0];
    let size_before = db.store.database_size().await.unwrap().unwrap();
    while !db
        .store
        .prune_builds(2, 10)
        .await
        .unwrap()
        .builds
        .is_empty()
    {}
    let free = db.ints("PRAGMA freelist_count").await[0];
    assert!(free > 0);
    assert_eq!(db.store.free_pages().await.unwrap(), free as u64);
    let free_left = db.store.incremental_vacuum(1_000_000).await.unwrap();
    assert_eq!(free_left, 0);
    assert_eq!(db.store.free_pages().await.unwrap(), 0);
    let after = db.ints("PRAGMA page_count").await[0];
    assert!(after * 4 < before, "pages {before} → {after}");
    assert!(db.store.database_size().await.unwrap().unwrap() < size_before);
}
