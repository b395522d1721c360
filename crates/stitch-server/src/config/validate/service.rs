//! The service's own keys: data directory, storage, cluster, HTTP,
//! retention, API, webhooks and spindle.

use std::net::SocketAddr;
use std::time::Duration;

use super::super::problems::{at_index, path, Problems};
use super::super::{
    ApiConfig, Config, HttpConfig, OtlpConfig, RetentionConfig, RetentionSetting, SpindleConfig,
};
use super::{env_is_set, is_http_url, Env};

pub(super) fn validate(config: &Config, problems: &mut Problems, env: Env<'_>) {
    if config.data_dir.as_os_str().is_empty() {
        problems.report(path(&["data_dir"]), "must not be empty");
    }
    if let Some(url) = &config.storage.url {
        validate_storage_url(url, problems);
    }
    validate_cluster(config, problems);
    validate_http(&config.http, problems);
    validate_retention(&config.retention, problems);
    validate_api(config, &config.api, problems, env);
    if let Some(w) = &config.webhooks.github {
        if !env_is_set(env, &w.secret_env) {
            problems.report(
                path(&["webhooks", "github", "secret_env"]),
                format!(
                    "environment variable {:?} is unset or empty; it must hold the GitHub webhook secret",
                    w.secret_env
                ),
            );
        }
        if w.poll.is_zero() {
            problems.report(
                path(&["webhooks", "github", "poll"]),
                "must be greater than zero",
            );
        }
    }
    if let Some(spindle) = &config.spindle {
        validate_spindle(config, spindle, problems);
    }
    if let Some(otlp) = &config.telemetry.otlp {
        validate_otlp(otlp, problems);
    }
}

/// `[telemetry.otlp]`: an http(s) URL with a host, a service name, a
/// timeout. The URL is not echoed: it may carry credentials.
fn validate_otlp(otlp: &OtlpConfig, problems: &mut Problems) {
    let usable = reqwest::Url::parse(&otlp.endpoint).is_ok_and(|url| {
        matches!(url.scheme(), "http" | "https")
            && url.host_str().is_some_and(|h| !h.is_empty())
            && url.query().is_none()
    });
    if !usable {
        problems.report(
            path(&["telemetry", "otlp", "endpoint"]),
            "must be an http:// or https:// URL with a host and no query, \
             e.g. http://127.0.0.1:4318 (the collector's OTLP/HTTP address)",
        );
    }
    if otlp.service_name.trim().is_empty() {
        problems.report(
            path(&["telemetry", "otlp", "service_name"]),
            "must not be empty",
        );
    }
    if otlp.timeout.is_zero() {
        problems.report(
            path(&["telemetry", "otlp", "timeout"]),
            "must be greater than zero",
        );
    }
}

/// `storage.url`. The URL is not echoed: a database URL may hold a password.
fn validate_storage_url(url: &str, problems: &mut Problems) {
    let key = path(&["storage", "url"]);
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("sqlite") => {
            if url["sqlite://".len()..].is_empty() {
                problems.report(
                    key,
                    "sqlite:// needs a path, e.g. sqlite://stitch-data/stitch.db",
                );
            }
        }
        Some("postgres" | "postgresql" | "mysql" | "mariadb") => {
            let rest = url.split_once("://").map_or("", |(_, rest)| rest);
            if rest.is_empty() {
                problems.report(
                    key,
                    "a database server URL needs a host and database, e.g. postgres://stitch@db/stitch",
                );
            }
        }
        _ => problems.report(
            key,
            "unsupported storage url; use sqlite://PATH, postgres://… or mysql://…",
        ),
    }
}

fn validate_cluster(config: &Config, problems: &mut Problems) {
    let cluster = &config.cluster;
    if cluster.lease < Duration::from_millis(300) {
        problems.report(path(&["cluster", "lease"]), "must be at least 300ms");
    }
    if cluster.delivery_timeout < Duration::from_secs(1) {
        problems.report(
            path(&["cluster", "delivery_timeout"]),
            "must be at least 1s",
        );
    }
    if cluster.poll_interval.is_zero() {
        problems.report(
            path(&["cluster", "poll_interval"]),
            "must be greater than zero",
        );
    }
}

