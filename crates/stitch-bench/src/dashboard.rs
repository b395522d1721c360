//! `stitch-bench dashboard`: the dashboard's server side at scale (issue
//! #19).
//!
//! A real `stitch serve` child process (the release `stitch` binary beside
//! this program, or `--stitch-bin`) on SQLite. The dashboard's pages are
//! static files plus the API calls their script makes, so "a page answers"
//! is measured as the requests the script sends for it, from a loopback
//! client on one keep-alive connection (p50/p99 of `--requests` sequential
//! requests each, after a warm-up):
//!
//! - **small store** (the baseline): 100 builds on a `fake` queue (10
//!   running, 90 waiting) and a few on a `noop` queue;
//! - **large store**: after `--builds` more builds created over HTTP on the
//!   `noop` queue (all finished within the overview chart's 24 hours, its
//!   worst case).
//!
//! Then `--subscribers` emulated browsers hold a live page open: each
//! follows `/v1/events?after=latest` over SSE as the page's script does,
//! and reacts to events as the script does (the **builds** page fetches a
//! new build's record once; the **overview** refetches `/v1/queues`, at most
//! once a second). Measured: stitch's CPU while idle with none and with all
//! of them connected, and the delivery of each event to every subscriber
//! (from sending the create that caused it to the subscriber reading it),
//! with one subscriber as the baseline. CPU is `/proc/PID/stat` of the
//! server; RSS from `/proc/PID/status`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Deserialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::provider::print_latency;
use crate::serve_child::{stitch_binary, ServeChild};
use crate::sys::{dir_bytes, pid_cpu, pid_rss_mib};

/// Options of the dashboard benchmark.
#[derive(clap::Args)]
pub struct DashboardArgs {
    /// Builds created on the `noop` queue for the large store.
    #[arg(long, default_value_t = 100_000)]
    builds: usize,
    /// Concurrent HTTP clients creating them.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Requests per page measured (sequential, after 20 warm-up requests).
    #[arg(long, default_value_t = 300)]
    requests: usize,
    /// Emulated browsers holding a live page open.
    #[arg(long, default_value_t = 200)]
    subscribers: usize,
    /// Builds created one by one while the subscribers listen; each one's
    /// first event is timed at every subscriber.
    #[arg(long, default_value_t = 50)]
    events: usize,
    /// Time between those creates (milliseconds).
    #[arg(long, default_value_t = 100)]
    event_gap_ms: u64,
    /// How long stitch's idle CPU is measured, with and without
    /// subscribers (seconds).
    #[arg(long, default_value_t = 15)]
    idle_seconds: u64,
    /// The `stitch` binary (default: `stitch` beside this program, e.g.
    /// `target/release/stitch`).
    #[arg(long)]
    stitch_bin: Option<PathBuf>,
    /// Directory for the data dir, config and server log (default: a fresh
    /// temp dir, deleted at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Small sizes to check the wiring: 2,000 builds, 20 subscribers, 50
    /// requests per page, 10 events, 3 s idle.
    #[arg(long)]
    quick: bool,
}

impl DashboardArgs {
    fn apply_quick(&mut self) {
        if self.quick {
            self.builds = 2_000;
            self.subscribers = 20;
            self.requests = 50;
            self.events = 10;
            self.idle_seconds = 3;
        }
    }
}

/// Builds on the `fake` queue: its concurrency runs 10, the rest wait.
const SLOW_BUILDS: usize = 100;
const SLOW_CONCURRENCY: usize = 10;

fn config_text(data: &Path) -> String {
    format!(
        r#"data_dir = "{data}"

[queues.ci]
runner = "noop"

[queues.slow]
runner = "fake"
concurrency = {SLOW_CONCURRENCY}
poll = {{ accepted = "1s", running = "1s" }}
fake = {{ accept_delay = "10ms", run_duration = "1h" }}
"#,
        data = data.display()
    )
}

