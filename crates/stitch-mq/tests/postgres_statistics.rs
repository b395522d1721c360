//! The PostgreSQL driver analyzes its tables itself while they grow from
//! empty, so the planner (and the plans cached on the pool's connections)
//! stop assuming a one-row table long before autovacuum gets to them.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use stitch_mq::{Message, Queue, QueueConfig};
use support::PgDatabase;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_grew_from_empty_gets_analyzed_once() {
    let Some(db) = PgDatabase::connect().await else {
        return;
    };
    let driver = db.driver("grow").await;
    let q = Queue::new(Arc::new(driver.clone()), QueueConfig::default());
    for chunk in 0..20 {
        let msgs = (0..100)
            .map(|i| Message::new(format!("m{chunk}-{i}"), format!("p{i}"), b"x".to_vec()))
            .collect();
        q.publisher().publish_batch("grow", msgs).await.unwrap();
    }
    // The statistics collector counts the inserts once the inserting
    // connections flush (within seconds); until then nothing looks grown.
    // The driver's own background check may get there first.
    let reltuples = || async {
        sqlx::query_scalar::<_, f32>(
            "SELECT reltuples FROM pg_class WHERE relname = 'mq_messages' \
             AND relnamespace = current_schema()::regnamespace",
        )
        .fetch_one(driver.pool())
        .await
        .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let analyzed = driver.refresh_statistics().await.unwrap();
        if analyzed.iter().any(|t| t == "mq_messages") || reltuples().await >= 1000.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "2,000 messages in a never-analyzed table were not analyzed within 30 s"
        );
        // Polled: the counters come from PostgreSQL's statistics system,
        // flushed by the inserting connections on its own schedule; nothing
        // announces the flush.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let n = reltuples().await;
    assert!(n >= 1000.0, "reltuples {n} after ANALYZE");
    // Nothing grew since: no second analysis.
    let again = driver.refresh_statistics().await.unwrap();
    assert!(
        !again.iter().any(|t| t == "mq_messages"),
        "analyzed again without growth: {again:?}"
    );
    q.close();
}
