//! The conformance suite on the SQLite backend, one database file per test.

use std::sync::Arc;

use async_trait::async_trait;
use stitch_mq::conformance::Backend;
use stitch_mq::sqlite::SqliteDriver;
use stitch_mq::Driver;

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
    async fn driver(&self, name: &str) -> Arc<dyn Driver> {
        let path = self.dir.path().join(format!("{name}.db"));
        Arc::new(SqliteDriver::open(&path).await.expect("open sqlite"))
    }
}

stitch_mq::conformance_tests!(Sqlite::new());
