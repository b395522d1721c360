//! `stitch-bench mq`: the message queue on SQLite, PostgreSQL and
//! MySQL/MariaDB in one run, each beside a plain-database baseline that does
//! the same row writes in the same transaction sizes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use sqlx::{ConnectOptions, Connection, Executor};
use stitch_mq::sqlite::{open_pool, SqliteDriver};
use stitch_mq::{AnyDriver, Message, Queue, QueueConfig, SubscriptionConfig};
use tokio::sync::Mutex;

use crate::counting::{CountingDriver, Counts};
use crate::sys::{peak_rss_mib, Meter};

const TOPIC: &str = "bench";
/// Concurrent publishers in the end-to-end runs.
const PRODUCERS: usize = 4;

/// Options of the queue benchmark.
#[derive(clap::Args)]
pub struct MqArgs {
    /// Directory for the benchmark databases (default: a fresh temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Messages per end-to-end and publish run.
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Seconds of steady load for each latency run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Offered load of the latency runs, messages (or wakes) per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Run only these sections (comma-separated): publish, e2e-1, e2e-100,
    /// e2e-10000, baseline (needs e2e-100), latency, wake.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Backends to measure, in this order (comma-separated): sqlite,
    /// postgres, mysql. A server backend without a URL is reported as skipped.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres,mysql")]
    backends: Vec<String>,
    /// PostgreSQL to measure on (a fresh schema per section, dropped after).
    #[arg(long, env = "STITCH_TEST_POSTGRES_URL")]
    postgres_url: Option<String>,
    /// MySQL / MariaDB to measure on (a fresh database per section, dropped after).
    #[arg(long, env = "STITCH_TEST_MYSQL_URL")]
    mysql_url: Option<String>,
}

/// Where one backend's sections store their data.
enum Store {
    Sqlite(PathBuf),
    Postgres(String),
    MySql(String),
}

impl Store {
    fn label(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "SQLite",
            Store::Postgres(_) => "PostgreSQL",
            Store::MySql(_) => "MariaDB/MySQL",
        }
    }

    /// A unique schema / database name for section `name` of this run.
    fn scratch(name: &str) -> String {
        let clean: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        format!("bench_{}_{}", std::process::id(), clean)
    }

    /// A driver on a fresh schema (PostgreSQL) or database (MySQL) for `name`.
    async fn driver(&self, name: &str) -> anyhow::Result<AnyDriver> {
        Ok(match self {
            Store::Sqlite(dir) => {
                AnyDriver::Sqlite(SqliteDriver::open(&dir.join(format!("{name}.db"))).await?)
            }
            Store::Postgres(url) => {
                let schema = Self::scratch(name);
                let base = sqlx::postgres::PgConnectOptions::from_str(url)?;
                let mut admin = base.connect().await?;
                admin
                    .execute(
                        format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}")
                            .as_str(),
                    )
                    .await?;
                admin.close().await?;
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(10)
                    .connect_with(
                        base.options([("search_path", schema.as_str())])
                            .application_name("stitch-bench"),
                    )
                    .await?;
                AnyDriver::Postgres(stitch_mq::postgres::PostgresDriver::from_pool(pool).await?)
            }
            Store::MySql(url) => {
                let db = Self::scratch(name);
                let base = sqlx::mysql::MySqlConnectOptions::from_str(url)?;
                let mut admin = base.connect().await?;
                admin
                    .execute(format!("DROP DATABASE IF EXISTS {db}").as_str())
                    .await?;
                admin
                    .execute(format!("CREATE DATABASE {db}").as_str())
                    .await?;
                admin.close().await?;
                let pool = stitch_mq::mysql::pool_options()
                    .connect_with(base.database(&db))
                    .await?;
                AnyDriver::MySql(stitch_mq::mysql::MySqlDriver::from_pool(pool).await?)
            }
        })
    }

    /// Drops the schemas / databases this run made.
    async fn cleanup(&self, names: &[String]) -> anyhow::Result<()> {
        match self {
            Store::Sqlite(_) => {}
            Store::Postgres(url) => {
                let mut admin = sqlx::postgres::PgConnectOptions::from_str(url)?
                    .connect()
                    .await?;
                for n in names {
                    let s = Self::scratch(n);
                    admin
                        .execute(format!("DROP SCHEMA IF EXISTS {s} CASCADE").as_str())
                        .await?;
                }
                admin.close().await?;
            }
            Store::MySql(url) => {
                let mut admin = sqlx::mysql::MySqlConnectOptions::from_str(url)?
                    .connect()
                    .await?;
                for n in names {
                    let d = Self::scratch(n);
                    admin
                        .execute(format!("DROP DATABASE IF EXISTS {d}").as_str())
                        .await?;
                }
                admin.close().await?;
            }
        }
        Ok(())
    }
}

