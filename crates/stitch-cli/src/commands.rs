//! What each subcommand does. Every function returns the process exit code.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::CommandFactory;

use stitch_api::{BuildList, BuildRecord, CreateBuild};
use stitch_core::metadata::keys;
use stitch_core::BuildStatus;
use stitch_server::config;

use crate::client::{BuildFeed, Client, ClientError, FeedItem, LogsOutcome, Reconnect};
use crate::configured::{load_options, open_configured_queue};
use crate::exit::{BUILD_FAILED, OK, UNAVAILABLE, USAGE};
use crate::{
    BuildCommand, Cli, Command, ConfigArgs, ConfigCommand, DlqCommand, JobCommand, MqCommand,
    ServerArgs,
};

pub async fn run(cli: Cli) -> u8 {
    let log_format = cli.log_format.map(crate::LogFormatArg::as_format);
    match cli.command {
        Command::Serve(args) => serve(args, log_format).await,
        Command::Build(cmd) => build(cmd).await,
        Command::Job(JobCommand::Exec { command }) => crate::job::exec(command, log_format).await,
        Command::Job(JobCommand::PromiseFailure {
            exit_status,
            reason,
        }) => crate::job::promise_failure(exit_status, reason, log_format).await,
        Command::Mq(MqCommand::Dlq(cmd)) => dlq(cmd).await,
        Command::Mq(MqCommand::Partitions(args)) => crate::partitions::run(args).await,
        Command::Config(ConfigCommand::Check { config }) => config_check(&config),
        Command::Migrate(args) => migrate(&args.config).await,
        Command::Gc(args) => gc(&args).await,
        Command::Completions { shell } => crate::reference::completions(Cli::command(), shell),
        Command::Man => crate::reference::man(Cli::command()),
        Command::CliReference => crate::reference::markdown(Cli::command()),
    }
}

/// `stitch gc`: one retention pass (or its preview) now.
async fn gc(args: &crate::GcArgs) -> u8 {
    use stitch_server::retention::Pruner;
    let config = match config::load(&load_options(&args.config)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stitch: {}", config::render_problems(&e));
            return USAGE;
        }
    };
    let url = stitch_mq::open::redact(&stitch_server::state::storage_url(&config));
    let (store, driver) = match stitch_server::state::open_storage(&config).await {
        Ok(opened) => opened,
        Err(e) => {
            eprintln!("stitch gc: {url}: {e}");
            return UNAVAILABLE;
        }
    };
    let queue = stitch_mq::Queue::new(
        driver.into_shared(),
        stitch_mq::QueueConfig {
            gc_interval: None,
            ..stitch_mq::QueueConfig::default()
        },
    );
    let pruner = Pruner::for_config(store.clone(), queue.admin(), &config);
    let now = stitch_mq::now_millis();
    let result = if args.dry_run {
        pruner.preview(now).await
    } else {
        pruner.run_pass(now).await
    };
    store.close().await;
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("stitch gc: {url}: {e}");
            return UNAVAILABLE;
        }
    };
    if args.json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
        return OK;
    }
    if let Some(holder) = &report.lease_held_by {
        println!("another process ({holder}) is pruning {url} now; nothing removed");
        return OK;
    }
    let verb = if report.dry_run {
        "would remove"
    } else {
        "removed"
    };
    println!("{verb} from {url}:");
    println!("  builds          {}", report.builds);
    println!("  log lines       {}", report.log_lines);
    println!("  events          {}", report.events);
    println!("  dead letters    {}", report.dead_letters);
    if !report.dry_run {
        println!("  queue messages  {}", report.queue_messages);
        println!("  local states    {}", report.local_states);
    }
    println!("oldest retained event: {}", report.oldest_event_seq);
    if let Some(bytes) = report.database_bytes {
        println!("database size: {bytes} bytes");
    }
    OK
}

