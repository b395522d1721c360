//! The Prometheus recorder behind `/metrics`, and the metrics of the HTTP
//! layer. Which metrics exist (names, help, buckets) is
//! `stitch_core::metric`; this module describes them all, gives each
//! histogram its buckets, starts the configuration's series at zero and
//! reads the database-backed gauges when scraped.
//!
//! Each router builds its own Prometheus recorder. The first one in the
//! process also becomes the global `metrics` recorder, so metrics that
//! other parts of stitch record with the `metrics` macros show up on
//! `/metrics` too; later routers (tests start several servers in one
//! process) keep their recorder local and record through it, so nothing
//! panics and each server counts only its own requests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use metrics::{Gauge, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use stitch_core::metric::{self, MetricKind};

use crate::state::{topics, AppState};

/// Requests answered, by `method` (a standard method or `other`), `route`
/// (the route pattern, `unmatched` for unknown paths) and `status`.
pub(crate) const REQUESTS: &str = metric::HTTP_REQUESTS;
/// Time to the response head, by `method` and `route`.
pub(crate) const DURATION: &str = metric::HTTP_REQUEST_DURATION;
/// Event and log streams open now, by `stream` (`events`, `logs`) and
/// `transport` (`sse`, `websocket`).
pub(crate) const STREAMS: &str = metric::HTTP_STREAMS;

/// The least time between two reads of the database-backed gauges
/// ([`Metrics::refresh`]): scrapes closer together reuse the last values,
/// so hammering `/metrics` cannot turn into a query storm.
const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// How long a scrape waits for the database-backed gauges: past it the
/// scrape answers with the last values, so a database outage shows as
/// stale gauges (and `/readyz` failing), not as a server that stopped
/// answering `/metrics`.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(2);

/// One router's metrics: where they are recorded and how they render.
#[derive(Clone)]
pub(crate) struct Metrics {
    handle: PrometheusHandle,
    /// `None` when this router's recorder is the global one.
    local: Option<Arc<PrometheusRecorder>>,
    /// When the database-backed gauges were last read.
    refreshed: Arc<tokio::sync::Mutex<Option<Instant>>>,
}

impl Metrics {
    /// Builds a recorder and installs it globally if no global recorder
    /// exists yet; never panics. Every metric of [`metric::ALL`] is
    /// described and every histogram gets its buckets; the series whose
    /// label values follow from `state`'s configuration start at zero, so
    /// `rate()` and alerts see them before their first event.
    pub(crate) fn install(state: &AppState) -> Self {
        let mut builder = PrometheusBuilder::new();
        for m in metric::ALL.iter().filter(|m| !m.buckets.is_empty()) {
            builder = match builder.set_buckets_for_metric(Matcher::Full(m.name.into()), m.buckets)
            {
                Ok(b) => b,
                // Only empty bucket lists are refused, and those were
                // filtered out above.
                Err(_) => PrometheusBuilder::new(),
            };
        }
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let local = match metrics::set_global_recorder(recorder) {
            Ok(()) => None,
            Err(e) => Some(Arc::new(e.into_inner())),
        };
        let m = Self {
            handle,
            local,
            refreshed: Arc::default(),
        };
        m.describe();
        m.start_at_zero(state);
        m
    }

