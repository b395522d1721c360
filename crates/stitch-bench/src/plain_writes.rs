//! The plain-insert baseline of `stitch-bench serve`: the rows a scenario
//! had stitch record — per build one build row and its `accepted` event, per
//! later status change an update of the build row and one more event —
//! written by plain sqlx on the same backend, one transaction per build or
//! change, from as many concurrent tasks as the scenario had HTTP clients.
//! It is what the database does for those rows with nothing of stitch
//! around it (no HTTP, no queue, no runner, no event feed).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use sqlx::mysql::{MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::SqlitePool;

use crate::scratch_db::{Backend, Scratch};
use crate::sys::{cpu_time, NamedProcesses};

/// Connections of the servers' baseline pools: the store's own pool size.
const SERVER_POOL: u32 = 10;
/// Queues the baseline's builds are spread over (as the scenarios do).
const QUEUES: usize = 4;

/// How many rows to write.
pub struct PlainLoad {
    /// Builds created (a build row and an event each).
    pub builds: usize,
    /// Later status changes (a build-row update and an event each).
    pub changes: usize,
    /// Concurrent writing tasks.
    pub concurrency: usize,
}

/// What the baseline measured.
pub struct PlainRun {
    /// Create transactions per second.
    pub creates_per_s: f64,
    /// Status-change transactions per second (0 without changes).
    pub changes_per_s: f64,
    /// CPU-seconds of the benchmark process over both phases.
    pub process_cpu_s: f64,
    /// CPU-seconds of the database server's processes over both phases.
    pub server_cpu_s: Option<f64>,
}

#[derive(Clone)]
enum PlainPool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
    MySql(MySqlPool),
}

/// The baseline's statements in the backend's placeholder syntax.
struct Statements {
    insert_build: String,
    insert_event: String,
    update_build: String,
}

impl Statements {
    fn for_backend(backend: &Backend) -> Self {
        let p = |i: usize| match backend {
            Backend::Postgres(_) => format!("${i}"),
            Backend::Sqlite | Backend::MySql(_) => "?".to_string(),
        };
        Self {
            insert_build: format!(
                "INSERT INTO plain_builds (id, queue, status, head, created_at, updated_at) \
                 VALUES ({}, {}, 'accepted', {}, {}, {})",
                p(1),
                p(2),
                p(3),
                p(4),
                p(5)
            ),
            insert_event: format!(
                "INSERT INTO plain_events (build_id, queue, status, at) VALUES ({}, {}, {}, {})",
                p(1),
                p(2),
                p(3),
                p(4)
            ),
            update_build: format!(
                "UPDATE plain_builds SET status = {}, updated_at = {} WHERE id = {}",
                p(1),
                p(2),
                p(3)
            ),
        }
    }
}

fn tables(backend: &Backend) -> &'static [&'static str] {
    match backend {
        Backend::Sqlite => &[
            "CREATE TABLE plain_builds (id TEXT NOT NULL PRIMARY KEY, queue TEXT NOT NULL, \
             status TEXT NOT NULL, head TEXT NOT NULL, created_at INTEGER NOT NULL, \
             updated_at INTEGER NOT NULL)",
            "CREATE INDEX plain_builds_status_id ON plain_builds (status, id)",
            "CREATE TABLE plain_events (seq INTEGER PRIMARY KEY AUTOINCREMENT, \
             build_id TEXT NOT NULL, queue TEXT NOT NULL, status TEXT NOT NULL, at INTEGER NOT NULL)",
            "CREATE INDEX plain_events_build_id_seq ON plain_events (build_id, seq)",
        ],
        Backend::Postgres(_) => &[
            "CREATE TABLE plain_builds (id TEXT NOT NULL PRIMARY KEY, queue TEXT NOT NULL, \
             status TEXT NOT NULL, head TEXT NOT NULL, created_at BIGINT NOT NULL, \
             updated_at BIGINT NOT NULL)",
            "CREATE INDEX plain_builds_status_id ON plain_builds (status, id)",
            "CREATE TABLE plain_events (seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
             build_id TEXT NOT NULL, queue TEXT NOT NULL, status TEXT NOT NULL, at BIGINT NOT NULL)",
            "CREATE INDEX plain_events_build_id_seq ON plain_events (build_id, seq)",
        ],
        Backend::MySql(_) => &[
            "CREATE TABLE plain_builds (id VARCHAR(64) NOT NULL PRIMARY KEY, \
             queue VARCHAR(128) NOT NULL, status VARCHAR(16) NOT NULL, head TEXT NOT NULL, \
             created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL, \
             KEY plain_builds_status_id (status, id)) ENGINE = InnoDB",
            "CREATE TABLE plain_events (seq BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, \
             build_id VARCHAR(64) NOT NULL, queue VARCHAR(128) NOT NULL, \
             status VARCHAR(16) NOT NULL, at BIGINT NOT NULL, \
             KEY plain_events_build_id_seq (build_id, seq)) ENGINE = InnoDB",
        ],
    }
}

/// One transaction of the baseline.
enum Write {
    Create {
        id: String,
        queue: String,
    },
    Change {
        id: String,
        queue: String,
        status: &'static str,
    },
}

