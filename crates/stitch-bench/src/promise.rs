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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let upstream = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let declarer = ServerClient::new(&upstream, "b_01bench0000000000000000000", "stj_bench")?;
    let api = JobApi::start(PromiseFailureCoordinator::new(Arc::new(declarer)))?;
    let exe = std::env::current_exe()?;
    println!(
        "promise-failure: {} concurrent calls through one job API (Unix socket), upstream answers 204 after {:?}",
        args.calls, args.upstream_delay
    );
    let meter = sys::Meter::start();
    let children_before = sys::children_cpu_time();
    let out = tokio::process::Command::new(exe)
        .arg("promise-failure-load")
        .arg("--socket")
        .arg(api.socket())
        .arg("--token")
        .arg(api.token())
        .arg("--calls")
        .arg(args.calls.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .await?;
    let (wall, cores) = meter.stop();
    let load_cpu = (sys::children_cpu_time() - children_before).as_secs_f64();
    anyhow::ensure!(out.status.success(), "load child failed: {}", out.status);
    let report: LoadReport = serde_json::from_slice(&out.stdout).context("load report")?;
    api.shutdown().await;

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
