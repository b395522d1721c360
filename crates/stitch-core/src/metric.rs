//! The Prometheus metrics stitch exports on `/metrics`: their names, kinds,
//! labels, help texts and histogram buckets, listed once. The server
//! describes and configures every metric from [`ALL`]; the crates that
//! record them use the name constants; `docs/operations.md`, the Grafana
//! dashboard and the alert rules under `deploy/` are checked against it by
//! tests (`stitch-server/tests/metrics_exported.rs`).
//!
//! Conventions: the unit is in the name (`_seconds`, `_bytes`), counters
//! end in `_total`, and every label takes its values from a bounded set
//! (configured queue names, fixed outcome names, HTTP status codes) —
//! never a build id, a URL or anything a client chooses freely.

/// What kind of Prometheus metric a [`MetricSpec`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up (resets when the process restarts).
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// Observations counted into [`MetricSpec::buckets`].
    Histogram,
}

impl MetricKind {
    /// The name Prometheus' `# TYPE` line uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// One exported metric.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MetricSpec {
    /// The metric's name, as rendered.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// Its label names (values come from bounded sets, see the module docs).
    pub labels: &'static [&'static str],
    /// The `# HELP` text.
    pub help: &'static str,
    /// Upper bounds of the buckets (histograms only; empty otherwise).
    pub buckets: &'static [f64],
}

/// HTTP requests answered, by `method`, `route` (the template) and `status`.
pub const HTTP_REQUESTS: &str = "stitch_http_requests_total";
/// Time from request to response head, by `method` and `route`.
pub const HTTP_REQUEST_DURATION: &str = "stitch_http_request_duration_seconds";
/// Event and log streams open now, by `stream` and `transport`.
pub const HTTP_STREAMS: &str = "stitch_http_streams_active";
/// Builds not yet finished, by `queue` and `status`.
pub const BUILDS: &str = "stitch_builds";
/// Accept to terminal status, by `queue` and `outcome`.
pub const BUILD_DURATION: &str = "stitch_build_duration_seconds";
/// Accept to running, by `queue`.
pub const BUILD_QUEUED: &str = "stitch_build_queued_seconds";
/// How late a status poll ran against its cadence, by `queue`.
pub const POLL_LAG: &str = "stitch_poll_lag_seconds";
/// Stage deliveries by `stage` and `outcome`.
pub const STAGE_OUTCOMES: &str = "stitch_stage_outcomes_total";
/// Messages not yet done, by `topic`.
pub const QUEUE_DEPTH: &str = "stitch_queue_depth";
/// Dead letters stored, by `topic`.
pub const DEAD_LETTERS: &str = "stitch_dead_letters";
/// Provider API requests by `provider`, `operation` and `status`.
pub const PROVIDER_REQUESTS: &str = "stitch_provider_requests_total";
/// Provider API request time by `provider` and `operation`.
pub const PROVIDER_REQUEST_DURATION: &str = "stitch_provider_request_duration_seconds";
/// Rate-limit pauses by `provider`.
pub const PROVIDER_RATE_LIMIT_PAUSES: &str = "stitch_provider_rate_limit_pauses_total";
/// Requests left in the provider's rate-limit window, by `provider`.
pub const PROVIDER_BUDGET_REMAINING: &str = "stitch_provider_budget_remaining";
/// Webhook deliveries by `provider` and `outcome`.
pub const WEBHOOK_DELIVERIES: &str = "stitch_webhook_deliveries_total";
/// Store writes per transaction.
pub const STORE_GROUP_COMMIT_JOBS: &str = "stitch_store_group_commit_jobs";
/// Rows deleted by retention, by `kind`.
pub const RETENTION_PRUNED: &str = "stitch_retention_pruned_total";
/// Retention passes by `outcome`.
pub const RETENTION_PASSES: &str = "stitch_retention_passes_total";
/// The oldest event still stored.
pub const EVENTS_OLDEST_RETAINED_SEQ: &str = "stitch_events_oldest_retained_seq";
/// The database's size.
pub const DATABASE_SIZE: &str = "stitch_database_size_bytes";

/// Label values of [`STAGE_OUTCOMES`]'s `outcome`.
pub const STAGE_OUTCOME_VALUES: [&str; 5] =
    ["ack", "hold", "retry", "dead_letter", "give_up_failed"];
/// Label values of [`WEBHOOK_DELIVERIES`]'s `outcome`.
pub const WEBHOOK_OUTCOME_VALUES: [&str; 8] = [
    "woken",
    "ignored",
    "duplicate",
    "bad_signature",
    "malformed",
    "too_large",
    "not_configured",
    "failed",
];
/// Label values of [`BUILD_DURATION`]'s `outcome`: the terminal statuses.
pub const BUILD_OUTCOME_VALUES: [&str; 3] = ["succeeded", "failed", "cancelled"];
/// Label values of [`BUILDS`]'s `status`: the statuses a build can wait in.
pub const OPEN_STATUS_VALUES: [&str; 3] = ["accepted", "running", "unknown"];
/// The `status` label of [`PROVIDER_REQUESTS`] for a request that got no
/// answer (connect failure, timeout, reset); answered ones carry the HTTP
/// status code.
pub const TRANSPORT_ERROR: &str = "transport_error";

