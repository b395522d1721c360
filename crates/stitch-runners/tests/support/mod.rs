//! What the Buildkite and GitHub runner tests share: client settings, the
//! wait on the fake's clock, and the conformance subject of a provider fake.

#![allow(dead_code)] // each test file uses its own part of the helpers

use std::sync::Arc;
use std::time::Duration;

use stitch_core::{BuildHandle, BuildId, BuildRunner, ChangeSet, StatusReport, TriggerRequest};
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
