//! `stitch serve` (the real binary) driving builds on the stateful fake
//! Buildkite over loopback HTTP: webhooks and polling, lost create answers,
//! SIGKILL and restart, a 429 storm, cancel, logs, and forged webhooks.

mod support;

use std::time::Duration;

use stitch_fake_providers::buildkite::{
    sign, Endpoint, FakeBuildkite, FakeOptions, FaultControl, Pause, Timing, WebhookAuth,
    WebhookTarget,
};
use support::provider::{provider_suite, Provider, Setup, Step, Storms, SETTLE};
use support::queue::{expected, heads, Batch, QueueConfig};
use support::serve::Serve;

const TOKEN: &str = "bk-test-token";
const SECRET: &str = "whsec-0123456789abcdef";

/// Queue `ci` on pipeline `acme/app` of `fake`.
fn queue(fake: &FakeBuildkite) -> QueueConfig {
    QueueConfig::new(
        "buildkite",
        format!(
            "org = \"acme\"\npipeline = \"app\"\ntoken_env = \"BK_TOKEN\"\napi_url = \"{}\"",
            fake.url()
        ),
    )
    .env("BK_TOKEN", TOKEN)
    .env("BK_WEBHOOK_SECRET", SECRET)
}

/// `n` heads, every tenth failing.
fn batch_heads(n: usize) -> Vec<String> {
    heads(n, &[(3, "?stitch-bk=fail")])
}

