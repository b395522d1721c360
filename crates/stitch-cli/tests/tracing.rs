//! Tracing of a real `stitch serve`: JSON log lines that carry a build's id
//! through its whole life, request ids, the log filter variables, the
//! OTLP span export (to a receiver inside the test), secrets kept out of
//! the logs, and telemetry configuration problems.

mod support;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use parking_lot::Mutex;
use prost::Message;
use serde_json::Value;
use support::serve::{Serve, STITCH};

/// The bearer token the servers of these tests accept; it must appear in
/// no log line.
const TOKEN: &str = "tok-3f9c1e7a-never-in-a-log";

fn config(extra: &str) -> String {
    format!(
        r#"data_dir = "{{data}}"
[api]
tokens_env = ["TRACING_TEST_TOKEN"]
[queues.default]
runner = "fake"
poll = {{ accepted = "100ms", running = "100ms" }}
fake = {{ accept_delay = "100ms", run_duration = "300ms" }}
{extra}"#
    )
}

/// A client that sends the API token on every request.
fn authorized() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        header::AUTHORIZATION,
        format!("Bearer {TOKEN}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// Stops the server with SIGTERM and waits until it exited: its log and
/// its exporter are flushed then.
fn stop(server: &mut Serve) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit: {status:?}\n{}", server.log());
}

