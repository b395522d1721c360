//! `stitch-bench mq`: the message queue on SQLite.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use stitch_mq::sqlite::{open_pool, SqliteDriver};
use stitch_mq::{Message, Queue, QueueConfig, SubscriptionConfig};
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
}

impl MqArgs {
    fn wants(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == section)
    }
}

async fn open(dir: &Path, name: &str) -> anyhow::Result<(Queue, Arc<Counts>)> {
    let driver = SqliteDriver::open(&dir.join(format!("{name}.db"))).await?;
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
        "stitch-bench mq: SQLite backend, {} cores, messages={}, latency runs {} s at {}/s",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        args.messages,
        args.seconds,
        args.rate
    );

    // 1. Publish throughput.
    if args.wants("publish") {
        let (q, _) = open(&dir, "publish-single").await?;
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
            &mut rows,
            "publish, one message per call (msg/s)",
            format!("{:.0}  (cpu {cpu:.2} cores)", n_single as f64 / wall),
        );

        let (q, _) = open(&dir, "publish-batch").await?;
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
            &mut rows,
            "publish, batches of 100 (msg/s)",
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
        let (q, counts) = open(&dir, &format!("e2e-{partitions}")).await?;
        let (rate, cpu) = end_to_end(&q, args.messages, partitions).await?;
        row(
            &mut rows,
            format!("end-to-end publish->deliver->ack, {partitions} partitions (msg/s)"),
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

    // 3. Plain SQLite doing the same row writes in the same transaction sizes.
    if let Some((rate, counts)) = e2e_100.filter(|_| args.wants("baseline")) {
        let base = baseline(&dir, &counts).await?;
        row(
            &mut rows,
            "plain SQLite via sqlx, one statement per row write (msg/s)",
            format!("{base:.0}"),
        );
        let raw = baseline_raw(&dir, &counts)?;
        row(
            &mut rows,
            "plain SQLite via rusqlite, prepared, one thread (msg/s)",
            format!("{raw:.0}"),
        );
        row(
            &mut rows,
            "queue end-to-end / plain sqlx (100 partitions)",
            format!("{:.2}", rate / base),
        );
        row(
            &mut rows,
            "queue end-to-end / plain rusqlite (100 partitions)",
            format!("{:.2}", rate / raw),
        );
    }

    // 4. Publish-to-delivery latency at a steady offered load.
    if args.wants("latency") {
        let (q, _) = open(&dir, "latency").await?;
        let (h, achieved) = publish_latency(&q, args.rate, args.seconds).await?;
        row(
            &mut rows,
            format!("publish-to-delivery latency at {achieved:.0} msg/s (ms)"),
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
        let (q, _) = open(&dir, "wake").await?;
        let (h, achieved) = wake_latency(&q, args.rate, args.seconds).await?;
        row(
            &mut rows,
            format!("wake-to-redelivery latency at {achieved:.0} wakes/s (ms)"),
            format!(
                "p50 {:.2}  p99 {:.2}  max {:.2}",
                pct(&h, 0.5),
                pct(&h, 0.99),
                h.max() as f64 / 1000.0
            ),
        );
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
