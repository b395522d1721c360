//! `stitch-bench promise-failure`: a test suite failing everywhere at once.
//!
//! The parent process runs what a job runs beside: a real upstream HTTP
//! server on loopback standing in for `stitch serve` (it counts requests
//! and answers 204 after `--upstream-delay`), and one [`JobApi`] declaring
//! to it. A child process (this binary, `promise-failure-load`) opens
//! `--calls` connections to the job API's Unix socket, waits until every
//! one is connected, then sends every request at once and times each
//! from its first byte written to its last byte read. The callers live in
//! a child because 10,000 connections on both ends would not fit one
//! process's descriptor limit. The job API's own CPU and peak RSS are the
//! parent's.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::http::StatusCode;
use axum::routing::post;
use clap::Args;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use stitch_job::{JobApi, PromiseFailureCoordinator, ServerClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::sys;

/// Options of `promise-failure`.
#[derive(Args, Debug)]
pub struct PromiseArgs {
    /// Concurrent callers.
    #[arg(long, default_value_t = 10_000)]
    calls: usize,
    /// How long the upstream takes to answer the declaration.
    #[arg(long, default_value = "5ms", value_parser = humantime_duration)]
    upstream_delay: Duration,
    /// Serve the socket with a minimal responder instead of the job API:
    /// it reads each request and writes a fixed `debounced` answer, with no
    /// HTTP library, routing, authentication or coordinator. Its latency is
    /// the floor this machine, its kernel and the load generator impose on
    /// any server answering the same burst.
    #[arg(long)]
    floor: bool,
}

/// Options of the load child.
#[derive(Args, Debug)]
pub struct LoadArgs {
    #[arg(long)]
    socket: PathBuf,
    #[arg(long)]
    token: String,
    #[arg(long)]
    calls: usize,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "us" => Ok(Duration::from_micros(n)),
        _ => Err(format!("bad duration {s:?}: use ms, s or us")),
    }
}

/// What the load child reports (one JSON line on stdout).
#[derive(Debug, Serialize, Deserialize)]
struct LoadReport {
    declared: Vec<u64>,
    debounced: Vec<u64>,
    rejected: usize,
    errors: Vec<String>,
    connect_wall_ms: f64,
    burst_wall_ms: f64,
}

pub async fn run(args: PromiseArgs) -> anyhow::Result<()> {
    let upstream_calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&upstream_calls);
    let delay = args.upstream_delay;
    let app = axum::Router::new().route(
        "/v1/builds/{id}/promise-failure",
        post(move || {
            let counted = Arc::clone(&counted);
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                StatusCode::NO_CONTENT
            }
        }),
    );
    // The stand-in for `stitch serve` gets a thread of its own: the real
    // server is another process, not a task queued behind the burst.
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let upstream = format!("http://{}", std_listener.local_addr()?);
    let upstream_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("bench-upstream".into())
        .spawn(move || {
            upstream_rt.block_on(async move {
                match tokio::net::TcpListener::from_std(std_listener) {
                    Ok(listener) => {
                        let _ = axum::serve(listener, app).await;
                    }
                    Err(e) => eprintln!("upstream listener: {e}"),
                }
            })
        })?;

    let declarer = ServerClient::new(&upstream, "b_01bench0000000000000000000", "stj_bench")?;
    let target = if args.floor {
        Target::Floor(FloorServer::start()?)
    } else {
        Target::JobApi(JobApi::start(PromiseFailureCoordinator::new(Arc::new(
            declarer,
        )))?)
    };
    let exe = std::env::current_exe()?;
    println!(
        "promise-failure: {} concurrent calls through {} (Unix socket), upstream answers 204 after {:?}",
        args.calls,
        match target {
            Target::Floor(_) => "the minimal responder (--floor)",
            Target::JobApi(_) => "one job API",
        },
        args.upstream_delay
    );
    let meter = sys::Meter::start();
    let children_before = sys::children_cpu_time();
    let out = tokio::process::Command::new(exe)
        .arg("promise-failure-load")
        .arg("--socket")
        .arg(target.socket())
        .arg("--token")
        .arg(target.token())
        .arg("--calls")
        .arg(args.calls.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .await?;
    let (wall, cores) = meter.stop();
    let load_cpu = (sys::children_cpu_time() - children_before).as_secs_f64();
    anyhow::ensure!(out.status.success(), "load child failed: {}", out.status);
    let report: LoadReport = serde_json::from_slice(&out.stdout).context("load report")?;
    if let Target::JobApi(api) = target {
        api.shutdown().await;
    }

    let hist = |v: &[u64]| -> anyhow::Result<Histogram<u64>> {
        let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
        for &us in v {
            h.record(us.max(1))?;
        }
        Ok(h)
    };
    let ms = |us: u64| us as f64 / 1000.0;
    let all: Vec<u64> = report
        .declared
        .iter()
        .chain(&report.debounced)
        .copied()
        .collect();
    let (d, b, a) = (
        hist(&report.declared)?,
        hist(&report.debounced)?,
        hist(&all)?,
    );
    println!(
        "  declarations reaching the server: {}",
        upstream_calls.load(Ordering::SeqCst)
    );
    println!(
        "  answers: {} declared, {} debounced, {} not accepted, {} errors{}",
        report.declared.len(),
        report.debounced.len(),
        report.rejected,
        report.errors.len(),
        report
            .errors
            .first()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    println!(
        "  latency declared:  p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        ms(d.value_at_quantile(0.5)),
        ms(d.value_at_quantile(0.99)),
        ms(d.max())
    );
    println!(
        "  latency debounced: p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        ms(b.value_at_quantile(0.5)),
        ms(b.value_at_quantile(0.99)),
        ms(b.max())
    );
    println!(
        "  latency all:       p50 {:.1} ms  p99 {:.1} ms",
        ms(a.value_at_quantile(0.5)),
        ms(a.value_at_quantile(0.99))
    );
    println!(
        "  burst wall {:.1} ms (connect phase {:.1} ms); job API process CPU {:.2} cores over {:.2} s ({:.0} µs per call), peak RSS {:.1} MiB; load generator CPU {:.2} s",
        report.burst_wall_ms,
        report.connect_wall_ms,
        cores,
        wall,
        cores * wall * 1e6 / args.calls.max(1) as f64,
        sys::peak_rss_mib(),
        load_cpu
    );
    Ok(())
}

/// What the load child talks to.
enum Target {
    JobApi(JobApi),
    Floor(FloorServer),
}

impl Target {
    fn socket(&self) -> &std::path::Path {
        match self {
            Target::JobApi(api) => api.socket(),
            Target::Floor(f) => &f.socket,
        }
    }

    fn token(&self) -> &str {
        match self {
            Target::JobApi(api) => api.token(),
            Target::Floor(_) => "floor",
        }
    }
}

/// The `--floor` responder: per connection, read until the end of the
/// request body, write one fixed answer, close. Nothing a real server
/// could skip is skipped except HTTP parsing and the work behind it.
struct FloorServer {
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl FloorServer {
    fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("stitch-floor-").tempdir()?;
        let socket = dir.path().join("floor.sock");
        let listener = tokio::net::UnixListener::bind(&socket)?;
        let body = r#"{"outcome":"debounced","accepted":true,"upstream_status":204}"#;
        let answer: Arc<[u8]> = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
        .into();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let answer = Arc::clone(&answer);
                tokio::spawn(async move {
                    let mut buf = Vec::with_capacity(1024);
                    let mut chunk = [0u8; 1024];
                    loop {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        if request_complete(&buf) {
                            break;
                        }
                    }
                    let _ = stream.write_all(&answer).await;
                });
            }
        });
        Ok(Self { socket, _dir: dir })
    }
}