impl MqArgs {
    fn wants(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == section)
    }
}

async fn open(
    store: &Store,
    name: &str,
    used: &mut Vec<String>,
) -> anyhow::Result<(Queue, Arc<Counts>)> {
    used.push(name.to_string());
    let driver = store.driver(name).await?;
    let counts = Arc::new(Counts::default());
    let q = Queue::new(
        Arc::new(CountingDriver {
            inner: driver,
            counts: counts.clone(),
        }),
        QueueConfig {
            gc_interval: None,
            ..QueueConfig::default()
        },
    );
    Ok((q, counts))
}

fn sub_config(batch: u32) -> SubscriptionConfig {
    SubscriptionConfig {
        batch_size: batch,
        max_in_flight: 4096,
        visibility_timeout: Duration::from_secs(120),
        ..SubscriptionConfig::new("bench")
    }
}

fn epoch_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn pct(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

struct Row {
    name: String,
    value: String,
}

fn row(rows: &mut Vec<Row>, name: impl Into<String>, value: impl Into<String>) {
    let (name, value) = (name.into(), value.into());
    println!("{name:<58} {value}");
    rows.push(Row { name, value });
}

pub async fn run(args: MqArgs) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let mut rows = Vec::new();
    println!(
        "stitch-bench mq: backends {}, {} cores, messages={}, latency runs {} s at {}/s",
        args.backends.join(","),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        args.messages,
        args.seconds,
        args.rate
    );
    for backend in &args.backends {
        let store = match backend.as_str() {
            "sqlite" => Store::Sqlite(dir.clone()),
            "postgres" => match &args.postgres_url {
                Some(url) => Store::Postgres(url.clone()),
                None => {
                    row(
                        &mut rows,
                        "PostgreSQL",
                        "skipped: no --postgres-url / STITCH_TEST_POSTGRES_URL",
                    );
                    continue;
                }
            },
            "mysql" => match &args.mysql_url {
                Some(url) => Store::MySql(url.clone()),
                None => {
                    row(
                        &mut rows,
                        "MariaDB/MySQL",
                        "skipped: no --mysql-url / STITCH_TEST_MYSQL_URL",
                    );
                    continue;
                }
            },
            other => anyhow::bail!("unknown backend {other:?}: use sqlite, postgres or mysql"),
        };
        println!("\n== {}", store.label());
        let mut used = Vec::new();
        let outcome = run_backend(&args, &store, &dir, &mut rows, &mut used).await;
        if let Err(e) = store.cleanup(&used).await {
            println!("    cleanup of {} failed: {e}", store.label());
        }
        outcome?;
    }
    row(
        &mut rows,
        "peak RSS (MiB)",
        format!("{:.1}", peak_rss_mib()),
    );
    println!("\n| measure | value |\n|---|---|");
    for r in rows {
        println!("| {} | {} |", r.name, r.value);
    }
    Ok(())
}

