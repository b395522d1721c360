//! `stitch job exec` and `stitch job promise-failure` against a real
//! `stitch serve` child process with `local` queues: the end-to-end
//! fail-fast path (the job's own process is killed), the direct fallback
//! when the job API socket is missing or dead, the rejection messages and
//! exit codes, and exec's environment, exit codes and signal forwarding.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use stitch_testkit::blocking;

const STITCH: &str = env!("CARGO_BIN_EXE_stitch");

struct Server {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Queues: `ff` (fail_fast: promise, mark, write pid, sleep), `hold`
/// (saves its job env, waits for `release-<id>`), `quick` (saves its job
/// env, exits 0).
fn serve() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let save_env = format!(
        "printf '%s\\n%s\\n' \"$STITCH_JOB_TOKEN\" \"$STITCH_SERVER\" > {d}/env-$STITCH_BUILD_ID.tmp && mv {d}/env-$STITCH_BUILD_ID.tmp {d}/env-$STITCH_BUILD_ID"
    );
    let ff = format!(
        "echo $$ > {d}/pid-$STITCH_BUILD_ID.tmp; mv {d}/pid-$STITCH_BUILD_ID.tmp {d}/pid-$STITCH_BUILD_ID; {STITCH} job promise-failure --exit-status 3 --reason boom; for i in $(seq 600); do [ -d {d} ] || exit 0; sleep 0.1; done"
    );
    // Also ends once the test's directory is gone: local builds outlive the
    // killed server by design, and must not outlive the test.
    let hold = format!(
        "{save_env}; while [ ! -f {d}/release-$STITCH_BUILD_ID ] && [ -d {d} ]; do sleep 0.05; done"
    );
    // Commands live in scripts: no quoting inside TOML.
    for (name, body) in [("ff", &ff), ("hold", &hold), ("quick", &save_env)] {
        std::fs::write(dir.path().join(format!("{name}.sh")), body).unwrap();
    }
    let config = dir.path().join("stitch.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "{d}/data"
[queues.ff]
runner = "local"
fail_fast = true
concurrency = 4
poll = {{ accepted = "200ms", running = "200ms" }}
local = {{ command = "sh {d}/ff.sh", cancel_grace = "5s" }}
[queues.hold]
runner = "local"
concurrency = 4
poll = {{ accepted = "200ms", running = "200ms" }}
local = {{ command = "sh {d}/hold.sh" }}
[queues.quick]
runner = "local"
concurrency = 4
poll = {{ accepted = "100ms", running = "100ms" }}
local = {{ command = "sh {d}/quick.sh" }}
"#
        ),
    )
    .unwrap();
    let log = dir.path().join("serve.log");
    let child = Command::new(STITCH)
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("STITCH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Bound once it says so: requests from then on are answered.
    blocking(stitch_testkit::file_text_where(&log, |t| {
        t.contains(stitch_testkit::serve::SERVING)
    }));
    Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
        dir,
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `stitch` with a clean job environment plus `env`.
fn stitch(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(STITCH);
    cmd.args(args);
    for var in [
        "STITCH_SERVER",
        "STITCH_TOKEN",
        "STITCH_JOB_TOKEN",
        "STITCH_BUILD_ID",
        "STITCH_JOB_API_SOCKET",
        "STITCH_JOB_API_TOKEN",
        "STITCH_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.output().unwrap()
}

fn trigger(s: &Server, queue: &str) -> String {
    let o = stitch(
        &["build", "trigger", "--queue", queue, "--head", "c/1"],
        &[("STITCH_SERVER", &s.url)],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A marker file's text once its last line is complete.
fn wait_file(path: &Path) -> String {
    blocking(stitch_testkit::file_text(path))
}

/// `stitch build watch`: follows the build until it is terminal (the
/// product's own wait) and exits 0 for succeeded, 1 otherwise.
fn watch_until_terminal(s: &Server, id: &str) -> Output {
    stitch(&["build", "watch", id], &[("STITCH_SERVER", &s.url)])
}

fn status_json(s: &Server, id: &str) -> serde_json::Value {
    let o = stitch(
        &["build", "status", id, "--json"],
        &[("STITCH_SERVER", &s.url)],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn fail_fast_end_to_end_fails_the_build_and_kills_the_job() {
    let s = serve();
    let id = trigger(&s, "ff");
    let pid: i32 = wait_file(&s.path(&format!("pid-{id}")))
        .trim()
        .parse()
        .unwrap();
    // The endpoint fails the build in the transaction that records the
    // promise: the reason is the promise's, not a poll's observation.
    let watched = watch_until_terminal(&s, &id);
    let v = status_json(&s, &id);
    assert_eq!(v["status"], "failed", "{}", text(&watched));
    assert_eq!(v["metadata"]["error"], "promised exit status 3");
    assert_eq!(v["metadata"]["promised_exit_status"], "3");
    assert_eq!(v["metadata"]["promised_exit_status_reason"], "boom");
    // The job would sleep a minute: it is gone because the cancel killed it
    // (the wait is bounded and fails the test otherwise).
    blocking(stitch_testkit::process_exit(pid));
    let human = stitch(&["build", "status", &id], &[("STITCH_SERVER", &s.url)]);
    assert!(
        text(&human).contains("promised failure: exit status 3 (boom)"),
        "{}",
        text(&human)
    );
    let watch = stitch(&["build", "watch", &id], &[("STITCH_SERVER", &s.url)]);
    assert_eq!(watch.status.code(), Some(1));
    assert!(
        text(&watch).contains("failing: promised failure: exit status 3"),
        "{}",
        text(&watch)
    );
}

#[test]
fn promise_failure_falls_back_to_the_server_and_explains_refusals() {
    let s = serve();
    let id = trigger(&s, "hold");
    let env_file = wait_file(&s.path(&format!("env-{id}")));
    let mut lines = env_file.lines();
    let (token, server) = (
        lines.next().unwrap().to_string(),
        lines.next().unwrap().to_string(),
    );
    assert_eq!(server, s.url);
    let job = |socket: &str| {
        vec![
            ("STITCH_SERVER", server.clone()),
            ("STITCH_BUILD_ID", id.clone()),
            ("STITCH_JOB_TOKEN", token.clone()),
            ("STITCH_JOB_API_SOCKET", socket.to_string()),
            ("STITCH_JOB_API_TOKEN", "whatever".to_string()),
            ("STITCH_LOG", "debug".to_string()),
        ]
    };
    let run = |args: &[&str], env: &[(&str, String)]| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        stitch(args, &env)
    };
    // Missing socket: declares directly.
    let missing = s.path("no-such.sock");
    let o = run(
        &[
            "job",
            "promise-failure",
            "--exit-status",
            "2",
            "--reason",
            "t1",
        ],
        &job(missing.to_str().unwrap()),
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("declaring directly"), "{}", text(&o));
    // Dead socket (the file exists, nobody listens): declares directly too.
    let dead = s.path("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
    let o = run(
        &["job", "promise-failure", "--exit-status", "2"],
        &job(dead.to_str().unwrap()),
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v = status_json(&s, &id);
    assert_eq!(v["metadata"]["promised_exit_status"], "2");
    assert_eq!(v["metadata"]["promised_exit_status_reason"], "t1");
    // A different status: refused with a clear message.
    let o = run(
        &["job", "promise-failure", "--exit-status", "5"],
        &job(dead.to_str().unwrap()),
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("a different exit status was already promised"),
        "{}",
        text(&o)
    );
    // Invalid input and no job environment: usage errors, nothing sent.
    let o = run(
        &["job", "promise-failure", "--exit-status", "0"],
        &job(dead.to_str().unwrap()),
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = run(
        &["job", "promise-failure", "--exit-status", "-1"],
        &job(dead.to_str().unwrap()),
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = stitch(&["job", "promise-failure", "--exit-status", "1"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("not running inside a stitch job"),
        "{}",
        text(&o)
    );
    std::fs::write(s.path(&format!("release-{id}")), "").unwrap();

    // A finished build: "no longer running".
    let done = trigger(&s, "quick");
    let env_file = wait_file(&s.path(&format!("env-{done}")));
    let done_token = env_file.lines().next().unwrap().to_string();
    let watched = watch_until_terminal(&s, &done);
    assert_eq!(watched.status.code(), Some(0), "{}", text(&watched));
    assert_eq!(status_json(&s, &done)["status"], "succeeded");
    let o = stitch(
        &["job", "promise-failure", "--exit-status", "1"],
        &[
            ("STITCH_SERVER", &s.url),
            ("STITCH_BUILD_ID", &done),
            ("STITCH_JOB_TOKEN", &done_token),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("the build is no longer running"),
        "{}",
        text(&o)
    );
    // Build A's token cannot declare for build B.
    let o = stitch(
        &["job", "promise-failure", "--exit-status", "1"],
        &[
            ("STITCH_SERVER", &s.url),
            ("STITCH_BUILD_ID", &id),
            ("STITCH_JOB_TOKEN", &done_token),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("does not belong to this build"),
        "{}",
        text(&o)
    );
}

#[test]
fn exec_debounces_through_its_job_api_and_passes_the_exit_code() {
    let s = serve();
    let id = trigger(&s, "hold");
    let env_file = wait_file(&s.path(&format!("env-{id}")));
    let token = env_file.lines().next().unwrap().to_string();
    let script = format!(
        "test -S \"$STITCH_JOB_API_SOCKET\" || exit 90; \
         {STITCH} job promise-failure --exit-status 4 || exit 91; \
         {STITCH} job promise-failure --exit-status 4 || exit 92; \
         exit 7"
    );
    let o = stitch(
        &["job", "exec", "--", "sh", "-c", &script],
        &[
            ("STITCH_SERVER", &s.url),
            ("STITCH_BUILD_ID", &id),
            ("STITCH_JOB_TOKEN", &token),
            ("STITCH_LOG", "debug"),
        ],
    );
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("promised exit status 4: declared"), "{t}");
    assert!(
        t.contains("promised exit status 4: already declared (debounced)"),
        "{t}"
    );
    assert_eq!(
        status_json(&s, &id)["metadata"]["promised_exit_status"],
        "4"
    );
    std::fs::write(s.path(&format!("release-{id}")), "").unwrap();

    let o = stitch(&["job", "exec", "--", "no-such-command-for-stitch"], &[]);
    assert_eq!(o.status.code(), Some(127), "{}", text(&o));
}

#[test]
fn exec_forwards_sigterm_to_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let script = format!(
        "trap 'exit 42' TERM; touch {}; while true; do sleep 0.05; done",
        ready.display()
    );
    let mut child = Command::new(STITCH)
        .args(["job", "exec", "--", "sh", "-c", &script])
        .env_remove("STITCH_JOB_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    blocking(stitch_testkit::file_exists(&ready));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(42));
}
