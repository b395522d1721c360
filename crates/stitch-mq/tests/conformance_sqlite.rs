//! The conformance suite on the SQLite backend, one database file per test.

use std::sync::Arc;

use async_trait::async_trait;
use stitch_mq::conformance::Backend;
use stitch_mq::sqlite::SqliteDriver;
use stitch_mq::{Queue, QueueConfig};

struct Sqlite {
    dir: tempfile::TempDir,
}

impl Sqlite {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }
}

#[async_trait]
impl Backend for Sqlite {
    async fn open(&self, name: &str, config: QueueConfig) -> Queue {
        let path = self.dir.path().join(format!("{name}.db"));
        let driver = SqliteDriver::open(&path).await.expect("open sqlite");
        Queue::new(Arc::new(driver), config)
    }
}

stitch_mq::conformance_tests!(Sqlite::new());
