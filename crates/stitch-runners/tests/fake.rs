//! The fake runner beyond the conformance suite: the simulated timeline,
//! answers from any instance, markers and live logs.

use std::time::Duration;

use futures::StreamExt;
use stitch_core::{
    BuildHandle, BuildId, BuildRunner, BuildStatus, ChangeSet, LogKind, LogLine, OutputStream,
    RunnerError, StatusReport, StepStatus, TriggerRequest,
};
use stitch_runners::fake::{FakeConfig, FakeRunner};
use tokio::time::Instant;

const DEADLINE: Duration = Duration::from_secs(20);

fn fast() -> FakeConfig {
    FakeConfig {
        accept_delay: Duration::from_millis(300),
        run_duration: Duration::from_millis(600),
        ..FakeConfig::default()
    }
}

fn request(head: &str) -> TriggerRequest {
    TriggerRequest::new(BuildId::new(), "default", ChangeSet::head_only([head]))
}

async fn trigger(runner: &FakeRunner, req: &TriggerRequest) -> BuildHandle {
    req.handle().with_ref(runner.trigger(req).await.unwrap())
}

/// When the fake's timeline next moves `handle`'s status after now: its
/// clock starts when the build id was minted, the build is accepted for
/// `accept_ms` and runs for `run_ms` (both carried in the ref). `None` when
/// nothing is left to change on its own.
fn next_change(handle: &BuildHandle) -> Option<chrono::DateTime<chrono::Utc>> {
    let r = handle.runner_ref.as_ref()?;
    let ms = |k: &str| r.data(k).and_then(|v| v.parse::<i64>().ok());
    let (accept, run) = (ms("accept_ms")?, ms("run_ms")?);
    let origin = handle.build_id.created_at();
    [accept, accept + run]
        .into_iter()
        .map(|at| origin + chrono::TimeDelta::milliseconds(at))
        .find(|at| *at > chrono::Utc::now())
}

async fn wait_for(runner: &FakeRunner, handle: &BuildHandle, want: BuildStatus) -> StatusReport {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let report = runner.status(handle).await.unwrap();
        if report.status == want {
            return report;
        }
        assert!(
            !report.status.is_terminal(),
            "ended {} waiting for {want}",
            report.status
        );
        // The fake's build is a timeline on the wall clock, computed when
        // asked: its next status is due at an instant the ref states, and
        // that instant is the event to wait for.
        let at = next_change(handle)
            .unwrap_or_else(|| panic!("still {} waiting for {want}", report.status));
        let wait = (at - chrono::Utc::now()).to_std().unwrap_or_default();
        let wake = Instant::now() + wait;
        assert!(
            wake < deadline,
            "still {} waiting for {want}",
            report.status
        );
        tokio::time::sleep_until(wake).await;
    }
}

async fn collect(runner: &FakeRunner, handle: &BuildHandle) -> Vec<LogLine> {
    let stream = runner.logs(handle).await.unwrap();
    tokio::time::timeout(DEADLINE, stream.map(Result::unwrap).collect::<Vec<_>>())
        .await
        .expect("log stream did not end")
}

#[test]
fn defaults_are_realistic() {
    let c = FakeConfig::default();
    assert_eq!(c.accept_delay, Duration::from_secs(1));
    assert_eq!(c.run_duration, Duration::from_secs(5));
    assert_eq!(c.slow_factor, 6);
    assert_eq!(c.cancel_dir, None);
}

#[tokio::test]
async fn builds_move_through_accepted_running_to_terminal() {
    let fake = FakeRunner::new(FakeConfig {
        accept_delay: Duration::from_secs(2),
        ..fast()
    })
    .unwrap();
    let handle = trigger(&fake, &request("c/1")).await;
    assert_eq!(
        fake.status(&handle).await.unwrap().status,
        BuildStatus::Accepted
    );
    let running = wait_for(&fake, &handle, BuildStatus::Running).await;
    assert!(running.metadata.get("fake_step").is_some());
    wait_for(&fake, &handle, BuildStatus::Succeeded).await;

    let failing = trigger(&fake, &request("c/1?stitch-fake=fail")).await;
    let report = wait_for(&fake, &failing, BuildStatus::Failed).await;
    assert_eq!(report.metadata.get("exit_status"), Some("1"));
    assert!(report
        .metadata
        .get("error")
        .unwrap()
        .contains("stitch-fake=fail"));
}

