//! Retention end to end on each database: a real server on loopback with its
//! stages, builds run on the `fake` and `local` runners, then aged by
//! writing their `finished_at` (never by waiting) and pruned by a pass.
//! Pruned builds answer 404, a pruned event position 410 on SSE,
//! `Last-Event-ID` and WebSocket, local state goes with its build, and two
//! pruners on one database never run a pass at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use stitch_server::config::{
    Config, FakeSection, LocalSection, PollConfig, QueueConfig, RetentionSetting, RunnerSection,
};
use stitch_server::retention::{Pruner, LEASE};
use stitch_server::state;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

mod service_support;
#[path = "../../stitch-mq/tests/support/mod.rs"]
mod support;
use service_support::Service;

fn fast() -> QueueConfig {
    QueueConfig {
        poll: PollConfig {
            accepted: Duration::from_millis(100),
            running: Duration::from_millis(100),
        },
        runner: RunnerSection::Fake(FakeSection {
            accept_delay: Duration::from_millis(50),
            run_duration: Duration::from_millis(100),
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
                command: "echo built".to_string(),
                workdir: None,
                cancel_grace: Duration::from_millis(500),
                env: BTreeMap::new(),
                pass_env: Vec::new(),
                user: None,
                group: None,
            }),
            concurrency: Some(2),
            ..fast()
        },
    );
    let mut config = Config {
        data_dir,
        queues,
        ..Config::default()
    };
    // Passes run when the test says so.
    config.retention.interval = RetentionSetting::Off;
    config.storage.url = storage_url;
    config
}

/// What retention's cases read of the service beyond the shared verbs.
impl Service {
    /// Writes a finish time long ago (beyond the 30-day default window).
    async fn age(&self, ids: &[&str]) {
        let sql = format!(
            "UPDATE builds SET finished_at = 1 WHERE id IN ({})",
            ids.iter()
                .map(|id| format!("'{id}'"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.exec(&sql).await;
    }

    /// The queue messages stored for a build (its partition key is its id).
    async fn queue_messages(&self, id: &str) -> i64 {
        self.count(&format!(
            "SELECT COUNT(*) FROM mq_messages WHERE partition_key = '{id}'"
        ))
        .await
    }

    fn local_dir(&self, id: &str) -> PathBuf {
        stitch_server::runners::local_state_dir(&self.config, "ci").join(id)
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A pass deletes exactly the aged builds with their local state; they are
/// 404 afterwards; a position in the pruned part of the event log is 410
/// (with the oldest retained seq) on SSE `?after=`, `Last-Event-ID` and the
/// WebSocket handshake; the position just before the oldest is served.
async fn a_pass_prunes_aged_builds_and_clients_learn_it(s: Service) {
    let old_local = s.create_ok("ci", "c/1").await;
    let young_local = s.create_ok("ci", "c/2").await;
    let old_fake = s.create_ok("default", "https://forge/c/3").await;
    for id in [&old_local, &young_local, &old_fake] {
        s.wait_terminal(id).await;
    }
    assert!(s.local_dir(&old_local).join("state.json").exists());
    s.wait_queue_done(&[&old_local, &old_fake]).await;
    // Each build has its `trigger` and `signal` message.
    for id in [&old_local, &young_local, &old_fake] {
        assert_eq!(s.queue_messages(id).await, 2, "{id}");
    }
    s.age(&[&old_local, &old_fake]).await;

    let pruner = Pruner::for_service(&s.state);
    let preview = pruner.preview(now_ms()).await.unwrap();
    assert!(preview.dry_run);
    assert_eq!(preview.builds, 2, "{preview:?}");
    // The preview changed nothing.
    assert_eq!(s.get(&format!("/v1/builds/{old_local}")).await.0, 200);
    assert!(s.local_dir(&old_local).exists());
    assert_eq!(s.get("/v1/events?after=0").await.0, 200);

    let report = pruner.run_pass(now_ms()).await.unwrap();
    assert_eq!(report.lease_held_by, None);
    assert_eq!(report.builds, 2, "{report:?}");
    assert_eq!(report.local_states, 1, "{report:?}");
    assert_eq!(report.events, preview.events);
    for id in [&old_local, &old_fake] {
        let (status, body) = s.get(&format!("/v1/builds/{id}")).await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error"]["code"], "build_not_found");
    }
    assert_eq!(s.get(&format!("/v1/builds/{young_local}")).await.0, 200);
    // The pruned builds' queue messages went with them; the retained
    // build's stay (they still deduplicate a republish).
    assert_eq!(report.queue_messages, 4, "{report:?}");
    assert_eq!(s.queue_messages(&old_local).await, 0);
    assert_eq!(s.queue_messages(&old_fake).await, 0);
    assert_eq!(s.queue_messages(&young_local).await, 2);
    // The database's size is reported on every backend.
    assert!(report.database_bytes.is_some_and(|b| b > 0), "{report:?}");
    assert!(!s.local_dir(&old_local).exists(), "local state went");
    assert!(s.local_dir(&young_local).join("state.json").exists());

    let oldest = s.state.store().oldest_retained_seq().await.unwrap();
    assert_eq!(report.oldest_event_seq, oldest);
    assert!(oldest > 1);
    // `?after=` in the pruned part.
    let (status, body) = s.get("/v1/events?after=0").await;
    assert_eq!(status, 410, "{body}");
    assert_eq!(body["error"]["code"], "events_pruned");
    assert_eq!(body["error"]["oldest_seq"], oldest);
    // `Last-Event-ID` in the pruned part.
    let resp = s
        .client
        .get(format!("{}/v1/events", s.base))
        .header("accept", "text/event-stream")
        .header("last-event-id", (oldest - 2).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 410);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "events_pruned");
    assert_eq!(body["error"]["oldest_seq"], oldest);
    // The WebSocket form, answered before the upgrade.
    let url = format!("{}/v1/events?after=0", s.base.replace("http://", "ws://"));
    let err = tokio_tungstenite::connect_async(url.into_client_request().unwrap())
        .await
        .expect_err("no upgrade");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status().as_u16(), 410);
            let body: Value =
                serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["error"]["code"], "events_pruned");
            assert_eq!(body["error"]["oldest_seq"], oldest);
        }
        other => panic!("expected an HTTP 410, got {other}"),
    }
    // Right before the oldest retained: served.
    let resp = s
        .client
        .get(format!("{}/v1/events?after={}", s.base, oldest - 1))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    drop(resp);
    s.shutdown().await;
}