pub async fn run(mut args: DashboardArgs) -> anyhow::Result<()> {
    args.apply_quick();
    anyhow::ensure!(args.requests > 0, "--requests must be > 0");
    anyhow::ensure!(args.clients > 0, "--clients must be > 0");
    let stitch = stitch_binary(args.stitch_bin.as_deref())?;
    let tmp = tempfile::tempdir()?;
    let root = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let data = root.join("data");
    std::fs::create_dir_all(&data)?;
    let config = root.join("stitch.toml");
    std::fs::write(&config, config_text(&data))?;
    println!(
        "stitch-bench dashboard: {} builds, {} subscribers, {} requests per page, {} events; SQLite; {}",
        args.builds,
        args.subscribers,
        args.requests,
        args.events,
        stitch.display()
    );

    let mut server = ServeChild::spawn(&stitch, &config, &root, "dashboard", &[])?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()?;
    server.wait_healthy(&http).await?;
    let result = measure(&args, &server, &http, &data).await;
    if result.is_err() {
        eprintln!("server log:\n{}", server.log_tail());
    }
    server.stop().await;
    result
}

async fn measure(
    args: &DashboardArgs,
    server: &ServeChild,
    http: &reqwest::Client,
    data: &Path,
) -> anyhow::Result<()> {
    let base = server.base.as_str();
    // The small store: waiting and running builds on `slow`, a few finished.
    for i in 0..SLOW_BUILDS {
        create(http, base, "slow", &format!("slow/{i}")).await?;
    }
    let mut some_build = String::new();
    for i in 0..10 {
        some_build = create(http, base, "ci", &format!("small/{i}")).await?;
    }
    println!("\n== pages, server side (loopback, one keep-alive connection; ms)");
    let small = pages(http, base, &some_build, args.requests).await?;
    print_pages("small store (110 builds)", &small)?;

    let started = Instant::now();
    let created = fill(http, base, args.builds, args.clients).await?;
    let took = started.elapsed().as_secs_f64();
    println!(
        "\nfilled: {} builds created over HTTP in {:.1} s ({:.0} creates/s, {} clients); database {:.1} MiB",
        created,
        took,
        created as f64 / took,
        args.clients,
        dir_bytes(data) as f64 / (1024.0 * 1024.0)
    );
    let large = pages(http, base, &some_build, args.requests).await?;
    print_pages(&format!("large store ({} builds)", created + 110), &large)?;
    print_rss(server);

    println!("\n== live pages: emulated browsers following /v1/events");
    let idle0 = idle_cpu(server, args.idle_seconds).await;
    println!(
        "stitch CPU idle, no subscribers: {:.2} % of a core over {} s",
        idle0 * 100.0,
        args.idle_seconds
    );
    for page in [Page::Builds, Page::Overview] {
        live(args, server, http, page, idle0).await?;
    }
    Ok(())
}

/// Creates a build on `queue`; returns its id.
async fn create(
    http: &reqwest::Client,
    base: &str,
    queue: &str,
    head: &str,
) -> anyhow::Result<String> {
    #[derive(Deserialize)]
    struct Created {
        id: String,
    }
    let resp = http
        .post(format!("{base}/v1/queues/{queue}/builds"))
        .json(&serde_json::json!({ "head": [head] }))
        .send()
        .await?;
    let status = resp.status();
    anyhow::ensure!(
        status.is_success(),
        "create on {queue}: {status}: {}",
        resp.text().await.unwrap_or_default()
    );
    Ok(resp.json::<Created>().await?.id)
}

