//! `stitch-bench soak`: does retention keep a long-running stitch bounded?
//!
//! Two child processes run side by side for `--seconds`, each a whole
//! `stitch serve` (SQLite in its own temporary data dir, stages, HTTP on
//! loopback) with builds created at `--rate`/s over HTTP, alternating a
//! `noop` and a `fake` queue: one with short retention (`builds` and
//! `events` `--window`, `interval` `--interval`), one with retention off.
//! Each prints a row every `--sample`: database file size (with its WAL),
//! data dir size, RSS, and the p99 of the creates in that period; the
//! parent prints both tables and the figures the issue asks for (growth after
//! the first window, create p99 ratio). Children, so RSS is per server.
//! `--control` adds a third server with retention off, so the run also
//! shows how much two identical servers differ (the ratio's noise floor).

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use stitch_server::config::{
    Config, FakeSection, QueueConfig, RetentionConfig, RetentionSetting, RunnerSection,
};
use stitch_server::state::AppState;
use stitch_server::{http, retention, stages};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

/// Options of the soak benchmark.
#[derive(clap::Args, Clone)]
pub struct SoakArgs {
    /// How long each server runs, in seconds.
    #[arg(long, default_value_t = 240)]
    seconds: u64,
    /// Builds created per second (alternating noop and fake).
    #[arg(long, default_value_t = 20)]
    rate: u32,
    /// Retention window of builds and events on the pruning server, seconds.
    #[arg(long, default_value_t = 60)]
    window: u64,
    /// Pruning interval on the pruning server, seconds.
    #[arg(long, default_value_t = 5)]
    interval: u64,
    /// Seconds between printed rows.
    #[arg(long, default_value_t = 60)]
    sample: u64,
    /// Keep each server's data dir under this directory (`on/`, `off/`)
    /// for inspection after the run, instead of a deleted temporary one.
    #[arg(long)]
    keep: Option<std::path::PathBuf>,
    /// Also run a second server with retention off (`control`): how far
    /// two identical servers' create p99 differ on this machine in the same
    /// run, the resolution the on/off ratio can be read at.
    #[arg(long)]
    control: bool,
    /// Internal: run one server (`on`, `off` or `control`) and print JSON
    /// rows.
    #[arg(long, hide = true)]
    child: Option<String>,
}

/// One printed row of a child.
#[derive(Debug, Serialize, Deserialize)]
struct Row {
    second: u64,
    created: u64,
    /// The database file alone.
    db_bytes: u64,
    /// Its write-ahead log (reused, not shrunk, after checkpoints).
    wal_bytes: u64,
    data_dir_bytes: u64,
    rss_mib: f64,
    create_p99_ms: f64,
    /// p99 of every create since the first retention window ended (0 before):
    /// the steady state as one figure, steadier than a minute's p99.
    #[serde(default)]
    steady_p99_ms: f64,
    /// Rows of the hot tables, and the file's page and free-page counts:
    /// what a slower create could be paying for.
    #[serde(default)]
    shape: std::collections::BTreeMap<String, i64>,
}

/// Tables whose size a create or a claim can depend on.
const SHAPE_TABLES: [&str; 6] = [
    "builds",
    "events",
    "mq_messages",
    "mq_state",
    "mq_partitions",
    "mq_subscribers",
];

/// Row counts of [`SHAPE_TABLES`] and the page counts, read beside the load.
async fn shape_of(state: &AppState) -> std::collections::BTreeMap<String, i64> {
    let mut shape = std::collections::BTreeMap::new();
    let Ok(pool) = state.store().sqlite_pool() else {
        return shape;
    };
    let queries = SHAPE_TABLES
        .iter()
        .map(|t| (t.to_string(), format!("SELECT COUNT(*) FROM {t}")))
        .chain([
            ("pages".to_string(), "PRAGMA page_count".to_string()),
            (
                "free_pages".to_string(),
                "PRAGMA freelist_count".to_string(),
            ),
        ]);
    for (name, sql) in queries {
        if let Ok(n) = sqlx::query_scalar::<_, i64>(&sql).fetch_one(pool).await {
            shape.insert(name, n);
        }
    }
    shape
}

