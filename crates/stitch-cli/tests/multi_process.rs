//! Several `stitch serve` processes on one database (issue #7): they split
//! the stages' partitions, one is SIGKILLed in the middle of 1,000 builds on
//! a shared `local` queue, and the survivors finish the work. Every build
//! ends terminal, none runs twice, the dead process's partitions move to the
//! survivors, and a subscriber on a survivor sees every build's events in a
//! gapless sequence. A second pair of tests drops every database connection
//! of a running server and checks that it carries on.
//!
//! Each test gets a schema (PostgreSQL) or database (MariaDB) of its own;
//! without `STITCH_TEST_POSTGRES_URL` / `STITCH_TEST_MYSQL_URL` they skip,
//! unless `STITCH_REQUIRE_DATABASES=1`.

mod support;

// The queue's per-test schema/database helpers, shared rather than copied.
#[path = "../../stitch-mq/tests/support/mod.rs"]
mod db;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use parking_lot::Mutex;
use sqlx::{ConnectOptions, Connection};
use support::serve::{Serve, STITCH};

const BUILDS: usize = 1000;
const LEASE: Duration = Duration::from_secs(3);

/// Where the servers keep their state: a database URL plus a way to look at
/// the queue's leases and to cut the servers' connections.
enum Backend {
    Postgres {
        db: db::PgDatabase,
        name: &'static str,
    },
    MySql {
        db: db::MySqlDatabase,
        name: &'static str,
    },
}

impl Backend {
    async fn postgres(name: &'static str) -> Option<Self> {
        let db = db::PgDatabase::connect().await?;
        db.options(name).await; // creates the schema
        Some(Self::Postgres { db, name })
    }

    async fn mysql(name: &'static str) -> Option<Self> {
        let db = db::MySqlDatabase::connect().await?;
        db.options(name).await; // creates the database
        Some(Self::MySql { db, name })
    }

    /// `storage.url` for the servers. On PostgreSQL the connections carry
    /// the schema's application name, so the test can find them (and only
    /// them) in `pg_stat_activity`.
    fn storage_url(&self) -> String {
        match self {
            Self::Postgres { db, name } => {
                let base = std::env::var("STITCH_TEST_POSTGRES_URL").unwrap();
                let mut url = reqwest::Url::parse(&base).unwrap();
                url.query_pairs_mut()
                    .append_pair("options", &format!("-csearch_path={}", db.schema(name)))
                    .append_pair("application_name", &db.application_name(name, "serve"));
                url.to_string()
            }
            Self::MySql { db, name } => {
                let base = std::env::var("STITCH_TEST_MYSQL_URL").unwrap();
                let mut url = reqwest::Url::parse(&base).unwrap();
                url.set_path(&format!("/{}", db.database(name)));
                url.to_string()
            }
        }
    }

    /// Live leases per holder (`<stage>-stage@<node>`) on `topic`.
    async fn leases(&self, topic: &str) -> BTreeMap<String, i64> {
        let now = chrono::Utc::now().timestamp_millis();
        let rows: Vec<(String, i64)> = match self {
            Self::Postgres { db, name } => {
                let mut c = db.options(name).await.connect().await.unwrap();
                let rows = sqlx::query_as(
                    "SELECT lease_owner, COUNT(*) FROM mq_partitions \
                     WHERE topic = $1 AND lease_owner IS NOT NULL AND lease_expires > $2 \
                     GROUP BY lease_owner",
                )
                .bind(topic)
                .bind(now)
                .fetch_all(&mut c)
                .await
                .unwrap();
                let _ = c.close().await;
                rows
            }
            Self::MySql { db, name } => {
                let mut c = db.options(name).await.connect().await.unwrap();
                let rows = sqlx::query_as(
                    "SELECT CAST(lease_owner AS CHAR), CAST(COUNT(*) AS SIGNED) FROM mq_partitions \
                     WHERE topic = ? AND lease_owner IS NOT NULL AND lease_expires > ? \
                     GROUP BY lease_owner",
                )
                .bind(topic)
                .bind(now)
                .fetch_all(&mut c)
                .await
                .unwrap();
                let _ = c.close().await;
                rows
            }
        };
        rows.into_iter().collect()
    }

