//! The cases that must hold whatever the CI provider is, written once
//! against [`Provider`] and instantiated per provider by
//! [`provider_suite!`] (`buildkite.rs`, `github.rs`, `gitlab.rs` and `jenkins.rs` each
//! implement [`Provider`] on their fake and `stitch serve` configuration;
//! a provider without webhooks expands `provider_suite!(P, polled)`, the
//! cases that need none). A provider whose fake can refuse with 429s
//! ([`Storms`]) adds `provider_suite!(@storm P)`.

#![allow(dead_code, unused_macros)] // each test file uses its own part of the helpers

use std::time::Duration;

use serde_json::Value;

use stitch_fake_providers::faults::{Fault, FaultControl, Pause, ProviderFake};

use super::queue::Batch;
use super::serve::Serve;

/// How long a case waits for its build to end.
pub const WITHIN: Duration = Duration::from_secs(20);

/// A request of the provider's build lifecycle that a case holds.
#[derive(Clone, Copy, Debug)]
pub enum Step {
    /// The request that starts the build (Buildkite's trigger, GitHub's
    /// workflow dispatch).
    Start,
    /// The status poll (Buildkite's get build, GitHub's get run).
    Poll,
}

/// When a cancel lands relative to a held request.
#[derive(Clone, Copy, Debug)]
pub enum CancelAt {
    /// While the request's answer is held.
    WhileHeld,
    /// Right after the answer went out.
    AfterAnswer,
}

/// How `stitch serve` learns of the provider's builds.
#[derive(Clone, Copy, Debug)]
pub enum Setup {
    /// Signed webhooks accepted and a 60 s safety-net poll: only a push or
    /// a cancel ends a build within [`WITHIN`]. (A provider without
    /// webhooks: polls every 60 s, so only a cancel can.)
    Pushed,
    /// No webhooks; polls every 100 ms.
    Polled,
    /// No webhooks; polls every 150 ms (a batch of [`Provider::BATCH`]
    /// builds over a lossy network, or a SIGKILL amid it).
    Batch,
    /// No webhooks; polls every 200 ms within a budget of 30 requests a
    /// second, on a fake that allows 30 a second (where it limits at all).
    Storm,
}

/// A faked CI provider with `stitch serve` running queue `ci` on it, and
/// the verbs the shared cases drive it with.
#[allow(async_fn_in_trait)] // test-only, never spawned: no `Send` bound wanted
pub trait Provider: Sized {
    /// The head marker that makes the fake's build run until cancelled.
    const HANG: &'static str;

    /// The steps a finished build's log has (one per job; a Jenkins build
    /// is one console).
    const STEPS: usize = 2;

    /// How many builds the batch cases create.
    const BATCH: usize;

    /// The provider's fake.
    type Fake: ProviderFake;

    /// Starts the fake and a `stitch serve` configured for it.
    async fn start(setup: Setup) -> Self;

    /// The running `stitch serve`.
    fn serve(&self) -> &Serve;

    /// The running `stitch serve`, to kill and restart.
    fn serve_mut(&mut self) -> &mut Serve;

    /// The fake.
    fn fake(&self) -> &Self::Fake;

    /// `n` heads of a batch, every tenth failing (the fake's markers).
    fn batch_heads(n: usize) -> Vec<String>;

    /// Faults of the provider's own for the lossy batch, beyond its lost
    /// start answers and failing polls.
    fn lossy_extras(&self) {}

    /// What the provider leaves in a lossy batch's records beyond their
    /// outcomes.
    async fn check_lossy_batch(&self, _http: &reqwest::Client, _batch: &Batch) {}

    /// Runs between the SIGKILL of `stitch serve` and its restart.
    fn before_restart(&self) {}

    /// Holds the fake's next answer to `step` until the pause is released.
    fn hold_next(&self, step: Step) -> Pause;

    /// Points the fake's webhooks at the running `stitch serve`.
    fn send_webhooks(&self);