pub async fn run(args: SoakArgs) -> anyhow::Result<()> {
    if let Some(mode) = &args.child {
        return child(&args, mode).await;
    }
    let exe = std::env::current_exe()?;
    let spawn = |mode: &str| {
        tokio::process::Command::new(&exe)
            .args([
                "soak",
                "--child",
                mode,
                "--seconds",
                &args.seconds.to_string(),
                "--rate",
                &args.rate.to_string(),
                "--window",
                &args.window.to_string(),
                "--interval",
                &args.interval.to_string(),
                "--sample",
                &args.sample.to_string(),
            ])
            .args(
                args.keep
                    .iter()
                    .flat_map(|k| [std::ffi::OsStr::new("--keep"), k.as_os_str()]),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
    };
    let (on, off) = (spawn("on")?, spawn("off")?);
    let control = args.control.then(|| spawn("control")).transpose()?;
    let control = async {
        match control {
            Some(c) => rows_of(c).await,
            None => Ok(Vec::new()),
        }
    };
    let (on, off, control) = tokio::join!(rows_of(on), rows_of(off), control);
    let (on, off, control) = (on?, off?, control?);
    println!(
        "soak: {} s, {} builds/s (noop + fake), SQLite; pruning on = builds/events {} s, interval {} s",
        args.seconds, args.rate, args.window, args.interval
    );
    let mut tables = vec![("pruning on", &on), ("pruning off", &off)];
    if args.control {
        tables.push(("pruning off (control)", &control));
    }
    for (name, rows) in tables {
        println!("\n{name}");
        println!("  second  created   db MiB  WAL MiB  data dir MiB  RSS MiB  create p99 ms  since window ms");
        for r in rows {
            println!(
                "  {:>6}  {:>7}  {:>7.2}  {:>7.2}  {:>12.2}  {:>7.1}  {:>13.2}  {:>15.2}",
                r.second,
                r.created,
                r.db_bytes as f64 / 1048576.0,
                r.wal_bytes as f64 / 1048576.0,
                r.data_dir_bytes as f64 / 1048576.0,
                r.rss_mib,
                r.create_p99_ms,
                r.steady_p99_ms
            );
        }
        println!("  table rows and pages at each row:");
        for r in rows {
            let shape: Vec<String> = r.shape.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("  {:>6}  {}", r.second, shape.join(", "));
        }
    }
    // Growth after the first retention window (rows after it, first to last).
    let growth = |rows: &[Row], f: &dyn Fn(&Row) -> f64| -> Option<f64> {
        let after: Vec<&Row> = rows.iter().filter(|r| r.second > args.window).collect();
        let (first, last) = (after.first()?, after.last()?);
        Some((f(last) / f(first) - 1.0) * 100.0)
    };
    if let Some(g) = growth(&on, &|r| r.db_bytes as f64) {
        println!("\npruning on, after the first window: database file {g:+.1} %");
    }
    if let Some(last) = off.last().filter(|r| r.created > 0) {
        println!(
            "pruning off: {:.0} bytes of database file per build",
            last.db_bytes as f64 / last.created as f64
        );
    }
    if let Some(g) = growth(&on, &|r| r.rss_mib) {
        println!("pruning on, after the first window: RSS {g:+.1} %");
    }
    let worst = |rows: &[Row]| rows.iter().map(|r| r.create_p99_ms).fold(0.0, f64::max);
    if worst(&off) > 0.0 {
        println!(
            "create p99 (worst period): on {:.2} ms / off {:.2} ms = {:.2}x",
            worst(&on),
            worst(&off),
            worst(&on) / worst(&off)
        );
    }
    let steady = |rows: &[Row]| rows.last().map_or(0.0, |r| r.steady_p99_ms);
    if steady(&off) > 0.0 {
        println!(
            "create p99 (every create after the first window): on {:.2} ms / off {:.2} ms = {:.2}x",
            steady(&on),
            steady(&off),
            steady(&on) / steady(&off)
        );
        if args.control {
            println!(
                "  the same, two servers without pruning: control {:.2} ms / off {:.2} ms = {:.2}x \
                 (worst period {:.2}x)",
                steady(&control),
                steady(&off),
                steady(&control) / steady(&off),
                worst(&control) / worst(&off).max(f64::MIN_POSITIVE)
            );
        }
    }
    Ok(())
}

async fn rows_of(mut child: tokio::process::Child) -> anyhow::Result<Vec<Row>> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("child without stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let mut rows = Vec::new();
    while let Some(line) = lines.next_line().await? {
        if let Ok(row) = serde_json::from_str::<Row>(&line) {
            rows.push(row);
        }
    }
    let status = child.wait().await?;
    anyhow::ensure!(status.success(), "soak child failed: {status}");
    Ok(rows)
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

async fn child(args: &SoakArgs, mode: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        ["on", "off", "control"].contains(&mode),
        "unknown soak child {mode:?}"
    );
    let pruning = mode == "on";
    let dir = tempfile::tempdir()?;
    let data_dir = match &args.keep {
        Some(keep) => keep.join(mode),
        None => dir.path().join("data"),
    };
    let mut queues = std::collections::BTreeMap::new();
    queues.insert(
        "noop".to_string(),
        QueueConfig {
            runner: RunnerSection::Noop,
            ..QueueConfig::default()
        },
    );
    queues.insert(
        "fake".to_string(),
        QueueConfig {
            runner: RunnerSection::Fake(FakeSection {
                accept_delay: Duration::from_millis(200),
                run_duration: Duration::from_secs(2),
                slow_factor: 2,
            }),
            ..QueueConfig::default()
        },
    );
    let retention = if pruning {
        let window = RetentionSetting::After(Duration::from_secs(args.window));
        RetentionConfig {
            builds: window,
            events: window,
            dead_letters: window,
            interval: RetentionSetting::After(Duration::from_secs(args.interval)),
        }
    } else {
        RetentionConfig {
            builds: RetentionSetting::Off,
            events: RetentionSetting::Off,
            dead_letters: RetentionSetting::Off,
            interval: RetentionSetting::Off,
        }
    };
    let config = Config {
        data_dir: data_dir.clone(),
        queues,
        retention,
        ..Config::default()
    };
    std::fs::create_dir_all(&data_dir)?;
    let state = AppState::open(config).await?;
    let stop = CancellationToken::new();
    let mut tasks = stages::start(&state, stop.clone());
    tasks.extend(retention::start(&state, stop.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let router = http::router(state.clone(), Vec::new());
    tokio::spawn(http::serve(
        listener,
        router,
        stop.clone().cancelled_owned(),
    ));

    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()?;
    let latencies = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let steady = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let created = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let steady_from = start + Duration::from_secs(args.window);
    let end = start + Duration::from_secs(args.seconds);
    let mut next_sample = start + Duration::from_secs(args.sample);
    let mut ticks =
        tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1))));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut i = 0u64;
    while Instant::now() < end {
        ticks.tick().await;
        let queue = if i % 2 == 0 { "noop" } else { "fake" };
        let url = format!("http://{addr}/v1/queues/{queue}/builds");
        let body = format!(r#"{{"head":["https://example.com/change/{i}"]}}"#);
        i += 1;
        let (client, lat, done) = (client.clone(), latencies.clone(), created.clone());
        let steady_all = steady.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let ok = client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                let us = t.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
                if let Ok(mut h) = lat.lock() {
                    let _ = h.record(us.max(1));
                }
                if t >= steady_from {
                    if let Ok(mut h) = steady_all.lock() {
                        let _ = h.record(us.max(1));
                    }
                }
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        if Instant::now() >= next_sample {
            next_sample += Duration::from_secs(args.sample);
            let p99 = match latencies.lock() {
                Ok(mut h) => {
                    let p = h.value_at_quantile(0.99) as f64 / 1000.0;
                    h.reset();
                    p
                }
                Err(_) => 0.0,
            };
            let db = data_dir.join("stitch.db");
            let wal = data_dir.join("stitch.db-wal");
            let file = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            let row = Row {
                second: start.elapsed().as_secs(),
                created: created.load(std::sync::atomic::Ordering::Relaxed),
                db_bytes: file(&db),
                wal_bytes: file(&wal),
                data_dir_bytes: crate::sys::dir_bytes(&data_dir),
                rss_mib: rss_mib(),
                create_p99_ms: p99,
                steady_p99_ms: steady
                    .lock()
                    .map_or(0.0, |h| h.value_at_quantile(0.99) as f64 / 1000.0),
                shape: shape_of(&state).await,
            };
            println!("{}", serde_json::to_string(&row)?);
        }
    }
    stop.cancel();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    state.store().close().await;
    Ok(())
}
