//! Build records: creation, idempotency, status rules, cancel, refs, listing
//! — one suite, run against SQLite, PostgreSQL and MySQL/MariaDB.

mod common;

use std::collections::BTreeSet;

use common::{keyed, meta, new_build, TestDb};
use serde_json::json;
use stitch_core::{BuildId, BuildStatus, RunnerRef};
use stitch_store::{
    BuildFilter, Conflict, CreateOutcome, Cursor, EventKind, Metadata, NewBuild, StoreError,
};

async fn create_then_get_returns_the_record_shape(db: TestDb) {
    let new = new_build("app");
    let created = db.store.create_build(new.clone()).await.unwrap();
    assert!(created.is_created());
    let build = created.into_build();
    assert_eq!(build.status, BuildStatus::Accepted);
    assert_eq!(build.version, 1);
    assert_eq!(build.runner, "fake");
    assert!(!build.cancel_requested);

    let read = db.store.get_build(&new.id).await.unwrap();
    assert_eq!(read, build);

    let record = serde_json::to_value(read.record()).unwrap();
    let keys: BTreeSet<_> = record.as_object().unwrap().keys().cloned().collect();
    let expected: BTreeSet<_> = [
        "id",
        "queue",
        "status",
        "base",
        "head",
        "metadata",
        "runner_ref",
        "created_at",
        "updated_at",
        "finished_at",
        "url",
        "cancel_requested",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(keys, expected);
    assert_eq!(record["id"], json!(new.id.as_str()));
    assert_eq!(record["status"], json!("accepted"));
    assert_eq!(record["base"], json!(new.base));
    assert_eq!(record["head"], json!(new.head));
    assert_eq!(record["metadata"], json!({"requested_by": "queue-bot"}));
    assert_eq!(record["runner_ref"], json!(null));
    assert_eq!(record["finished_at"], json!(null));
    assert_eq!(record["url"], json!(null));
    // RFC 3339 timestamps that parse back to what was stored.
    let created_at: chrono::DateTime<chrono::Utc> =
        record["created_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(created_at, read.created_at);
    let back: stitch_store::BuildRecord = serde_json::from_value(record).unwrap();
    assert_eq!(back, read.record());
}

async fn create_appends_an_accepted_event(db: TestDb) {
    let build = db
        .store
        .create_build(new_build("app"))
        .await
        .unwrap()
        .into_build();
    let events = db.store.events_for_build(&build.id).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].seq, 1);
    assert_eq!(events[0].kind, EventKind::Status);
    assert_eq!(events[0].status, BuildStatus::Accepted);
    assert_eq!(events[0].queue, "app");
    assert_eq!(events[0].metadata, build.metadata());
    assert_eq!(db.store.latest_seq().await.unwrap(), 1);
}

async fn idempotency_key_returns_the_existing_build_per_queue(db: TestDb) {
    let first = db.store.create_build(keyed("app", "k1")).await.unwrap();
    assert!(first.is_created());

    let again = db.store.create_build(keyed("app", "k1")).await.unwrap();
    let CreateOutcome::Existing(existing) = again else {
        panic!("expected the existing build, got {again:?}");
    };
    assert_eq!(existing.id, first.build().id);

    // Keys are scoped to a queue.
    let other_queue = db.store.create_build(keyed("docs", "k1")).await.unwrap();
    assert!(other_queue.is_created());
    // No key never collides.
    assert!(db
        .store
        .create_build(new_build("app"))
        .await
        .unwrap()
        .is_created());
    assert!(db
        .store
        .create_build(new_build("app"))
        .await
        .unwrap()
        .is_created());

    let (all, _) = db
        .store
        .list_builds(&BuildFilter::default(), None)
        .await
        .unwrap();
    assert_eq!(all.len(), 4);
    // The replay wrote no event.
    assert_eq!(db.store.latest_seq().await.unwrap(), 4);
}

async fn concurrent_creates_with_one_key_make_one_build(db: TestDb) {
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let store = db.store.clone();
        tasks.push(tokio::spawn(async move {
            store.create_build(keyed("app", "race")).await.unwrap()
        }));
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
}

