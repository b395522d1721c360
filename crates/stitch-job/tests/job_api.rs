//! The job API over its real Unix socket, declaring to a real HTTP server
//! on loopback: a stateful model of stitch's promise-failure endpoint
//! (first status wins → 204, same again → 204, another → 409) that counts
//! every request and can be scripted to answer given statuses first, or to
//! hold answers until the test opens a gate.

use std::collections::VecDeque;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use stitch_job::{
    JobApi, JobApiClient, JobApiError, Outcome, PromiseFailure, PromiseFailureCoordinator,
    RetryPolicy, ServerClient,
};
use tokio::sync::watch;

const BUILD: &str = "b_01j0000000000000000000000a";
const JOB_TOKEN: &str = "stj_test-token";

#[derive(Default)]
struct Model {
    calls: AtomicUsize,
    /// Statuses to answer before behaving like the model.
    script: Mutex<VecDeque<u16>>,
    promised: Mutex<Option<i64>>,
    /// Declarations the model recorded (accepted first promises).
    recorded: AtomicUsize,
}

#[derive(Clone)]
struct Upstream {
    model: Arc<Model>,
    gate: watch::Receiver<bool>,
}

async fn endpoint(
    State(up): State<Upstream>,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> Response {
    up.model.calls.fetch_add(1, Ordering::SeqCst);
    let mut gate = up.gate.clone();
    let _ = gate.wait_for(|open| *open).await;
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if auth != format!("Bearer {JOB_TOKEN}") {
        return (StatusCode::FORBIDDEN, "wrong token").into_response();
    }
    let scripted = up.model.script.lock().unwrap().pop_front();
    if let Some(status) = scripted {
        let status = StatusCode::from_u16(status).unwrap();
        if status.is_success() {
            return status.into_response();
        }
        let body = serde_json::json!({"error": {"code": "scripted", "message": format!("scripted {}", status.as_u16())}});
        return (status, Json(body)).into_response();
    }
    let wanted = body["exit_status"].as_i64().unwrap();
    let mut promised = up.model.promised.lock().unwrap();
    match *promised {
        None => {
            *promised = Some(wanted);
            up.model.recorded.fetch_add(1, Ordering::SeqCst);
            StatusCode::NO_CONTENT.into_response()
        }
        Some(p) if p == wanted => StatusCode::NO_CONTENT.into_response(),
        Some(p) => (
            StatusCode::CONFLICT,
            Json(serde_json::json!({"error": {"code": "different_exit_status_promised", "message": format!("exit status {p} was already promised")}})),
        )
            .into_response(),
    }
}

struct Harness {
    model: Arc<Model>,
    gate: watch::Sender<bool>,
    coordinator: Arc<PromiseFailureCoordinator>,
    api: JobApi,
    client: JobApiClient,
    server_url: String,
}

async fn harness(retry: RetryPolicy, gate_open: bool) -> Harness {
    let model = Arc::new(Model::default());
    let (gate, gate_rx) = watch::channel(gate_open);
    let app = Router::new()
        .route(
            &format!("/v1/builds/{BUILD}/promise-failure"),
            post(endpoint),
        )
        .with_state(Upstream {
            model: Arc::clone(&model),
            gate: gate_rx,
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let declarer = ServerClient::new(&server_url, BUILD, JOB_TOKEN)
        .unwrap()
        .with_retry(retry);
    let coordinator = PromiseFailureCoordinator::new(Arc::new(declarer));
    let api = JobApi::start(Arc::clone(&coordinator)).unwrap();
    let client = JobApiClient::new(api.socket(), api.token()).unwrap();
    Harness {
        model,
        gate,
        coordinator,
        api,
        client,
        server_url,
    }
}

fn promise(status: i64) -> PromiseFailure {
    PromiseFailure::new(status, Some(format!("test failed ({status})"))).unwrap()
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 5,
        initial: Duration::from_millis(5),
        max: Duration::from_millis(20),
    }
}

/// Waits (bounded) until `n` callers are waiting on `status`'s declaration.
async fn until_waiting(c: &PromiseFailureCoordinator, status: i32, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut joined = c.joined();
    loop {
        // Marked seen before the count: a caller joining after it wakes us.
        joined.borrow_and_update();
        if c.waiting(status) >= n {
            return;
        }
        let next = tokio::time::timeout_at(deadline.into(), joined.changed()).await;
        assert!(
            matches!(next, Ok(Ok(()))),
            "only {} of {n} callers waiting",
            c.waiting(status)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_callers_make_one_declaration() {
    let h = harness(RetryPolicy::default(), false).await;
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let c = h.client.clone();
            tokio::spawn(async move { c.promise_failure(&promise(3)).await })
        })
        .collect();
    until_waiting(&h.coordinator, 3, 50).await;
    h.gate.send_replace(true);
    let mut declared = 0;
    for call in calls {
        let r = call.await.unwrap().unwrap();
        assert!(r.accepted, "{r:?}");
        assert_eq!(r.upstream_status, Some(204));
        if r.outcome == Outcome::Declared {
            declared += 1;
        }
    }
    assert_eq!(declared, 1, "exactly one caller declares");
    assert_eq!(h.model.calls.load(Ordering::SeqCst), 1);
    assert_eq!(h.model.recorded.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn declared_then_debounced_then_another_status_declares_on_its_own() {
    let h = harness(RetryPolicy::default(), true).await;
    let first = h.client.promise_failure(&promise(3)).await.unwrap();
    assert_eq!((first.outcome, first.accepted), (Outcome::Declared, true));
    let again = h.client.promise_failure(&promise(3)).await.unwrap();
    assert_eq!((again.outcome, again.accepted), (Outcome::Debounced, true));
    assert_eq!(h.model.calls.load(Ordering::SeqCst), 1);

    let other = h.client.promise_failure(&promise(4)).await.unwrap();
    assert_eq!(other.outcome, Outcome::Declared);
    assert!(!other.accepted);
    assert_eq!(other.upstream_status, Some(409));
    assert!(other.error.unwrap().contains("already promised"));
    assert_eq!(h.model.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn transient_failure_is_evicted_and_the_next_call_declares_again() {
    let h = harness(RetryPolicy::once(), true).await;
    h.model.script.lock().unwrap().push_back(503);
    let failed = h.client.promise_failure(&promise(2)).await.unwrap();
    assert_eq!(failed.outcome, Outcome::Declared);
    assert!(!failed.accepted);
    assert_eq!(failed.upstream_status, Some(503));
    let retried = h.client.promise_failure(&promise(2)).await.unwrap();
    assert_eq!(
        retried.outcome,
        Outcome::Declared,
        "not served from a cache"
    );
    assert!(retried.accepted);
    assert_eq!(retried.upstream_status, Some(204));
    assert_eq!(h.model.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn terminal_refusals_stay_cached_and_never_reach_the_server_again() {
    let h = harness(fast_retry(), true).await;
    h.model.script.lock().unwrap().extend([409, 422]);
    let r = h.client.promise_failure(&promise(5)).await.unwrap();
    assert_eq!(
        (r.outcome, r.accepted, r.upstream_status),
        (Outcome::Declared, false, Some(409))
    );
    let r = h.client.promise_failure(&promise(6)).await.unwrap();
    assert_eq!(
        (r.outcome, r.accepted, r.upstream_status),
        (Outcome::Declared, false, Some(422))
    );
    for _ in 0..5 {
        let r5 = h.client.promise_failure(&promise(5)).await.unwrap();
        assert_eq!(
            (r5.outcome, r5.upstream_status),
            (Outcome::Debounced, Some(409))
        );
        let r6 = h.client.promise_failure(&promise(6)).await.unwrap();
        assert_eq!(
            (r6.outcome, r6.upstream_status),
            (Outcome::Debounced, Some(422))
        );
        assert_eq!(r6.error.as_deref(), Some("scripted 422"));
    }
    assert_eq!(h.model.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_declaration_releases_fifty_waiters_and_the_next_call_retries() {
    let h = harness(RetryPolicy::default(), false).await;
    h.coordinator.inject_panic_in_next_declaration();
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let c = h.client.clone();
            tokio::spawn(async move { c.promise_failure(&promise(7)).await })
        })
        .collect();
    until_waiting(&h.coordinator, 7, 50).await;
    h.gate.send_replace(true);
    for call in calls {
        let r = call.await.unwrap().unwrap();
        assert!(!r.accepted);
        assert_eq!(r.upstream_status, Some(500));
        assert!(r.error.unwrap().contains("panicked"));
    }
    assert_eq!(h.coordinator.waiting(7), 0, "the entry was evicted");
    let next = h.client.promise_failure(&promise(7)).await.unwrap();
    assert_eq!((next.outcome, next.accepted), (Outcome::Declared, true));
    assert_eq!(h.model.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_retry_policy_retries_transient_answers_and_stops_on_refusals() {
    let h = harness(fast_retry(), true).await;
    let direct = ServerClient::new(&h.server_url, BUILD, JOB_TOKEN)
        .unwrap()
        .with_retry(fast_retry());
    use stitch_job::Declare;
    h.model.script.lock().unwrap().extend([503, 429, 502]);
    let d = direct.declare(&promise(1)).await;
    assert!(d.accepted(), "{d:?}");
    assert_eq!(h.model.calls.load(Ordering::SeqCst), 4);
    h.model.script.lock().unwrap().push_back(403);
    let d = direct.declare(&promise(1)).await;
    assert_eq!(d.status, Some(403));
    assert_eq!(h.model.calls.load(Ordering::SeqCst), 5, "no retry on 403");
    // Nothing listening: every attempt fails at the network, then it gives up.
    let dead = ServerClient::new("http://127.0.0.1:1", BUILD, JOB_TOKEN)
        .unwrap()
        .with_retry(fast_retry());
    let d = dead.declare(&promise(1)).await;
    assert_eq!(d.status, None);
    assert!(d.error.unwrap().contains("cannot reach"));
}

#[tokio::test]
async fn the_socket_is_private_and_needs_the_token() {
    let h = harness(RetryPolicy::default(), true).await;
    let sock = h.api.socket().to_path_buf();
    let dir_mode = std::fs::metadata(sock.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    let sock_mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(sock_mode & 0o777, 0o600);

    let raw = reqwest::Client::builder()
        .unix_socket(sock.as_path())
        .build()
        .unwrap();
    let url = "http://job/api/current-job/v0/promise-failure";
    let body = serde_json::json!({"exit_status": 1});
    let none = raw.post(url).json(&body).send().await.unwrap();
    assert_eq!(none.status(), 401);
    let v: serde_json::Value = none.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("Bearer"));
    let wrong = raw
        .post(url)
        .bearer_auth("nope")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let wrong_client = JobApiClient::new(&sock, "0000").unwrap();
    assert!(matches!(
        wrong_client.promise_failure(&promise(1)).await,
        Err(JobApiError::Refused { status: 401, .. })
    ));
    let unknown = raw
        .get("http://job/api/current-job/v0/env")
        .bearer_auth(h.api.token())
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let wrong_method = raw
        .get(url)
        .bearer_auth(h.api.token())
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
    assert_eq!(wrong_method.headers()["allow"], "POST");
    assert_eq!(h.model.calls.load(Ordering::SeqCst), 0);
    let ok = raw
        .post(url)
        .bearer_auth(h.api.token())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);

    // Stopping removes the socket and its directory.
    h.api.shutdown().await;
    assert!(!sock.exists());
    assert!(!sock.parent().unwrap().exists());
    assert!(matches!(
        h.client.promise_failure(&promise(1)).await,
        Err(JobApiError::Unreachable { .. })
    ));
}

#[tokio::test]
async fn bad_bodies_are_400_and_declare_nothing() {
    let h = harness(RetryPolicy::default(), true).await;
    let raw = reqwest::Client::builder()
        .unix_socket(h.api.socket())
        .build()
        .unwrap();
    let url = "http://job/api/current-job/v0/promise-failure";
    let cases: [&str; 8] = [
        "not json",
        "{}",
        r#"{"exit_status":0}"#,
        r#"{"exit_status":-2}"#,
        r#"{"exit_status":1.5}"#,
        r#"{"exit_status":"1"}"#,
        r#"{"exit_status":99999999999}"#,
        r#"{"exit_status":1,"unexpected":true}"#,
    ];
    for body in cases {
        let r = raw
            .post(url)
            .bearer_auth(h.api.token())
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(v["error"].is_string(), "{body}: {v}");
    }
    let huge = format!(
        r#"{{"exit_status":1,"reason":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    let r = raw
        .post(url)
        .bearer_auth(h.api.token())
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(h.model.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_disconnects_does_not_abandon_the_declaration() {
    let h = harness(RetryPolicy::default(), false).await;
    let impatient = JobApiClient::new(h.api.socket(), h.api.token()).unwrap();
    let leader = tokio::spawn(async move { impatient.promise_failure(&promise(9)).await });
    until_waiting(&h.coordinator, 9, 1).await;
    let waiter = {
        let c = h.client.clone();
        tokio::spawn(async move { c.promise_failure(&promise(9)).await })
    };
    until_waiting(&h.coordinator, 9, 2).await;
    leader.abort(); // the leader's connection goes away mid-declaration
    let _ = leader.await;
    h.gate.send_replace(true);
    let r = waiter.await.unwrap().unwrap();
    assert_eq!((r.outcome, r.accepted), (Outcome::Debounced, true));
    assert_eq!(h.model.calls.load(Ordering::SeqCst), 1);
}