    /// Ends every server connection of the test's servers (never anyone
    /// else's); returns how many.
    async fn drop_connections(&self) -> i64 {
        match self {
            Self::Postgres { db, name } => db.terminate_connections(name, "serve").await,
            Self::MySql { db, name } => {
                let base = std::env::var("STITCH_TEST_MYSQL_URL").unwrap();
                let mut admin = sqlx::mysql::MySqlConnectOptions::from_str(&base)
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
                let ids: Vec<u64> = sqlx::query_scalar(
                    "SELECT CAST(id AS UNSIGNED) FROM information_schema.processlist \
                     WHERE db = ? AND id <> CONNECTION_ID()",
                )
                .bind(db.database(name))
                .fetch_all(&mut admin)
                .await
                .unwrap();
                let mut killed = 0;
                for id in ids {
                    // A connection may end on its own meanwhile.
                    if sqlx::query(&format!("KILL CONNECTION {id}"))
                        .execute(&mut admin)
                        .await
                        .is_ok()
                    {
                        killed += 1;
                    }
                }
                let _ = admin.close().await;
                killed
            }
        }
    }
}

fn config(storage_url: &str, ran: &Path) -> String {
    format!(
        r#"data_dir = "{{data}}"
[storage]
url = "{storage_url}"
[cluster]
lease = "{lease}ms"
delivery_timeout = "15s"
poll_interval = "200ms"
[queues.ci]
runner = "local"
concurrency = 16
poll = {{ accepted = "200ms", running = "200ms" }}
[queues.ci.local]
command = "echo \"$STITCH_BUILD_ID\" >> {ran}; sleep 0.2"
cancel_grace = "1s"
"#,
        lease = LEASE.as_millis(),
        ran = ran.display()
    )
}

