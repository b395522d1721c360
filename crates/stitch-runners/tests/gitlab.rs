//! The GitLab client and runner against the stateful fake GitLab
//! (`stitch-fake-providers`) over real HTTP on loopback.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use stitch_core::{BuildRunner, BuildStatus, LogKind, RunnerError, StepStatus};
use stitch_fake_providers::gitlab::{FakeGitlab, FakeOptions, Timing};
use stitch_runners::gitlab::{Client, GitlabConfig, GitlabRunner, PipelineQuery};
use stitch_runners::http_budget::{RateLimit, RequestBudget};
use support::{fast_retry, request, unlimited, wait_report, wait_terminal};

mod support;

fn http(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder().timeout(timeout).build().unwrap()
}

fn client_with(fake: &FakeGitlab, token: &str, budget: Arc<RequestBudget>) -> Client {
    Client::new(
        http(Duration::from_millis(700)),
        &fake.url(),
        token,
        budget,
        fast_retry(),
    )
    .unwrap()
}

fn config() -> GitlabConfig {
    GitlabConfig {
        log_poll: Duration::from_millis(50),
        lookup_settle: Duration::from_millis(300),
        ..GitlabConfig::new("acme/app", "main")
    }
}

fn runner(fake: &FakeGitlab) -> GitlabRunner {
    GitlabRunner::new(client_with(fake, fake.token(), unlimited()), config())
}

