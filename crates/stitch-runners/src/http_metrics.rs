//! What vendor HTTP clients record about their requests
//! (`stitch_core::metric`): every attempt by provider, operation and status
//! with its time, rate-limit pauses, and the requests the provider says are
//! left in its window. Every label value is a constant of the client
//! (provider and operation names) or an HTTP status code; never a URL.

use std::time::Instant;

use reqwest::header::HeaderMap;
use stitch_core::metric;

/// The `provider` label of the Buildkite client.
pub(crate) const BUILDKITE: &str = "buildkite";
/// The `provider` label of the GitHub client.
pub(crate) const GITHUB: &str = "github";
/// The `provider` label of the GitLab client.
pub(crate) const GITLAB: &str = "gitlab";
/// The `provider` label of the Jenkins client.
pub(crate) const JENKINS: &str = "jenkins";

/// One request attempt being timed; recorded when its answer (or the lack
/// of one) is known.
pub(crate) struct Attempt {
    provider: &'static str,
    operation: &'static str,
    start: Instant,
}

impl Attempt {
    /// Starts timing an attempt of `operation` (after the budget let it go,
    /// so a rate-limit wait is not counted as request time).
    pub(crate) fn start(provider: &'static str, operation: &'static str) -> Self {
        Self {
            provider,
            operation,
            start: Instant::now(),
        }
    }

    /// The provider answered with `status` (time to the response head).
    pub(crate) fn answered(self, status: u16) {
        self.record(status.to_string());
    }

    /// No answer: connect failure, timeout, reset.
    pub(crate) fn failed(self) {
        self.record(metric::TRANSPORT_ERROR.to_string());
    }

    fn record(self, status: String) {
        let secs = self.start.elapsed().as_secs_f64();
        metrics::counter!(
            metric::PROVIDER_REQUESTS,
            "provider" => self.provider,
            "operation" => self.operation,
            "status" => status
        )
        .increment(1);
        metrics::histogram!(
            metric::PROVIDER_REQUEST_DURATION,
            "provider" => self.provider,
            "operation" => self.operation
        )
        .record(secs);
    }
}

/// A rate-limit answer paused every request of the provider's scope.
pub(crate) fn rate_limit_pause(provider: &'static str) {
    metrics::counter!(metric::PROVIDER_RATE_LIMIT_PAUSES, "provider" => provider).increment(1);
}

/// Sets the provider's remaining requests from the answer's `header`
/// (`RateLimit-Remaining`, `x-ratelimit-remaining`), when it has one.
pub(crate) fn note_remaining(provider: &'static str, headers: &HeaderMap, header: &str) {
    let remaining = headers
        .get(header)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(n) = remaining {
        metrics::gauge!(metric::PROVIDER_BUDGET_REMAINING, "provider" => provider).set(n as f64);
    }
}