/// `stitch migrate` once, before the servers start (as operations.md says).
fn migrate(storage_url: &str, data: &Path) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stitch"))
        .arg("migrate")
        .arg("--data-dir")
        .arg(data)
        .env_remove("STITCH_CONFIG")
        .env("STITCH_STORAGE__URL", storage_url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// Servers named `node-0`, `node-1`, … on one database and data directory.
async fn start_servers(config: &str, data: &Path, n: usize) -> Vec<Serve> {
    let servers: Vec<Serve> = (0..n)
        .map(|i| {
            let node = format!("node-{i}");
            Serve::spawn_on(
                STITCH,
                config,
                Some(data),
                &[("STITCH_NODE_NAME", node.as_str())],
            )
        })
        .collect();
    for s in &servers {
        s.wait_healthy().await;
    }
    servers
}

fn ran(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Creates `count` builds, round-robin over `servers`, a few at a time.
async fn create_builds(http: &reqwest::Client, servers: &[&Serve], count: usize) -> Vec<String> {
    let bases: Vec<String> = servers.iter().map(|s| s.base.clone()).collect();
    let alive = Arc::new(Mutex::new(vec![true; bases.len()]));
    create_builds_on(http.clone(), bases, alive, count).await
}

/// Creates `count` builds, round-robin over the servers marked alive, 8 at
/// a time. A request that fails on its way (the server was killed) or is
/// answered 503 (its database connection was cut) is sent again, to the next
/// live server, with the same idempotency key, so a build whose create
/// committed just before the failure is not created twice.
async fn create_builds_on(
    http: reqwest::Client,
    bases: Vec<String>,
    alive: Arc<Mutex<Vec<bool>>>,
    count: usize,
) -> Vec<String> {
    let run = rand::random::<u32>();
    futures::stream::iter(0..count)
        .map(|i| {
            let http = http.clone();
            let bases = bases.clone();
            let alive = alive.clone();
            async move {
                let body = serde_json::json!({
                    "head": [format!("change/{i}")],
                    "idempotency_key": format!("{run:08x}-{i}"),
                });
                for attempt in 0..bases.len() * 4 {
                    let n = (i + attempt) % bases.len();
                    if !alive.lock()[n] {
                        continue;
                    }
                    let url = format!("{}/v1/queues/ci/builds", bases[n]);
                    let Ok(r) = http.post(url).json(&body).send().await else {
                        continue;
                    };
                    // 503: the database connection was lost under this
                    // request (the connection-drop test); a client sends it
                    // again with the same idempotency key.
                    if r.status().as_u16() == 503 {
                        continue;
                    }
                    assert!(
                        matches!(r.status().as_u16(), 200 | 202),
                        "{}",
                        r.text().await.unwrap_or_default()
                    );
                    let v: serde_json::Value = r.json().await.unwrap();
                    return v["id"].as_str().unwrap().to_string();
                }
                panic!("no server accepted build {i}");
            }
        })
        .buffered(8)
        .collect()
        .await
}

/// A `/v1/events` SSE subscriber: every event it received, by seq.
struct EventTail {
    events: Arc<Mutex<Vec<serde_json::Value>>>,
    /// The last seq received.
    last: tokio::sync::watch::Receiver<u64>,
    /// How the stream ended, once it has (the server closed it, or a read
    /// failed): a failed wait says so instead of only counting.
    ended: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl EventTail {
    async fn connect(http: &reqwest::Client, server: &Serve) -> EventTail {
        let r = http
            .get(format!("{}/v1/events?after=0", server.base))
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let (last_tx, last) = tokio::sync::watch::channel(0u64);
        let mut body = r.bytes_stream().map_err(std::io::Error::other);
        let ended = Arc::new(Mutex::new(None));
        let end = ended.clone();
        let task = tokio::spawn(async move {
            let mut buf: Vec<u8> = Vec::new();
            let how = loop {
                match body.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(e)) => break format!("reading it failed: {e}"),
                    None => break "the server closed it".to_string(),
                }
                for event in stitch_testkit::serve::take_sse_events(&mut buf) {
                    let seq = event["seq"].as_u64().unwrap_or(0);
                    sink.lock().push(event);
                    last_tx.send_replace(seq);
                }
            };
            *end.lock() = Some(how);
            // Wakes a waiter: nothing more will come.
            last_tx.send_modify(|_| {});
        });
        EventTail {
            events,
            last,
            ended,
            task,
        }
    }

    /// Waits until the subscriber saw `seq`.
    async fn wait_for(&self, seq: u64, within: Duration) {
        let mut last = self.last.clone();
        let seen = tokio::time::timeout(within, last.wait_for(|s| *s >= seq)).await;
        if !matches!(seen, Ok(Ok(_))) {
            panic!(
                "the subscriber stopped at {}, expected {seq}",
                *self.last.borrow()
            );
        }
    }

    /// Builds the subscriber saw running or ended.
    fn started(&self) -> usize {
        let events = self.events.lock();
        let started: BTreeSet<&str> = events
            .iter()
            .filter(|e| {
                matches!(
                    e["status"].as_str(),
                    Some("running" | "succeeded" | "failed" | "cancelled")
                )
            })
            .filter_map(|e| e["build_id"].as_str())
            .collect();
        started.len()
    }

    /// Waits until the subscriber saw `n` builds running or ended, re-counting
    /// after each event it receives; on failure says whether the stream
    /// ended and shows `server`'s log.
    async fn wait_started(&self, n: usize, within: Duration, server: &Serve) {
        let mut last = self.last.clone();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // Marked seen before counting: an event after it wakes the wait.
            last.borrow_and_update();
            let started = self.started();
            if started >= n {
                return;
            }
            let ended = self.ended.lock().clone();
            let next = match ended {
                Some(_) => None,
                None => tokio::time::timeout_at(deadline, last.changed()).await.ok(),
            };
            assert!(
                matches!(next, Some(Ok(()))),
                "{started} of {n} builds started within {within:?}; the event stream: {}; \
                 last seq {}; server log:\n{}",
                ended.as_deref().unwrap_or("open"),
                *self.last.borrow(),
                server.log()
            );
        }
    }
}