async fn reusing_an_id_is_a_replay_or_a_conflict(db: TestDb) {
    let new = new_build("app");
    db.store.create_build(new.clone()).await.unwrap();
    // The same request again (a retried insert) returns the build.
    let replay = db.store.create_build(new.clone()).await.unwrap();
    assert!(!replay.is_created());
    // The same id for another queue is a caller bug.
    let mut clash = new.clone();
    clash.queue = "docs".into();
    let err = db.store.create_build(clash).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(Conflict::DuplicateId(ref id)) if *id == new.id));
}

async fn bad_input_is_rejected(db: TestDb) {
    for bad in [
        new_build(""),
        keyed("app", ""),
        stitch_store::NewBuild {
            runner: String::new(),
            ..new_build("app")
        },
    ] {
        let err = db.store.create_build(bad).await.unwrap_err();
        assert!(matches!(err, StoreError::InvalidInput(_)), "{err:?}");
    }
    assert_eq!(db.store.latest_seq().await.unwrap(), 0);
}

async fn unknown_ids_are_not_found(db: TestDb) {
    let id = BuildId::new();
    let none = Metadata::new();
    let s = &db.store;
    let errs = [
        s.get_build(&id).await.unwrap_err(),
        s.record_status(&id, None, BuildStatus::Running, &none, None)
            .await
            .unwrap_err(),
        s.set_runner_ref(&id, &RunnerRef::new("1"))
            .await
            .unwrap_err(),
        s.request_cancel(&id).await.unwrap_err(),
        s.record_failing(&id, &meta(&[("promised_exit_status", "1")]))
            .await
            .unwrap_err(),
        s.events_for_build(&id).await.unwrap_err(),
        s.append_log_lines(&id, &[json!({"content": "x"})])
            .await
            .unwrap_err(),
        s.append_log_lines::<serde_json::Value>(&id, &[])
            .await
            .unwrap_err(),
        s.log_lines(&id, 0, 10).await.unwrap_err(),
        s.has_logs(&id).await.unwrap_err(),
    ];
    for err in errs {
        assert!(
            matches!(err, StoreError::NotFound(ref e) if *e == id),
            "{err:?}"
        );
        assert!(err.is_not_found());
        assert!(!err.is_retryable());
    }
}

async fn status_changes_set_times_and_append_one_event_each(db: TestDb) {
    let build = db
        .store
        .create_build(new_build("app"))
        .await
        .unwrap()
        .into_build();
    let id = &build.id;
    let url = meta(&[("url", "https://ci.example/builds/7")]);

    assert!(db
        .store
        .record_status(
            id,
            Some(BuildStatus::Accepted),
            BuildStatus::Running,
            &url,
            None,
        )
        .await
        .unwrap());
    let running = db.store.events_for_build(id).await.unwrap().pop().unwrap();
    assert_eq!(running.seq, 2);
    assert_eq!(running.status, BuildStatus::Running);
    assert_eq!(running.kind, EventKind::Status);
    assert_eq!(
        running.metadata.get("url").unwrap(),
        "https://ci.example/builds/7"
    );
    assert_eq!(running.metadata.get("requested_by").unwrap(), "queue-bot");

    // Same status, same metadata: no write, no event.
    let noop = db
        .store
        .record_status(id, None, BuildStatus::Running, &url, None)
        .await
        .unwrap();
    assert!(!noop);
    assert_eq!(db.store.latest_seq().await.unwrap(), 2);
    let after_noop = db.store.get_build(id).await.unwrap();
    assert_eq!(after_noop.version, 2);

    // Same status, new metadata: a change.
    assert!(db
        .store
        .record_status(
            id,
            None,
            BuildStatus::Running,
            &meta(&[("step", "2/3")]),
            None,
        )
        .await
        .unwrap());
    let progress = db.store.events_for_build(id).await.unwrap().pop().unwrap();
    assert_eq!(progress.seq, 3);

    let b = db.store.get_build(id).await.unwrap();
    assert_eq!(b.url(), Some("https://ci.example/builds/7"));
    assert!(b.started_at.is_some());
    assert!(b.finished_at.is_none());
    assert_eq!(b.version, 3);
    let started = b.started_at;

    assert!(db
        .store
        .record_status(id, None, BuildStatus::Succeeded, &Metadata::new(), None)
        .await
        .unwrap());
    let done = db.store.events_for_build(id).await.unwrap().pop().unwrap();
    let b = db.store.get_build(id).await.unwrap();
    assert_eq!(b.status, BuildStatus::Succeeded);
    assert_eq!(b.started_at, started, "started_at is set once");
    assert_eq!(b.finished_at, Some(done.at));
    assert_eq!(b.record().finished_at, Some(done.at));
    assert_eq!(
        b.record().url.as_deref(),
        Some("https://ci.example/builds/7")
    );

    let events = db.store.events_for_build(id).await.unwrap();
    let statuses: Vec<_> = events.iter().map(|e| (e.seq, e.status)).collect();
    assert_eq!(
        statuses,
        vec![
            (1, BuildStatus::Accepted),
            (2, BuildStatus::Running),
            (3, BuildStatus::Running),
            (4, BuildStatus::Succeeded)
        ]
    );
    assert_eq!(db.store.latest_seq().await.unwrap(), 4);
}

