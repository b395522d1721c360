//! The conformance suite on MySQL / MariaDB (`STITCH_TEST_MYSQL_URL`), one
//! database per test so the suite runs in parallel.

mod support;

use std::sync::Arc;

use async_trait::async_trait;
use stitch_mq::conformance::Backend;
use stitch_mq::Driver;
use support::MySqlDatabase;

struct MySql(MySqlDatabase);

#[async_trait]
impl Backend for MySql {
    async fn driver(&self, name: &str) -> Arc<dyn Driver> {
        Arc::new(self.0.driver(name).await)
    }
}

stitch_mq::conformance_tests!(optional async { MySqlDatabase::connect().await.map(MySql) });
