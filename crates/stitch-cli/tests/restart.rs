//! Restart safety of `stitch serve`: 200 builds in flight on a `local` queue,
//! the server is SIGKILLed and started again. Every build must end terminal,
//! no build may run twice, and the event sequence must have no gap.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stitch_core::BuildStatus;
use stitch_store::Store;

const BUILDS: usize = 200;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

fn start(config: &Path, port: u16, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_stitch"))
        .args(["serve", "--config"])
        .arg(config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("STITCH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

async fn wait_healthy(http: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(r) = http.get(format!("{base}/healthz")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server did not come up");
}

fn ran(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_finishes_every_build_once() {
    let dir = tempfile::tempdir().unwrap();
    let ran_file = dir.path().join("ran.txt");
    let config = dir.path().join("stitch.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "{data}"
[queues.ci]
runner = "local"
concurrency = 16
poll = {{ accepted = "200ms", running = "200ms" }}
[queues.ci.local]
command = "echo \"$STITCH_BUILD_ID\" >> {ran}; sleep 0.3"
cancel_grace = "1s"
"#,
            data = dir.path().join("data").display(),
            ran = ran_file.display()
        ),
    )
    .unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();

    let mut server = start(&config, port, &dir.path().join("serve-1.log"));
    wait_healthy(&http, &base).await;
    let mut ids = Vec::new();
    for i in 0..BUILDS {
        let r = http
            .post(format!("{base}/v1/queues/ci/builds"))
            .json(&serde_json::json!({"head": [format!("change/{i}")]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
        let v: serde_json::Value = r.json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    // Kill it in the middle of the work.
    let deadline = Instant::now() + Duration::from_secs(60);
    while ran(&ran_file).len() < 40 {
        assert!(Instant::now() < deadline, "builds did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill().unwrap(); // SIGKILL
    server.wait().unwrap();
    let ran_before = ran(&ran_file).len();
    assert!(
        ran_before < BUILDS,
        "the kill came too late to test anything"
    );

    let mut server = start(&config, port, &dir.path().join("serve-2.log"));
    wait_healthy(&http, &base).await;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let mut done = 0;
        let mut stuck = Vec::new();
        for id in &ids {
            let v: serde_json::Value = http
                .get(format!("{base}/v1/builds/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let status: BuildStatus = serde_json::from_value(v["status"].clone()).unwrap();
            if status.is_terminal() {
                done += 1;
            } else {
                stuck.push(v);
            }
        }
        if done == ids.len() {
            break;
        }
        if Instant::now() >= deadline {
            let log = std::fs::read_to_string(dir.path().join("serve-2.log")).unwrap_or_default();
            panic!(
                "{done}/{} builds terminal; stuck: {:#?}\nserver log:\n{}",
                ids.len(),
                &stuck[..stuck.len().min(3)],
                log.chars()
                    .rev()
                    .take(3000)
                    .collect::<String>()
                    .chars()
                    .rev()
                    .collect::<String>()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = server.wait().unwrap();
    assert!(status.success(), "graceful shutdown exit: {status:?}");

    // No build ran twice.
    let mut counts: HashMap<String, usize> = HashMap::new();
    for id in ran(&ran_file) {
        *counts.entry(id).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "ran more than once: {twice:?}");

    // Every build is terminal with a reason; the event log has no gap.
    let store = Store::open(&dir.path().join("data").join("stitch.db"))
        .await
        .unwrap();
    let mut outcomes: HashMap<BuildStatus, usize> = HashMap::new();
    for id in &ids {
        let b = store.get_build(&id.parse().unwrap()).await.unwrap();
        assert!(b.status.is_terminal());
        if b.status != BuildStatus::Succeeded {
            assert!(
                b.failure_reason.is_some() || b.metadata().contains_key("error"),
                "{id}: {:?}",
                b.metadata()
            );
        }
        *outcomes.entry(b.status).or_default() += 1;
    }
    let events = store.events_after(0, 100_000).await.unwrap();
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "gap in the event sequence");
    }
    assert_eq!(
        events.last().map(|e| e.seq),
        Some(store.latest_seq().await.unwrap())
    );
    // Builds that never started before the kill ran after the restart.
    assert!(
        counts.len() > ran_before,
        "nothing ran after the restart: {outcomes:?}"
    );
}
