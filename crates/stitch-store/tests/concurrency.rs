//! Several store handles on one database — each with its own pool and
//! group committer, as separate `stitch serve` processes would have —
//! writing at once. Run against SQLite, PostgreSQL and MySQL/MariaDB; on the
//! servers this is the case the `event_seq` counter exists for (ADR 0009,
//! ADR 0016), taken there by the sequencing pass after writers commit
//! (ADR 0020).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{exec_on, keyed, meta, new_build, TestDb};
use stitch_core::BuildStatus;
use stitch_store::{BackendKind, BuildFilter, Store};
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
            assert!(store
                .record_status(&id, None, BuildStatus::Running, &patch, None)
                .await
                .unwrap());
            committed += 1;
        } else {
            let mut tx = store.begin().await.unwrap();
            assert!(tx
                .record_status(&id, None, BuildStatus::Running, &patch, None)
                .await
                .unwrap());
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

/// An open write transaction on one handle does not hold up another
/// handle's writes to other builds (PostgreSQL/MySQL; SQLite has one writer
/// by design): the counter is taken only for the commit. Seqs still follow
/// commit order: the write that committed first has the lower seq.
async fn an_open_transaction_does_not_hold_up_writers_of_other_builds(db: TestDb) {
    if db.kind() == BackendKind::Sqlite {
        return;
    }
    let [a, b]: [_; 2] = db.create_builds(2).await.try_into().unwrap();
    let other = db.another_store("other").await;

    let mut tx = db.store.begin().await.unwrap();
    assert!(tx
        .record_status(&a, None, BuildStatus::Running, &meta(&[]), None)
        .await
        .unwrap());
    // Before ADR 0016 this waited for `tx` to commit, which never came: the
    // bound only turns that hang into a failure.
    let written = tokio::time::timeout(
        Duration::from_secs(60),
        other.record_status(&b, None, BuildStatus::Running, &meta(&[]), None),
    )
    .await
    .expect("a write to another build waited for an open transaction");
    assert!(written.unwrap());
    assert_eq!(other.latest_seq().await.unwrap(), 3);
    tx.commit().await.unwrap();

    let order: Vec<_> = db
        .store
        .events_after(0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.build_id, e.status))
        .collect();
    assert_eq!(
        order,
        vec![
            (1, a.clone(), BuildStatus::Accepted),
            (2, b.clone(), BuildStatus::Accepted),
            (3, b, BuildStatus::Running),
            (4, a, BuildStatus::Running),
        ]
    );
}

