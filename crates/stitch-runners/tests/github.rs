//! The GitHub client and runner against the stateful fake GitHub
//! (`stitch-fake-providers`) over real HTTP on loopback.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use stitch_core::{BuildRunner, BuildStatus, LogKind, RunnerError, StepStatus, TriggerRequest};
use stitch_fake_providers::github::{FakeApp, FakeGithub, FakeOptions, Timing};
use stitch_runners::github::{
    AppTokens, Client, Credentials, GithubConfig, GithubRunner, Repo, RunQuery,
};
use stitch_runners::http_budget::{RateLimit, RequestBudget};
use support::{fast_retry, unlimited, wait_report, wait_terminal};

mod support;

const KEY: &[u8] = include_bytes!("../../stitch-fake-providers/tests/data/github/test_app_key.pem");
const PUBLIC: &[u8] =
    include_bytes!("../../stitch-fake-providers/tests/data/github/test_app_key.pub.pem");

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_millis(700))
        .build()
        .unwrap()
}

fn client_with(fake: &FakeGithub, version: &str, credentials: Credentials) -> Client {
    Client::new(
        http(),
        &fake.url(),
        version,
        credentials,
        unlimited(),
        fast_retry(),
    )
    .unwrap()
}

fn client(fake: &FakeGithub) -> Client {
    client_with(
        fake,
        "2022-11-28",
        Credentials::token(fake.token()).unwrap(),
    )
}

fn config() -> GithubConfig {
    GithubConfig {
        log_poll: Duration::from_millis(50),
        lookup_settle: Duration::from_millis(500),
        ..GithubConfig::new("acme", "app", "stitch.yml", "main")
    }
}

fn runner(fake: &FakeGithub) -> GithubRunner {
    GithubRunner::new(client(fake), config())
}

/// A first attempt: dispatched without looking for an earlier run.
fn request(head: &str) -> TriggerRequest {
    support::request(head).with_first_attempt(true)
}

fn repo() -> Repo {
    Repo {
        owner: "acme".into(),
        name: "app".into(),
    }
}