async fn fake() -> FakeGitlab {
    FakeGitlab::start(FakeOptions::default()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_sets_the_variables_and_names_the_pipeline_and_status_maps_it() {
    let fake = fake().await;
    let r = runner(&fake);
    let req = request("https://git.example/c/1").with_job_env(BTreeMap::from([(
        "STITCH_JOB_TOKEN".to_string(),
        "tok".to_string(),
    )]));
    let rref = r.trigger(&req).await.unwrap();
    assert_eq!(rref.id, "1");
    assert_eq!(rref.data("project"), Some("acme/app"));
    assert!(rref
        .url
        .as_deref()
        .unwrap()
        .ends_with("/acme/app/-/pipelines/1"));
    let json = fake.pipeline_json(req.build_id.as_str()).unwrap();
    assert_eq!(json["name"], format!("stitch {}", req.build_id));
    assert_eq!(json["ref"], "main");
    let vars = fake.pipeline_variables(req.build_id.as_str()).unwrap();
    assert_eq!(vars["STITCH_JOB_TOKEN"], "tok");
    assert_eq!(vars["STITCH_QUEUE"], "ci");
    assert_eq!(vars["STITCH_HEAD"], r#"["https://git.example/c/1"]"#);
    assert_eq!(vars["STITCH_BASE"], r#"["https://git.example/base/1"]"#);
    assert_eq!(vars["STITCH_METADATA"], "{}");
    let h = req.handle().with_ref(rref);
    let report = wait_terminal(fake.pipelines_moved(), &r, &h).await;
    assert_eq!(report.status, BuildStatus::Succeeded);
    assert_eq!(report.metadata.get("gitlab_status"), Some("success"));
    assert_eq!(report.metadata.get("gitlab_pipeline_id"), Some("1"));
    assert_eq!(fake.stats().requests["create_pipeline"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_unknown_and_manual_pipelines_map_with_their_reasons() {
    let fake = fake().await;
    let r = runner(&fake);
    let req = request("https://git.example/c/1?stitch-gl=fail");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    let done = wait_terminal(fake.pipelines_moved(), &r, &h).await;
    assert_eq!(done.status, BuildStatus::Failed);
    assert_eq!(done.metadata.get("gitlab_status"), Some("failed"));

    let req = request("https://git.example/c/2?stitch-gl=unknown");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    let s = wait_report(fake.pipelines_moved(), &r, &h, |s| {
        s.status == BuildStatus::Unknown
    })
    .await;
    assert!(s
        .metadata
        .get("gitlab_reason")
        .unwrap()
        .contains("waiting_for_callback"));

    let req = request("https://git.example/c/3?stitch-gl=manual");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    let s = wait_report(fake.pipelines_moved(), &r, &h, |s| {
        s.metadata.get("gitlab_status") == Some("manual")
    })
    .await;
    assert_eq!(s.status, BuildStatus::Running);
    assert_eq!(s.metadata.get("gitlab_blocked"), Some("true"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_ref_is_recovered_by_the_pipeline_name() {
    let fake = fake().await;
    // Someone else's pipelines first: a lookup must not take them.
    fake.create_foreign_pipeline("acme/app", BTreeMap::new())
        .unwrap();
    let req = request("https://git.example/c/1?stitch-gl=hang");
    let first = runner(&fake).trigger(&req).await.unwrap();
    // A fresh runner (a restart) with no ref: status, cancel and trigger find it.
    let fresh = runner(&fake);
    let h = req.handle();
    assert!(!fresh.status(&h).await.unwrap().is_terminal());
    let again = fresh
        .trigger(&stitch_core::TriggerRequest {
            first_attempt: false,
            ..req.clone()
        })
        .await
        .unwrap();
    assert_eq!(again.id, first.id);
    assert_eq!(fake.pipelines_for(req.build_id.as_str()), 1);
    runner(&fake).cancel(&h).await.unwrap();
    // The cancel is confirmed by the next poll: `canceling`, then `canceled`.
    let done = wait_report(fake.pipelines_moved(), &fresh, &h, |s| {
        s.metadata.get("gitlab_status") == Some("canceled")
    })
    .await;
    assert_eq!(done.status, BuildStatus::Cancelled);
    let cancels = fake.stats().requests["cancel"];
    // Cancelling the finished pipeline changes nothing and asks GitLab nothing.
    runner(&fake)
        .cancel(&h.clone().with_ref(again))
        .await
        .unwrap();
    assert_eq!(fake.stats().requests["cancel"], cancels);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_answers_lost_in_every_way_make_exactly_one_pipeline() {
    let fake = fake().await;
    let r = runner(&fake);
    for (req, got) in support::lost_starts_make_exactly_one_build(&fake, &r, request).await {
        assert!(r.status(&req.handle().with_ref(got)).await.is_ok());
    }
    assert_eq!(fake.stats().pipelines_created, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_calls_ride_out_5xx_bursts_and_resets() {
    let fake = fake().await;
    let r = runner(&fake);
    let req = request("https://git.example/c/1");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    support::status_reads_ride_out_5xx_bursts_and_resets(&fake, &r, &h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_pause_the_token_and_the_budget_holds() {
    let fake = FakeGitlab::start(FakeOptions {
        rate_limit: Some((1000, Duration::from_secs(60))),
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let budget = Arc::new(RequestBudget::new(RateLimit {
        requests: 20,
        window: Duration::from_secs(1),
    }));
    let r = Arc::new(GitlabRunner::new(
        client_with(&fake, fake.token(), budget),
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
        assert_eq!(fake.pipelines_for(req.build_id.as_str()), 1);
    }
    let stats = fake.stats();
    assert!(stats.rate_limited > 0, "{stats:?}");
    assert_eq!(stats.pipelines_created, 10);
    assert!(fake.max_requests_in(Duration::from_secs(1)) <= 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_window_pauses_the_budget_before_gitlab_refuses() {
    // A window of 5: the fifth answer says 0 remain, and the client waits
    // for the reset instead of spending a sixth request on a 429.
    let fake = FakeGitlab::start(FakeOptions {
        rate_limit: Some((5, Duration::from_secs(2))),
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let r = runner(&fake);
    let req = request("https://git.example/c/1?stitch-gl=hang");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    for _ in 0..8 {
        r.status(&h).await.unwrap();
    }
    assert_eq!(fake.stats().rate_limited, 0, "{:?}", fake.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_tokens_create_through_the_trigger_endpoint() {
    let fake = fake().await;
    let client =
        client_with(&fake, fake.token(), unlimited()).with_trigger_token(fake.trigger_token());
    let r = GitlabRunner::new(client, config());
    let req = request("https://git.example/c/1");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    let stats = fake.stats();
    assert_eq!(stats.requests.get("trigger_pipeline"), Some(&1));
    assert_eq!(stats.requests.get("create_pipeline"), None);
    let done = wait_terminal(fake.pipelines_moved(), &r, &h).await;
    assert_eq!(done.status, BuildStatus::Succeeded);

    let wrong = client_with(&fake, fake.token(), unlimited()).with_trigger_token("glptt-wrong");
    let e = GitlabRunner::new(wrong, config())
        .trigger(&request("https://git.example/c/2"))
        .await
        .unwrap_err();
    assert!(
        e.is_not_found(),
        "GitLab hides a bad trigger token as 404: {e}"
    );
    assert!(!e.to_string().contains("glptt"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_refs_are_errors_that_are_not_retried() {
    let fake = fake().await;
    let bad = GitlabRunner::new(client_with(&fake, "glpat-wrong", unlimited()), config());
    let e = bad
        .trigger(&request("https://git.example/c/1"))
        .await
        .unwrap_err();
    assert!(matches!(e, RunnerError::Http { status: 401, .. }), "{e}");
    assert!(!e.is_retryable());
    assert!(!e.to_string().contains("glpat"), "{e}");

    let elsewhere = GitlabRunner::new(
        client_with(&fake, fake.token(), unlimited()),
        GitlabConfig::new("acme/app", "no-such-branch"),
    );
    let e = elsewhere
        .trigger(&request("https://git.example/c/1"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("Reference not found"), "{e}");
    assert!(!e.is_retryable());
    assert_eq!(fake.stats().pipelines_created, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_not_named_for_its_build_is_not_found_with_a_hint() {
    let fake = FakeGitlab::start(FakeOptions {
        name_template: None,
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let r = runner(&fake);
    let req = request("https://git.example/c/1");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    let e = r.status(&h).await.unwrap_err();
    assert!(e.is_not_found());
    assert!(e.to_string().contains("workflow: name"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ref_of_another_build_is_not_found() {
    support::refs_of_other_builds_are_not_found(&runner(&fake().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_follow_link_pagination_and_filter_by_name() {
    let fake = fake().await;
    for i in 0..250 {
        let vars = BTreeMap::from([(
            "STITCH_PIPELINE_NAME".to_string(),
            if i % 2 == 0 { "even" } else { "odd" }.to_string(),
        )]);
        fake.create_foreign_pipeline("acme/app", vars).unwrap();
    }
    // A patient client: a timed-out page would be asked for again.
    let c = Client::new(
        http(Duration::from_secs(20)),
        &fake.url(),
        fake.token(),
        unlimited(),
        fast_retry(),
    )
    .unwrap();
    let even = c
        .list_pipelines(
            "acme/app",
            &PipelineQuery {
                name: Some("even".into()),
                ..PipelineQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(even.len(), 125);
    assert!(even.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    assert!(even.iter().all(|p| p.name.as_deref() == Some("even")));
    assert_eq!(
        fake.stats().requests["list_pipelines"],
        2,
        "two pages of 100"
    );
    // By numeric id too.
    assert_eq!(
        c.get_pipeline("42", even[0].id).await.unwrap().id,
        even[0].id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_stream_incrementally_one_step_per_job() {
    let fake = FakeGitlab::start(FakeOptions {
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
    let mut stream = r.logs(&h).await.unwrap();
    // Once the build job's step opened, its trace grows while it is read.
    let mut lines = Vec::new();
    while let Some(line) = stream.next().await {
        let line = line.unwrap();
        let opened = line.step_status == Some(StepStatus::Start);
        lines.push(line);
        if opened {
            break;
        }
    }
    assert!(fake.append_trace(req.build_id.as_str(), 0, "appended once\n"));
    let rest: Vec<_> = tokio::time::timeout(Duration::from_secs(10), stream.collect::<Vec<_>>())
        .await
        .unwrap();
    lines.extend(rest.into_iter().map(Result::unwrap));
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
    assert_eq!(starts[1].content, "test");
    assert_eq!(starts[1].step_command.as_deref(), Some("stage test"));
    let data: Vec<_> = lines.iter().filter(|l| l.kind == LogKind::Data).collect();
    assert_eq!(
        data.iter().filter(|l| l.content == "appended once").count(),
        1,
        "every line once, however often the trace was read"
    );
    assert!(data.iter().any(|l| l.content.contains("$ make test")));
    assert!(data
        .iter()
        .all(|l| !l.content.contains("section_start") && !l.content.contains(" 00O ")));
    assert!(fake.stats().requests["job_trace"] > 2, "read as it grew");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_past_max_log_bytes_ends_with_a_truncation_line() {
    let fake = fake().await;
    let r = GitlabRunner::new(
        client_with(&fake, fake.token(), unlimited()),
        GitlabConfig {
            max_log_bytes: 300,
            ..config()
        },
    );
    let req = request("https://git.example/c/1");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    wait_terminal(fake.pipelines_moved(), &r, &h).await;
    let lines: Vec<_> = r.logs(&h).await.unwrap().collect().await;
    let last = lines.last().unwrap().as_ref().unwrap();
    assert!(last.content.contains("log truncated"), "{last:?}");
    let bytes: usize = lines
        .iter()
        .filter_map(|l| l.as_ref().ok())
        .filter(|l| l.kind == LogKind::Data && !l.content.contains("log truncated"))
        .map(|l| l.content.len())
        .sum();
    assert!(bytes <= 300, "{bytes}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_passes_against_the_fake() {
    let fake = fake().await;
    let new_runner = move || Arc::new(runner(&fake)) as Arc<dyn BuildRunner>;
    support::assert_conformance(new_runner, "gl", |r| r).await;
}
