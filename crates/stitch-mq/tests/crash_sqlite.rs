//! A consumer in a child process is SIGKILLed mid-work; a new consumer on
//! the same SQLite file must account for every message: acked exactly once
//! (never redelivered after a recorded ack), or dead-lettered as intended.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use stitch_mq::sqlite::SqliteDriver;
use stitch_mq::{Failure, Message, Queue, QueueConfig, RetryPolicy, SubscriptionConfig};

const TOPIC: &str = "work";
const TOTAL: usize = 300;

fn action(i: usize) -> &'static str {
    if i % 17 == 5 {
        "reject"
    } else if i % 23 == 7 {
        "nack"
    } else {
        "ack"
    }
}

fn config() -> SubscriptionConfig {
    SubscriptionConfig {
        batch_size: 4,
        visibility_timeout: Duration::from_millis(800),
        lease_duration: Duration::from_millis(800),
        lease_renewal: Duration::from_millis(200),
        poll_interval: Duration::from_millis(100),
        retry: RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
            multiplier: 2.0,
            jitter: 0.0,
        },
        ..SubscriptionConfig::new("workers")
    }
}

async fn open(path: &Path) -> Queue {
    let driver = SqliteDriver::open(path).await.expect("open sqlite");
    Queue::new(
        Arc::new(driver),
        QueueConfig {
            gc_interval: None,
            ..QueueConfig::default()
        },
    )
}

/// Consumes until stopped; writes `begin`/`done` lines around each outcome.
async fn consume(q: &Queue, log: &mut std::fs::File, stop_when_idle: Option<Duration>) {
    let mut sub = q
        .subscriber()
        .subscribe(TOPIC, config())
        .await
        .expect("subscribe");
    loop {
        let next = match stop_when_idle {
            Some(idle) => match tokio::time::timeout(idle, sub.recv()).await {
                Ok(d) => d,
                Err(_) => break,
            },
            None => sub.recv().await,
        };
        let Some(d) = next else { break };
        let i: usize = d.id().trim_start_matches('m').parse().expect("numeric id");
        let act = action(i);
        writeln!(
            log,
            "begin {} {} {}",
            d.id(),
            d.partition_key(),
            d.attempt()
        )
        .unwrap();
        log.flush().unwrap();
        // Stands for the handler's work: the parent's SIGKILL must be able
        // to land between "begin" and the outcome. There is nothing to wait
        // for here; the time itself is the point.
        tokio::time::sleep(Duration::from_millis(2)).await;
        match act {
            "ack" => d.ack().await.expect("ack"),
            "reject" => d.reject(Failure::new("poison")).await.expect("reject"),
            _ => {
                d.nack(Failure::new("flaky")).await.expect("nack");
            }
        }
        writeln!(log, "done {} {act}", d.id()).unwrap();
        log.flush().unwrap();
    }
    sub.close().await;
}

/// Entry point of the child process; a no-op in a normal test run.
#[test]
fn crash_child_entry() {
    let (Ok(db), Ok(log)) = (
        std::env::var("STITCH_MQ_CRASH_DB"),
        std::env::var("STITCH_MQ_CRASH_LOG"),
    ) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let q = open(Path::new(&db)).await;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        consume(&q, &mut f, None).await;
    });
}

/// Kills the child if the test fails before it does, so no orphan keeps
/// running (and holding the test runner's output open).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `begin` lines as (id, partition, attempt) and `done` lines as (id, action).
type Log = (Vec<(String, String, u32)>, Vec<(String, String)>);

