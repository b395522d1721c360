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
use support::provider::{provider_suite, Provider, Setup, Step, Storms, SETTLE};
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
    const BATCH: usize = 200;
    type Fake = FakeJenkins;

    async fn start(setup: Setup) -> Self {
        let fake = fake_with(false).await;
        // No webhooks: "pushed" is only the minute-long poll.
        let serve = queue(&fake).setup(setup, "").serve().await;
        Self { fake, serve }
    }

    fn serve(&self) -> &Serve {
        &self.serve
    }

    fn serve_mut(&mut self) -> &mut Serve {
        &mut self.serve
    }

    fn fake(&self) -> &FakeJenkins {
        &self.fake
    }

    fn batch_heads(n: usize) -> Vec<String> {
        batch_heads(n)
    }

    fn lossy_extras(&self) {
        // A queued build is followed through its queue item first.
        self.fake
            .inject_rate(Endpoint::QueueItem, Fault::Status(502), 0.05);
    }

    async fn check_lossy_batch(&self, http: &reqwest::Client, batch: &Batch) {
        // The eighth head is unstable: failed, and Jenkins's result says why.
        let record = self.serve.get(http, &batch.ids[7]).await;
        assert_eq!(record["metadata"]["jenkins_result"], "UNSTABLE");
    }

    fn before_restart(&self) {
        // Jenkins forgets queue items a while after they left the queue:
        // the restarted server must find those builds by their parameter.
        self.fake.forget_left_items();
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

    async fn assert_cancelled_at_provider(&self, id: &str, settled: bool) {
        // Cancelled in the queue (never built), or a stopped build:
        // `ABORTED` once settled, still building for a moment before.
        match self.fake.build_json(id) {
            Some(build) => {
                if settled {
                    let settled = self.fake.build_until(id, |b| b["result"] == "ABORTED");
                    tokio::time::timeout(SETTLE, settled)
                        .await
                        .expect("the provider's stopped build settles as ABORTED");
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

impl Storms for Jenkins {
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

provider_suite!(Jenkins, polled);
provider_suite!(@storm Jenkins);
