//! Buildkite log following against the fake Buildkite over real HTTP: one
//! follower per build whatever the number of viewers, incremental tail
//! reads, the per-build size cap, and log traffic yielding the request
//! budget to polls.

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use stitch_core::{
    BuildHandle, BuildId, BuildRunner, ChangeSet, LogKind, LogLine, LogStream, OutputStream,
    StepStatus, TriggerRequest,
};
use stitch_fake_providers::buildkite::{FakeBuildkite, FakeOptions, Timing};
use stitch_runners::buildkite::{
    BuildkiteConfig, BuildkiteRunner, Client, Pipeline, RateLimit, RequestBudget,
};
use stitch_runners::http_budget::Priority;
use stitch_runners::http_retry::RetryPolicy;

/// Longest any test here waits for a log line (a hang, not a timing).
const PATIENCE: Duration = Duration::from_secs(20);

fn client(fake: &FakeBuildkite, budget: Arc<RequestBudget>) -> Client {
    let mut headers = HeaderMap::new();
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {}", fake.token())).unwrap(),
    );
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    Client::new(http, fake.url(), budget, RetryPolicy::none()).unwrap()
}

fn unlimited() -> Arc<RequestBudget> {
    Arc::new(RequestBudget::new(RateLimit {
        requests: 100_000,
        window: Duration::from_secs(1),
    }))
}

fn config() -> BuildkiteConfig {
    BuildkiteConfig {
        log_poll: Duration::from_millis(30),
        lookup_settle: Duration::from_millis(300),
        ..BuildkiteConfig::new("acme", "app", "main")
    }
}

fn request(head: &str) -> TriggerRequest {
    TriggerRequest::new(
        BuildId::new(),
        "ci",
        ChangeSet::new(vec!["https://git.example/base/1".into()], vec![head.into()]),
    )
}

async fn fake() -> FakeBuildkite {
    FakeBuildkite::start(FakeOptions {
        timing: Timing {
            schedule: Duration::from_millis(20),
            run: Duration::from_millis(200),
            ..Timing::default()
        },
        ..FakeOptions::default()
    })
    .await
    .unwrap()
}

async fn trigger(r: &BuildkiteRunner, head: &str) -> BuildHandle {
    let req = request(head);
    let rr = r.trigger(&req).await.unwrap();
    req.handle().with_ref(rr)
}

/// Reads lines until one satisfies `pred`; returns all read.
async fn read_until(stream: &mut LogStream, pred: impl Fn(&LogLine) -> bool) -> Vec<LogLine> {
    let mut seen = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(item) = stream.next().await {
            let line = item.unwrap();
            let hit = pred(&line);
            seen.push(line);
            if hit {
                return;
            }
        }
        panic!("the log ended before the line looked for: {seen:?}");
    })
    .await
    .unwrap();
    seen
}

fn requests(fake: &FakeBuildkite, endpoint: &str) -> u64 {
    fake.stats()
        .requests
        .get(endpoint)
        .copied()
        .unwrap_or_default()
}

