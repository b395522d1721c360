//! `stitch serve` (the real binary) driving builds as runs on the stateful
//! fake GitHub over loopback HTTP: webhooks and polling, lost dispatch
//! answers, an older server, SIGKILL and restart, cancel, logs, GitHub App
//! tokens, and forged webhooks.

mod support;

use std::time::Duration;

use stitch_fake_providers::github::{
    sign, Endpoint, FakeApp, FakeGithub, FakeOptions, FaultControl, Pause, Timing, WebhookTarget,
};
use support::provider::{provider_suite, Provider, Setup, Step};
use support::queue::{heads, Batch, QueueConfig};
use support::serve::Serve;

const TOKEN: &str = "ghp-test-token";
const SECRET: &str = "gh-webhook-secret-0123456789";

const WEBHOOKS: &str = "[webhooks.github]\nsecret_env = \"GH_WEBHOOK_SECRET\"\n";

/// Queue `ci` on workflow `stitch.yml` of `acme/app` at `fake`, signing in
/// with `auth` (the table's credential keys).
fn queue_signed_in(fake: &FakeGithub, auth: &str) -> QueueConfig {
    QueueConfig::new(
        "github",
        format!(
            "owner = \"acme\"\nrepo = \"app\"\nworkflow = \"stitch.yml\"\n{auth}\n\
             api_url = \"{}\"\nlookup_settle = \"1s\"",
            fake.url()
        ),
    )
    .env("GH_TOKEN", TOKEN)
    .env("GH_WEBHOOK_SECRET", SECRET)
}

/// Queue `ci` as above, with the API token.
fn queue(fake: &FakeGithub) -> QueueConfig {
    queue_signed_in(fake, "token_env = \"GH_TOKEN\"")
}

async fn fake(options: FakeOptions) -> FakeGithub {
    FakeGithub::start(FakeOptions {
        token: TOKEN.into(),
        timing: Timing {
            queue: Duration::from_millis(100),
            run: Duration::from_millis(400),
            ..options.timing
        },
        ..options
    })
    .await
    .unwrap()
}

/// `n` heads, every tenth failing.
fn batch_heads(n: usize) -> Vec<String> {
    heads(n, &[(3, "?stitch-gh=fail")])
}

/// How far ahead a resting poll loop's hold must reach: the webhook
/// safety-net poll (60 s) held it, not a retry's backoff.
const RESTING: Duration = Duration::from_secs(30);

