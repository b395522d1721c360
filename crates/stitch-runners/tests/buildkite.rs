//! The Buildkite client and runner against the stateful fake Buildkite
//! (`stitch-fake-providers`) over real HTTP on loopback.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use stitch_core::{BuildRunner, BuildStatus, LogKind, RunnerError, StepStatus};
use stitch_fake_providers::buildkite::{FakeBuildkite, FakeOptions, Timing};
use stitch_runners::buildkite::{
    BuildQuery, BuildkiteConfig, BuildkiteRunner, Client, Pipeline, RateLimit, RequestBudget,
};
use support::{fast_retry, request, unlimited, wait_report, wait_terminal};

mod support;

fn http(token: &str, timeout: Duration) -> reqwest::Client {
    let mut headers = HeaderMap::new();
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(timeout)
        .build()
        .unwrap()
}

fn client(fake: &FakeBuildkite, budget: Arc<RequestBudget>) -> Client {
    Client::new(
        http(fake.token(), Duration::from_millis(700)),
        fake.url(),
        budget,
        fast_retry(),
    )
    .unwrap()
}

fn config() -> BuildkiteConfig {
    BuildkiteConfig {
        log_poll: Duration::from_millis(50),
        lookup_settle: Duration::from_millis(300),
        ..BuildkiteConfig::new("acme", "app", "main")
    }
}

fn runner(fake: &FakeBuildkite) -> BuildkiteRunner {
    BuildkiteRunner::new(client(fake, unlimited()), config())
}