/// `n` lines of 49 characters (50 bytes with the newline), tagged `tag`.
fn lines_of_50(tag: &str, n: usize) -> String {
    (0..n)
        .map(|i| format!("{tag}-{i:04}-{}\n", "x".repeat(43 - tag.len())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_viewers_share_one_fetch_stream() {
    let fake = fake().await;
    let r = BuildkiteRunner::new(client(&fake, unlimited()), config());
    let h = trigger(&r, "https://git.example/c/1").await;
    // A log stream ends when its build is terminal; a follower of a
    // terminal build reads each job's log exactly once.
    let whole: Vec<_> =
        tokio::time::timeout(PATIENCE, r.logs(&h).await.unwrap().collect::<Vec<_>>())
            .await
            .unwrap();
    assert!(whole.iter().all(Result::is_ok));
    let (builds_before, logs_before) = (requests(&fake, "get_build"), requests(&fake, "job_log"));
    let mut viewers = Vec::new();
    for _ in 0..5 {
        viewers.push(r.logs(&h).await.unwrap());
    }
    let all: Vec<Vec<LogLine>> = futures::future::join_all(
        viewers
            .into_iter()
            .map(|v| v.map(Result::unwrap).collect::<Vec<_>>()),
    )
    .await;
    assert!(
        all[0].iter().any(|l| l.content == "$ make test"),
        "{:?}",
        all[0]
    );
    for other in &all[1..] {
        assert_eq!(other, &all[0], "every viewer sees the same log");
    }
    assert_eq!(
        requests(&fake, "get_build") - builds_before,
        1,
        "one resolve for five viewers"
    );
    assert_eq!(
        requests(&fake, "job_log") - logs_before,
        2,
        "one read per job for five viewers"
    );

    // With every viewer gone the follower is gone: a new viewer starts anew.
    let again: Vec<_> = r
        .logs(&h)
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(again, all[0]);
    assert_eq!(requests(&fake, "job_log") - logs_before, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_viewers_get_the_lines_so_far_and_grown_logs_are_read_from_where_they_left_off() {
    let fake = fake().await;
    let r = BuildkiteRunner::new(
        client(&fake, unlimited()),
        BuildkiteConfig {
            log_window: 64,
            ..config()
        },
    );
    // `hang`: job `test` starts and runs until cancelled.
    let h = trigger(&r, "https://git.example/c/1?stitch-bk=hang").await;
    let mut first = r.logs(&h).await.unwrap();
    let early = read_until(&mut first, |l| l.content == "$ make test").await;
    let joined_after = requests(&fake, "job_log");
    let mut late = r.logs(&h).await.unwrap();
    let replayed = read_until(&mut late, |l| l.content == "$ make test").await;
    assert_eq!(replayed, early, "a late viewer gets every line so far");
    assert_eq!(
        requests(&fake, "job_log"),
        joined_after,
        "joining fetched nothing"
    );

    let ranges_before = fake.log_ranges().len();
    let grown = lines_of_50("grown", 20);
    let stitch_id = h.build_id.to_string();
    assert!(fake.append_job_log(&stitch_id, 1, &grown));
    let last = "grown-0019";
    let more = read_until(&mut first, |l| l.content.starts_with(last)).await;
    let more_late = read_until(&mut late, |l| l.content.starts_with(last)).await;
    assert_eq!(more, more_late);
    let appended: Vec<_> = more
        .iter()
        .filter(|l| l.content.starts_with("grown-"))
        .collect();
    assert_eq!(appended.len(), 20, "each appended line once: {more:?}");

    // Every read asked for a tail: the 64-byte window, or the 1,000 new
    // bytes plus the window — never the whole log again.
    let ranges = fake.log_ranges();
    let asked: Vec<u64> = ranges[ranges_before..]
        .iter()
        .map(|r| {
            r.as_deref()
                .and_then(|r| r.strip_prefix("bytes=-"))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("not a tail range: {r:?}"))
        })
        .collect();
    assert!(asked.contains(&1064), "{asked:?}");
    assert!(asked.iter().all(|n| *n == 64 || *n == 1064), "{asked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_over_the_cap_ends_with_a_truncation_line_and_stops_fetching() {
    let fake = fake().await;
    let cap = 2_000;
    let r = BuildkiteRunner::new(
        client(&fake, unlimited()),
        BuildkiteConfig {
            max_log_bytes: cap,
            log_window: 256,
            ..config()
        },
    );
    let h = trigger(&r, "https://git.example/c/1?stitch-bk=hang").await;
    let mut viewer = r.logs(&h).await.unwrap();
    read_until(&mut viewer, |l| l.content == "$ make test").await;
    assert!(fake.append_job_log(&h.build_id.to_string(), 1, &lines_of_50("big", 200)));
    let rest: Vec<LogLine> = tokio::time::timeout(PATIENCE, viewer.map(Result::unwrap).collect())
        .await
        .expect("the stream ends at the cap although the build still runs");
    let marker = rest.last().unwrap();
    assert_eq!(marker.kind, LogKind::Data);
    assert_eq!(marker.stream, Some(OutputStream::Stderr));
    assert!(marker.content.contains("log truncated"), "{marker:?}");
    assert!(marker.content.contains("2000-byte"), "{marker:?}");
    let big = rest
        .iter()
        .filter(|l| l.content.starts_with("big-"))
        .count();
    assert!(
        big > 0 && big < 40,
        "{big} of 200 lines under a 2,000-byte cap"
    );
    assert!(
        rest.iter().all(|l| l.step_status != Some(StepStatus::End)),
        "the build never ended"
    );
    let state = fake.build_json(&h.build_id.to_string()).unwrap()["state"].clone();
    assert_eq!(state, "running");

    // The follower is done: a viewer joining now starts a new follower,
    // and that one stops at the cap too, in one poll.
    let logs_before = requests(&fake, "job_log");
    let replay: Vec<_> = tokio::time::timeout(
        PATIENCE,
        r.logs(&h)
            .await
            .unwrap()
            .map(Result::unwrap)
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    assert!(replay.last().unwrap().content.contains("log truncated"));
    let reads = requests(&fake, "job_log") - logs_before;
    assert!(reads <= 4, "{reads} log reads for one poll of two jobs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_budget_at_its_reserve_polls_go_and_log_reads_wait() {
    let fake = fake().await;
    // Burst 10 (reserve 5); refills are one token per 6 minutes.
    let budget = Arc::new(RequestBudget::new(RateLimit {
        requests: 100,
        window: Duration::from_secs(3600),
    }));
    let bk = client(&fake, budget.clone());
    let r = BuildkiteRunner::new(bk.clone(), config());
    let h = trigger(&r, "https://git.example/c/1?stitch-bk=hang").await;
    let number: u64 = h.runner_ref.as_ref().unwrap().id.parse().unwrap();
    let pipeline = Pipeline {
        org: "acme".into(),
        slug: "app".into(),
    };
    while budget.try_acquire(Priority::Logs) {}
    assert!(!budget.try_acquire(Priority::Logs), "at the reserve");

    let logs_before = requests(&fake, "job_log");
    let builds_before = requests(&fake, "get_build");
    // A log viewer's open (its resolve) waits for the budget...
    let mut opening = r.logs(&h).boxed();
    assert!(
        (&mut opening).now_or_never().is_none(),
        "the log open waits"
    );
    // ...and so does a direct log read at log priority.
    let logs_client = bk.with_priority(Priority::Logs);
    let mut read = logs_client
        .job_log_since(&pipeline, number, "any", 0, 64, 1024)
        .boxed();
    assert!((&mut read).now_or_never().is_none(), "the log read waits");
    // A status poll still gets its request at once.
    let status = r.status(&h).await.unwrap();
    assert!(!status.status.is_terminal());
    assert_eq!(requests(&fake, "get_build") - builds_before, 1);
    assert_eq!(
        requests(&fake, "job_log"),
        logs_before,
        "no log request was sent"
    );
}