async fn run_backend(
    args: &MqArgs,
    store: &Store,
    dir: &Path,
    rows: &mut Vec<Row>,
    used: &mut Vec<String>,
) -> anyhow::Result<()> {
    let label = store.label();
    // 1. Publish throughput.
    if args.wants("publish") {
        let (q, _) = open(store, "publish-single", used).await?;
        let n_single = (args.messages / 10).max(1000);
        let m = Meter::start();
        for i in 0..n_single {
            q.publisher()
                .publish(
                    TOPIC,
                    Message::new(format!("m{i}"), format!("p{}", i % 100), vec![0u8; 64]),
                )
                .await?;
        }
        let (wall, cpu) = m.stop();
        row(
            rows,
            format!("{label}: publish, one message per call (msg/s)"),
            format!("{:.0}  (cpu {cpu:.2} cores)", n_single as f64 / wall),
        );

        let (q, _) = open(store, "publish-batch", used).await?;
        let m = Meter::start();
        for b in 0..args.messages / 100 {
            let batch = (0..100)
                .map(|j| {
                    let i = b * 100 + j;
                    Message::new(format!("m{i}"), format!("p{}", i % 100), vec![0u8; 64])
                })
                .collect();
            q.publisher().publish_batch(TOPIC, batch).await?;
        }
        let (wall, cpu) = m.stop();
        row(
            rows,
            format!("{label}: publish, batches of 100 (msg/s)"),
            format!("{:.0}  (cpu {cpu:.2} cores)", args.messages as f64 / wall),
        );
    }

    // 2. End to end by partition count.
    let mut e2e_100: Option<(f64, Arc<Counts>)> = None;
    for partitions in [1usize, 100, 10_000] {
        let wanted = args.wants(&format!("e2e-{partitions}"))
            || (partitions == 100 && args.wants("baseline"));
        if !wanted {
            continue;
        }
        let (q, counts) = open(store, &format!("e2e-{partitions}"), used).await?;
        let (rate, cpu) = end_to_end(&q, args.messages, partitions).await?;
        row(
            rows,
            format!("{label}: end-to-end publish->deliver->ack, {partitions} partitions (msg/s)"),
            format!(
                "{rate:.0}  (cpu {cpu:.2} cores; {:.1} msgs/claim tx, {:.1} outcomes/apply tx)",
                counts.get(&counts.claimed) as f64 / counts.get(&counts.claim_txs).max(1) as f64,
                counts.get(&counts.applied) as f64 / counts.get(&counts.apply_txs).max(1) as f64,
            ),
        );
        println!(
            "    time in driver: publish {} ms over {} txs, claim {} ms over {} calls ({} non-empty), apply {} ms over {} txs",
            counts.get(&counts.publish_us) / 1000,
            counts.get(&counts.publish_txs),
            counts.get(&counts.claim_us) / 1000,
            counts.get(&counts.claim_calls),
            counts.get(&counts.claim_txs),
            counts.get(&counts.apply_us) / 1000,
            counts.get(&counts.apply_txs)
        );
        if partitions == 100 {
            e2e_100 = Some((rate, counts));
        }
    }

    // 3. The plain database doing the same row writes in the same transaction sizes.
    if let Some((rate, counts)) = e2e_100.filter(|_| args.wants("baseline")) {
        match store {
            Store::Sqlite(_) => {
                let base = baseline(dir, &counts).await?;
                row(
                    rows,
                    "SQLite: plain sqlx, one statement per row write (msg/s)",
                    format!("{base:.0}"),
                );
                let raw = baseline_raw(dir, &counts)?;
                row(
                    rows,
                    "SQLite: plain rusqlite, prepared, one thread (msg/s)",
                    format!("{raw:.0}"),
                );
                row(
                    rows,
                    "SQLite: queue end-to-end / plain sqlx (100 partitions)",
                    format!("{:.2}", rate / base),
                );
                row(
                    rows,
                    "SQLite: queue end-to-end / plain rusqlite (100 partitions)",
                    format!("{:.2}", rate / raw),
                );
            }
            Store::Postgres(url) => {
                used.push("baseline".into());
                let opts = sqlx::postgres::PgConnectOptions::from_str(url)?;
                let schema = Store::scratch("baseline");
                let (per_row, batched) = baseline_postgres(opts, &schema, &counts).await?;
                row(
                    rows,
                    "PostgreSQL: plain sqlx, one statement per row write (msg/s)",
                    format!("{per_row:.0}"),
                );
                row(
                    rows,
                    "PostgreSQL: plain sqlx, one unnest statement per write kind and tx (msg/s)",
                    format!("{batched:.0}"),
                );
                row(
                    rows,
                    "PostgreSQL: queue end-to-end / plain per-row (100 partitions)",
                    format!("{:.2}", rate / per_row),
                );
                row(
                    rows,
                    "PostgreSQL: queue end-to-end / plain batched (100 partitions)",
                    format!("{:.2}", rate / batched),
                );
            }
            Store::MySql(url) => {
                used.push("baseline".into());
                let opts = sqlx::mysql::MySqlConnectOptions::from_str(url)?;
                let db = Store::scratch("baseline");
                let per_row = baseline_mysql(opts, &db, &counts).await?;
                row(
                    rows,
                    "MariaDB/MySQL: plain sqlx, one statement per row write (msg/s)",
                    format!("{per_row:.0}"),
                );
                row(
                    rows,
                    "MariaDB/MySQL: queue end-to-end / plain per-row (100 partitions)",
                    format!("{:.2}", rate / per_row),
                );
            }
        }
    }

    // 4. Publish-to-delivery latency at a steady offered load.
    if args.wants("latency") {
        let (q, _) = open(store, "latency", used).await?;
        let (h, achieved) = publish_latency(&q, args.rate, args.seconds).await?;
        row(
            rows,
            format!("{label}: publish-to-delivery latency at {achieved:.0} msg/s (ms)"),
            format!(
                "p50 {:.2}  p99 {:.2}  max {:.2}",
                pct(&h, 0.5),
                pct(&h, 0.99),
                h.max() as f64 / 1000.0
            ),
        );
    }
    // 5. Wake-to-redelivery latency.
    if args.wants("wake") {
        let (q, _) = open(store, "wake", used).await?;
        let (h, achieved) = wake_latency(&q, args.rate, args.seconds).await?;
        row(
            rows,
            format!("{label}: wake-to-redelivery latency at {achieved:.0} wakes/s (ms)"),
            format!(
                "p50 {:.2}  p99 {:.2}  max {:.2}",
                pct(&h, 0.5),
                pct(&h, 0.99),
                h.max() as f64 / 1000.0
            ),
        );
    }
    Ok(())
}