impl Drop for EventTail {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The highest event seq in the log (read from the database: what the
/// subscriber must reach).
async fn latest_seq(backend: &Backend) -> u64 {
    let seq: i64 = match backend {
        Backend::Postgres { db, name } => {
            let mut c = db.options(name).await.connect().await.unwrap();
            sqlx::query_scalar("SELECT next_seq - 1 FROM event_seq WHERE id = 1")
                .fetch_one(&mut c)
                .await
                .unwrap()
        }
        Backend::MySql { db, name } => {
            let mut c = db.options(name).await.connect().await.unwrap();
            sqlx::query_scalar("SELECT CAST(next_seq - 1 AS SIGNED) FROM event_seq WHERE id = 1")
                .fetch_one(&mut c)
                .await
                .unwrap()
        }
    };
    seq as u64
}

/// Every build terminal (at most `within`), as `server` reports them: waits
/// on its event stream, then reads each build once.
async fn wait_all_terminal(
    http: &reqwest::Client,
    server: &Serve,
    ids: &[String],
    within: Duration,
) -> BTreeMap<String, serde_json::Value> {
    server.wait_all_terminal(http, ids, within).await;
    futures::stream::iter(ids)
        .map(|id| async move { (id.clone(), server.get(http, id).await) })
        .buffered(16)
        .collect()
        .await
}

/// The checks after the work is done: terminal, at most once, events gapless
/// and complete as `tail` saw them.
async fn check_outcome(
    backend: &Backend,
    builds: &BTreeMap<String, serde_json::Value>,
    ran_file: &Path,
    tail: &EventTail,
) -> BTreeMap<String, usize> {
    let mut runs: HashMap<String, usize> = HashMap::new();
    for id in ran(ran_file) {
        *runs.entry(id).or_default() += 1;
    }
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "ran more than once: {twice:?}");
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for (id, b) in builds {
        let status = b["status"].as_str().unwrap();
        *outcomes.entry(status.to_string()).or_default() += 1;
        match status {
            "succeeded" => assert_eq!(runs.get(id), Some(&1), "{b:#}"),
            _ => {
                let error = b["metadata"]["error"].as_str().unwrap_or_default();
                assert!(error.contains("process lost"), "{b:#}");
            }
        }
    }

    let latest = latest_seq(backend).await;
    tail.wait_for(latest, Duration::from_secs(30)).await;
    let events = tail.events.lock().clone();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=latest).collect::<Vec<_>>(), "gap or duplicate");
    let mut terminal_seen: BTreeSet<&str> = BTreeSet::new();
    for e in &events {
        if matches!(
            e["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            terminal_seen.insert(e["build_id"].as_str().unwrap());
        }
    }
    for (id, b) in builds {
        assert!(
            terminal_seen.contains(id.as_str()),
            "no terminal event for {b:#}"
        );
    }
    outcomes
}

