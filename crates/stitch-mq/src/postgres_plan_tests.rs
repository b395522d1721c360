//! The maintenance and window statements stay linear in the rows they touch
//! on tables the planner knows nothing about yet (never analyzed, generic
//! plans) — the state of a fresh installation filling up. Each statement
//! runs under `EXPLAIN ANALYZE` and the rows every plan node produced or
//! filtered away are added up: a key lookup planned as a rescan of the whole
//! group makes that sum quadratic, far above the bound.

use std::str::FromStr;

use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection, PgPool};

use super::*;

/// Partitions (and messages, and delivery states) in the test schema.
const N: usize = 3000;

/// Rows produced plus rows filtered out, over every node and loop of a plan.
fn plan_work(node: &Value) -> f64 {
    let num = |k: &str| node.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let loops = num("Actual Loops").max(1.0);
    let own =
        (num("Actual Rows") + num("Rows Removed by Filter") + num("Rows Removed by Join Filter"))
            * loops;
    let children: f64 = node
        .get("Plans")
        .and_then(Value::as_array)
        .map(|ps| ps.iter().map(plan_work).sum())
        .unwrap_or(0.0);
    own + children
}

/// Prepares `sql` as `name` and runs it once (rolled back), so its generic
/// plan is made and cached now — on empty tables, like the plans a pool's
/// connections cache while a fresh installation starts.
async fn prepare_and_plan(conn: &mut PgConnection, name: &str, sql: &str, args: &str) {
    conn.execute(format!("PREPARE {name} AS {sql}").as_str())
        .await
        .expect("prepare");
    let mut tx = conn.begin().await.expect("begin");
    tx.execute(format!("EXECUTE {name}({args})").as_str())
        .await
        .expect("first execution");
    tx.rollback().await.expect("rollback");
}

/// Runs prepared statement `name` under `EXPLAIN ANALYZE`, rolled back, and
/// returns its [`plan_work`].
async fn work_of(conn: &mut PgConnection, name: &str, args: &str) -> f64 {
    let mut tx = conn.begin().await.expect("begin");
    let (plan,): (Value,) = sqlx::query_as(&format!(
        "EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {name}({args})"
    ))
    .fetch_one(&mut *tx)
    .await
    .expect("explain");
    tx.rollback().await.expect("rollback");
    plan_work(&plan[0]["Plan"])
}

/// A fresh schema with the queue's (empty) tables.
async fn fresh_schema() -> Option<(PgPool, String)> {
    let url = match std::env::var("STITCH_TEST_POSTGRES_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => {
            assert!(
                std::env::var("STITCH_REQUIRE_DATABASES").is_err(),
                "STITCH_TEST_POSTGRES_URL is required (STITCH_REQUIRE_DATABASES is set)"
            );
            return None;
        }
    };
    let schema = format!("mqplan_{}_{}", std::process::id(), rand::random::<u32>());
    let base = PgConnectOptions::from_str(&url).expect("STITCH_TEST_POSTGRES_URL");
    let mut admin = PgConnection::connect_with(&base).await.expect("connect");
    admin
        .execute(format!("CREATE SCHEMA \"{schema}\"").as_str())
        .await
        .expect("create schema");
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(base.options([("search_path", schema.as_str())]))
        .await
        .expect("pool");
    migrate(&pool).await.expect("migrate");
    Some((pool, schema))
}

/// Fills the tables without analyzing them: `N` partitions of topic `t`,
/// group `g` owned by `sub` (every other one idle), one message each and
/// one delivery state each.
async fn fill(pool: &PgPool) {
    let n = N as i64;
    for sql in [
        "INSERT INTO mq_messages (topic, partition_key, msg_id, payload, published_at, available_at, created_at) \
         SELECT 't', 'p' || g, 'm' || g, '\\x00', 0, 0, 0 FROM generate_series(1, $1) g",
        // Cursors sit on every other message: half the states are swept.
        "INSERT INTO mq_partitions (topic, grp, partition_key, cursor, next_due, lease_owner, lease_expires) \
         SELECT 't', 'g', 'p' || g, CASE WHEN g % 2 = 0 THEN g ELSE g - 1 END, \
         CASE WHEN g % 2 = 0 THEN NULL ELSE 5 END, 'sub', 100 FROM generate_series(1, $1) g",
        "INSERT INTO mq_state (grp, seq, topic, partition_key, attempt, invisible_until, claimed, token) \
         SELECT 'g', g, 't', 'p' || g, 1, 50, TRUE, 1 FROM generate_series(1, $1) g",
    ] {
        sqlx::query(sql).bind(n).execute(pool).await.expect("fill");
    }
}

#[tokio::test]
async fn statements_over_many_partitions_stay_linear_without_statistics() {
    let Some((pool, schema)) = fresh_schema().await else {
        return;
    };
    let mut conn = pool.acquire().await.expect("acquire");
    conn.execute("SET plan_cache_mode = force_generic_plan")
        .await
        .expect("generic plans");
    let keys: Vec<String> = (1..=64).map(|i| format!("p{}", i * 40)).collect();
    let seqs: Vec<String> = (1..=64).map(|i| (i * 40).to_string()).collect();
    let windows_args = format!(
        "'g', 't', '{{{}}}'::text[], '{{{}}}'::int8[], 17",
        keys.join(","),
        vec!["0"; 64].join(",")
    );
    let bodies_args = format!("'{{{}}}'::int8[]", seqs.join(","));
    // (name, statement, arguments, most rows of work allowed)
    let n = N as f64;
    let statements = [
        (
            "release_idle",
            RELEASE_IDLE_SQL,
            "'t', 'g', 'sub'".to_string(),
            20.0 * n,
        ),
        (
            "extend",
            EXTEND_LEASES_SQL,
            "'t', 'g', 'sub', 200".to_string(),
            20.0 * n,
        ),
        (
            "release_all",
            RELEASE_ALL_SQL,
            "'t', 'g', 'sub'".to_string(),
            20.0 * n,
        ),
        ("sweep", SWEEP_STATE_SQL, "'g', 't'".to_string(), 20.0 * n),
        (
            "recover_state",
            RECOVER_STATE_SQL,
            "10, 'g', 't', 'sub'".to_string(),
            20.0 * n,
        ),
        (
            "recover_due",
            RECOVER_DUE_SQL,
            "1, 'g', 't', 'sub'".to_string(),
            20.0 * n,
        ),
        // A claim's chunk of 64 windows and their bodies: a few rows per
        // key, not a pass over the group per key.
        ("windows", WINDOWS_SQL, windows_args, 20.0 * 64.0),
        ("bodies", BODIES_SQL, bodies_args, 20.0 * 64.0),
    ];
    for (name, sql, args, _) in &statements {
        prepare_and_plan(&mut conn, name, sql, args).await;
    }
    fill(&pool).await;
    for (name, _, args, bound) in &statements {
        let work = work_of(&mut conn, name, args).await;
        assert!(
            work <= *bound,
            "{name}: {work} rows of work, more than {bound} (a key lookup planned as a scan?)"
        );
    }
    drop(conn);
    pool.close().await;
    let url = std::env::var("STITCH_TEST_POSTGRES_URL").unwrap_or_default();
    if let Ok(mut admin) = PgConnection::connect(&url).await {
        let _ = admin
            .execute(format!("DROP SCHEMA \"{schema}\" CASCADE").as_str())
            .await;
    }
}
