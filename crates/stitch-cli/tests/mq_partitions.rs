//! `stitch mq partitions` as a child process on a database whose queue state
//! is written through the queue's own driver: two servers' leases (one
//! expired), a due partition and a later one. Table and JSON output, the
//! owner and due filters, pages, and the exit codes for bad input. Runs on
//! SQLite, PostgreSQL and MySQL/MariaDB.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use serde_json::Value;
use stitch_mq::driver::{ClaimRequest, Driver, NewMessage};
use stitch_mq::{now_millis, Message, Millis};

// The queue's per-test schema/database helpers, shared rather than copied.
#[path = "../../stitch-mq/tests/support/mod.rs"]
mod support;

const TOPIC: &str = "signal";
const GROUP: &str = "signal-stage";
const NODE0: &str = "signal-stage@node-0";
const NODE1: &str = "signal-stage@node-1";

/// `stitch mq partitions ARGS` on the database at `storage_url` (the
/// default SQLite file in `data_dir` when `None`).
fn partitions(storage_url: Option<&str>, data_dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stitch"));
    cmd.args(["mq", "partitions", "--data-dir"])
        .arg(data_dir)
        .args(args)
        .env_remove("STITCH_CONFIG")
        .env_remove("STITCH_STORAGE__URL");
    if let Some(url) = storage_url {
        cmd.env("STITCH_STORAGE__URL", url);
    }
    cmd.output().unwrap()
}