async fn terminal_status_is_write_once(db: TestDb) {
    let id = db
        .store
        .create_build(new_build("app"))
        .await
        .unwrap()
        .into_build()
        .id;
    let none = Metadata::new();
    assert!(db
        .store
        .record_status(&id, None, BuildStatus::Failed, &none, Some("exit status 2"))
        .await
        .unwrap());

    for status in [
        BuildStatus::Running,
        BuildStatus::Succeeded,
        BuildStatus::Cancelled,
        BuildStatus::Unknown,
        BuildStatus::Accepted,
    ] {
        let err = db
            .store
            .record_status(&id, None, status, &none, None)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::InvalidTransition {
                    from: BuildStatus::Failed,
                    ..
                }
            ),
            "{err:?}"
        );
    }
    // Changing a terminal build's metadata is refused too...
    let err = db
        .store
        .record_status(
            &id,
            None,
            BuildStatus::Failed,
            &meta(&[("late", "1")]),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidTransition { .. }));
    // ...while repeating the terminal report is a harmless no-op.
    assert!(db
        .store
        .record_status(
            &id,
            Some(BuildStatus::Failed),
            BuildStatus::Failed,
            &none,
            Some("exit status 2")
        )
        .await
        .unwrap()
        .eq(&false));
    let err = db
        .store
        .record_failing(&id, &meta(&[("promised_exit_status", "1")]))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidTransition { .. }));

    let b = db.store.get_build(&id).await.unwrap();
    assert_eq!(b.status, BuildStatus::Failed);
    assert_eq!(b.failure_reason.as_deref(), Some("exit status 2"));
    assert_eq!(
        b.metadata().get("error").map(String::as_str),
        Some("exit status 2")
    );
    assert!(b.started_at.is_none(), "never ran");
    assert!(b.finished_at.is_some());
    assert_eq!(db.store.events_for_build(&id).await.unwrap().len(), 2);
}

async fn explicit_error_metadata_wins_over_the_reason(db: TestDb) {
    let id = db
        .store
        .create_build(new_build("app"))
        .await
        .unwrap()
        .into_build()
        .id;
    db.store
        .record_status(
            &id,
            None,
            BuildStatus::Failed,
            &meta(&[("error", "job 3 exited 137")]),
            Some("build failed"),
        )
        .await
        .unwrap();
    let b = db.store.get_build(&id).await.unwrap();
    assert_eq!(b.runner_metadata.get("error").unwrap(), "job 3 exited 137");
    assert_eq!(b.failure_reason.as_deref(), Some("build failed"));
}

