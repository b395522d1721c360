//! Property tests through a real server (HTTP on loopback, SQLite file):
//! arbitrary bytes and structured-but-wrong input at the request bodies,
//! query parameters, headers and webhooks clients can send. Every answer
//! must be a 4xx with the API's error shape (or a success for input that
//! happens to be valid), never a 5xx, and refused input changes nothing.
//! The parsers themselves get many more cases in their modules' unit
//! tests; these check the HTTP status mapping with fewer.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use reqwest::StatusCode;
use serde_json::{json, Value};
use stitch_server::config::{
    BuildkiteSection, Config, GithubWebhookSection, QueueConfig, RateLimitSection, RunnerSection,
    WebhookModeName, WebhookSection,
};
use stitch_server::http::{self, HttpOptions};
use stitch_server::state::AppState;

const BK_TOKEN_ENV: &str = "STITCH_ROBUSTNESS_TEST_BK_TOKEN";
const BK_HOOK_ENV: &str = "STITCH_ROBUSTNESS_TEST_BK_HOOK";
const GH_HOOK_ENV: &str = "STITCH_ROBUSTNESS_TEST_GH_HOOK";
const BK_SECRET: &str = "bk-webhook-secret";
const GH_SECRET: &str = "gh-webhook-secret";

struct Server {
    base: String,
    state: AppState,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

fn config(dir: &std::path::Path) -> Config {
    let mut queues = BTreeMap::new();
    queues.insert("default".to_string(), QueueConfig::default());
    queues.insert(
        "bk".to_string(),
        QueueConfig {
            runner: RunnerSection::Buildkite(BuildkiteSection {
                org: "acme".into(),
                pipeline: "app".into(),
                branch: "main".into(),
                commit: "HEAD".into(),
                allow_ref_override: false,
                token_env: BK_TOKEN_ENV.into(),
                // Nothing listens: no build here is ever triggered.
                api_url: "http://127.0.0.1:9".into(),
                rate_limit: RateLimitSection::default(),
                request_timeout: Duration::from_secs(1),
                log_poll: Duration::from_secs(2),
                max_log_bytes: 1024,
                webhook: Some(WebhookSection {
                    mode: WebhookModeName::Signature,
                    secret_env: BK_HOOK_ENV.into(),
                    max_age: Duration::from_secs(300),
                    poll: Duration::from_secs(60),
                }),
            }),
            ..QueueConfig::default()
        },
    );
    let mut config = Config {
        data_dir: dir.join("data"),
        queues,
        ..Config::default()
    };
    config.webhooks.github = Some(GithubWebhookSection {
        secret_env: GH_HOOK_ENV.into(),
        poll: Duration::from_secs(60),
    });
    config.api.max_body_bytes = 4096;
    config
}

async fn start() -> Server {
    // Variable names unique to this test binary; every test sets the same values.
    std::env::set_var(BK_TOKEN_ENV, "bk-api-token");
    std::env::set_var(BK_HOOK_ENV, BK_SECRET);
    std::env::set_var(GH_HOOK_ENV, GH_SECRET);
    let dir = tempfile::tempdir().unwrap();
    let state = AppState::open(config(dir.path())).await.unwrap();
    let router = http::router_with(state.clone(), Vec::new(), HttpOptions::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    state.set_bound_addr(addr);
    tokio::spawn(http::serve(listener, router, std::future::pending()));
    Server {
        base: format!("http://{addr}"),
        state,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
        _dir: dir,
    }
}

fn runner_config() -> RunnerConfig {
    RunnerConfig {
        cases: 64,
        failure_persistence: None,
        ..RunnerConfig::default()
    }
}

/// A multi-threaded runtime the proptest closures block on.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Arbitrary JSON with the keys the API's bodies have mixed in.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("head".to_string()),
        Just("base".to_string()),
        Just("metadata".to_string()),
        Just("idempotency_key".to_string()),
        Just("exit_status".to_string()),
        Just("reason".to_string()),
        "[a-z_]{0,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 5, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Every refusal is a 4xx in the API's error shape.
async fn assert_refused_cleanly(resp: reqwest::Response, what: &str) -> Result<u16, String> {
    let status = resp.status();
    if status.is_server_error() {
        return Err(format!("{what}: {status}: {:?}", resp.text().await));
    }
    if status.is_client_error() {
        let body: Value = resp
            .json()
            .await
            .map_err(|e| format!("{what}: {status} without a JSON body: {e}"))?;
        if !body["error"]["code"].is_string() || !body["error"]["message"].is_string() {
            return Err(format!("{what}: {status} without an error code: {body}"));
        }
    }
    Ok(status.as_u16())
}

#[test]
fn create_build_bodies_of_any_bytes_or_shape_are_4xx_and_change_nothing() {
    let rt = runtime();
    let s = rt.block_on(start());
    let url = format!("{}/v1/queues/default/builds", s.base);
    let accepted = std::sync::atomic::AtomicU64::new(0);
    let mut runner = TestRunner::new(runner_config());
    let bodies = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        (json_value(), json_value(), json_value(), json_value()).prop_map(|(h, b, m, k)| {
            serde_json::to_vec(&json!({"head": h, "base": b, "metadata": m, "idempotency_key": k}))
                .unwrap()
        }),
    ];
    runner
        .run(&bodies, |body| {
            rt.block_on(async {
                let resp = s
                    .http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let status = assert_refused_cleanly(resp, "create")
                    .await
                    .map_err(TestCaseError::fail)?;
                if status == 202 {
                    accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .unwrap();
    let filter = stitch_store::BuildFilter {
        limit: 200,
        ..Default::default()
    };
    let (builds, _) = rt
        .block_on(s.state.store().list_builds(&filter, None))
        .unwrap();
    assert_eq!(
        builds.len() as u64,
        accepted.into_inner(),
        "only accepted bodies made builds"
    );
}

#[test]
fn promise_failure_requests_of_any_shape_are_4xx() {
    let rt = runtime();
    let s = rt.block_on(start());
    let mut runner = TestRunner::new(runner_config());
    let cases = (
        prop_oneof![Just("b_01J0000000000000000000000".to_string()), ".{0,30}"],
        prop::option::of(".{0,60}"),
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
            (any::<i64>(), prop::option::of(".{0,50}")).prop_map(|(e, r)| {
                serde_json::to_vec(&json!({"exit_status": e, "reason": r})).unwrap()
            }),
        ],
    );
    runner
        .run(&cases, |(id, token, body)| {
            rt.block_on(async {
                let mut path = String::new();
                for b in id.bytes() {
                    // The id lands in the path: percent-encode all of it.
                    path.push_str(&format!("%{b:02X}"));
                }
                let mut req = s
                    .http
                    .post(format!("{}/v1/builds/{path}/promise-failure", s.base))
                    .header("content-type", "application/json")
                    .body(body);
                if let Some(t) = token.filter(|t| reqwest::header::HeaderValue::from_str(t).is_ok())
                {
                    req = req.header("authorization", format!("Bearer {t}"));
                }
                let resp = req.send().await.unwrap();
                let status = assert_refused_cleanly(resp, "promise-failure")
                    .await
                    .map_err(TestCaseError::fail)?;
                prop_assert!((400..500).contains(&status), "{status}");
                Ok(())
            })
        })
        .unwrap();
}

#[test]
fn stream_positions_of_any_text_are_400_or_a_stream() {
    let rt = runtime();
    let s = rt.block_on(start());
    let mut runner = TestRunner::new(runner_config());
    let cases = (
        prop::option::of(".{0,24}|[0-9]{1,24}"),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..24)),
    );
    runner
        .run(&cases, |(after, last_event_id)| {
            rt.block_on(async {
                let mut url = reqwest::Url::parse(&format!("{}/v1/events", s.base)).unwrap();
                if let Some(a) = &after {
                    url.query_pairs_mut().append_pair("after", a);
                }
                let mut req = s.http.get(url);
                let header = last_event_id
                    .as_deref()
                    .and_then(|v| reqwest::header::HeaderValue::from_bytes(v).ok());
                if let Some(v) = header.clone() {
                    req = req.header("last-event-id", v);
                }
                let resp = req.send().await.unwrap();
                let status = resp.status();
                // A 200 is an endless SSE stream: the status is all we read.
                if status == StatusCode::OK {
                    let header_ok = header.as_ref().is_none_or(|h| {
                        h.to_str()
                            .is_ok_and(|t| t.trim().is_empty() || t.trim().parse::<u64>().is_ok())
                    });
                    prop_assert!(header_ok, "a bad Last-Event-ID was taken: {header:?}");
                    return Ok(());
                }
                let status = assert_refused_cleanly(resp, "events")
                    .await
                    .map_err(TestCaseError::fail)?;
                prop_assert_eq!(status, 400);
                Ok(())
            })
        })
        .unwrap();
}

#[test]
fn webhooks_of_any_bytes_are_refused_with_4xx() {
    let rt = runtime();
    let s = rt.block_on(start());
    let mut runner = TestRunner::new(runner_config());
    let cases = (
        any::<bool>(),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..100)),
        prop::collection::vec(any::<u8>(), 0..512),
    );
    runner
        .run(&cases, |(buildkite, header, body)| {
            rt.block_on(async {
                let (path, name) = if buildkite {
                    ("/webhooks/buildkite", "x-buildkite-signature")
                } else {
                    ("/webhooks/github", "x-hub-signature-256")
                };
                let mut req = s.http.post(format!("{}{path}", s.base)).body(body);
                if let Some(v) = header
                    .as_deref()
                    .and_then(|v| reqwest::header::HeaderValue::from_bytes(v).ok())
                {
                    req = req.header(name, v);
                }
                let resp = req.send().await.unwrap();
                let status = assert_refused_cleanly(resp, path)
                    .await
                    .map_err(TestCaseError::fail)?;
                prop_assert_eq!(status, 401);
                Ok(())
            })
        })
        .unwrap();
}

#[test]
fn signed_webhooks_with_bodies_of_any_shape_are_400_or_ignored() {
    let rt = runtime();
    let s = rt.block_on(start());
    let mut runner = TestRunner::new(runner_config());
    let cases = (
        any::<bool>(),
        prop_oneof![
            Just("build.finished"),
            Just("workflow_run"),
            Just("workflow_job"),
            Just("ping")
        ],
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        ],
    );
    runner
        .run(&cases, |(buildkite, event, body)| {
            rt.block_on(async {
                let req = if buildkite {
                    let now = chrono::Utc::now().timestamp();
                    let signature =
                        stitch_runners::buildkite::webhook::sign(BK_SECRET.as_bytes(), now, &body);
                    s.http
                        .post(format!("{}/webhooks/buildkite", s.base))
                        .header("x-buildkite-event", event)
                        .header(
                            "x-buildkite-signature",
                            format!("timestamp={now},signature={signature}"),
                        )
                } else {
                    s.http
                        .post(format!("{}/webhooks/github", s.base))
                        .header("x-github-event", event)
                        .header(
                            "x-hub-signature-256",
                            stitch_runners::github::webhook::sign(GH_SECRET.as_bytes(), &body),
                        )
                };
                let resp = req.body(body).send().await.unwrap();
                let status = assert_refused_cleanly(resp, "signed webhook")
                    .await
                    .map_err(TestCaseError::fail)?;
                prop_assert!(status == 200 || status == 400, "{status}");
                Ok(())
            })
        })
        .unwrap();
}

/// A verified GitHub webhook without an event name is not something GitHub
/// sends: 400 naming the header, not 200 `ignored`. Unverified ones stay 401.
#[test]
fn a_signed_github_webhook_without_an_event_name_is_400() {
    let rt = runtime();
    let s = rt.block_on(start());
    rt.block_on(async {
        let body = br#"{"action":"completed"}"#.to_vec();
        let signature = stitch_runners::github::webhook::sign(GH_SECRET.as_bytes(), &body);
        for event in [None, Some(""), Some("  ")] {
            let mut req = s
                .http
                .post(format!("{}/webhooks/github", s.base))
                .header("x-hub-signature-256", &signature);
            if let Some(e) = event {
                req = req.header("x-github-event", e);
            }
            let resp = req.body(body.clone()).send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{event:?}");
            let err: Value = resp.json().await.unwrap();
            assert_eq!(err["error"]["code"], "invalid_request", "{err}");
            assert!(
                err["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("x-github-event"),
                "{err}"
            );
        }
        let unsigned = s
            .http
            .post(format!("{}/webhooks/github", s.base))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(unsigned.status(), StatusCode::UNAUTHORIZED);
    });
}
