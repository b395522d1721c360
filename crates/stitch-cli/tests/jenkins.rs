//! `stitch serve` (the real binary) driving builds on the stateful fake
//! Jenkins over loopback HTTP: polling with lost trigger answers, SIGKILL
//! and restart, a 429 storm within the budget, a controller that asks for
//! CSRF crumbs, and the provider suite's polled cases (Jenkins has no
//! webhooks in stitch, so the suite's webhook cases do not apply).

mod support;

use std::time::Duration;

use stitch_fake_providers::jenkins::{
    Endpoint, FakeJenkins, FakeOptions, Fault, FaultControl, Pause, Timing,
};
use support::provider::{provider_suite, Provider, Setup, Step};
use support::queue::{heads, Batch, QueueConfig};
use support::serve::Serve;

const TOKEN: &str = "11f0e0c2d5b3a7e9c4d1f8a6b2e3c7d9a0";

/// Queue `ci` on job `team/app` of `fake`.
fn queue(fake: &FakeJenkins) -> QueueConfig {
    QueueConfig::new(
        "jenkins",
        format!(
            "url = \"{}\"\njob = \"team/app\"\nuser = \"{}\"\ntoken_env = \"JK_TOKEN\"",
            fake.url(),
            fake.user()
        ),
    )
    .env("JK_TOKEN", TOKEN)
}

async fn fake_with(require_crumb: bool) -> FakeJenkins {
    FakeJenkins::start(FakeOptions {
        token: TOKEN.into(),
        timing: Timing {
            queue: Duration::from_millis(100),
            run: Duration::from_millis(400),
            ..Timing::default()
        },
        require_crumb,
        ..FakeOptions::default()
    })
    .await
    .unwrap()
}

