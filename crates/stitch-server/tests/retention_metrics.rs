//! Retention's metrics on `/metrics` of a real server over loopback: rows
//! pruned per kind, passes, the oldest retained event and the database size
//! after a pass. One test alone in its binary: the first router of a process
//! owns the global recorder the pruner records into, so a second server in
//! the same process would not show them.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use stitch_server::config::{Config, FakeSection, PollConfig, QueueConfig, RetentionSetting};
use stitch_server::http::{self, HttpOptions};
use stitch_server::retention::Pruner;
use stitch_server::stages;
use stitch_server::state::AppState;
use stitch_store::StorePool;
use stitch_testkit::watch_until;
use tokio_util::sync::CancellationToken;

fn config(data_dir: std::path::PathBuf) -> Config {
    let queue = QueueConfig {
        poll: PollConfig {
            accepted: Duration::from_millis(100),
            running: Duration::from_millis(100),
        },
        runner: stitch_server::config::RunnerSection::Fake(FakeSection {
            accept_delay: Duration::from_millis(50),
            run_duration: Duration::from_millis(100),
            slow_factor: 2,
        }),
        ..QueueConfig::default()
    };
    let mut config = Config {
        data_dir,
        queues: BTreeMap::from([("default".to_string(), queue)]),
        ..Config::default()
    };
    // The pass runs when the test says so.
    config.retention.interval = RetentionSetting::Off;
    config
}

/// The value of the series `name{labels}` (exactly as rendered), if any.
fn series(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        (series == name_and_labels).then(|| value.parse().ok())?
    })
}

async fn count(state: &AppState, sql: &str) -> i64 {
    match state.store().pool() {
        StorePool::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(&p).await.unwrap(),
        StorePool::Postgres(p) => sqlx::query_scalar(sql).fetch_one(&p).await.unwrap(),
        StorePool::MySql(p) => sqlx::query_scalar(sql).fetch_one(&p).await.unwrap(),
    }
}

async fn exec(state: &AppState, sql: &str) {
    match state.store().pool() {
        StorePool::Sqlite(p) => drop(sqlx::query(sql).execute(&p).await.unwrap()),
        StorePool::Postgres(p) => drop(sqlx::query(sql).execute(&p).await.unwrap()),
        StorePool::MySql(p) => drop(sqlx::query(sql).execute(&p).await.unwrap()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_is_visible_on_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let state = AppState::open(config(dir.path().join("data")))
        .await
        .unwrap();
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
    let base = format!("http://{addr}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();

    let mut ids = Vec::new();
    for n in 0..3 {
        let resp = client
            .post(format!("{base}/v1/queues/default/builds"))
            .json(&json!({"head": [format!("https://forge/c/{n}")]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 202);
        let body: Value = resp.json().await.unwrap();
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    let mut events = state.event_seq();
    let mut passes = state.queue().admin().claim_passes();
    let service = &state;
    for id in &ids {
        let build_id = &id.parse::<stitch_core::BuildId>().unwrap();
        watch_until(&mut events, &format!("{id} terminal"), move || async move {
            let build = service.store().get_build(build_id).await.unwrap();
            build.status.is_terminal().then_some(())
        })
        .await;
        // Its queue messages are acked a moment later, and an ack announces
        // nothing: the claim pass after it moves the cursor past it.
        let pending = format!(
            "SELECT COUNT(*) FROM mq_messages m WHERE m.partition_key = '{id}' \
             AND m.seq > (SELECT MIN(p.cursor) FROM mq_partitions p \
             WHERE p.topic = m.topic AND p.partition_key = m.partition_key)"
        );
        let pending = pending.as_str();
        watch_until(
            &mut passes,
            &format!("{id}: queue messages done"),
            move || async move { (count(service, pending).await == 0).then_some(()) },
        )
        .await;
    }
    // Two builds finished long ago, one just now.
    exec(
        &state,
        &format!(
            "UPDATE builds SET finished_at = 1 WHERE id IN ('{}', '{}')",
            ids[0], ids[1]
        ),
    )
    .await;

    let report = Pruner::for_service(&state)
        .run_pass(chrono::Utc::now().timestamp_millis())
        .await
        .unwrap();
    assert_eq!((report.builds, report.queue_messages), (2, 4), "{report:?}");
    assert!(report.events > 0, "{report:?}");

    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let pruned = |kind: &str| {
        series(
            &text,
            &format!("stitch_retention_pruned_total{{kind=\"{kind}\"}}"),
        )
    };
    assert_eq!(pruned("builds"), Some(2.0), "{text}");
    assert_eq!(pruned("queue_messages"), Some(4.0), "{text}");
    assert_eq!(pruned("events"), Some(report.events as f64), "{text}");
    assert_eq!(pruned("log_lines"), Some(report.log_lines as f64), "{text}");
    assert_eq!(pruned("dead_letters"), Some(0.0), "{text}");
    assert_eq!(pruned("local_states"), Some(0.0), "{text}");
    assert_eq!(
        series(&text, "stitch_retention_passes_total{outcome=\"ran\"}"),
        Some(1.0),
        "{text}"
    );
    let oldest = state.store().oldest_retained_seq().await.unwrap();
    assert!(oldest > 1);
    assert_eq!(
        series(&text, "stitch_events_oldest_retained_seq"),
        Some(oldest as f64),
        "{text}"
    );
    let bytes = report.database_bytes.expect("SQLite tells its size");
    assert!(bytes > 0);
    assert_eq!(
        series(&text, "stitch_database_size_bytes"),
        Some(bytes as f64),
        "{text}"
    );
    stop.cancel();
    state.store().close().await;
}
