//! Restart safety of `stitch serve`: 200 builds in flight on a `local` queue,
//! the server is SIGKILLed and started again. Every build must end terminal,
//! no build may run twice, and the event sequence must have no gap.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use stitch_core::BuildStatus;
use stitch_store::Store;
use support::serve::{Serve, STITCH};

const BUILDS: usize = 200;

fn ran(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_finishes_every_build_once() {
    // The harness keeps its own directory; the ran file lives beside the
    // data in a directory of the test's.
    let dir = tempfile::tempdir().unwrap();
    let ran_file = dir.path().join("ran.txt");
    let config = format!(
        r#"data_dir = "{{data}}"
[queues.ci]
runner = "local"
concurrency = 16
poll = {{ accepted = "200ms", running = "200ms" }}
[queues.ci.local]
command = "echo \"$STITCH_BUILD_ID\" >> {ran}; sleep 0.3"
cancel_grace = "1s"
"#,
        ran = ran_file.display()
    );
    let data = dir.path().join("data");
    let http = reqwest::Client::new();

    let mut server = Serve::start_on(STITCH, &config, Some(&data), &[]).await;
    let mut ids = Vec::new();
    for i in 0..BUILDS {
        ids.push(server.create(&http, "ci", &format!("change/{i}")).await);
    }
    // Kill it in the middle of the work: once 40 builds wrote their line.
    stitch_testkit::file_lines(&ran_file, 40).await;
    server.kill(); // SIGKILL
    let ran_before = ran(&ran_file).len();
    assert!(
        ran_before < BUILDS,
        "the kill came too late to test anything"
    );

    server.restart().await;
    server
        .wait_all_terminal(&http, &ids, Duration::from_secs(40))
        .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = server.child.wait().unwrap();
    assert!(status.success(), "graceful shutdown exit: {status:?}");

    // No build ran twice.
    let mut counts: HashMap<String, usize> = HashMap::new();
    for id in ran(&ran_file) {
        *counts.entry(id).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "ran more than once: {twice:?}");

    // Every build is terminal with a reason; the event log has no gap.
    let store = Store::open(&data.join("stitch.db")).await.unwrap();
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