async fn expected_from_is_a_compare_and_set(db: TestDb) {
    let id = db
        .store
        .create_build(new_build("app"))
        .await
        .unwrap()
        .into_build()
        .id;
    let err = db
        .store
        .record_status(
            &id,
            Some(BuildStatus::Running),
            BuildStatus::Succeeded,
            &Metadata::new(),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        StoreError::Conflict(Conflict::UnexpectedStatus {
            expected: BuildStatus::Running,
            actual: BuildStatus::Accepted,
            ..
        })
    ));
    assert_eq!(
        db.store.get_build(&id).await.unwrap().status,
        BuildStatus::Accepted
    );
    assert_eq!(db.store.latest_seq().await.unwrap(), 1);
}

async fn unknown_is_not_terminal(db: TestDb) {
    let id = db
        .store
        .create_build(new_build("app"))
        .await
        .unwrap()
        .into_build()
        .id;
    let none = Metadata::new();
    db.store
        .record_status(&id, None, BuildStatus::Unknown, &none, None)
        .await
        .unwrap();
    assert!(db.store.get_build(&id).await.unwrap().finished_at.is_none());
    assert!(db
        .store
        .record_status(&id, None, BuildStatus::Running, &none, None)
        .await
        .unwrap());
}

async fn cancel_request_is_idempotent(db: TestDb) {
    let id = db
        .store
        .create_build(new_build("app"))
        .await
        .unwrap()
        .into_build()
        .id;
    let first = db.store.request_cancel(&id).await.unwrap();
    assert!(first.newly_requested);
    assert!(first.build.cancel_requested);
    let at = first.build.cancel_requested_at.expect("time recorded");
    let second = db.store.request_cancel(&id).await.unwrap();
    assert!(!second.newly_requested);
    assert_eq!(second.build.cancel_requested_at, Some(at));
    assert_eq!(second.build.version, first.build.version);
    // A cancel request is intent, not a status change: no event.
    assert_eq!(db.store.latest_seq().await.unwrap(), 1);

    let done = db
        .store
        .create_build(new_build("app"))
        .await
        .unwrap()
        .into_build()
        .id;
    db.store
        .record_status(&done, None, BuildStatus::Succeeded, &Metadata::new(), None)
        .await
        .unwrap();
    let late = db.store.request_cancel(&done).await.unwrap();
    assert!(!late.newly_requested);
    assert!(!late.build.cancel_requested);
}

async fn a_job_token_hash_given_at_create_is_stored_with_the_build(db: TestDb) {
    let new = NewBuild {
        job_token_hash: Some("sha256:minted-early".into()),
        ..new_build("app")
    };
    let created = db.store.create_build(new.clone()).await.unwrap();
    assert!(created.is_created());
    assert_eq!(
        created.build().job_token_hash.as_deref(),
        Some("sha256:minted-early")
    );
    let read = db.store.get_build(&new.id).await.unwrap();
    assert_eq!(read.job_token_hash.as_deref(), Some("sha256:minted-early"));
    // Stored by the insert itself: one version, one event.
    assert_eq!(read.version, 1);
    assert_eq!(db.store.events_for_build(&new.id).await.unwrap().len(), 1);
    // Never part of the API record.
    assert!(serde_json::to_value(read.record())
        .unwrap()
        .get("job_token_hash")
        .is_none());
}

async fn runner_ref_is_stored_typed(db: TestDb) {
    let id = db
        .store
        .create_build(new_build("app"))
        .await
        .unwrap()
        .into_build()
        .id;
    let r = RunnerRef::new("42")
        .with_url("https://buildkite.com/acme/app/builds/42")
        .with_data("uuid", "0190-abc");
    let b = db.store.set_runner_ref(&id, &r).await.unwrap();
    assert_eq!(b.runner_ref.as_ref(), Some(&r));
    assert_eq!(b.version, 2);
    // Same value: no write.
    assert_eq!(db.store.set_runner_ref(&id, &r).await.unwrap().version, 2);
    let read = db.store.get_build(&id).await.unwrap();
    assert_eq!(read.runner_ref, Some(r.clone()));
    assert_eq!(
        serde_json::to_value(read.record()).unwrap()["runner_ref"],
        json!({"id": "42", "url": "https://buildkite.com/acme/app/builds/42", "data": {"uuid": "0190-abc"}})
    );
    // Not a status change.
    assert_eq!(db.store.latest_seq().await.unwrap(), 1);
}

