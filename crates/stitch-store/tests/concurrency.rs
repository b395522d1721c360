//! Several store handles on one database — each with its own pool and
//! group committer, as separate `stitch serve` processes would have —
//! writing at once. Run against SQLite, PostgreSQL and MySQL/MariaDB; on the
//! servers this is the case the `event_seq` lock exists for (ADR 0009).

mod common;

use std::collections::BTreeSet;

use common::{keyed, meta, new_build, TestDb};
use stitch_core::BuildStatus;
use stitch_store::{BuildFilter, Store};
use tokio::sync::watch;

const WRITERS: usize = 4;
const ROUNDS: usize = 25;

/// One writer's work: builds created and changed through group-committed
/// writes and explicit transactions, every third transaction rolled back.
/// Returns how many events it committed.
async fn write_events(store: Store, writer: usize) -> u64 {
    let mut committed = 0;
    let id = store
        .create_build(new_build("app"))
        .await
        .unwrap()
        .into_build()
        .id;
    committed += 1;
    for round in 0..ROUNDS {
        let patch = meta(&[("round", &format!("{writer}-{round}"))]);
        if round % 2 == 0 {
            store
                .record_status(&id, None, BuildStatus::Running, &patch, None)
                .await
                .unwrap()
                .unwrap();
            committed += 1;
        } else {
            let mut tx = store.begin().await.unwrap();
            tx.record_status(&id, None, BuildStatus::Running, &patch, None)
                .await
                .unwrap()
                .unwrap();
            tx.create_build(new_build("side")).await.unwrap();
            if (round + writer) % 3 == 0 {
                tx.rollback().await.unwrap();
            } else {
                tx.commit().await.unwrap();
                committed += 2;
            }
        }
    }
    committed
}

/// Writers on separate handles commit events while a reader follows the log
/// with `events_after` from the last seq it saw: the reader sees every seq
/// exactly once, in order, with no gap at any moment, and the final log is
/// 1..=N.
async fn separate_stores_commit_gapless_seqs_that_readers_never_skip(db: TestDb) {
    let mut stores = Vec::new();
    for w in 0..WRITERS {
        stores.push(db.another_store(&format!("writer-{w}")).await);
    }
    let reader_store = db.another_store("reader").await;
    let (done_tx, done_rx) = watch::channel(false);
    let reader = tokio::spawn(async move {
        let mut last = 0u64;
        let mut seen = 0u64;
        loop {
            // Read the flag before the log: once it is set, one more read
            // sees everything committed.
            let finished = *done_rx.borrow();
            let events = reader_store.events_after(last, 50).await.unwrap();
            for e in &events {
                assert_eq!(
                    e.seq,
                    last + 1,
                    "the reader skipped from {last} to {}",
                    e.seq
                );
                last = e.seq;
                seen += 1;
            }
            if events.is_empty() {
                if finished {
                    return (last, seen);
                }
                tokio::task::yield_now().await;
            }
        }
    });

    let writers: Vec<_> = stores
        .into_iter()
        .enumerate()
        .map(|(w, store)| tokio::spawn(write_events(store, w)))
        .collect();
    let mut committed = 0;
    for w in writers {
        committed += w.await.unwrap();
    }
    done_tx.send(true).unwrap();
    let (last, seen) = reader.await.unwrap();

    assert_eq!(last, committed);
    assert_eq!(seen, committed);
    assert_eq!(db.store.latest_seq().await.unwrap(), committed);
    let seqs: Vec<u64> = db
        .store
        .events_after(0, u32::MAX)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=committed).collect::<Vec<_>>());
}

/// Creates with one idempotency key race on separate handles: exactly one
/// build exists and every caller gets it.
async fn separate_stores_creating_one_key_make_one_build(db: TestDb) {
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = db.another_store(&format!("creator-{w}")).await;
        for _ in 0..4 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store.create_build(keyed("app", "race")).await.unwrap()
            }));
        }
    }
    let mut created = 0;
    let mut ids = BTreeSet::new();
    for task in tasks {
        let outcome = task.await.unwrap();
        created += usize::from(outcome.is_created());
        ids.insert(outcome.build().id.clone());
    }
    assert_eq!(created, 1);
    assert_eq!(ids.len(), 1);
    let (all, _) = db
        .store
        .list_builds(&BuildFilter::default(), None)
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(db.store.latest_seq().await.unwrap(), 1);
}

store_suite!(
    separate_stores_commit_gapless_seqs_that_readers_never_skip,
    separate_stores_creating_one_key_make_one_build,
);