#[tokio::test]
async fn any_instance_answers_status_and_logs_alike() {
    let a = FakeRunner::new(fast()).unwrap();
    let b = FakeRunner::new(fast()).unwrap();
    let req = request("c/1#stitch-fake=fail");
    let handle = trigger(&a, &req).await;
    // Same id → same ref, from either instance.
    assert_eq!(Some(b.trigger(&req).await.unwrap()), handle.runner_ref);
    wait_for(&b, &handle, BuildStatus::Failed).await;
    assert_eq!(
        a.status(&handle).await.unwrap(),
        b.status(&handle).await.unwrap()
    );
    let from_a = collect(&a, &handle).await;
    assert_eq!(from_a, collect(&b, &handle).await);

    let steps: Vec<_> = from_a
        .iter()
        .filter(|l| l.step_status == Some(StepStatus::Start))
        .map(|l| l.content.as_str())
        .collect();
    assert_eq!(steps, ["checkout", "build", "test"]);
    assert!(from_a
        .iter()
        .any(|l| l.stream == Some(OutputStream::Stderr) && l.content.contains("FAILED")));
}

#[tokio::test]
async fn live_log_of_a_hanging_build_ends_when_it_is_cancelled() {
    let fake = FakeRunner::new(fast()).unwrap();
    let handle = trigger(&fake, &request("c/1?stitch-fake=hang")).await;
    let mut stream = fake.logs(&handle).await.unwrap();
    // Read into the test step, which never ends by itself.
    loop {
        let line = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if line.step_id == 3 && line.kind == LogKind::Data {
            break;
        }
    }
    assert_eq!(
        fake.status(&handle).await.unwrap().status,
        BuildStatus::Running
    );
    fake.cancel(&handle).await.unwrap();
    let rest: Vec<LogLine> = tokio::time::timeout(DEADLINE, stream.map(Result::unwrap).collect())
        .await
        .expect("stream did not end after cancel");
    let n = rest.len();
    assert!(n >= 2);
    assert_eq!(rest[n - 2].content, "build cancelled");
    assert_eq!(
        (rest[n - 1].step_id, rest[n - 1].step_status),
        (3, Some(StepStatus::End))
    );
    assert_eq!(
        fake.status(&handle).await.unwrap().status,
        BuildStatus::Cancelled
    );
}

#[tokio::test]
async fn cancel_while_accepted_leaves_no_log() {
    let fake = FakeRunner::new(FakeConfig {
        accept_delay: Duration::from_secs(30),
        ..fast()
    })
    .unwrap();
    let handle = trigger(&fake, &request("c/1")).await;
    fake.cancel(&handle).await.unwrap();
    assert_eq!(
        fake.status(&handle).await.unwrap().status,
        BuildStatus::Cancelled
    );
    assert!(collect(&fake, &handle).await.is_empty());
}

#[tokio::test]
async fn unknown_marker_reports_unknown_until_cancelled() {
    let fake = FakeRunner::new(fast()).unwrap();
    let handle = trigger(&fake, &request("c/1?stitch-fake=unknown")).await;
    let report = wait_for(&fake, &handle, BuildStatus::Unknown).await;
    assert_eq!(report.metadata.get("provider_state"), Some("mystery"));
    fake.cancel(&handle).await.unwrap();
    assert_eq!(
        fake.status(&handle).await.unwrap().status,
        BuildStatus::Cancelled
    );
}

#[tokio::test]
async fn status_error_marker_fails_every_read() {
    let fake = FakeRunner::new(fast()).unwrap();
    let handle = trigger(&fake, &request("c/1?stitch-fake=status-error")).await;
    for err in [
        fake.status(&handle).await.unwrap_err(),
        fake.cancel(&handle).await.unwrap_err(),
        fake.logs(&handle).await.err().unwrap(),
    ] {
        assert!(
            matches!(err, RunnerError::Http { status: 503, .. }),
            "{err}"
        );
    }
}

#[tokio::test]
async fn handles_without_a_ref_are_not_found() {
    let fake = FakeRunner::new(fast()).unwrap();
    let req = request("c/1");
    fake.trigger(&req).await.unwrap();
    let err = fake.status(&req.handle()).await.unwrap_err();
    assert!(err.is_not_found());
    assert!(
        err.to_string().contains("triggering it again is safe"),
        "{err}"
    );
}

#[tokio::test]
async fn bad_requests_are_refused() {
    let fake = FakeRunner::new(fast()).unwrap();
    let cases = [
        (
            TriggerRequest::new(BuildId::new(), "default", ChangeSet::default()),
            "head must list",
        ),
        (request("c/1?stitch-fake=explode"), "valid markers: fail,"),
    ];
    for (req, expected) in cases {
        match fake.trigger(&req).await {
            Err(RunnerError::InvalidRequest(m)) => assert!(m.contains(expected), "{m}"),
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
    }
}
