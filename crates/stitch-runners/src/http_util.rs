//! Small HTTP helpers the vendor clients (`buildkite::Client`,
//! `github::Client`) share: readable transport errors, error-body
//! summaries, `Link` pagination and the same-origin check that keeps an
//! `Authorization` header on the provider's own host.

use reqwest::{StatusCode, Url};

/// A transport error with its source chain (reset, refused, timeout), which
/// is what says what actually happened.
pub fn transport_message(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    if e.is_timeout() && !message.contains("timed out") {
        message.push_str(" (timed out)");
    }
    message
}

/// `"<reason>: <first 200 characters of the body>"` for an error answer
/// whose body carried no message of its own (a proxy page, plain text).
pub fn status_summary(status: StatusCode, body: &str) -> String {
    let snippet: String = body.trim().chars().take(200).collect();
    let reason = status.canonical_reason().unwrap_or("error");
    if snippet.is_empty() {
        reason.to_string()
    } else {
        format!("{reason}: {snippet}")
    }
}

/// The `rel="next"` URL of an RFC 8288 `Link` header, if any.
pub fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let mut pieces = part.split(';');
        let target = pieces.next()?.trim();
        let url = target.strip_prefix('<')?.strip_suffix('>')?;
        let is_next = pieces.any(|p| {
            let p = p.trim();
            p.eq_ignore_ascii_case("rel=\"next\"") || p.eq_ignore_ascii_case("rel=next")
        });
        is_next.then(|| url.to_string())
    })
}

/// Whether `link` points at the same origin (scheme, host, port) as `base`:
/// a pagination link elsewhere must not receive the API's credentials.
pub fn same_origin(base: &Url, link: &Url) -> bool {
    base.origin() == link.origin()
}

/// Checks an API root: an absolute `http://` or `https://` URL that can
/// carry path segments. Returns it without a trailing `/`.
pub fn parse_api_root(base: &str) -> Result<(String, Url), String> {
    let base = base.trim_end_matches('/').to_string();
    let parsed = Url::parse(&base).map_err(|e| format!("{base}: {e}"))?;
    if parsed.cannot_be_a_base() || !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("{base}: must be an http:// or https:// URL"));
    }
    Ok((base, parsed))
}

/// `base` with `segments` appended (each percent-encoded as one segment).
pub fn join_segments(base: &Url, segments: &[&str]) -> Result<Url, String> {
    let mut url = base.clone();
    url.path_segments_mut()
        .map_err(|_| format!("{base}: cannot carry a path"))?
        .pop_if_empty()
        .extend(segments);
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_header_next() {
        let h = r#"<https://api.buildkite.com/v2/builds?page=3>; rel="next", <https://api.buildkite.com/v2/builds?page=9>; rel="last""#;
        assert_eq!(
            next_link(h).as_deref(),
            Some("https://api.buildkite.com/v2/builds?page=3")
        );
        let last = r#"<https://x/?page=1>; rel="first", <https://x/?page=2>; rel="prev""#;
        assert_eq!(next_link(last), None);
        assert_eq!(next_link(""), None);
        assert_eq!(next_link("garbage; rel=\"next\""), None);
    }

    #[test]
    fn origins_and_roots() {
        let base = Url::parse("http://127.0.0.1:1/api").unwrap();
        assert!(same_origin(
            &base,
            &Url::parse("http://127.0.0.1:1/x?page=2").unwrap()
        ));
        assert!(!same_origin(
            &base,
            &Url::parse("http://127.0.0.1:2/x").unwrap()
        ));
        assert!(parse_api_root("ftp://x").is_err());
        assert!(parse_api_root("not a url").is_err());
        let (root, url) = parse_api_root("https://ghe.example/api/v3/").unwrap();
        assert_eq!(root, "https://ghe.example/api/v3");
        assert_eq!(
            join_segments(&url, &["repos", "a b"]).unwrap().as_str(),
            "https://ghe.example/api/v3/repos/a%20b"
        );
    }

    #[test]
    fn summaries_cut_long_bodies() {
        assert_eq!(status_summary(StatusCode::BAD_GATEWAY, ""), "Bad Gateway");
        let long = "x".repeat(500);
        assert_eq!(
            status_summary(StatusCode::BAD_GATEWAY, &long).len(),
            "Bad Gateway: ".len() + 200
        );
    }
}
