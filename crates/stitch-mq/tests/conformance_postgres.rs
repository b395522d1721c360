//! The conformance suite on PostgreSQL (`STITCH_TEST_POSTGRES_URL`), one
//! schema per test so the suite runs in parallel.

mod support;

use std::sync::Arc;

use async_trait::async_trait;
use stitch_mq::conformance::Backend;
use stitch_mq::Driver;
use support::PgDatabase;

struct Postgres(PgDatabase);

#[async_trait]
impl Backend for Postgres {
    async fn driver(&self, name: &str) -> Arc<dyn Driver> {
        Arc::new(self.0.driver(name).await)
    }
}

stitch_mq::conformance_tests!(optional async { PgDatabase::connect().await.map(Postgres) });
