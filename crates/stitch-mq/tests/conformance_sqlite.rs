//! The conformance suite on the SQLite backend, one database file per test,
//! on real time and, for the timing checks, on Tokio's paused clock.

use std::sync::Arc;

use async_trait::async_trait;
use stitch_mq::conformance::Backend;
use stitch_mq::sqlite::SqliteDriver;
use stitch_mq::{Clock, Driver, Queue, QueueConfig};

struct Sqlite {
    dir: tempfile::TempDir,
    /// The clock of every driver and queue opened; `None` is the wall clock.
    clock: Option<Clock>,
}

impl Sqlite {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
            clock: None,
        }
    }

    /// Drivers and queues on Tokio's clock, one clock for the whole test so
    /// a restart keeps the time (made inside the test's paused runtime).
    /// The drivers hold paused time still while sqlx's worker thread works.
    fn paused() -> Self {
        Self {
            clock: Some(Clock::tokio()),
            ..Self::new()
        }
    }
}

#[async_trait]
impl Backend for Sqlite {
    async fn driver(&self, name: &str) -> Arc<dyn Driver> {
        let path = self.dir.path().join(format!("{name}.db"));
        let clock = self.clock.clone().unwrap_or_default();
        let pool = clock
            .hold(stitch_mq::sqlite::open_pool(&path))
            .await
            .expect("open sqlite");
        let driver = SqliteDriver::from_pool_on(pool, clock)
            .await
            .expect("migrate sqlite");
        Arc::new(driver)
    }

    async fn open(&self, name: &str, config: QueueConfig) -> Queue {
        let clock = self.clock.clone().unwrap_or(config.clock);
        Queue::new(self.driver(name).await, QueueConfig { clock, ..config })
    }
}

stitch_mq::conformance_tests!(Sqlite::new());

mod paused {
    use super::*;

    stitch_mq::conformance_tests!(paused Sqlite::paused());
}
