//! The guard of the token-less loopback mode against DNS rebinding and
//! cross-site requests.
//!
//! Without API tokens, reaching the loopback listener is the only
//! credential, and a browser lends it to any web page: a page on a name
//! that rebinds to 127.0.0.1 reads the API as its own origin, and any page
//! can send cross-site POSTs or open a WebSocket. So on the routes the API
//! token would protect (not `/healthz`, `/readyz`, the webhook receivers
//! and `promise-failure`, which have their own credentials or none):
//!
//! - the `Host` must be a loopback name or address (`localhost`,
//!   127.0.0.0/8, `[::1]`) or `api.public_url`'s host, else 403
//!   `forbidden_host`;
//! - a state-changing request (POST, PUT, PATCH, DELETE) or a WebSocket
//!   upgrade whose `Origin` is present must come from a loopback origin
//!   (any port) or `api.public_url`'s origin, else 403 `forbidden_origin`.
//!
//! With API tokens the guard is off: a browser cannot attach a bearer
//! token to another site's request.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::uri::Authority;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::auth::needs_api_token;
use super::error::ApiError;
use super::streams::wants_websocket;

/// Whether the guard is on, and the public origin it also accepts.
#[derive(Clone, Debug)]
pub(crate) struct LoopbackGuard {
    on: bool,
    public: Option<Arc<Origin>>,
}

/// A scheme, host and port; hosts lower-case, IPv6 in brackets.
#[derive(Debug, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    /// `scheme://host[:port]` of an absolute URL (a path is ignored);
    /// `None` for anything else, `Origin: null` included.
    fn parse(raw: &str) -> Option<Self> {
        let uri: Uri = raw.trim().parse().ok()?;
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let authority = uri.authority()?;
        let port = match (authority.port_u16(), scheme.as_str()) {
            (Some(p), _) => p,
            (None, "http") => 80,
            (None, "https") => 443,
            (None, _) => return None,
        };
        Some(Self {
            host: normal_host(authority.host()),
            scheme,
            port,
        })
    }
}

/// Lower case, without the trailing dot of a fully qualified name.
fn normal_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// `localhost`, an address in 127.0.0.0/8, or `[::1]` (also as an
/// IPv4-mapped loopback address).
fn is_loopback_host(host: &str) -> bool {
    if host == "localhost" {
        return true;
    }
    if let Ok(v4) = host.parse::<Ipv4Addr>() {
        return v4.is_loopback();
    }
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .and_then(|h| h.parse::<Ipv6Addr>().ok())
        .is_some_and(|v6| {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        })
}

impl LoopbackGuard {
    /// On when no API token is configured; `public_url` is
    /// `api.public_url` (validated as an http(s) URL when loaded).
    pub(crate) fn new(tokens_configured: bool, public_url: Option<&str>) -> Self {
        Self {
            on: !tokens_configured,
            public: public_url.and_then(Origin::parse).map(Arc::new),
        }
    }

    /// The request's `Host` (the request target's authority wins, as in
    /// HTTP/1.1) names this server.
    fn host_allowed(&self, uri: &Uri, headers: &HeaderMap) -> bool {
        let host = match uri.authority() {
            Some(a) => normal_host(a.host()),
            None => match headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<Authority>().ok())
            {
                Some(a) => normal_host(a.host()),
                None => return false,
            },
        };
        is_loopback_host(&host) || self.public.as_ref().is_some_and(|p| p.host == host)
    }

    /// The `Origin` is a loopback one (http or https, any port) or the
    /// public URL's.
    fn origin_allowed(&self, origin: &str) -> bool {
        let Some(origin) = Origin::parse(origin) else {
            return false;
        };
        let web = origin.scheme == "http" || origin.scheme == "https";
        (web && is_loopback_host(&origin.host))
            || self.public.as_deref().is_some_and(|p| *p == origin)
    }
}

fn forbidden(code: &'static str, message: &str) -> Response {
    ApiError::new(StatusCode::FORBIDDEN, code, message).into_response()
}

/// Middleware: applies the guard (see the module documentation).
pub(crate) async fn check(
    State(guard): State<LoopbackGuard>,
    req: Request,
    next: Next,
) -> Response {
    if !guard.on || !needs_api_token(req.uri().path()) {
        return next.run(req).await;
    }
    if !guard.host_allowed(req.uri(), req.headers()) {
        return forbidden(
            "forbidden_host",
            "the Host header does not name this server: without API tokens only loopback \
             names and addresses and api.public_url's host are answered",
        );
    }
    let changes_state = matches!(
        *req.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) || wants_websocket(req.headers());
    if changes_state {
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            if !origin.to_str().is_ok_and(|o| guard.origin_allowed(o)) {
                return forbidden(
                    "forbidden_origin",
                    "cross-site request refused: without API tokens, requests that change \
                     something or open a WebSocket must come from a loopback origin or \
                     api.public_url",
                );
            }
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_and_origins() {
        for host in [
            "localhost",
            "127.0.0.1",
            "127.3.2.1",
            "[::1]",
            "[::ffff:127.0.0.1]",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "localhost.evil.example",
            "10.0.0.1",
            "[::2]",
            "0.0.0.0",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
        let guard = LoopbackGuard::new(false, Some("https://Stitch.Example.com/base"));
        assert!(guard.origin_allowed("http://localhost:3000"));
        assert!(guard.origin_allowed("https://stitch.example.com"));
        assert!(guard.origin_allowed("https://stitch.example.com:443"));
        for origin in [
            "null",
            "https://evil.example",
            "http://stitch.example.com",
            "https://stitch.example.com:8443",
            "file://localhost",
            "",
        ] {
            assert!(!guard.origin_allowed(origin), "{origin}");
        }
    }
}