fn stdout_of(out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn json_of(out: &Output) -> Value {
    serde_json::from_str(&stdout_of(out)).expect("one JSON document")
}

fn keys(doc: &Value) -> Vec<&str> {
    doc["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["partition"].as_str().unwrap())
        .collect()
}

fn claim(subscriber: &str, now: Millis, lease_ms: Millis) -> ClaimRequest {
    ClaimRequest {
        topic: TOPIC.into(),
        group: GROUP.into(),
        subscriber: subscriber.into(),
        now,
        max_messages: 10,
        batch_size: 1,
        visibility_ms: 60_000,
        lease_ms,
        may_acquire: 1,
        max_attempts: 0,
    }
}

/// node-1 took b-1 and died (its lease ran out a second ago); node-0 holds
/// b-2; b-3 is due and unclaimed; b-4 is due in an hour.
async fn seed(driver: Arc<dyn Driver>) {
    let now = now_millis();
    driver.register_group(TOPIC, GROUP, now).await.unwrap();
    let msgs: Vec<NewMessage> = [
        ("b-1", now - 3000),
        ("b-2", now - 2000),
        ("b-3", now - 1000),
        ("b-4", now + 3_600_000),
    ]
    .into_iter()
    .map(|(key, at)| NewMessage {
        message: Message::new(format!("{key}-poll"), key, b"{}".to_vec()),
        available_at: at,
    })
    .collect();
    driver.publish(TOPIC, &msgs, now - 3000).await.unwrap();
    let dead = driver.claim(&claim(NODE1, now - 1500, 500)).await.unwrap();
    assert_eq!(dead.messages[0].message.partition_key, "b-1");
    let live = driver.claim(&claim(NODE0, now, 60_000)).await.unwrap();
    assert_eq!(live.messages[0].message.partition_key, "b-2");
}

/// Every output and error case against one seeded database.
fn check(storage_url: Option<&str>, data_dir: &Path) {
    let run = |args: &[&str]| partitions(storage_url, data_dir, args);

    // The table: the group defaults to the topic's only one.
    let table = stdout_of(&run(&["--topic", TOPIC]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0], "topic signal, group signal-stage: 4 partition(s)",
        "{table}"
    );
    assert!(
        lines[1].starts_with("PARTITION") && lines[1].contains("LEASE OWNER"),
        "{table}"
    );
    let row = |key: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no row for {key}: {table}"))
            .to_string()
    };
    let b1 = row("b-1");
    assert!(b1.contains(NODE1) && b1.contains("expired"), "{b1}");
    assert!(b1.trim_end().ends_with('1'), "one in flight: {b1}");
    let b2 = row("b-2");
    assert!(b2.contains(NODE0) && b2.contains("left"), "{b2}");
    let b3 = row("b-3");
    assert!(b3.contains("due") && !b3.contains("signal-stage@"), "{b3}");
    assert!(row("b-4").contains("in "), "{table}");
    assert!(!table.contains("more:"), "{table}");

    // JSON: one document with every field.
    let doc = json_of(&run(&["--topic", TOPIC, "--group", GROUP, "--json"]));
    assert_eq!(
        (doc["topic"].as_str(), doc["group"].as_str()),
        (Some(TOPIC), Some(GROUP))
    );
    assert_eq!(keys(&doc), ["b-1", "b-2", "b-3", "b-4"]);
    let p = &doc["partitions"];
    assert_eq!(p[0]["lease_owner"], NODE1);
    assert_eq!(p[0]["lease_expired"], true);
    assert_eq!(p[0]["in_flight"], 1);
    assert_eq!(p[0]["due"], false);
    assert_eq!(p[1]["lease_owner"], NODE0);
    assert_eq!(p[1]["lease_expired"], false);
    assert_eq!(p[1]["in_flight"], 1);
    assert!(p[1]["lease_expires"].as_i64().unwrap() > doc["now"].as_i64().unwrap());
    assert_eq!(p[2]["due"], true);
    assert_eq!(p[2]["lease_owner"], Value::Null);
    assert_eq!(p[2]["lease_expires"], Value::Null);
    assert_eq!(p[2]["cursor"], 0);
    assert_eq!(p[3]["due"], false);
    assert_eq!(doc["next_after"], Value::Null);

    // Filters: an expired lease still names the server that died holding it.
    let dead = json_of(&run(&["--topic", TOPIC, "--owner", NODE1, "--json"]));
    assert_eq!(keys(&dead), ["b-1"]);
    let due = json_of(&run(&["--topic", TOPIC, "--due", "--json"]));
    assert_eq!(keys(&due), ["b-3"]);

    // Pages: the last key of a full page continues the listing.
    let first = json_of(&run(&["--topic", TOPIC, "--limit", "2", "--json"]));
    assert_eq!(keys(&first), ["b-1", "b-2"]);
    assert_eq!(first["next_after"], "b-2");
    let second = json_of(&run(&[
        "--topic", TOPIC, "--limit", "2", "--after", "b-2", "--json",
    ]));
    assert_eq!(keys(&second), ["b-3", "b-4"]);
    let table = stdout_of(&run(&["--topic", TOPIC, "--limit", "2"]));
    assert!(
        table.contains(
            "more: stitch mq partitions --topic signal --group signal-stage --limit 2 --after b-2"
        ),
        "{table}"
    );

    // Bad input: a clear message and exit code 2.
    let expect_usage = |args: &[&str], needle: &str| {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    };
    expect_usage(&["--topic", "nope"], "unknown topic \"nope\"");
    expect_usage(
        &["--topic", TOPIC, "--group", "nope"],
        "no consumer group \"nope\"",
    );
    expect_usage(&["--topic", "Bad Topic"], "invalid topic name");
    expect_usage(&["--topic", TOPIC, "--limit", "0"], "--limit");
    expect_usage(&["--topic", TOPIC, "--limit", "1001"], "--limit");
    expect_usage(&["--limit", "5"], "--topic");
}

#[tokio::test]
async fn partitions_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let driver = stitch_mq::sqlite::SqliteDriver::open(&data.join("stitch.db"))
        .await
        .unwrap();
    seed(Arc::new(driver)).await;
    check(None, &data);
}

#[tokio::test]
async fn partitions_on_postgres() {
    let Some(db) = support::PgDatabase::connect().await else {
        return;
    };
    seed(Arc::new(db.driver("partitions").await)).await;
    let base = std::env::var("STITCH_TEST_POSTGRES_URL").unwrap();
    let mut url = reqwest::Url::parse(&base).unwrap();
    url.query_pairs_mut().append_pair(
        "options",
        &format!("-csearch_path={}", db.schema("partitions")),
    );
    let dir = tempfile::tempdir().unwrap();
    check(Some(url.as_str()), dir.path());
}

#[tokio::test]
async fn partitions_on_mysql() {
    let Some(db) = support::MySqlDatabase::connect().await else {
        return;
    };
    seed(Arc::new(db.driver("partitions").await)).await;
    let base = std::env::var("STITCH_TEST_MYSQL_URL").unwrap();
    let mut url = reqwest::Url::parse(&base).unwrap();
    url.set_path(&format!("/{}", db.database("partitions")));
    let dir = tempfile::tempdir().unwrap();
    check(Some(url.as_str()), dir.path());
}
