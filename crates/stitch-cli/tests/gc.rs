//! `stitch gc` as a child process on a SQLite database: `--dry-run` reports
//! what a pass would remove and changes nothing; the pass itself removes
//! exactly that. The build's age is written into the row, not waited for.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use stitch_core::{BuildId, BuildStatus};
use stitch_store::{Metadata, NewBuild, Store};

fn gc(data_dir: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stitch"))
        .arg("gc")
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .env_remove("STITCH_CONFIG")
        .env_remove("STITCH_STORAGE__URL")
        .output()
        .unwrap()
}

fn stdout_ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

async fn finished_build(store: &Store) -> BuildId {
    let id = BuildId::new();
    store
        .create_build(NewBuild {
            id: id.clone(),
            queue: "default".into(),
            runner: "fake".into(),
            base: vec![],
            head: vec!["https://forge/c/1".into()],
            metadata: Metadata::new(),
            idempotency_key: None,
            job_token_hash: None,
        })
        .await
        .unwrap();
    store
        .append_log_lines(&id, &["a line".to_string()])
        .await
        .unwrap();
    store
        .record_status(&id, None, BuildStatus::Succeeded, &Metadata::new(), None)
        .await
        .unwrap();
    id
}

async fn counts(store: &Store) -> (i64, i64, i64) {
    let pool = store.sqlite_pool().unwrap();
    let mut out = Vec::new();
    for table in ["builds", "events", "log_lines"] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(pool)
            .await
            .unwrap();
        out.push(n);
    }
    (out[0], out[1], out[2])
}

#[tokio::test]
async fn gc_dry_run_changes_nothing_and_the_pass_removes_what_it_reported() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let store = Store::open_url(&format!("sqlite://{}", data.join("stitch.db").display()))
        .await
        .unwrap();
    let old = finished_build(&store).await;
    let young = finished_build(&store).await;
    sqlx::query("UPDATE builds SET finished_at = 1 WHERE id = ?")
        .bind(old.as_str())
        .execute(store.sqlite_pool().unwrap())
        .await
        .unwrap();
    let before = counts(&store).await;
    assert_eq!(before, (2, 4, 2));

    let preview: Value =
        serde_json::from_str(&stdout_ok(&gc(&data, &["--dry-run", "--json"]))).unwrap();
    assert_eq!(preview["dry_run"], true);
    assert_eq!(preview["builds"], 1);
    assert_eq!(preview["log_lines"], 1);
    assert_eq!(preview["events"], 2, "the old build's two events");
    assert_eq!(counts(&store).await, before, "--dry-run changed nothing");
    let text = stdout_ok(&gc(&data, &["--dry-run"]));
    assert!(text.contains("would remove"), "{text}");
    assert_eq!(counts(&store).await, before);

    let done: Value = serde_json::from_str(&stdout_ok(&gc(&data, &["--json"]))).unwrap();
    assert_eq!(done["dry_run"], false);
    assert_eq!(
        (&done["builds"], &done["log_lines"], &done["events"]),
        (
            &preview["builds"],
            &preview["log_lines"],
            &preview["events"]
        )
    );
    assert_eq!(counts(&store).await, (1, 2, 1));
    assert!(store.get_build(&old).await.is_err());
    store.get_build(&young).await.unwrap();
    let text = stdout_ok(&gc(&data, &[]));
    assert!(text.contains("removed from"), "{text}");
    assert!(text.contains("builds          0"), "{text}");
}
