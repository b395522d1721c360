//! Property tests: arbitrary bytes and structured-but-wrong bodies at the
//! job API's request parser, directly (many cases) and through the real
//! job API on its Unix socket (fewer): never a panic, a 4xx for anything
//! that is not a valid promise, and nothing declared for it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde_json::{json, Value};
use stitch_job::{Declaration, Declare, JobApi, PromiseFailure, PromiseFailureCoordinator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Bodies: any bytes, any JSON, and the promise's own shape with wrong values.
fn bodies() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,20}".prop_map(Value::String),
    ];
    let value = leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("exit_status".to_string()),
                    Just("reason".to_string()),
                    "[a-z]{0,6}"
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        value.prop_map(|v| serde_json::to_vec(&v).unwrap()),
        (any::<i64>(), prop::option::of(".{0,40}"))
            .prop_map(
                |(e, r)| serde_json::to_vec(&json!({"exit_status": e, "reason": r})).unwrap()
            ),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn promise_bodies_parse_or_fail_typed(body in bodies()) {
        if let Ok(p) = PromiseFailure::from_json(&body) {
            prop_assert!(p.exit_status > 0);
        }
    }
}

/// Counts what reaches the stitch server.
#[derive(Default)]
struct Counting(AtomicUsize);

#[async_trait]
impl Declare for Counting {
    async fn declare(&self, _promise: &PromiseFailure) -> Declaration {
        self.0.fetch_add(1, Ordering::SeqCst);
        Declaration {
            status: Some(204),
            error: None,
        }
    }
}

/// One raw HTTP/1.1 request on the socket; the answer's status code.
async fn post(api: &JobApi, token: &str, body: &[u8]) -> u16 {
    let mut stream = tokio::net::UnixStream::connect(api.socket()).await.unwrap();
    let head = format!(
        "POST /api/current-job/v0/promise-failure HTTP/1.1\r\nHost: job\r\n\
         Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    // A refusal may come (and the socket close) before the body is read.
    let _ = stream.write_all(&request).await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

#[test]
fn job_api_requests_of_any_shape_are_4xx_and_declare_nothing() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let declared = Arc::new(Counting::default());
    let api = rt
        .block_on(async {
            JobApi::start(PromiseFailureCoordinator::new(
                declared.clone() as Arc<dyn Declare>
            ))
        })
        .unwrap();
    let valid = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut runner = TestRunner::new(config(64));
    runner
        .run(&(bodies(), any::<bool>()), |(body, right_token)| {
            rt.block_on(async {
                let token = if right_token {
                    api.token()
                } else {
                    "not-the-token"
                };
                let status = post(&api, token, &body).await;
                match PromiseFailure::from_json(&body) {
                    _ if !right_token => prop_assert_eq!(status, 401),
                    Ok(p) => {
                        prop_assert_eq!(status, 200);
                        valid.lock().unwrap().insert(p.exit_status);
                    }
                    Err(_) => prop_assert_eq!(status, 400),
                }
                Ok(())
            })
        })
        .unwrap();
    // One declaration per distinct valid exit status; nothing else got through.
    assert_eq!(
        declared.0.load(Ordering::SeqCst),
        valid.lock().unwrap().len()
    );
    rt.block_on(api.shutdown());
}
