//! Several local runners sharing one state directory, as several
//! `stitch serve` processes on one machine do (ADR 0008). Where a process
//! must die, the other runner lives in a real child process (this test
//! binary re-executed, see `runner_process`) that is SIGKILLed. Otherwise
//! runners in this process stand in for processes: `flock` locks belong to
//! open file descriptions, so two runners in one process exclude each other
//! exactly like two processes. Waits are on events (a change in a build's
//! state directory, a process's exit, a marker file), each bounded.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rand::{Rng, SeedableRng};
use stitch_core::{
    BuildHandle, BuildId, BuildRunner, BuildStatus, ChangeSet, LogKind, LogLine, RunnerRef,
    StatusReport, StepStatus, TriggerRequest,
};
use stitch_runners::local::{LocalConfig, LocalRunner, CANCEL_FILE, PROCESS_LOST, STATE_FILE};
use tempfile::TempDir;
use tokio::time::Instant;

const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(25);
/// The environment variable carrying a child runner's instructions.
const CHILD_SPEC: &str = "STITCH_TEST_LOCAL_RUNNER_SPEC";

/// Records each run of a build (one line in `<build_id>.runs`); heads
/// containing `long` then write their pid and sleep, `gate` ones wait for
/// `<build_id>.go`, `term` ones exit 0 on SIGTERM after saying so, `slow`
/// ones take a moment.
const COMMAND: &str = r#"
echo run >> "$STITCH_BUILD_ID.runs"
echo "started $STITCH_BUILD_ID"
case "$STITCH_HEAD" in
  *term*) trap 'echo got-term; exit 0' TERM; echo $$ > "$STITCH_BUILD_ID.pid"; while :; do sleep 0.05; done ;;
  *long*) echo $$ > "$STITCH_BUILD_ID.pid"; exec sleep 1000 ;;
  *slow*) sleep 0.2 ;;
  *gate*) while [ ! -f "$STITCH_BUILD_ID.go" ]; do sleep 0.02; done; echo after-gate >&2 ;;
esac
"#;

struct Env {
    dir: TempDir,
}

