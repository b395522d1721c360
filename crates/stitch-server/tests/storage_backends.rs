//! The service end to end on each database `storage.url` can name: a real
//! server on loopback with its stages running, builds created over HTTP on
//! the `fake` and `local` runners, followed until they are terminal — on
//! SQLite, PostgreSQL (`STITCH_TEST_POSTGRES_URL`, a schema of its own) and
//! MariaDB/MySQL (`STITCH_TEST_MYSQL_URL`, a database of its own), and on
//! both servers over verified TLS (`STITCH_TEST_POSTGRES_TLS_URL`,
//! `STITCH_TEST_MYSQL_TLS_URL`, `STITCH_TEST_TLS_CA`). Unset,
//! the server tests skip, unless `STITCH_REQUIRE_DATABASES=1`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use stitch_core::BuildStatus;
use stitch_server::config::{
    Config, FakeSection, LocalSection, PollConfig, QueueConfig, RetryConfig, RunnerSection,
};
use stitch_store::{BackendKind, EventKind};

// The queue's per-test schema/database helpers (skip or fail when a server
// is missing), shared rather than copied.
mod service_support;
#[path = "../../stitch-mq/tests/support/mod.rs"]
mod support;
mod tls_support;
use service_support::Service;
use tls_support::connection_uses_tls;

fn fast() -> QueueConfig {
    QueueConfig {
        poll: PollConfig {
            accepted: Duration::from_millis(100),
            running: Duration::from_millis(100),
        },
        retry: RetryConfig {
            max_attempts: 3,
            initial: Duration::from_millis(50),
            max: Duration::from_millis(200),
        },
        runner: RunnerSection::Fake(FakeSection {
            accept_delay: Duration::from_millis(100),
            run_duration: Duration::from_millis(300),
            slow_factor: 2,
        }),
        ..QueueConfig::default()
    }
}

fn config(data_dir: PathBuf, storage_url: Option<String>) -> Config {
    let mut queues = BTreeMap::new();
    queues.insert("default".to_string(), fast());
    queues.insert(
        "ci".to_string(),
        QueueConfig {
            runner: RunnerSection::Local(LocalSection {
                command: "echo \"building $STITCH_BUILD_ID\"; case \"$STITCH_HEAD\" in *fail*) exit 3;; esac"
                    .to_string(),
                workdir: Some(".".into()),
                cancel_grace: Duration::from_millis(500),
                env: BTreeMap::new(),
                pass_env: Vec::new(),
                user: None,
                group: None,
            }),
            concurrency: Some(4),
            ..fast()
        },
    );
    let mut config = Config {
        data_dir,
        queues,
        ..Config::default()
    };
    config.storage.url = storage_url;
    config
}

/// Builds on the fake and the local runner reach their outcomes through the
/// API, an idempotent replay answers 200 with the same build, and the event
/// log is gapless with every build's history in order.
async fn builds_reach_their_outcome_through_the_api(service: Service, expected: BackendKind) {
    assert_eq!(service.state.store().backend(), expected);
    let mut want = Vec::new();
    for (queue, head, status) in [
        ("default", "https://forge/c/1", "succeeded"),
        ("default", "https://forge/c/2?stitch-fake=fail", "failed"),
        ("ci", "c/ok", "succeeded"),
        ("ci", "c/fail", "failed"),
    ] {
        let (code, body) = service.create(queue, json!({"head": [head]})).await;
        assert_eq!(code, 202, "{body}");
        want.push((body["id"].as_str().unwrap().to_string(), status));
    }
    let keyed = json!({"head": ["https://forge/c/3"], "idempotency_key": "k-1"});
    let (code, first) = service.create("default", keyed.clone()).await;
    assert_eq!(code, 202, "{first}");
    let (code, replay) = service.create("default", keyed).await;
    assert_eq!(code, 200, "{replay}");
    assert_eq!(replay["id"], first["id"]);
    want.push((first["id"].as_str().unwrap().to_string(), "succeeded"));

    for (id, status) in &want {
        let b = service.wait_terminal(id).await;
        assert_eq!(b["status"], *status, "{b}");
    }
    let local_fail = service.build(&want[3].0).await;
    assert_eq!(local_fail["metadata"]["exit_status"], "3", "{local_fail}");

    let store = service.state.store();
    let all = store.events_after(0, 10_000).await.unwrap();
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "the event log has a gap");
    }
    for (id, _) in &want {
        let statuses: Vec<BuildStatus> = store
            .events_for_build(&id.parse().unwrap())
            .await
            .unwrap()
            .iter()
            .filter(|e| e.kind == EventKind::Status)
            .map(|e| e.status)
            .collect();
        assert_eq!(statuses.first(), Some(&BuildStatus::Accepted));
        assert!(statuses.last().is_some_and(|s| s.is_terminal()));
    }
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_builds_reach_their_outcome_through_the_api() {
    let service = Service::start(|dir| config(dir, None)).await;
    builds_reach_their_outcome_through_the_api(service, BackendKind::Sqlite).await;
}