fn parse_log(text: &str) -> Log {
    let mut begins = Vec::new();
    let mut dones = Vec::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        match parts.as_slice() {
            // A line still being written (read mid-append) or torn by the
            // kill can end early, even inside the number.
            ["begin", id, p, attempt] => {
                if let Ok(attempt) = attempt.parse() {
                    begins.push((id.to_string(), p.to_string(), attempt));
                }
            }
            ["done", id, act] => dones.push((id.to_string(), act.to_string())),
            _ => {} // a line torn by the kill
        }
    }
    (begins, dones)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_work_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("queue.db");
    let child_log = dir.path().join("child.log");
    let q = open(&db).await;
    let msgs: Vec<Message> = (0..TOTAL)
        .map(|i| Message::new(format!("m{i}"), format!("p{}", i % 6), vec![]))
        .collect();
    q.publisher().publish_batch(TOPIC, msgs).await.unwrap();

    let exe = std::env::current_exe().unwrap();
    let mut child = KillOnDrop(
        std::process::Command::new(exe)
            .args([
                "crash_child_entry",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("STITCH_MQ_CRASH_DB", &db)
            .env("STITCH_MQ_CRASH_LOG", &child_log)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Kill it once it is well into the work, mid-batch: its log is re-read
    // after each write the kernel reports in the directory.
    let pid = i32::try_from(child.0.id()).unwrap();
    let dirs = [dir.path()];
    let progressed = stitch_testkit::dir_change(&dirs, "the child well into the work", || {
        let text = std::fs::read_to_string(&child_log).unwrap_or_default();
        std::future::ready((parse_log(&text).1.len() >= TOTAL / 3).then_some(()))
    });
    tokio::select! {
        biased;
        () = progressed => {}
        () = stitch_testkit::process_exit(pid) => panic!("child exited early"),
    }
    child.0.kill().unwrap(); // SIGKILL
    child.0.wait().unwrap();
    let (child_begins, child_dones) = parse_log(&std::fs::read_to_string(&child_log).unwrap());

    // A fresh consumer on the same file finishes the work.
    let parent_log = dir.path().join("parent.log");
    let mut f = std::fs::File::create(&parent_log).unwrap();
    consume(&q, &mut f, Some(Duration::from_secs(3))).await;
    let (parent_begins, parent_dones) = parse_log(&std::fs::read_to_string(&parent_log).unwrap());

    let child_acked: HashSet<&str> = child_dones
        .iter()
        .filter(|(_, a)| a == "ack")
        .map(|(id, _)| id.as_str())
        .collect();
    let parent_acked: HashSet<&str> = parent_dones
        .iter()
        .filter(|(_, a)| a == "ack")
        .map(|(id, _)| id.as_str())
        .collect();
    let child_begun: HashSet<&str> = child_begins.iter().map(|(id, _, _)| id.as_str()).collect();
    for id in &parent_acked {
        assert!(
            !child_acked.contains(id),
            "{id} was acked by the child and delivered again"
        );
    }
    let dead: HashSet<String> = q
        .admin()
        .dead_letters(TOPIC, 0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.message.id)
        .collect();
    for i in 0..TOTAL {
        let id = format!("m{i}");
        match action(i) {
            "ack" => {
                let acked = child_acked.contains(id.as_str()) || parent_acked.contains(id.as_str());
                // Killed between the ack's commit and its log line: acked, unrecorded.
                let ambiguous =
                    child_begun.contains(id.as_str()) && !child_acked.contains(id.as_str());
                assert!(acked || ambiguous, "{id} was never acked");
                assert!(!dead.contains(&id), "{id} should not be dead");
            }
            _ => assert!(
                dead.contains(&id),
                "{id} should be dead-lettered ({})",
                action(i)
            ),
        }
    }
    // Within a partition the parent's first deliveries came in order
    // (redeliveries of the child's unfinished window may interleave,
    // as a window of batch_size allows).
    let mut first_seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for (id, p, attempt) in &parent_begins {
        if *attempt == 1 && !child_begun.contains(id.as_str()) && seen.insert(id.clone()) {
            first_seen
                .entry(p.clone())
                .or_default()
                .push(id[1..].parse().unwrap());
        }
    }
    for (p, ids) in first_seen {
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "partition {p} out of order: {ids:?}"
        );
    }
    let stats = q.admin().stats(TOPIC, "workers").await.unwrap();
    assert_eq!(stats.pending, 0, "{stats:?}");
    // The kill interrupted real work: the parent redelivered at least one
    // message the child had begun (attempt > 1).
    let redelivered: HashMap<&str, u32> = parent_begins
        .iter()
        .filter(|(id, _, a)| *a > 1 && child_begun.contains(id.as_str()))
        .map(|(id, _, a)| (id.as_str(), *a))
        .collect();
    assert!(
        !redelivered.is_empty(),
        "no in-flight message was redelivered"
    );
}
