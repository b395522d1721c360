//! The local runner with real processes: environment, exit mapping, cancel
//! of process trees, SIGKILL after the grace period, concurrency slots,
//! idempotency, restart recovery and live logs. Waits are on events (a
//! change in the build's state directory, a process's exit, a marker file),
//! each bounded; nothing sleeps.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use stitch_core::{
    BuildHandle, BuildId, BuildMetadata, BuildRunner, BuildStatus, ChangeSet, LogKind, LogLine,
    OutputStream, RunnerError, StatusReport, StepStatus, TriggerRequest,
};
use stitch_runners::local::{
    forget_build, LocalConfig, LocalConfigError, LocalRunner, LOG_FILE, STATE_FILE,
};
use tempfile::TempDir;

const DEADLINE: Duration = Duration::from_secs(20);

struct Env {
    dir: TempDir,
}

impl Env {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A scratch directory commands can write marker files into.
    fn scratch(&self) -> PathBuf {
        let p = self.dir.path().join("scratch");
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn config(&self, command: &str) -> LocalConfig {
        let mut c = LocalConfig::new(command, self.state_dir());
        c.workdir = Some(self.scratch());
        c.cancel_grace = Duration::from_secs(2);
        c
    }

    fn runner(&self, command: &str) -> LocalRunner {
        LocalRunner::new(self.config(command)).unwrap()
    }
}

fn request(head: &str) -> TriggerRequest {
    TriggerRequest::new(BuildId::new(), "ci", ChangeSet::head_only([head]))
}

async fn trigger(runner: &LocalRunner, req: &TriggerRequest) -> BuildHandle {
    req.handle().with_ref(runner.trigger(req).await.unwrap())
}

/// The directory the runner keeps `handle`'s state in: every change of the
/// build's status rewrites a file there, so a change in it is the event to
/// ask for the status again on.
fn build_dir(runner: &LocalRunner, handle: &BuildHandle) -> PathBuf {
    runner.config().state_dir.join(handle.build_id.as_str())
}

async fn wait_for(
    runner: &LocalRunner,
    handle: &BuildHandle,
    want: impl Fn(BuildStatus) -> bool,
) -> StatusReport {
    let what = format!("build {} to reach the wanted status", handle.build_id);
    let want = &want;
    stitch_testkit::dir_change(&[build_dir(runner, handle)], &what, move || async move {
        let report = runner.status(handle).await.unwrap();
        want(report.status).then_some(report)
    })
    .await
}

async fn wait_terminal(runner: &LocalRunner, handle: &BuildHandle) -> StatusReport {
    wait_for(runner, handle, BuildStatus::is_terminal).await
}

/// A marker file's text once its last line is complete.
async fn wait_file(path: &Path) -> String {
    stitch_testkit::file_text(path).await
}

/// Alive = exists and is not a zombie (the test machine's init may not
/// reap orphans promptly).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat[stat.rfind(')').unwrap() + 2..].chars().next().unwrap();
            state != 'Z' && state != 'X'
        }
    }
}

async fn wait_dead(pid: i32) {
    stitch_testkit::process_exit(pid).await;
}