    /// Runs `f` with this router's recorder as the current one.
    pub(crate) fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.local {
            Some(rec) => metrics::with_local_recorder(rec.as_ref() as &dyn Recorder, f),
            None => f(),
        }
    }

    fn describe(&self) {
        self.with(|| {
            for m in metric::ALL {
                match m.kind {
                    MetricKind::Counter => metrics::describe_counter!(m.name, m.help),
                    MetricKind::Gauge => metrics::describe_gauge!(m.name, m.help),
                    MetricKind::Histogram => metrics::describe_histogram!(m.name, m.help),
                }
            }
        });
    }

    /// Registers the series whose label values are known from the
    /// configuration: per-queue histograms, stage and retention outcomes,
    /// the configured providers' rate-limit pauses and webhook outcomes.
    fn start_at_zero(&self, state: &AppState) {
        self.with(|| {
            for stage in ["trigger", "signal"] {
                for outcome in metric::STAGE_OUTCOME_VALUES {
                    metrics::counter!(metric::STAGE_OUTCOMES, "stage" => stage, "outcome" => outcome)
                        .absolute(0);
                }
            }
            for outcome in ["ran", "lease_held", "failed"] {
                metrics::counter!(metric::RETENTION_PASSES, "outcome" => outcome).absolute(0);
            }
            for kind in [
                "builds",
                "events",
                "log_lines",
                "queue_messages",
                "dead_letters",
                "local_states",
            ] {
                metrics::counter!(metric::RETENTION_PRUNED, "kind" => kind).absolute(0);
            }
            let mut providers = std::collections::BTreeSet::new();
            for q in state.build_queues() {
                let queue = q.name.clone();
                // Registering the series is the point: an empty histogram
                // renders with zero buckets.
                for outcome in metric::BUILD_OUTCOME_VALUES {
                    let _ = metrics::histogram!(metric::BUILD_DURATION, "queue" => queue.clone(), "outcome" => outcome);
                }
                let _ = metrics::histogram!(metric::BUILD_QUEUED, "queue" => queue.clone());
                let _ = metrics::histogram!(metric::POLL_LAG, "queue" => queue);
                if matches!(q.runner_name, "buildkite" | "github" | "gitlab" | "jenkins") {
                    providers.insert(q.runner_name);
                }
            }
            for provider in providers {
                metrics::counter!(metric::PROVIDER_RATE_LIMIT_PAUSES, "provider" => provider)
                    .absolute(0);
            }
            let mut hooks = Vec::new();
            if !state.buildkite_webhooks().is_empty() {
                hooks.push("buildkite");
            }
            if state.github_webhooks().is_some() {
                hooks.push("github");
            }
            if !state.gitlab_webhooks().is_empty() {
                hooks.push("gitlab");
            }
            for provider in hooks {
                for outcome in metric::WEBHOOK_OUTCOME_VALUES {
                    metrics::counter!(metric::WEBHOOK_DELIVERIES, "provider" => provider, "outcome" => outcome)
                        .absolute(0);
                }
            }
        });
    }

    /// Reads the gauges that come from the database — builds per queue and
    /// status, messages pending and dead letters per stage topic — at most
    /// once per [`REFRESH_EVERY`]. Three cheap reads per scrape (the open
    /// builds' grouped count on its index, one count per topic) instead of
    /// keeping counters right across processes sharing the database: every
    /// server reports the same database-wide values. A failed read, or one
    /// slower than [`REFRESH_TIMEOUT`], keeps the last values and is logged.
    pub(crate) async fn refresh(&self, state: &AppState) {
        if tokio::time::timeout(REFRESH_TIMEOUT, self.read_gauges(state))
            .await
            .is_err()
        {
            tracing::warn!("metrics: the database did not answer in time; serving the last values");
        }
    }

    async fn read_gauges(&self, state: &AppState) {
        let mut last = self.refreshed.lock().await;
        if last.is_some_and(|at| at.elapsed() < REFRESH_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        match state.store().open_build_counts().await {
            Ok(counts) => self.with(|| {
                for q in state.build_queues() {
                    for status in metric::OPEN_STATUS_VALUES {
                        let n: u64 = counts
                            .iter()
                            .filter(|c| c.queue == q.name && c.status.as_str() == status)
                            .map(|c| c.count)
                            .sum();
                        metrics::gauge!(metric::BUILDS, "queue" => q.name.clone(), "status" => status)
                            .set(n as f64);
                    }
                }
            }),
            Err(e) => tracing::warn!(error = %e, "metrics: counting open builds failed"),
        }
        let admin = state.queue().admin();
        for (topic, group) in [
            (topics::TRIGGER, crate::stages::TRIGGER_GROUP),
            (topics::SIGNAL, crate::stages::SIGNAL_GROUP),
        ] {
            match admin.stats(topic, group).await {
                Ok(stats) => self.with(|| {
                    metrics::gauge!(metric::QUEUE_DEPTH, "topic" => topic)
                        .set(stats.pending as f64);
                    metrics::gauge!(metric::DEAD_LETTERS, "topic" => topic)
                        .set(stats.dead_letters as f64);
                }),
                Err(e) => {
                    tracing::warn!(topic, error = %e, "metrics: reading the queue's counts failed")
                }
            }
        }
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }

    fn record(&self, method: &str, route: &str, status: u16, secs: f64) {
        let (method, route) = (method.to_string(), route.to_string());
        self.with(|| {
            metrics::counter!(
                REQUESTS,
                "method" => method.clone(),
                "route" => route.clone(),
                "status" => status.to_string()
            )
            .increment(1);
            metrics::histogram!(DURATION, "method" => method, "route" => route).record(secs);
        });
    }

    /// Counts one open stream until the guard is dropped.
    pub(crate) fn stream(&self, stream: &'static str, transport: &'static str) -> StreamGuard {
        let gauge =
            self.with(|| metrics::gauge!(STREAMS, "stream" => stream, "transport" => transport));
        gauge.increment(1.0);
        StreamGuard(gauge)
    }
}

/// Decrements the open-streams gauge when dropped.
pub(crate) struct StreamGuard(Gauge);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// The `method` label: the standard methods by name, anything else
/// `other`. Clients choose the method, so taking it verbatim would let them
/// mint one series per invented method.
fn method_label(method: &Method) -> &'static str {
    const STANDARD: [Method; 9] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
        Method::CONNECT,
        Method::TRACE,
    ];
    STANDARD
        .iter()
        .find(|m| *m == method)
        .map_or("other", |m| m.as_str())
}

/// The `route` label for requests no route matched.
const UNMATCHED: &str = "unmatched";

/// Middleware: counts every request by method, route and status. Every
/// label value comes from a fixed set: the standard methods (else `other`),
/// the router's route templates (else `unmatched`), the statuses stitch
/// answers.
pub(crate) async fn track(State(m): State<Metrics>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED.to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    m.record(
        method,
        &route,
        resp.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    resp
}
