//! The conformance suite on PostgreSQL (`STITCH_TEST_POSTGRES_URL`), one
//! schema per test so the suite runs in parallel.

mod support;

use std::sync::Arc;

use async_trait::async_trait;
use stitch_mq::conformance::Backend;
use stitch_mq::{Queue, QueueConfig};
use support::PgDatabase;

struct Postgres(PgDatabase);

#[async_trait]
impl Backend for Postgres {
    async fn open(&self, name: &str, config: QueueConfig) -> Queue {
        Queue::new(Arc::new(self.0.driver(name).await), config)
    }
}

stitch_mq::conformance_tests!(optional async { PgDatabase::connect().await.map(Postgres) });
