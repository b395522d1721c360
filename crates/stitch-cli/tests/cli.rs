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

#[test]
fn list_json_carries_the_cursor_and_all_follows_it() {
    let s = serve();
    let mut ids = Vec::new();
    for n in 0..5 {
        let out = stitch(&["build", "trigger", "--head", &format!("c/{n}")], &s.url);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        ids.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let page = stitch(&["build", "list", "--limit", "2", "--json"], &s.url);
    assert_eq!(page.status.code(), Some(0), "{}", text(&page));
    let v: serde_json::Value = serde_json::from_slice(&page.stdout).unwrap();
    assert_eq!(v["builds"].as_array().unwrap().len(), 2);
    let cursor = v["next_cursor"]
        .as_str()
        .expect("a next cursor")
        .to_string();
    let next = stitch(
        &[
            "build", "list", "--limit", "2", "--json", "--cursor", &cursor,
        ],
        &s.url,
    );
    let v2: serde_json::Value = serde_json::from_slice(&next.stdout).unwrap();
    assert_eq!(v2["builds"].as_array().unwrap().len(), 2);
    let all = stitch(
        &["build", "list", "--limit", "2", "--all", "--json"],
        &s.url,
    );
    assert_eq!(all.status.code(), Some(0), "{}", text(&all));
    let v: serde_json::Value = serde_json::from_slice(&all.stdout).unwrap();
    assert!(v["next_cursor"].is_null(), "{v}");
    let listed: Vec<String> = v["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(listed, newest_first, "every build once, newest first");
    // Text output of --all: every build, no "more:" hint.
    let all = stitch(&["build", "list", "--limit", "2", "--all"], &s.url);
    let t = text(&all);
    assert!(ids.iter().all(|id| t.contains(id)), "{t}");
    assert!(!t.contains("more:"), "{t}");
}

#[test]
fn status_filter_takes_only_valid_values_and_help_lists_them() {
    let s = serve();
    let bad = stitch(&["build", "list", "--status", "done"], &s.url);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(text(&bad).contains("succeeded"), "{}", text(&bad));
    let help = stitch(&["build", "list", "--help"], &s.url);
    let t = text(&help);
    for status in [
        "unknown",
        "accepted",
        "running",
        "succeeded",
        "failed",
        "cancelled",
    ] {
        assert!(t.contains(status), "{status} missing from --help: {t}");
    }
    let ok = stitch(&["build", "list", "--status", "failed"], &s.url);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    let zero = stitch(&["build", "list", "--limit", "0"], &s.url);
    assert_eq!(zero.status.code(), Some(2), "{}", text(&zero));
}

#[test]
fn top_level_help_documents_the_exit_codes() {
    let help = stitch(&["--help"], "http://127.0.0.1:1");
    assert_eq!(help.status.code(), Some(0));
    let t = text(&help);
    assert!(t.contains("Exit codes:"), "{t}");
    for code in ["  0  ", "  1  ", "  2  ", "  3  "] {
        assert!(t.contains(code), "{code:?} missing: {t}");
    }
}

#[test]
fn rerun_repeats_the_change_set_and_caller_metadata() {
    let s = serve();
    let out = stitch(
        &[
            "build",
            "trigger",
            "--base",
            "c/base",
            "--head",
            "c/1?stitch-fake=fail",
            "--meta",
            "ticket=T-9",
            "--wait",
            "--json",
        ],
        &s.url,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let last = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .to_string();
    let old: serde_json::Value = serde_json::from_str(&last).unwrap();
    let old_id = old["id"].as_str().unwrap();
    // The failed build carries runner keys that must not be copied.
    assert!(old["metadata"]["error"].is_string(), "{old}");
    assert!(old["metadata"]["fake_outcome"].is_string(), "{old}");

    // With --json the record is printed as created, before the new
    // build's own runner wrote anything.
    let rerun = stitch(&["build", "rerun", old_id, "--json"], &s.url);
    assert_eq!(rerun.status.code(), Some(0), "{}", text(&rerun));
    let new: serde_json::Value = serde_json::from_slice(&rerun.stdout).unwrap();
    let new_id = new["id"].as_str().unwrap().to_string();
    assert!(new_id.starts_with("b_") && new_id != old_id, "{new_id}");
    let plain = stitch(&["build", "rerun", old_id], &s.url);
    assert_eq!(plain.status.code(), Some(0), "{}", text(&plain));
    let plain_id = String::from_utf8_lossy(&plain.stdout).trim().to_string();
    assert!(
        plain_id.starts_with("b_") && plain_id != new_id,
        "{plain_id}"
    );
    assert_eq!(new["queue"], old["queue"]);
    assert_eq!(new["base"], old["base"]);
    assert_eq!(new["head"], old["head"]);
    assert_eq!(new["metadata"]["ticket"], "T-9");
    assert_eq!(new["metadata"]["rerun_of"], old_id);
    // Written by the old build's runner, not by its caller.
    let keys: Vec<&String> = new["metadata"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["rerun_of", "ticket"], "{new}");

    // A rerun of the rerun names its own predecessor, and --wait reports
    // the outcome (the head still says fail).
    let again = stitch(&["build", "rerun", &new_id, "--wait", "--json"], &s.url);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    let last = String::from_utf8_lossy(&again.stdout)
        .lines()
        .last()
        .unwrap()
        .to_string();
    let v: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(v["metadata"]["rerun_of"], new_id.as_str());
    assert_eq!(v["status"], "failed");

    let unknown = stitch(&["build", "rerun", "b_00000000000000000000000000"], &s.url);
    assert_eq!(unknown.status.code(), Some(2), "{}", text(&unknown));
}

#[test]
fn open_without_a_url_says_so() {
    let s = serve();
    let out = stitch(&["build", "trigger", "--head", "c/1"], &s.url);
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // The fake runner has no web page: nothing to open.
    let open = stitch(&["build", "open", &id], &s.url);
    assert_eq!(open.status.code(), Some(2), "{}", text(&open));
    assert!(text(&open).contains("has no URL"), "{}", text(&open));
    assert!(open.stdout.is_empty());
}

#[test]
fn completions_for_each_shell_and_the_man_page() {
    let bash = stitch(&["completions", "bash"], "http://127.0.0.1:1");
    assert_eq!(bash.status.code(), Some(0), "{}", text(&bash));
    let script = String::from_utf8(bash.stdout).unwrap();
    assert!(script.contains("rerun") && script.contains("--reconnect-for"));
    // bash itself loads the script and registers the completion.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stitch.bash");
    std::fs::write(&file, &script).unwrap();
    let loaded = Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p stitch", file.display()))
        .output()
        .unwrap();
    assert!(loaded.status.success(), "{}", text(&loaded));
    assert!(String::from_utf8_lossy(&loaded.stdout).contains("stitch"));

    let zsh = stitch(&["completions", "zsh"], "http://127.0.0.1:1");
    assert_eq!(zsh.status.code(), Some(0));
    let zsh = String::from_utf8(zsh.stdout).unwrap();
    assert!(zsh.starts_with("#compdef stitch"), "{zsh}");
    assert!(zsh.contains("rerun"));
    let fish = stitch(&["completions", "fish"], "http://127.0.0.1:1");
    assert_eq!(fish.status.code(), Some(0));
    let fish = String::from_utf8(fish.stdout).unwrap();
    assert!(fish.contains("complete -c stitch"), "{fish}");
    assert!(fish.contains("rerun"));
    let nope = stitch(&["completions", "powershell"], "http://127.0.0.1:1");
    assert_eq!(nope.status.code(), Some(2));

    let man = stitch(&["man"], "http://127.0.0.1:1");
    assert_eq!(man.status.code(), Some(0), "{}", text(&man));
    let page = String::from_utf8(man.stdout).unwrap();
    assert!(page.starts_with(".ie") || page.starts_with(".TH"), "{page}");
    assert!(page.contains(".TH stitch "), "{page}");
    assert!(
        page.contains(".TH stitch-build "),
        "one page per subcommand"
    );
    assert!(page.contains("reconnect\\-for"), "options are listed");
}