fn requests(fake: &FakeGithub, endpoint: &str) -> u64 {
    fake.stats().requests.get(endpoint).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_carries_the_inputs_and_returns_the_run_id() {
    let fake = FakeGithub::start(FakeOptions::default()).await.unwrap();
    let mut c = config();
    c.inputs = BTreeMap::from([
        ("environment".to_string(), "staging".to_string()),
        ("stitch_queue".to_string(), "spoofed".to_string()),
    ]);
    let r = GithubRunner::new(client(&fake), c);
    let req = request("https://git.example/c/1")
        .with_metadata(stitch_core::BuildMetadata::new().with("ticket", "T-1"))
        .with_job_env(BTreeMap::from([(
            "STITCH_JOB_TOKEN".to_string(),
            "tok".to_string(),
        )]));
    let rref = r.trigger(&req).await.unwrap();
    let run = fake.run_json(req.build_id.as_str()).unwrap();
    assert_eq!(rref.id, run["id"].to_string());
    assert_eq!(rref.url.as_deref(), run["html_url"].as_str());
    assert_eq!(
        run["display_title"],
        format!("stitch {}", req.build_id),
        "the run-name carries the build id"
    );
    let inputs = fake.run_inputs(req.build_id.as_str()).unwrap();
    assert_eq!(inputs["stitch_build_id"], req.build_id.as_str());
    assert_eq!(inputs["stitch_queue"], "ci", "reserved inputs win");
    assert_eq!(inputs["environment"], "staging");
    assert_eq!(inputs["stitch_head"], r#"["https://git.example/c/1"]"#);
    assert_eq!(inputs["stitch_base"], r#"["https://git.example/base/1"]"#);
    assert_eq!(inputs["stitch_metadata"], r#"{"ticket":"T-1"}"#);
    assert!(
        !inputs.values().any(|v| v.contains("tok\"")) && !inputs.contains_key("STITCH_JOB_TOKEN")
    );
    // The id came from the dispatch answer: no lookup on a first attempt.
    assert_eq!(requests(&fake, "list_runs"), 0);
    let h = req.handle().with_ref(rref);
    let report = wait_terminal(fake.runs_moved(), &r, &h).await;
    assert_eq!(report.status, BuildStatus::Succeeded);
    let m = &report.metadata;
    assert_eq!(m.get("github_status"), Some("completed"));
    assert_eq!(m.get("github_conclusion"), Some("success"));
    assert_eq!(m.get("github_run_attempt"), Some("1"));
    assert_eq!(
        m.get("github_run_id"),
        Some(h.runner_ref.as_ref().unwrap().id.as_str())
    );
    assert!(m.get("url").unwrap().contains("/acme/app/actions/runs/"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_2026_gets_run_details_without_the_flag() {
    let fake = FakeGithub::start(FakeOptions::default()).await.unwrap();
    let c = client_with(
        &fake,
        "2026-03-10",
        Credentials::token(fake.token()).unwrap(),
    );
    let r = GithubRunner::new(c, config());
    let req = request("https://git.example/c/1");
    let rref = r.trigger(&req).await.unwrap();
    assert_eq!(fake.runs_for(req.build_id.as_str()), 1);
    assert_eq!(requests(&fake, "dispatch"), 1, "the flag was not sent");
    assert_eq!(requests(&fake, "list_runs"), 0);
    assert!(rref.id.parse::<u64>().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_server_is_dispatched_without_run_details_and_found_by_run_name() {
    let fake = FakeGithub::start(FakeOptions {
        older_server: true,
        timing: Timing {
            list_lag: Duration::from_millis(200),
            ..Timing::default()
        },
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let r = runner(&fake);
    let mut ids = Vec::new();
    for i in 0..3 {
        let req = request(&format!("https://git.example/c/{i}"));
        let rref = r.trigger(&req).await.unwrap();
        let run = fake.run_json(req.build_id.as_str()).unwrap();
        assert_eq!(rref.id, run["id"].to_string());
        assert_eq!(fake.runs_for(req.build_id.as_str()), 1);
        ids.push(req.handle().with_ref(rref));
    }
    // One refused flag, then plain dispatches: the runner remembers.
    assert_eq!(requests(&fake, "dispatch"), 4);
    for h in &ids {
        assert_eq!(
            wait_terminal(fake.runs_moved(), &r, h).await.status,
            BuildStatus::Succeeded
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_dispatch_answers_make_exactly_one_run() {
    let fake = FakeGithub::start(FakeOptions::default()).await.unwrap();
    let r = runner(&fake);
    for (req, got) in support::lost_starts_make_exactly_one_build(&fake, &r, request).await {
        assert_eq!(
            got.id,
            fake.run_json(req.build_id.as_str()).unwrap()["id"].to_string()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_trigger_finds_the_run_instead_of_dispatching() {
    let fake = FakeGithub::start(FakeOptions::default()).await.unwrap();
    let req = request("https://git.example/c/1?stitch-gh=hang");
    let first = runner(&fake).trigger(&req).await.unwrap();
    // A restarted process: no cache, and the trigger is a redelivery.
    let fresh = runner(&fake);
    let again = fresh
        .trigger(&req.clone().with_first_attempt(false))
        .await
        .unwrap();
    assert_eq!(again.id, first.id);
    assert_eq!(fake.runs_for(req.build_id.as_str()), 1);
    // Without a ref, status and cancel find the run by its title too.
    let h = req.handle();
    let s = runner(&fake).status(&h).await.unwrap();
    assert!(!s.is_terminal());
    runner(&fake).cancel(&h).await.unwrap();
    let done = wait_terminal(fake.runs_moved(), &fresh, &h).await;
    assert_eq!(done.status, BuildStatus::Cancelled);
    assert_eq!(done.metadata.get("github_conclusion"), Some("cancelled"));
    // Cancelling the completed run: GitHub's 409 is a no-op.
    let direct = client(&fake)
        .cancel_run(&repo(), again.id.parse().unwrap())
        .await;
    assert!(direct.unwrap_err().is_conflict());
    runner(&fake).cancel(&h.with_ref(again)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_runs_are_answered_304_and_cost_no_quota() {
    let fake = FakeGithub::start(FakeOptions {
        rate_limit: Some(1000),
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let r = runner(&fake);
    let req = request("https://git.example/c/1?stitch-gh=hang");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    wait_report(fake.runs_moved(), &r, &h, |s| {
        s.status == BuildStatus::Running
    })
    .await;
    // Once the second job started, nothing changes any more.
    fake.run_until(h.build_id.as_str(), |_, jobs| {
        jobs.iter().all(|j| j["status"] != "queued")
    })
    .await;
    r.status(&h).await.unwrap();
    let before = fake.stats();
    for _ in 0..5 {
        assert_eq!(r.status(&h).await.unwrap().status, BuildStatus::Running);
    }
    let after = fake.stats();
    assert_eq!(after.not_modified - before.not_modified, 5, "{after:?}");
    r.cancel(&h).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_waited_out_or_handed_back_with_the_wait() {
    let fake = FakeGithub::start(FakeOptions {
        rate_limit: Some(6),
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let r = runner(&fake);
    let req = request("https://git.example/c/1");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    // Secondary limits (403 + retry-after: 1) are waited out inside the call.
    fake.secondary_limit(2);
    r.status(&h).await.unwrap();
    assert_eq!(fake.stats().rate_limited, 2);
    // The primary limit (fresh clients: no ETags, every call counts):
    // spent quota until the hour's reset is far beyond the policy's wait,
    // so the caller gets a retryable error with the wait.
    let mut err = None;
    for _ in 0..10 {
        if let Err(e) = runner(&fake).status(&h).await {
            err = Some(e);
            break;
        }
    }
    let err = err.expect("the primary limit was never reached");
    assert!(err.is_retryable(), "{err}");
    let wait = err.retry_after().unwrap();
    assert!(wait > Duration::from_secs(3000), "{wait:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_beyond_githubs_limits_are_clear_errors_and_dispatch_nothing() {
    let fake = FakeGithub::start(FakeOptions::default()).await.unwrap();
    let mut c = config();
    c.inputs = (0..21)
        .map(|i| (format!("extra_{i}"), "x".to_string()))
        .collect();
    let r = GithubRunner::new(client(&fake), c);
    let err = r
        .trigger(&request("https://git.example/c/1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RunnerError::InvalidRequest(m) if m.contains("at most 25")),
        "{err}"
    );
    // An input the workflow does not declare: GitHub's 422, permanent.
    let mut c = config();
    c.inputs = BTreeMap::from([("undeclared".to_string(), "x".to_string())]);
    let r = GithubRunner::new(client(&fake), c);
    let err = r
        .trigger(&request("https://git.example/c/1"))
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert!(err.to_string().contains("Unexpected inputs"), "{err}");
    assert_eq!(fake.stats().runs_created, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_stream_each_finished_job_without_stamps_or_credentials_at_storage() {
    let fake = FakeGithub::start(FakeOptions::default()).await.unwrap();
    let r = runner(&fake);
    let req = request("https://git.example/c/1?stitch-gh=fail");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    // Follow from the start: the stream ends when the run completes.
    let lines: Vec<_> = tokio::time::timeout(
        Duration::from_secs(20),
        r.logs(&h).await.unwrap().collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    let lines: Vec<_> = lines.into_iter().map(Result::unwrap).collect();
    let starts: Vec<_> = lines
        .iter()
        .filter(|l| l.kind == LogKind::Control && l.step_status == Some(StepStatus::Start))
        .map(|l| l.content.as_str())
        .collect();
    assert_eq!(starts, ["build", "test"]);
    let test_start = lines
        .iter()
        .find(|l| l.step_status == Some(StepStatus::Start) && l.content == "test")
        .unwrap();
    // The job's steps, from the jobs list, name what the step ran.
    assert!(
        test_start
            .step_command
            .as_deref()
            .is_some_and(|c| c.contains("Run make test")),
        "{test_start:?}"
    );
    let ends = lines
        .iter()
        .filter(|l| l.step_status == Some(StepStatus::End))
        .count();
    assert_eq!(ends, 2);
    let data: Vec<_> = lines.iter().filter(|l| l.kind == LogKind::Data).collect();
    assert!(
        data.iter().any(|l| l.content == "##[group]Run make test"),
        "{data:?}"
    );
    assert!(data.iter().any(|l| l.content.contains("exit code 2")));
    assert!(data
        .iter()
        .all(|l| !l.content.starts_with("20") && !l.content.contains('\u{feff}')));
    assert!(data.iter().all(|l| l.step_id == 1 || l.step_id == 2));
    let stats = fake.stats();
    assert_eq!(stats.log_downloads, 2);
    assert_eq!(
        stats.storage_auth_leaks, 0,
        "credentials followed the redirect"
    );
    assert_eq!(
        wait_terminal(fake.runs_moved(), &r, &h).await.status,
        BuildStatus::Failed
    );
}

fn app_fake_options(lifetime: Duration) -> FakeOptions {
    FakeOptions {
        app: Some(FakeApp {
            app_id: "424242".into(),
            public_key_pem: PUBLIC.to_vec(),
            installation_id: 77,
            token_lifetime: lifetime,
        }),
        ..FakeOptions::default()
    }
}

fn app_credentials(fake: &FakeGithub, app_id: &str, key: &[u8]) -> (Credentials, Arc<AppTokens>) {
    let app = Arc::new(AppTokens::new(http(), &fake.url(), "2022-11-28", app_id, 77, key).unwrap());
    (Credentials::App(app.clone()), app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_installation_tokens_are_refreshed_before_they_expire() {
    // An 8 s lifetime refreshes 2 s before expiry: a margin no request
    // delay on a loaded machine comes near, so a refusal here is a bug.
    let fake = FakeGithub::start(app_fake_options(Duration::from_secs(8)))
        .await
        .unwrap();
    let (creds, app) = app_credentials(&fake, "424242", KEY);
    let r = GithubRunner::new(client_with(&fake, "2022-11-28", creds), config());
    let req = request("https://git.example/c/1?stitch-gh=hang");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    assert_eq!(app.minted(), 1);
    // The token in hand serves calls until its refresh is due, on the
    // client's own clock (2 s before the fake expires it).
    let refresh_at = app.refresh_at().await.unwrap();
    r.status(&h).await.unwrap();
    if tokio::time::Instant::now() < refresh_at {
        assert_eq!(app.minted(), 1, "refreshed before it was due");
    }
    // The refresh is an instant on that clock, known here: waiting for it
    // is waiting for the event itself.
    tokio::time::sleep_until(refresh_at).await;
    r.status(&h).await.unwrap();
    assert_eq!(app.minted(), 2, "one refresh once it was due");
    assert_eq!(fake.stats().unauthorized, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_installation_token_is_reminted_after_one_401() {
    // A lifetime no test run reaches: the only new token is the re-mint.
    let fake = FakeGithub::start(app_fake_options(Duration::from_secs(3600)))
        .await
        .unwrap();
    let (creds, app) = app_credentials(&fake, "424242", KEY);
    let r = GithubRunner::new(client_with(&fake, "2022-11-28", creds), config());
    let req = request("https://git.example/c/1?stitch-gh=hang");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    r.status(&h).await.unwrap();
    assert_eq!(app.minted(), 1);
    // A token GitHub stops taking: one 401, a new token, the call succeeds.
    fake.revoke_installation_tokens();
    r.status(&h).await.unwrap();
    assert_eq!(app.minted(), 2);
    assert_eq!(fake.stats().unauthorized, 1);
    r.cancel(&h).await.unwrap();
    // Logs travel without the installation token to storage.
    let done = wait_terminal(fake.runs_moved(), &r, &h).await;
    assert_eq!(done.status, BuildStatus::Cancelled);
    let lines: Vec<_> = r.logs(&h).await.unwrap().collect().await;
    assert!(lines.iter().all(Result::is_ok));
    assert_eq!(fake.stats().storage_auth_leaks, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_app_key_or_id_is_a_permanent_error() {
    let fake = FakeGithub::start(app_fake_options(Duration::from_secs(3600)))
        .await
        .unwrap();
    let (creds, _) = app_credentials(&fake, "999", KEY);
    let c = client_with(&fake, "2022-11-28", creds);
    let err = c
        .list_runs(&repo(), "stitch.yml", &RunQuery::default())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    assert!(err.to_string().contains("installation 77"), "{err}");
    assert!(!RunnerError::from(err).is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_follow_link_pagination() {
    let fake = FakeGithub::start(FakeOptions::default()).await.unwrap();
    let r = runner(&fake);
    for i in 0..105 {
        r.trigger(&request(&format!("https://git.example/c/{i}")))
            .await
            .unwrap();
    }
    let runs = client(&fake)
        .list_runs(
            &repo(),
            "stitch.yml",
            &RunQuery {
                event: Some("workflow_dispatch".into()),
                ..RunQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(runs.len(), 105);
    assert_eq!(requests(&fake, "list_runs"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ref_of_another_build_is_not_found() {
    let fake = FakeGithub::start(FakeOptions::default()).await.unwrap();
    support::refs_of_other_builds_are_not_found(&runner(&fake)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_passes_against_the_fake() {
    let fake = FakeGithub::start(FakeOptions::default()).await.unwrap();
    let new_runner = move || Arc::new(runner(&fake)) as Arc<dyn BuildRunner>;
    // Conformance triggers twice per id: never a first attempt.
    support::assert_conformance(new_runner, "gh", |r| r.with_first_attempt(false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_reads_leave_the_budget_reserve_to_polls() {
    use futures::FutureExt;
    use stitch_runners::http_budget::Priority;
    let fake = FakeGithub::start(FakeOptions::default()).await.unwrap();
    // Burst 10 (reserve 5); refills are one token per 6 minutes.
    let budget = Arc::new(RequestBudget::new(RateLimit {
        requests: 100,
        window: Duration::from_secs(3600),
    }));
    let c = Client::new(
        http(),
        &fake.url(),
        "2022-11-28",
        Credentials::token(fake.token()).unwrap(),
        budget.clone(),
        fast_retry(),
    )
    .unwrap();
    let r = GithubRunner::new(c, config());
    let req = request("https://git.example/c/1");
    let h = req.handle().with_ref(r.trigger(&req).await.unwrap());
    let mut logs = r.logs(&h).await.unwrap();
    while budget.try_acquire(Priority::Logs) {}
    let jobs_before = requests(&fake, "list_jobs");
    let runs_before = requests(&fake, "get_run");
    // The follower's first read (the run's jobs) waits at the reserve...
    assert!(logs.next().now_or_never().is_none(), "the log read waits");
    // ...while a status poll gets its request at once.
    r.status(&h).await.unwrap();
    assert_eq!(requests(&fake, "get_run") - runs_before, 1);
    assert_eq!(
        requests(&fake, "list_jobs"),
        jobs_before,
        "no log request was sent"
    );
}
