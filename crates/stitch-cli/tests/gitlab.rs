//! `stitch serve` (the real binary) driving pipelines on the stateful fake
//! GitLab over loopback HTTP: Pipeline Hooks and polling, lost create
//! answers, SIGKILL and restart, a 429 storm, forged hooks, and the
//! provider suite (push never lost, cancel and logs).

mod support;

use std::time::Duration;

use stitch_fake_providers::gitlab::{
    Endpoint, FakeGitlab, FakeOptions, FaultControl, Pause, Timing, WebhookTarget,
};
use support::provider::{provider_suite, Provider, Setup, Step, Storms, SETTLE};
use support::queue::{heads, Batch, QueueConfig};
use support::serve::Serve;

const TOKEN: &str = "glpat-test-token";
const SECRET: &str = "gl-hook-0123456789abcdef";

/// Accepts Pipeline Hooks with the token `SECRET`.
const WEBHOOK: &str = "[queues.ci.gitlab.webhook]\nsecret_env = \"GL_WEBHOOK_SECRET\"\n";

/// Queue `ci` on project `acme/app` of `fake`.
fn queue(fake: &FakeGitlab) -> QueueConfig {
    QueueConfig::new(
        "gitlab",
        format!(
            "project = \"acme/app\"\ntoken_env = \"GL_TOKEN\"\napi_url = \"{}\"",
            fake.url()
        ),
    )
    .env("GL_TOKEN", TOKEN)
    .env("GL_WEBHOOK_SECRET", SECRET)
}

/// `n` heads, every tenth failing.
fn batch_heads(n: usize) -> Vec<String> {
    heads(n, &[(3, "?stitch-gl=fail")])
}

async fn fake(rate_limit: Option<(u32, Duration)>) -> FakeGitlab {
    FakeGitlab::start(FakeOptions {
        token: TOKEN.into(),
        timing: Timing {
            schedule: Duration::from_millis(100),
            run: Duration::from_millis(400),
            ..Timing::default()
        },
        rate_limit,
        ..FakeOptions::default()
    })
    .await
    .unwrap()
}

fn hook_target(s: &Serve) -> WebhookTarget {
    WebhookTarget {
        url: format!("{}/webhooks/gitlab", s.base),
        token: SECRET.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_hooks_drive_100_builds_within_four_calls_each() {
    let fake = fake(None).await;
    // The safety-net poll (60 s) is far beyond the test: only hooks can
    // finish these builds in time.
    let s = queue(&fake).poll("60s").extra(WEBHOOK).serve().await;
    fake.set_webhook(Some(hook_target(&s)));
    let http = reqwest::Client::new();
    Batch::create(&s, &http, batch_heads(100))
        .await
        .ends_as_expected_once_each(&s, &http, Duration::from_secs(60), |id| {
            fake.pipelines_for(id)
        })
        .await;
    let stats = fake.stats();
    assert!(
        stats.webhooks_sent > 0 && stats.webhooks_refused == 0,
        "{stats:?}"
    );
    // The create, the poll after it, and one poll per hook that changed
    // what stitch knows: at most 4 calls per build on average.
    let per_build = stats.total_requests() as f64 / 100.0;
    assert!(per_build <= 4.0, "{per_build} calls per build: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_malformed_hooks_are_rejected_and_a_genuine_one_wakes() {
    let fake = fake(None).await;
    let s = queue(&fake).poll("60s").extra(WEBHOOK).serve().await;
    fake.set_webhook(Some(hook_target(&s)));
    let http = reqwest::Client::new();
    let id = s
        .create(&http, "ci", "https://git.example/c/1?stitch-gl=hang")
        .await;
    s.wait_status(&http, &id, "running").await;
    // From here on only the test's own requests reach the receiver.
    fake.set_webhook(None);
    fake.webhooks_settled().await;
    let resting = s.wait_poll_loop_resting(&id, Duration::from_secs(30)).await;
    let polls_before = fake.stats().requests["get_pipeline"];
    let url = format!("{}/webhooks/gitlab", s.base);
    let post = |token: Option<&str>, event: &str, body: String| {
        let mut r = http
            .post(&url)
            .header("content-type", "application/json")
            .header("x-gitlab-event", event);
        if let Some(t) = token {
            r = r.header("x-gitlab-token", t);
        }
        r.body(body).send()
    };
    let body = fake.hook_json(&id).unwrap().to_string();
    for (what, token) in [
        ("no token", None),
        ("a wrong token", Some("guess")),
        ("a prefix of the token", Some("gl-hook-0123456789abcde")),
        ("an empty token", Some("")),
    ] {
        let r = post(token, "Pipeline Hook", body.clone()).await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{what}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_webhook", "{what}");
        assert!(!v.to_string().contains(SECRET), "{what}: {v}");
    }
    let huge = "x".repeat(1100 * 1024);
    let r = post(Some(SECRET), "Pipeline Hook", huge).await.unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let r = post(Some(SECRET), "Pipeline Hook", "{not json".into())
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // Verified but not for stitch: another event, a foreign pipeline, a
    // build of another project.
    let foreign = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../stitch-runners/tests/data/gitlab/pipeline_hook.json"
    ))
    .unwrap();
    let mut elsewhere: serde_json::Value = serde_json::from_str(&body).unwrap();
    elsewhere["project"]["path_with_namespace"] = "acme/other".into();
    elsewhere["project"]["id"] = 7.into();
    for (event, b) in [
        ("Push Hook", body.clone()),
        ("Pipeline Hook", foreign),
        ("Pipeline Hook", elsewhere.to_string()),
    ] {
        let r = post(Some(SECRET), event, b).await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["outcome"], "ignored", "{event}");
    }
    // None of that reached the poll loop (listed exactly as before: no
    // wake came and no poll ran).
    assert_eq!(
        s.poll_loop(&id)
            .map(|p| (p["next_due"].clone(), p["in_flight"].clone())),
        Some((resting["next_due"].clone(), resting["in_flight"].clone())),
        "a rejected hook woke the poll loop"
    );
    assert_eq!(fake.stats().requests["get_pipeline"], polls_before);
    // A genuine one wakes the build: cancel at GitLab, then tell stitch.
    let r = http
        .post(format!(
            "{}/projects/acme%2Fapp/pipelines/{}/cancel",
            fake.url(),
            fake.pipeline_json(&id).unwrap()["id"]
        ))
        .header("private-token", TOKEN)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let body = fake.hook_json(&id).unwrap().to_string();
    let r = post(Some(SECRET), "Pipeline Hook", body).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["outcome"], "woken");
    let done = s
        .wait_all_terminal(&http, std::slice::from_ref(&id), Duration::from_secs(10))
        .await;
    assert_eq!(done[&id], "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_without_hooks_answers_404_and_trigger_tokens_work_end_to_end() {
    let fake = fake(None).await;
    // No webhook table: the hook secret in the environment is not used.
    let s = queue(&fake)
        .extra("trigger_token_env = \"GL_TRIGGER\"")
        .env("GL_TRIGGER", fake.trigger_token())
        .serve()
        .await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/webhooks/gitlab", s.base))
        .header("x-gitlab-token", SECRET)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let id = s.create(&http, "ci", "https://git.example/c/1").await;
    let done = s
        .wait_all_terminal(&http, std::slice::from_ref(&id), Duration::from_secs(30))
        .await;
    assert_eq!(done[&id], "succeeded");
    assert_eq!(fake.stats().requests.get("trigger_pipeline"), Some(&1));
    let vars = fake.pipeline_variables(&id).unwrap();
    assert!(vars.contains_key("STITCH_JOB_TOKEN"));
    assert!(vars.contains_key("STITCH_SERVER"));
    assert_eq!(vars["STITCH_BUILD_ID"], id);
    // The trigger token never reaches the build record or its log.
    let record = s.get(&http, &id).await.to_string();
    assert!(!record.contains(fake.trigger_token()), "{record}");
}