/// `n` heads, every tenth failing and every tenth unstable (which fails).
fn batch_heads(n: usize) -> Vec<String> {
    heads(n, &[(3, "?stitch-jk=fail"), (7, "?stitch-jk=unstable")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_finishes_200_builds_and_lost_triggers_make_one_build_each() {
    let fake = fake_with(false).await;
    let s = queue(&fake).poll("150ms").serve().await;
    // A fifth of triggers lose their answer after Jenkins queued the item.
    fake.inject_rate(Endpoint::Trigger, Fault::Reset, 0.1);
    fake.inject_rate(
        Endpoint::Trigger,
        Fault::Timeout(Duration::from_secs(2)),
        0.05,
    );
    fake.inject_rate(Endpoint::Trigger, Fault::LostAfterWork(502), 0.05);
    fake.inject_rate(Endpoint::GetBuild, Fault::Status(503), 0.05);
    fake.inject_rate(Endpoint::QueueItem, Fault::Status(502), 0.05);
    let http = reqwest::Client::new();
    let batch = Batch::create(&s, &http, batch_heads(200)).await;
    batch
        .ends_as_expected_once_each(&s, &http, Duration::from_secs(90), |id| fake.items_for(id))
        .await;
    assert_eq!(fake.stats().items_queued, 200);
    let record = s.get(&http, &batch.ids[7]).await;
    assert_eq!(record["metadata"]["jenkins_result"], "UNSTABLE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_finish_every_build_without_duplicates() {
    let fake = fake_with(false).await;
    let mut s = queue(&fake).poll("150ms").serve().await;
    // Triggers are slow to answer, so the kill lands amid unanswered
    // triggers; the first one's answer is held until after the kill, so at
    // least one item exists at Jenkins whose trigger stitch never saw
    // answered.
    fake.inject_rate(
        Endpoint::Trigger,
        Fault::Timeout(Duration::from_millis(300)),
        0.3,
    );
    let held = fake.pause_next(Endpoint::Trigger);
    let http = reqwest::Client::new();
    let batch = Batch::create(&s, &http, batch_heads(200)).await;
    held.arrived().await;
    s.kill(); // SIGKILL
    held.release();
    assert!(fake.stats().items_queued >= 1);
    // Jenkins forgets queue items a while after they left the queue: the
    // restarted server must find those builds by their parameter.
    fake.forget_left_items();
    s.restart().await;
    batch
        .ends_as_expected_once_each(&s, &http, Duration::from_secs(90), |id| fake.items_for(id))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_fails_no_build_and_the_budget_holds() {
    let fake = fake_with(false).await;
    let s = queue(&fake)
        .poll("200ms")
        .extra("rate_limit = { requests = 30, window = \"1s\" }")
        .serve()
        .await;
    let http = reqwest::Client::new();
    Batch::create_with(&s, &http, batch_heads(40), |i| {
        if i == 10 {
            fake.rate_limit_storm(Duration::from_secs(3));
        }
    })
    .await
    .ends_as_expected_once_each(&s, &http, Duration::from_secs(90), |id| fake.items_for(id))
    .await;
    assert!(fake.stats().rate_limited > 0, "{:?}", fake.stats());
    let peak = fake.max_requests_in(Duration::from_secs(1));
    assert!(
        peak <= 30,
        "{peak} requests within one second; the budget is 30"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_asking_for_crumbs_gets_them_and_the_token_stays_out_of_logs() {
    let fake = fake_with(true).await;
    let s = queue(&fake).serve().await;
    let http = reqwest::Client::new();
    let ids = [
        s.create(&http, "ci", "https://git.example/c/1").await,
        s.create(&http, "ci", "https://git.example/c/2?stitch-jk=hang")
            .await,
    ];
    s.wait_status(&http, &ids[1], "running").await;
    assert_eq!(s.cancel(&http, &ids[1]).await, 202);
    let done = s
        .wait_all_terminal(&http, &ids, Duration::from_secs(30))
        .await;
    assert_eq!(done[&ids[0]], "succeeded");
    assert_eq!(done[&ids[1]], "cancelled");
    let stats = fake.stats();
    assert!(
        stats.crumb_refused >= 1 && stats.requests["crumb"] >= 1,
        "{stats:?}"
    );
    assert_eq!(stats.items_queued, 2);
    assert!(
        !s.log().contains(TOKEN),
        "the API token reached the server log"
    );
}

/// Jenkins for the provider-independent suite: the trigger and the first
/// queue-item read are the held steps. "Pushed" is a queue polled every
/// 60 s (Jenkins sends no webhooks): only a cancel ends a build in time.
struct Jenkins {
    fake: FakeJenkins,
    serve: Serve,
}

impl Provider for Jenkins {
    const HANG: &'static str = "?stitch-jk=hang";
    const STEPS: usize = 1;

    async fn start(setup: Setup) -> Self {
        let fake = fake_with(false).await;
        // No webhooks: "pushed" is only the minute-long poll.
        let serve = queue(&fake).setup(setup, "").serve().await;
        Self { fake, serve }
    }

    fn serve(&self) -> &Serve {
        &self.serve
    }

    fn hold_next(&self, step: Step) -> Pause {
        self.fake.pause_next(match step {
            Step::Start => Endpoint::Trigger,
            Step::Poll => Endpoint::QueueItem,
        })
    }

    fn send_webhooks(&self) {
        unreachable!(
            "Jenkins sends no webhooks; provider_suite!(Jenkins, polled) has no webhook case"
        )
    }

    async fn finished_webhook_delivered(&self, _id: &str) {
        unreachable!(
            "Jenkins sends no webhooks; provider_suite!(Jenkins, polled) has no webhook case"
        )
    }

    fn assert_cancelled_at_provider(&self, id: &str, settled: bool) {
        // Cancelled in the queue (never built), or a stopped build:
        // `ABORTED` once settled, still building for a moment before.
        match self.fake.build_json(id) {
            Some(build) => {
                if settled {
                    assert_eq!(build["result"], "ABORTED", "{build}");
                } else {
                    assert!(
                        build["result"] == "ABORTED" || build["building"] == true,
                        "{build}"
                    );
                }
            }
            None => {
                let item = self.fake.item_json(id).expect("the queue item");
                assert_eq!(item["cancelled"], true, "{item}");
            }
        }
        let requests = self.fake.stats().requests;
        assert!(requests.contains_key("stop") || requests.contains_key("cancel_item"));
    }

    fn assert_finished_record(&self, record: &serde_json::Value) {
        assert_eq!(record["metadata"]["jenkins_result"], "SUCCESS");
        assert!(record["metadata"]["url"]
            .as_str()
            .unwrap()
            .contains("/job/team/job/app/"));
    }

    fn assert_finished_log(&self, text: &str) {
        // The console's lines, without Jenkins' hidden console notes.
        assert!(text.contains("+ make test"), "{text}");
        assert!(text.contains("Finished: SUCCESS"), "{text}");
        assert!(!text.contains("ha:////"), "{text}");
    }
}

provider_suite!(Jenkins, polled);
