//! The Jenkins client and runner against the stateful fake Jenkins
//! (`stitch-fake-providers`) over real HTTP on loopback.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use stitch_core::{BuildRunner, BuildStatus, LogKind, RunnerError, StepStatus};
use stitch_fake_providers::jenkins::{
    Endpoint, FakeJenkins, FakeOptions, Fault, FaultControl, Timing,
};
use stitch_runners::http_budget::{RateLimit, RequestBudget};
use stitch_runners::jenkins::{Client, Credentials, JenkinsConfig, JenkinsRunner, JobPath};
use support::{fast_retry, request, unlimited, wait_report, wait_terminal};

mod support;

/// A transport as the server wiring makes it: a timeout, no redirects.
fn http(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn client_as(fake: &FakeJenkins, token: &str, budget: Arc<RequestBudget>) -> Client {
    Client::new(
        http(Duration::from_millis(700)),
        &fake.url(),
        Credentials::new(fake.user(), token).unwrap(),
        budget,
        fast_retry(),
    )
    .unwrap()
}

fn client(fake: &FakeJenkins) -> Client {
    client_as(fake, fake.token(), unlimited())
}

fn config() -> JenkinsConfig {
    JenkinsConfig {
        log_poll: Duration::from_millis(50),
        lookup_settle: Duration::from_millis(300),
        ..JenkinsConfig::new(JobPath::parse("team/app").unwrap())
    }
}

fn runner(fake: &FakeJenkins) -> JenkinsRunner {
    JenkinsRunner::new(client(fake), config())
}

async fn fake_with(options: FakeOptions) -> FakeJenkins {
    FakeJenkins::start(options).await.unwrap()
}

async fn fake() -> FakeJenkins {
    fake_with(FakeOptions::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_queues_a_parameterised_build_and_status_follows_it() {
    let fake = fake().await;
    let r = runner(&fake);
    let req = request("https://git.example/c/1").with_job_env(BTreeMap::from([
        ("STITCH_JOB_TOKEN".to_string(), "job-secret".to_string()),
        ("STITCH_SERVER".to_string(), "http://stitch".to_string()),
    ]));
    let rref = r.trigger(&req).await.unwrap();
    assert_eq!(rref.id, "1", "the ref is the queue item");
    assert_eq!(rref.data("job"), Some("team/app"));
    let item = fake.item_json(req.build_id.as_str()).unwrap();
    let params = &item["actions"][0]["parameters"];
    let value = |name: &str| {
        params
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
    };
    assert_eq!(
        value("STITCH_BUILD_ID").unwrap()["value"],
        req.build_id.as_str()
    );
    assert_eq!(value("STITCH_QUEUE").unwrap()["value"], "ci");
    assert_eq!(
        value("STITCH_HEAD").unwrap()["value"],
        r#"["https://git.example/c/1"]"#
    );
    assert_eq!(value("STITCH_SERVER").unwrap()["value"], "http://stitch");
    // A password parameter: Jenkins lists it without its value.
    assert!(value("STITCH_JOB_TOKEN").unwrap().get("value").is_none());
    let h = req.handle().with_ref(rref);
    let report = wait_terminal(fake.builds_moved(), &r, &h).await;
    assert_eq!(report.status, BuildStatus::Succeeded);
    assert_eq!(report.metadata.get("jenkins_result"), Some("SUCCESS"));
    assert_eq!(report.metadata.get("jenkins_number"), Some("1"));
    assert_eq!(report.metadata.get("jenkins_queue_item"), Some("1"));
    assert!(report
        .metadata
        .get("url")
        .unwrap()
        .ends_with("/job/team/job/app/1/"));
    assert_eq!(fake.items_for(req.build_id.as_str()), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_result_maps_to_its_status() {
    let fake = fake().await;
    let r = runner(&fake);
    for (marker, status, result) in [
        ("fail", BuildStatus::Failed, "FAILURE"),
        ("unstable", BuildStatus::Failed, "UNSTABLE"),
        ("not_built", BuildStatus::Failed, "NOT_BUILT"),
    ] {
        let req = request(&format!("https://git.example/c/1?stitch-jk={marker}"));
        let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
        let report = wait_terminal(fake.builds_moved(), &r, &h).await;
        assert_eq!(report.status, status, "{marker}");
        assert_eq!(report.metadata.get("jenkins_result"), Some(result));
    }
    let req = request("https://git.example/c/1?stitch-jk=unknown");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    let report = wait_report(fake.builds_moved(), &r, &h, |s| {
        s.metadata.get("jenkins_result").is_some()
    })
    .await;
    assert_eq!(report.status, BuildStatus::Unknown);
    assert_eq!(
        report.metadata.get("jenkins_result"),
        Some("PARTIALLY_GREEN")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_and_waiting_items_are_accepted_and_cancel_in_the_queue() {
    let fake = fake().await;
    let r = runner(&fake);
    let stuck = request("https://git.example/c/1?stitch-jk=stuck");
    let h = stuck.handle().with_ref(r.trigger(&stuck).await.unwrap());
    let report = r.status(&h).await.unwrap();
    assert_eq!(report.status, BuildStatus::Accepted);
    assert_eq!(report.metadata.get("jenkins_stuck"), Some("true"));
    assert!(report
        .metadata
        .get("jenkins_why")
        .unwrap()
        .contains("label"));
    r.cancel(&h).await.unwrap();
    let done = r.status(&h).await.unwrap();
    assert_eq!(done.status, BuildStatus::Cancelled);
    // A restarted runner without the ref finds the cancelled item as well
    // as Jenkins still serves it... and after Jenkins forgot it, nothing.
    let waiting = request("https://git.example/c/2?stitch-jk=queue");
    let h = waiting
        .handle()
        .with_ref(r.trigger(&waiting).await.unwrap());
    let report = r.status(&h).await.unwrap();
    assert_eq!(report.status, BuildStatus::Accepted);
    assert_eq!(report.metadata.get("jenkins_stuck"), None);
    let fresh = runner(&fake);
    fresh.cancel(&waiting.handle()).await.unwrap();
    assert_eq!(
        fresh.status(&h).await.unwrap().status,
        BuildStatus::Cancelled
    );
    assert_eq!(fake.stats().requests["cancel_item"], 2);
    assert!(fake.stitch_builds().is_empty(), "nothing ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_build_is_stopped_and_the_next_poll_confirms_it() {
    let fake = fake().await;
    let r = runner(&fake);
    let req = request("https://git.example/c/1?stitch-jk=hang");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    wait_report(fake.builds_moved(), &r, &h, |s| {
        s.status == BuildStatus::Running
    })
    .await;
    r.cancel(&h).await.unwrap();
    let done = wait_terminal(fake.builds_moved(), &r, &h).await;
    assert_eq!(done.status, BuildStatus::Cancelled);
    assert_eq!(done.metadata.get("jenkins_result"), Some("ABORTED"));
    // Cancelling the finished build sends nothing more.
    let stops = fake.stats().requests["stop"];
    r.cancel(&h).await.unwrap();
    assert_eq!(fake.stats().requests["stop"], stops);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_finds_the_build_by_its_parameter_after_jenkins_forgot_the_item() {
    let fake = fake().await;
    let req = request("https://git.example/c/1?stitch-jk=hang");
    let first = runner(&fake);
    let rref = first.trigger(&req).await.unwrap();
    let h = req.handle().with_ref(rref.clone());
    wait_report(fake.builds_moved(), &first, &h, |s| {
        s.status == BuildStatus::Running
    })
    .await;
    fake.forget_left_items();
    // A restarted runner: the ref's queue item answers 404, the lookup
    // finds the build by STITCH_BUILD_ID; without a ref likewise.
    for handle in [h.clone(), req.handle()] {
        let fresh = runner(&fake);
        let s = fresh.status(&handle).await.unwrap();
        assert_eq!(s.status, BuildStatus::Running);
        assert_eq!(s.metadata.get("jenkins_number"), Some("1"));
    }
    let again = runner(&fake).trigger(&req).await.unwrap();
    assert_eq!(again.id, rref.id, "the same queue item, via the build");
    assert_eq!(again.data("number"), Some("1"));
    assert_eq!(
        fake.items_for(req.build_id.as_str()),
        1,
        "never triggered again"
    );
    runner(&fake).cancel(&req.handle()).await.unwrap();
    let done = wait_terminal(fake.builds_moved(), &first, &h).await;
    assert_eq!(done.status, BuildStatus::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_answers_lost_in_every_way_make_exactly_one_build() {
    let fake = fake().await;
    let r = runner(&fake);
    for (req, got) in support::lost_starts_make_exactly_one_build(&fake, &r, request).await {
        let h = req.handle().with_ref(got);
        let done = wait_terminal(fake.builds_moved(), &r, &h).await;
        assert_eq!(done.status, BuildStatus::Succeeded);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_lost_while_the_item_became_a_build_is_found_among_the_builds() {
    // The item leaves the queue at once: the lookup after the lost answer
    // finds it among the job's builds, not in the queue.
    let fake = fake_with(FakeOptions {
        timing: Timing {
            queue: Duration::ZERO,
            ..Timing::default()
        },
        ..FakeOptions::default()
    })
    .await;
    for i in 0..3 {
        fake.queue_foreign_build("team/app", &[("STITCH_HEAD", &format!("other {i}"))]);
    }
    let r = runner(&fake);
    fake.inject(Endpoint::Trigger, Fault::Timeout(Duration::from_secs(2)), 1);
    let req = request("https://git.example/c/1");
    let got = r.trigger(&req).await.unwrap();
    assert_eq!(fake.items_for(req.build_id.as_str()), 1);
    assert!(got.data("number").is_some(), "{got:?}");
    let s = r.status(&req.handle().with_ref(got)).await.unwrap();
    assert!(s.metadata.get("jenkins_number").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_calls_ride_out_5xx_bursts_resets_and_429s() {
    let fake = fake().await;
    let r = runner(&fake);
    let req = request("https://git.example/c/1?stitch-jk=hang");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    wait_report(fake.builds_moved(), &r, &h, |s| {
        s.status == BuildStatus::Running
    })
    .await;
    support::status_reads_ride_out_5xx_bursts_and_resets(&fake, &r, &h).await;
    fake.rate_limit_storm(Duration::from_millis(900));
    r.status(&h).await.unwrap();
    assert!(fake.stats().rate_limited > 0);
    r.cancel(&h).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_holds_under_a_429_storm() {
    let fake = fake().await;
    let budget = Arc::new(RequestBudget::new(RateLimit {
        requests: 20,
        window: Duration::from_secs(1),
    }));
    let r = Arc::new(JenkinsRunner::new(
        client_as(&fake, fake.token(), budget),
        config(),
    ));
    fake.rate_limit_storm(Duration::from_millis(1500));
    let mut tasks = Vec::new();
    for i in 0..10 {
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            let req = request(&format!("https://git.example/c/{i}"));
            r.trigger(&req).await.map(|_| req)
        }));
    }
    for t in tasks {
        let req = t.await.unwrap().unwrap();
        assert_eq!(fake.items_for(req.build_id.as_str()), 1);
    }
    assert!(fake.stats().rate_limited > 0);
    assert_eq!(fake.stats().items_queued, 10);
    assert!(fake.max_requests_in(Duration::from_secs(1)) <= 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crumbs_are_fetched_when_asked_for_and_renewed_when_stale() {
    let fake = fake_with(FakeOptions {
        require_crumb: true,
        ..FakeOptions::default()
    })
    .await;
    let r = runner(&fake);
    let req = request("https://git.example/c/1?stitch-jk=hang");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    let stats = fake.stats();
    assert_eq!((stats.crumb_refused, stats.requests["crumb"]), (1, 1));
    assert_eq!(stats.items_queued, 1);
    wait_report(fake.builds_moved(), &r, &h, |s| {
        s.status == BuildStatus::Running
    })
    .await;
    // The crumb is kept for later POSTs, and renewed once it went stale.
    fake.expire_crumbs();
    r.cancel(&h).await.unwrap();
    let done = wait_terminal(fake.builds_moved(), &r, &h).await;
    assert_eq!(done.status, BuildStatus::Cancelled);
    let stats = fake.stats();
    assert_eq!((stats.crumb_refused, stats.requests["crumb"]), (2, 2));
    // Without a crumb issuer behind the refusal, the refusal is the error.
    let plain = fake_with(FakeOptions::default()).await;
    plain.set_require_crumb(true);
    plain.inject(Endpoint::Crumb, Fault::Status(404), 1);
    let e = runner(&plain)
        .trigger(&request("https://git.example/c/2"))
        .await
        .unwrap_err();
    assert!(matches!(e, RunnerError::Http { status: 403, .. }), "{e}");
    assert!(!e.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_errors_that_never_show_the_token() {
    let fake = fake().await;
    let token = "wrong-but-secret-token";
    let bad = JenkinsRunner::new(client_as(&fake, token, unlimited()), config());
    let e = bad
        .trigger(&request("https://git.example/c/1"))
        .await
        .unwrap_err();
    assert!(matches!(e, RunnerError::Http { status: 401, .. }), "{e}");
    assert!(!e.is_retryable());
    assert!(!e.to_string().contains(token), "{e}");
    assert!(!format!("{bad:?}").contains(token));
    assert_eq!(fake.stats().unauthorized, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_followed_from_offsets_and_never_read_twice() {
    let fake = fake_with(FakeOptions {
        timing: Timing {
            run: Duration::from_millis(600),
            ..Timing::default()
        },
        ..FakeOptions::default()
    })
    .await;
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
    assert_eq!(starts.len(), 1);
    assert_eq!(starts[0].content, "team » app #1");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.step_status == Some(StepStatus::End))
            .count(),
        1
    );
    let data: Vec<&str> = lines
        .iter()
        .filter(|l| l.kind == LogKind::Data)
        .map(|l| l.content.as_str())
        .collect();
    assert_eq!(data.first(), Some(&"Started by remote host 127.0.0.1"));
    assert!(
        data.contains(&"[Pipeline] sh"),
        "console notes dropped: {data:?}"
    );
    assert!(data.iter().all(|l| !l.contains("ha:////")));
    assert_eq!(data.last(), Some(&"Finished: SUCCESS"));
    let mut unique = data.clone();
    unique.dedup();
    assert_eq!(unique.len(), data.len(), "no line twice: {data:?}");
    let offsets = fake.console_starts();
    assert!(offsets.len() >= 2, "{offsets:?}");
    assert!(
        offsets.windows(2).all(|w| w[0] <= w[1]),
        "offsets only grow: {offsets:?}"
    );
    assert!(offsets.iter().skip(1).any(|o| *o > 0), "{offsets:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ref_of_another_build_is_not_found() {
    support::refs_of_other_builds_are_not_found(&runner(&fake().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_without_the_stitch_parameters_is_reported_not_silently_lost() {
    let fake = fake_with(FakeOptions {
        jobs: vec![("team/app".into(), Vec::new())],
        ..FakeOptions::default()
    })
    .await;
    let r = runner(&fake);
    let req = request("https://git.example/c/1");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    let e = r.status(&h).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(
        e.to_string().contains("declare the STITCH_* parameters"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_passes_against_the_fake() {
    let fake = fake().await;
    let new_runner = move || Arc::new(runner(&fake)) as Arc<dyn BuildRunner>;
    support::assert_conformance(new_runner, "jk", |r| r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_past_max_log_bytes_ends_with_a_truncation_line() {
    let fake = fake().await;
    let r = JenkinsRunner::new(
        client(&fake),
        JenkinsConfig {
            max_log_bytes: 40,
            ..config()
        },
    );
    let req = request("https://git.example/c/1");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    wait_terminal(fake.builds_moved(), &r, &h).await;
    let lines: Vec<_> = tokio::time::timeout(
        Duration::from_secs(10),
        r.logs(&h).await.unwrap().collect::<Vec<_>>(),
    )
    .await
    .unwrap()
    .into_iter()
    .map(Result::unwrap)
    .collect();
    let data: Vec<&str> = lines
        .iter()
        .filter(|l| l.kind == LogKind::Data)
        .map(|l| l.content.as_str())
        .collect();
    assert_eq!(data[0], "Started by remote host 127.0.0.1");
    assert!(
        data.last().unwrap().starts_with("[stitch] log truncated"),
        "{data:?}"
    );
    assert_eq!(
        fake.stats().requests["console"],
        1,
        "nothing read past the cap"
    );
}