fn pipeline() -> Pipeline {
    Pipeline {
        org: "acme".into(),
        slug: "app".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_stamps_the_build_and_status_maps_it() {
    let fake = FakeBuildkite::start(FakeOptions::default()).await.unwrap();
    let r = runner(&fake);
    let req = request("https://git.example/c/1").with_job_env(BTreeMap::from([(
        "STITCH_JOB_TOKEN".to_string(),
        "tok".to_string(),
    )]));
    let rref = r.trigger(&req).await.unwrap();
    assert_eq!(rref.id, "1");
    assert!(rref.url.as_deref().unwrap().ends_with("/acme/app/builds/1"));
    assert!(rref.data("uuid").is_some());
    let json = fake.build_json(req.build_id.as_str()).unwrap();
    assert_eq!(json["meta_data"]["stitch:build_id"], req.build_id.as_str());
    assert_eq!(json["meta_data"]["stitch:queue"], "ci");
    assert!(json["meta_data"].get("STITCH_JOB_TOKEN").is_none());
    assert_eq!(json["env"]["STITCH_JOB_TOKEN"], "tok");
    assert_eq!(json["env"]["STITCH_HEAD"], r#"["https://git.example/c/1"]"#);
    assert_eq!(json["branch"], "main");
    assert_eq!(json["commit"], "HEAD");
    let h = req.handle().with_ref(rref);
    let report = wait_terminal(fake.builds_moved(), &r, &h).await;
    assert_eq!(report.status, BuildStatus::Succeeded);
    assert_eq!(report.metadata.get("buildkite_state"), Some("passed"));
    assert_eq!(report.metadata.get("buildkite_number"), Some("1"));
    assert_eq!(report.metadata.get("buildkite_jobs_passed"), Some("2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_builds_surface_failing_and_the_promised_status() {
    let fake = FakeBuildkite::start(FakeOptions {
        timing: Timing {
            run: Duration::from_millis(800),
            ..Timing::default()
        },
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let r = runner(&fake);
    let req = request("https://git.example/c/1?stitch-bk=fail");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    let mut saw_failing = false;
    let last = wait_report(fake.builds_moved(), &r, &h, |s| {
        if s.metadata.get("buildkite_failing") == Some("true") {
            assert_eq!(s.status, BuildStatus::Running);
            assert_eq!(s.metadata.get("promised_exit_status"), Some("2"));
            saw_failing = true;
        }
        s.is_terminal()
    })
    .await;
    assert!(saw_failing, "never observed the failing state");
    assert_eq!(last.status, BuildStatus::Failed);
    assert_eq!(last.metadata.get("exit_status"), Some("2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_ref_is_recovered_through_meta_data() {
    let fake = FakeBuildkite::start(FakeOptions::default()).await.unwrap();
    let req = request("https://git.example/c/1?stitch-bk=hang");
    runner(&fake).trigger(&req).await.unwrap();
    // A fresh runner (a restart) with no ref: status, cancel and trigger find it.
    let fresh = runner(&fake);
    let h = req.handle();
    let s = fresh.status(&h).await.unwrap();
    assert!(!s.is_terminal());
    let again = fresh.trigger(&req).await.unwrap();
    assert_eq!(again.id, "1");
    assert_eq!(fake.builds_for(req.build_id.as_str()), 1);
    runner(&fake).cancel(&h).await.unwrap();
    let done = wait_terminal(fake.builds_moved(), &fresh, &h).await;
    assert_eq!(done.status, BuildStatus::Cancelled);
    // Cancelling the finished build: Buildkite's 422 is a no-op.
    runner(&fake)
        .cancel(&h.clone().with_ref(again))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_answers_lost_in_every_way_make_exactly_one_build() {
    let fake = FakeBuildkite::start(FakeOptions::default()).await.unwrap();
    let r = runner(&fake);
    for (req, got) in support::lost_starts_make_exactly_one_build(&fake, &r, request).await {
        assert!(r.status(&req.handle().with_ref(got)).await.is_ok());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_calls_ride_out_5xx_bursts_and_resets() {
    let fake = FakeBuildkite::start(FakeOptions::default()).await.unwrap();
    let r = runner(&fake);
    let req = request("https://git.example/c/1");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    support::status_reads_ride_out_5xx_bursts_and_resets(&fake, &r, &h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_pause_the_org_and_the_budget_holds() {
    let fake = FakeBuildkite::start(FakeOptions {
        rate_limit: Some((1000, Duration::from_secs(60))),
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let budget = Arc::new(RequestBudget::new(RateLimit {
        requests: 20,
        window: Duration::from_secs(1),
    }));
    let r = Arc::new(BuildkiteRunner::new(
        client(&fake, budget.clone()),
        config(),
    ));
    fake.rate_limit_storm(Duration::from_millis(1500));
    let mut tasks = Vec::new();
    for i in 0..10 {
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            let req = request(&format!("https://git.example/c/{i}"));
            r.trigger(&req).await.map(|rr| (req, rr))
        }));
    }
    for t in tasks {
        let (req, _) = t.await.unwrap().unwrap();
        assert_eq!(fake.builds_for(req.build_id.as_str()), 1);
    }
    let stats = fake.stats();
    assert!(stats.rate_limited > 0, "{stats:?}");
    assert_eq!(stats.builds_created, 10);
    assert!(fake.max_requests_in("acme", Duration::from_secs(1)) <= 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_follow_link_pagination_and_filter_by_meta_data() {
    let fake = FakeBuildkite::start(FakeOptions::default()).await.unwrap();
    for i in 0..250 {
        let md = BTreeMap::from([(
            "team".to_string(),
            if i % 2 == 0 { "a" } else { "b" }.to_string(),
        )]);
        fake.create_foreign_build("acme", "app", md).unwrap();
    }
    let c = client(&fake, unlimited());
    let all_a = c
        .list_builds(
            &pipeline(),
            &BuildQuery {
                meta_data: vec![("team".into(), "a".into())],
                exclude_jobs: true,
                ..BuildQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(all_a.len(), 125);
    assert!(
        all_a.windows(2).all(|w| w[0].number > w[1].number),
        "newest first"
    );
    assert_eq!(fake.stats().requests["list_builds"], 2, "two pages of 100");
    assert!(all_a.iter().all(|b| b.meta_data["team"] == "a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_scope_failures_are_errors_never_empty_logs() {
    let fake = FakeBuildkite::start(FakeOptions::default()).await.unwrap();
    let bad = BuildkiteRunner::new(
        Client::new(
            http("wrong", Duration::from_secs(2)),
            fake.url(),
            unlimited(),
            fast_retry(),
        )
        .unwrap(),
        config(),
    );
    let e = bad
        .trigger(&request("https://git.example/c/1"))
        .await
        .unwrap_err();
    assert!(matches!(e, RunnerError::Http { status: 401, .. }), "{e}");
    assert!(!e.is_retryable());

    let r = runner(&fake);
    let req = request("https://git.example/c/1");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    wait_terminal(fake.builds_moved(), &r, &h).await;
    fake.set_scopes(&["read_builds", "write_builds"]);
    let mut logs = r.logs(&h).await.unwrap();
    let mut saw_error = false;
    while let Some(item) = logs.next().await {
        if let Err(e) = item {
            assert!(matches!(e, RunnerError::Http { status: 403, .. }), "{e}");
            saw_error = true;
        }
    }
    assert!(saw_error, "a missing scope must surface as an error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_a_running_build_with_buildkite_timestamps() {
    let fake = FakeBuildkite::start(FakeOptions {
        timing: Timing {
            run: Duration::from_millis(600),
            ..Timing::default()
        },
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let r = runner(&fake);
    let req = request("https://git.example/c/1");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    let lines: Vec<_> = tokio::time::timeout(
        Duration::from_secs(10),
        r.logs(&h).await.unwrap().collect::<Vec<_>>(),
    )
    .await
    .unwrap()
    .into_iter()
    .map(Result::unwrap)
    .collect();
    let starts: Vec<_> = lines
        .iter()
        .filter(|l| l.step_status == Some(StepStatus::Start))
        .collect();
    let ends = lines
        .iter()
        .filter(|l| l.step_status == Some(StepStatus::End))
        .count();
    assert_eq!(starts.len(), 2);
    assert_eq!(ends, 2);
    assert_eq!(starts[0].content, "build");
    assert_eq!(starts[1].step_command.as_deref(), Some("make test"));
    let data: Vec<_> = lines.iter().filter(|l| l.kind == LogKind::Data).collect();
    assert!(data.iter().any(|l| l.content == "$ make test"));
    assert!(data.iter().all(|l| !l.content.contains("_bk;t=")));
    assert!(data
        .windows(2)
        .all(|w| w[0].time <= w[1].time || w[0].step_id != w[1].step_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ref_of_another_build_is_not_found() {
    let fake = FakeBuildkite::start(FakeOptions::default()).await.unwrap();
    support::refs_of_other_builds_are_not_found(&runner(&fake)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_passes_against_the_fake() {
    let fake = FakeBuildkite::start(FakeOptions::default()).await.unwrap();
    let new_runner = move || Arc::new(runner(&fake)) as Arc<dyn BuildRunner>;
    support::assert_conformance(new_runner, "bk", |r| r).await;
}