/// `stitch migrate`: brings the configured database's schemas up to date,
/// so a deployment can migrate once before starting several servers.
async fn migrate(args: &ConfigArgs) -> u8 {
    let config = match config::load(&load_options(args)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stitch: {}", config::render_problems(&e));
            return USAGE;
        }
    };
    if config.storage.url.is_none() {
        // The default SQLite file lives in the data directory.
        if let Err(e) = stitch_server::state::create_data_dir(&config.data_dir) {
            eprintln!(
                "stitch migrate: cannot create data directory {}: {e}",
                config.data_dir.display()
            );
            return UNAVAILABLE;
        }
    }
    let url = stitch_mq::open::redact(&stitch_server::state::storage_url(&config));
    match stitch_server::state::migrate_storage(&config).await {
        Ok(kind) => {
            println!("migrated {url} ({kind:?}): queue and store schemas are up to date");
            OK
        }
        Err(e) => {
            eprintln!("stitch migrate: {url}: {e}");
            if e.is_invalid_storage_url() {
                USAGE
            } else {
                UNAVAILABLE
            }
        }
    }
}

async fn serve(args: crate::ServeArgs, log_format: Option<config::LogFormat>) -> u8 {
    let mut opts = load_options(&args.config);
    opts.listen = args.listen;
    let config = match config::load(&opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stitch: {}", config::render_problems(&e));
            return USAGE;
        }
    };
    let telemetry = match stitch_server::telemetry::init(
        log_format.unwrap_or(config.telemetry.log_format),
        config.telemetry.otlp.as_ref(),
        stitch_server::telemetry::DEFAULT_FILTER,
        std::io::stdout,
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("stitch: {e}");
            return USAGE;
        }
    };
    let addons = stitch_spindle::addon(&config).into_iter().collect();
    let code =
        match stitch_server::app::run_with(config, stitch_server::app::shutdown_signal(), addons)
            .await
        {
            Ok(()) => OK,
            Err(e) => {
                eprintln!("stitch serve: {e:#}");
                match e {
                    stitch_server::app::ServeError::Refused(_) => USAGE,
                    _ => UNAVAILABLE,
                }
            }
        };
    // The exporter sends what it still holds; it blocks on the collector.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    code
}

fn config_check(args: &ConfigArgs) -> u8 {
    match config::load(&load_options(args)) {
        Ok(c) => {
            println!(
                "configuration is valid: listen {}, data dir {}, {} queue(s): {}",
                c.listen,
                c.data_dir.display(),
                c.queues.len(),
                c.queues.keys().cloned().collect::<Vec<_>>().join(", ")
            );
            if let Some(s) = &c.spindle {
                println!(
                    "tangled spindle: {} (owner {}, default queue {})",
                    s.hostname, s.owner, s.default_queue
                );
            }
            OK
        }
        Err(e) => {
            eprintln!("{}", config::render_problems(&e));
            USAGE
        }
    }
}

fn client(server: &ServerArgs) -> Result<Client, u8> {
    Client::new(&server.server, server.token.clone()).map_err(|e| {
        eprintln!("stitch: {e}");
        e.exit_code()
    })
}

fn fail(e: ClientError) -> u8 {
    eprintln!("stitch: {e}");
    if e.is_build_not_found() {
        eprintln!(
            "stitch: no such build: the id is wrong, or the build finished longer ago than \
             the server's [retention] builds window and was deleted"
        );
    }
    e.exit_code()
}

fn print_build(b: &BuildRecord, json: bool) {
    if json {
        println!("{}", serde_json::to_string(b).unwrap_or_default());
        return;
    }
    println!("{}  {}  queue={}", b.id, b.status, b.queue);
    println!("  head: {}", b.head.join(" "));
    if !b.base.is_empty() {
        println!("  base: {}", b.base.join(" "));
    }
    if let Some(url) = &b.url {
        println!("  url:  {url}");
    }
    if let Some(err) = b.metadata.get("error") {
        println!("  error: {err}");
    }
    if b.cancel_requested && !b.status.is_terminal() {
        println!("  cancel requested; waiting for the provider to confirm");
    }
    if let Some(promised) = promised_failure(b) {
        println!("  {promised}");
    }
    println!("  created {}", b.created_at.to_rfc3339());
}