async fn promised_failure_appends_one_failing_event(db: TestDb) {
    let id = db
        .store
        .create_build(new_build("app"))
        .await
        .unwrap()
        .into_build()
        .id;
    db.store
        .record_status(&id, None, BuildStatus::Running, &Metadata::new(), None)
        .await
        .unwrap();
    let promise = meta(&[("promised_exit_status", "3")]);
    assert!(db.store.record_failing(&id, &promise).await.unwrap());
    let event = db.store.events_for_build(&id).await.unwrap().pop().unwrap();
    assert_eq!(event.kind, EventKind::Failing);
    assert_eq!(event.status, BuildStatus::Running);
    assert_eq!(event.metadata.get("promised_exit_status").unwrap(), "3");
    assert!(!db.store.record_failing(&id, &promise).await.unwrap());

    let json = serde_json::to_value(&event).unwrap();
    assert_eq!(json["kind"], "failing");
    assert_eq!(json["status"], "running");
    assert_eq!(json["seq"], 3);
    assert_eq!(json["build_id"], id.as_str());
    assert_eq!(json["queue"], "app");
    assert!(json["at"].is_string());
    let back: stitch_store::Event = serde_json::from_value(json).unwrap();
    assert_eq!(back, event);
}

async fn builds_not_terminal_lists_open_builds_oldest_first(db: TestDb) {
    let ids = db.create_builds(4).await;
    let none = Metadata::new();
    db.store
        .record_status(&ids[0], None, BuildStatus::Running, &none, None)
        .await
        .unwrap();
    db.store
        .record_status(&ids[1], None, BuildStatus::Cancelled, &none, None)
        .await
        .unwrap();
    db.store
        .record_status(&ids[2], None, BuildStatus::Unknown, &none, None)
        .await
        .unwrap();
    let open_ids: Vec<_> = db
        .store
        .builds_not_terminal()
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    let mut expected = vec![ids[0].clone(), ids[2].clone(), ids[3].clone()];
    expected.sort();
    assert_eq!(open_ids, expected);
}

async fn list_pages_newest_first_with_a_cursor(db: TestDb) {
    let mut ids = Vec::new();
    for i in 0..25 {
        let queue = if i % 2 == 0 { "app" } else { "docs" };
        ids.push(
            db.store
                .create_build(new_build(queue))
                .await
                .unwrap()
                .into_build()
                .id,
        );
    }
    ids.sort();
    ids.reverse();

    let filter = BuildFilter {
        limit: 10,
        ..BuildFilter::default()
    };
    let mut seen = Vec::new();
    let mut cursor: Option<Cursor> = None;
    let mut pages = 0;
    loop {
        let (page, next) = db
            .store
            .list_builds(&filter, cursor.as_ref())
            .await
            .unwrap();
        pages += 1;
        seen.extend(page.into_iter().map(|b| b.id));
        match next {
            // A cursor survives a trip through the query string.
            Some(c) => cursor = Some(c.to_string().parse().unwrap()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids);

    // Exactly one page's worth: no dangling cursor.
    let exact = BuildFilter {
        limit: 25,
        ..BuildFilter::default()
    };
    let (page, next) = db.store.list_builds(&exact, None).await.unwrap();
    assert_eq!(page.len(), 25);
    assert!(next.is_none());

    // Filters.
    let app = BuildFilter {
        queue: Some("app".into()),
        limit: 100,
        ..BuildFilter::default()
    };
    let (page, _) = db.store.list_builds(&app, None).await.unwrap();
    assert_eq!(page.len(), 13);
    assert!(page.iter().all(|b| b.queue == "app"));

    db.store
        .record_status(&ids[3], None, BuildStatus::Running, &Metadata::new(), None)
        .await
        .unwrap();
    let running = BuildFilter {
        status: Some(BuildStatus::Running),
        ..BuildFilter::default()
    };
    let (page, next) = db.store.list_builds(&running, None).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].id, ids[3]);
    assert!(next.is_none());
    let nothing = BuildFilter {
        queue: Some("nope".into()),
        ..BuildFilter::default()
    };
    let (page, next) = db.store.list_builds(&nothing, None).await.unwrap();
    assert!(page.is_empty() && next.is_none());
}