    /// Returns once the webhook saying the build ended was answered.
    async fn finished_webhook_delivered(&self, id: &str);

    /// Asserts the provider itself was asked to cancel the build and did;
    /// `settled`: its own state also becomes final (not still cancelling) —
    /// waited for on the fake's own moves, since stitch may record the
    /// cancel while the provider still says it is cancelling.
    async fn assert_cancelled_at_provider(&self, id: &str, settled: bool);

    /// Asserts what the provider left in a finished build's record
    /// (metadata, the build's page).
    fn assert_finished_record(&self, record: &Value);

    /// Asserts the provider's own lines in a finished build's log (read as
    /// SSE), beyond its two steps.
    fn assert_finished_log(&self, text: &str);
}

/// How long a provider's cancelled build may take to settle once stitch
/// recorded the cancel (the fakes take 50 ms; the bound is for a loaded
/// machine).
pub const SETTLE: Duration = Duration::from_secs(30);

async fn cancel(http: &reqwest::Client, s: &Serve, id: &str) {
    assert_eq!(s.cancel(http, id).await, 202, "cancel {id}");
}

async fn ends_as(http: &reqwest::Client, s: &Serve, id: &str, status: &str) {
    let done = s.wait_all_terminal(http, &[id.to_string()], WITHIN).await;
    assert_eq!(done[id], status, "{}", s.log());
}

/// Creates a build whose request for `step` is held at the fake.
async fn create_held<P: Provider>(
    p: &P,
    http: &reqwest::Client,
    step: Step,
    head: &str,
) -> (String, Pause) {
    let pause = p.hold_next(step);
    let id = p.serve().create(http, "ci", head).await;
    pause.arrived().await;
    (id, pause)
}

/// A never-ending build whose request for `step` is held; the cancel lands
/// at `at` and must reach the provider at once.
pub async fn cancel_around<P: Provider>(step: Step, at: CancelAt, head: &str) {
    let p = P::start(Setup::Pushed).await;
    let s = p.serve();
    let http = reqwest::Client::new();
    let head = format!("{head}{}", P::HANG);
    let (id, pause) = create_held(&p, &http, step, &head).await;
    match at {
        CancelAt::WhileHeld => {
            cancel(&http, s, &id).await;
            pause.release();
        }
        CancelAt::AfterAnswer => {
            pause.release();
            cancel(&http, s, &id).await;
        }
    }
    ends_as(&http, s, &id, "cancelled").await;
    p.assert_cancelled_at_provider(&id, false).await;
}

/// A build whose request for `step` is held while it passes at the
/// provider and its "finished" webhook reaches stitch.
pub async fn webhook_while_held<P: Provider>(step: Step, head: &str) {
    let p = P::start(Setup::Pushed).await;
    p.send_webhooks();
    let http = reqwest::Client::new();
    let (id, pause) = create_held(&p, &http, step, head).await;
    p.finished_webhook_delivered(&id).await;
    pause.release();
    ends_as(&http, p.serve(), &id, "succeeded").await;
}

