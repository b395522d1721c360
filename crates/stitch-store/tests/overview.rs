//! The overview's kept hourly history ([`HourlyHistory`]): after the first
//! answer it counts the unsettled hours from the event log, not the
//! database, and must still equal what the database counts — after each
//! transition, across an hour that settles (by the clock passed in), with
//! builds finished by another process, and after events retention. Run
//! against SQLite, PostgreSQL and MySQL/MariaDB.

mod common;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use common::{new_build, TestDb};
use stitch_core::{BuildId, BuildStatus};
use stitch_store::{FinishedHour, HourlyHistory, Metadata, Store};

/// The start of `t`'s hour.
fn hour_of(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(TimeDelta::hours(1)).unwrap()
}

/// The day's first hour for a clock at `now`, as the overview asks.
fn first_hour(now: DateTime<Utc>) -> DateTime<Utc> {
    hour_of(now) - TimeDelta::hours(23)
}

/// What the database counts now for the day seen from `now`: the oracle.
async fn counted(store: &Store, now: DateTime<Utc>) -> Vec<FinishedHour> {
    store.finished_hours(first_hour(now), None).await.unwrap()
}

/// The history's answer at `now`, as of the log's current end.
async fn answer(
    history: &mut HourlyHistory,
    store: &Store,
    now: DateTime<Utc>,
) -> Vec<FinishedHour> {
    let seq = store.latest_seq().await.unwrap();
    history
        .hours(store, now, first_hour(now), seq)
        .await
        .unwrap()
}

/// Creates a build on `queue` through `store`.
async fn create(store: &Store, queue: &str) -> BuildId {
    let new = new_build(queue);
    let id = new.id.clone();
    store.create_build(new).await.unwrap();
    id
}

/// Moves a build through the store (with its events) to `status`, via
/// running unless `started` is false.
async fn finish(store: &Store, id: &BuildId, status: BuildStatus, started: bool) {
    let none = Metadata::new();
    if started {
        store
            .record_status(id, None, BuildStatus::Running, &none, None)
            .await
            .unwrap();
    }
    store
        .record_status(id, None, status, &none, Some("test"))
        .await
        .unwrap();
}

/// Sets a build finished at `finished` (epoch ms) with run time `run`
/// behind the store's back: no event.
async fn finish_silently(db: &TestDb, id: &BuildId, status: &str, finished: i64, run: i64) {
    db.exec(&format!(
        "UPDATE builds SET status = '{status}', started_at = {}, finished_at = {finished} \
         WHERE id = '{id}'",
        finished - run
    ))
    .await;
}

/// Every answer equals the database's count, transition after transition,
/// the median included; after the first answer the unsettled hours come
/// from the events, so a finish written behind the store's back (no event)
/// is not seen.
async fn unsettled_hours_follow_each_transition(db: TestDb) {
    let s = &db.store;
    let now = Utc::now();
    let mut history = HourlyHistory::new();
    assert_eq!(answer(&mut history, s, now).await, counted(s, now).await);

    // Known run times, written before the first count of this history:
    // 10, 20, 30, 40, 50 s, finished a minute ago (this hour or the last,
    // both unsettled or both counted by the database either way).
    let at = now.timestamp_millis() - 60_000;
    for (i, run) in [30_000, 10_000, 50_000, 20_000, 40_000]
        .into_iter()
        .enumerate()
    {
        let id = create(s, if i % 2 == 0 { "a" } else { "b" }).await;
        finish_silently(&db, &id, "succeeded", at, run).await;
    }
    let mut history = HourlyHistory::new();
    let first = answer(&mut history, s, now).await;
    assert_eq!(first, counted(s, now).await);
    let total: u64 = first.iter().flat_map(|h| &h.counts).map(|c| c.count).sum();
    assert_eq!(total, 5);

    // Transitions through the store, one answer after each.
    let ids = [
        create(s, "a").await,
        create(s, "a").await,
        create(s, "b").await,
    ];
    assert_eq!(answer(&mut history, s, now).await, counted(s, now).await);
    finish(s, &ids[0], BuildStatus::Failed, true).await;
    assert_eq!(answer(&mut history, s, now).await, counted(s, now).await);
    finish(s, &ids[1], BuildStatus::Cancelled, false).await;
    assert_eq!(answer(&mut history, s, now).await, counted(s, now).await);
    finish(s, &ids[2], BuildStatus::Succeeded, true).await;
    let after = answer(&mut history, s, now).await;
    assert_eq!(after, counted(s, now).await);
    let total: u64 = after.iter().flat_map(|h| &h.counts).map(|c| c.count).sum();
    assert_eq!(total, 8);

    // Behind the store's back (nothing in stitch does this: a finish always
    // appends an event), an open build that has no event since this
    // history's last answer is finished. The database counts it; the kept
    // tally, reading only events, does not.
    let hidden = create(s, "a").await;
    assert_eq!(answer(&mut history, s, now).await, counted(s, now).await);
    finish_silently(&db, &hidden, "failed", Utc::now().timestamp_millis(), 5).await;
    assert_ne!(answer(&mut history, s, now).await, counted(s, now).await);
    assert_eq!(answer(&mut history, s, now).await, after);
}