impl Env {
    fn new() -> Self {
        let env = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir_all(env.scratch()).unwrap();
        env
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn scratch(&self) -> PathBuf {
        self.dir.path().join("scratch")
    }

    fn config(&self, concurrency: usize) -> LocalConfig {
        let mut c = LocalConfig::new(COMMAND, self.state_dir());
        c.workdir = Some(self.scratch());
        c.cancel_grace = Duration::from_secs(2);
        c.concurrency = concurrency;
        c
    }

    fn runner(&self, concurrency: usize) -> LocalRunner {
        LocalRunner::new(self.config(concurrency)).unwrap()
    }

    /// How many times the build's command ran.
    fn runs(&self, id: &BuildId) -> usize {
        std::fs::read_to_string(self.scratch().join(format!("{id}.runs")))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    fn open_gate(&self, id: &BuildId) {
        std::fs::write(self.scratch().join(format!("{id}.go")), b"").unwrap();
    }

    async fn pid_of(&self, id: &BuildId) -> i32 {
        wait_file(&self.scratch().join(format!("{id}.pid")))
            .await
            .trim()
            .parse()
            .unwrap()
    }

    /// Start a runner in a child process that triggers `builds` in order
    /// and reports ready once the first `started` of them have started.
    async fn child_runner(
        &self,
        concurrency: usize,
        builds: &[&TriggerRequest],
        started: usize,
    ) -> ChildRunner {
        let ready = self.dir.path().join(format!("ready-{}", BuildId::new()));
        let spec = serde_json::json!({
            "state_dir": self.state_dir(),
            "workdir": self.scratch(),
            "concurrency": concurrency,
            "builds": builds.iter().map(|r| serde_json::json!([r.build_id.as_str(), r.changes.head[0]])).collect::<Vec<_>>(),
            "started": started,
            "ready": ready,
        });
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "runner_process",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_SPEC, spec.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let mut child = ChildRunner { child };
        // Ready is a file renamed into place; an exit first is a failure.
        tokio::select! {
            biased;
            () = stitch_testkit::file_exists(&ready) => {}
            () = stitch_testkit::process_exit(pid) => {
                let status = child.child.wait().unwrap();
                panic!("child runner exited before it was ready: {status}");
            }
        }
        child
    }
}

/// A runner in a child process; SIGKILLed when dropped at the latest.
struct ChildRunner {
    child: std::process::Child,
}

impl ChildRunner {
    /// SIGKILL, like a crash or the OOM killer: nothing gets to clean up.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildRunner {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The child side of `Env::child_runner`: a `LocalRunner` that triggers
/// the builds it is given, reports ready, then supervises them until it is
/// killed. Runs only when re-executed with `CHILD_SPEC` set.
#[test]
#[ignore = "the body of the child processes the other tests start"]
fn runner_process() {
    let Ok(spec) = std::env::var(CHILD_SPEC) else {
        // Run directly (`--include-ignored`): there is nothing to host.
        eprintln!("runner_process only runs as a child of the other tests in this file");
        return;
    };
    let spec: serde_json::Value = serde_json::from_str(&spec).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let path = |k: &str| PathBuf::from(spec[k].as_str().unwrap());
        let mut config = LocalConfig::new(COMMAND, path("state_dir"));
        config.workdir = Some(path("workdir"));
        config.cancel_grace = Duration::from_secs(2);
        config.concurrency = spec["concurrency"].as_u64().unwrap() as usize;
        let runner = LocalRunner::new(config).unwrap();
        let mut handles = Vec::new();
        for b in spec["builds"].as_array().unwrap() {
            let id: BuildId = b[0].as_str().unwrap().parse().unwrap();
            let req = TriggerRequest::new(id, "ci", ChangeSet::head_only([b[1].as_str().unwrap()]));
            handles.push(trigger(&runner, &req).await);
        }
        let started = spec["started"].as_u64().unwrap() as usize;
        for h in &handles[..started] {
            wait_for(&runner, h, |s| s != BuildStatus::Accepted).await;
        }
        // Renamed into place: the parent never sees a half-written file.
        let ready = path("ready");
        let tmp = ready.with_extension("tmp");
        std::fs::write(&tmp, std::process::id().to_string()).unwrap();
        std::fs::rename(&tmp, &ready).unwrap();
        // Supervise until killed.
        std::future::pending::<()>().await;
    });
}

fn request(head: &str) -> TriggerRequest {
    TriggerRequest::new(BuildId::new(), "ci", ChangeSet::head_only([head]))
}

fn handle(req: &TriggerRequest) -> BuildHandle {
    req.handle().with_ref(RunnerRef::new(req.build_id.as_str()))
}

async fn trigger(runner: &LocalRunner, req: &TriggerRequest) -> BuildHandle {
    let r = runner.trigger(req).await.unwrap();
    assert_eq!(r.id, req.build_id.as_str());
    req.handle().with_ref(r)
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

async fn next(stream: &mut stitch_core::LogStream) -> LogLine {
    tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("log line in time")
        .expect("stream still open")
        .unwrap()
}

fn ends(lines: &[LogLine]) -> usize {
    lines
        .iter()
        .filter(|l| l.kind == LogKind::Control && l.step_status == Some(StepStatus::End))
        .count()
}

async fn collect_logs(runner: &LocalRunner, handle: &BuildHandle) -> Vec<LogLine> {
    let stream = runner.logs(handle).await.unwrap();
    tokio::time::timeout(DEADLINE, stream.map(Result::unwrap).collect::<Vec<_>>())
        .await
        .expect("log stream did not end")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_build_triggered_through_two_runners_runs_once() {
    let env = Env::new();
    let a = env.runner(2);
    let b = env.runner(2);
    for _ in 0..10 {
        let req = request("h/quick");
        // At once, then again after it ran, through both.
        let (ra, rb) = tokio::join!(a.trigger(&req), b.trigger(&req));
        assert_eq!(ra.unwrap(), rb.unwrap());
        let h = handle(&req);
        assert_eq!(wait_terminal(&a, &h).await.status, BuildStatus::Succeeded);
        assert_eq!(wait_terminal(&b, &h).await.status, BuildStatus::Succeeded);
        trigger(&a, &req).await;
        trigger(&b, &req).await;
        assert_eq!(env.runs(&req.build_id), 1, "build {}", req.build_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_logs_follow_a_build_another_process_runs() {
    let env = Env::new();
    let gated = request("h/gate");
    let child = env.child_runner(1, &[&gated], 1).await;
    let here = env.runner(1);
    let h = handle(&gated);

    // The child supervises it; this runner reports what it recorded.
    assert_eq!(here.status(&h).await.unwrap().status, BuildStatus::Running);
    let mut stream = here.logs(&h).await.unwrap();
    assert_eq!(next(&mut stream).await.step_status, Some(StepStatus::Start));
    assert_eq!(
        next(&mut stream).await.content,
        format!("started {}", gated.build_id)
    );
    // A redelivered trigger here starts nothing and leaves it alone.
    trigger(&here, &gated).await;
    assert_eq!(here.status(&h).await.unwrap().status, BuildStatus::Running);

    env.open_gate(&gated.build_id);
    assert_eq!(next(&mut stream).await.content, "after-gate");
    assert_eq!(next(&mut stream).await.step_status, Some(StepStatus::End));
    let end = tokio::time::timeout(DEADLINE, stream.next()).await.unwrap();
    assert!(end.is_none(), "stream must end with the build: {end:?}");
    let report = wait_terminal(&here, &h).await;
    assert_eq!(report.status, BuildStatus::Succeeded);
    assert_eq!(report.metadata.get("exit_status"), Some("0"));
    assert_eq!(env.runs(&gated.build_id), 1);
    drop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_builds_of_another_process() {
    let env = Env::new();
    let running = request("h/term");
    let waiting = request("h/quick");
    let _child = env.child_runner(1, &[&running, &waiting], 1).await;
    let here = env.runner(1);
    let (hr, hw) = (handle(&running), handle(&waiting));
    let pid = env.pid_of(&running.build_id).await;

    // The waiting build: its owner lives, but it can be cancelled on the
    // spot, and never starts.
    here.cancel(&hw).await.unwrap();
    assert_eq!(
        here.status(&hw).await.unwrap().status,
        BuildStatus::Cancelled
    );

    // The running build: the child's supervisor sees the marker and stops
    // the command; the outcome is recorded once, by the child.
    here.cancel(&hr).await.unwrap();
    assert!(env
        .state_dir()
        .join(running.build_id.as_str())
        .join(CANCEL_FILE)
        .exists());
    let report = wait_terminal(&here, &hr).await;
    assert_eq!(
        report.status,
        BuildStatus::Cancelled,
        "{:?}",
        report.metadata
    );
    assert_eq!(report.metadata.get("exit_status"), Some("0"));
    wait_dead(pid).await;
    let lines = collect_logs(&here, &hr).await;
    assert!(lines.iter().any(|l| l.content == "got-term"));
    assert!(lines
        .iter()
        .any(|l| l.content.contains("cancel requested: sent SIGTERM")));
    assert_eq!(
        ends(&lines),
        1,
        "one step end: the outcome is recorded once"
    );
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            env.state_dir()
                .join(running.build_id.as_str())
                .join(STATE_FILE),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(state["cancel_requested_at"].is_string(), "{state}");

    // Cancel again, from both sides: a no-op on terminal builds.
    here.cancel(&hr).await.unwrap();
    here.cancel(&hw).await.unwrap();
    assert_eq!(
        here.status(&hw).await.unwrap().status,
        BuildStatus::Cancelled
    );
    assert_eq!(env.runs(&waiting.build_id), 0);
    assert_eq!(env.runs(&running.build_id), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_of_a_killed_process_are_adopted_by_a_survivor() {
    let env = Env::new();
    let long = request("h/long");
    let first = request("h/first");
    let second = request("h/second");
    let cancelled = request("h/cancelled");
    let mut child = env
        .child_runner(1, &[&long, &first, &second, &cancelled], 1)
        .await;
    let survivor = env.runner(1);
    let pid = env.pid_of(&long.build_id).await;

    // While the child lives, its builds stay its own: a new runner on the
    // directory steals nothing.
    assert_eq!(
        survivor.status(&handle(&long)).await.unwrap().status,
        BuildStatus::Running
    );
    for req in [&first, &second, &cancelled] {
        assert_eq!(
            survivor.status(&handle(req)).await.unwrap().status,
            BuildStatus::Accepted
        );
    }

    child.kill();
    assert!(alive(pid), "the command outlives the killed runner");

    // A cancel of an orphan adopts it and cancels it: it never runs.
    survivor.cancel(&handle(&cancelled)).await.unwrap();
    assert_eq!(
        survivor.status(&handle(&cancelled)).await.unwrap().status,
        BuildStatus::Cancelled
    );
    // The running build lost its process: failed, leftovers killed.
    let report = survivor.status(&handle(&long)).await.unwrap();
    assert_eq!(report.status, BuildStatus::Failed);
    let error = report.metadata.get("error").unwrap();
    assert!(error.starts_with(PROCESS_LOST), "{error}");
    assert!(error.contains("sent SIGKILL"), "{error}");
    wait_dead(pid).await;
    // Its waiting builds start here, in order, once each.
    for req in [&first, &second] {
        let report = wait_terminal(&survivor, &handle(req)).await;
        assert_eq!(
            report.status,
            BuildStatus::Succeeded,
            "{:?}",
            report.metadata
        );
    }

    // Another runner arriving later, and redelivered triggers, change nothing.
    let late = env.runner(1);
    for req in [&long, &first, &second, &cancelled] {
        trigger(&late, req).await;
        trigger(&survivor, req).await;
    }
    for (req, want) in [
        (&long, BuildStatus::Failed),
        (&first, BuildStatus::Succeeded),
        (&second, BuildStatus::Succeeded),
        (&cancelled, BuildStatus::Cancelled),
    ] {
        assert_eq!(late.status(&handle(req)).await.unwrap().status, want);
    }
    assert_eq!(env.runs(&long.build_id), 1);
    assert_eq!(env.runs(&first.build_id), 1);
    assert_eq!(env.runs(&second.build_id), 1);
    assert_eq!(env.runs(&cancelled.build_id), 0);
    let lines = collect_logs(&late, &handle(&long)).await;
    assert!(lines.iter().any(|l| l.content.contains("process lost")));
    assert_eq!(ends(&lines), 1);
}

/// Many builds through three runners at once, each triggered on a random
/// runner and again (concurrently) on others, polled through random
/// runners: every build runs exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_builds_through_three_runners_each_run_exactly_once() {
    const BUILDS: usize = 200;
    let env = Env::new();
    let runners: Arc<Vec<LocalRunner>> = Arc::new((0..3).map(|_| env.runner(4)).collect());
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let reqs: Vec<TriggerRequest> = (0..BUILDS).map(|i| request(&format!("h/{i}"))).collect();

    let mut tasks = Vec::new();
    for req in &reqs {
        let picks: Vec<usize> = (0..rng.gen_range(1..=3))
            .map(|_| rng.gen_range(0..3))
            .collect();
        for pick in picks {
            let (runners, req) = (Arc::clone(&runners), req.clone());
            tasks.push(tokio::spawn(async move {
                runners[pick].trigger(&req).await.unwrap()
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }

    let deadline = Instant::now() + Duration::from_secs(120);
    let mut pending: Vec<&TriggerRequest> = reqs.iter().collect();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for req in pending {
            let report = runners[rng.gen_range(0..3)]
                .status(&handle(req))
                .await
                .unwrap();
            if report.is_terminal() {
                assert_eq!(
                    report.status,
                    BuildStatus::Succeeded,
                    "{}: {:?}",
                    req.build_id,
                    report.metadata
                );
            } else {
                still.push(req);
            }
        }
        pending = still;
        assert!(
            Instant::now() < deadline,
            "{} builds never finished",
            pending.len()
        );
        // Polled: some changes are made only when a runner is asked (a
        // build whose holder died is failed once its lock is seen free), so
        // no file changes before the question; waiting on the build
        // directories alone sat out the deadline.
        tokio::time::sleep(POLL).await;
    }
    for req in &reqs {
        assert_eq!(env.runs(&req.build_id), 1, "build {}", req.build_id);
    }
}

/// The acceptance scenario of issue #7 in small: three runners — one in a
/// child process that is SIGKILLed mid-way — share a directory; builds are
/// triggered through all of them, with duplicates. Every build ends, none
/// runs twice, and only the builds the dead process was running are lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_killed_mid_way_loses_only_its_running_builds() {
    const CHILD_BUILDS: usize = 30;
    const BUILDS: usize = 90;
    let env = Env::new();
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let reqs: Vec<TriggerRequest> = (0..BUILDS)
        .map(|i| request(&format!("h/slow/{i}")))
        .collect();
    let child_reqs: Vec<&TriggerRequest> = reqs[..CHILD_BUILDS].iter().collect();
    let mut child = env.child_runner(3, &child_reqs, 1).await;
    let runners: Arc<Vec<LocalRunner>> = Arc::new((0..2).map(|_| env.runner(3)).collect());

    let mut tasks = Vec::new();
    for (i, req) in reqs.iter().enumerate() {
        // The child's builds are redelivered here too, now and then.
        let copies = if i < CHILD_BUILDS {
            rng.gen_range(0..=1)
        } else {
            rng.gen_range(1..=2)
        };
        for _ in 0..copies {
            let (runners, req, pick) = (Arc::clone(&runners), req.clone(), rng.gen_range(0..2));
            tasks.push(tokio::spawn(async move {
                runners[pick].trigger(&req).await.unwrap()
            }));
        }
    }
    child.kill();
    for t in tasks {
        t.await.unwrap();
    }
    // Redelivered triggers for the dead process's builds reach the survivors.
    for req in &child_reqs {
        runners[rng.gen_range(0..2)].trigger(req).await.unwrap();
    }

    let deadline = Instant::now() + Duration::from_secs(120);
    let mut pending: Vec<&TriggerRequest> = reqs.iter().collect();
    let mut lost = 0;
    while !pending.is_empty() {
        let mut still = Vec::new();
        for req in pending {
            let report = runners[rng.gen_range(0..2)]
                .status(&handle(req))
                .await
                .unwrap();
            match report.status {
                BuildStatus::Succeeded => assert_eq!(env.runs(&req.build_id), 1),
                BuildStatus::Failed => {
                    let error = report.metadata.get("error").unwrap_or_default();
                    assert!(error.starts_with(PROCESS_LOST), "{}: {error}", req.build_id);
                    assert!(
                        reqs[..CHILD_BUILDS].contains(req),
                        "only the dead process's builds can be lost"
                    );
                    assert!(env.runs(&req.build_id) <= 1);
                    lost += 1;
                }
                s if s.is_terminal() => panic!("{}: {s} {:?}", req.build_id, report.metadata),
                _ => still.push(req),
            }
        }
        pending = still;
        assert!(
            Instant::now() < deadline,
            "{} builds never finished",
            pending.len()
        );
        // Polled: some changes are made only when a runner is asked (a
        // build whose holder died is failed once its lock is seen free), so
        // no file changes before the question; waiting on the build
        // directories alone sat out the deadline.
        tokio::time::sleep(POLL).await;
    }
    // The child ran at most its 3 slots' worth when it died.
    assert!(lost <= 3, "{lost} builds lost");
    eprintln!("{lost} builds lost with the killed process");
    for req in &reqs {
        assert!(
            env.runs(&req.build_id) <= 1,
            "build {} ran twice",
            req.build_id
        );
    }
}
