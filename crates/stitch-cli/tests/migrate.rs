//! `stitch migrate` as a child process: it applies the queue's (1001+) and
//! the store's (2001+) migrations to the configured database and exits, on
//! SQLite, PostgreSQL and MariaDB/MySQL; applying them again changes
//! nothing; bad or unreachable storage (an unreadable TLS CA file included)
//! gives the documented exit codes.

use std::process::{Command, Output};
use std::str::FromStr;

use sqlx::ConnectOptions;

// The queue's per-test schema/database helpers, shared rather than copied.
#[path = "../../stitch-mq/tests/support/mod.rs"]
mod support;

fn migrate(storage_url: Option<&str>, data_dir: &std::path::Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stitch"));
    cmd.arg("migrate")
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("STITCH_CONFIG")
        .env_remove("STITCH_STORAGE__URL");
    if let Some(url) = storage_url {
        cmd.env("STITCH_STORAGE__URL", url);
    }
    cmd.output().unwrap()
}

fn assert_success(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("schemas are up to date"), "{stdout}");
    stdout
}

#[tokio::test]
async fn migrate_creates_the_default_sqlite_database() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    assert_success(&migrate(None, &data));
    assert_success(&migrate(None, &data));
    let db = data.join("stitch.db");
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&db)
        .connect()
        .await
        .unwrap();
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(
        versions,
        vec![1001, 1005, 2001, 2002, 2003, 2004, 2005, 2006]
    );
}

#[tokio::test]
async fn migrate_applies_both_schemas_on_postgres() {
    let Some(db) = support::PgDatabase::connect().await else {
        return;
    };
    let opts = db.options("migrate").await;
    let base = std::env::var("STITCH_TEST_POSTGRES_URL").unwrap();
    let mut url = reqwest::Url::parse(&base).unwrap();
    url.query_pairs_mut().append_pair(
        "options",
        &format!("-csearch_path={}", db.schema("migrate")),
    );
    let dir = tempfile::tempdir().unwrap();
    let out = assert_success(&migrate(Some(url.as_str()), dir.path()));
    assert!(out.contains("Postgres"), "{out}");
    assert_success(&migrate(Some(url.as_str()), dir.path()));

    let mut conn = opts.connect().await.unwrap();
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(
        versions,
        vec![1001, 1002, 1005, 1006, 1007, 2001, 2002, 2003, 2004]
    );
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = current_schema() AND table_name IN ('builds', 'mq_messages') \
         ORDER BY table_name",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(tables, vec!["builds", "mq_messages"]);
    assert!(!dir.path().join("stitch.db").exists(), "no SQLite file");
}

#[tokio::test]
async fn migrate_applies_both_schemas_on_mysql() {
    let Some(db) = support::MySqlDatabase::connect().await else {
        return;
    };
    let opts = db.options("migrate").await;
    let base = std::env::var("STITCH_TEST_MYSQL_URL").unwrap();
    let mut url = reqwest::Url::parse(&base).unwrap();
    url.set_path(&format!("/{}", db.database("migrate")));
    let dir = tempfile::tempdir().unwrap();
    let out = assert_success(&migrate(Some(url.as_str()), dir.path()));
    assert!(out.contains("MySql"), "{out}");
    assert_success(&migrate(Some(url.as_str()), dir.path()));

    let mut conn = opts.connect().await.unwrap();
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(versions, vec![1001, 1005, 2001, 2002, 2003, 2004]);
}

#[test]
fn unsupported_storage_is_a_usage_error_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let out = migrate(Some("redis://user:s3cret@host/0"), dir.path());
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("storage.url"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

#[test]
fn unreachable_database_exits_3_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 1.
    let url = "postgres://stitch:s3cret@127.0.0.1:1/stitch?connect_timeout=2";
    assert!(sqlx::postgres::PgConnectOptions::from_str(url).is_ok());
    let out = migrate(Some(url), dir.path());
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("stitch migrate"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

#[test]
fn unreadable_ca_file_is_a_usage_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("missing-ca.crt");
    // Port 1: the file is checked before anything is contacted.
    let url = format!(
        "postgres://stitch:s3cret@127.0.0.1:1/stitch?sslmode=verify-full&sslrootcert={}",
        ca.display()
    );
    let out = migrate(Some(&url), dir.path());
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("sslrootcert"), "{stderr}");
    assert!(stderr.contains(&ca.display().to_string()), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
}