/// A build read twice — in the first count and again from its event,
/// when the caller's `event_seq` predates its finish — counts once.
async fn a_build_in_the_first_count_and_in_an_event_counts_once(db: TestDb) {
    let s = &db.store;
    let now = Utc::now();
    let ids = [create(s, "a").await, create(s, "a").await];
    let before = s.latest_seq().await.unwrap();
    finish(s, &ids[0], BuildStatus::Succeeded, true).await;
    finish(s, &ids[1], BuildStatus::Failed, true).await;
    let mut history = HourlyHistory::new();
    let first = history
        .hours(s, now, first_hour(now), before)
        .await
        .unwrap();
    assert_eq!(first, counted(s, now).await);
    // The next answer reads the events after `before`: the same two
    // builds' finishes, already counted.
    assert_eq!(answer(&mut history, s, now).await, first);
}

/// An hour that settles (by the clock passed in) keeps the tally it had;
/// the database is not read for it again, and the new current hour is
/// counted from the events on.
async fn an_hour_that_settles_keeps_its_tally(db: TestDb) {
    let s = &db.store;
    let ids = [create(s, "a").await, create(s, "b").await];
    finish(s, &ids[0], BuildStatus::Succeeded, true).await;
    finish(s, &ids[1], BuildStatus::Failed, true).await;
    // A clock inside the hour these finished in, then one a little over an
    // hour and five minutes later: that hour is settled then.
    let finished = s.get_build(&ids[1]).await.unwrap().finished_at.unwrap();
    let hour = hour_of(finished);
    let early = hour + TimeDelta::minutes(10);
    let later = hour + TimeDelta::minutes(66);
    let mut history = HourlyHistory::new();
    assert_eq!(
        answer(&mut history, s, early).await,
        counted(s, early).await
    );
    let more = create(s, "a").await;
    finish(s, &more, BuildStatus::Cancelled, true).await;
    let before_settling = counted(s, later).await;
    assert_eq!(answer(&mut history, s, early).await, before_settling);

    // Behind the store's back the settling hour changes (an outcome
    // rewritten without an event). The hour moves over from the tally as
    // it was counted: the database's new figure is not read.
    db.exec(&format!(
        "UPDATE builds SET status = 'succeeded' WHERE id = '{}'",
        ids[1]
    ))
    .await;
    let settled = answer(&mut history, s, later).await;
    assert_ne!(settled, counted(s, later).await);
    assert_eq!(settled, before_settling);

    // The hour after is counted from events: a build finishing now (this
    // clock's hour or the one before it, depending on the real time)
    // shows up if its hour is not settled at `later`.
    let next = create(s, "b").await;
    finish(s, &next, BuildStatus::Failed, true).await;
    let finished_next = s.get_build(&next).await.unwrap().finished_at.unwrap();
    let again = answer(&mut history, s, later).await;
    let settled_until = hour + TimeDelta::hours(1);
    let counted_next: u64 = again
        .iter()
        .filter(|h| h.start >= settled_until)
        .flat_map(|h| &h.counts)
        .filter(|c| c.queue == "b" && c.status == BuildStatus::Failed)
        .map(|c| c.count)
        .sum();
    let expected = u64::from(finished_next >= settled_until);
    assert_eq!(counted_next, expected, "{again:?}");
}

/// Builds another process (its own store and pool on the same database)
/// finishes are counted from the events it committed.
async fn builds_finished_by_another_process_are_counted(db: TestDb) {
    let s = &db.store;
    let other = db.another_store("other").await;
    let now = Utc::now();
    let mut history = HourlyHistory::new();
    let mine = create(s, "a").await;
    assert_eq!(answer(&mut history, s, now).await, counted(s, now).await);

    let theirs = [create(&other, "a").await, create(&other, "b").await];
    finish(&other, &theirs[0], BuildStatus::Succeeded, true).await;
    finish(&other, &theirs[1], BuildStatus::Cancelled, false).await;
    // Their finish of a build this process created, too.
    finish(&other, &mine, BuildStatus::Failed, true).await;
    let seen = answer(&mut history, s, now).await;
    assert_eq!(seen, counted(s, now).await);
    let total: u64 = seen.iter().flat_map(|h| &h.counts).map(|c| c.count).sum();
    assert_eq!(total, 3);
    other.close().await;
}

/// When retention deleted events the tally had not read, it cannot know
/// what finished meanwhile: the unsettled hours are counted afresh.
async fn pruned_events_make_the_tally_count_afresh(db: TestDb) {
    let s = &db.store;
    let now = Utc::now();
    let mut history = HourlyHistory::new();
    let ids = [create(s, "a").await, create(s, "a").await];
    assert_eq!(answer(&mut history, s, now).await, counted(s, now).await);

    // Behind the store's back one build finishes (no event), then one
    // through the store, then every event goes.
    finish_silently(&db, &ids[0], "failed", Utc::now().timestamp_millis(), 5).await;
    finish(s, &ids[1], BuildStatus::Succeeded, true).await;
    let far_future = Utc::now().timestamp_millis() + 3_600_000;
    while s.prune_events(far_future, 1000).await.unwrap() > 0 {}
    // Counted afresh: the silent finish is seen too.
    let fresh = answer(&mut history, s, now).await;
    assert_eq!(fresh, counted(s, now).await);
    let total: u64 = fresh.iter().flat_map(|h| &h.counts).map(|c| c.count).sum();
    assert_eq!(total, 2);
}

store_suite!(
    unsettled_hours_follow_each_transition,
    a_build_in_the_first_count_and_in_an_event_counts_once,
    an_hour_that_settles_keeps_its_tally,
    builds_finished_by_another_process_are_counted,
    pruned_events_make_the_tally_count_afresh,
);