/// CI builds: a second to two hours.
const BUILD_BUCKETS: [f64; 13] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 2700.0, 3600.0, 7200.0,
];
/// Waiting for a provider to start a build: a tenth of a second to an hour.
const QUEUED_BUCKETS: [f64; 13] = [
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];
/// Poll lateness: on time is milliseconds, a backed-up stage is minutes.
const LAG_BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Vendor API calls, rate-limit waits inside a call included.
const PROVIDER_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
];
/// Stitch's own HTTP answers.
const HTTP_BUCKETS: [f64; 11] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Writes sharing one store transaction.
const GROUP_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

const fn counter(
    name: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
) -> MetricSpec {
    MetricSpec {
        name,
        kind: MetricKind::Counter,
        labels,
        help,
        buckets: &[],
    }
}

const fn gauge(
    name: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
) -> MetricSpec {
    MetricSpec {
        name,
        kind: MetricKind::Gauge,
        labels,
        help,
        buckets: &[],
    }
}

const fn histogram(
    name: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
    buckets: &'static [f64],
) -> MetricSpec {
    MetricSpec {
        name,
        kind: MetricKind::Histogram,
        labels,
        help,
        buckets,
    }
}

/// Every metric stitch exports.
pub const ALL: &[MetricSpec] = &[
    counter(
        HTTP_REQUESTS,
        &["method", "route", "status"],
        "HTTP requests answered, by method, route template and status",
    ),
    histogram(
        HTTP_REQUEST_DURATION,
        &["method", "route"],
        "Time from an HTTP request to its response head",
        &HTTP_BUCKETS,
    ),
    gauge(
        HTTP_STREAMS,
        &["stream", "transport"],
        "Event and log streams open now",
    ),
    gauge(
        BUILDS,
        &["queue", "status"],
        "Builds not yet finished, by queue and status (read from the database when scraped)",
    ),
    histogram(
        BUILD_DURATION,
        &["queue", "outcome"],
        "Time from a build's acceptance to its terminal status",
        &BUILD_BUCKETS,
    ),
    histogram(
        BUILD_QUEUED,
        &["queue"],
        "Time from a build's acceptance to its first running status",
        &QUEUED_BUCKETS,
    ),
    histogram(
        POLL_LAG,
        &["queue"],
        "How much later than its poll delay a status poll ran",
        &LAG_BUCKETS,
    ),
    counter(
        STAGE_OUTCOMES,
        &["stage", "outcome"],
        "Stage deliveries by stage and outcome",
    ),
    gauge(
        QUEUE_DEPTH,
        &["topic"],
        "Stage messages not yet done, by topic (read from the database when scraped)",
    ),
    gauge(
        DEAD_LETTERS,
        &["topic"],
        "Dead letters stored, by topic (read from the database when scraped)",
    ),
    counter(
        PROVIDER_REQUESTS,
        &["provider", "operation", "status"],
        "Provider API requests (each attempt), by provider, operation and HTTP status",
    ),
    histogram(
        PROVIDER_REQUEST_DURATION,
        &["provider", "operation"],
        "Time of one provider API request attempt",
        &PROVIDER_BUCKETS,
    ),
    counter(
        PROVIDER_RATE_LIMIT_PAUSES,
        &["provider"],
        "Times a provider's rate limit paused every request of its scope",
    ),
    gauge(
        PROVIDER_BUDGET_REMAINING,
        &["provider"],
        "Requests left in the provider's rate-limit window, as its last answer reported",
    ),
    counter(
        WEBHOOK_DELIVERIES,
        &["provider", "outcome"],
        "Webhook deliveries received, by provider and outcome",
    ),
    histogram(
        STORE_GROUP_COMMIT_JOBS,
        &[],
        "Store writes that shared one transaction",
        &GROUP_BUCKETS,
    ),
    counter(
        RETENTION_PRUNED,
        &["kind"],
        "Rows (or directories) retention deleted, by kind",
    ),
    counter(
        RETENTION_PASSES,
        &["outcome"],
        "Retention passes by outcome",
    ),
    gauge(
        EVENTS_OLDEST_RETAINED_SEQ,
        &[],
        "The oldest event still stored (set after a retention pass)",
    ),
    gauge(
        DATABASE_SIZE,
        &[],
        "The database's size in bytes (set after a retention pass)",
    ),
];

/// The metric named `name`.
pub fn find(name: &str) -> Option<&'static MetricSpec> {
    ALL.iter().find(|m| m.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions() {
        let mut seen = std::collections::BTreeSet::new();
        for m in ALL {
            assert!(seen.insert(m.name), "{} listed twice", m.name);
            assert!(m.name.starts_with("stitch_"), "{}", m.name);
            assert_eq!(
                m.kind == MetricKind::Counter,
                m.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                m.name
            );
            assert_eq!(
                m.kind == MetricKind::Histogram,
                !m.buckets.is_empty(),
                "{}: every histogram has buckets, nothing else has",
                m.name
            );
            assert!(
                m.buckets.windows(2).all(|w| w[0] < w[1]),
                "{}: buckets ascend",
                m.name
            );
            assert!(!m.help.is_empty(), "{}", m.name);
            for label in m.labels {
                let unbounded = ["id", "url", "uri", "path", "head", "build"];
                assert!(
                    !label.split('_').any(|word| unbounded.contains(&word)),
                    "{}: label {label} looks unbounded",
                    m.name
                );
            }
        }
    }
}