async fn build(cmd: BuildCommand) -> u8 {
    let c = match client(cmd.server()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match cmd {
        BuildCommand::Trigger {
            server,
            queue,
            base,
            head,
            meta,
            idempotency_key,
            wait,
            reconnect,
        } => {
            let req = CreateBuild {
                base,
                head,
                metadata: meta.into_iter().collect::<BTreeMap<_, _>>(),
                idempotency_key,
            };
            create_and_report(&c, &queue, &req, &server, wait.then(|| reconnect.policy())).await
        }
        BuildCommand::Rerun {
            server,
            id,
            wait,
            reconnect,
        } => {
            let old = match c.get(&id).await {
                Ok(b) => b,
                Err(e) => return fail(e),
            };
            let req = rerun_request(&old);
            create_and_report(
                &c,
                &old.queue,
                &req,
                &server,
                wait.then(|| reconnect.policy()),
            )
            .await
        }
        BuildCommand::Status { server, id } => match c.get(&id).await {
            Ok(b) => {
                print_build(&b, server.json);
                OK
            }
            Err(e) => fail(e),
        },
        BuildCommand::Cancel { server, id } => match c.cancel(&id).await {
            Ok(b) => {
                if server.json {
                    print_build(&b, true);
                } else {
                    println!("cancel requested for {} (now {})", b.id, b.status);
                }
                OK
            }
            Err(e) => fail(e),
        },
        BuildCommand::Open {
            server,
            id,
            browser,
        } => open(&c, &id, browser, server.json).await,
        BuildCommand::List {
            server,
            queue,
            status,
            limit,
            cursor,
            all,
        } => {
            let status = status.map(|s| s.as_status().as_str());
            list(
                &c,
                queue.as_deref(),
                status,
                limit,
                cursor,
                all,
                server.json,
            )
            .await
        }
        BuildCommand::Logs {
            server,
            id,
            reconnect,
        } => {
            let json = server.json;
            match c
                .follow_logs(&id, reconnect.policy(), |l| print_log_line(&l, json, false))
                .await
            {
                Ok(LogsOutcome::Complete) => OK,
                Ok(LogsOutcome::NoLog) => {
                    eprintln!("stitch: build {id} has no log (yet): its runner keeps none, or it has not started");
                    USAGE
                }
                Err(e) => fail(e),
            }
        }
        BuildCommand::Watch {
            server,
            id,
            reconnect,
        } => watch(&c, &id, server.json, reconnect.policy()).await,
    }
}

/// Creates a build and prints its id (or record); with `wait`, follows it
/// to the end and answers its outcome.
async fn create_and_report(
    c: &Client,
    queue: &str,
    req: &CreateBuild,
    server: &ServerArgs,
    wait: Option<Reconnect>,
) -> u8 {
    let b = match c.create(queue, req).await {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    let Some(reconnect) = wait else {
        if server.json {
            print_build(&b, true);
        } else {
            println!("{}", b.id);
        }
        return OK;
    };
    if !server.json {
        eprintln!("triggered {} on queue {}", b.id, b.queue);
    }
    watch(c, &b.id.to_string(), server.json, reconnect).await
}

/// Metadata keys stitch and its runners write on a build: a rerun copies
/// the rest (the caller's).
const WRITTEN_BY_STITCH: &[&str] = &[
    keys::URL,
    keys::ERROR,
    keys::EXIT_STATUS,
    keys::SIGNAL,
    keys::PROMISED_EXIT_STATUS,
    keys::PROMISED_EXIT_STATUS_AT,
    keys::PROMISED_EXIT_STATUS_REASON,
    "provider_state",
    RERUN_OF,
];
/// Prefixes of the runner-specific keys (`buildkite_number`, …).
const WRITTEN_BY_RUNNERS: &[&str] = &["buildkite_", "github_", "gitlab_", "fake_"];
/// The metadata key a rerun names the build it repeats with.
const RERUN_OF: &str = "rerun_of";

/// The request that runs `old` again: same base, head and caller metadata,
/// `rerun_of` naming it.
fn rerun_request(old: &BuildRecord) -> CreateBuild {
    let mut metadata: BTreeMap<String, String> = old
        .metadata
        .iter()
        .filter(|(k, _)| {
            !WRITTEN_BY_STITCH.contains(&k.as_str())
                && !WRITTEN_BY_RUNNERS.iter().any(|p| k.starts_with(p))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.insert(RERUN_OF.to_string(), old.id.to_string());
    CreateBuild {
        base: old.base.clone(),
        head: old.head.clone(),
        metadata,
        idempotency_key: None,
    }
}

/// `build open`: the provider URL on stdout (with `json`, as
/// `{"id": …, "url": …}`); with `browser`, also handed to `$BROWSER`.
async fn open(c: &Client, id: &str, browser: bool, json: bool) -> u8 {
    let b = match c.get(id).await {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    let Some(url) = b.url.as_deref() else {
        eprintln!(
            "stitch: build {} ({}) has no URL yet: it has not reached its provider, \
             or its runner has no web page",
            b.id, b.status
        );
        return USAGE;
    };
    if json {
        println!(
            "{}",
            serde_json::json!({"id": b.id.to_string(), "url": url})
        );
    } else {
        println!("{url}");
    }
    if !browser {
        return OK;
    }
    let Some(program) = std::env::var_os("BROWSER").filter(|p| !p.is_empty()) else {
        eprintln!("stitch: --browser: $BROWSER is not set; the URL is printed above");
        return USAGE;
    };
    match tokio::process::Command::new(&program)
        .arg(url)
        .status()
        .await
    {
        Ok(s) if s.success() => OK,
        Ok(s) => {
            eprintln!(
                "stitch: $BROWSER ({}) exited with {s}",
                program.to_string_lossy()
            );
            UNAVAILABLE
        }
        Err(e) => {
            eprintln!(
                "stitch: cannot run $BROWSER ({}): {e}",
                program.to_string_lossy()
            );
            UNAVAILABLE
        }
    }
}

/// `build list`: one page (or, with `all`, every page from `cursor` on).
async fn list(
    c: &Client,
    queue: Option<&str>,
    status: Option<&str>,
    limit: u32,
    mut cursor: Option<String>,
    all: bool,
    json: bool,
) -> u8 {
    let mut builds = Vec::new();
    let next = loop {
        let page = match c.list(queue, status, limit, cursor.as_deref()).await {
            Ok(page) => page,
            Err(e) => return fail(e),
        };
        if json {
            builds.extend(page.builds);
        } else {
            for b in &page.builds {
                println!(
                    "{}  {:<9}  {:<12}  {}",
                    b.id,
                    b.status.as_str(),
                    b.queue,
                    b.head.join(" ")
                );
            }
        }
        match page.next_cursor {
            Some(next) if all => cursor = Some(next.to_string()),
            next => break next,
        }
    };
    if json {
        let page = BuildList {
            builds,
            next_cursor: next,
        };
        println!("{}", serde_json::to_string(&page).unwrap_or_default());
    } else if let Some(next) = next {
        println!("more: stitch build list --cursor {next}");
    }
    OK
}

/// "promised failure: exit status N (reason) at T", when the job promised one.
fn promised_failure(b: &BuildRecord) -> Option<String> {
    let status = b.metadata.get(keys::PROMISED_EXIT_STATUS)?;
    let mut text = format!("promised failure: exit status {status}");
    if let Some(reason) = b.metadata.get(keys::PROMISED_EXIT_STATUS_REASON) {
        text.push_str(&format!(" ({reason})"));
    }
    if let Some(at) = b.metadata.get(keys::PROMISED_EXIT_STATUS_AT) {
        text.push_str(&format!(" at {at}"));
    }
    Some(text)
}

/// Prints one log line: steps as headers, output indented.
fn print_log_line(l: &stitch_core::LogLine, json: bool, tty: bool) {
    if json {
        println!("{}", serde_json::to_string(l).unwrap_or_default());
        return;
    }
    let clear = if tty { "\r\x1b[2K" } else { "" };
    let text = match (l.kind, l.step_status) {
        (stitch_core::LogKind::Control, Some(stitch_core::StepStatus::Start)) => {
            format!("▶ {}", l.content)
        }
        (stitch_core::LogKind::Control, Some(stitch_core::StepStatus::End)) => {
            format!("■ {}", l.content)
        }
        (stitch_core::LogKind::Control, _) => return,
        (stitch_core::LogKind::Data, _) => format!("  {}", l.content),
    };
    println!("{clear}{text}");
}

/// Follows a build until it is terminal: a live line on a terminal, one line
/// per status change otherwise (or one JSON record per change with `--json`),
/// and the build's log lines as they are written.
async fn watch(c: &Client, id: &str, json: bool, reconnect: Reconnect) -> u8 {
    // The log follower starts when the status says there may be a log.
    let (status_tx, status_rx) = tokio::sync::watch::channel(None);
    let logs = (!json).then(|| spawn_log_follower(c, id, status_rx, reconnect));
    let code = watch_status(c, id, json, reconnect, &status_tx).await;
    drop(status_tx);
    if let Some(task) = logs {
        // Let the log catch up with the terminal status, briefly: a provider
        // may publish the last lines a moment after the status.
        if tokio::time::timeout(Duration::from_secs(3), task)
            .await
            .is_err()
        {
            tracing::debug!("log stream did not end in time");
        }
    }
    code
}

/// Prints the build's log once it exists: tries when the build is running
/// (or terminal) and again at each later status change while it has none,
/// until the log ends.
fn spawn_log_follower(
    c: &Client,
    id: &str,
    mut status: tokio::sync::watch::Receiver<Option<BuildStatus>>,
    reconnect: Reconnect,
) -> tokio::task::JoinHandle<()> {
    let (c, id) = (c.clone_for_task(), id.to_string());
    let tty = std::io::stderr().is_terminal();
    tokio::spawn(async move {
        loop {
            let now = *status.borrow_and_update();
            let may_have_log = now.is_some_and(|s| s != BuildStatus::Accepted);
            if may_have_log {
                match c
                    .follow_logs(&id, reconnect, |l| print_log_line(&l, false, tty))
                    .await
                {
                    Ok(LogsOutcome::NoLog) if !now.is_some_and(BuildStatus::is_terminal) => {}
                    // Done, no log at the end, or failed: the status
                    // follower reports the outcome.
                    _ => return,
                }
            }
            if status.changed().await.is_err() {
                return;
            }
        }
    })
}

async fn watch_status(
    c: &Client,
    id: &str,
    json: bool,
    reconnect: Reconnect,
    status_tx: &tokio::sync::watch::Sender<Option<BuildStatus>>,
) -> u8 {
    let tty = std::io::stderr().is_terminal() && !json;
    let started = Instant::now();
    // Subscribe before reading the record, so no change falls in between.
    let mut feed = match BuildFeed::open(c, reconnect).await {
        Ok(feed) => feed,
        Err(e) => return fail(e),
    };
    let mut last: Option<BuildStatus> = None;
    let mut promise_shown = false;
    let spinner = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
    let mut tick = 0usize;
    // Redraws the live line on a terminal (a display refresh, not a poll).
    let mut redraw = tokio::time::interval(Duration::from_millis(200));
    loop {
        let b = match c.get(id).await {
            Ok(b) => b,
            Err(e) => {
                if tty {
                    eprintln!();
                }
                return fail(e);
            }
        };
        let changed = last != Some(b.status);
        if changed {
            if json {
                print_build(&b, true);
            } else if tty {
                eprint!("\r\x1b[2K");
                eprintln!("[{:>5.1}s] {}", started.elapsed().as_secs_f64(), b.status);
            } else {
                println!("{} {}", b.id, b.status);
            }
            last = Some(b.status);
            status_tx.send_replace(Some(b.status));
        }
        if !promise_shown {
            if let Some(promised) = promised_failure(&b) {
                promise_shown = true;
                if json {
                    // Unless the status line above just printed this record.
                    if !changed {
                        print_build(&b, true);
                    }
                } else {
                    if tty {
                        eprint!("\r\x1b[2K");
                    }
                    println!("{} failing: {promised}", b.id);
                }
            }
        }
        if b.status.is_terminal() {
            if !json {
                if let Some(url) = &b.url {
                    println!("{url}");
                }
                if let Some(err) = b.metadata.get("error") {
                    println!("error: {err}");
                }
            }
            return if b.status == BuildStatus::Succeeded {
                OK
            } else {
                BUILD_FAILED
            };
        }
        // Wait for the next event about this build (or a resync).
        loop {
            tokio::select! {
                item = feed.next() => match item {
                    Ok(FeedItem::Event(e)) if e.build_id.to_string() == id => break,
                    Ok(FeedItem::Event(_)) => {}
                    Ok(FeedItem::Resynced(note)) => {
                        if let Some(note) = note {
                            if tty {
                                eprint!("\r\x1b[2K");
                            }
                            eprintln!("stitch: {note}");
                        }
                        break;
                    }
                    Err(e) => {
                        if tty {
                            eprintln!();
                        }
                        return fail(e);
                    }
                },
                _ = redraw.tick(), if tty => {
                    eprint!(
                        "\r\x1b[2K{} {} for {:.0}s",
                        spinner[tick % spinner.len()],
                        b.status,
                        started.elapsed().as_secs_f64()
                    );
                    let _ = std::io::stderr().flush();
                    tick += 1;
                }
            }
        }
    }
}

async fn dlq(cmd: DlqCommand) -> u8 {
    let (args, topic) = match &cmd {
        DlqCommand::List { config, topic, .. } | DlqCommand::Replay { config, topic, .. } => {
            (config, topic)
        }
    };
    let queue = match open_configured_queue(args).await {
        Ok(q) => q,
        Err(code) => return code,
    };
    let admin = queue.admin();
    match cmd {
        DlqCommand::List { json, .. } => match admin.dead_letters(topic, 0, 10_000).await {
            Ok(dead) => {
                for d in dead {
                    if json {
                        let v = serde_json::json!({
                            "id": d.dlq_id, "topic": d.original_topic, "group": d.group,
                            "message_id": d.message.id, "partition": d.message.partition_key,
                            "attempts": d.attempts, "failure": d.failure.message,
                            "detail": d.failure.detail, "failed_at": d.failed_at,
                            "payload": String::from_utf8_lossy(&d.message.payload),
                        });
                        println!("{v}");
                    } else {
                        println!(
                            "{:>6}  {}  attempts={}  {}",
                            d.dlq_id, d.message.id, d.attempts, d.failure.message
                        );
                    }
                }
                OK
            }
            Err(e) => {
                eprintln!("stitch: {e}");
                if matches!(e, stitch_mq::MqError::InvalidTopic(_)) {
                    USAGE
                } else {
                    UNAVAILABLE
                }
            }
        },
        DlqCommand::Replay { id, .. } => {
            let ids = match id {
                Some(id) => vec![id],
                None => match admin.dead_letters(topic, 0, 10_000).await {
                    Ok(d) => d.into_iter().map(|d| d.dlq_id).collect(),
                    Err(e) => {
                        eprintln!("stitch: {e}");
                        return UNAVAILABLE;
                    }
                },
            };
            for id in ids {
                if let Err(e) = admin.replay_dead_letter(topic, id).await {
                    eprintln!("stitch: {e}");
                    return match e {
                        stitch_mq::MqError::UnknownDeadLetter { .. }
                        | stitch_mq::MqError::InvalidTopic(_) => USAGE,
                        _ => UNAVAILABLE,
                    };
                }
                println!("replayed {id}");
            }
            OK
        }
    }
}