/// Publishes `total` messages over `partitions` in batches of 100 while one
/// subscriber acks each delivery; returns (msg/s, CPU cores).
async fn end_to_end(q: &Queue, total: usize, partitions: usize) -> anyhow::Result<(f64, f64)> {
    let mut sub = q.subscriber().subscribe(TOPIC, sub_config(64)).await?;
    let acked = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let m = Meter::start();
    // Four producers publish interleaved batches of 100, as a busy service's
    // request handlers would.
    let mut feeders = tokio::task::JoinSet::new();
    for f in 0..PRODUCERS {
        let publisher = q.publisher();
        feeders.spawn(async move {
            for b in (f..total.div_ceil(100)).step_by(PRODUCERS) {
                let batch: Vec<Message> = (b * 100..((b + 1) * 100).min(total))
                    .map(|i| {
                        Message::new(
                            format!("m{i}"),
                            format!("p{}", i % partitions),
                            vec![0u8; 64],
                        )
                    })
                    .collect();
                publisher.publish_batch(TOPIC, batch).await?;
            }
            anyhow::Ok(())
        });
    }
    let consumer = {
        let acked = acked.clone();
        let done = done.clone();
        tokio::spawn(async move {
            while let Some(d) = sub.recv().await {
                let acked = acked.clone();
                let done = done.clone();
                tokio::spawn(async move {
                    if d.ack().await.is_ok() && acked.fetch_add(1, Ordering::AcqRel) + 1 == total {
                        done.notify_one();
                    }
                });
            }
        })
    };
    while let Some(r) = feeders.join_next().await {
        r??;
    }
    tokio::time::timeout(Duration::from_secs(600), done.notified()).await?;
    let (wall, cpu) = m.stop();
    consumer.abort();
    Ok((total as f64 / wall, cpu))
}