/// Whether `buf` holds a whole request: headers and `content-length` bytes.
fn request_complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    buf.len() >= end + 4 + length
}

/// The child: connect every caller, then fire every request at once.
pub async fn load(args: LoadArgs) -> anyhow::Result<()> {
    let request = {
        let body = r#"{"exit_status":1,"reason":"benchmark"}"#;
        Arc::new(format!(
            "POST /api/current-job/v0/promise-failure HTTP/1.1\r\nHost: job\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            args.token,
            body.len()
        ))
    };
    let connect_start = Instant::now();
    let mut streams = Vec::with_capacity(args.calls);
    let mut errors = Vec::new();
    // The listen backlog is finite: a full one answers EAGAIN, so connect
    // again until every caller holds a connection.
    for _ in 0..args.calls {
        let mut tries = 0;
        loop {
            match tokio::net::UnixStream::connect(&args.socket).await {
                Ok(s) => {
                    streams.push(s);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && tries < 10_000 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
                Err(e) => {
                    errors.push(format!("connect: {e}"));
                    break;
                }
            }
        }
    }
    let connect_wall_ms = connect_start.elapsed().as_secs_f64() * 1000.0;
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::with_capacity(streams.len());
    for mut stream in streams {
        let request = Arc::clone(&request);
        let mut go = go_rx.clone();
        tasks.push(tokio::spawn(async move {
            let _ = go.wait_for(|g| *g).await;
            let start = Instant::now();
            stream.write_all(request.as_bytes()).await?;
            let mut buf = Vec::with_capacity(512);
            stream.read_to_end(&mut buf).await?;
            let took = start.elapsed();
            anyhow::Ok((took, buf))
        }));
    }
    let burst = Instant::now();
    go_tx.send_replace(true);
    let mut report = LoadReport {
        declared: Vec::new(),
        debounced: Vec::new(),
        rejected: 0,
        errors,
        connect_wall_ms,
        burst_wall_ms: 0.0,
    };
    for t in tasks {
        match t.await {
            Ok(Ok((took, buf))) => {
                let text = String::from_utf8_lossy(&buf);
                let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
                let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
                match serde_json::from_str::<stitch_job::PromiseFailureResult>(body) {
                    Ok(r) => {
                        if !r.accepted {
                            report.rejected += 1;
                        }
                        match r.outcome {
                            stitch_job::Outcome::Declared => report.declared.push(us),
                            stitch_job::Outcome::Debounced => report.debounced.push(us),
                        }
                    }
                    Err(e) => report.errors.push(format!(
                        "answer: {e}: {}",
                        text.lines().next().unwrap_or_default()
                    )),
                }
            }
            Ok(Err(e)) => report.errors.push(format!("request: {e}")),
            Err(e) => report.errors.push(format!("task: {e}")),
        }
    }
    report.burst_wall_ms = burst.elapsed().as_secs_f64() * 1000.0;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