fn get_runs(fake: &FakeGithub) -> u64 {
    fake.stats().requests.get("get_run").copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_drive_100_builds_to_terminal() {
    let fake = fake(FakeOptions::default()).await;
    // The safety-net poll (60 s default) is far beyond the test: only
    // webhooks can finish these builds in time.
    let s = queue(&fake).poll("5s").tail(WEBHOOKS).serve().await;
    fake.set_webhook(Some(WebhookTarget {
        url: format!("{}/webhooks/github", s.base),
        secret: SECRET.into(),
        job_events: true,
        // Every delivery twice, as a redelivery does: harmless.
        duplicate: true,
    }));
    let http = reqwest::Client::new();
    let batch = Batch::create(&s, &http, batch_heads(100)).await;
    batch
        .ends_as_expected_once_each(&s, &http, Duration::from_secs(50), |id| fake.runs_for(id))
        .await;
    let stats = fake.stats();
    assert!(
        stats.webhooks_sent > 0 && stats.webhooks_refused == 0,
        "{stats:?}"
    );
    // Polls were few: a handful per build, not one per 200 ms of its life.
    assert!(get_runs(&fake) < 100 * 8, "{stats:?}");
    let v = s.get(&http, &batch.ids[0]).await;
    assert_eq!(v["metadata"]["github_conclusion"], "success");
    assert!(v["metadata"]["github_run_id"].as_str().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_server_without_run_details_is_correlated_by_run_name() {
    let fake = fake(FakeOptions {
        older_server: true,
        max_inputs: 10,
        timing: Timing {
            list_lag: Duration::from_millis(300),
            ..Timing::default()
        },
        ..FakeOptions::default()
    })
    .await;
    let s = queue(&fake)
        .poll("150ms")
        .extra("max_inputs = 10")
        .serve()
        .await;
    let http = reqwest::Client::new();
    let batch = Batch::create(&s, &http, batch_heads(20)).await;
    batch
        .ends_as_expected_once_each(&s, &http, Duration::from_secs(60), |id| fake.runs_for(id))
        .await;
    for id in &batch.ids {
        let run = fake.run_json(id).unwrap();
        let v = s.get(&http, id).await;
        assert_eq!(v["runner_ref"]["id"], run["id"].to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_app_tokens_are_minted_and_refreshed_by_stitch_serve() {
    let key_dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../stitch-fake-providers/tests/data/github"
    );
    let fake = fake(FakeOptions {
        app: Some(FakeApp {
            app_id: "424242".into(),
            public_key_pem: std::fs::read(format!("{key_dir}/test_app_key.pub.pem")).unwrap(),
            installation_id: 77,
            token_lifetime: Duration::from_secs(3),
        }),
        timing: Timing {
            run: Duration::from_secs(2),
            ..Timing::default()
        },
        ..FakeOptions::default()
    })
    .await;
    let auth = format!(
        "app_id = \"424242\"\nprivate_key_file = \"{key_dir}/test_app_key.pem\"\ninstallation_id = 77"
    );
    let s = queue_signed_in(&fake, &auth).poll("200ms").serve().await;
    let http = reqwest::Client::new();
    let hs: Vec<String> = (0..10)
        .map(|i| format!("https://git.example/c/{i}"))
        .collect();
    let mut ids = Vec::new();
    // One at a time, each once it runs: the builds span more than the 3 s
    // token lifetime, so the installation token must be refreshed.
    for h in &hs {
        let id = s.create(&http, "ci", h).await;
        s.wait_status(&http, &id, "running").await;
        ids.push(id);
    }
    let done = s
        .wait_all_terminal(&http, &ids, Duration::from_secs(60))
        .await;
    assert!(done.values().all(|st| st == "succeeded"), "{done:?}");
    let stats = fake.stats();
    assert!(
        stats.tokens_minted >= 2,
        "tokens were not refreshed: {stats:?}"
    );
    assert_eq!(stats.unauthorized, 0, "a token expired in use: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_tampered_webhooks_are_rejected_and_genuine_ones_wake() {
    let fake = fake(FakeOptions::default()).await;
    let s = queue(&fake).tail(WEBHOOKS).serve().await;
    let http = reqwest::Client::new();
    let id = s
        .create(&http, "ci", "https://git.example/c/1?stitch-gh=hang")
        .await;
    fake.set_webhook(Some(WebhookTarget {
        url: format!("{}/webhooks/github", s.base),
        secret: SECRET.into(),
        job_events: false,
        duplicate: false,
    }));
    s.wait_status(&http, &id, "running").await;
    // From here on only the test's own requests reach the receiver, and
    // the poll cadence is the 60 s safety net: nothing polls unless woken,
    // once the webhooks the fake sent before are answered (their wakes
    // recorded).
    fake.set_webhook(None);
    fake.webhooks_settled().await;
    // Once the poll loop rests (held, nothing in flight, no wake pending),
    // it stays as listed until something wakes it.
    let resting = s.wait_poll_loop_resting(&id, RESTING).await;
    let polls_before = get_runs(&fake);
    let url = format!("{}/webhooks/github", s.base);
    let run = fake.run_json(&id).unwrap();
    let body = serde_json::json!({
        "action": "completed",
        "workflow_run": run,
        "repository": run["repository"],
    })
    .to_string();
    let post = |event: &'static str, delivery: String, signature: Option<String>, body: String| {
        let mut r = http
            .post(&url)
            .header("content-type", "application/json")
            .header("x-github-event", event)
            .header("x-github-delivery", delivery);
        if let Some(sig) = signature {
            r = r.header("x-hub-signature-256", sig);
        }
        r.body(body).send()
    };
    let genuine = |b: &str| Some(sign(SECRET.as_bytes(), b.as_bytes()));
    let cases: Vec<(&str, Option<String>, String)> = vec![
        ("no signature", None, body.clone()),
        (
            "forged with another secret",
            Some(sign(b"not-the-secret", body.as_bytes())),
            body.clone(),
        ),
        (
            "tampered body",
            genuine(&body),
            body.replace("in_progress", "completed"),
        ),
        (
            "legacy sha1 header form",
            Some("sha1=0123456789abcdef0123456789abcdef01234567".into()),
            body.clone(),
        ),
        ("garbage", Some("sha256=zz".into()), body.clone()),
    ];
    for (n, (what, sig, b)) in cases.into_iter().enumerate() {
        let r = post("workflow_run", format!("forged-{n}"), sig, b)
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "{what}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_webhook", "{what}");
    }
    let r = post(
        "workflow_run",
        "bad-json".into(),
        genuine("{not json"),
        "{not json".into(),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // None of that reached the poll loop. A webhook's wake is recorded
    // before it is answered, and a wake ends the hold (the loop is listed
    // due, in flight, or held anew after a poll): the loop listed exactly
    // as before means no wake came and no poll ran.
    assert_eq!(
        s.poll_loop(&id)
            .map(|p| (p["next_due"].clone(), p["in_flight"].clone())),
        Some((resting["next_due"].clone(), resting["in_flight"].clone())),
        "a rejected webhook woke the poll loop"
    );
    assert_eq!(
        get_runs(&fake),
        polls_before,
        "a rejected webhook caused a poll"
    );
    assert_eq!(s.get(&http, &id).await["status"], "running");

    // Verified but not for stitch: ping, other events, a foreign run.
    let data = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../stitch-fake-providers/tests/data/github"
    );
    let ping = std::fs::read_to_string(format!("{data}/webhook_ping.json")).unwrap();
    let foreign =
        std::fs::read_to_string(format!("{data}/webhook_workflow_run_completed.json")).unwrap();
    for (event, b) in [
        ("ping", ping),
        ("workflow_run", foreign),
        ("push", r#"{"ref":"refs/heads/main"}"#.to_string()),
    ] {
        let r = post(event, format!("other-{event}"), genuine(&b), b)
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{event}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["outcome"], "ignored", "{event}");
    }
    // A genuine one wakes the build: cancel the run at the fake, then tell
    // stitch with a job event (no title: matched by the recorded run id).
    let run_id = run["id"].as_u64().unwrap();
    let r = http
        .post(format!(
            "{}/repos/acme/app/actions/runs/{run_id}/cancel",
            fake.url()
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    // The fake finishes the cancel on its own clock: the wake must find the
    // run completed.
    fake.run_until(&id, |run, _| run["status"] == "completed")
        .await;
    let job = serde_json::json!({
        "action": "completed",
        "workflow_job": {"id": run_id + 1, "run_id": run_id, "status": "completed", "conclusion": "cancelled"},
        "repository": {"full_name": "acme/app"},
    })
    .to_string();
    let r = post(
        "workflow_job",
        "genuine-1".into(),
        genuine(&job),
        job.clone(),
    )
    .await
    .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["outcome"], "woken", "{v}");
    assert_eq!(v["build_id"], id.as_str());
    // The same delivery again: harmless.
    let r = post("workflow_job", "genuine-1".into(), genuine(&job), job)
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["outcome"], "duplicate");
    let done = s
        .wait_all_terminal(&http, std::slice::from_ref(&id), Duration::from_secs(10))
        .await;
    assert_eq!(done[&id], "cancelled");
}

/// A cancel or a webhook arriving at each phase of a build's life takes
/// effect at once, with webhooks configured and a 60 s safety-net poll: a
/// wake the queue dropped would leave the build waiting a minute, far
/// beyond `WITHIN`. The phases are made with the fake's pauses (a request
/// held after its work, before its answer), not with timing.
/// GitHub for the provider-independent suites: dispatch and get run are the
/// held steps, `workflow_run` `completed` is the finished webhook.
struct Github {
    fake: FakeGithub,
    serve: Serve,
}

impl Provider for Github {
    const HANG: &'static str = "?stitch-gh=hang";
    const BATCH: usize = 100;
    type Fake = FakeGithub;

    async fn start(setup: Setup) -> Self {
        let fake = fake(FakeOptions::default()).await;
        let serve = queue(&fake).setup(setup, WEBHOOKS).serve().await;
        Self { fake, serve }
    }

    fn serve(&self) -> &Serve {
        &self.serve
    }

    fn serve_mut(&mut self) -> &mut Serve {
        &mut self.serve
    }

    fn fake(&self) -> &FakeGithub {
        &self.fake
    }

    fn batch_heads(n: usize) -> Vec<String> {
        batch_heads(n)
    }

    fn hold_next(&self, step: Step) -> Pause {
        self.fake.pause_next(match step {
            Step::Start => Endpoint::Dispatch,
            Step::Poll => Endpoint::GetRun,
        })
    }

    fn send_webhooks(&self) {
        self.fake.set_webhook(Some(WebhookTarget {
            url: format!("{}/webhooks/github", self.serve.base),
            secret: SECRET.into(),
            job_events: false,
            duplicate: false,
        }));
    }

    async fn finished_webhook_delivered(&self, id: &str) {
        self.fake.webhook_delivered(id, "completed").await;
    }

    async fn assert_cancelled_at_provider(&self, id: &str, _settled: bool) {
        // The fake completes a run as cancelled when asked: always settled.
        assert!(
            self.fake
                .stats()
                .requests
                .get("cancel")
                .copied()
                .unwrap_or(0)
                >= 1
        );
        let run = self.fake.run_json(id).unwrap();
        assert!(
            run["status"] == "completed" && run["conclusion"] == "cancelled",
            "{run}"
        );
    }

    fn assert_finished_record(&self, record: &serde_json::Value) {
        assert_eq!(record["metadata"]["github_status"], "completed");
        assert!(record["metadata"]["url"]
            .as_str()
            .unwrap()
            .contains("/acme/app/actions/runs/"));
    }

    fn assert_finished_log(&self, text: &str) {
        // Two jobs as steps, GitHub's lines without their time stamps; the
        // log storage never saw the API token.
        assert!(text.contains("##[group]Run make test"), "{text}");
        assert!(!text.contains("\u{feff}"), "{text}");
        assert!(!text.contains(r#""content":"2026-"#), "{text}");
        assert_eq!(self.fake.stats().storage_auth_leaks, 0);
    }
}

provider_suite!(Github);