async fn open_counts_and_finished_builds_for_the_overview(db: TestDb) {
    let none = Metadata::new();
    let mut ids = Vec::new();
    for queue in ["a", "a", "a", "b"] {
        let new = new_build(queue);
        ids.push(new.id.clone());
        db.store.create_build(new).await.unwrap();
    }
    let before = chrono::Utc::now() - chrono::TimeDelta::hours(1);
    let s = &db.store;
    s.record_status(&ids[1], None, BuildStatus::Running, &none, None)
        .await
        .unwrap();
    s.record_status(&ids[2], None, BuildStatus::Running, &none, None)
        .await
        .unwrap();
    s.record_status(&ids[2], None, BuildStatus::Failed, &none, Some("x"))
        .await
        .unwrap();
    s.record_status(&ids[3], None, BuildStatus::Cancelled, &none, None)
        .await
        .unwrap();

    let mut open: Vec<(String, BuildStatus, u64)> = s
        .open_build_counts()
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.queue, c.status, c.count))
        .collect();
    open.sort_by(|x, y| (x.0.as_str(), x.1.as_str()).cmp(&(y.0.as_str(), y.1.as_str())));
    assert_eq!(
        open,
        [
            ("a".to_string(), BuildStatus::Accepted, 1),
            ("a".to_string(), BuildStatus::Running, 1)
        ]
    );
    let oldest = s.open_build_counts().await.unwrap();
    let first = s.get_build(&ids[0]).await.unwrap();
    assert!(oldest
        .iter()
        .any(|c| c.status == BuildStatus::Accepted && c.oldest_created_at == first.created_at));

    let mut finished = s.finished_since(before, 100).await.unwrap();
    finished.sort_by_key(|f| f.queue.clone());
    assert_eq!(finished.len(), 2);
    assert_eq!(
        (finished[0].queue.as_str(), finished[0].status),
        ("a", BuildStatus::Failed)
    );
    assert!(finished[0].started_at.is_some());
    assert_eq!(
        (finished[1].queue.as_str(), finished[1].status),
        ("b", BuildStatus::Cancelled)
    );
    assert!(finished[1].started_at.is_none(), "never started");
    let later = chrono::Utc::now() + chrono::TimeDelta::hours(1);
    assert!(s.finished_since(later, 100).await.unwrap().is_empty());
    assert_eq!(s.finished_since(before, 1).await.unwrap().len(), 1);
}

