//! Keeps the planner's statistics of the queue's PostgreSQL tables in step
//! with their size while they grow.
//!
//! A fresh installation fills its queue tables far faster than autovacuum
//! (one pass a minute by default) analyzes them. Without statistics the
//! planner guesses one row for every lookup and picks plans that read a
//! whole group per key, and the plans cached on the pool's connections keep
//! that guess until an `ANALYZE` invalidates them. So the driver analyzes a
//! table itself whenever it holds at least [`MIN_ROWS`] rows and twice as
//! many as its statistics say: a handful of analyses while the tables grow,
//! none in a steady state (autovacuum keeps up there; see migration 1002).

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The queue's tables whose size changes with the load.
const TABLES: [&str; 3] = ["mq_messages", "mq_partitions", "mq_state"];
/// Below this many rows any plan is cheap; statistics are left to autovacuum.
const MIN_ROWS: i64 = 1000;
/// How often the tables' sizes are checked.
const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// One table's size as counted now and as the planner last learned it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TableSize {
    pub name: String,
    /// Rows now (the statistics collector's live-tuple count).
    pub live: i64,
    /// Rows at the last `ANALYZE`/`VACUUM` (`pg_class.reltuples`; negative
    /// when never analyzed).
    pub analyzed: f64,
}

impl TableSize {
    /// Whether the planner's picture of this table is too old to trust.
    pub fn needs_analyze(&self) -> bool {
        self.live >= MIN_ROWS && (self.analyzed < 0.0 || self.live as f64 > 2.0 * self.analyzed)
    }
}

/// Checks the tables every [`CHECK_INTERVAL`] until `stop`; failures are
/// logged and retried at the next check (statistics are an optimisation).
pub(crate) async fn keep_fresh(pool: PgPool, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
        }
        if pool.is_closed() {
            return;
        }
        if let Err(e) = analyze_grown_tables(&pool).await {
            tracing::debug!(error = %e, "queue statistics check failed");
        }
    }
}

/// Analyzes every queue table in the pool's schema that
/// [`TableSize::needs_analyze`]; returns the tables analyzed.
pub(crate) async fn analyze_grown_tables(pool: &PgPool) -> sqlx::Result<Vec<String>> {
    let sizes: Vec<(String, i64, f32)> = sqlx::query_as(
        "SELECT c.relname::text, s.n_live_tup, c.reltuples FROM pg_class c \
         JOIN pg_stat_user_tables s ON s.relid = c.oid \
         WHERE s.schemaname = current_schema() AND c.relname = ANY($1)",
    )
    .bind(&TABLES[..])
    .fetch_all(pool)
    .await?;
    let mut analyzed = Vec::new();
    for (name, live, reltuples) in sizes {
        let size = TableSize {
            name,
            live,
            analyzed: f64::from(reltuples),
        };
        if !size.needs_analyze() {
            continue;
        }
        // The name comes from the fixed list above, never from input.
        sqlx::query(&format!("ANALYZE {}", size.name))
            .execute(pool)
            .await?;
        tracing::debug!(table = %size.name, rows = size.live, "analyzed a grown queue table");
        analyzed.push(size.name);
    }
    Ok(analyzed)
}

#[cfg(test)]
mod tests {
    use super::TableSize;

    fn size(live: i64, analyzed: f64) -> TableSize {
        TableSize {
            name: "mq_messages".into(),
            live,
            analyzed,
        }
    }

    #[test]
    fn small_tables_are_left_to_autovacuum() {
        assert!(!size(999, -1.0).needs_analyze());
        assert!(!size(10, 0.0).needs_analyze());
    }

    #[test]
    fn a_table_never_analyzed_or_doubled_since_is_analyzed() {
        assert!(size(1000, -1.0).needs_analyze());
        assert!(size(5000, 0.0).needs_analyze());
        assert!(size(4001, 2000.0).needs_analyze());
    }

    #[test]
    fn a_table_near_its_analyzed_size_is_not() {
        assert!(!size(4000, 2000.0).needs_analyze());
        assert!(!size(1500, 10_000.0).needs_analyze());
    }
}
