//! The `stitch` command against a real `stitch serve` child process:
//! trigger --wait exit codes, JSON output, watch, cancel, list, config check,
//! and the exit codes for bad input and an unreachable server.

use std::process::{Child, Command, Output, Stdio};

struct Server {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stitch(args: &[&str], server: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stitch"))
        .args(args)
        .env("STITCH_SERVER", server)
        .env_remove("STITCH_TOKEN")
        .output()
        .unwrap()
}

fn serve() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("stitch.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "{}"
[queues.default]
runner = "fake"
poll = {{ accepted = "100ms", running = "100ms" }}
fake = {{ accept_delay = "100ms", run_duration = "300ms" }}
[queues.slow]
runner = "fake"
poll = {{ accepted = "100ms", running = "100ms" }}
fake = {{ accept_delay = "100ms", run_duration = "60s" }}
"#,
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let log = dir.path().join("serve.log");
    let child = Command::new(env!("CARGO_BIN_EXE_stitch"))
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("STITCH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    stitch_testkit::blocking(stitch_testkit::serve::wait_serving(&log, child.id()));
    Server {
        child,
        url,
        _dir: dir,
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn trigger_wait_reports_the_outcome_in_the_exit_code() {
    let s = serve();
    let ok = stitch(
        &["build", "trigger", "--head", "https://forge/c/1", "--wait"],
        &s.url,
    );
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert!(text(&ok).contains("succeeded"));
    let bad = stitch(
        &[
            "build",
            "trigger",
            "--head",
            "https://forge/c/2?stitch-fake=fail",
            "--wait",
        ],
        &s.url,
    );
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    assert!(text(&bad).contains("failed"));
    // JSON output: one record per status change, the last one terminal.
    let json = stitch(
        &["build", "trigger", "--head", "c/3", "--wait", "--json"],
        &s.url,
    );
    assert_eq!(json.status.code(), Some(0));
    let last = String::from_utf8_lossy(&json.stdout)
        .lines()
        .last()
        .unwrap()
        .to_string();
    let v: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(v["status"], "succeeded");
}

#[test]
fn cancel_watch_list_and_status() {
    let s = serve();
    let out = stitch(
        &[
            "build", "trigger", "--queue", "slow", "--head", "c/1", "--meta", "who=ci",
        ],
        &s.url,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(id.starts_with("b_"), "{id}");
    let c = stitch(&["build", "cancel", &id], &s.url);
    assert_eq!(c.status.code(), Some(0), "{}", text(&c));
    let w = stitch(&["build", "watch", &id], &s.url);
    assert_eq!(
        w.status.code(),
        Some(1),
        "cancelled is not success: {}",
        text(&w)
    );
    assert!(text(&w).contains("cancelled"));
    let st = stitch(&["build", "status", &id, "--json"], &s.url);
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(v["status"], "cancelled");
    assert_eq!(v["metadata"]["who"], "ci");
    let list = stitch(&["build", "list", "--queue", "slow"], &s.url);
    assert!(text(&list).contains(&id));
}

#[test]
fn bad_input_and_unreachable_server_have_their_exit_codes() {
    let s = serve();
    let unknown_queue = stitch(
        &["build", "trigger", "--queue", "nope", "--head", "c/1"],
        &s.url,
    );
    assert_eq!(
        unknown_queue.status.code(),
        Some(2),
        "{}",
        text(&unknown_queue)
    );
    assert!(text(&unknown_queue).contains("unknown_queue"));
    let unknown_build = stitch(&["build", "status", "b_00000000000000000000000000"], &s.url);
    assert_eq!(unknown_build.status.code(), Some(2));
    // An unknown (or pruned) build says plainly that retention may have
    // deleted it, for `watch` and `logs` too.
    for cmd in ["status", "watch", "logs"] {
        let out = stitch(&["build", cmd, "b_00000000000000000000000000"], &s.url);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", text(&out));
        assert!(
            text(&out).contains("[retention] builds window"),
            "{cmd}: {}",
            text(&out)
        );
    }
    let bad_meta = stitch(
        &["build", "trigger", "--head", "c/1", "--meta", "novalue"],
        &s.url,
    );
    assert_eq!(bad_meta.status.code(), Some(2), "clap usage error");
    let down = stitch(&["build", "list"], "http://127.0.0.1:1");
    assert_eq!(down.status.code(), Some(3), "{}", text(&down));
}

#[test]
fn config_check_reports_problems_with_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[queues.ci]\nrunner = \"local\"\npoll = { running = \"soon\" }\n",
    )
    .unwrap();
    let o = stitch(
        &["config", "check", "--config", bad.to_str().unwrap()],
        "http://127.0.0.1:1",
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("queues.ci"), "{t}");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[queues.default]\nrunner = \"fake\"\n").unwrap();
    let o = stitch(
        &["config", "check", "--config", good.to_str().unwrap()],
        "http://127.0.0.1:1",
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn config_check_validates_the_spindle_section() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[spindle]\nhostname = \"spindle.example.com\"\nowner = \"did:plc:abc123\"\ndefault_queue = \"nope\"\n",
    )
    .unwrap();
    let o = stitch(
        &["config", "check", "--config", bad.to_str().unwrap()],
        "http://127.0.0.1:1",
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("spindle.default_queue"), "{}", text(&o));
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[spindle]\nhostname = \"spindle.example.com\"\nowner = \"did:plc:abc123\"\ndefault_queue = \"default\"\n",
    )
    .unwrap();
    let o = stitch(
        &["config", "check", "--config", good.to_str().unwrap()],
        "http://127.0.0.1:1",
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("tangled spindle: spindle.example.com"),
        "{}",
        text(&o)
    );
}