async fn servers_share_the_work_and_survive_a_sigkill(backend: Backend, processes: usize) {
    let started = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let ran_file = work.path().join("ran.txt");
    let url = backend.storage_url();
    migrate(&url, &data);
    let config = config(&url, &ran_file);
    let mut servers = start_servers(&config, &data, processes).await;
    let http = reqwest::Client::new();
    // A subscriber on a survivor, connected before anything happens.
    let tail = EventTail::connect(&http, &servers[1]).await;

    // Builds are created on every process while they run; node-0 dies in
    // the middle.
    let bases: Vec<String> = servers.iter().map(|s| s.base.clone()).collect();
    let alive = Arc::new(Mutex::new(vec![true; processes]));
    let creating = tokio::spawn(create_builds_on(http.clone(), bases, alive.clone(), BUILDS));

    // The work is split: every process holds signal partitions.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let leases = backend.leases("signal").await;
        let holders: BTreeSet<String> = leases.keys().cloned().collect();
        let want: BTreeSet<String> = (0..processes)
            .map(|i| format!("signal-stage@node-{i}"))
            .collect();
        if holders == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every process holds partitions: {leases:?}"
        );
        // Polled: leases live in the shared database, taken by the servers'
        // claim loops; neither PostgreSQL nor MariaDB announces a lease
        // changing hands (no notification on claims, no file to watch).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // SIGKILL node-0 once a good part of the builds ran (as the event log
    // tells).
    tail.wait_started(BUILDS * 3 / 10, Duration::from_secs(120), &servers[1])
        .await;
    alive.lock()[0] = false;
    servers[0].kill();
    let killed_at = Instant::now();
    let ran_at_kill = ran(&ran_file).len();

    // Once its leases ran out, the survivors hold every live lease.
    let deadline = Instant::now() + LEASE * 4;
    let survivors = loop {
        let mut holders: BTreeSet<String> = BTreeSet::new();
        for topic in ["trigger", "signal"] {
            holders.extend(backend.leases(topic).await.into_keys());
        }
        if !holders.iter().any(|h| h.ends_with("@node-0")) {
            break holders;
        }
        assert!(
            Instant::now() < deadline,
            "node-0 still holds leases {:?} after it died",
            holders
        );
        // Polled: the lease runs out on the clock and a survivor's next
        // claim takes it over in the database; nothing announces either.
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let rebalanced = killed_at.elapsed();

    let ids = creating.await.unwrap();
    let created = started.elapsed();
    assert!(
        ran_at_kill < ids.len() * 8 / 10,
        "the kill came too late to test anything"
    );
    let builds = wait_all_terminal(&http, &servers[1], &ids, Duration::from_secs(120)).await;
    let finished = killed_at.elapsed();
    let outcomes = check_outcome(&backend, &builds, &ran_file, &tail).await;
    // The survivors took over node-0's partitions: both hold leases on the
    // signal topic while work was left.
    assert!(
        survivors.iter().all(|h| !h.ends_with("@node-0")),
        "{survivors:?}"
    );
    assert!(
        ran(&ran_file).len() > ran_at_kill,
        "nothing ran after the kill: {outcomes:?}"
    );
    eprintln!(
        "{processes} processes, {BUILDS} builds: created in {created:?}; {ran_at_kill} ran before the kill; \
         node-0's leases gone {rebalanced:?} after the kill, all terminal {finished:?} after it; \
         outcomes {outcomes:?}; total {:?}",
        started.elapsed()
    );
    for s in servers.iter_mut().skip(1) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(s.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        assert!(s.child.wait().unwrap().success(), "{}", s.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_on_postgres_share_builds_and_survive_a_sigkill() {
    let Some(backend) = Backend::postgres("multi").await else {
        return;
    };
    servers_share_the_work_and_survive_a_sigkill(backend, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_mariadb_share_builds_and_survive_a_sigkill() {
    let Some(backend) = Backend::mysql("multi").await else {
        return;
    };
    servers_share_the_work_and_survive_a_sigkill(backend, 2).await;
}

/// Builds flow through one server while every database connection it has is
/// ended, twice; nothing is lost.
async fn server_rides_through_dropped_connections(backend: Backend) {
    const COUNT: usize = 200;
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let ran_file = work.path().join("ran.txt");
    let url = backend.storage_url();
    migrate(&url, &data);
    let servers = start_servers(&config(&url, &ran_file), &data, 1).await;
    let server = &servers[0];
    let http = reqwest::Client::new();
    let tail = EventTail::connect(&http, server).await;

    let mut ids = create_builds(&http, &[server], COUNT / 2).await;
    for _ in 0..2 {
        // Twenty more builds run (as the event log tells) before the drop,
        // or every build created so far: on a slow machine most of them may
        // have started while the creates were still being answered, and
        // waiting for more than exist cannot end.
        let before = tail.started();
        tail.wait_started(
            (before + 20).min(ids.len()),
            Duration::from_secs(60),
            server,
        )
        .await;
        let dropped = backend.drop_connections().await;
        assert!(dropped > 0, "no connection of the server found");
        // The API keeps accepting builds right after the drop (the pool
        // replaces dead connections).
        ids.extend(create_builds(&http, &[server], COUNT / 4).await);
    }
    let builds = wait_all_terminal(&http, server, &ids, Duration::from_secs(120)).await;
    let outcomes = check_outcome(&backend, &builds, &ran_file, &tail).await;
    assert_eq!(outcomes.get("succeeded"), Some(&ids.len()), "{outcomes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_dropped_mid_run_lose_nothing() {
    let Some(backend) = Backend::postgres("reconnect").await else {
        return;
    };
    server_rides_through_dropped_connections(backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_connections_dropped_mid_run_lose_nothing() {
    let Some(backend) = Backend::mysql("reconnect").await else {
        return;
    };
    server_rides_through_dropped_connections(backend).await;
}

/// A cancel or a webhook received by one node takes effect at once while
/// another node owns the build's partition (issue 16): two `stitch serve`
/// on one PostgreSQL database drive a `buildkite` queue whose safety-net
/// poll is 60 s, so a wake that stayed in the receiving process would leave
/// the build waiting a minute, far beyond `WITHIN`. The phase is made by
/// holding a request at the fake Buildkite (shared by both nodes); the
/// owner is read from the queue's lease while the request is held.
mod push_never_lost {
    use super::*;
    use stitch_fake_providers::buildkite::{
        Endpoint, FakeBuildkite, FakeOptions, FaultControl, Timing, WebhookAuth, WebhookTarget,
    };

    const WITHIN: Duration = Duration::from_secs(20);
    const TOKEN: &str = "bk-test-token";
    const SECRET: &str = "whsec-0123456789abcdef";

    fn config(storage_url: &str, fake: &FakeBuildkite) -> String {
        format!(
            r#"data_dir = "{{data}}"
[storage]
url = "{storage_url}"
[cluster]
lease = "{lease}ms"
delivery_timeout = "15s"
poll_interval = "200ms"
[queues.ci]
runner = "buildkite"
poll = {{ accepted = "60s", running = "60s" }}
retry = {{ max_attempts = 30, initial = "100ms", max = "2s" }}
[queues.ci.buildkite]
org = "acme"
pipeline = "app"
token_env = "BK_TOKEN"
api_url = "{api}"
request_timeout = "5s"
log_poll = "100ms"
rate_limit = {{ requests = 100000, window = "1s" }}
[queues.ci.buildkite.webhook]
mode = "signature"
secret_env = "BK_WEBHOOK_SECRET"
"#,
            lease = LEASE.as_millis(),
            api = fake.url(),
        )
    }

    struct TwoNodes {
        backend: Backend,
        fake: FakeBuildkite,
        servers: Vec<Serve>,
        _work: tempfile::TempDir,
    }

    async fn two_nodes(name: &'static str) -> Option<TwoNodes> {
        let backend = Backend::postgres(name).await?;
        let fake = FakeBuildkite::start(FakeOptions {
            token: TOKEN.into(),
            timing: Timing {
                schedule: Duration::from_millis(100),
                run: Duration::from_millis(400),
                ..Timing::default()
            },
            ..FakeOptions::default()
        })
        .await
        .unwrap();
        let work = tempfile::tempdir().unwrap();
        let data = work.path().join("data");
        let url = backend.storage_url();
        migrate(&url, &data);
        let config = config(&url, &fake);
        let servers: Vec<Serve> = (0..2)
            .map(|i| {
                let node = format!("node-{i}");
                Serve::spawn_on(
                    STITCH,
                    &config,
                    Some(&data),
                    &[
                        ("STITCH_NODE_NAME", node.as_str()),
                        ("BK_TOKEN", TOKEN),
                        ("BK_WEBHOOK_SECRET", SECRET),
                    ],
                )
            })
            .collect();
        for s in &servers {
            s.wait_healthy().await;
        }
        Some(TwoNodes {
            backend,
            fake,
            servers,
            _work: work,
        })
    }

    impl TwoNodes {
        /// The node (index) holding the lease of `build`'s partition of
        /// `topic` now.
        async fn owner(&self, topic: &str, build: &str) -> usize {
            let Backend::Postgres { db, name } = &self.backend else {
                unreachable!("these tests run on PostgreSQL");
            };
            let mut c = db.options(name).await.connect().await.unwrap();
            let owner: Option<String> = sqlx::query_scalar(
                "SELECT lease_owner FROM mq_partitions WHERE topic = $1 AND partition_key = $2",
            )
            .bind(topic)
            .bind(build)
            .fetch_optional(&mut c)
            .await
            .unwrap()
            .flatten();
            let _ = c.close().await;
            let owner = owner.unwrap_or_else(|| panic!("no lease on {topic}/{build}"));
            match owner.rsplit('@').next() {
                Some("node-0") => 0,
                Some("node-1") => 1,
                _ => panic!("unexpected lease owner {owner}"),
            }
        }

        /// The build's terminal status as seen by `node`.
        async fn ends_as(&self, http: &reqwest::Client, node: usize, id: &str, status: &str) {
            let s = &self.servers[node];
            let done = s.wait_all_terminal(http, &[id.to_string()], WITHIN).await;
            assert_eq!(
                done[id],
                status,
                "node-0:\n{}\nnode-1:\n{}",
                self.servers[0].log(),
                self.servers[1].log()
            );
        }
    }

    /// A never-ending build whose request to `endpoint` is held on the node
    /// that owns its `topic` partition; the other node receives the cancel
    /// (while the request is held, or right after its answer).
    async fn cancel_on_the_other_node(
        name: &'static str,
        endpoint: Endpoint,
        topic: &str,
        held: bool,
    ) {
        let Some(n) = two_nodes(name).await else {
            return;
        };
        let http = reqwest::Client::new();
        let pause = n.fake.pause_next(endpoint);
        let id = n.servers[0]
            .create(&http, "ci", "https://git.example/c/1?stitch-bk=hang")
            .await;
        pause.arrived().await;
        let other = 1 - n.owner(topic, &id).await;
        if !held {
            pause.release();
        }
        let r = http
            .post(format!("{}/v1/builds/{id}/cancel", n.servers[other].base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        pause.release();
        n.ends_as(&http, other, &id, "cancelled").await;
        // Buildkite's `canceling` already maps to cancelled.
        let state = n.fake.build_json(&id).unwrap()["state"].clone();
        assert!(state == "canceling" || state == "canceled", "{state}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancel_on_one_node_before_the_other_nodes_trigger_returns() {
        cancel_on_the_other_node("pnl_trigger", Endpoint::Create, "trigger", true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancel_on_one_node_during_the_other_nodes_poll() {
        cancel_on_the_other_node("pnl_poll", Endpoint::GetBuild, "signal", true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancel_on_one_node_during_the_other_nodes_hold() {
        cancel_on_the_other_node("pnl_hold", Endpoint::GetBuild, "signal", false).await;
    }

    /// Forwards webhook POSTs to a node chosen later: deliveries that arrive
    /// before [`WebhookRelay::to`] wait for it. The fake Buildkite knows one
    /// target, set before the build starts; which node must receive its
    /// webhooks is known only once a node owns the build.
    struct WebhookRelay {
        url: String,
        target: Arc<tokio::sync::watch::Sender<Option<String>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl WebhookRelay {
        async fn start() -> Self {
            use axum::body::Bytes;
            use axum::http::{HeaderMap, StatusCode};
            let target = Arc::new(tokio::sync::watch::channel(None::<String>).0);
            let relay_target = target.clone();
            let http = reqwest::Client::new();
            let app = axum::Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
                let mut rx = relay_target.subscribe();
                let http = http.clone();
                async move {
                    let Ok(to) = rx.wait_for(Option::is_some).await.map(|t| t.clone()) else {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    };
                    let mut req = http.post(to.unwrap_or_default()).body(body);
                    for (k, v) in &headers {
                        if k != "host" && k != "content-length" {
                            req = req.header(k, v);
                        }
                    }
                    match req.send().await {
                        Ok(r) => StatusCode::from_u16(r.status().as_u16())
                            .unwrap_or(StatusCode::BAD_GATEWAY),
                        Err(_) => StatusCode::BAD_GATEWAY,
                    }
                }
            });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/", listener.local_addr().unwrap());
            let task = tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            Self { url, target, task }
        }

        fn to(&self, url: String) {
            self.target.send_replace(Some(url));
        }
    }

    impl Drop for WebhookRelay {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// The build passes at the provider while the owner's first poll is
    /// held; its `build.finished` webhook reaches the *other* node.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_webhook_on_one_node_during_the_other_nodes_poll() {
        let Some(n) = two_nodes("pnl_webhook").await else {
            return;
        };
        let relay = WebhookRelay::start().await;
        n.fake.set_webhook(Some(WebhookTarget {
            url: relay.url.clone(),
            auth: WebhookAuth::Signature(SECRET.into()),
            job_events: false,
        }));
        let http = reqwest::Client::new();
        let pause = n.fake.pause_next(Endpoint::GetBuild);
        let id = n.servers[0]
            .create(&http, "ci", "https://git.example/c/2")
            .await;
        pause.arrived().await;
        let other = 1 - n.owner("signal", &id).await;
        relay.to(format!("{}/webhooks/buildkite", n.servers[other].base));
        n.fake.webhook_delivered(&id, "build.finished").await;
        pause.release();
        n.ends_as(&http, other, &id, "succeeded").await;
    }
}