/// Polled builds: a running build is cancelled at the provider, cancelling
/// a finished one changes nothing, and the finished build's log streams
/// over SSE as its steps ([`Provider::STEPS`]) with the provider's lines.
pub async fn cancel_running_and_finished_builds_and_stream_logs<P: Provider>() {
    let p = P::start(Setup::Polled).await;
    let s = p.serve();
    let http = reqwest::Client::new();
    let long = s
        .create(
            &http,
            "ci",
            &format!("https://git.example/c/long{}", P::HANG),
        )
        .await;
    let short = s.create(&http, "ci", "https://git.example/c/short").await;
    s.wait_status(&http, &long, "running").await;
    s.wait_all_terminal(&http, std::slice::from_ref(&short), Duration::from_secs(30))
        .await;
    for id in [&long, &short] {
        cancel(&http, s, id).await;
    }
    let done = s
        .wait_all_terminal(
            &http,
            &[long.clone(), short.clone()],
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(done[&long], "cancelled");
    assert_eq!(
        done[&short], "succeeded",
        "cancelling a finished build changes nothing"
    );
    p.assert_cancelled_at_provider(&long, true).await;
    p.assert_finished_record(&s.get(&http, &short).await);

    let text = s.logs_text(&http, &short).await;
    assert_eq!(
        text.matches(r#""step_status":"start""#).count(),
        P::STEPS,
        "{text}"
    );
    assert_eq!(
        text.matches(r#""step_status":"end""#).count(),
        P::STEPS,
        "{text}"
    );
    p.assert_finished_log(&text);
}

/// How long a batch may take to end.
const BATCH_WITHIN: Duration = Duration::from_secs(90);

/// A batch polled over a lossy network: a fifth of start requests lose
/// their answer after the provider started the build (reset, timeout, a
/// proxy's 502) and some polls fail; every build still ends as its head
/// says, with exactly one build at the provider.
pub async fn lost_starts_make_one_build_each<P: Provider>() {
    let p = P::start(Setup::Batch).await;
    let (fake, s) = (p.fake(), p.serve());
    let start = <P::Fake as ProviderFake>::START;
    fake.inject_rate(start, Fault::Reset, 0.1);
    fake.inject_rate(start, Fault::Timeout(Duration::from_secs(2)), 0.05);
    fake.inject_rate(start, Fault::LostAfterWork(502), 0.05);
    fake.inject_rate(<P::Fake as ProviderFake>::POLL, Fault::Status(503), 0.05);
    p.lossy_extras();
    let http = reqwest::Client::new();
    let batch = Batch::create(s, &http, P::batch_heads(P::BATCH)).await;
    batch
        .ends_as_expected_once_each(s, &http, BATCH_WITHIN, |id| fake.builds_for(id))
        .await;
    assert_eq!(fake.builds_started(), P::BATCH as u64);
    p.check_lossy_batch(&http, &batch).await;
}

/// `stitch serve` is SIGKILLed amid unanswered start requests and
/// restarted: every build ends, none twice at the provider.
pub async fn sigkill_and_restart_finish_every_build_without_duplicates<P: Provider>() {
    let mut p = P::start(Setup::Batch).await;
    // Starts are slow to answer, so the kill lands amid unanswered ones;
    // the first start's answer is held until after the kill, so at least
    // one build exists at the provider whose start stitch never saw
    // answered.
    let start = <P::Fake as ProviderFake>::START;
    p.fake()
        .inject_rate(start, Fault::Timeout(Duration::from_millis(300)), 0.3);
    let held = p.fake().pause_next(start);
    let http = reqwest::Client::new();
    let batch = Batch::create(p.serve(), &http, P::batch_heads(P::BATCH)).await;
    held.arrived().await;
    p.serve_mut().kill(); // SIGKILL
    held.release();
    assert!(p.fake().builds_started() >= 1);
    p.before_restart();
    p.serve_mut().restart().await;
    let fake = p.fake();
    batch
        .ends_as_expected_once_each(p.serve(), &http, BATCH_WITHIN, |id| fake.builds_for(id))
        .await;
}

/// A provider whose fake can refuse every request with 429 for a while.
pub trait Storms: Provider {
    /// Refuses every request with 429 (and its retry hint) for `length`.
    fn rate_limit_storm(&self, length: Duration);

    /// Requests refused with 429 so far.
    fn rate_limited(&self) -> u64;

    /// The most requests the fake saw within any `window` (the budget's
    /// scope: Buildkite's organization, the token, the controller user).
    fn max_requests_in(&self, window: Duration) -> usize;
}

/// A 429 storm while builds run fails none of them, and stitch stays
/// within its budget of 30 requests a second throughout.
pub async fn a_429_storm_fails_no_build_and_the_budget_holds<P: Storms>() {
    let p = P::start(Setup::Storm).await;
    let (fake, s) = (p.fake(), p.serve());
    let http = reqwest::Client::new();
    Batch::create_with(s, &http, P::batch_heads(40), |i| {
        if i == 10 {
            p.rate_limit_storm(Duration::from_secs(3));
        }
    })
    .await
    .ends_as_expected_once_each(s, &http, BATCH_WITHIN, |id| fake.builds_for(id))
    .await;
    assert!(p.rate_limited() > 0, "the storm did not happen");
    let peak = p.max_requests_in(Duration::from_secs(1));
    assert!(
        peak <= 30,
        "{peak} requests within one second; the budget is 30"
    );
}

/// Expands to the provider suite for the [`Provider`] given:
/// `cancel_running_and_finished_builds_and_stream_logs`, the batch cases
/// (`lost_starts_make_one_build_each`, `sigkill_and_restart_…`), and
/// `mod push_never_lost`, where a push (a cancel, a webhook) is never lost
/// whenever it lands in the start/poll cycle: it takes effect at once, not
/// at the next 60 s poll. `provider_suite!(P, polled)` leaves out the
/// webhook cases, for a provider that has none.
macro_rules! provider_suite {
    ($provider:ty) => {
        $crate::support::provider::provider_suite!(@cases $provider, {
            use $crate::support::provider::webhook_while_held;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_webhook_during_a_poll_takes_effect_at_once() {
                // The first poll is held with the build still waiting to
                // run; the build passes meanwhile and its webhook reaches
                // stitch while that poll is out. Its answer (not started)
                // would hold the build for a minute.
                webhook_while_held::<P>(Step::Poll, "https://git.example/c/5").await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_webhook_before_the_start_returns_takes_effect_at_once() {
                webhook_while_held::<P>(Step::Start, "https://git.example/c/6").await;
            }
        });
    };
    ($provider:ty, polled) => {
        $crate::support::provider::provider_suite!(@cases $provider, {});
    };
    (@storm $provider:ty) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_429_storm_fails_no_build_and_the_budget_holds() {
            $crate::support::provider::a_429_storm_fails_no_build_and_the_budget_holds::<
                $provider,
            >()
            .await;
        }
    };
    (@cases $provider:ty, { $($webhook_case:item)* }) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn cancel_running_and_finished_builds_and_stream_logs() {
            $crate::support::provider::cancel_running_and_finished_builds_and_stream_logs::<
                $provider,
            >()
            .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn lost_starts_make_one_build_each() {
            $crate::support::provider::lost_starts_make_one_build_each::<$provider>().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn sigkill_and_restart_finish_every_build_without_duplicates() {
            $crate::support::provider::sigkill_and_restart_finish_every_build_without_duplicates::<
                $provider,
            >()
            .await;
        }

        mod push_never_lost {
            use super::*;
            use $crate::support::provider::{cancel_around, CancelAt, Step};

            type P = $provider;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_cancel_before_the_start_returns_cancels_at_once() {
                cancel_around::<P>(Step::Start, CancelAt::WhileHeld, "https://git.example/c/1")
                    .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_cancel_between_the_start_and_the_first_poll_cancels_at_once() {
                cancel_around::<P>(
                    Step::Start,
                    CancelAt::AfterAnswer,
                    "https://git.example/c/2",
                )
                .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_cancel_during_a_poll_cancels_at_once() {
                // The first poll starts right after the start: the cancel
                // comes after the build was started and while that poll is
                // out.
                cancel_around::<P>(Step::Poll, CancelAt::WhileHeld, "https://git.example/c/3")
                    .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_cancel_after_a_poll_answered_cancels_at_once() {
                // The poll's answer goes out; the stage is writing or has
                // written its 60 s hold when the cancel lands (both must
                // work).
                cancel_around::<P>(Step::Poll, CancelAt::AfterAnswer, "https://git.example/c/4")
                    .await;
            }

            $($webhook_case)*
        }
    };
}

#[allow(unused_imports)] // only the provider suites expand it
pub(crate) use provider_suite;