/// The build id a JSON log line names: in its fields, its current span or
/// any span around it.
fn build_id_of(line: &Value) -> Option<&str> {
    let spans = line["spans"].as_array().into_iter().flatten();
    std::iter::once(&line["fields"])
        .chain(std::iter::once(&line["span"]))
        .chain(spans)
        .find_map(|v| v["build_id"].as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_carry_the_build_id_through_its_life() {
    let mut server = Serve::start_with_args(
        STITCH,
        &config(""),
        &[
            ("TRACING_TEST_TOKEN", TOKEN),
            // Every line the service writes, request lines included.
            ("STITCH_LOG", "debug,sqlx=warn"),
        ],
        &["--log-format", "json"],
    )
    .await;
    let http = authorized();
    let id = server.create(&http, "default", "change/1").await;
    server.wait_status(&http, &id, "succeeded").await;
    stop(&mut server);

    let out = server.stdout();
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}\n{out}")))
        .collect();
    let of_build: Vec<&Value> = lines
        .iter()
        .filter(|l| build_id_of(l) == Some(id.as_str()))
        .collect();
    let messages: Vec<&str> = of_build
        .iter()
        .filter_map(|l| l["fields"]["message"].as_str())
        .collect();
    // Create, the trigger stage, the poll loop, the terminal status.
    for wanted in [
        "build created",
        "build triggered on the provider",
        "build status changed",
    ] {
        assert!(
            messages.contains(&wanted),
            "{wanted:?} not in {messages:?}\n{out}"
        );
    }
    let stages: Vec<&str> = of_build
        .iter()
        .filter(|l| l["span"]["name"] == "stage_delivery")
        .filter_map(|l| l["span"]["stage"].as_str())
        .collect();
    assert!(stages.contains(&"trigger"), "{stages:?}");
    assert!(stages.contains(&"signal"), "{stages:?}");
    let terminal = of_build
        .iter()
        .find(|l| l["fields"]["status"] == "succeeded")
        .unwrap_or_else(|| panic!("no terminal line for {id}\n{out}"));
    assert_eq!(terminal["span"]["queue"], "default");
    assert!(terminal["span"]["attempt"].as_u64().is_some());
    // The create request's span names the route template and the build.
    let create = of_build
        .iter()
        .find(|l| l["span"]["name"] == "request" && l["span"]["status"] == 202)
        .unwrap_or_else(|| panic!("no request line with status 202 for {id}\n{out}"));
    assert_eq!(create["span"]["route"], "/v1/queues/{queue}/builds");
    assert_eq!(create["span"]["method"], "POST");
    assert!(create["span"]["request_id"].as_str().is_some());
    // Requests went with the token in `Authorization`; it is nowhere.
    assert!(!out.contains(TOKEN), "the API token was logged:\n{out}");
    assert!(!server.log().contains(TOKEN), "the API token was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_is_echoed_or_generated() {
    let server = Serve::start(STITCH, &config(""), &[("TRACING_TEST_TOKEN", TOKEN)]).await;
    let http = authorized();
    let given = http
        .get(format!("{}/v1/builds", server.base))
        .header("x-request-id", "req-from-the-caller-42")
        .send()
        .await
        .unwrap();
    assert_eq!(given.status(), 200);
    assert_eq!(given.headers()["x-request-id"], "req-from-the-caller-42");
    // Without one, each answer carries a new id; errors too.
    let mut ids = Vec::new();
    for path in ["/v1/builds", "/v1/builds/b_nope", "/no/such/route"] {
        let r = http
            .get(format!("{}{path}", server.base))
            .send()
            .await
            .unwrap();
        let id = r
            .headers()
            .get("x-request-id")
            .unwrap_or_else(|| panic!("{path}: no x-request-id"))
            .to_str()
            .unwrap()
            .to_string();
        assert!(!id.is_empty(), "{path}");
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "{ids:?}");
}

/// Whether a server started with these filter variables wrote the debug
/// line of a request (the text format).
async fn logs_requests_at_debug(env: &[(&str, &str)]) -> bool {
    let mut all = vec![("TRACING_TEST_TOKEN", TOKEN)];
    all.extend_from_slice(env);
    let mut server = Serve::start(STITCH, &config(""), &all).await;
    let r = authorized()
        .get(format!("{}/v1/builds", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    stop(&mut server);
    let out = server.stdout();
    assert!(
        !out.trim_start().starts_with('{'),
        "text lines expected:\n{out}"
    );
    out.contains("answered")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_is_honoured_and_stitch_log_wins() {
    // The harness sets STITCH_LOG=warn; empty counts as unset.
    assert!(logs_requests_at_debug(&[("STITCH_LOG", ""), ("RUST_LOG", "debug")]).await);
    assert!(!logs_requests_at_debug(&[("STITCH_LOG", "info"), ("RUST_LOG", "debug")]).await);
    assert!(logs_requests_at_debug(&[("STITCH_LOG", "debug"), ("RUST_LOG", "warn")]).await);
}

/// An OTLP/HTTP collector on loopback: keeps every span it is sent.
struct Receiver {
    url: String,
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

async fn receive(
    State(requests): State<Arc<Mutex<Vec<ExportTraceServiceRequest>>>>,
    body: Bytes,
) -> ([(header::HeaderName, &'static str); 1], Vec<u8>) {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
    requests.lock().push(request);
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

async fn receiver() -> Receiver {
    let requests = Arc::new(Mutex::new(Vec::new()));
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(receive))
        .with_state(requests.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Receiver { url, requests }
}

fn attribute<'s>(span: &'s Span, key: &str) -> Option<&'s AnyValue> {
    span.attributes
        .iter()
        .find(|KeyValue { key: k, .. }| k == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn string_attribute<'s>(span: &'s Span, key: &str) -> Option<&'s str> {
    match attribute(span, key) {
        Some(AnyValue::StringValue(s)) => Some(s),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_with_the_build_id() {
    let receiver = receiver().await;
    let extra = format!(
        "[telemetry.otlp]\nendpoint = \"{}\"\nservice_name = \"stitch-under-test\"\n",
        receiver.url
    );
    let mut server = Serve::start(
        STITCH,
        &config(&extra),
        &[("TRACING_TEST_TOKEN", TOKEN), ("STITCH_LOG", "info")],
    )
    .await;
    let http = authorized();
    let id = server.create(&http, "default", "change/1").await;
    server.wait_status(&http, &id, "succeeded").await;
    // Shutting down sends what the batch still holds.
    stop(&mut server);

    let requests = receiver.requests.lock();
    let mut services = Vec::new();
    let mut spans = Vec::new();
    for resource_spans in requests.iter().flat_map(|r| &r.resource_spans) {
        if let Some(resource) = &resource_spans.resource {
            for kv in &resource.attributes {
                if kv.key == "service.name" {
                    services.push(format!("{:?}", kv.value));
                }
            }
        }
        for scope in &resource_spans.scope_spans {
            spans.extend(scope.spans.iter().cloned());
        }
    }
    assert!(
        services.iter().all(|s| s.contains("stitch-under-test")) && !services.is_empty(),
        "{services:?}"
    );
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let of_build: Vec<&Span> = spans
        .iter()
        .filter(|s| string_attribute(s, "build_id") == Some(id.as_str()))
        .collect();
    let create = of_build
        .iter()
        .find(|s| s.name == "POST /v1/queues/{queue}/builds")
        .unwrap_or_else(|| panic!("no create request span for {id}: {names:?}"));
    assert_eq!(
        string_attribute(create, "route"),
        Some("/v1/queues/{queue}/builds")
    );
    assert!(
        matches!(attribute(create, "status"), Some(AnyValue::IntValue(202))),
        "{create:?}"
    );
    assert!(string_attribute(create, "request_id").is_some());
    for stage in ["trigger", "signal"] {
        let delivery = of_build
            .iter()
            .find(|s| string_attribute(s, "stage") == Some(stage))
            .unwrap_or_else(|| panic!("no {stage} delivery span for {id}: {names:?}"));
        assert_eq!(string_attribute(delivery, "queue"), Some("default"));
        assert!(matches!(
            attribute(delivery, "attempt"),
            Some(AnyValue::IntValue(n)) if *n >= 1
        ));
    }
    // No span carries the token, whatever its attribute.
    let everything = format!("{spans:?}");
    assert!(!everything.contains(TOKEN), "the API token was exported");
}

fn config_check(config: &str, env: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stitch.toml");
    std::fs::write(&path, config.replace("{data}", "/nonexistent-data")).unwrap();
    let mut cmd = std::process::Command::new(STITCH);
    cmd.args(["config", "check", "--config"])
        .arg(&path)
        .env("TRACING_TEST_TOKEN", TOKEN);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn telemetry_problems_are_reported_with_their_keys() {
    let (code, text) = config_check(
        &config(
            "[telemetry]\nlog_format = \"yaml\"\n[telemetry.otlp]\nendpoint = \"collector:4318\"\nservice_name = \" \"\n",
        ),
        &[],
    );
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("telemetry.log_format"), "{text}");
    assert!(text.contains("text, json"), "{text}");
    assert!(text.contains("telemetry.otlp.endpoint"), "{text}");
    assert!(text.contains("telemetry.otlp.service_name"), "{text}");

    // A query (credentials, say) is refused and not echoed.
    let (code, text) = config_check(
        &config("[telemetry.otlp]\nendpoint = \"https://c.test:4318/?key=hush-hush\"\n"),
        &[],
    );
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("telemetry.otlp.endpoint"), "{text}");
    assert!(!text.contains("hush-hush"), "{text}");

    // The environment overrides the file, key by key, like every key.
    let (code, text) = config_check(
        &config("[telemetry]\nlog_format = \"json\"\n"),
        &[("STITCH_TELEMETRY__LOG_FORMAT", "xml")],
    );
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("telemetry.log_format") && text.contains("STITCH_TELEMETRY__LOG_FORMAT"),
        "{text}"
    );
    let (code, text) = config_check(
        &config("[telemetry]\nlog_format = \"json\"\n"),
        &[("STITCH_TELEMETRY__OTLP__ENDPOINT", "http://127.0.0.1:4318")],
    );
    assert_eq!(code, 0, "{text}");
}

#[test]
fn a_bad_log_format_flag_is_a_usage_error() {
    let out = std::process::Command::new(STITCH)
        .args(["--log-format", "yaml", "config", "check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--log-format"), "{err}");
}
