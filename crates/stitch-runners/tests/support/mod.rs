//! What the provider runner tests (Buildkite, GitHub, GitLab, Jenkins)
//! share: client settings, the wait on the fake's clock, the conformance
//! subject of a provider fake, and the cases every provider's runner must
//! pass against its fake ([`ProviderFake`]): lost start answers, 5xx
//! bursts on status reads, refs of other builds.

#![allow(dead_code)] // each test file uses its own part of the helpers

use std::sync::Arc;
use std::time::Duration;

use stitch_core::{
    BuildHandle, BuildId, BuildRunner, ChangeSet, RunnerRef, StatusReport, TriggerRequest,
};
use stitch_fake_providers::faults::{Fault, ProviderFake};
use stitch_runners::conformance::{self, Checked, Scenario, Subject};
use stitch_runners::http_budget::{RateLimit, RequestBudget};
use stitch_runners::http_retry::RetryPolicy;
use tokio::sync::watch;

/// Retries quick enough for tests, still with backoff and jitter.
pub fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        max_rate_limit_wait: Duration::from_secs(5),
        jitter: 0.2,
    }
}

/// A request budget far above what any test sends.
pub fn unlimited() -> Arc<RequestBudget> {
    Arc::new(RequestBudget::new(RateLimit {
        requests: 100_000,
        window: Duration::from_secs(1),
    }))
}

/// A trigger of queue `ci` for `head`, with a fresh build id.
pub fn request(head: &str) -> TriggerRequest {
    TriggerRequest::new(
        BuildId::new(),
        "ci",
        ChangeSet::new(vec!["https://git.example/base/1".into()], vec![head.into()]),
    )
}

/// Asks for the status now and after every move of the fake's builds
/// (`moved`, the fake's clock: nothing else moves them) until `wanted`
/// holds.
pub async fn wait_report(
    mut moved: watch::Receiver<u64>,
    r: &dyn BuildRunner,
    h: &BuildHandle,
    mut wanted: impl FnMut(&StatusReport) -> bool,
) -> StatusReport {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        // Marked seen before asking: a move after it wakes the wait.
        moved.borrow_and_update();
        let s = r.status(h).await.unwrap();
        if wanted(&s) {
            return s;
        }
        let next = tokio::time::timeout_at(deadline, moved.changed()).await;
        assert!(matches!(next, Ok(Ok(()))), "build stuck at {s:?}");
    }
}

/// [`wait_report`] until the build is terminal.
pub async fn wait_terminal(
    moved: watch::Receiver<u64>,
    r: &dyn BuildRunner,
    h: &BuildHandle,
) -> StatusReport {
    wait_report(moved, r, h, StatusReport::is_terminal).await
}

/// Runs every conformance check against a provider fake's runner; the fake
/// reads the scenario from the head marker `?stitch-{marker}=…`, and
/// `adjust` finishes each request.
pub async fn assert_conformance(
    new_runner: impl Fn() -> Arc<dyn BuildRunner> + Send + Sync + 'static,
    marker: &'static str,
    adjust: fn(TriggerRequest) -> TriggerRequest,
) {
    let subject = Subject::new(new_runner, move |scenario| {
        let query = match scenario {
            Scenario::Succeed => String::new(),
            Scenario::Fail => format!("?stitch-{marker}=fail"),
            Scenario::RunLong => format!("?stitch-{marker}=hang"),
            Scenario::UnknownState => format!("?stitch-{marker}=unknown"),
        };
        Some(adjust(request(&format!("https://git.example/c/1{query}"))))
    })
    .with_deadline(Duration::from_secs(20));
    let results = conformance::run_all(&subject).await.unwrap();
    assert!(
        results.iter().all(|(_, c)| *c == Checked::Passed),
        "{results:?}"
    );
}

/// Loses the answer to the request that starts a build in every way a
/// network can after the provider did the work (a timeout, a reset, a
/// proxy's 502), then fails one with a 503 before any work: every trigger
/// still returns a ref, and the provider holds exactly one build for each
/// (found by the lookup after a lost answer, made again after the 503).
/// `request` makes each trigger's request; returns the requests with their
/// refs, for the provider's own checks.
pub async fn lost_starts_make_exactly_one_build<F: ProviderFake>(
    fake: &F,
    r: &dyn BuildRunner,
    request: fn(&str) -> TriggerRequest,
) -> Vec<(TriggerRequest, RunnerRef)> {
    let mut triggered = Vec::new();
    for fault in [
        Fault::Timeout(Duration::from_secs(2)),
        Fault::Reset,
        Fault::LostAfterWork(502),
        Fault::Status(503),
    ] {
        fake.inject(F::START, fault, 1);
        let req = request("https://git.example/c/1");
        let got = r
            .trigger(&req)
            .await
            .unwrap_or_else(|e| panic!("{fault:?}: {e}"));
        assert_eq!(fake.builds_for(req.build_id.as_str()), 1, "{fault:?}");
        triggered.push((req, got));
    }
    triggered
}

/// Status reads ride out a short burst of 5xx answers and a reset; past the
/// retry policy's attempts the error is retryable for the caller.
pub async fn status_reads_ride_out_5xx_bursts_and_resets<F: ProviderFake>(
    fake: &F,
    r: &dyn BuildRunner,
    h: &BuildHandle,
) {
    fake.inject(F::POLL, Fault::Status(502), 2);
    fake.inject(F::POLL, Fault::Reset, 1);
    r.status(h).await.unwrap();
    fake.inject(F::POLL, Fault::Status(503), 4);
    let e = r.status(h).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
}

/// A real ref under another build's id, and a ref that is no ref of the
/// provider's, are both "not found" (never another build's status).
pub async fn refs_of_other_builds_are_not_found(r: &dyn BuildRunner) {
    let real = r
        .trigger(&request("https://git.example/c/1"))
        .await
        .unwrap();
    let stranger = BuildHandle::new(BuildId::new(), "ci").with_ref(real);
    assert!(r.status(&stranger).await.unwrap_err().is_not_found());
    let garbage = BuildHandle::new(BuildId::new(), "ci").with_ref(RunnerRef::new("not-a-number"));
    assert!(r.status(&garbage).await.unwrap_err().is_not_found());
}