/// Two handles' group commits write the same two builds in opposite orders,
/// many times over: batches run their jobs in build order, so they never
/// deadlock (a deadlock would fail a write with a retryable error).
async fn crossing_writes_of_two_handles_never_deadlock(db: TestDb) {
    let [a, b]: [_; 2] = db.create_builds(2).await.try_into().unwrap();
    let other = db.another_store("other").await;
    let mut tasks = Vec::new();
    for round in 0..40 {
        for (store, first, second) in [
            (db.store.clone(), a.clone(), b.clone()),
            (other.clone(), b.clone(), a.clone()),
        ] {
            tasks.push(tokio::spawn(async move {
                let patch = meta(&[("round", &round.to_string())]);
                let line = [format!("{round}")];
                let runner_ref = stitch_core::RunnerRef::new(format!("r{round}"));
                let (x, y) = tokio::join!(
                    store.append_log_lines(&first, &line),
                    store.set_runner_ref(&second, &runner_ref),
                );
                x.unwrap();
                y.unwrap();
                store
                    .record_status(&first, None, BuildStatus::Running, &patch, None)
                    .await
                    .unwrap();
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    let events = db.store.events_after(0, u32::MAX).await.unwrap();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
}

/// A write that arrives while the store's committer is inside a batch is
/// taken by another of the store's committers at once, not after that batch
/// (PostgreSQL/MySQL; SQLite has one writer by design). The first write
/// here blocks its committer until the second has committed: with one
/// committer the second would wait behind it for ever.
async fn a_write_does_not_wait_for_a_batch_in_progress(db: TestDb) {
    if db.kind() == BackendKind::Sqlite {
        return;
    }
    let [a, b]: [_; 2] = db.create_builds(2).await.try_into().unwrap();
    let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let first = {
        let (store, a) = (db.store.clone(), a.clone());
        tokio::spawn(async move {
            store
                .write_build(&a.clone(), move |w| {
                    let _ = started_tx.send(());
                    // Blocks this committer's thread (jobs run outside any
                    // runtime) until the test has seen the second write.
                    let _ = released.recv();
                    w.record_status(&a, None, BuildStatus::Running, &meta(&[]), None)
                })
                .await
        })
    };
    started.await.expect("the first write started");
    // The bound only turns a hang behind the blocked batch into a failure.
    let second = tokio::time::timeout(
        Duration::from_secs(60),
        db.store
            .record_status(&b, None, BuildStatus::Running, &meta(&[]), None),
    )
    .await
    .expect("a write waited for the batch in progress");
    assert!(second.unwrap());
    release.send(()).unwrap();
    assert!(first.await.unwrap().unwrap());
    let order: Vec<_> = db
        .store
        .events_after(2, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.build_id))
        .collect();
    assert_eq!(order, vec![(3, b), (4, a)]);
}

/// Told when the store announces appended events.
struct EventsAnnounced(watch::Sender<u64>);

impl stitch_store::CommitListener for EventsAnnounced {
    fn committed(&self, what: &stitch_store::Committed) {
        if what.events {
            self.0.send_modify(|n| *n += 1);
        }
    }
}

/// A pending event row as a writer leaves it (PostgreSQL/MySQL, ADR 0020).
fn pending_row(build: &str, status: &str) -> String {
    format!(
        "INSERT INTO event_pending (build_id, queue, kind, status, metadata, at) \
         VALUES ('{build}', 'app', 'status', '{status}', '{{}}', 1)"
    )
}

/// Events a writer committed but whose process died before its
/// sequencing pass (here: a row put in `event_pending` by hand after the
/// writer's store closed) are numbered by another store's recheck, without
/// any write of its own, and announced there.
async fn events_left_pending_are_numbered_by_another_store(db: TestDb) {
    if db.kind() == BackendKind::Sqlite {
        return;
    }
    let [id]: [_; 1] = db.create_builds(1).await.try_into().unwrap();
    let other = db.another_store("survivor").await;
    let (tx, mut announced) = watch::channel(0u64);
    assert!(other.announce_commits_to(std::sync::Arc::new(EventsAnnounced(tx))));
    let before = other.latest_seq().await.unwrap();
    // The writer's process is gone: only `other` runs passes now.
    db.close().await;
    exec_on(&other, &pending_row(id.as_str(), "running")).await;
    // The recheck runs every second; the bound only turns a hang into a
    // failure.
    tokio::time::timeout(Duration::from_secs(30), announced.changed())
        .await
        .expect("the leftover event was announced")
        .unwrap();
    let events = other.events_after(before, 10).await.unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!((events[0].seq, &events[0].build_id), (before + 1, &id));
    assert_eq!(events[0].status, BuildStatus::Running);
}

/// A pending event whose build is gone (pruned meanwhile) is dropped by the
/// pass instead of blocking it: the next write's event is numbered right
/// after the last one, and nothing stays pending.
async fn pending_events_of_a_gone_build_do_not_block_the_log(db: TestDb) {
    if db.kind() == BackendKind::Sqlite {
        return;
    }
    let [id]: [_; 1] = db.create_builds(1).await.try_into().unwrap();
    let before = db.store.latest_seq().await.unwrap();
    db.exec(&pending_row("b_gone", "failed")).await;
    assert!(db
        .store
        .record_status(&id, None, BuildStatus::Running, &meta(&[]), None)
        .await
        .unwrap());
    // Readable as soon as the write returned.
    let events = db.store.events_after(before, 10).await.unwrap();
    assert_eq!(
        events
            .iter()
            .map(|e| (e.seq, e.build_id.clone()))
            .collect::<Vec<_>>(),
        vec![(before + 1, id)]
    );
    assert_eq!(db.ints("SELECT COUNT(*) FROM event_pending").await, vec![0]);
}

store_suite!(
    separate_stores_commit_gapless_seqs_that_readers_never_skip,
    events_left_pending_are_numbered_by_another_store,
    pending_events_of_a_gone_build_do_not_block_the_log,
    separate_stores_creating_one_key_make_one_build,
    an_open_transaction_does_not_hold_up_writers_of_other_builds,
    crossing_writes_of_two_handles_never_deadlock,
    a_write_does_not_wait_for_a_batch_in_progress,
);
