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
use support::serve::{Serve, STITCH};

const TOKEN: &str = "11f0e0c2d5b3a7e9c4d1f8a6b2e3c7d9a0";

/// A budget far above what the tests send, unless a test sets its own.
const NO_BUDGET: &str = "rate_limit = { requests = 100000, window = \"1s\" }";

/// `extra` is appended to the `[queues.ci.jenkins]` table.
fn config_text(fake: &FakeJenkins, extra: &str, poll: &str) -> String {
    let budget = if extra.contains("rate_limit") {
        ""
    } else {
        NO_BUDGET
    };
    format!(
        r#"data_dir = "{{data}}"
[queues.ci]
runner = "jenkins"
poll = {{ accepted = "{poll}", running = "{poll}" }}
retry = {{ max_attempts = 30, initial = "100ms", max = "2s" }}
[queues.ci.jenkins]
url = "{url}"
job = "team/app"
user = "{user}"
token_env = "JK_TOKEN"
request_timeout = "1s"
log_poll = "100ms"
{budget}
{extra}
"#,
        url = fake.url(),
        user = fake.user(),
    )
}

async fn serve(fake: &FakeJenkins, extra: &str, poll: &str) -> Serve {
    Serve::start(
        STITCH,
        &config_text(fake, extra, poll),
        &[("JK_TOKEN", TOKEN)],
    )
    .await
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

fn heads(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let marker = match i % 10 {
                3 => "?stitch-jk=fail",
                7 => "?stitch-jk=unstable",
                _ => "",
            };
            format!("https://git.example/c/{i}{marker}")
        })
        .collect()
}

fn expected(head: &str) -> &'static str {
    if head.contains("stitch-jk=") {
        "failed"
    } else {
        "succeeded"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_finishes_200_builds_and_lost_triggers_make_one_build_each() {
    let fake = fake_with(false).await;
    let s = serve(&fake, "", "150ms").await;
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
    let hs = heads(200);
    let mut ids = Vec::new();
    for h in &hs {
        ids.push(s.create(&http, "ci", h).await);
    }
    let done = s
        .wait_all_terminal(&http, &ids, Duration::from_secs(90))
        .await;
    for (id, h) in ids.iter().zip(&hs) {
        assert_eq!(done[id], expected(h), "{id} {h}");
        assert_eq!(fake.items_for(id), 1, "duplicate Jenkins builds for {id}");
    }
    assert_eq!(fake.stats().items_queued, 200);
    let record = s.get(&http, &ids[7]).await;
    assert_eq!(record["metadata"]["jenkins_result"], "UNSTABLE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_finish_every_build_without_duplicates() {
    let fake = fake_with(false).await;
    let mut s = serve(&fake, "", "150ms").await;
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
    let hs = heads(200);
    let mut ids = Vec::new();
    for h in &hs {
        ids.push(s.create(&http, "ci", h).await);
    }
    held.arrived().await;
    s.kill(); // SIGKILL
    held.release();
    assert!(fake.stats().items_queued >= 1);
    // Jenkins forgets queue items a while after they left the queue: the
    // restarted server must find those builds by their parameter.
    fake.forget_left_items();
    s.restart().await;
    let done = s
        .wait_all_terminal(&http, &ids, Duration::from_secs(90))
        .await;
    for (id, h) in ids.iter().zip(&hs) {
        assert_eq!(done[id], expected(h), "{id} {h}");
        assert_eq!(fake.items_for(id), 1, "duplicate Jenkins builds for {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_fails_no_build_and_the_budget_holds() {
    let fake = fake_with(false).await;
    let s = serve(
        &fake,
        "rate_limit = { requests = 30, window = \"1s\" }",
        "200ms",
    )
    .await;
    let http = reqwest::Client::new();
    let hs = heads(40);
    let mut ids = Vec::new();
    for (i, h) in hs.iter().enumerate() {
        ids.push(s.create(&http, "ci", h).await);
        if i == 10 {
            fake.rate_limit_storm(Duration::from_secs(3));
        }
    }
    let done = s
        .wait_all_terminal(&http, &ids, Duration::from_secs(90))
        .await;
    for (id, h) in ids.iter().zip(&hs) {
        assert_eq!(done[id], expected(h), "{id} {h}");
        assert_eq!(fake.items_for(id), 1);
    }
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
    let s = serve(&fake, "", "100ms").await;
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
        let serve = match setup {
            Setup::Pushed => serve(&fake, "", "60s").await,
            Setup::Polled => serve(&fake, "", "100ms").await,
        };
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