fn validate_http(http: &HttpConfig, problems: &mut Problems) {
    for (key, value) in [
        ("header_read_timeout", http.header_read_timeout),
        ("body_read_timeout", http.body_read_timeout),
    ] {
        if value.is_zero() {
            problems.report(path(&["http", key]), "must be greater than zero");
        }
    }
    if http.max_connections == 0 {
        problems.report(path(&["http", "max_connections"]), "must be at least 1");
    }
    if http.ws_max_message_bytes < HttpConfig::MIN_WS_MESSAGE_BYTES {
        problems.report(
            path(&["http", "ws_max_message_bytes"]),
            format!(
                "must be at least {} (a WebSocket close or ping frame carries up to 125 bytes)",
                HttpConfig::MIN_WS_MESSAGE_BYTES
            ),
        );
    }
}

fn validate_retention(retention: &RetentionConfig, problems: &mut Problems) {
    use RetentionSetting::After;
    for (key, setting) in [
        ("builds", retention.builds),
        ("events", retention.events),
        ("dead_letters", retention.dead_letters),
    ] {
        if setting == After(Duration::ZERO) {
            problems.report(
                path(&["retention", key]),
                "must be greater than zero; use \"off\" to keep everything",
            );
        }
    }
    if let After(interval) = retention.interval {
        if interval < Duration::from_secs(1) {
            problems.report(
                path(&["retention", "interval"]),
                "must be at least 1s; use \"off\" for no background pruning",
            );
        }
    }
}

/// `[api]`, and that without tokens the server listens on loopback only.
fn validate_api(config: &Config, api: &ApiConfig, problems: &mut Problems, env: Env<'_>) {
    if api.max_body_bytes == 0 {
        problems.report(path(&["api", "max_body_bytes"]), "must be at least 1");
    }
    for (i, name) in api.tokens_env.iter().enumerate() {
        if !env_is_set(env, name) {
            problems.report(
                at_index(&path(&["api", "tokens_env"]), i),
                format!("environment variable {name:?} is unset or empty; it must hold an accepted bearer token"),
            );
        }
    }
    if let Some(url) = &api.public_url {
        if !is_http_url(url) {
            problems.report(
                path(&["api", "public_url"]),
                "must be an http:// or https:// URL (jobs reach the server through it)",
            );
        }
    }
    if api.tokens_env.is_empty()
        && !is_loopback(config.listen)
        && !problems.is_broken(&path(&["api", "tokens_env"]))
    {
        problems.report(
            path(&["listen"]),
            format!(
                "{} is not a loopback address, but api.tokens_env is empty; \
                 without API tokens the server only binds loopback addresses",
                config.listen
            ),
        );
    }
}

/// 127.0.0.0/8, ::1 and IPv4-mapped loopback (as `http::check_bind`).
fn is_loopback(addr: SocketAddr) -> bool {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        std::net::IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// `[spindle]`: the values the Tangled appview and the network will hold
/// the spindle to.
fn validate_spindle(config: &Config, spindle: &SpindleConfig, problems: &mut Problems) {
    let host = spindle.hostname.trim();
    if host.is_empty() {
        problems.report(path(&["spindle", "hostname"]), "must not be empty");
    } else if host.contains("://") || host.contains('/') || host.contains(char::is_whitespace) {
        problems.report(
            path(&["spindle", "hostname"]),
            "must be a bare hostname (e.g. spindle.example.com), without scheme or path",
        );
    }
    if !spindle.owner.starts_with("did:") || spindle.owner.len() < 8 {
        problems.report(
            path(&["spindle", "owner"]),
            "must be the operator's DID, e.g. did:plc:abc123",
        );
    }
    if !config.queues.contains_key(&spindle.default_queue)
        && !problems.is_broken(&path(&["queues"]))
    {
        problems.report(
            path(&["spindle", "default_queue"]),
            format!(
                "{:?} is not a configured queue (known: {})",
                spindle.default_queue,
                config.queues.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        );
    }
    if !(spindle.jetstream_url.starts_with("ws://") || spindle.jetstream_url.starts_with("wss://"))
    {
        problems.report(
            path(&["spindle", "jetstream_url"]),
            "must be a ws:// or wss:// URL",
        );
    }
    if !is_http_url(&spindle.plc_url) {
        problems.report(
            path(&["spindle", "plc_url"]),
            "must be an http:// or https:// URL",
        );
    }
}