fn epoch_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Runs `write` in one transaction begun by `$begin` (SQLite takes the
/// write lock at `BEGIN IMMEDIATE`, as stitch's own transactions do).
macro_rules! write_in_tx {
    ($begin:expr, $sql:expr, $write:expr) => {{
        let mut tx = $begin.await?;
        let at = epoch_millis();
        match $write {
            Write::Create { id, queue } => {
                sqlx::query(&$sql.insert_build)
                    .bind(id)
                    .bind(queue)
                    .bind(r#"["https://example.com/change/1"]"#)
                    .bind(at)
                    .bind(at)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(&$sql.insert_event)
                    .bind(id)
                    .bind(queue)
                    .bind("accepted")
                    .bind(at)
                    .execute(&mut *tx)
                    .await?;
            }
            Write::Change { id, queue, status } => {
                sqlx::query(&$sql.update_build)
                    .bind(*status)
                    .bind(at)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(&$sql.insert_event)
                    .bind(id)
                    .bind(queue)
                    .bind(*status)
                    .bind(at)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
    }};
}

impl PlainPool {
    async fn connect(scratch: &Scratch) -> anyhow::Result<Self> {
        Ok(match (scratch.backend(), &scratch.storage_url) {
            (Backend::Sqlite, _) => PlainPool::Sqlite(
                stitch_mq::sqlite::open_pool(&scratch.data_dir.join("plain.db")).await?,
            ),
            (Backend::Postgres(_), Some(url)) => PlainPool::Postgres(
                PgPoolOptions::new()
                    .max_connections(SERVER_POOL)
                    .connect(url)
                    .await?,
            ),
            (Backend::MySql(_), Some(url)) => PlainPool::MySql(
                MySqlPoolOptions::new()
                    .max_connections(SERVER_POOL)
                    .connect(url)
                    .await?,
            ),
            (_, None) => anyhow::bail!("a server backend without a storage URL"),
        })
    }

    async fn execute(&self, sql: &str) -> anyhow::Result<()> {
        match self {
            PlainPool::Sqlite(p) => sqlx::query(sql).execute(p).await.map(drop)?,
            PlainPool::Postgres(p) => sqlx::query(sql).execute(p).await.map(drop)?,
            PlainPool::MySql(p) => sqlx::query(sql).execute(p).await.map(drop)?,
        }
        Ok(())
    }

    async fn write(&self, sql: &Statements, write: &Write) -> anyhow::Result<()> {
        match self {
            PlainPool::Sqlite(p) => write_in_tx!(p.begin_with("BEGIN IMMEDIATE"), sql, write),
            PlainPool::Postgres(p) => write_in_tx!(p.begin(), sql, write),
            PlainPool::MySql(p) => write_in_tx!(p.begin(), sql, write),
        }
        Ok(())
    }

    async fn close(&self) {
        match self {
            PlainPool::Sqlite(p) => p.close().await,
            PlainPool::Postgres(p) => p.close().await,
            PlainPool::MySql(p) => p.close().await,
        }
    }
}

/// Writes `load` into fresh `plain_*` tables of `scratch` (after the
/// scenario's server has stopped); `server` measures the database's CPU.
pub async fn run(
    scratch: &Scratch,
    load: &PlainLoad,
    server: Option<&NamedProcesses>,
) -> anyhow::Result<PlainRun> {
    let pool = PlainPool::connect(scratch).await?;
    for ddl in tables(scratch.backend()) {
        pool.execute(ddl).await?;
    }
    let sql = Arc::new(Statements::for_backend(scratch.backend()));
    let id = |i: usize| format!("plain-{i:08}");
    let queue = |i: usize| format!("queue-{}", i % QUEUES);
    let (cpu0, server0) = (cpu_time(), server.map(NamedProcesses::cpu));

    let started = Instant::now();
    phase(&pool, &sql, load.builds, load.concurrency, move |i| {
        Write::Create {
            id: id(i),
            queue: queue(i),
        }
    })
    .await?;
    let creates_s = started.elapsed().as_secs_f64();

    let builds = load.builds.max(1);
    let started = Instant::now();
    phase(&pool, &sql, load.changes, load.concurrency, move |j| {
        let i = j % builds;
        Write::Change {
            id: id(i),
            queue: queue(i),
            // The first round of changes starts every build, later rounds finish them.
            status: if j < builds { "running" } else { "succeeded" },
        }
    })
    .await?;
    let changes_s = started.elapsed().as_secs_f64();

    let process_cpu_s = cpu_time().saturating_sub(cpu0).as_secs_f64();
    let server_cpu_s = match (server, server0) {
        (Some(s), Some(before)) => Some(s.cpu().since(&before).as_secs_f64()),
        _ => None,
    };
    pool.close().await;
    Ok(PlainRun {
        creates_per_s: load.builds as f64 / creates_s.max(1e-9),
        changes_per_s: if load.changes == 0 {
            0.0
        } else {
            load.changes as f64 / changes_s.max(1e-9)
        },
        process_cpu_s,
        server_cpu_s,
    })
}

/// `total` transactions `write(i)` from `concurrency` tasks.
async fn phase(
    pool: &PlainPool,
    sql: &Arc<Statements>,
    total: usize,
    concurrency: usize,
    write: impl Fn(usize) -> Write + Clone + Send + 'static,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (pool, sql, next, write) = (pool.clone(), sql.clone(), next.clone(), write.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return anyhow::Ok(());
                }
                pool.write(&sql, &write(i)).await?;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}
