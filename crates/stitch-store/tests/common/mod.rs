//! Shared helpers: every test gets its own SQLite file in a temp dir.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use stitch_core::BuildId;
use stitch_store::{Metadata, NewBuild, Store};
use tempfile::TempDir;

pub struct TestDb {
    // Kept so the directory outlives the store.
    pub dir: TempDir,
    pub path: PathBuf,
    pub store: Store,
}

pub async fn open() -> TestDb {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stitch.db");
    let store = Store::open(&path).await.unwrap();
    TestDb { dir, path, store }
}

pub fn new_build(queue: &str) -> NewBuild {
    NewBuild {
        id: BuildId::new(),
        queue: queue.to_owned(),
        runner: "fake".to_owned(),
        base: vec!["https://forge.example/acme/app/commit/aaa".to_owned()],
        head: vec![
            "https://forge.example/acme/app/pull/1".to_owned(),
            "https://forge.example/acme/app/pull/2".to_owned(),
        ],
        metadata: meta(&[("requested_by", "queue-bot")]),
        idempotency_key: None,
    }
}

pub fn keyed(queue: &str, key: &str) -> NewBuild {
    NewBuild {
        idempotency_key: Some(key.to_owned()),
        ..new_build(queue)
    }
}

pub fn meta(pairs: &[(&str, &str)]) -> Metadata {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect::<BTreeMap<_, _>>()
}