async fn baseline(dir: &Path, counts: &Counts) -> anyhow::Result<f64> {
    let pool = open_pool(&dir.join("baseline.db")).await?;
    sqlx::query("CREATE TABLE msgs (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT, k TEXT, mid TEXT, payload BLOB, at INTEGER)")
        .execute(&pool)
        .await?;
    sqlx::query("CREATE UNIQUE INDEX msgs_key ON msgs (topic, k, mid)")
        .execute(&pool)
        .await?;
    sqlx::query(
        "CREATE TABLE state (id INTEGER PRIMARY KEY, attempt INTEGER, until INTEGER, done INTEGER)",
    )
    .execute(&pool)
    .await?;
    let total = counts.get(&counts.published) as usize;
    let publish_tx = (total / counts.get(&counts.publish_txs).max(1) as usize).max(1);
    let claim_tx = (total / counts.get(&counts.claim_txs).max(1) as usize).max(1);
    let apply_tx = (total / counts.get(&counts.apply_txs).max(1) as usize).max(1);
    let payload = vec![0u8; 64];
    let m = Meter::start();
    for chunk in (1..=total).collect::<Vec<_>>().chunks(publish_tx) {
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        for i in chunk {
            sqlx::query("INSERT INTO msgs (topic, k, mid, payload, at) VALUES (?, ?, ?, ?, ?)")
                .bind(TOPIC)
                .bind(format!("p{}", i % 100))
                .bind(format!("m{i}"))
                .bind(&payload)
                .bind(*i as i64)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
    }
    for chunk in (1..=total).collect::<Vec<_>>().chunks(claim_tx) {
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        for i in chunk {
            sqlx::query("INSERT INTO state (id, attempt, until, done) VALUES (?, 1, ?, 0)")
                .bind(*i as i64)
                .bind(*i as i64)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
    }
    for chunk in (1..=total).collect::<Vec<_>>().chunks(apply_tx) {
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        for i in chunk {
            sqlx::query("UPDATE state SET done = 1 WHERE id = ?")
                .bind(*i as i64)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
    }
    let (wall, _) = m.stop();
    Ok(total as f64 / wall)
}

/// Transaction sizes the queue used in the measured run:
/// (messages, per publish tx, per claim tx, per apply tx).
fn tx_sizes(counts: &Counts) -> (usize, usize, usize, usize) {
    let total = counts.get(&counts.published) as usize;
    (
        total,
        (total / counts.get(&counts.publish_txs).max(1) as usize).max(1),
        (total / counts.get(&counts.claim_txs).max(1) as usize).max(1),
        (total / counts.get(&counts.apply_txs).max(1) as usize).max(1),
    )
}

/// The three row writes per message of [`baseline`] on PostgreSQL, in the
/// queue's transaction sizes: once one statement per row, once one `unnest`
/// statement per write kind and transaction (as the queue's driver writes).
async fn baseline_postgres(
    opts: sqlx::postgres::PgConnectOptions,
    schema: &str,
    counts: &Counts,
) -> anyhow::Result<(f64, f64)> {
    let mut c = opts.connect().await?;
    c.execute(format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; SET search_path = {schema}").as_str())
        .await?;
    let (total, publish_tx, claim_tx, apply_tx) = tx_sizes(counts);
    let payload = vec![0u8; 64];
    let ids: Vec<i64> = (1..=total as i64).collect();
    let mut rates = Vec::new();
    for batched in [false, true] {
        c.execute(
            "DROP TABLE IF EXISTS msgs, state; \
             CREATE TABLE msgs (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, topic TEXT, k TEXT, mid TEXT, payload BYTEA, at BIGINT); \
             CREATE UNIQUE INDEX msgs_key ON msgs (topic, k, mid); \
             CREATE TABLE state (id BIGINT PRIMARY KEY, attempt INT, until BIGINT, done BOOLEAN)",
        )
        .await?;
        let m = Meter::start();
        for chunk in ids.chunks(publish_tx) {
            let mut tx = c.begin().await?;
            if batched {
                let keys: Vec<String> = chunk.iter().map(|i| format!("p{}", i % 100)).collect();
                let mids: Vec<String> = chunk.iter().map(|i| format!("m{i}")).collect();
                let payloads: Vec<&[u8]> = chunk.iter().map(|_| payload.as_slice()).collect();
                sqlx::query("INSERT INTO msgs (topic, k, mid, payload, at) SELECT $1, u.k, u.m, u.p, u.a FROM unnest($2::text[], $3::text[], $4::bytea[], $5::int8[]) AS u(k, m, p, a)")
                    .bind(TOPIC).bind(&keys).bind(&mids).bind(&payloads).bind(chunk)
                    .execute(&mut *tx).await?;
            } else {
                for i in chunk {
                    sqlx::query(
                        "INSERT INTO msgs (topic, k, mid, payload, at) VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(TOPIC)
                    .bind(format!("p{}", i % 100))
                    .bind(format!("m{i}"))
                    .bind(&payload)
                    .bind(*i)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            tx.commit().await?;
        }
        for chunk in ids.chunks(claim_tx) {
            let mut tx = c.begin().await?;
            if batched {
                sqlx::query("INSERT INTO state (id, attempt, until, done) SELECT u, 1, u, FALSE FROM unnest($1::int8[]) AS u")
                    .bind(chunk).execute(&mut *tx).await?;
            } else {
                for i in chunk {
                    sqlx::query(
                        "INSERT INTO state (id, attempt, until, done) VALUES ($1, 1, $1, FALSE)",
                    )
                    .bind(*i)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            tx.commit().await?;
        }
        for chunk in ids.chunks(apply_tx) {
            let mut tx = c.begin().await?;
            if batched {
                sqlx::query("UPDATE state SET done = TRUE WHERE id = ANY($1)")
                    .bind(chunk)
                    .execute(&mut *tx)
                    .await?;
            } else {
                for i in chunk {
                    sqlx::query("UPDATE state SET done = TRUE WHERE id = $1")
                        .bind(*i)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            tx.commit().await?;
        }
        let (wall, _) = m.stop();
        rates.push(total as f64 / wall);
    }
    c.close().await?;
    Ok((rates[0], rates[1]))
}

/// The three row writes per message of [`baseline`] on MySQL / MariaDB, one
/// statement per row, in the queue's transaction sizes.
async fn baseline_mysql(
    opts: sqlx::mysql::MySqlConnectOptions,
    db: &str,
    counts: &Counts,
) -> anyhow::Result<f64> {
    let mut admin = opts.connect().await?;
    admin
        .execute(format!("DROP DATABASE IF EXISTS {db}").as_str())
        .await?;
    admin
        .execute(format!("CREATE DATABASE {db}").as_str())
        .await?;
    admin.close().await?;
    let mut c = opts.database(db).connect().await?;
    c.execute("CREATE TABLE msgs (id BIGINT AUTO_INCREMENT PRIMARY KEY, topic VARBINARY(200), k VARBINARY(255), mid VARBINARY(255), payload LONGBLOB, at BIGINT, UNIQUE KEY msgs_key (topic, k, mid)) ENGINE = InnoDB")
        .await?;
    c.execute("CREATE TABLE state (id BIGINT PRIMARY KEY, attempt INT, until BIGINT, done TINYINT) ENGINE = InnoDB")
        .await?;
    let (total, publish_tx, claim_tx, apply_tx) = tx_sizes(counts);
    let payload = vec![0u8; 64];
    let ids: Vec<i64> = (1..=total as i64).collect();
    let m = Meter::start();
    for chunk in ids.chunks(publish_tx) {
        let mut tx = c.begin().await?;
        for i in chunk {
            sqlx::query("INSERT INTO msgs (topic, k, mid, payload, at) VALUES (?, ?, ?, ?, ?)")
                .bind(TOPIC)
                .bind(format!("p{}", i % 100))
                .bind(format!("m{i}"))
                .bind(&payload)
                .bind(*i)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
    }
    for chunk in ids.chunks(claim_tx) {
        let mut tx = c.begin().await?;
        for i in chunk {
            sqlx::query("INSERT INTO state (id, attempt, until, done) VALUES (?, 1, ?, 0)")
                .bind(*i)
                .bind(*i)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
    }
    for chunk in ids.chunks(apply_tx) {
        let mut tx = c.begin().await?;
        for i in chunk {
            sqlx::query("UPDATE state SET done = 1 WHERE id = ?")
                .bind(*i)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
    }
    let (wall, _) = m.stop();
    c.close().await?;
    Ok(total as f64 / wall)
}

/// The same three row writes per message as [`baseline`], on a dedicated
/// rusqlite connection with cached prepared statements: the closest thing to
/// the storage engine's own limit for this write pattern.
fn baseline_raw(dir: &Path, counts: &Counts) -> anyhow::Result<f64> {
    let mut c = rusqlite::Connection::open(dir.join("baseline-raw.db"))?;
    c.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA cache_size = -65536;
         CREATE TABLE msgs (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT, k TEXT, mid TEXT, payload BLOB, at INTEGER);
         CREATE UNIQUE INDEX msgs_key ON msgs (topic, k, mid);
         CREATE TABLE state (id INTEGER PRIMARY KEY, attempt INTEGER, until INTEGER, done INTEGER);",
    )?;
    let total = counts.get(&counts.published) as usize;
    let publish_tx = (total / counts.get(&counts.publish_txs).max(1) as usize).max(1);
    let claim_tx = (total / counts.get(&counts.claim_txs).max(1) as usize).max(1);
    let apply_tx = (total / counts.get(&counts.apply_txs).max(1) as usize).max(1);
    let payload = vec![0u8; 64];
    let ids: Vec<usize> = (1..=total).collect();
    let m = Meter::start();
    for chunk in ids.chunks(publish_tx) {
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO msgs (topic, k, mid, payload, at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for i in chunk {
                st.execute(rusqlite::params![
                    TOPIC,
                    format!("p{}", i % 100),
                    format!("m{i}"),
                    payload,
                    *i as i64
                ])?;
            }
        }
        tx.commit()?;
    }
    for chunk in ids.chunks(claim_tx) {
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO state (id, attempt, until, done) VALUES (?1, 1, ?1, 0)",
            )?;
            for i in chunk {
                st.execute([*i as i64])?;
            }
        }
        tx.commit()?;
    }
    for chunk in ids.chunks(apply_tx) {
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut st = tx.prepare_cached("UPDATE state SET done = 1 WHERE id = ?1")?;
            for i in chunk {
                st.execute([*i as i64])?;
            }
        }
        tx.commit()?;
    }
    let (wall, _) = m.stop();
    Ok(total as f64 / wall)
}

/// Offers `rate` single-message publishes per second over 100 partitions
/// and records publish-to-delivery latency in µs.
async fn publish_latency(
    q: &Queue,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<(Histogram<u64>, f64)> {
    let mut sub = q.subscriber().subscribe(TOPIC, sub_config(16)).await?;
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let consumer = {
        let hist = hist.clone();
        tokio::spawn(async move {
            while let Some(d) = sub.recv().await {
                let sent = u64::from_le_bytes(d.payload()[..8].try_into().unwrap_or([0; 8]));
                let lat_us = epoch_nanos().saturating_sub(sent) / 1000;
                hist.lock().await.record(lat_us.max(1)).ok();
                tokio::spawn(async move {
                    let _ = d.ack().await;
                });
            }
        })
    };
    let total = rate * seconds;
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = Instant::now();
    let publisher = q.publisher();
    let mut inflight = tokio::task::JoinSet::new();
    for i in 0..total {
        tick.tick().await;
        let publisher = publisher.clone();
        inflight.spawn(async move {
            let payload = epoch_nanos().to_le_bytes().to_vec();
            publisher
                .publish(
                    TOPIC,
                    Message::new(format!("m{i}"), format!("p{}", i % 100), payload),
                )
                .await
        });
        while let Some(r) = inflight.try_join_next() {
            r??;
        }
    }
    while let Some(r) = inflight.join_next().await {
        r??;
    }
    let achieved = total as f64 / start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(30);
    while hist.lock().await.len() < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    consumer.abort();
    let h = hist.lock().await.clone();
    Ok((h, achieved))
}

/// 100 partitions each hold one message postponed for an hour; wakes are
/// offered at `rate` per second round-robin and the time from `wake` to the
/// redelivery is recorded in µs. The consumer postpones each redelivery again.
async fn wake_latency(q: &Queue, rate: u64, seconds: u64) -> anyhow::Result<(Histogram<u64>, f64)> {
    const PARTS: usize = 100;
    let mut sub = q.subscriber().subscribe(TOPIC, sub_config(16)).await?;
    let woken_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let postponed = Arc::new(AtomicUsize::new(0));
    let batch = (0..PARTS)
        .map(|p| Message::new("m", format!("p{p}"), vec![]))
        .collect();
    q.publisher().publish_batch(TOPIC, batch).await?;
    let consumer = {
        let (hist, woken_at, postponed) = (hist.clone(), woken_at.clone(), postponed.clone());
        tokio::spawn(async move {
            while let Some(d) = sub.recv().await {
                if let Some(t) = woken_at.lock().await.remove(d.partition_key()) {
                    hist.lock()
                        .await
                        .record((t.elapsed().as_micros() as u64).max(1))
                        .ok();
                }
                let postponed = postponed.clone();
                tokio::spawn(async move {
                    if d.postpone(Duration::from_secs(3600)).await.is_ok() {
                        postponed.fetch_add(1, Ordering::AcqRel);
                    }
                });
            }
        })
    };
    while postponed.load(Ordering::Acquire) < PARTS {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let admin = q.admin();
    let total = rate * seconds;
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = Instant::now();
    let mut inflight = tokio::task::JoinSet::new();
    for i in 0..total {
        tick.tick().await;
        let (admin, woken_at) = (admin.clone(), woken_at.clone());
        inflight.spawn(async move {
            let p = format!("p{}", i as usize % PARTS);
            let t = Instant::now();
            woken_at.lock().await.insert(p.clone(), t);
            if admin.wake(TOPIC, &p).await? == 0 {
                // Still in flight from the previous wake: nothing to measure.
                woken_at.lock().await.remove(&p);
            }
            anyhow::Ok(())
        });
        while let Some(r) = inflight.try_join_next() {
            r??;
        }
    }
    while let Some(r) = inflight.join_next().await {
        r??;
    }
    let achieved = total as f64 / start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(200)).await;
    consumer.abort();
    let h = hist.lock().await.clone();
    Ok((h, achieved))
}
