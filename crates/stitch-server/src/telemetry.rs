//! Where the service's traces go: log lines (text or JSON) on standard
//! output, filtered by `STITCH_LOG` or `RUST_LOG`, and, when `[telemetry.otlp]`
//! is configured, every span exported over OTLP (http/protobuf).
//!
//! The spans themselves are opened where the work happens: one per HTTP
//! request ([`crate::http`]), one per stage delivery ([`crate::consumer`]).

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LogFormat, OtlpConfig};

/// The filter variables, in the order they are consulted: the first one set
/// (and not empty) decides, so `STITCH_LOG` wins over `RUST_LOG`.
pub const FILTER_VARS: [&str; 2] = ["STITCH_LOG", "RUST_LOG"];

/// The filter of the service when neither variable is set.
pub const DEFAULT_FILTER: &str = "info,sqlx=warn";

/// The path OTLP/HTTP collectors take traces on, appended to the endpoint.
const TRACES_PATH: &str = "/v1/traces";

/// How long shutting down waits for the last spans to be sent.
const EXPORT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter refused its configuration.
    #[error("telemetry.otlp: cannot set up the exporter: {0}")]
    Exporter(String),
}

/// What [`init`] set up; [`Telemetry::shutdown`] sends the spans still
/// buffered.
#[must_use = "dropping it without shutdown loses the last spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the OTLP exporter (if any). Blocks on the export:
    /// call it outside the async runtime or through `spawn_blocking`.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown_with_timeout(EXPORT_SHUTDOWN_TIMEOUT) {
                eprintln!("stitch: telemetry.otlp: the last spans were not sent: {e}");
            }
        }
    }
}

/// The log filter: the first of [`FILTER_VARS`] that is set, else
/// `default`. A directive that does not parse is reported on stderr and
/// `default` applies (the service still starts, with its usual logs).
pub fn filter_from_env(default: &str) -> EnvFilter {
    for var in FILTER_VARS {
        let Ok(value) = std::env::var(var) else {
            continue;
        };
        if value.trim().is_empty() {
            continue;
        }
        return match EnvFilter::try_new(&value) {
            Ok(filter) => filter,
            Err(e) => {
                eprintln!("stitch: ignoring {var}={value:?} ({e}); logging {default:?}");
                EnvFilter::new(default)
            }
        };
    }
    EnvFilter::new(default)
}

/// Installs the global subscriber: `format` lines on `writer`, filtered by
/// [`filter_from_env`] (`default_filter` when unset), and spans exported
/// to `otlp` when given. A second call leaves the first subscriber in place.
pub fn init<W>(
    format: LogFormat,
    otlp: Option<&OtlpConfig>,
    default_filter: &str,
    writer: W,
) -> Result<Telemetry, TelemetryError>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = Vec::new();
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_target(false);
    layers.push(match format {
        LogFormat::Text => lines.boxed(),
        // Each line one JSON object: the event's fields, the current span
        // and the whole span stack (so a stage's line names its build).
        LogFormat::Json => lines
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
    });
    let provider = match otlp {
        Some(cfg) => {
            let provider = tracer_provider(cfg)?;
            let tracer = provider.tracer("stitch");
            layers.push(tracing_opentelemetry::layer().with_tracer(tracer).boxed());
            Some(provider)
        }
        None => None,
    };
    let _ = tracing_subscriber::registry()
        .with(layers)
        .with(filter_from_env(default_filter))
        .try_init();
    Ok(Telemetry { provider })
}

/// The OTLP URL spans are posted to: `endpoint` with `/v1/traces`
/// appended (unless it already ends so).
pub fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with(TRACES_PATH) {
        base.to_string()
    } else {
        format!("{base}{TRACES_PATH}")
    }
}

fn tracer_provider(cfg: &OtlpConfig) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(traces_url(&cfg.endpoint))
        .with_timeout(cfg.timeout)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let resource = Resource::builder()
        .with_service_name(cfg.service_name.clone())
        .build();
    // The batch processor exports from a thread of its own, so a slow
    // collector never holds up a request or a stage.
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_url_appends_the_signal_path_once() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://c.example/otlp/v1/traces"),
            "https://c.example/otlp/v1/traces"
        );
    }
}
