//! What a PostgreSQL server spent its time on during a phase, by statement,
//! from `pg_stat_statements` when the server has it loaded (the benchmarks'
//! own cluster does: `postgres-cluster.sh`). Server-wide counters: run
//! nothing else against that server meanwhile.

use std::str::FromStr;

use sqlx::{ConnectOptions, Connection};

/// The statements view of one server, or nothing when the server lacks it.
pub struct Statements {
    options: sqlx::postgres::PgConnectOptions,
}

impl Statements {
    /// `Some` when `url`'s server has `pg_stat_statements` (the extension
    /// created here if the library is preloaded); `None` otherwise.
    pub async fn open(url: &str) -> Option<Self> {
        let options = sqlx::postgres::PgConnectOptions::from_str(url).ok()?;
        let mut conn = options.connect().await.ok()?;
        let ok = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&mut conn)
            .await
            .is_ok()
            && sqlx::query("SELECT pg_stat_statements_reset()")
                .execute(&mut conn)
                .await
                .is_ok();
        let _ = conn.close().await;
        ok.then_some(Self { options })
    }

    /// Zeroes the counters (the start of a phase).
    pub async fn reset(&self) -> anyhow::Result<()> {
        let mut conn = self.options.connect().await?;
        sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        Ok(())
    }

    /// Prints the `n` statements with the most execution time since the
    /// last reset, and the total over all.
    pub async fn print_top(&self, n: i64) -> anyhow::Result<()> {
        let mut conn = self.options.connect().await?;
        let total: (Option<f64>, Option<i64>) = sqlx::query_as(
            "SELECT sum(total_exec_time)::float8, sum(calls)::int8 FROM pg_stat_statements",
        )
        .fetch_one(&mut conn)
        .await?;
        let rows: Vec<(i64, f64, f64, i64, String)> = sqlx::query_as(
            "SELECT calls, total_exec_time, mean_exec_time, rows, \
             regexp_replace(query, '\\s+', ' ', 'g') FROM pg_stat_statements \
             ORDER BY total_exec_time DESC LIMIT $1",
        )
        .bind(n)
        .fetch_all(&mut conn)
        .await?;
        conn.close().await?;
        let all = total.0.unwrap_or(0.0);
        println!(
            "PostgreSQL execution time by statement (pg_stat_statements): {:.0} ms over {} calls",
            all,
            total.1.unwrap_or(0)
        );
        println!(
            "  {:>8} {:>9} {:>6} {:>8} {:>9}  statement",
            "calls", "total ms", "share", "mean ms", "rows"
        );
        for (calls, total_ms, mean_ms, rows, query) in rows {
            let text: String = query.chars().take(110).collect();
            println!(
                "  {calls:>8} {total_ms:>9.0} {:>5.1}% {mean_ms:>8.3} {rows:>9}  {text}",
                100.0 * total_ms / all.max(1e-9)
            );
        }
        Ok(())
    }
}
