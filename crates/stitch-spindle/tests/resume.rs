//! Cursors: the knot stream and Jetstream resume where they stopped after a
//! disconnect, `/events?cursor=` resumes exactly, and a restarted server
//! neither loses nor repeats a status.

mod support;

use std::collections::HashSet;

use serde_json::json;
use support::*;

const CI: &str = "engine: nixery\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knot_and_jetstream_reconnects_lose_and_duplicate_nothing() {
    let h = Harness::start().await;
    h.knot_connections(1).await;
    let knot = h.knot.host();
    let a = h.push_trigger("3lzresumea222", &knot, OWNER, "myrepo", &[("ci.yml", CI)]);
    let mut events = h.events(None).await;
    events
        .until("A pending", |f| {
            reached(f, "3lzresumea222", "ci.yml", "pending")
        })
        .await;
    // Wait until A's cursor is saved, then drop the connection and publish
    // B while the spindle is away.
    let name = stitch_spindle::db::knot_cursor(&knot);
    until_written(&h.spindle.db, "A's knot cursor", || async {
        h.spindle.db.cursor(&name).await.unwrap() == Some(a)
    })
    .await;
    assert_eq!(h.spindle.db.cursor(&name).await.unwrap(), Some(a));
    h.knot.go_down().await;
    let b = h.push_trigger("3lzresumeb222", &knot, OWNER, "myrepo", &[("ci.yml", CI)]);
    h.knot.come_up();
    h.knot_connections(2).await;
    assert_eq!(
        h.knot.connections()[1],
        Some(a),
        "reconnects from the last frame"
    );
    events
        .until("B success", |f| {
            reached(f, "3lzresumeb222", "ci.yml", "success")
        })
        .await;
    events
        .until("A success", |f| {
            reached(f, "3lzresumea222", "ci.yml", "success")
        })
        .await;
    assert_eq!(
        statuses(&events.frames, "3lzresumea222", "ci.yml"),
        ["pending", "running", "success"]
    );
    assert_eq!(
        statuses(&events.frames, "3lzresumeb222", "ci.yml"),
        ["pending", "running", "success"]
    );
    assert!(h.spindle.db.cursor(&name).await.unwrap() >= Some(b));

    // Jetstream: reconnects rewound 5 s from the last event it applied.
    let t = h.jetstream.commit(OWNER, "create", "sh.tangled.spindle.member", "m9",
        Some(json!({"subject": "did:plc:late", "instance": HOSTNAME, "createdAt": "2026-01-02T03:04:05Z"})));
    until_written(
        &h.spindle.db,
        "the jetstream cursor at the member",
        || async { h.spindle.db.cursor("jetstream").await.unwrap() == Some(t) },
    )
    .await;
    let before = h.jetstream.connections().len();
    h.jetstream.kick();
    let js = h.jetstream.clone();
    eventually("jetstream reconnect", js.connections_moved(), || {
        js.connections().len() > before
    })
    .await;
    assert_eq!(h.jetstream.connections()[before], Some(t - 5_000_000));
    assert!(h.spindle.db.is_member("did:plc:late").await.unwrap());

    // /events?cursor= sends exactly what follows the cursor.
    let all = events.frames.clone();
    events.close().await;
    let mid = all.len() / 2;
    let cursor = all[mid - 1]["created"].as_i64().unwrap();
    let mut resumed = h.events(Some(cursor)).await;
    let want = all.len() - mid;
    resumed.until("the rest", |f| f.len() >= want).await;
    assert_eq!(resumed.frames[..], all[mid..]);
    resumed.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_resumes_statuses_without_repeats() {
    let h = Harness::start().await;
    h.knot_connections(1).await;
    let knot = h.knot.host();
    let rkey = "3lzrestart222";
    h.push_trigger(rkey, &knot, OWNER, "myrepo", &[("ci.yml", CI)]);
    let mut events = h.events(None).await;
    events
        .until("pending", |f| reached(f, rkey, "ci.yml", "pending"))
        .await;
    events.close().await;
    let (jetstream, knot_fake, plc, dir) = h.shutdown();
    // The trigger arrives again after the restart (as from a knot replaying
    // it): the run exists, so nothing new starts.
    let h = Harness::start_on(jetstream, knot_fake, plc, dir).await;
    h.knot_connections(2).await;
    h.push_trigger(rkey, &knot, OWNER, "myrepo", &[("ci.yml", CI)]);
    let mut events = h.events(None).await;
    events
        .until("success after restart", |f| {
            reached(f, rkey, "ci.yml", "success")
        })
        .await;
    assert_eq!(
        statuses(&events.frames, rkey, "ci.yml"),
        ["pending", "running", "success"]
    );
    let rkeys: HashSet<&str> = events
        .frames
        .iter()
        .map(|f| f["rkey"].as_str().unwrap())
        .collect();
    assert_eq!(rkeys.len(), events.frames.len());
    let (builds, _) = h
        .state
        .store()
        .list_builds(&Default::default(), None)
        .await
        .unwrap();
    assert_eq!(builds.len(), 1);
    events.close().await;
}
