//! The web dashboard (`docs/dashboard.md`): four pages at stable URLs —
//! `/` (overview), `/builds`, `/builds/{id}` and `/dead-letters` — and
//! their assets under `/dashboard/`, all embedded in the binary.
//!
//! Every page is the same HTML shell; `app.js` reads the path and draws the
//! page from the public API (`/v1/...`), with the bearer token the visitor
//! gave once per browser session when tokens are configured. The shell and
//! assets carry no data, so they answer without a token (a browser cannot
//! attach one to a navigation); the loopback guard still applies to them.
//! Live updates read `/v1/events` and the log stream as SSE through
//! `fetch()`, so the token travels in the `Authorization` header and never
//! in a URL (ADR 0015).

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../assets/dashboard/app.js");
const STYLE_CSS: &str = include_str!("../assets/dashboard/style.css");

/// The page paths, as routed.
const PAGES: [&str; 4] = ["/", "/builds", "/builds/{id}", "/dead-letters"];

/// What a dashboard page may load and reach: only this server. No inline
/// script, no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// The dashboard's routes, to merge into the API router (under its
/// middleware: metrics, loopback guard; [`is_dashboard_path`] exempts
/// them from the token).
pub(crate) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut router = Router::new();
    for page in PAGES {
        router = router.route(page, get(page_shell));
    }
    router
        .route("/dashboard/app.js", get(app_js))
        .route("/dashboard/style.css", get(style_css))
}

/// Whether `path` is a dashboard page or asset: answered without the API
/// token (it holds no data; the data comes from `/v1` with the token).
pub(crate) fn is_dashboard_path(path: &str) -> bool {
    match path {
        "/" | "/builds" | "/dead-letters" | "/dashboard/app.js" | "/dashboard/style.css" => true,
        _ => path
            .strip_prefix("/builds/")
            .is_some_and(|id| !id.is_empty() && !id.contains('/')),
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The assets change with the binary: revalidate rather than serve a
    // stale script after an upgrade.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

async fn page_shell() -> Response {
    let mut resp = asset("text/html; charset=utf-8", INDEX_HTML);
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

#[cfg(test)]
mod tests {
    use super::is_dashboard_path;

    #[test]
    fn only_pages_and_assets_are_dashboard_paths() {
        for p in [
            "/",
            "/builds",
            "/builds/b_x",
            "/dead-letters",
            "/dashboard/app.js",
        ] {
            assert!(is_dashboard_path(p), "{p}");
        }
        for p in [
            "/v1/builds",
            "/builds/",
            "/builds/a/b",
            "/dashboard/other.js",
            "/metrics",
            "/openapi.json",
        ] {
            assert!(!is_dashboard_path(p), "{p}");
        }
    }
}
