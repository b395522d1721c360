//! The database itself: migrations, transactions shared with foreign
//! statements, the gapless event sequence under concurrency, log lines —
//! one suite, run against SQLite, PostgreSQL and MySQL/MariaDB — plus the
//! SQLite file's own settings.

mod common;

use std::collections::BTreeSet;

use common::{meta, new_build, tx_count, tx_exec, TestDb};
use serde_json::json;
use sqlx::sqlite::SqlitePoolOptions;
use stitch_core::BuildStatus;
use stitch_store::{BackendKind, Metadata, Store, StoreError};

async fn opening_twice_keeps_data_and_tolerates_foreign_migrations(db: TestDb) {
    let id = db
        .store
        .create_build(new_build("app"))
        .await
        .unwrap()
        .into_build()
        .id;

    // The message queue records its own versions in the same table.
    let checksum = match db.kind() {
        BackendKind::Postgres => "'\\x00'::bytea",
        _ => "x'00'",
    };
    db.exec(&format!(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (1001, 'mq topics', TRUE, {checksum}, 0)"
    ))
    .await;

    let again = db.another_store("again").await;
    assert_eq!(again.get_build(&id).await.unwrap().id, id);
    let versions = db
        .ints("SELECT version FROM _sqlx_migrations ORDER BY version")
        .await;
    let expected = match db.kind() {
        // The list of versions each backend has grown its schema through.
        BackendKind::Sqlite => vec![1001, 2001, 2002, 2003, 2004, 2005, 2006],
        _ => vec![1001, 2001, 2002, 2003, 2004],
    };
    assert_eq!(versions, expected);
    // Migrating an already migrated pool is a no-op.
    let shared = Store::from_pool(again.pool()).await.unwrap();
    assert_eq!(shared.latest_seq().await.unwrap(), 1);
    stitch_store::migrate(&db.store.pool()).await.unwrap();
}

/// SQLite only: the file's connection settings.
#[tokio::test]
async fn connections_use_wal_busy_timeout_and_foreign_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    // The way the server builds the pool it shares with the queue.
    let pool = SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(Store::sqlite_connect_options(&path))
        .await
        .unwrap();
    let store = Store::from_pool(pool).await.unwrap();
    let pool = store.sqlite_pool().unwrap().clone();
    let mut conn = pool.acquire().await.unwrap();
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(journal, "wal");
    let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(busy >= 5000, "busy_timeout {busy}");
    let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(fk, 1);
    let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(sync, 1, "NORMAL");
    drop(conn);

    // Foreign keys hold: an event for a build that does not exist is refused.
    let err = sqlx::query(
        "INSERT INTO events (seq, build_id, queue, kind, status, metadata, at) \
         VALUES (99, 'b_nope', 'q', 'status', 'running', '{}', 0)",
    )
    .execute(&pool)
    .await
    .unwrap_err();
    assert!(err.to_string().contains("FOREIGN KEY"), "{err}");
}

async fn rollback_leaves_neither_build_nor_event(db: TestDb) {
    let new = new_build("app");
    let mut tx = db.store.begin().await.unwrap();
    let created = tx.create_build(new.clone()).await.unwrap();
    assert!(created.is_created());
    // Visible inside the transaction...
    assert_eq!(
        tx.get_build(&new.id).await.unwrap().status,
        BuildStatus::Accepted
    );
    assert!(tx
        .record_status(&new.id, None, BuildStatus::Running, &Metadata::new(), None)
        .await
        .unwrap());
    tx.rollback().await.unwrap();

    // ...and gone after rollback, events included.
    assert!(db
        .store
        .get_build(&new.id)
        .await
        .unwrap_err()
        .is_not_found());
    assert_eq!(db.store.latest_seq().await.unwrap(), 0);
    assert!(db.store.events_after(0, 100).await.unwrap().is_empty());

    // Dropping an uncommitted transaction rolls back too.
    let other = new_build("app");
    {
        let mut tx = db.store.begin().await.unwrap();
        tx.create_build(other.clone()).await.unwrap();
    }
    assert!(db
        .store
        .get_build(&other.id)
        .await
        .unwrap_err()
        .is_not_found());

    // The next committed event still gets seq 1.
    let kept = db
        .store
        .create_build(new_build("app"))
        .await
        .unwrap()
        .into_build();
    let events = db.store.events_after(0, 10).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].seq, 1);
    assert_eq!(events[0].build_id, kept.id);
}

async fn foreign_statements_share_the_transaction(db: TestDb) {
    // Stands in for the message queue's outbox table.
    db.exec("CREATE TABLE outbox (build_id VARCHAR(64) NOT NULL)")
        .await;

    for commit in [false, true] {
        let new = new_build("app");
        let id = new.id.as_str().to_owned();
        let mut tx = db.store.begin().await.unwrap();
        tx.create_build(new.clone()).await.unwrap();
        tx_exec(
            tx.connection(),
            &format!("INSERT INTO outbox (build_id) VALUES ('{id}')"),
        )
        .await;
        // The foreign statement sees the store's uncommitted row.
        let visible = tx_count(
            tx.connection(),
            &format!("SELECT COUNT(*) FROM builds WHERE id = '{id}'"),
        )
        .await;
        assert_eq!(visible, 1);
        if commit {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }

        let outbox = db
            .ints(&format!(
                "SELECT COUNT(*) FROM outbox WHERE build_id = '{id}'"
            ))
            .await;
        let build = db.store.get_build(&new.id).await;
        if commit {
            assert_eq!(outbox, vec![1]);
            assert!(build.is_ok());
        } else {
            assert_eq!(outbox, vec![0]);
            assert!(build.unwrap_err().is_not_found());
        }
    }
}