/// Creates `n` builds on `ci` with `clients` concurrent clients.
async fn fill(
    http: &reqwest::Client,
    base: &str,
    n: usize,
    clients: usize,
) -> anyhow::Result<usize> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, base, next) = (http.clone(), base.to_string(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                create(&http, &base, "ci", &format!("fill/{i}")).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(n)
}

/// One measured request: its label and path.
struct Measured {
    label: String,
    micros: Vec<u64>,
}

/// The requests the dashboard's pages make, each `requests` times.
async fn pages(
    http: &reqwest::Client,
    base: &str,
    build: &str,
    requests: usize,
) -> anyhow::Result<Vec<Measured>> {
    // Page 21 of the builds list: the cursor after 20 pages of 50.
    let mut cursor = String::new();
    for _ in 0..20 {
        #[derive(Deserialize)]
        struct Page {
            next_cursor: Option<String>,
        }
        let mut url = format!("{base}/v1/builds?limit=50");
        if !cursor.is_empty() {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let page: Page = http
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        match page.next_cursor {
            Some(c) => cursor = c,
            None => break,
        }
    }
    let mut paths = vec![
        ("baseline: GET /healthz".to_string(), "/healthz".to_string()),
        ("page: GET / (the dashboard's HTML)".into(), "/".into()),
        ("overview: GET /v1/queues".into(), "/v1/queues".into()),
        (
            "builds: GET /v1/builds?limit=50".into(),
            "/v1/builds?limit=50".into(),
        ),
        (
            "builds: ?queue=slow&status=accepted".into(),
            "/v1/builds?queue=slow&status=accepted&limit=50".into(),
        ),
        (
            "builds: ?queue=ci&status=failed (none match)".into(),
            "/v1/builds?queue=ci&status=failed&limit=50".into(),
        ),
        (
            "build: GET /v1/builds/{id}".into(),
            format!("/v1/builds/{build}"),
        ),
    ];
    if !cursor.is_empty() {
        paths.push((
            "builds: page 21 (cursor)".into(),
            format!("/v1/builds?limit=50&cursor={cursor}"),
        ));
    }
    // `/v1/queues` is reused until the next event: timed once as the pages
    // see it between events, and once computed afresh after a create.
    paths.push((
        "overview: GET /v1/queues after an event".into(),
        "/v1/queues".into(),
    ));
    let last = paths.len() - 1;
    let mut out = Vec::new();
    for (n, (label, path)) in paths.into_iter().enumerate() {
        let url = format!("{base}{path}");
        for _ in 0..20 {
            get_ok(http, &url).await?;
        }
        let mut micros = Vec::with_capacity(requests);
        for i in 0..requests {
            if n == last {
                // Not timed: the event that makes the next answer new.
                create(http, base, "ci", &format!("overview/{i}")).await?;
            }
            let t = Instant::now();
            get_ok(http, &url).await?;
            micros.push(t.elapsed().as_micros() as u64);
        }
        out.push(Measured { label, micros });
    }
    Ok(out)
}

/// GET `url`, reading the whole body; a non-2xx answer is an error.
async fn get_ok(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    http.get(url)
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    Ok(())
}

fn print_pages(title: &str, pages: &[Measured]) -> anyhow::Result<()> {
    println!("-- {title}");
    for m in pages {
        print_latency(&format!("  {}", m.label), &m.micros)?;
    }
    Ok(())
}

fn print_rss(server: &ServeChild) {
    if let Some((now, peak)) = pid_rss_mib(server.pid) {
        println!("stitch RSS now / peak: {now:.0} / {peak:.0} MiB");
    }
}

/// stitch's CPU over `seconds` of doing nothing, as a share of one core.
async fn idle_cpu(server: &ServeChild, seconds: u64) -> f64 {
    let before = pid_cpu(server.pid).unwrap_or_default();
    let t = Instant::now();
    // Measuring idleness is waiting a fixed time by definition.
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let used = pid_cpu(server.pid)
        .unwrap_or_default()
        .saturating_sub(before);
    used.as_secs_f64() / t.elapsed().as_secs_f64()
}

/// Which page an emulated browser holds open.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Page {
    /// `/builds`: a new build's record is fetched once when it first shows.
    Builds,
    /// `/`: `/v1/queues` is refetched after events, at most once a second.
    Overview,
}

/// What every subscriber saw: (subscriber, build) → when it first read an
/// event of that build.
#[derive(Default)]
struct Seen {
    first: Mutex<HashMap<(usize, String), Instant>>,
    changed: Notify,
    connected: AtomicUsize,
    follow_ups: AtomicU64,
    follow_up_micros: Mutex<Vec<u64>>,
}

async fn live(
    args: &DashboardArgs,
    server: &ServeChild,
    http: &reqwest::Client,
    page: Page,
    idle_without: f64,
) -> anyhow::Result<()> {
    println!("-- the {page:?} page");
    // Baseline: one subscriber.
    let one = deliveries(args, server, http, page, 1).await?;
    print_latency("  event delivery, 1 subscriber (ms)", &one.micros)?;
    let all = deliveries(args, server, http, page, args.subscribers).await?;
    print_latency(
        &format!("  event delivery, {} subscribers (ms)", args.subscribers),
        &all.micros,
    )?;
    println!(
        "  stitch CPU idle with {} subscribers connected: {:.2} % of a core over {} s (the subscribers' own cost: {:+.2} %)",
        args.subscribers,
        all.idle_cpu * 100.0,
        args.idle_seconds,
        (all.idle_cpu - idle_without) * 100.0
    );
    println!(
        "  stitch CPU while {} events reached {} subscribers: {:.1} % of a core; follow-up requests {} (p50/p99 below)",
        args.events,
        args.subscribers,
        all.busy_cpu * 100.0,
        all.follow_ups
    );
    if !all.follow_up_micros.is_empty() {
        print_latency("  the page's follow-up request (ms)", &all.follow_up_micros)?;
    }
    print_rss(server);
    Ok(())
}

struct Deliveries {
    micros: Vec<u64>,
    idle_cpu: f64,
    busy_cpu: f64,
    follow_ups: u64,
    follow_up_micros: Vec<u64>,
}

/// Connects `n` subscribers, measures idle CPU, then creates
/// `args.events` builds one by one and times each one's first event at
/// every subscriber.
async fn deliveries(
    args: &DashboardArgs,
    server: &ServeChild,
    http: &reqwest::Client,
    page: Page,
    n: usize,
) -> anyhow::Result<Deliveries> {
    let seen = Arc::new(Seen::default());
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for i in 0..n {
        tasks.push(tokio::spawn(subscriber(
            i,
            http.clone(),
            server.base.clone(),
            page,
            seen.clone(),
            stop.clone(),
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.connected.load(Ordering::SeqCst) < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "subscribers not connected in 60 s"
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), seen.changed.notified()).await;
    }
    let idle_cpu = if n > 1 {
        idle_cpu(server, args.idle_seconds).await
    } else {
        0.0
    };

    let cpu0 = pid_cpu(server.pid).unwrap_or_default();
    let t0 = Instant::now();
    let mut sent = Vec::with_capacity(args.events);
    for i in 0..args.events {
        let at = Instant::now();
        let id = create(http, &server.base, "ci", &format!("live/{page:?}/{n}/{i}")).await?;
        sent.push((id, at));
        // Spaced creates: each event is delivered on its own, as when
        // builds arrive one by one.
        tokio::time::sleep(Duration::from_millis(args.event_gap_ms)).await;
    }
    let want = n * args.events;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let have = {
            let first = seen.first.lock().unwrap_or_else(|p| p.into_inner());
            sent.iter()
                .map(|(id, _)| {
                    (0..n)
                        .filter(|s| first.contains_key(&(*s, id.clone())))
                        .count()
                })
                .sum::<usize>()
        };
        if have >= want {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {have} of {want} deliveries in 60 s"
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), seen.changed.notified()).await;
    }
    let busy = pid_cpu(server.pid).unwrap_or_default().saturating_sub(cpu0);
    let busy_cpu = busy.as_secs_f64() / t0.elapsed().as_secs_f64();
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let first = seen.first.lock().unwrap_or_else(|p| p.into_inner());
    let mut micros = Vec::with_capacity(want);
    for (id, at) in &sent {
        for s in 0..n {
            if let Some(t) = first.get(&(s, id.clone())) {
                micros.push(t.saturating_duration_since(*at).as_micros() as u64);
            }
        }
    }
    let follow_up_micros = std::mem::take(
        &mut *seen
            .follow_up_micros
            .lock()
            .unwrap_or_else(|p| p.into_inner()),
    );
    Ok(Deliveries {
        micros,
        idle_cpu,
        busy_cpu,
        follow_ups: seen.follow_ups.load(Ordering::SeqCst),
        follow_up_micros,
    })
}

