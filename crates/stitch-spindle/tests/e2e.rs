//! End to end: fake Jetstream, knot and PLC over loopback, a real stitch
//! server (fake-runner queues) with the spindle mounted.

mod support;

use serde_json::{json, Value};
use stitch_store::BuildFilter;
use support::*;

const CI: &str =
    "when:\n  - event: [push]\nengine: nixery\nsteps:\n  - name: test\n    command: make test\n";
const LINT: &str = "when:\n  - event: [push]\nengine: nixery\nstitch:\n  queue: fast\n";

async fn build_count(h: &Harness) -> usize {
    let (builds, _) = h
        .state
        .store()
        .list_builds(&BuildFilter::default(), None)
        .await
        .expect("list builds");
    builds.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_trigger_runs_each_workflow_with_statuses_logs_and_no_replays() {
    let h = Harness::start().await;
    h.knot_connections(1).await;
    let knot = h.knot.host();
    let rkey = "3lzaaaaaaaaa2";
    // A nil entry and an empty name are skipped.
    let mut record = trigger(
        &knot,
        OWNER,
        "myrepo",
        &[("ci.yml", CI), ("lint.yml", LINT)],
    );
    record["workflows"]
        .as_array_mut()
        .unwrap()
        .push(Value::Null);
    record["workflows"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "", "raw": ""}));
    h.knot.publish(rkey, "sh.tangled.pipeline", record);

    let mut events = h.events(None).await;
    events
        .until("both workflows to succeed", |f| {
            reached(f, rkey, "ci.yml", "success") && reached(f, rkey, "lint.yml", "success")
        })
        .await;
    for wf in ["ci.yml", "lint.yml"] {
        assert_eq!(
            statuses(&events.frames, rkey, wf),
            ["pending", "running", "success"],
            "{wf}"
        );
    }
    // created strictly increases; rkeys are distinct TIDs.
    let created: Vec<i64> = events
        .frames
        .iter()
        .map(|f| f["created"].as_i64().unwrap())
        .collect();
    assert!(created.windows(2).all(|w| w[0] < w[1]), "{created:?}");
    let mut rkeys: Vec<&str> = events
        .frames
        .iter()
        .map(|f| f["rkey"].as_str().unwrap())
        .collect();
    rkeys.sort();
    rkeys.dedup();
    assert_eq!(rkeys.len(), events.frames.len());
    // The lint workflow ran on the queue its stitch block names.
    let lint = h
        .spindle
        .db
        .run(&knot, rkey, "lint.yml")
        .await
        .unwrap()
        .unwrap();
    let build = h
        .state
        .store()
        .get_build(&lint.build_id.unwrap())
        .await
        .unwrap();
    assert_eq!(build.queue, "fast");
    assert_eq!(build.caller_metadata["tangled.workflow"], "lint.yml");
    assert_eq!(build.caller_metadata["tangled.commit"], "a".repeat(40));
    assert_eq!(build.caller_metadata["tangled.branch"], "main");
    assert_eq!(build_count(&h).await, 2);

    // Logs of a finished workflow: LogLine frames, then close 1000.
    let (frames, code) = h.read_logs(&knot, rkey, "ci.yml").await;
    assert_eq!(code, Some(1000));
    assert!(!frames.is_empty());
    for f in &frames {
        let line: stitch_core::LogLine = serde_json::from_str(f).expect("a LogLine frame");
        assert_eq!(
            serde_json::to_string(&line).unwrap(),
            *f,
            "frames are canonical LogLines"
        );
    }

    // A replayed trigger (same knot, rkey, workflows) starts nothing; a
    // marker trigger after it shows the replay was processed.
    h.push_trigger(
        rkey,
        &knot,
        OWNER,
        "myrepo",
        &[("ci.yml", CI), ("lint.yml", LINT)],
    );
    let marker = "3lzaaaaaaaab2";
    h.push_trigger(marker, &knot, OWNER, "myrepo", &[("ci.yml", CI)]);
    events
        .until("the marker to succeed", |f| {
            reached(f, marker, "ci.yml", "success")
        })
        .await;
    assert_eq!(build_count(&h).await, 3);
    for wf in ["ci.yml", "lint.yml"] {
        assert_eq!(
            statuses(&events.frames, rkey, wf),
            ["pending", "running", "success"],
            "{wf} after replay"
        );
    }
    events.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_triggers_are_ignored_and_members_are_accepted() {
    let h = Harness::start().await;
    h.knot_connections(1).await;
    let knot = h.knot.host();
    let repo = |name: &str| json!({"name": name, "knot": knot, "spindle": HOSTNAME, "createdAt": "2026-01-02T03:04:05Z"});
    // A stranger's repo naming this spindle (tracked, but not a member).
    h.jetstream.commit(
        "did:plc:stranger",
        "create",
        "sh.tangled.repo",
        "r2",
        Some(repo("theirs")),
    );
    // A member's repo, and the owner's membership record for them.
    h.jetstream.commit(
        "did:plc:member",
        "create",
        "sh.tangled.repo",
        "r3",
        Some(repo("memberrepo")),
    );
    h.jetstream.commit(OWNER, "create", "sh.tangled.spindle.member", "m1",
        Some(json!({"subject": "did:plc:member", "instance": HOSTNAME, "createdAt": "2026-01-02T03:04:05Z"})));
    // Memberships the owner did not grant, or for another instance: ignored.
    h.jetstream.commit("did:plc:stranger", "create", "sh.tangled.spindle.member", "m2",
        Some(json!({"subject": "did:plc:stranger", "instance": HOSTNAME, "createdAt": "2026-01-02T03:04:05Z"})));
    h.jetstream.commit(OWNER, "create", "sh.tangled.spindle.member", "m3",
        Some(json!({"subject": "did:plc:other", "instance": "elsewhere.test", "createdAt": "2026-01-02T03:04:05Z"})));
    // Malformed Jetstream input changes nothing and stops nothing.
    h.jetstream.raw("{not json");
    h.jetstream.commit(
        OWNER,
        "create",
        "sh.tangled.repo",
        "bad",
        Some(json!({"name": 7})),
    );
    let spindle = h.spindle.clone();
    until_written(
        &spindle.db,
        "member and repo mirrored from jetstream",
        || async {
            spindle.db.is_member("did:plc:member").await.unwrap()
                && spindle
                    .db
                    .repo_tracked(&knot, "did:plc:member", "memberrepo")
                    .await
                    .unwrap()
        },
    )
    .await;
    assert!(!spindle.db.is_member("did:plc:stranger").await.unwrap());
    assert!(!spindle.db.is_member("did:plc:other").await.unwrap());

    let wf = [("ci.yml", CI)];
    h.push_trigger("3lzwrongknot2", "elsewhere.knot", OWNER, "myrepo", &wf);
    h.push_trigger("3lzuntracked2", &knot, OWNER, "ghost", &wf);
    h.push_trigger("3lznonmember2", &knot, "did:plc:stranger", "theirs", &wf);
    h.knot.raw("{\"rkey\": 1");
    h.knot.publish(
        "3lzgarbage222",
        "sh.tangled.pipeline",
        json!({"workflows": "nope"}),
    );
    h.push_trigger("3lzmember2222", &knot, "did:plc:member", "memberrepo", &wf);
    let mut events = h.events(None).await;
    events
        .until("the member's workflow to succeed", |f| {
            reached(f, "3lzmember2222", "ci.yml", "success")
        })
        .await;
    for rkey in [
        "3lzwrongknot2",
        "3lzuntracked2",
        "3lznonmember2",
        "3lzgarbage222",
    ] {
        assert!(
            spindle
                .db
                .run(&knot, rkey, "ci.yml")
                .await
                .unwrap()
                .is_none(),
            "{rkey} must not run"
        );
        assert!(statuses(&events.frames, rkey, "ci.yml").is_empty());
    }
    assert_eq!(build_count(&h).await, 1);
    events.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_yaml_and_unknown_queues_fail_with_an_error_step() {
    let h = Harness::start().await;
    h.knot_connections(1).await;
    let knot = h.knot.host();
    let rkey = "3lzbadinput22";
    h.push_trigger(
        rkey,
        &knot,
        OWNER,
        "myrepo",
        &[
            ("broken.yml", "when: [unclosed\n"),
            ("nowhere.yml", "engine: nixery\nstitch:\n  queue: missing\n"),
        ],
    );
    let mut events = h.events(None).await;
    events
        .until("both to fail", |f| {
            reached(f, rkey, "broken.yml", "failed") && reached(f, rkey, "nowhere.yml", "failed")
        })
        .await;
    let failed = |wf: &str| {
        events
            .frames
            .iter()
            .find(|f| f["event"]["workflow"] == wf)
            .unwrap()["event"]
            .clone()
    };
    let broken = failed("broken.yml");
    assert!(
        broken["error"].as_str().unwrap().contains("does not parse"),
        "{broken}"
    );
    assert_eq!(broken["exitCode"], -1);
    let nowhere = failed("nowhere.yml");
    assert!(
        nowhere["error"]
            .as_str()
            .unwrap()
            .contains("unknown queue \"missing\""),
        "{nowhere}"
    );
    assert_eq!(nowhere["exitCode"], -1);
    assert_eq!(statuses(&events.frames, rkey, "nowhere.yml"), ["failed"]);
    assert_eq!(build_count(&h).await, 0);

    // The error is the log: one user step with the message, then close 1000.
    let (frames, code) = h.read_logs(&knot, rkey, "nowhere.yml").await;
    assert_eq!(code, Some(1000));
    assert_eq!(frames.len(), 2, "{frames:?}");
    let start: Value = serde_json::from_str(&frames[0]).unwrap();
    assert_eq!(
        (
            start["kind"].as_str(),
            start["step_id"].as_i64(),
            start["step_kind"].as_i64()
        ),
        (Some("control"), Some(0), Some(1))
    );
    let data: Value = serde_json::from_str(&frames[1]).unwrap();
    assert_eq!(data["kind"], "data");
    assert_eq!(data["content"], nowhere["error"]);
    events.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_of_unknown_workflows_are_404_before_upgrade() {
    let h = Harness::start().await;
    let err = tokio_tungstenite::connect_async(h.ws("/logs/knot.test/3lznothing222/ci.yml"))
        .await
        .expect_err("no upgrade");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 404),
        other => panic!("expected an HTTP 404, got {other:?}"),
    }
    // A plain GET gets the same 404.
    let resp = h
        .client
        .get(h.url("/logs/knot.test/3lznothing222/ci.yml"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    // Bad /events cursors are refused before the upgrade too.
    let err = tokio_tungstenite::connect_async(h.ws("/events?cursor=yesterday"))
        .await
        .expect_err("no upgrade");
    assert!(
        matches!(err, tokio_tungstenite::tungstenite::Error::Http(ref r) if r.status() == 400),
        "{err:?}"
    );
    // The owner query.
    let owner: Value = h
        .client
        .get(h.url("/xrpc/sh.tangled.owner"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(owner, json!({"owner": OWNER}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_logs_follow_a_running_workflow_pings_flow_and_deadlines_are_timeouts() {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;

    let h = Harness::start_pinging(std::time::Duration::from_millis(100)).await;
    h.knot_connections(1).await;
    let knot = h.knot.host();
    let rkey = "3lzlivelogs22";
    h.push_trigger(
        rkey,
        &knot,
        OWNER,
        "myrepo",
        &[
            ("ci.yml", CI),
            ("stuck.yml", "engine: nixery\nstitch: {queue: deadline}\n"),
        ],
    );
    let mut events = h.events(None).await;
    events
        .until("ci running", |f| reached(f, rkey, "ci.yml", "running"))
        .await;
    // Opened while running: lines arrive as written, then close 1000 at the end.
    let (frames, code) = h.read_logs(&knot, rkey, "ci.yml").await;
    assert_eq!(code, Some(1000));
    assert!(!frames.is_empty());
    events
        .until("ci success", |f| reached(f, rkey, "ci.yml", "success"))
        .await;
    // A queue deadline (max_duration) is a Tangled timeout, without error.
    events
        .until("stuck timeout", |f| {
            reached(f, rkey, "stuck.yml", "timeout")
        })
        .await;
    assert_eq!(
        statuses(&events.frames, rkey, "stuck.yml"),
        ["pending", "running", "timeout"]
    );
    let timeout = events
        .frames
        .iter()
        .find(|f| f["event"]["status"] == "timeout")
        .unwrap();
    assert!(timeout["event"].get("error").is_none() && timeout["event"].get("exitCode").is_none());
    events.close().await;

    // An idle /events stream is pinged (a binary/ping frame, never a non-JSON text).
    let last = h
        .spindle
        .db
        .events_after(0, 1000)
        .await
        .unwrap()
        .last()
        .unwrap()
        .created;
    let (mut socket, _) = tokio_tungstenite::connect_async(h.ws(&format!("/events?cursor={last}")))
        .await
        .unwrap();
    let first = tokio::time::timeout(WAIT, socket.next())
        .await
        .expect("a frame in time");
    assert!(matches!(first, Some(Ok(Message::Ping(_)))), "{first:?}");
    // A live log of a running workflow is pinged too.
    let rkey2 = "3lzlivelogs33";
    h.push_trigger(
        rkey2,
        &knot,
        OWNER,
        "myrepo",
        &[("slow.yml", "engine: nixery\nstitch: {queue: slow}\n")],
    );
    let mut events = h.events(Some(last)).await;
    events
        .until("slow running", |f| reached(f, rkey2, "slow.yml", "running"))
        .await;
    let (mut logs, _) =
        tokio_tungstenite::connect_async(h.ws(&format!("/logs/{knot}/{rkey2}/slow.yml")))
            .await
            .unwrap();
    let mut pinged = false;
    for _ in 0..200 {
        match tokio::time::timeout(WAIT, logs.next())
            .await
            .expect("a frame in time")
        {
            Some(Ok(Message::Ping(_))) => {
                pinged = true;
                break;
            }
            Some(Ok(Message::Text(_))) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pinged);
    events.close().await;
}
