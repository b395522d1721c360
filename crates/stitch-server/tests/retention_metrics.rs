//! Retention's metrics on `/metrics` of a real server over loopback: rows
//! pruned per kind, passes, the oldest retained event and the database size
//! after a pass. One test alone in its binary: the first router of a process
//! owns the global recorder the pruner records into, so a second server in
//! the same process would not show them.

use std::collections::BTreeMap;
use std::time::Duration;

use stitch_server::config::{Config, FakeSection, PollConfig, QueueConfig, RetentionSetting};
use stitch_server::retention::Pruner;

mod service_support;
use service_support::Service;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_is_visible_on_metrics() {
    let s = Service::start(config).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(
            s.create_ok("default", &format!("https://forge/c/{n}"))
                .await,
        );
    }
    for id in &ids {
        s.wait_terminal(id).await;
    }
    s.wait_queue_done(&ids.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    // Two builds finished long ago, one just now.
    s.exec(&format!(
        "UPDATE builds SET finished_at = 1 WHERE id IN ('{}', '{}')",
        ids[0], ids[1]
    ))
    .await;

    let report = Pruner::for_service(&s.state)
        .run_pass(chrono::Utc::now().timestamp_millis())
        .await
        .unwrap();
    assert_eq!((report.builds, report.queue_messages), (2, 4), "{report:?}");
    assert!(report.events > 0, "{report:?}");

    let text = s
        .client
        .get(format!("{}/metrics", s.base))
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
    let oldest = s.state.store().oldest_retained_seq().await.unwrap();
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
    s.shutdown().await;
}