async fn events_after_resumes_and_limits(db: TestDb) {
    let ids = db.create_builds(3).await;
    for id in &ids {
        db.store
            .record_status(id, None, BuildStatus::Running, &Metadata::new(), None)
            .await
            .unwrap();
    }
    assert_eq!(db.store.latest_seq().await.unwrap(), 6);
    let first = db.store.events_after(0, 4).await.unwrap();
    assert_eq!(
        first.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    let rest = db.store.events_after(4, 100).await.unwrap();
    assert_eq!(rest.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![5, 6]);
    assert!(rest.iter().all(|e| e.status == BuildStatus::Running));
    assert!(db.store.events_after(6, 100).await.unwrap().is_empty());
    assert!(db
        .store
        .events_after(u64::MAX, 100)
        .await
        .unwrap()
        .is_empty());
}

/// N concurrent writers, a fraction of whose transactions are rolled back on
/// purpose: the committed events must be numbered 1..=M with no gap.
async fn seq_is_gapless_under_concurrent_writers_with_rollbacks(db: TestDb) {
    const WRITERS: usize = 8;
    const ROUNDS: usize = 40;

    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = db.store.clone();
        tasks.push(tokio::spawn(async move {
            let mut committed = 0u64;
            let id = store
                .create_build(new_build("app"))
                .await
                .unwrap()
                .into_build()
                .id;
            committed += 1;
            for round in 0..ROUNDS {
                let mut tx = store.begin().await.unwrap();
                let patch = meta(&[("round", &round.to_string())]);
                let event = tx
                    .record_status(&id, None, BuildStatus::Running, &patch, None)
                    .await
                    .unwrap();
                assert!(event);
                // Also create a build in a transaction that may be thrown away.
                tx.create_build(new_build("side")).await.unwrap();
                if (round + w) % 3 == 0 {
                    tx.rollback().await.unwrap();
                } else {
                    tx.commit().await.unwrap();
                    committed += 2;
                }
            }
            committed
        }));
    }
    let mut committed = 0;
    for task in tasks {
        committed += task.await.unwrap();
    }

    let latest = db.store.latest_seq().await.unwrap();
    assert_eq!(latest, committed);
    let events = db.store.events_after(0, u32::MAX).await.unwrap();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=committed).collect::<Vec<_>>());
    // Every event points at a build that exists (nothing from rolled-back work).
    let builds: BTreeSet<_> = db
        .strings("SELECT id FROM builds")
        .await
        .into_iter()
        .collect();
    assert!(events.iter().all(|e| builds.contains(e.build_id.as_str())));
}

/// 8 tasks × 200 writes (inserts and status updates) on one file: every write
/// waits for the lock instead of failing with "database is locked".
async fn concurrent_writers_never_see_database_is_locked(db: TestDb) {
    const TASKS: usize = 8;
    const OPS: usize = 200;

    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = db.store.clone();
        tasks.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            let mut mine = Vec::new();
            for i in 0..OPS {
                let result = if i % 4 == 0 || mine.is_empty() {
                    store
                        .create_build(new_build(&format!("q{t}")))
                        .await
                        .map(|o| mine.push(o.into_build().id))
                } else {
                    let id = &mine[i % mine.len()];
                    let patch = meta(&[("tick", &i.to_string())]);
                    store
                        .record_status(id, None, BuildStatus::Running, &patch, None)
                        .await
                        .map(|_| ())
                };
                if let Err(e) = result {
                    errors.push(e.to_string());
                }
                // Reads interleave with writes, as the API does.
                if i % 10 == 0 {
                    if let Err(e) = store.latest_seq().await {
                        errors.push(e.to_string());
                    }
                }
            }
            errors
        }));
    }
    let mut errors = Vec::new();
    for task in tasks {
        errors.extend(task.await.unwrap());
    }
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        errors.first()
    );
    let seqs = db.store.latest_seq().await.unwrap();
    assert_eq!(seqs, (TASKS * OPS) as u64);
}

