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
const CONCURRENCY: usize = 16;

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
    // The gate: while the test holds an exclusive flock on it, every build
    // command blocks right after writing its line. So at the kill exactly
    // `concurrency` builds have started and the other builds are still
    // waiting, however slow the machine is; the restart must run those.
    let gate_path = dir.path().join("gate");
    let gate = std::fs::File::create(&gate_path).unwrap();
    gate.lock().unwrap();
    let config = format!(
        r#"data_dir = "{{data}}"
[queues.ci]
runner = "local"
concurrency = {CONCURRENCY}
poll = {{ accepted = "200ms", running = "200ms" }}
[queues.ci.local]
command = "echo \"$STITCH_BUILD_ID\" >> {ran}; flock -s {gate} true; sleep 0.3"
cancel_grace = "1s"
"#,
        ran = ran_file.display(),
        gate = gate_path.display()
    );
    let data = dir.path().join("data");
    let http = reqwest::Client::new();

    let mut server = Serve::start_on(STITCH, &config, Some(&data), &[]).await;
    let mut ids = Vec::new();
    for i in 0..BUILDS {
        ids.push(server.create(&http, "ci", &format!("change/{i}")).await);
    }
    // Kill it in the middle of the work: once every slot holds a started
    // build, all of them blocked at the gate.
    stitch_testkit::file_lines(&ran_file, CONCURRENCY).await;
    server.kill(); // SIGKILL
    let ran_before = ran(&ran_file).len();
    assert_eq!(ran_before, CONCURRENCY, "only the slots' builds started");

    server.restart().await;
    // Open the gate: the builds that were running at the kill are reported
    // lost by the restarted server, the waiting ones run now.
    gate.unlock().unwrap();
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