/// The overview's hourly history, counted in SQL, against builds with
/// known finish times and run times set directly in the table.
async fn finished_hours_are_counted_in_the_database(db: TestDb) {
    use chrono::{DateTime, TimeDelta, Utc};
    use stitch_store::{FinishedCount, FinishedHour};
    let t0: DateTime<Utc> = "2026-01-05T10:00:00Z".parse().unwrap();
    let ms = |t: DateTime<Utc>| t.timestamp_millis();
    let h = |n: i64| t0 + TimeDelta::hours(n);
    // (queue, status, finished at, run time in ms or never started)
    let builds: [(&str, &str, DateTime<Utc>, Option<i64>); 12] = [
        ("a", "succeeded", h(0), Some(100)),
        ("a", "succeeded", h(0) + TimeDelta::minutes(59), Some(300)),
        ("a", "succeeded", h(0) + TimeDelta::minutes(30), Some(200)),
        ("b", "failed", h(0) + TimeDelta::seconds(1), Some(50)),
        ("b", "cancelled", h(0) + TimeDelta::seconds(2), None),
        // Hour 1 has none. Hour 2: its first and last millisecond, and a
        // run time below 0 (two writers' clocks apart) that counts as 0.
        ("a", "failed", h(2), Some(1000)),
        ("a", "failed", h(3) - TimeDelta::milliseconds(1), Some(-500)),
        // Hour 3: never started only: counted, no median.
        ("b", "cancelled", h(3) + TimeDelta::minutes(5), None),
        // Hour 5, past `until` below.
        ("b", "succeeded", h(5), Some(7)),
        ("b", "succeeded", h(5) + TimeDelta::minutes(1), Some(9)),
        // Before the window.
        ("a", "succeeded", h(0) - TimeDelta::milliseconds(1), Some(1)),
        // Far in the past.
        ("a", "failed", h(-30), Some(1)),
    ];
    for (queue, status, finished, run) in builds {
        let new = new_build(queue);
        let id = new.id.clone();
        db.store.create_build(new).await.unwrap();
        let started = run.map_or("NULL".to_string(), |r| (ms(finished) - r).to_string());
        db.exec(&format!(
            "UPDATE builds SET status = '{status}', started_at = {started}, \
             finished_at = {} WHERE id = '{id}'",
            ms(finished)
        ))
        .await;
    }
    // Open builds have no finish time and are never counted.
    db.store.create_build(new_build("a")).await.unwrap();

    let count = |queue: &str, status: BuildStatus, count: u64| FinishedCount {
        queue: queue.into(),
        status,
        count,
    };
    let hour0 = FinishedHour {
        start: h(0),
        counts: vec![
            count("a", BuildStatus::Succeeded, 3),
            count("b", BuildStatus::Cancelled, 1),
            count("b", BuildStatus::Failed, 1),
        ],
        // Run times 50, 100, 200, 300: the lower middle one.
        median_duration_ms: Some(100),
    };
    let hour2 = FinishedHour {
        start: h(2),
        counts: vec![count("a", BuildStatus::Failed, 2)],
        median_duration_ms: Some(0),
    };
    let hour3 = FinishedHour {
        start: h(3),
        counts: vec![count("b", BuildStatus::Cancelled, 1)],
        median_duration_ms: None,
    };
    let hour5 = FinishedHour {
        start: h(5),
        counts: vec![count("b", BuildStatus::Succeeded, 2)],
        median_duration_ms: Some(7),
    };
    let s = &db.store;
    assert_eq!(
        s.finished_hours(h(0), Some(h(5))).await.unwrap(),
        [hour0.clone(), hour2.clone(), hour3.clone()]
    );
    assert_eq!(
        s.finished_hours(h(0), None).await.unwrap(),
        [hour0, hour2.clone(), hour3, hour5]
    );
    // A bound inside an hour cuts it: only its part inside counts, for the
    // median too (one build left: 1000 ms).
    let cut = s
        .finished_hours(h(2), Some(h(3) - TimeDelta::milliseconds(1)))
        .await
        .unwrap();
    assert_eq!(
        cut,
        [FinishedHour {
            start: h(2),
            counts: vec![count("a", BuildStatus::Failed, 1)],
            median_duration_ms: Some(1000),
        }]
    );
    assert!(s.finished_hours(h(6), None).await.unwrap().is_empty());
}

store_suite!(
    finished_hours_are_counted_in_the_database,
    open_counts_and_finished_builds_for_the_overview,
    create_then_get_returns_the_record_shape,
    create_appends_an_accepted_event,
    idempotency_key_returns_the_existing_build_per_queue,
    concurrent_creates_with_one_key_make_one_build,
    reusing_an_id_is_a_replay_or_a_conflict,
    bad_input_is_rejected,
    unknown_ids_are_not_found,
    status_changes_set_times_and_append_one_event_each,
    terminal_status_is_write_once,
    explicit_error_metadata_wins_over_the_reason,
    expected_from_is_a_compare_and_set,
    unknown_is_not_terminal,
    cancel_request_is_idempotent,
    runner_ref_is_stored_typed,
    a_job_token_hash_given_at_create_is_stored_with_the_build,
    promised_failure_appends_one_failing_event,
    builds_not_terminal_lists_open_builds_oldest_first,
    list_pages_newest_first_with_a_cursor,
);