async fn log_lines_append_number_and_page(db: TestDb) {
    let id = db
        .store
        .create_build(new_build("app"))
        .await
        .unwrap()
        .into_build()
        .id;
    assert!(!db.store.has_logs(&id).await.unwrap());
    assert!(db.store.log_lines(&id, 0, 10).await.unwrap().is_empty());

    let line = |n: usize| {
        json!({
            "kind": "data",
            "content": format!("line {n}"),
            "time": "2025-01-01T00:00:00Z",
            "step_id": 0,
            "stream": "stdout"
        })
    };
    let batch: Vec<_> = (1..=3).map(line).collect();
    assert_eq!(db.store.append_log_lines(&id, &batch).await.unwrap(), 3);
    let batch: Vec<_> = (4..=5).map(line).collect();
    assert_eq!(db.store.append_log_lines(&id, &batch).await.unwrap(), 5);
    assert_eq!(
        db.store
            .append_log_lines::<serde_json::Value>(&id, &[])
            .await
            .unwrap(),
        5
    );
    assert!(db.store.has_logs(&id).await.unwrap());

    let all = db.store.log_lines(&id, 0, 100).await.unwrap();
    assert_eq!(
        all.iter().map(|l| l.line_no).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    let decoded: serde_json::Value = all[3].decode().unwrap();
    assert_eq!(decoded, line(4));
    // Stored verbatim: the frame is served byte for byte.
    assert_eq!(all[0].json, serde_json::to_string(&line(1)).unwrap());

    let tail = db.store.log_lines(&id, 3, 1).await.unwrap();
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].line_no, 4);

    // Logs of different builds are numbered independently.
    let other = db
        .store
        .create_build(new_build("app"))
        .await
        .unwrap()
        .into_build()
        .id;
    assert_eq!(
        db.store.append_log_lines(&other, &[line(1)]).await.unwrap(),
        1
    );

    // Log lines roll back with their transaction.
    let mut tx = db.store.begin().await.unwrap();
    tx.append_log_lines(&id, &[line(6)]).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(db.store.append_log_lines(&id, &[line(6)]).await.unwrap(), 6);
}

async fn corrupt_rows_surface_as_corrupt_not_panics(db: TestDb) {
    let id = db
        .store
        .create_build(new_build("app"))
        .await
        .unwrap()
        .into_build()
        .id;
    db.exec(&format!(
        "UPDATE builds SET runner_metadata = 'not json' WHERE id = '{id}'"
    ))
    .await;
    let err = db.store.get_build(&id).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
}

/// A write transaction dropped without commit — also when the future that
/// held it is cancelled — rolls back, and the pool's connections come back
/// usable (not stuck inside a transaction, not holding the write lock).
async fn dropped_and_cancelled_transactions_roll_back_and_free_the_writer(db: TestDb) {
    let dropped = new_build("app");
    {
        let mut tx = db.store.begin().await.unwrap();
        tx.create_build(dropped.clone()).await.unwrap();
    }
    assert!(db
        .store
        .get_build(&dropped.id)
        .await
        .unwrap_err()
        .is_not_found());

    // A task holding an open transaction is aborted at an await point.
    let cancelled = new_build("app");
    let (held, hold) = tokio::sync::oneshot::channel::<()>();
    let store = db.store.clone();
    let new = cancelled.clone();
    let task = tokio::spawn(async move {
        let mut tx = store.begin().await.unwrap();
        tx.create_build(new).await.unwrap();
        let _ = held.send(());
        std::future::pending::<()>().await;
        drop(tx);
    });
    hold.await.unwrap();
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert!(db
        .store
        .get_build(&cancelled.id)
        .await
        .unwrap_err()
        .is_not_found());

    // Every pooled connection can write again: more writers than the pool has
    // connections, each committing.
    let writers: Vec<_> = (0..16)
        .map(|_| {
            let store = db.store.clone();
            tokio::spawn(async move { store.create_build(new_build("app")).await })
        })
        .collect();
    for w in writers {
        w.await.unwrap().unwrap();
    }
    let (page, _) = db
        .store
        .list_builds(&stitch_store::BuildFilter::default(), None)
        .await
        .unwrap();
    assert_eq!(page.len(), 16);
}

async fn the_first_secret_stored_wins_and_survives_a_reopen(db: TestDb) {
    let first = db
        .store
        .ensure_secret("job_token_key", b"first")
        .await
        .unwrap();
    assert_eq!(first, b"first");
    let again = db
        .store
        .ensure_secret("job_token_key", b"second")
        .await
        .unwrap();
    assert_eq!(again, b"first", "an existing secret is never replaced");
    let other = db.store.ensure_secret("other", b"x").await.unwrap();
    assert_eq!(other, b"x");
    assert!(db.store.ensure_secret("job_token_key", b"").await.is_err());
    db.close().await;
    let reopened = db.another_store("reopened").await;
    assert_eq!(
        reopened
            .ensure_secret("job_token_key", b"third")
            .await
            .unwrap(),
        b"first"
    );
}

store_suite!(
    opening_twice_keeps_data_and_tolerates_foreign_migrations,
    rollback_leaves_neither_build_nor_event,
    foreign_statements_share_the_transaction,
    events_after_resumes_and_limits,
    seq_is_gapless_under_concurrent_writers_with_rollbacks,
    concurrent_writers_never_see_database_is_locked,
    log_lines_append_number_and_page,
    corrupt_rows_surface_as_corrupt_not_panics,
    dropped_and_cancelled_transactions_roll_back_and_free_the_writer,
    the_first_secret_stored_wins_and_survives_a_reopen,
);