/// GitLab for the provider-independent suites: create and get pipeline are
/// the held steps, the `success` Pipeline Hook is the finished webhook.
struct Gitlab {
    fake: FakeGitlab,
    serve: Serve,
}

impl Provider for Gitlab {
    const HANG: &'static str = "?stitch-gl=hang";
    const BATCH: usize = 100;
    type Fake = FakeGitlab;

    async fn start(setup: Setup) -> Self {
        let fake =
            fake(matches!(setup, Setup::Storm).then_some((30, Duration::from_secs(1)))).await;
        let serve = queue(&fake).setup(setup, WEBHOOK).serve().await;
        Self { fake, serve }
    }

    fn serve(&self) -> &Serve {
        &self.serve
    }

    fn serve_mut(&mut self) -> &mut Serve {
        &mut self.serve
    }

    fn fake(&self) -> &FakeGitlab {
        &self.fake
    }

    fn batch_heads(n: usize) -> Vec<String> {
        batch_heads(n)
    }

    fn hold_next(&self, step: Step) -> Pause {
        self.fake.pause_next(match step {
            Step::Start => Endpoint::Create,
            Step::Poll => Endpoint::GetPipeline,
        })
    }

    fn send_webhooks(&self) {
        self.fake.set_webhook(Some(hook_target(&self.serve)));
    }

    async fn finished_webhook_delivered(&self, id: &str) {
        self.fake.webhook_delivered(id, "success").await;
    }

    async fn assert_cancelled_at_provider(&self, id: &str, settled: bool) {
        // `canceling` already maps to cancelled; the fake moves on to
        // `canceled` 50 ms later.
        if settled {
            let settled = self.fake.pipeline_until(id, |b| b["status"] == "canceled");
            tokio::time::timeout(SETTLE, settled)
                .await
                .expect("the provider's cancelled build settles");
        } else {
            let status = self.fake.pipeline_json(id).unwrap()["status"].clone();
            assert!(status == "canceling" || status == "canceled", "{status}");
        }
    }

    fn assert_finished_record(&self, record: &serde_json::Value) {
        assert_eq!(record["metadata"]["gitlab_status"], "success");
        assert!(record["metadata"]["url"]
            .as_str()
            .unwrap()
            .contains("/acme/app/-/pipelines/"));
    }

    fn assert_finished_log(&self, text: &str) {
        // GitLab's lines, without section markers or runner timestamps.
        assert!(text.contains("$ make test"), "{text}");
        assert!(!text.contains("section_start"), "{text}");
        assert!(!text.contains(" 00O "), "{text}");
    }
}

impl Storms for Gitlab {
    fn rate_limit_storm(&self, length: Duration) {
        self.fake.rate_limit_storm(length);
    }

    fn rate_limited(&self) -> u64 {
        self.fake.stats().rate_limited
    }

    fn max_requests_in(&self, window: Duration) -> usize {
        self.fake.max_requests_in(window)
    }
}

provider_suite!(Gitlab);
provider_suite!(@storm Gitlab);