async fn fake(rate_limit: Option<(u32, Duration)>) -> FakeBuildkite {
    FakeBuildkite::start(FakeOptions {
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

/// How far ahead a resting poll loop's hold must reach: the webhook
/// safety-net poll (60 s) held it, not a retry's backoff (2 s at most).
const RESTING: Duration = Duration::from_secs(30);

/// Extra request headers of a webhook case.
type Headers = Vec<(&'static str, String)>;

const SIGNED_WEBHOOK: &str = r#"
[queues.ci.buildkite.webhook]
mode = "signature"
secret_env = "BK_WEBHOOK_SECRET"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_drive_200_builds_to_terminal() {
    let fake = fake(None).await;
    // The safety-net poll (60 s default) is far beyond the test: only
    // webhooks can finish these builds in time.
    let s = queue(&fake).poll("5s").extra(SIGNED_WEBHOOK).serve().await;
    fake.set_webhook(Some(WebhookTarget {
        url: format!("{}/webhooks/buildkite", s.base),
        auth: WebhookAuth::Signature(SECRET.into()),
        job_events: true,
    }));
    let http = reqwest::Client::new();
    Batch::create(&s, &http, batch_heads(200))
        .await
        .ends_as_expected_once_each(&s, &http, Duration::from_secs(50), |id| fake.builds_for(id))
        .await;
    let stats = fake.stats();
    assert!(
        stats.webhooks_sent > 0 && stats.webhooks_refused == 0,
        "{stats:?}"
    );
    // Polls were few: far less than one per 200 ms of each build's life.
    assert!(stats.requests["get_build"] < 200 * 8, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_stale_and_tampered_webhooks_are_rejected() {
    let fake = fake(None).await;
    let s = queue(&fake).extra(SIGNED_WEBHOOK).serve().await;
    fake.set_webhook(Some(WebhookTarget {
        url: format!("{}/webhooks/buildkite", s.base),
        auth: WebhookAuth::Signature(SECRET.into()),
        job_events: false,
    }));
    let http = reqwest::Client::new();
    let id = s
        .create(&http, "ci", "https://git.example/c/1?stitch-bk=hang")
        .await;
    s.wait_status(&http, &id, "running").await;
    // From here on only the test's own requests reach the receiver, once
    // the webhooks the fake sent before are answered (their wakes recorded).
    fake.set_webhook(None);
    fake.webhooks_settled().await;
    // Poll cadence is now the 60 s safety net: nothing polls unless woken.
    // Once the poll loop rests (held, nothing in flight, no wake pending),
    // it stays as listed until something wakes it.
    let resting = s.wait_poll_loop_resting(&id, RESTING).await;
    let polls_before = fake.stats().requests["get_build"];
    let body =
        serde_json::json!({"event": "build.finished", "build": fake.build_json(&id).unwrap()})
            .to_string();
    let url = format!("{}/webhooks/buildkite", s.base);
    let now = chrono::Utc::now().timestamp();
    let post = |headers: Headers, body: String| {
        let mut r = http
            .post(&url)
            .header("content-type", "application/json")
            .header("x-buildkite-event", "build.finished");
        for (k, v) in headers {
            r = r.header(k, v);
        }
        r.body(body).send()
    };
    let sig = |secret: &str, ts: i64, b: &str| {
        format!(
            "timestamp={ts},signature={}",
            sign(secret.as_bytes(), ts, b.as_bytes())
        )
    };
    let cases: Vec<(&str, Headers, String)> = vec![
        ("no credentials", vec![], body.clone()),
        (
            "a token where signatures are configured",
            vec![("x-buildkite-token", SECRET.to_string())],
            body.clone(),
        ),
        (
            "forged with another secret",
            vec![("x-buildkite-signature", sig("not-the-secret", now, &body))],
            body.clone(),
        ),
        (
            "stale",
            vec![("x-buildkite-signature", sig(SECRET, now - 400, &body))],
            body.clone(),
        ),
        (
            "from the future",
            vec![("x-buildkite-signature", sig(SECRET, now + 400, &body))],
            body.clone(),
        ),
        (
            "tampered body",
            vec![("x-buildkite-signature", sig(SECRET, now, &body))],
            body.replace("canceled", "passed")
                .replace("running", "passed"),
        ),
        (
            "garbage header",
            vec![("x-buildkite-signature", "signature=zz".to_string())],
            body.clone(),
        ),
    ];
    for (what, headers, b) in cases {
        let r = post(headers, b).await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{what}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_webhook", "{what}");
    }
    let huge = "x".repeat(300 * 1024);
    let r = post(
        vec![("x-buildkite-signature", sig(SECRET, now, &huge))],
        huge,
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let r = post(
        vec![("x-buildkite-signature", sig(SECRET, now, "{not json"))],
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
        fake.stats().requests["get_build"],
        polls_before,
        "a rejected webhook caused a poll"
    );
    assert_eq!(s.get(&http, &id).await["status"], "running");

    // Verified but not for stitch: ping, unknown events, foreign builds.
    let ping = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../stitch-runners/tests/data/buildkite/webhook_ping_signed.json"
    ))
    .unwrap();
    let foreign = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../stitch-fake-providers/tests/data/buildkite/webhook_build_scheduled.json"
    ))
    .unwrap();
    let unknown = r#"{"event":"agent.connected","agent":{}}"#.to_string();
    for b in [ping, foreign, unknown] {
        let r = post(vec![("x-buildkite-signature", sig(SECRET, now, &b))], b)
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["outcome"], "ignored");
    }
    // A genuine one wakes the build: cancel it at the fake, then tell stitch.
    let cancel_url = format!(
        "{}/v2/organizations/acme/pipelines/app/builds/1/cancel",
        fake.url()
    );
    let r = http
        .put(cancel_url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    // The snapshot says `canceling` or `canceled`: both map to cancelled.
    let body =
        serde_json::json!({"event": "build.finished", "build": fake.build_json(&id).unwrap()})
            .to_string();
    let r = post(
        vec![(
            "x-buildkite-signature",
            sig(SECRET, chrono::Utc::now().timestamp(), &body),
        )],
        body,
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["outcome"], "woken");
    let done = s
        .wait_all_terminal(&http, std::slice::from_ref(&id), Duration::from_secs(10))
        .await;
    assert_eq!(done[&id], "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_webhooks_wake_builds() {
    let fake = fake(None).await;
    let extra =
        "[queues.ci.buildkite.webhook]\nmode = \"token\"\nsecret_env = \"BK_WEBHOOK_SECRET\"\n";
    let s = queue(&fake).extra(extra).serve().await;
    fake.set_webhook(Some(WebhookTarget {
        url: format!("{}/webhooks/buildkite", s.base),
        auth: WebhookAuth::Token(SECRET.into()),
        job_events: false,
    }));
    let http = reqwest::Client::new();
    let batch = Batch::create(&s, &http, batch_heads(20)).await;
    let done = s
        .wait_all_terminal(&http, &batch.ids, Duration::from_secs(30))
        .await;
    for (id, h) in batch.ids.iter().zip(&batch.heads) {
        assert_eq!(done[id], expected(h));
    }
    let stats = fake.stats();
    assert!(
        stats.webhooks_sent > 0 && stats.webhooks_refused == 0,
        "{stats:?}"
    );
    // A wrong token is refused.
    let r = http
        .post(format!("{}/webhooks/buildkite", s.base))
        .header("x-buildkite-token", "guess")
        .body(r#"{"event":"ping"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
}

/// Push is never lost. The queue takes signed webhooks, so it polls once a
/// minute (`webhook.poll`) and every status hold below is 60 s: a cancel or
/// a webhook that arrives while a poll is in flight must end that hold at
/// once (the queue's wake marks the in-flight delivery, ADR 0012), or the
/// build waits out the minute and the 20 s waits here fail. Phases are
/// pinned with the fake's pauses (a request done at the provider, its
/// answer held), not with timing.
/// Buildkite for the provider-independent suites: trigger and get build are
/// the held steps, `build.finished` is the finished webhook.
struct Buildkite {
    fake: FakeBuildkite,
    serve: Serve,
}

impl Provider for Buildkite {
    const HANG: &'static str = "?stitch-bk=hang";
    const BATCH: usize = 200;
    type Fake = FakeBuildkite;

    async fn start(setup: Setup) -> Self {
        let fake =
            fake(matches!(setup, Setup::Storm).then_some((30, Duration::from_secs(1)))).await;
        let serve = queue(&fake).setup(setup, SIGNED_WEBHOOK).serve().await;
        Self { fake, serve }
    }

    fn serve(&self) -> &Serve {
        &self.serve
    }

    fn serve_mut(&mut self) -> &mut Serve {
        &mut self.serve
    }

    fn fake(&self) -> &FakeBuildkite {
        &self.fake
    }

    fn batch_heads(n: usize) -> Vec<String> {
        batch_heads(n)
    }

    fn hold_next(&self, step: Step) -> Pause {
        self.fake.pause_next(match step {
            Step::Start => Endpoint::Create,
            Step::Poll => Endpoint::GetBuild,
        })
    }

    fn send_webhooks(&self) {
        self.fake.set_webhook(Some(WebhookTarget {
            url: format!("{}/webhooks/buildkite", self.serve.base),
            auth: WebhookAuth::Signature(SECRET.into()),
            job_events: false,
        }));
    }

    async fn finished_webhook_delivered(&self, id: &str) {
        self.fake.webhook_delivered(id, "build.finished").await;
    }

    async fn assert_cancelled_at_provider(&self, id: &str, settled: bool) {
        // Buildkite's `canceling` already maps to cancelled; the fake moves
        // on to `canceled` 50 ms later.
        if settled {
            let settled = self.fake.build_until(id, |b| b["state"] == "canceled");
            tokio::time::timeout(SETTLE, settled)
                .await
                .expect("the provider's cancelled build settles");
        } else {
            let state = self.fake.build_json(id).unwrap()["state"].clone();
            assert!(state == "canceling" || state == "canceled", "{state}");
        }
    }

    fn assert_finished_record(&self, record: &serde_json::Value) {
        assert_eq!(record["metadata"]["buildkite_state"], "passed");
        assert!(record["metadata"]["url"]
            .as_str()
            .unwrap()
            .contains("/acme/app/builds/"));
    }

    fn assert_finished_log(&self, text: &str) {
        // Buildkite's lines, without its timestamp markers.
        assert!(text.contains("$ make test"), "{text}");
        assert!(!text.contains("_bk;t="), "{text}");
    }
}

impl Storms for Buildkite {
    fn rate_limit_storm(&self, length: Duration) {
        self.fake.rate_limit_storm(length);
    }

    fn rate_limited(&self) -> u64 {
        self.fake.stats().rate_limited
    }

    fn max_requests_in(&self, window: Duration) -> usize {
        self.fake.max_requests_in("acme", window)
    }
}

provider_suite!(Buildkite);
provider_suite!(@storm Buildkite);

/// `stitch build open` prints the Buildkite page of the build and, with
/// `--browser`, hands it to `$BROWSER` (a script here that records it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_open_prints_the_provider_url() {
    let fake = fake(None).await;
    let s = queue(&fake).serve().await;
    let http = reqwest::Client::new();
    let id = s.create(&http, "ci", "https://git.example/c/open").await;
    s.wait_all_terminal(&http, std::slice::from_ref(&id), Duration::from_secs(30))
        .await;
    let url = s.get(&http, &id).await["url"]
        .as_str()
        .expect("a Buildkite build has a url")
        .to_string();
    let stitch = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_stitch"));
        cmd.args(args)
            .env("STITCH_SERVER", &s.base)
            .env_remove("BROWSER");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.kill_on_drop(true).output()
    };
    let out = stitch(&["build", "open", &id], &[]).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), url);
    assert!(url.contains("/acme/app/builds/"), "{url}");
    let out = stitch(&["build", "open", &id, "--json"], &[])
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["url"], url.as_str());
    assert_eq!(v["id"], id.as_str());

    let dir = tempfile::tempdir().unwrap();
    let opened = dir.path().join("opened");
    let browser = dir.path().join("browser.sh");
    std::fs::write(
        &browser,
        format!("#!/bin/sh\nprintf '%s' \"$1\" > '{}'\n", opened.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&browser, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = stitch(
        &["build", "open", &id, "--browser"],
        &[("BROWSER", browser.to_str().unwrap())],
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(std::fs::read_to_string(&opened).unwrap(), url);
    // --browser without $BROWSER: the URL is printed, and the exit code
    // says nothing was opened.
    let out = stitch(&["build", "open", &id, "--browser"], &[])
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), url);
    assert!(String::from_utf8_lossy(&out.stderr).contains("$BROWSER is not set"));
}
