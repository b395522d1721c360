//! The trigger and signal stages end to end on a real SQLite file, with the
//! fake and local runners (real child processes).

use std::collections::BTreeMap;
use std::time::Duration;

use stitch_core::{BuildId, BuildStatus};
use stitch_server::config::{
    Config, FakeSection, LocalSection, PollConfig, QueueConfig, RetryConfig, RunnerSection,
};
use stitch_server::service::{self, CreateBuild};
use stitch_server::stages;
use stitch_server::state::AppState;
use stitch_store::EventKind;
use tokio_util::sync::CancellationToken;

struct Harness {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    state: AppState,
    stop: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn fast_queue() -> QueueConfig {
    QueueConfig {
        poll: PollConfig {
            accepted: Duration::from_millis(100),
            running: Duration::from_millis(100),
        },
        retry: RetryConfig {
            max_attempts: 3,
            initial: Duration::from_millis(50),
            max: Duration::from_millis(200),
        },
        runner: RunnerSection::Fake(FakeSection {
            accept_delay: Duration::from_millis(100),
            run_duration: Duration::from_millis(300),
            slow_factor: 2,
        }),
        ..QueueConfig::default()
    }
}

fn local(command: &str) -> QueueConfig {
    QueueConfig {
        runner: RunnerSection::Local(LocalSection {
            command: command.to_string(),
            workdir: Some(".".into()),
            cancel_grace: Duration::from_millis(500),
            env: BTreeMap::new(),
            pass_env: Vec::new(),
            user: None,
            group: None,
        }),
        concurrency: Some(4),
        ..fast_queue()
    }
}

async fn harness(
    extra: impl FnOnce(&std::path::Path, &mut BTreeMap<String, QueueConfig>),
) -> Harness {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut queues = BTreeMap::new();
    queues.insert("default".to_string(), fast_queue());
    extra(&dir, &mut queues);
    let config = Config {
        data_dir: dir.join("data"),
        queues,
        ..Config::default()
    };
    let state = AppState::open(config).await.unwrap();
    let stop = CancellationToken::new();
    stages::start(&state, stop.clone());
    Harness {
        _dir: tmp,
        dir,
        state,
        stop,
    }
}

async fn create(h: &Harness, queue: &str, head: &str) -> BuildId {
    let (build, created) = service::create_build(
        &h.state,
        queue,
        CreateBuild {
            head: vec![head.to_string()],
            ..CreateBuild::default()
        },
    )
    .await
    .unwrap();
    assert!(created);
    build.id
}

async fn wait_terminal(h: &Harness, id: &BuildId) -> stitch_store::Build {
    wait_for(h, id, "terminal", |b| b.status.is_terminal()).await
}

/// Waits until the build satisfies `done`, re-reading it after each
/// committed event (no polling); fails after 20 s.
async fn wait_for(
    h: &Harness,
    id: &BuildId,
    what: &str,
    done: impl Fn(&stitch_store::Build) -> bool,
) -> stitch_store::Build {
    let mut events = h.state.event_seq();
    let wait = async {
        loop {
            let b = h.state.store().get_build(id).await.unwrap();
            if done(&b) {
                return b;
            }
            events.changed().await.unwrap();
        }
    };
    match tokio::time::timeout(Duration::from_secs(20), wait).await {
        Ok(b) => b,
        Err(_) => {
            let b = h.state.store().get_build(id).await.unwrap();
            panic!("build {id} not {what} within 20 s: still {}", b.status)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_builds_reach_their_outcome_with_events() {
    let h = harness(|_, _| {}).await;
    let ok = create(&h, "default", "https://forge/c/1").await;
    let bad = create(&h, "default", "https://forge/c/2?stitch-fake=fail").await;
    let ok_b = wait_terminal(&h, &ok).await;
    let bad_b = wait_terminal(&h, &bad).await;
    assert_eq!(ok_b.status, BuildStatus::Succeeded);
    assert_eq!(bad_b.status, BuildStatus::Failed);
    assert!(ok_b.runner_ref.is_some());
    let events = h.state.store().events_for_build(&ok).await.unwrap();
    let statuses: Vec<BuildStatus> = events
        .iter()
        .filter(|e| e.kind == EventKind::Status)
        .map(|e| e.status)
        .collect();
    assert_eq!(statuses.first(), Some(&BuildStatus::Accepted));
    assert_eq!(statuses.last(), Some(&BuildStatus::Succeeded));
    assert!(statuses.contains(&BuildStatus::Running), "{statuses:?}");
    // The event log is gapless across both builds.
    let all = h.state.store().events_after(0, 1000).await.unwrap();
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_trigger_retries_fail_the_build() {
    let h = harness(|_, _| {}).await;
    let id = create(&h, "default", "https://forge/c/1?stitch-fake=trigger-error").await;
    let b = wait_terminal(&h, &id).await;
    assert_eq!(b.status, BuildStatus::Failed);
    let error = b.metadata().get("error").cloned().unwrap_or_default();
    assert!(
        error.contains("trigger failed") && error.contains("3 attempts"),
        "{error}"
    );
    assert!(b.runner_ref.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_builds_run_once_each_and_report_exit_status() {
    let h = harness(|dir, q| {
        let log = dir.join("ran.txt");
        q.insert(
            "ci".into(),
            local(&format!(
                "echo \"$STITCH_BUILD_ID\" >> {}; case \"$STITCH_HEAD\" in *fail*) exit 3;; esac",
                log.display()
            )),
        );
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let head = if i == 5 { "c/fail" } else { "c/ok" };
        ids.push(create(&h, "ci", &format!("{head}{i}")).await);
    }
    for (i, id) in ids.iter().enumerate() {
        let b = wait_terminal(&h, id).await;
        if i == 5 {
            assert_eq!(b.status, BuildStatus::Failed);
            assert_eq!(
                b.metadata().get("exit_status").map(String::as_str),
                Some("3")
            );
        } else {
            assert_eq!(b.status, BuildStatus::Succeeded, "{:?}", b.metadata());
        }
    }
    let ran = std::fs::read_to_string(h.dir.join("ran.txt")).unwrap();
    let mut lines: Vec<&str> = ran.lines().collect();
    lines.sort();
    let mut expected: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    expected.sort();
    assert_eq!(lines, expected, "every build ran exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_a_running_local_build_stops_it() {
    let h = harness(|dir, q| {
        let pid = dir.join("pid");
        q.insert(
            "slow".into(),
            local(&format!(
                "echo $$ > {}; echo started; sleep 30",
                pid.display()
            )),
        );
    })
    .await;
    let id = create(&h, "slow", "c/1").await;
    wait_for(&h, &id, "running", |b| b.status == BuildStatus::Running).await;
    let started = tokio::time::Instant::now();
    service::cancel_build(&h.state, &id).await.unwrap();
    let b = wait_terminal(&h, &id).await;
    assert_eq!(b.status, BuildStatus::Cancelled);
    assert!(started.elapsed() < Duration::from_secs(10));
    // The build's process is gone.
    let pid: i32 = std::fs::read_to_string(h.dir.join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let alive = std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ");
    assert!(
        !alive,
        "process {pid} of the cancelled build is still running"
    );
    // Cancelling a terminal build changes nothing.
    let again = service::cancel_build(&h.state, &id).await.unwrap();
    assert_eq!(again.status, BuildStatus::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_cancel_and_fail_with_a_reason() {
    let h = harness(|_, q| {
        q.insert(
            "bounded".into(),
            QueueConfig {
                max_duration: Some(Duration::from_millis(800)),
                ..fast_queue()
            },
        );
        q.insert(
            "stuck".into(),
            QueueConfig {
                accepted_timeout: Some(Duration::from_millis(300)),
                runner: RunnerSection::Fake(FakeSection {
                    accept_delay: Duration::from_secs(60),
                    run_duration: Duration::from_secs(1),
                    slow_factor: 1,
                }),
                ..fast_queue()
            },
        );
    })
    .await;
    let hang = create(&h, "bounded", "c/1?stitch-fake=hang").await;
    let stuck = create(&h, "stuck", "c/2").await;
    let b = wait_terminal(&h, &hang).await;
    assert_eq!(b.status, BuildStatus::Failed);
    assert!(
        b.failure_reason
            .as_deref()
            .unwrap_or("")
            .contains("max_duration"),
        "{:?}",
        b.failure_reason
    );
    let b = wait_terminal(&h, &stuck).await;
    assert_eq!(b.status, BuildStatus::Failed);
    assert!(
        b.failure_reason
            .as_deref()
            .unwrap_or("")
            .contains("accepted_timeout"),
        "{:?}",
        b.failure_reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_returns_the_same_build() {
    let h = harness(|_, _| {}).await;
    let req = CreateBuild {
        head: vec!["c/1".into()],
        idempotency_key: Some("merge-42".into()),
        ..CreateBuild::default()
    };
    let (a, created_a) = service::create_build(&h.state, "default", req.clone())
        .await
        .unwrap();
    let (b, created_b) = service::create_build(&h.state, "default", req)
        .await
        .unwrap();
    assert!(created_a && !created_b);
    assert_eq!(a.id, b.id);
    // The same key for a different request is a conflict, not a silent replay.
    let other = CreateBuild {
        head: vec!["c/2".into()],
        idempotency_key: Some("merge-42".into()),
        ..CreateBuild::default()
    };
    assert!(matches!(
        service::create_build(&h.state, "default", other).await,
        Err(service::ServiceError::IdempotencyConflict { .. })
    ));
    assert!(matches!(
        service::create_build(
            &h.state,
            "nope",
            CreateBuild {
                head: vec!["x".into()],
                ..CreateBuild::default()
            }
        )
        .await,
        Err(service::ServiceError::UnknownQueue(_))
    ));
    assert!(matches!(
        service::create_build(&h.state, "default", CreateBuild::default()).await,
        Err(service::ServiceError::Invalid(_))
    ));
}

/// A cancel arriving at each phase of a fake-runner build's life takes
/// effect at once although the queue polls only every 60 s: a wake the
/// queue dropped would leave the build hanging a minute, far beyond the
/// wait. The phases are made by holding the runner's calls at sync points
/// (the call's work done, its answer held), not by timing.
mod push_never_lost {
    use super::*;
    use std::sync::{Arc, Mutex};
    use stitch_core::{
        BuildHandle, BuildRunner, LogStream, RunnerError, RunnerRef, StatusReport, TriggerRequest,
    };
    use stitch_fake_providers::faults::Pause;

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Call {
        Trigger,
        Status,
    }

    /// A runner whose next call of a kind is held at a [`Pause`].
    struct HeldRunner {
        inner: Arc<dyn BuildRunner>,
        holds: Mutex<Vec<(Call, Pause)>>,
        cancels: std::sync::atomic::AtomicU32,
    }

    impl HeldRunner {
        fn hold_next(&self, call: Call) -> Pause {
            let pause = Pause::new();
            self.holds.lock().unwrap().push((call, pause.clone()));
            pause
        }

        async fn maybe_hold(&self, call: Call) {
            let pause = {
                let mut holds = self.holds.lock().unwrap();
                let at = holds.iter().position(|(c, _)| *c == call);
                at.map(|i| holds.remove(i).1)
            };
            if let Some(p) = pause {
                p.hold().await;
            }
        }
    }

    #[async_trait::async_trait]
    impl BuildRunner for HeldRunner {
        fn name(&self) -> &'static str {
            self.inner.name()
        }
        async fn trigger(&self, req: &TriggerRequest) -> Result<RunnerRef, RunnerError> {
            let answer = self.inner.trigger(req).await;
            self.maybe_hold(Call::Trigger).await;
            answer
        }
        async fn status(&self, handle: &BuildHandle) -> Result<StatusReport, RunnerError> {
            let answer = self.inner.status(handle).await;
            self.maybe_hold(Call::Status).await;
            answer
        }
        async fn cancel(&self, handle: &BuildHandle) -> Result<(), RunnerError> {
            self.cancels
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.cancel(handle).await
        }
        async fn logs(&self, handle: &BuildHandle) -> Result<LogStream, RunnerError> {
            self.inner.logs(handle).await
        }
    }

    /// A stitch on one fake-runner queue polling every 60 s, its runner
    /// wrapped in a [`HeldRunner`].
    async fn harness() -> (Harness, Arc<HeldRunner>) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut queue = fast_queue();
        queue.poll = PollConfig {
            accepted: Duration::from_secs(60),
            running: Duration::from_secs(60),
        };
        let config = Config {
            data_dir: dir.join("data"),
            queues: BTreeMap::from([("default".to_string(), queue)]),
            ..Config::default()
        };
        let held = Arc::new(Mutex::new(None::<Arc<HeldRunner>>));
        let slot = held.clone();
        let state = AppState::open_with_runners(config, move |_, inner| {
            let runner = Arc::new(HeldRunner {
                inner,
                holds: Mutex::new(Vec::new()),
                cancels: Default::default(),
            });
            *slot.lock().unwrap() = Some(runner.clone());
            runner
        })
        .await
        .unwrap();
        let stop = CancellationToken::new();
        stages::start(&state, stop.clone());
        let runner = held.lock().unwrap().take().unwrap();
        let h = Harness {
            _dir: tmp,
            dir,
            state,
            stop,
        };
        (h, runner)
    }

    async fn ends_as(h: &Harness, id: &BuildId, status: BuildStatus) {
        assert_eq!(wait_terminal(h, id).await.status, status);
    }

    enum CancelAt {
        WhileHeld,
        AfterAnswer,
    }

    async fn cancel_around(call: Call, at: CancelAt) {
        let (h, runner) = harness().await;
        let pause = runner.hold_next(call);
        let id = create(&h, "default", "https://git.example/c/1?stitch-fake=hang").await;
        pause.arrived().await;
        match at {
            CancelAt::WhileHeld => {
                service::cancel_build(&h.state, &id).await.unwrap();
                pause.release();
            }
            CancelAt::AfterAnswer => {
                pause.release();
                service::cancel_build(&h.state, &id).await.unwrap();
            }
        }
        ends_as(&h, &id, BuildStatus::Cancelled).await;
        assert_eq!(
            runner.cancels.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one cancel reached the runner"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancel_before_the_trigger_returns_cancels_at_once() {
        cancel_around(Call::Trigger, CancelAt::WhileHeld).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancel_between_the_trigger_and_the_first_poll_cancels_at_once() {
        cancel_around(Call::Trigger, CancelAt::AfterAnswer).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancel_during_a_poll_cancels_at_once() {
        cancel_around(Call::Status, CancelAt::WhileHeld).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancel_during_the_hold_cancels_at_once() {
        // The first poll's answer went out; the stage is writing or has
        // written its 60 s hold when the cancel lands.
        cancel_around(Call::Status, CancelAt::AfterAnswer).await;
    }
}
