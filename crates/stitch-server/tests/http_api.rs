//! The JSON API over a real server: builds, errors, auth, operations.

mod http_support;

use std::collections::BTreeSet;

use http_support::{error_code, Server};
use serde_json::{json, Value};
use stitch_core::{BuildId, BuildStatus};
use stitch_server::http::{self, HttpOptions};

#[tokio::test]
async fn create_get_and_list_across_pages() {
    let s = Server::start().await;
    let (status, created) = s
        .create(
            "default",
            json!({"base": ["b1"], "head": ["h1", "h2"], "metadata": {"ticket": "T-1"}}),
        )
        .await;
    assert_eq!(status, 202, "{created}");
    assert_eq!(created["queue"], "default");
    assert_eq!(created["status"], "accepted");
    assert_eq!(created["base"], json!(["b1"]));
    assert_eq!(created["head"], json!(["h1", "h2"]));
    assert_eq!(created["metadata"], json!({"ticket": "T-1"}));
    assert!(created["runner_ref"].is_null());
    assert!(created["finished_at"].is_null());
    let id = created["id"].as_str().unwrap().to_string();

    let resp = s.get(&format!("/v1/builds/{id}")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let got: Value = resp.json().await.unwrap();
    assert_eq!(got, created);

    let mut ids = vec![id];
    for i in 0..4 {
        ids.push(s.create_ok("default", &format!("change-{i}")).await);
    }
    ids.push(s.create_ok("q-noop", "other-queue").await);

    // Pages of 2 over the default queue: 2 + 2 + 1, newest first, no repeats.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = "/v1/builds?queue=default&limit=2".to_string();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let resp = s.get(&path).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let page: Value = resp.json().await.unwrap();
        pages += 1;
        let builds = page["builds"].as_array().unwrap();
        assert!(builds.len() <= 2);
        seen.extend(builds.iter().map(|b| b["id"].as_str().unwrap().to_string()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => {
                assert!(page["next_cursor"].is_null());
                break;
            }
        }
    }
    assert_eq!(pages, 3);
    let mut expected: Vec<String> = ids[..5].to_vec();
    expected.reverse();
    assert_eq!(seen, expected, "newest first, every build once");

    // Filters: status, and empty values mean "not given".
    let resp = s
        .get("/v1/builds?status=accepted&queue=&cursor=&limit=")
        .send()
        .await
        .unwrap();
    let all: Value = resp.json().await.unwrap();
    assert_eq!(all["builds"].as_array().unwrap().len(), 6);
    let resp = s.get("/v1/builds?status=succeeded").send().await.unwrap();
    let none: Value = resp.json().await.unwrap();
    assert_eq!(none, json!({"builds": [], "next_cursor": null}));
}

#[tokio::test]
async fn idempotent_create_returns_the_same_build() {
    let s = Server::start().await;
    let body = json!({"head": ["h"], "idempotency_key": "mq-1"});
    let (first, a) = s.create("default", body.clone()).await;
    assert_eq!(first, 202);
    let before = s.snapshot().await;
    let (second, b) = s.create("default", body).await;
    assert_eq!(second, 200);
    assert_eq!(a["id"], b["id"]);
    assert_eq!(s.snapshot().await, before, "a replay writes nothing");
    // The same key on another queue is another build.
    let (other, c) = s
        .create("q-noop", json!({"head": ["h"], "idempotency_key": "mq-1"}))
        .await;
    assert_eq!(other, 202);
    assert_ne!(a["id"], c["id"]);
}

#[tokio::test]
async fn cancel_records_intent_and_leaves_terminal_builds_alone() {
    let s = Server::start().await;
    let id = s.create_ok("default", "h").await;
    let resp = s
        .post(&format!("/v1/builds/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let rec: Value = resp.json().await.unwrap();
    assert_eq!(rec["id"], id.as_str());
    // The record shows the pending cancel until the provider confirms it.
    if rec["status"] != "cancelled" {
        assert_eq!(rec["cancel_requested"], true, "{rec}");
    }
    let stored = s
        .state
        .store()
        .get_build(&id.parse().unwrap())
        .await
        .unwrap();
    assert!(stored.cancel_requested);
    // Again: still fine.
    let resp = s
        .post(&format!("/v1/builds/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);

    // A terminal build: 202 with the record exactly as it was.
    let done = s.create_ok("default", "h2").await;
    let done_id: BuildId = done.parse().unwrap();
    s.state
        .store()
        .record_status(
            &done_id,
            None,
            BuildStatus::Succeeded,
            &Default::default(),
            None,
        )
        .await
        .unwrap();
    let before: Value = s
        .get(&format!("/v1/builds/{done}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let snap = s.snapshot().await;
    let resp = s
        .post(&format!("/v1/builds/{done}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let after: Value = resp.json().await.unwrap();
    assert_eq!(after, before);
    assert_eq!(after["status"], "succeeded");
    assert_eq!(s.snapshot().await, snap);
    assert!(
        !s.state
            .store()
            .get_build(&done_id)
            .await
            .unwrap()
            .cancel_requested
    );

    // Unknown and malformed ids.
    let missing = BuildId::new();
    let resp = s
        .post(&format!("/v1/builds/{missing}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, (404, "build_not_found".into()));
    let resp = s.post("/v1/builds/nope/cancel").send().await.unwrap();
    assert_eq!(error_code(resp).await, (404, "build_not_found".into()));
}

#[tokio::test]
async fn bad_input_answers_the_right_error_and_changes_nothing() {
    let s = Server::start().await;
    s.create_ok("default", "seed").await;
    let before = s.snapshot().await;
    let builds = "/v1/queues/default/builds";
    let json_ct = ("content-type", "application/json");

    // (what, request, status, code)
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "malformed JSON",
            s.post(builds)
                .header(json_ct.0, json_ct.1)
                .body("{\"head\": [\"a\""),
            400,
            "malformed_json",
        ),
        (
            "empty body",
            s.post(builds).header(json_ct.0, json_ct.1).body(""),
            400,
            "malformed_json",
        ),
        (
            "unknown field",
            s.post(builds)
                .json(&json!({"head": ["a"], "colour": "red"})),
            400,
            "invalid_request",
        ),
        (
            "missing head",
            s.post(builds).json(&json!({"base": ["a"]})),
            400,
            "invalid_request",
        ),
        (
            "wrong type",
            s.post(builds).json(&json!({"head": "a"})),
            400,
            "invalid_request",
        ),
        (
            "empty head",
            s.post(builds).json(&json!({"head": []})),
            400,
            "invalid_request",
        ),
        (
            "empty change uri",
            s.post(builds).json(&json!({"head": [""]})),
            400,
            "invalid_request",
        ),
        (
            "empty idempotency key",
            s.post(builds)
                .json(&json!({"head": ["a"], "idempotency_key": ""})),
            400,
            "invalid_request",
        ),
        (
            "unknown queue",
            s.post("/v1/queues/nope/builds")
                .json(&json!({"head": ["a"]})),
            404,
            "unknown_queue",
        ),
        (
            "oversized body",
            s.post(builds)
                .json(&json!({"head": ["a"], "metadata": {"big": "x".repeat(10_000)}})),
            413,
            "body_too_large",
        ),
        (
            "text content type",
            s.post(builds)
                .header("content-type", "text/plain")
                .body(r#"{"head":["a"]}"#),
            415,
            "unsupported_media_type",
        ),
        (
            "no content type",
            s.post(builds).body(r#"{"head":["a"]}"#),
            415,
            "unsupported_media_type",
        ),
        (
            "invalid cursor",
            s.get("/v1/builds?cursor=not-a-cursor"),
            400,
            "invalid_request",
        ),
        (
            "invalid status filter",
            s.get("/v1/builds?status=exploded"),
            400,
            "invalid_request",
        ),
        (
            "limit zero",
            s.get("/v1/builds?limit=0"),
            400,
            "invalid_request",
        ),
        (
            "limit not a number",
            s.get("/v1/builds?limit=ten"),
            400,
            "invalid_request",
        ),
        (
            "unknown list parameter",
            s.get("/v1/builds?stauts=failed"),
            400,
            "invalid_request",
        ),
        (
            "invalid events position",
            s.get("/v1/events?after=-1"),
            400,
            "invalid_request",
        ),
        (
            "invalid Last-Event-ID",
            s.get("/v1/events").header("last-event-id", "yesterday"),
            400,
            "invalid_request",
        ),
        (
            "unknown build",
            s.get(&format!("/v1/builds/{}", BuildId::new())),
            404,
            "build_not_found",
        ),
        (
            "malformed build id",
            s.get("/v1/builds/b_nope"),
            404,
            "build_not_found",
        ),
        ("unknown route", s.get("/v2/whatever"), 404, "not_found"),
        (
            "wrong method",
            s.client.delete(s.url("/v1/builds")),
            405,
            "method_not_allowed",
        ),
    ];
    for (what, req, status, code) in cases {
        let resp = req.send().await.unwrap();
        assert_eq!(
            resp.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "{what}"
        );
        let got = error_code(resp).await;
        assert_eq!(got, (status, code.to_string()), "{what}");
        assert_eq!(s.snapshot().await, before, "{what} changed state");
    }
}

#[tokio::test]
async fn bearer_tokens_guard_everything_but_health() {
    let s = Server::start_with(Some("s3cret-token"), HttpOptions::default()).await;
    let before = s.snapshot().await;
    let body = json!({"head": ["a"]});
    let url = s.url("/v1/queues/default/builds");

    let resp = s.client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(
        resp.headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.starts_with("Bearer")),
        Some(true)
    );
    assert_eq!(error_code(resp).await, (401, "unauthorized".into()));
    for bad in ["wrong", "s3cret-toke", "s3cret-token-and-more", ""] {
        let resp = s
            .client
            .post(&url)
            .bearer_auth(bad)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(resp).await,
            (401, "unauthorized".into()),
            "{bad:?}"
        );
    }
    let resp = s
        .client
        .post(&url)
        .header("authorization", "Basic czNjcmV0LXRva2Vu")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, (401, "unauthorized".into()));
    assert_eq!(
        s.snapshot().await,
        before,
        "refused requests change nothing"
    );

    for path in [
        "/v1/builds",
        "/metrics",
        "/openapi.json",
        "/v1/events",
        "/nope",
    ] {
        let resp = s.client.get(s.url(path)).send().await.unwrap();
        assert_eq!(
            error_code(resp).await,
            (401, "unauthorized".into()),
            "{path}"
        );
    }
    for path in ["/healthz", "/readyz"] {
        let resp = s.client.get(s.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    // The right token works (case-insensitive scheme).
    let resp = s
        .client
        .post(&url)
        .header("authorization", "bearer s3cret-token")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let resp = s.get("/metrics").send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

/// Metric labels take only known values: 600 invented methods and 200
/// invented paths add no series (each used to add its own).
#[tokio::test]
async fn invented_methods_and_paths_add_no_metric_series() {
    let s = Server::start().await;
    let invented = |i: usize| reqwest::Method::from_bytes(format!("XM{i}").as_bytes()).unwrap();
    let series = || async {
        let text = s.metrics_text().await;
        text.lines()
            .filter(|l| l.starts_with("stitch_http_"))
            .map(str::to_string)
            .map(|l| l.rsplit_once(' ').map_or(l.clone(), |(k, _)| k.to_string()))
            .collect::<BTreeSet<String>>()
    };
    // One request of each kind first, so their series exist before counting.
    let probe =
        |method: reqwest::Method, path: String| s.client.request(method, s.url(&path)).send();
    assert_eq!(
        probe(invented(0), "/healthz".into())
            .await
            .unwrap()
            .status(),
        405
    );
    assert_eq!(
        probe(invented(0), "/nope/0".into()).await.unwrap().status(),
        404
    );
    assert_eq!(
        probe(reqwest::Method::GET, "/nope/0".into())
            .await
            .unwrap()
            .status(),
        404
    );
    // A scrape is counted after it answered: the second one sees the first.
    series().await;
    let before = series().await;
    for i in 1..=600 {
        let resp = probe(invented(i), "/healthz".into()).await.unwrap();
        assert_eq!(resp.status(), 405);
    }
    for i in 1..=100 {
        let resp = probe(invented(i), format!("/nope/{i}")).await.unwrap();
        assert_eq!(resp.status(), 404);
        let resp = probe(reqwest::Method::GET, format!("/v1/nope-{i}"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
    }
    let after = series().await;
    let new: Vec<&String> = after.difference(&before).collect();
    assert!(
        new.is_empty(),
        "{} new series, e.g. {:?}",
        new.len(),
        &new[..new.len().min(3)]
    );
    assert!(
        after
            .iter()
            .any(|l| l.contains(r#"method="other""#) && l.contains(r#"route="/healthz""#)),
        "{after:?}"
    );
    assert!(
        after.iter().any(|l| l.contains(r#"route="unmatched""#)),
        "{after:?}"
    );
}

#[tokio::test]
async fn health_readiness_metrics_and_openapi() {
    let s = Server::start().await;
    let resp = s.get("/healthz").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"status": "ok"}));
    let resp = s.get("/readyz").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"status": "ready"})
    );

    let id = s.create_ok("default", "h").await;
    let got: Value = s
        .get(&format!("/v1/builds/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let _ = s.get("/v1/builds/nope").send().await.unwrap();

    let resp = s.get("/metrics").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain")));
    let text = resp.text().await.unwrap();
    let has = |route: &str, status: &str| {
        text.lines().any(|l| {
            l.starts_with("stitch_http_requests_total{")
                && l.contains(&format!("route=\"{route}\""))
                && l.contains(&format!("status=\"{status}\""))
        })
    };
    assert!(has("/v1/queues/{queue}/builds", "202"), "{text}");
    assert!(has("/v1/builds/{id}", "200"), "{text}");
    assert!(has("/v1/builds/{id}", "404"), "{text}");
    assert!(has("/healthz", "200"), "{text}");
    assert!(
        text.contains("stitch_http_request_duration_seconds"),
        "{text}"
    );

    let resp = s.get("/openapi.json").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let doc: Value = resp.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths: BTreeSet<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for p in [
        "/v1/queues/{queue}/builds",
        "/v1/builds",
        "/v1/builds/{id}",
        "/v1/builds/{id}/cancel",
        "/v1/builds/{id}/logs",
        "/v1/events",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(paths.contains(p), "{p} missing from {paths:?}");
    }
    // The documented record has exactly the keys the server sends.
    let schema_keys: BTreeSet<&str> = doc["components"]["schemas"]["BuildRecord"]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let record_keys: BTreeSet<&str> = got
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(schema_keys, record_keys);
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

#[tokio::test]
async fn readiness_fails_when_the_database_is_gone() {
    let s = Server::start().await;
    s.state.store().close().await;
    let resp = s.get("/readyz").send().await.unwrap();
    assert_eq!(error_code(resp).await, (503, "not_ready".into()));
    let resp = s.get("/healthz").send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[test]
fn non_loopback_bind_is_refused_without_tokens() {
    let any = "0.0.0.0:7700".parse().unwrap();
    let err = http::check_bind(any, false).unwrap_err();
    assert!(err.contains("0.0.0.0:7700"), "{err}");
    assert!(http::check_bind("[::]:7700".parse().unwrap(), false).is_err());
    assert!(http::check_bind("127.0.0.1:7700".parse().unwrap(), false).is_ok());
    assert!(http::check_bind("[::1]:7700".parse().unwrap(), false).is_ok());
    assert!(http::check_bind(any, true).is_ok());
}

/// The served document tells the truth about the mode it runs in: without
/// API tokens no route asks for one; with tokens every `/v1` route but the
/// job-token one does.
#[tokio::test]
async fn the_openapi_document_asks_for_an_api_token_only_when_one_is_needed() {
    let security =
        |doc: &Value, path: &str, method: &str| doc["paths"][path][method]["security"].clone();
    let loopback = Server::start().await;
    let doc: Value = loopback
        .get("/openapi.json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(security(&doc, "/v1/builds", "get"), Value::Null);
    assert_eq!(
        security(&doc, "/v1/queues/{queue}/builds", "post"),
        Value::Null
    );
    assert_eq!(
        security(&doc, "/v1/builds/{id}/promise-failure", "post"),
        json!([{"job_token": []}])
    );
    // Without a token the routes answer, as the document says.
    assert_eq!(
        loopback.get("/v1/builds").send().await.unwrap().status(),
        200
    );

    let tokens = Server::start_with(Some("s3cret"), HttpOptions::default()).await;
    let doc: Value = tokens
        .get("/openapi.json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(security(&doc, "/v1/builds", "get"), json!([{"bearer": []}]));
    assert_eq!(
        security(&doc, "/v1/builds/{id}/promise-failure", "post"),
        json!([{"job_token": []}])
    );
    assert_eq!(security(&doc, "/healthz", "get"), Value::Null);
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    // No route declares the Authorization header as a parameter of its own.
    assert!(!doc.to_string().contains(r#""name":"Authorization""#));
}

/// Bounds the server enforces are in the schema, and a created build links
/// to its status, cancel and log routes.
#[tokio::test]
async fn the_openapi_document_states_bounds_and_links() {
    let s = Server::start().await;
    let doc: Value = s
        .get("/openapi.json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let promise = &doc["components"]["schemas"]["PromiseFailureBody"]["properties"]["exit_status"];
    assert_eq!(promise["minimum"], json!(1));
    assert_eq!(promise["maximum"], json!(i32::MAX));
    let params = doc["paths"]["/v1/builds"]["get"]["parameters"]
        .as_array()
        .unwrap();
    let cursor = params.iter().find(|p| p["name"] == "cursor").unwrap();
    let pattern = cursor["schema"]["pattern"].as_str().unwrap();
    assert!(pattern.contains("b_"), "{pattern}");
    let header = doc["paths"]["/v1/events"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "Last-Event-ID")
        .unwrap();
    assert_eq!(header["schema"]["type"], "integer", "{header}");
    for status in ["200", "202"] {
        let links =
            &doc["paths"]["/v1/queues/{queue}/builds"]["post"]["responses"][status]["links"];
        for op in ["get_build", "cancel_build", "build_logs"] {
            assert_eq!(links[op]["operationId"], op, "{links}");
            assert_eq!(links[op]["parameters"]["id"], "$response.body#/id");
        }
    }
    // Every link names an operation that exists.
    let ids: BTreeSet<String> = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|item| item.as_object().unwrap().values())
        .filter_map(|op| op["operationId"].as_str().map(str::to_string))
        .collect();
    for op in ["get_build", "cancel_build", "build_logs"] {
        assert!(ids.contains(op), "{op} not in {ids:?}");
    }
}

/// Blank list parameters are values (and refused when they are not valid
/// ones); only empty ones mean "not given". Positions past int64 are 400.
#[tokio::test]
async fn blank_list_parameters_and_positions_past_int64_are_400() {
    let s = Server::start().await;
    for q in ["status=%20", "limit=%20", "cursor=%20"] {
        let resp = s.get(&format!("/v1/builds?{q}")).send().await.unwrap();
        assert_eq!(
            error_code(resp).await,
            (400, "invalid_request".into()),
            "{q}"
        );
    }
    let resp = s.get("/v1/builds?queue=%20").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let too_far = (i64::MAX as u64) + 1;
    let resp = s
        .get(&format!("/v1/events?after={too_far}"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, (400, "invalid_request".into()));
    let resp = s
        .get("/v1/events")
        .header("last-event-id", too_far.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, (400, "invalid_request".into()));
}

/// An idempotency key is limited in characters, as its message and schema
/// say: 256 three-byte characters are accepted, 257 are not.
#[tokio::test]
async fn idempotency_keys_are_limited_in_characters() {
    let s = Server::start().await;
    let key = "€".repeat(256);
    let (status, body) = s
        .create("default", json!({"head": ["h"], "idempotency_key": key}))
        .await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = s
        .create(
            "default",
            json!({"head": ["h"], "idempotency_key": "€".repeat(257)}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
}
