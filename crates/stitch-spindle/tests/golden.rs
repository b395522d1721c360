//! Golden frames (tests/data/), checked byte for byte against what the
//! spindle's types produce and what a live server sends. The shapes are
//! those of the stock spindle's records and frames (docs/spindle.md).

mod support;

use chrono::{TimeZone, Utc};
use serde_json::value::RawValue;
use serde_json::Value;
use stitch_core::{LogLine, OutputStream, StepKind};
use stitch_spindle::records::{
    pipeline_uri, EventFrame, JetstreamFrame, KnotFrame, PipelineRecord, PipelineState,
    PipelineStatus, RepoRecord, STATUS_NSID,
};
use support::*;

fn golden(name: &str) -> String {
    let text = std::fs::read_to_string(data_path(name)).expect("golden file");
    text.trim_end_matches('\n').to_string()
}

const CREATED: i64 = 1_767_323_045_123_456_789;
const UNKNOWN_QUEUE: &str =
    "unknown queue \"missing\": no such queue is configured on this spindle";

fn frame(state: PipelineState, error: Option<&str>) -> String {
    let status = PipelineStatus {
        type_: String::new(),
        pipeline: pipeline_uri("knot.example.com", "3lzpipeline22"),
        workflow: "ci.yml".into(),
        status: state,
        created_at: "2026-01-02T03:04:05Z".into(),
        error: error.map(str::to_string),
        exit_code: error.map(|_| -1),
    };
    let event = RawValue::from_string(serde_json::to_string(&status).unwrap()).unwrap();
    serde_json::to_string(&EventFrame {
        rkey: "3lzstatus2222",
        nsid: STATUS_NSID,
        event: &event,
        created: CREATED,
    })
    .unwrap()
}

#[test]
fn status_frames_match_the_goldens() {
    assert_eq!(
        frame(PipelineState::Pending, None),
        golden("events_pending.json")
    );
    assert_eq!(
        frame(PipelineState::Running, None),
        golden("events_running.json")
    );
    assert_eq!(
        frame(PipelineState::Success, None),
        golden("events_success.json")
    );
    assert_eq!(
        frame(PipelineState::Timeout, None),
        golden("events_timeout.json")
    );
    assert_eq!(
        frame(PipelineState::Failed, Some(UNKNOWN_QUEUE)),
        golden("events_failed.json")
    );
    assert_eq!(
        frame(PipelineState::Cancelled, Some("User canceled the workflow")),
        golden("events_cancelled.json")
    );
}

#[test]
fn log_frames_match_the_goldens() {
    let t =
        Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap() + chrono::Duration::milliseconds(123);
    let json = |l: &LogLine| serde_json::to_string(l).unwrap();
    assert_eq!(
        json(&LogLine::step_start(
            1,
            "step name",
            StepKind::User,
            Some("make test".into()),
            t
        )),
        golden("log_control_start.json")
    );
    assert_eq!(
        json(&LogLine::data(
            1,
            OutputStream::Stdout,
            "one line, no trailing newline\n",
            t
        )),
        golden("log_data.json")
    );
    assert_eq!(
        json(&LogLine::step_end(1, "step name", StepKind::User, t)),
        golden("log_control_end.json")
    );
}

#[test]
fn captured_inputs_decode() {
    let js: JetstreamFrame = serde_json::from_str(&golden("jetstream_repo_commit.json")).unwrap();
    let commit = js.commit.unwrap();
    assert_eq!(
        (
            js.kind.as_str(),
            commit.collection.as_str(),
            commit.operation.as_str()
        ),
        ("commit", "sh.tangled.repo", "create")
    );
    let repo: RepoRecord = serde_json::from_value(commit.record.unwrap()).unwrap();
    assert_eq!(
        (
            repo.name.as_str(),
            repo.knot.as_str(),
            repo.spindle.as_deref()
        ),
        ("myrepo", "knot.example.com", Some("spindle.test"))
    );
    let kf: KnotFrame = serde_json::from_str(&golden("knot_pipeline_frame.json")).unwrap();
    assert_eq!(kf.created, Some(1_767_323_045_000_000_000));
    let p: PipelineRecord = serde_json::from_value(kf.event).unwrap();
    let tm = p.trigger_metadata.unwrap();
    assert_eq!(tm.push.unwrap().new_sha, "a".repeat(40));
    assert_eq!(p.workflows[0].as_ref().unwrap().name, "ci.yml");
}

/// The golden text with its fixed values replaced by the live frame's.
fn expected_live(golden_text: &str, live: &Value, knot: &str) -> String {
    golden_text
        .replace("3lzstatus2222", live["rkey"].as_str().unwrap())
        .replace(
            &CREATED.to_string(),
            &live["created"].as_i64().unwrap().to_string(),
        )
        .replace(
            "2026-01-02T03:04:05Z",
            live["event"]["createdAt"].as_str().unwrap(),
        )
        .replace("knot.example.com", knot)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_frames_match_the_goldens() {
    let h = Harness::start().await;
    h.knot_connections(1).await;
    let knot = h.knot.host();
    // The captured knot frame (its workflow routes to queue "fast"),
    // pointed at the fake knot; and a workflow on an unknown queue.
    h.knot
        .raw(&golden("knot_pipeline_frame.json").replace("knot.example.com", &knot));
    h.push_trigger(
        "3lzpipeline33",
        &knot,
        OWNER,
        "myrepo",
        &[("ci.yml", "stitch: {queue: missing}\n")],
    );
    let mut events = h.events(None).await;
    events
        .until("success and failed", |f| {
            reached(f, "3lzpipeline22", "ci.yml", "success")
                && reached(f, "3lzpipeline33", "ci.yml", "failed")
        })
        .await;
    let mut checked = 0;
    for (text, value) in events.texts.iter().zip(&events.frames) {
        let file = match (
            value["event"]["pipeline"]
                .as_str()
                .unwrap()
                .ends_with("3lzpipeline22"),
            value["event"]["status"].as_str().unwrap(),
        ) {
            (true, "pending") => "events_pending.json",
            (true, "running") => "events_running.json",
            (true, "success") => "events_success.json",
            (false, "failed") => "events_failed.json",
            other => panic!("unexpected frame {other:?}: {text}"),
        };
        let mut want = expected_live(&golden(file), value, &knot);
        if file == "events_failed.json" {
            want = want.replace("3lzpipeline22", "3lzpipeline33");
        }
        assert_eq!(*text, want, "{file}");
        checked += 1;
    }
    assert_eq!(checked, 4);

    let (frames, code) = h.read_logs(&knot, "3lzpipeline33", "ci.yml").await;
    assert_eq!(code, Some(1000));
    let time = |f: &str| {
        serde_json::from_str::<Value>(f).unwrap()["time"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        frames[0],
        golden("log_error_step_start.json").replace("2026-01-02T03:04:05.123Z", &time(&frames[0]))
    );
    assert_eq!(
        frames[1],
        golden("log_error_step_data.json").replace("2026-01-02T03:04:05.123Z", &time(&frames[1]))
    );

    let owner = h
        .client
        .get(h.url("/xrpc/sh.tangled.owner"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(owner, golden("xrpc_owner.json"));
    let err = h
        .client
        .post(h.url("/xrpc/sh.tangled.pipeline.cancelPipeline"))
        .body("{}")
        .send()
        .await
        .unwrap();
    // atproto XRPC answers a missing or refused token with 401.
    assert_eq!(err.status(), 401);
    assert_eq!(err.text().await.unwrap(), golden("xrpc_error.json"));
    events.close().await;
}