/// Two pruners on one database (each on its own pool, as two processes):
/// while one holds the lease the other's pass observes it held and deletes
/// nothing; once the holder's pass is done and released, the other runs.
/// Deterministic: the lease is taken at a time the test passes in.
async fn two_pruners_never_prune_at_once(s: Service) {
    let id = s.create_ok("default", "https://forge/c/9").await;
    s.wait_terminal(&id).await;
    s.age(&[&id]).await;
    let (other_store, other_driver) = state::open_storage(&s.config).await.unwrap();
    let other_queue = stitch_mq::Queue::new(
        other_driver.into_shared(),
        stitch_mq::QueueConfig {
            gc_interval: None,
            ..stitch_mq::QueueConfig::default()
        },
    );
    let a = Pruner::for_service(&s.state);
    let b = Pruner::for_config(other_store.clone(), other_queue.admin(), &s.config);
    assert_ne!(a.owner(), b.owner());
    let now = now_ms();

    // A is in the middle of a pass: it holds the lease.
    assert!(s
        .state
        .store()
        .try_lease(LEASE, a.owner(), now, 300_000)
        .await
        .unwrap());
    let skipped = b.run_pass(now).await.unwrap();
    assert_eq!(skipped.lease_held_by.as_deref(), Some(a.owner()));
    assert_eq!(skipped.builds, 0);
    assert_eq!(
        s.get(&format!("/v1/builds/{id}")).await.0,
        200,
        "B deleted nothing"
    );
    assert_eq!(b.preview(now).await.unwrap().builds, 1);

    let ran = a.run_pass(now).await.unwrap();
    assert_eq!((ran.lease_held_by, ran.builds), (None, 1));
    assert_eq!(s.get(&format!("/v1/builds/{id}")).await.0, 404);
    // A released the lease at the end of its pass: B's next pass runs.
    let next = b.run_pass(now).await.unwrap();
    assert_eq!((next.lease_held_by, next.builds), (None, 0));
    other_store.close().await;
    s.shutdown().await;
}

fn postgres_url(schema: &str) -> String {
    let base = std::env::var("STITCH_TEST_POSTGRES_URL").unwrap();
    let mut url = reqwest::Url::parse(&base).unwrap();
    url.query_pairs_mut()
        .append_pair("options", &format!("-csearch_path={schema}"));
    url.to_string()
}

fn mysql_url(database: &str) -> String {
    let base = std::env::var("STITCH_TEST_MYSQL_URL").unwrap();
    let mut url = reqwest::Url::parse(&base).unwrap();
    url.set_path(&format!("/{database}"));
    url.to_string()
}

macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Service::start(|dir| super::config(dir, None)).await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = super::support::PgDatabase::connect().await else {
                        return;
                    };
                    db.options("server").await;
                    let url = super::postgres_url(&db.schema("server"));
                    super::$name(super::Service::start(|dir| super::config(dir, Some(url))).await).await;
                }
            )*
        }
        mod mysql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = super::support::MySqlDatabase::connect().await else {
                        return;
                    };
                    db.options("server").await;
                    let url = super::mysql_url(&db.database("server"));
                    super::$name(super::Service::start(|dir| super::config(dir, Some(url))).await).await;
                }
            )*
        }
    };
}

on_every_backend!(
    a_pass_prunes_aged_builds_and_clients_learn_it,
    two_pruners_never_prune_at_once,
);
