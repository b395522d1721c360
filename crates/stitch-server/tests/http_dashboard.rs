//! The dashboard's pages and assets over a real server: served without a
//! token (no data in them) with a strict content security policy, still
//! behind the loopback guard, and nothing else opened up.

mod http_support;

use http_support::{error_code, Server};
use stitch_server::http::HttpOptions;

const PAGES: [&str; 4] = [
    "/",
    "/builds",
    "/builds/b_0000000000000000000000000a",
    "/dead-letters",
];

#[tokio::test]
async fn pages_and_assets_answer_without_a_token_and_the_api_still_needs_one() {
    let s = Server::start_with(Some("dash-token"), HttpOptions::default()).await;
    for page in PAGES {
        let resp = s.client.get(s.url(page)).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{page}");
        let headers = resp.headers().clone();
        assert_eq!(headers["content-type"], "text/html; charset=utf-8");
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
            "{csp}"
        );
        assert_eq!(headers["referrer-policy"], "no-referrer");
        let body = resp.text().await.unwrap();
        assert!(body.contains(r#"<script src="/dashboard/app.js" defer></script>"#));
        assert!(body.contains("<main id=\"main\""));
    }
    for (path, kind) in [
        ("/dashboard/app.js", "text/javascript; charset=utf-8"),
        ("/dashboard/style.css", "text/css; charset=utf-8"),
    ] {
        let resp = s.client.get(s.url(path)).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{path}");
        assert_eq!(resp.headers()["content-type"], kind);
        assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
        assert!(!resp.text().await.unwrap().is_empty());
    }
    // Only those paths: the API, other assets and deeper paths need the token.
    for path in [
        "/v1/builds",
        "/v1/queues",
        "/dashboard/other.js",
        "/builds/a/b",
        "/metrics",
    ] {
        let resp = s.client.get(s.url(path)).send().await.unwrap();
        assert_eq!(
            error_code(resp).await,
            (401, "unauthorized".to_string()),
            "{path}"
        );
    }
}

#[tokio::test]
async fn without_tokens_the_loopback_guard_covers_the_pages() {
    let s = Server::start().await;
    let ok = s.client.get(s.url("/builds")).send().await.unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let rebound = s
        .client
        .get(s.url("/builds"))
        .header("Host", "attacker.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(rebound).await,
        (403, "forbidden_host".to_string())
    );
}

#[tokio::test]
async fn the_script_inserts_text_as_text() {
    // The page draws API text (build heads, metadata, failures) with
    // textContent only: the script never assigns markup.
    let s = Server::start().await;
    let js = s
        .client
        .get(s.url("/dashboard/app.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for sink in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
    ] {
        assert!(!js.contains(sink), "app.js uses {sink}");
    }
}
