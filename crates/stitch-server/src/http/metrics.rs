//! Prometheus metrics for the HTTP layer.
//!
//! Each router builds its own Prometheus recorder. The first one in the
//! process also becomes the global `metrics` recorder, so metrics that
//! other parts of stitch record with the `metrics` macros show up on
//! `/metrics` too; later routers (tests start several servers in one
//! process) keep their recorder local and record through it, so nothing
//! panics and each server counts only its own requests.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use metrics::{Gauge, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Requests answered, by `method` (a standard method or `other`), `route`
/// (the route pattern, `unmatched` for unknown paths) and `status`.
pub(crate) const REQUESTS: &str = "stitch_http_requests_total";
/// Time to the response head, by `method` and `route`.
pub(crate) const DURATION: &str = "stitch_http_request_duration_seconds";
/// Event and log streams open now, by `stream` (`events`, `logs`) and
/// `transport` (`sse`, `websocket`).
pub(crate) const STREAMS: &str = "stitch_http_streams_active";

const BUCKETS: [f64; 11] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// One router's metrics: where they are recorded and how they render.
#[derive(Clone)]
pub(crate) struct Metrics {
    handle: PrometheusHandle,
    /// `None` when this router's recorder is the global one.
    local: Option<Arc<PrometheusRecorder>>,
}

impl Metrics {
    /// Builds a recorder and installs it globally if no global recorder
    /// exists yet; never panics.
    pub(crate) fn install() -> Self {
        let builder = PrometheusBuilder::new();
        let builder = match builder.set_buckets_for_metric(Matcher::Full(DURATION.into()), &BUCKETS)
        {
            Ok(b) => b,
            Err(_) => PrometheusBuilder::new(),
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let local = match metrics::set_global_recorder(recorder) {
            Ok(()) => None,
            Err(e) => Some(Arc::new(e.into_inner())),
        };
        let m = Self { handle, local };
        m.describe();
        m
    }

    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.local {
            Some(rec) => metrics::with_local_recorder(rec.as_ref() as &dyn Recorder, f),
            None => f(),
        }
    }

    fn describe(&self) {
        self.with(|| {
            metrics::describe_counter!(REQUESTS, "HTTP requests answered");
            metrics::describe_histogram!(
                DURATION,
                metrics::Unit::Seconds,
                "Time from request to response head"
            );
            metrics::describe_gauge!(STREAMS, "Event and log streams open now");
        });
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
