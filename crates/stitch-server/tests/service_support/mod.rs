//! A whole service in the test's process for the suites that need the
//! stages as well as the API (`storage_backends`, `retention`,
//! `retention_metrics`): the state opened from the test's config, both
//! stages, HTTP on loopback; verbs over HTTP, waits on the committed events
//! and the queue's claim passes, and SQL on whichever database it runs on.
//! (The `http_*` suites use `http_support`, a server without stages.)

#![allow(dead_code)] // each test file uses its own part of the verbs

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use stitch_core::BuildStatus;
use stitch_server::config::Config;
use stitch_server::http::{self, HttpOptions};
use stitch_server::stages;
use stitch_server::state::AppState;
use stitch_store::StorePool;
use stitch_testkit::watch_until;
use tokio_util::sync::CancellationToken;

/// A running service: HTTP on loopback plus both stages.
pub struct Service {
    pub base: String,
    pub state: AppState,
    pub config: Config,
    pub client: reqwest::Client,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Service {
    /// Starts the service `config` describes; it is given the data
    /// directory, a fresh temporary one.
    pub async fn start(config: impl FnOnce(PathBuf) -> Config) -> Service {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path().join("data"));
        let state = AppState::open(config.clone()).await.unwrap();
        let stop = CancellationToken::new();
        stages::start(&state, stop.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        state.set_bound_addr(addr);
        let router = http::router_with(state.clone(), Vec::new(), HttpOptions::default());
        let shutdown = stop.clone();
        tokio::spawn(http::serve(listener, router, async move {
            shutdown.cancelled().await
        }));
        Service {
            base: format!("http://{addr}"),
            state,
            config,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            stop,
            _dir: dir,
        }
    }

    /// `POST /v1/queues/{queue}/builds` with `body`: the status and answer.
    pub async fn create(&self, queue: &str, body: Value) -> (u16, Value) {
        let resp = self
            .client
            .post(format!("{}/v1/queues/{queue}/builds", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    /// Creates a build of `head` on `queue`, which must be accepted; its id.
    pub async fn create_ok(&self, queue: &str, head: &str) -> String {
        let (status, body) = self.create(queue, json!({"head": [head]})).await;
        assert_eq!(status, 202, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    /// `GET {path}`: the status and the JSON answer (null if none).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// The build's record, which must exist.
    pub async fn build(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/v1/builds/{id}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Reads the build over HTTP after each committed event until it is
    /// terminal; its record then.
    pub async fn wait_terminal(&self, id: &str) -> Value {
        let mut events = self.state.event_seq();
        watch_until(&mut events, &format!("{id} terminal"), move || async move {
            let b = self.build(id).await;
            let status: BuildStatus = serde_json::from_value(b["status"].clone()).unwrap();
            status.is_terminal().then_some(b)
        })
        .await
    }

    /// Waits until every queue message of the builds is done: a build is
    /// terminal a moment before its last message is acked, and an ack
    /// announces nothing, but the claim pass after it moves the cursor past
    /// it, so the count is re-read after each pass.
    pub async fn wait_queue_done(&self, ids: &[&str]) {
        let cursor = match self.state.store().pool() {
            StorePool::MySql(_) => "`cursor`",
            _ => "cursor",
        };
        let mut passes = self.state.queue().admin().claim_passes();
        for id in ids {
            let sql = format!(
                "SELECT COUNT(*) FROM mq_messages m WHERE m.partition_key = '{id}' \
                 AND m.seq > (SELECT MIN(p.{cursor}) FROM mq_partitions p \
                 WHERE p.topic = m.topic AND p.partition_key = m.partition_key)"
            );
            let (sql, done) = (sql.as_str(), format!("{id}: queue messages done"));
            watch_until(&mut passes, &done, move || async move {
                (self.count(sql).await == 0).then_some(())
            })
            .await;
        }
    }

    /// Runs `sql` on the service's database.
    pub async fn exec(&self, sql: &str) {
        match self.state.store().pool() {
            StorePool::Sqlite(p) => drop(sqlx::query(sql).execute(&p).await.unwrap()),
            StorePool::Postgres(p) => drop(sqlx::query(sql).execute(&p).await.unwrap()),
            StorePool::MySql(p) => drop(sqlx::query(sql).execute(&p).await.unwrap()),
        }
    }

    /// One integer from `sql` (a `COUNT(*)`) on the service's database.
    pub async fn count(&self, sql: &str) -> i64 {
        match self.state.store().pool() {
            StorePool::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(&p).await.unwrap(),
            StorePool::Postgres(p) => sqlx::query_scalar(sql).fetch_one(&p).await.unwrap(),
            StorePool::MySql(p) => sqlx::query_scalar(sql).fetch_one(&p).await.unwrap(),
        }
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    /// Stops the stages and the listener and closes the store.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.state.store().close().await;
    }
}