#[derive(Deserialize)]
struct EventJson {
    build_id: String,
}

/// One emulated browser: follows `/v1/events?after=latest` and reacts as
/// `page`'s script does.
async fn subscriber(
    index: usize,
    http: reqwest::Client,
    base: String,
    page: Page,
    seen: Arc<Seen>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let resp = http
        .get(format!("{base}/v1/events?after=latest"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .context("subscribing")?
        .error_for_status()?;
    seen.connected.fetch_add(1, Ordering::SeqCst);
    seen.changed.notify_waiters();
    let mut resp = resp;
    let mut buf = String::new();
    // The overview's throttle: one refetch at once, then at most one a
    // second while events keep coming.
    let mut last_refresh: Option<Instant> = None;
    let mut refresh_due = false;
    loop {
        let wait = match (refresh_due, last_refresh) {
            (true, Some(at)) => {
                (at + Duration::from_secs(1)).saturating_duration_since(Instant::now())
            }
            _ => Duration::from_secs(3600),
        };
        let chunk = tokio::select! {
            c = resp.chunk() => c,
            _ = tokio::time::sleep(wait) => {
                refresh_due = false;
                last_refresh = Some(Instant::now());
                follow_up(&http, format!("{base}/v1/queues"), &seen);
                continue;
            }
            _ = stop.cancelled() => return Ok(()),
        };
        let Ok(Some(chunk)) = chunk else {
            return Ok(());
        };
        let now = Instant::now();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        let mut new_builds = Vec::new();
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            for data in frame.lines().filter_map(|l| l.strip_prefix("data:")) {
                let Ok(e) = serde_json::from_str::<EventJson>(data.trim()) else {
                    continue;
                };
                let mut first = seen.first.lock().unwrap_or_else(|p| p.into_inner());
                if let std::collections::hash_map::Entry::Vacant(v) =
                    first.entry((index, e.build_id.clone()))
                {
                    v.insert(now);
                    new_builds.push(e.build_id);
                }
            }
        }
        if !new_builds.is_empty() {
            seen.changed.notify_waiters();
        }
        match page {
            Page::Builds => {
                for id in new_builds {
                    follow_up(&http, format!("{base}/v1/builds/{id}"), &seen);
                }
            }
            Page::Overview => {
                let free = last_refresh.is_none_or(|at| at.elapsed() >= Duration::from_secs(1));
                if free {
                    last_refresh = Some(Instant::now());
                    follow_up(&http, format!("{base}/v1/queues"), &seen);
                } else {
                    refresh_due = true;
                }
            }
        }
    }
}

/// The page's request after an event, sent beside the stream as a
/// browser's `fetch` is, so the stream keeps being read meanwhile.
fn follow_up(http: &reqwest::Client, url: String, seen: &Arc<Seen>) {
    let (http, seen) = (http.clone(), seen.clone());
    tokio::spawn(async move {
        let t = Instant::now();
        if let Ok(r) = http.get(url).send().await {
            let _ = r.bytes().await;
        }
        seen.follow_ups.fetch_add(1, Ordering::SeqCst);
        seen.follow_up_micros
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(t.elapsed().as_micros() as u64);
    });
}