/// `STITCH_TEST_POSTGRES_URL` with the search path set to `schema`.
fn postgres_url(schema: &str) -> String {
    let base = std::env::var("STITCH_TEST_POSTGRES_URL").unwrap();
    let mut url = reqwest::Url::parse(&base).unwrap();
    url.query_pairs_mut()
        .append_pair("options", &format!("-csearch_path={schema}"));
    url.to_string()
}

/// `STITCH_TEST_MYSQL_URL` naming `database`.
fn mysql_url(database: &str) -> String {
    let base = std::env::var("STITCH_TEST_MYSQL_URL").unwrap();
    let mut url = reqwest::Url::parse(&base).unwrap();
    url.set_path(&format!("/{database}"));
    url.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_builds_reach_their_outcome_through_the_api() {
    let Some(db) = support::PgDatabase::connect().await else {
        return;
    };
    db.options("server").await;
    let service = Service::start(|dir| config(dir, Some(postgres_url(&db.schema("server"))))).await;
    builds_reach_their_outcome_through_the_api(service, BackendKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_builds_reach_their_outcome_through_the_api() {
    let Some(db) = support::MySqlDatabase::connect().await else {
        return;
    };
    db.options("server").await;
    let service = Service::start(|dir| config(dir, Some(mysql_url(&db.database("server"))))).await;
    builds_reach_their_outcome_through_the_api(service, BackendKind::MySql).await;
}

// The same over TLS: `STITCH_TEST_POSTGRES_TLS_URL` / `STITCH_TEST_MYSQL_TLS_URL`
// name servers that refuse connections without TLS, with certificates
// signed by `STITCH_TEST_TLS_CA` (.ci/database-tls.sh sets them up).

/// `var`'s URL with the query parameters `params` added.
fn url_with(var: &str, params: &[(&str, &str)]) -> reqwest::Url {
    let base = std::env::var(var).unwrap();
    let mut url = reqwest::Url::parse(&base).unwrap();
    url.query_pairs_mut().extend_pairs(params);
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_verified_tls_builds_reach_their_outcome_through_the_api() {
    let Some(db) = support::PgDatabase::connect_to("STITCH_TEST_POSTGRES_TLS_URL").await else {
        return;
    };
    let Some(ca) = support::url_from_env("STITCH_TEST_TLS_CA") else {
        return;
    };
    db.options("server").await;
    let url = url_with(
        "STITCH_TEST_POSTGRES_TLS_URL",
        &[
            ("sslmode", "verify-full"),
            ("sslrootcert", &ca),
            ("options", &format!("-csearch_path={}", db.schema("server"))),
        ],
    );
    let service = Service::start(|dir| config(dir, Some(url.to_string()))).await;
    assert!(connection_uses_tls(service.state.store()).await);
    builds_reach_their_outcome_through_the_api(service, BackendKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_over_verified_tls_builds_reach_their_outcome_through_the_api() {
    let Some(db) = support::MySqlDatabase::connect_to("STITCH_TEST_MYSQL_TLS_URL").await else {
        return;
    };
    let Some(ca) = support::url_from_env("STITCH_TEST_TLS_CA") else {
        return;
    };
    db.options("server").await;
    let mut url = url_with(
        "STITCH_TEST_MYSQL_TLS_URL",
        &[("ssl-mode", "VERIFY_IDENTITY"), ("ssl-ca", &ca)],
    );
    url.set_path(&format!("/{}", db.database("server")));
    let service = Service::start(|dir| config(dir, Some(url.to_string()))).await;
    assert!(connection_uses_tls(service.state.store()).await);
    builds_reach_their_outcome_through_the_api(service, BackendKind::MySql).await;
}