async fn read_pids(path: &Path) -> Vec<i32> {
    wait_file(path)
        .await
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

async fn collect_logs(runner: &LocalRunner, handle: &BuildHandle) -> Vec<LogLine> {
    let stream = runner.logs(handle).await.unwrap();
    tokio::time::timeout(DEADLINE, stream.map(Result::unwrap).collect::<Vec<_>>())
        .await
        .expect("log stream did not end")
}

fn data(lines: &[LogLine]) -> Vec<(OutputStream, String)> {
    lines
        .iter()
        .filter(|l| l.kind == LogKind::Data)
        .map(|l| (l.stream.unwrap(), l.content.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_sees_the_build_in_its_environment() {
    let env = Env::new();
    let mut config = env.config(
        r#"printf '%s\n' "$STITCH_BUILD_ID" "$STITCH_QUEUE" "$STITCH_BASE" "$STITCH_HEAD" "$STITCH_METADATA" "$EXTRA" "$(pwd)""#,
    );
    config.env.insert("EXTRA".into(), "from config".into());
    let runner = LocalRunner::new(config).unwrap();
    let req = TriggerRequest::new(
        BuildId::new(),
        "ci",
        ChangeSet::new(vec!["b/1".into()], vec!["h/1".into(), "h/2".into()]),
    )
    .with_metadata(BuildMetadata::new().with("ticket", "T-1"));
    let handle = trigger(&runner, &req).await;
    let report = wait_terminal(&runner, &handle).await;
    assert_eq!(
        report.status,
        BuildStatus::Succeeded,
        "{:?}",
        report.metadata
    );
    assert_eq!(report.metadata.get("exit_status"), Some("0"));
    assert_eq!(
        report.metadata.get("ticket"),
        Some("T-1"),
        "caller metadata is echoed"
    );

    let out: Vec<String> = data(&collect_logs(&runner, &handle).await)
        .into_iter()
        .map(|(stream, text)| {
            assert_eq!(stream, OutputStream::Stdout);
            text
        })
        .collect();
    let workdir = env.scratch().canonicalize().unwrap();
    assert_eq!(
        out,
        vec![
            req.build_id.to_string(),
            "ci".into(),
            r#"["b/1"]"#.into(),
            r#"["h/1","h/2"]"#.into(),
            r#"{"ticket":"T-1"}"#.into(),
            "from config".into(),
            workdir.display().to_string(),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_is_one_step_with_tagged_streams() {
    let env = Env::new();
    let runner = env.runner("echo out; echo err >&2; printf 'no newline'");
    let handle = trigger(&runner, &request("h")).await;
    wait_terminal(&runner, &handle).await;
    let lines = collect_logs(&runner, &handle).await;
    let first = &lines[0];
    assert_eq!(
        (first.kind, first.step_status, first.step_id),
        (LogKind::Control, Some(StepStatus::Start), 1)
    );
    assert_eq!(
        first.step_command.as_deref(),
        Some("echo out; echo err >&2; printf 'no newline'")
    );
    let last = lines.last().unwrap();
    assert_eq!(
        (last.kind, last.step_status),
        (LogKind::Control, Some(StepStatus::End))
    );
    let mut d = data(&lines);
    d.sort();
    assert_eq!(
        d,
        vec![
            (OutputStream::Stdout, "no newline".to_string()),
            (OutputStream::Stdout, "out".to_string()),
            (OutputStream::Stderr, "err".to_string()),
        ]
    );

    // The same lines are on disk, one JSON object per line.
    let on_disk = std::fs::read_to_string(
        env.state_dir()
            .join(handle.build_id.as_str())
            .join(LOG_FILE),
    )
    .unwrap();
    let parsed: Vec<LogLine> = on_disk
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(parsed, lines);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            env.state_dir()
                .join(handle.build_id.as_str())
                .join(STATE_FILE),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(state["status"], "succeeded");
    assert_eq!(state["exit_status"], 0);
    assert!(state["pid"].as_i64().unwrap() > 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_zero_exit_fails_with_exit_status() {
    let env = Env::new();
    let runner = env.runner("echo failing >&2; exit 7");
    let handle = trigger(&runner, &request("h")).await;
    let report = wait_terminal(&runner, &handle).await;
    assert_eq!(report.status, BuildStatus::Failed);
    assert_eq!(report.metadata.get("exit_status"), Some("7"));
    assert_eq!(
        report.metadata.get("error"),
        Some("command exited with status 7")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn death_by_signal_fails_with_signal() {
    let env = Env::new();
    let runner = env.runner("kill -KILL $$");
    let handle = trigger(&runner, &request("h")).await;
    let report = wait_terminal(&runner, &handle).await;
    assert_eq!(report.status, BuildStatus::Failed);
    assert_eq!(report.metadata.get("signal"), Some("SIGKILL"));
    assert_eq!(report.metadata.get("exit_status"), None);
    assert!(report.metadata.get("error").unwrap().contains("SIGKILL"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstartable_command_fails_with_reason() {
    let env = Env::new();
    let mut config = env.config("true");
    config.workdir = Some(env.dir.path().join("does-not-exist"));
    let runner = LocalRunner::new(config).unwrap();
    let handle = trigger(&runner, &request("h")).await;
    let report = wait_terminal(&runner, &handle).await;
    assert_eq!(report.status, BuildStatus::Failed);
    let error = report.metadata.get("error").unwrap();
    assert!(
        error.contains("could not start") && error.contains("does-not-exist"),
        "{error}"
    );
    let lines = collect_logs(&runner, &handle).await;
    assert!(data(&lines)
        .iter()
        .any(|(s, t)| *s == OutputStream::Stderr && t.contains("could not start")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_the_whole_process_tree() {
    let env = Env::new();
    let runner = env.runner(
        r#"sleep 1000 & echo $! >> "$STITCH_BUILD_ID.pids"; sleep 1000 & echo $! >> "$STITCH_BUILD_ID.pids"; echo $$ >> "$STITCH_BUILD_ID.pids"; wait"#,
    );
    let handle = trigger(&runner, &request("h")).await;
    wait_for(&runner, &handle, |s| s == BuildStatus::Running).await;
    let pids_file = env.scratch().join(format!("{}.pids", handle.build_id));
    let pids: Vec<i32> = stitch_testkit::file_lines(&pids_file, 3)
        .await
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert!(pids.iter().all(|&p| alive(p)));

    runner.cancel(&handle).await.unwrap();
    let report = wait_terminal(&runner, &handle).await;
    assert_eq!(
        report.status,
        BuildStatus::Cancelled,
        "{:?}",
        report.metadata
    );
    for pid in pids {
        wait_dead(pid).await;
    }
    let lines = collect_logs(&runner, &handle).await;
    assert!(data(&lines)
        .iter()
        .any(|(_, t)| t.contains("cancel requested: sent SIGTERM")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_ignoring_sigterm_is_killed_after_the_grace_period() {
    let env = Env::new();
    let runner = env
        .runner(r#"trap '' TERM; echo $$ > "$STITCH_BUILD_ID.pid"; while :; do sleep 0.1; done"#);
    let handle = trigger(&runner, &request("h")).await;
    let pid = read_pids(&env.scratch().join(format!("{}.pid", handle.build_id))).await[0];

    runner.cancel(&handle).await.unwrap();
    // SIGTERM is ignored, so within the 2 s grace the build still runs.
    assert_eq!(
        runner.status(&handle).await.unwrap().status,
        BuildStatus::Running
    );
    let report = wait_terminal(&runner, &handle).await;
    assert_eq!(report.status, BuildStatus::Cancelled);
    assert_eq!(report.metadata.get("signal"), Some("SIGKILL"));
    wait_dead(pid).await;
    let lines = collect_logs(&runner, &handle).await;
    assert!(data(&lines)
        .iter()
        .any(|(_, t)| t.contains("grace period of 2s is over: sent SIGKILL")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_that_never_exits_runs_until_cancelled() {
    let env = Env::new();
    let runner = env.runner("exec tail -f /dev/null");
    let handle = trigger(&runner, &request("h")).await;
    wait_for(&runner, &handle, |s| s == BuildStatus::Running).await;
    // Cancel twice: the second is absorbed while the first is in flight.
    runner.cancel(&handle).await.unwrap();
    runner.cancel(&handle).await.unwrap();
    let report = wait_terminal(&runner, &handle).await;
    assert_eq!(report.status, BuildStatus::Cancelled);
    assert_eq!(report.metadata.get("signal"), Some("SIGTERM"));
    // And once terminal, cancel is a no-op.
    runner.cancel(&handle).await.unwrap();
    assert_eq!(
        runner.status(&handle).await.unwrap().status,
        BuildStatus::Cancelled
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_queues_builds_first_come_first_served() {
    let env = Env::new();
    // Each build waits for its own release file.
    let mut config =
        env.config(r#"while [ ! -f "$STITCH_BUILD_ID.release" ]; do sleep 0.02; done"#);
    config.concurrency = 2;
    let runner = LocalRunner::new(config).unwrap();
    let mut handles = Vec::new();
    for i in 0..4 {
        handles.push(trigger(&runner, &request(&format!("h/{i}"))).await);
    }
    let release = |h: &BuildHandle| {
        std::fs::write(env.scratch().join(format!("{}.release", h.build_id)), b"").unwrap();
    };

    wait_for(&runner, &handles[0], |s| s == BuildStatus::Running).await;
    wait_for(&runner, &handles[1], |s| s == BuildStatus::Running).await;
    // Both slots are taken, so the others cannot have started.
    assert_eq!(
        runner.status(&handles[2]).await.unwrap().status,
        BuildStatus::Accepted
    );
    assert_eq!(
        runner.status(&handles[3]).await.unwrap().status,
        BuildStatus::Accepted
    );

    release(&handles[0]);
    assert_eq!(
        wait_terminal(&runner, &handles[0]).await.status,
        BuildStatus::Succeeded
    );
    // The oldest waiting build gets the slot; the newest keeps waiting.
    wait_for(&runner, &handles[2], |s| s == BuildStatus::Running).await;
    assert_eq!(
        runner.status(&handles[3]).await.unwrap().status,
        BuildStatus::Accepted
    );

    // A waiting build can be cancelled without ever starting.
    runner.cancel(&handles[3]).await.unwrap();
    assert_eq!(
        runner.status(&handles[3]).await.unwrap().status,
        BuildStatus::Cancelled
    );

    release(&handles[1]);
    release(&handles[2]);
    for h in &handles[1..3] {
        assert_eq!(
            wait_terminal(&runner, h).await.status,
            BuildStatus::Succeeded
        );
    }
    assert!(!env
        .state_dir()
        .join(handles[3].build_id.as_str())
        .join(LOG_FILE)
        .exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrigger_never_starts_a_second_process() {
    let env = Env::new();
    let config = env.config(r#"echo run >> "$STITCH_BUILD_ID.runs""#);
    let req = request("h");
    {
        let runner = LocalRunner::new(config.clone()).unwrap();
        let first = trigger(&runner, &req).await;
        let again = trigger(&runner, &req).await;
        assert_eq!(first, again);
        wait_terminal(&runner, &first).await;
        trigger(&runner, &req).await;
    }
    // After a restart too.
    let runner = LocalRunner::new(config).unwrap();
    let handle = trigger(&runner, &req).await;
    assert_eq!(
        wait_terminal(&runner, &handle).await.status,
        BuildStatus::Succeeded
    );
    let runs =
        std::fs::read_to_string(env.scratch().join(format!("{}.runs", req.build_id))).unwrap();
    assert_eq!(runs, "run\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reports_a_killed_build_as_lost() {
    let env = Env::new();
    let command = r#"echo $$ > "$STITCH_BUILD_ID.pid"; exec sleep 1000"#;
    let req = request("h");
    let pid = {
        let runner = env.runner(command);
        let handle = trigger(&runner, &req).await;
        wait_for(&runner, &handle, |s| s == BuildStatus::Running).await;
        read_pids(&env.scratch().join(format!("{}.pid", req.build_id))).await[0]
    }; // runner dropped: stitch "crashed"
    assert!(alive(pid), "dropping the runner must not kill the build");
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_dead(pid).await;

    let runner = env.runner(command);
    let handle = req
        .handle()
        .with_ref(stitch_core::RunnerRef::new(req.build_id.as_str()));
    let report = runner.status(&handle).await.unwrap();
    assert_eq!(report.status, BuildStatus::Failed);
    let error = report.metadata.get("error").unwrap();
    assert!(
        error.starts_with("process lost: the stitch process running the build stopped"),
        "{error}"
    );
    // The log is closed with the reason, and the stream ends.
    let lines = collect_logs(&runner, &handle).await;
    assert!(data(&lines).iter().any(|(_, t)| t.contains("process lost")));
    assert_eq!(lines.last().unwrap().step_status, Some(StepStatus::End));
    // Trigger stays idempotent across the restart.
    assert_eq!(
        runner.trigger(&req).await.unwrap().id,
        req.build_id.as_str()
    );
    assert_eq!(
        runner.status(&handle).await.unwrap().status,
        BuildStatus::Failed
    );
}

/// stitch died after recording that it was starting the command but before
/// recording its process: the command may have run, so a restart fails the
/// build as lost and never starts it again (at most once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_never_reruns_a_build_caught_while_starting() {
    let env = Env::new();
    let command = r#"case "$STITCH_HEAD" in *long*) exec sleep 1000 ;; *) echo ran >> "$STITCH_BUILD_ID.ran" ;; esac"#;
    let long = request("h/long");
    let caught = request("h/caught");
    {
        let runner = env.runner(command); // concurrency 1: `caught` waits
        let handle = trigger(&runner, &long).await;
        wait_for(&runner, &handle, |s| s == BuildStatus::Running).await;
        trigger(&runner, &caught).await;
    }
    // Recreate the moment between "starting" and "running" on disk.
    let state_path = env
        .state_dir()
        .join(caught.build_id.as_str())
        .join(STATE_FILE);
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    assert_eq!(state["status"], "accepted");
    state["started_at"] = serde_json::json!("2026-01-01T00:00:00Z");
    std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();

    let runner = env.runner(command);
    let report = wait_terminal(&runner, &caught.handle()).await;
    assert_eq!(report.status, BuildStatus::Failed);
    let error = report.metadata.get("error").unwrap();
    assert!(
        error.contains("stitch stopped while starting the command"),
        "{error}"
    );
    // Neither the restart nor a re-trigger started it.
    runner.trigger(&caught).await.unwrap();
    assert_eq!(
        runner.status(&caught.handle()).await.unwrap().status,
        BuildStatus::Failed
    );
    assert!(!env
        .scratch()
        .join(format!("{}.ran", caught.build_id))
        .exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_kills_orphans_and_starts_waiting_builds() {
    let env = Env::new();
    let command = r#"case "$STITCH_HEAD" in *long*) sleep 1000 & echo $! > "$STITCH_BUILD_ID.pid"; wait ;; esac"#;
    let long = request("h/long");
    let short = request("h/short");
    let orphan = {
        let runner = env.runner(command); // concurrency 1
        let handle = trigger(&runner, &long).await;
        wait_for(&runner, &handle, |s| s == BuildStatus::Running).await;
        let waiting = trigger(&runner, &short).await;
        assert_eq!(
            runner.status(&waiting).await.unwrap().status,
            BuildStatus::Accepted
        );
        read_pids(&env.scratch().join(format!("{}.pid", long.build_id))).await[0]
    };
    assert!(alive(orphan));

    // The new runner recovers at start: the orphaned group is killed and
    // the waiting build gets the free slot.
    let runner = env.runner(command);
    wait_dead(orphan).await;
    let report = runner.status(&long.handle()).await.unwrap();
    assert_eq!(report.status, BuildStatus::Failed);
    assert!(report
        .metadata
        .get("error")
        .unwrap()
        .contains("sent SIGKILL"));
    let report = wait_terminal(&runner, &short.handle()).await;
    assert_eq!(
        report.status,
        BuildStatus::Succeeded,
        "{:?}",
        report.metadata
    );
}

async fn next(stream: &mut stitch_core::LogStream) -> LogLine {
    tokio::time::timeout(DEADLINE, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_a_running_build_until_it_ends() {
    let env = Env::new();
    let runner = env.runner(
        r#"echo one; while [ ! -f "$STITCH_BUILD_ID.go" ]; do sleep 0.02; done; echo two >&2"#,
    );
    let handle = trigger(&runner, &request("h")).await;
    let mut stream = runner.logs(&handle).await.unwrap();
    assert_eq!(next(&mut stream).await.step_status, Some(StepStatus::Start));
    assert_eq!(next(&mut stream).await.content, "one");
    // The build is still running: the stream waits for more.
    assert_eq!(
        runner.status(&handle).await.unwrap().status,
        BuildStatus::Running
    );
    std::fs::write(env.scratch().join(format!("{}.go", handle.build_id)), b"").unwrap();
    let two = next(&mut stream).await;
    assert_eq!(
        (two.content.as_str(), two.stream),
        ("two", Some(OutputStream::Stderr))
    );
    assert_eq!(next(&mut stream).await.step_status, Some(StepStatus::End));
    let end = tokio::time::timeout(DEADLINE, stream.next()).await.unwrap();
    assert!(end.is_none(), "stream must end after the build: {end:?}");
}

#[tokio::test]
async fn unknown_builds_are_not_found() {
    let env = Env::new();
    let runner = env.runner("true");
    let stranger = BuildHandle::new(BuildId::new(), "ci");
    assert!(matches!(
        runner.status(&stranger).await,
        Err(RunnerError::NotFound(_))
    ));
    assert!(matches!(
        runner.cancel(&stranger).await,
        Err(RunnerError::NotFound(_))
    ));
    assert!(matches!(
        runner.logs(&stranger).await,
        Err(RunnerError::NotFound(_))
    ));
}

#[tokio::test]
async fn bad_requests_are_refused_with_actionable_messages() {
    let env = Env::new();
    let runner = env.runner("true");
    let cases: Vec<(TriggerRequest, &str)> = vec![
        (
            TriggerRequest::new(BuildId::new(), "ci", ChangeSet::default()),
            "head must list at least one change URI",
        ),
        (
            TriggerRequest::new(BuildId::new(), "ci", ChangeSet::head_only(vec!["c"; 1001])),
            "at most 1000 are allowed",
        ),
        (
            TriggerRequest::new(
                BuildId::new(),
                "ci",
                ChangeSet::head_only(["u".repeat(3000)]),
            ),
            "limited to 2048 bytes",
        ),
        (
            request("h").with_metadata(BuildMetadata::new().with("bad key!", "v")),
            "keys may only use letters, digits",
        ),
    ];
    for (req, expected) in cases {
        match runner.trigger(&req).await {
            Err(RunnerError::InvalidRequest(msg)) => {
                assert!(msg.contains(expected), "{msg:?} vs {expected:?}")
            }
            other => panic!("expected InvalidRequest for {expected:?}, got {other:?}"),
        }
        // Nothing was recorded for a refused request.
        assert!(!env.state_dir().join(req.build_id.as_str()).exists());
    }
}

#[test]
fn bad_config_is_refused_before_touching_the_disk() {
    let env = Env::new();
    let mut config = env.config("true");
    config.concurrency = 0;
    assert!(matches!(
        LocalRunner::new(config),
        Err(LocalConfigError::ZeroConcurrency)
    ));
    assert!(!env.state_dir().exists());
}

#[tokio::test]
async fn job_env_and_a_private_job_api_reach_the_command() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let out = env.scratch().join("job.txt");
    let command = format!(
        "printf '%s|%s|%s\\n' \"$STITCH_JOB_TOKEN\" \"$STITCH_SERVER\" \"$STITCH_BUILD_ID\" > {out}.tmp; \
         test -S \"$STITCH_JOB_API_SOCKET\" && echo socket >> {out}.tmp; \
         test -n \"$STITCH_JOB_API_TOKEN\" && echo token >> {out}.tmp; \
         echo \"$STITCH_JOB_API_SOCKET\" >> {out}.tmp; mv {out}.tmp {out}",
        out = out.display()
    );
    let runner = env.runner(&command);
    let req = request("c/1");
    let job_env = [
        ("STITCH_JOB_TOKEN", "stj_secret".to_string()),
        ("STITCH_SERVER", "http://127.0.0.1:1".to_string()),
        ("STITCH_BUILD_ID", req.build_id.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let req = req.with_job_env(job_env);
    let handle = trigger(&runner, &req).await;
    let text = wait_file(&out).await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        format!("stj_secret|http://127.0.0.1:1|{}", req.build_id)
    );
    assert_eq!(&lines[1..3], ["socket", "token"], "{text}");
    let report = wait_terminal(&runner, &handle).await;
    assert_eq!(report.status, BuildStatus::Succeeded);
    // The token is not echoed as metadata, the state file is private, and
    // the job API went away with the command.
    assert!(!report
        .metadata
        .iter()
        .any(|(_, v)| v.contains("stj_secret")));
    let state = env.state_dir().join(req.build_id.as_str()).join(STATE_FILE);
    let mode = std::fs::metadata(&state).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let socket = PathBuf::from(lines[3]);
    // Bounded: a socket that outlives the build fails the wait.
    stitch_testkit::file_gone(&socket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_workdir_is_a_private_scratch_dir_removed_when_the_build_ends() {
    let env = Env::new();
    let mut config = env.config("pwd; stat -c %a .; touch made-here");
    config.workdir = None;
    let runner = LocalRunner::new(config).unwrap();
    let req = request("c/1");
    let handle = trigger(&runner, &req).await;
    let report = wait_terminal(&runner, &handle).await;
    assert_eq!(
        report.status,
        BuildStatus::Succeeded,
        "{:?}",
        report.metadata
    );
    let out: Vec<String> = data(&collect_logs(&runner, &handle).await)
        .into_iter()
        .map(|(_, text)| text)
        .collect();
    let dir = PathBuf::from(&out[0]);
    let tmp = std::env::temp_dir().canonicalize().unwrap();
    let expected_prefix = format!("stitch-build-{}-", req.build_id);
    assert_eq!(dir.parent(), Some(tmp.as_path()), "{out:?}");
    assert!(
        dir.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&expected_prefix)),
        "{out:?}"
    );
    assert!(!dir.starts_with(env.state_dir()), "{out:?}");
    assert_eq!(out[1], "700", "the build's directory is private");
    assert!(
        !dir.exists(),
        "the scratch directory is removed when the build ends"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_run_as_the_configured_account() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: running builds as another account needs root");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("the test machine has a `nobody` account");
    let env = Env::new();
    let mut config = env.config(
        r#"id -u; id -g; id -G; echo "$USER"; touch mine && echo wrote; test -w "$STITCH_JOB_API_SOCKET" && echo job-api"#,
    );
    config.workdir = None;
    config.run_as = stitch_runners::local::RunAs::resolve(Some("nobody"), None, 0).unwrap();
    let runner = LocalRunner::new(config).unwrap();
    let req = request("c/1");
    // With a way back to stitch, the build gets a job API: the account
    // must be able to reach its socket.
    let job_env = [
        ("STITCH_JOB_TOKEN", "stj_secret".to_string()),
        ("STITCH_SERVER", "http://127.0.0.1:1".to_string()),
        ("STITCH_BUILD_ID", req.build_id.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let req = req.with_job_env(job_env);
    let handle = trigger(&runner, &req).await;
    let report = wait_terminal(&runner, &handle).await;
    let out: Vec<String> = data(&collect_logs(&runner, &handle).await)
        .into_iter()
        .map(|(_, text)| text)
        .collect();
    assert_eq!(
        report.status,
        BuildStatus::Succeeded,
        "{:?} {out:?}",
        report.metadata
    );
    let uid = nobody.uid.to_string();
    let gid = nobody.gid.to_string();
    assert_eq!(
        out,
        [
            uid.as_str(),
            gid.as_str(),
            gid.as_str(),
            "nobody",
            "wrote",
            "job-api"
        ],
        "uid, gid, no supplementary groups of root, USER, a workdir and a job API the account can use"
    );
}

/// Retention's hook: a finished build's state directory goes; a running
/// one's is refused and stays; an unknown build has nothing to forget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_removes_a_finished_builds_state_and_refuses_a_running_one() {
    let env = Env::new();
    let runner = env.runner("exec tail -f /dev/null");
    let finished = trigger(&runner, &request("done")).await;
    wait_for(&runner, &finished, |s| s == BuildStatus::Running).await;
    runner.cancel(&finished).await.unwrap();
    wait_terminal(&runner, &finished).await;
    let running = trigger(&runner, &request("running")).await;
    wait_for(&runner, &running, |s| s == BuildStatus::Running).await;

    let finished_dir = env.state_dir().join(finished.build_id.as_str());
    let running_dir = env.state_dir().join(running.build_id.as_str());
    assert!(finished_dir.join(STATE_FILE).exists());
    assert!(forget_build(&env.state_dir(), &finished.build_id).unwrap());
    assert!(!finished_dir.exists());
    assert!(matches!(
        runner.status(&finished).await,
        Err(RunnerError::NotFound(_))
    ));
    assert!(
        !forget_build(&env.state_dir(), &finished.build_id).unwrap(),
        "nothing left"
    );
    assert!(!forget_build(&env.state_dir(), &BuildId::new()).unwrap());

    assert!(matches!(
        forget_build(&env.state_dir(), &running.build_id),
        Err(RunnerError::InvalidRequest(_))
    ));
    assert!(running_dir.join(STATE_FILE).exists());
    assert_eq!(
        runner.status(&running).await.unwrap().status,
        BuildStatus::Running
    );
    runner.cancel(&running).await.unwrap();
    wait_terminal(&runner, &running).await;
}
