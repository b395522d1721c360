//! What a `local` build command gets from a real `stitch serve` child
//! process: none of the server's secrets, only the allow-list, the build's
//! `STITCH_*` variables, the queue's `env` and `pass_env`; the configured
//! account; and a private data directory.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use support::serve::{Serve, STITCH};

const API_TOKEN: &str = "api-secret-0001";

/// The secrets `stitch serve` runs with, none of which a build may see.
const SECRETS: [(&str, &str); 4] = [
    ("STITCH_API_TOKEN", API_TOKEN),
    ("BUILDKITE_API_TOKEN", "bk-secret-0002"),
    ("GITHUB_TOKEN", "gh-secret-0003"),
    ("PGPASSWORD", "db-secret-0004"),
];

fn stitch(serve: &Serve, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stitch"))
        .args(args)
        .env("STITCH_SERVER", &serve.base)
        .env("STITCH_TOKEN", API_TOKEN)
        .output()
        .unwrap()
}

/// Triggers a build on `queue`, waits for it to end (the CLI follows the
/// event stream), and returns its id and log text.
fn run_build(serve: &Serve, queue: &str) -> (String, String) {
    let out = stitch(
        serve,
        &[
            "build", "trigger", "--queue", queue, "--head", "c/1", "--json", "--wait",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let id = text
        .lines()
        .find_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_string))
        })
        .unwrap_or_else(|| {
            panic!(
                "no build id in {text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let logs = stitch(serve, &["build", "logs", &id]);
    let log = String::from_utf8_lossy(&logs.stdout).to_string();
    (id, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_commands_get_no_secrets_of_the_server() {
    let config = r#"
data_dir = "{data}"
[api]
tokens_env = ["STITCH_API_TOKEN"]
[queues.ci]
runner = "local"
poll = { accepted = "100ms", running = "100ms" }
[queues.ci.local]
command = "env; echo \"workdir=$(pwd)\""
env = { CONFIGURED = "configured-0005" }
pass_env = ["PASSED_THROUGH"]
"#;
    let mut env: Vec<(&str, &str)> = SECRETS.to_vec();
    env.push(("PASSED_THROUGH", "passed-0006"));
    env.push(("NOT_PASSED", "not-passed-0007"));
    let serve = Serve::start(STITCH, config, &env).await;

    let (id, log) = run_build(&serve, "ci");
    for (name, value) in SECRETS.iter().chain(&[("NOT_PASSED", "not-passed-0007")]) {
        assert!(!log.contains(value), "{name} reached the build:\n{log}");
    }
    for wanted in [
        "PATH=".to_string(),
        format!("STITCH_BUILD_ID={id}"),
        "STITCH_QUEUE=ci".to_string(),
        "CONFIGURED=configured-0005".to_string(),
        "PASSED_THROUGH=passed-0006".to_string(),
    ] {
        assert!(log.contains(&wanted), "{wanted} missing from:\n{log}");
    }

    // The default working directory is the build's own, in the temporary
    // directory: not the server's directory, not the data directory.
    let workdir = log
        .lines()
        .find_map(|l| l.split("workdir=").nth(1))
        .unwrap_or_else(|| panic!("no workdir line in:\n{log}"));
    let tmp = std::env::temp_dir().canonicalize().unwrap();
    assert!(
        workdir.starts_with(&format!("{}/stitch-build-{id}-", tmp.display())),
        "{workdir}"
    );

    // The data directory and the database are private to stitch's user.
    let data = serve.dir.path().join("data");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "data dir");
    assert_eq!(mode(&data.join("stitch.db")), 0o600, "database file");
    assert_eq!(
        mode(&data.join("local").join("ci")),
        0o700,
        "runner state dir"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_run_as_the_queues_account() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: running builds as another account needs root");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("the test machine has a `nobody` account");
    let config = r#"
data_dir = "{data}"
[api]
tokens_env = ["STITCH_API_TOKEN"]
[queues.ci]
runner = "local"
poll = { accepted = "100ms", running = "100ms" }
[queues.ci.local]
command = "echo \"uid=$(id -u) gid=$(id -g) user=$USER\""
user = "nobody"
"#;
    let serve = Serve::start(STITCH, config, &[("STITCH_API_TOKEN", API_TOKEN)]).await;
    let (_, log) = run_build(&serve, "ci");
    let expected = format!("uid={} gid={} user=nobody", nobody.uid, nobody.gid);
    assert!(log.contains(&expected), "{expected} missing from:\n{log}");
}

#[test]
fn an_unknown_account_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stitch.toml");
    std::fs::write(
        &path,
        "[queues.ci]\nrunner = \"local\"\n[queues.ci.local]\ncommand = \"true\"\nuser = \"no-such-user-stitch\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_stitch"))
        .args(["config", "check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let expected = if nix::unistd::geteuid().is_root() {
        "queues.ci.local.user: local.user \"no-such-user-stitch\": no such user on this machine"
    } else {
        "queues.ci.local.user: local.user and local.group need stitch to run as root"
    };
    assert!(stderr.contains(expected), "{stderr}");
}
