//! `stitch build watch` and `stitch build logs` against a real `stitch
//! serve` child that is SIGKILLed mid-stream: watch resumes the event
//! stream once the server is back and reports the outcome; logs whose
//! server never comes back exit non-zero instead of claiming a whole log.

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::serve::{Serve, STITCH};
use tokio::io::{AsyncBufReadExt, BufReader};

const CONFIG: &str = r#"data_dir = "{data}"
[queues.default]
runner = "fake"
poll = { accepted = "100ms", running = "100ms" }
fake = { accept_delay = "100ms", run_duration = "3s" }
[queues.slow]
runner = "fake"
poll = { accepted = "100ms", running = "100ms" }
fake = { accept_delay = "100ms", run_duration = "120s" }
"#;

fn stitch(args: &[&str], server: &str) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_stitch"))
        .args(args)
        .env("STITCH_SERVER", server)
        .env_remove("STITCH_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Reads `child`'s stdout until a line satisfies `until`; returns the lines
/// read and the reader for the rest.
async fn read_until(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    until: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut seen = Vec::new();
    let wait = async {
        while let Ok(Some(line)) = lines.next_line().await {
            let done = until(&line);
            seen.push(line);
            if done {
                return true;
            }
        }
        false
    };
    let found = tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .unwrap_or(false);
    assert!(found, "never saw the line; output so far: {seen:#?}");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_across_a_server_restart() {
    let mut s = Serve::start(STITCH, CONFIG, &[]).await;
    let http = reqwest::Client::new();
    let id = s.create(&http, "default", "https://git.example/c/1").await;
    let mut watch = stitch(&["build", "watch", &id, "--reconnect-for", "60"], &s.base);
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    read_until(&mut lines, |l| l == format!("{id} running")).await;
    s.kill();
    s.restart().await;
    let mut rest = Vec::new();
    while let Ok(Some(line)) = lines.next_line().await {
        rest.push(line);
    }
    let status = watch.wait().await.unwrap();
    let mut stderr = String::new();
    if let Some(mut e) = watch.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut stderr).await;
    }
    assert_eq!(status.code(), Some(0), "{rest:#?}\n{stderr}\n{}", s.log());
    assert!(
        rest.contains(&format!("{id} succeeded")),
        "{rest:#?}\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_exit_non_zero_when_the_server_dies_mid_stream() {
    let mut s = Serve::start(STITCH, CONFIG, &[]).await;
    let http = reqwest::Client::new();
    let id = s.create(&http, "slow", "https://git.example/c/2").await;
    s.wait_status(&http, &id, "running").await;
    let mut logs = stitch(&["build", "logs", &id, "--reconnect-for", "1"], &s.base);
    let mut lines = BufReader::new(logs.stdout.take().unwrap()).lines();
    // Some of the log has arrived; the build is far from done.
    read_until(&mut lines, |_| true).await;
    s.kill();
    while let Ok(Some(_)) = lines.next_line().await {}
    let status = logs.wait().await.unwrap();
    let mut stderr = String::new();
    if let Some(mut e) = logs.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut stderr).await;
    }
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("was cut"), "{stderr}");
}
