//! What a running `stitch serve` holds: the store, the queue, the runners of
//! each build queue, and the notifier that wakes event streams.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use stitch_core::BuildRunner;
use stitch_mq::mysql::MySqlDriver;
use stitch_mq::postgres::PostgresDriver;
use stitch_mq::sqlite::SqliteDriver;
use stitch_mq::{AnyDriver, BackendKind, Queue, QueueConfig as MqQueueConfig};
use stitch_runners::buildkite::{BuildkiteConfig, BuildkiteRunner, Client};
use stitch_runners::github::{self, AppTokens, Credentials, GithubConfig, GithubRunner};
use stitch_runners::http_budget::{RateLimit, RequestBudget};
use stitch_runners::http_retry::RetryPolicy;
use stitch_runners::local::RunAs;
use stitch_runners::{FakeConfig, FakeRunner, LocalConfig, LocalRunner, NoopRunner, RunnerKind};
use stitch_store::{CommitListener, Committed, Store, StorePool};
use tokio::sync::watch;

use crate::config::{BuildkiteSection, Config, GithubSection, QueueConfig, RunnerName};
use crate::event_feed::{EventFeed, FeedEvent};
use crate::job_token::{self, JobTokens};
use crate::webhooks::{BuildkiteWebhooks, GithubWebhooks};

/// Message-queue topics the stages consume.
pub mod topics {
    /// One message per build: create the provider's build.
    pub const TRIGGER: &str = "trigger";
    /// One partition per build: the poll loop.
    pub const SIGNAL: &str = "signal";
}

/// One configured build queue with its runner.
pub struct QueueRuntime {
    /// Queue name.
    pub name: String,
    /// Runner kind name stored on builds (`fake`, `local`, …).
    pub runner_name: &'static str,
    /// The runner.
    pub runner: Arc<dyn BuildRunner>,
    /// The queue's settings (poll cadence, deadlines, retry budget).
    pub config: QueueConfig,
    /// The safety-net poll cadence while a provider's webhooks push
    /// changes (`[webhooks.github] poll` for `github` queues).
    pub webhook_poll: Option<Duration>,
}

impl QueueRuntime {
    /// Poll delay for a build in `status`: the webhook safety net when
    /// webhooks push this queue's changes, else [`poll_delay`].
    pub fn poll_delay(&self, status: stitch_core::BuildStatus) -> Duration {
        self.webhook_poll
            .unwrap_or_else(|| poll_delay(&self.config, status))
    }
}

/// Shared state of the service. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    store: Store,
    queue: Queue,
    queues: BTreeMap<String, QueueRuntime>,
    events: Arc<watch::Sender<u64>>,
    feed: EventFeed,
    job_tokens: JobTokens,
    /// The address the API actually listens on, once bound (`listen` may
    /// name port 0); the fallback for `STITCH_SERVER` without `public_url`.
    bound: std::sync::OnceLock<std::net::SocketAddr>,
    buildkite_webhooks: BuildkiteWebhooks,
    github_webhooks: Option<GithubWebhooks>,
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("opening the database: {0}")]
    Store(#[from] stitch_store::StoreError),
    #[error("opening the message queue: {0}")]
    Queue(#[from] stitch_mq::MqError),
    #[error("queue {queue}: {message}")]
    Runner { queue: String, message: String },
}

impl StartError {
    /// Whether the storage URL itself is wrong (a usage error, not an
    /// outage): `stitch migrate` exits with the usage code for it.
    pub fn is_invalid_storage_url(&self) -> bool {
        matches!(
            self,
            StartError::Store(stitch_store::StoreError::InvalidUrl(_))
        )
    }
}

/// Creates the data directory private to stitch's user (mode 0700; an
/// existing one is set to 0700): it holds the SQLite database and the
/// runners' state, job tokens included.
pub fn create_data_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The storage URL a configuration names: `storage.url`, or the SQLite
/// file `stitch.db` in the data directory.
pub fn storage_url(config: &Config) -> String {
    match &config.storage.url {
        Some(url) => url.clone(),
        None => format!("sqlite://{}", config.data_dir.join("stitch.db").display()),
    }
}

/// The state directory of the `local` runner of queue `name`.
pub fn local_state_dir(config: &Config, name: &str) -> std::path::PathBuf {
    config.data_dir.join("local").join(name)
}

/// The state directories of every `local` queue of a configuration.
pub fn local_state_dirs(config: &Config) -> Vec<std::path::PathBuf> {
    config
        .queues
        .iter()
        .filter(|(_, q)| q.runner == RunnerName::Local)
        .map(|(name, _)| local_state_dir(config, name))
        .collect()
}

/// Connects to the configured database (without migrating it).
async fn connect_storage(config: &Config) -> Result<StorePool, StartError> {
    Ok(StorePool::connect(&storage_url(config)).await?)
}

/// The message queue's driver for a pool's backend, on that same pool (so
/// store writes and queue publishes share transactions); applies the
/// queue's migrations.
async fn queue_driver(pool: &StorePool) -> Result<AnyDriver, StartError> {
    Ok(match pool {
        StorePool::Sqlite(p) => AnyDriver::Sqlite(SqliteDriver::from_pool(p.clone()).await?),
        StorePool::Postgres(p) => AnyDriver::Postgres(PostgresDriver::from_pool(p.clone()).await?),
        StorePool::MySql(p) => AnyDriver::MySql(MySqlDriver::from_pool(p.clone()).await?),
    })
}

/// Opens the store and the queue of a configuration's database, on one
/// pool, with both sets of migrations applied.
pub async fn open_storage(config: &Config) -> Result<(Store, AnyDriver), StartError> {
    let pool = connect_storage(config).await?;
    let driver = queue_driver(&pool).await?;
    let store = Store::from_pool(pool).await?;
    // On SQLite the store and the queue take turns on one in-process writer
    // lock; the servers serialize store writers on a row instead (ADR 0009).
    let store = match &driver {
        AnyDriver::Sqlite(d) => store.with_writer_lock(d.writer_lock()),
        _ => store,
    };
    Ok((store, driver))
}

/// Applies the queue's and the store's migrations to the configured
/// database and nothing else (`stitch migrate`); returns its engine.
pub async fn migrate_storage(config: &Config) -> Result<BackendKind, StartError> {
    let pool = connect_storage(config).await?;
    match &pool {
        StorePool::Sqlite(p) => stitch_mq::sqlite::migrate(p).await?,
        StorePool::Postgres(p) => stitch_mq::postgres::migrate(p).await?,
        StorePool::MySql(p) => stitch_mq::mysql::migrate(p).await?,
    }
    stitch_store::migrate(&pool).await?;
    let kind = pool.kind();
    pool.close().await;
    Ok(kind)
}

/// Opens only the message queue of a configuration's database (for the
/// `stitch mq` commands, beside a running server).
pub async fn open_queue(config: &Config) -> Result<Queue, StartError> {
    let driver = queue_driver(&connect_storage(config).await?).await?;
    Ok(Queue::new(
        driver.into_shared(),
        MqQueueConfig {
            gc_interval: None,
            ..MqQueueConfig::default()
        },
    ))
}

impl AppState {
    /// Opens the database (creating it), the queue and every queue's runner.
    pub async fn open(config: Config) -> Result<Self, StartError> {
        Self::open_with_runners(config, |_, runner| runner).await
    }

    /// Opens as [`open`](Self::open), passing each queue's runner through
    /// `wrap` (queue name, runner) before the stages use it: tests hold a
    /// runner's calls at sync points this way, embedders can instrument them.
    pub async fn open_with_runners(
        config: Config,
        wrap: impl Fn(&str, Arc<dyn BuildRunner>) -> Arc<dyn BuildRunner>,
    ) -> Result<Self, StartError> {
        create_data_dir(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.display().to_string(),
            source,
        })?;
        let (store, driver) = open_storage(&config).await?;
        // The queue's own 7-day dedup horizon stays: the build messages go
        // with their build in the retention pass instead (ADR 0014).
        let queue = Queue::new(driver.into_shared(), MqQueueConfig::default());
        // The store announces its commits: published topics wake this
        // process's subscribers, appended events the event streams.
        let events = Arc::new(watch::channel(0).0);
        store.announce_commits_to(Arc::new(CommitWakeups {
            publisher: queue.publisher(),
            events: events.clone(),
        }));
        let key = store
            .ensure_secret(job_token::SECRET_NAME, &JobTokens::random_key())
            .await?;
        let mut queues = BTreeMap::new();
        let budgets = Budgets {
            buildkite: buildkite_budgets(&config),
            github: github_budgets(&config),
        };
        for (name, qc) in &config.queues {
            let mut runtime = build_runtime(&config, name, qc, &budgets)?;
            runtime.runner = wrap(name, runtime.runner);
            queues.insert(name.clone(), runtime);
        }
        let buildkite_webhooks = BuildkiteWebhooks::from_config(&config, |k| std::env::var(k).ok());
        let github_webhooks = GithubWebhooks::from_config(&config, |k| std::env::var(k).ok());
        let feed = EventFeed::start(store.clone(), events.subscribe());
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                store,
                queue,
                queues,
                events,
                feed,
                job_tokens: JobTokens::new(&key),
                bound: std::sync::OnceLock::new(),
                buildkite_webhooks,
                github_webhooks,
            }),
        })
    }

    /// The configuration the service runs with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The build store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The message queue.
    pub fn queue(&self) -> &Queue {
        &self.inner.queue
    }

    /// A configured build queue.
    pub fn build_queue(&self, name: &str) -> Option<&QueueRuntime> {
        self.inner.queues.get(name)
    }

    /// Every configured build queue.
    pub fn build_queues(&self) -> impl Iterator<Item = &QueueRuntime> {
        self.inner.queues.values()
    }

    /// Derives and checks build-scoped job tokens.
    pub fn job_tokens(&self) -> &JobTokens {
        &self.inner.job_tokens
    }

    /// Records the address the HTTP API was bound to (the first call wins).
    pub fn set_bound_addr(&self, addr: std::net::SocketAddr) {
        let _ = self.inner.bound.set(addr);
    }

    /// How CI jobs reach this server (`STITCH_SERVER`): `api.public_url`,
    /// else the bound (or configured) listen address, with an unspecified
    /// IP (`0.0.0.0`, `::`) replaced by loopback.
    pub fn job_server_url(&self) -> String {
        if let Some(url) = &self.inner.config.api.public_url {
            return url.trim_end_matches('/').to_string();
        }
        let mut addr = self
            .inner
            .bound
            .get()
            .copied()
            .unwrap_or(self.inner.config.listen);
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        format!("http://{addr}")
    }

    /// Changes whenever events were committed: event streams wait on it
    /// and then read the durable log from their own position.
    pub fn event_seq(&self) -> watch::Receiver<u64> {
        self.inner.events.subscribe()
    }

    /// Every event with `seq > after`, forever, in order (see
    /// [`crate::event_feed`]).
    pub fn event_stream(
        &self,
        after: u64,
    ) -> futures::stream::BoxStream<'static, Result<Arc<FeedEvent>, stitch_store::StoreError>> {
        self.inner.feed.stream(self.inner.store.clone(), after)
    }

    /// The configured Buildkite webhook secrets.
    pub fn buildkite_webhooks(&self) -> &BuildkiteWebhooks {
        &self.inner.buildkite_webhooks
    }

    /// The GitHub webhook, when `[webhooks.github]` is configured.
    pub fn github_webhooks(&self) -> Option<&GithubWebhooks> {
        self.inner.github_webhooks.as_ref()
    }
}

/// Where the store's commit announcements go: the queue's in-process
/// subscribers of each published topic, and the event feed.
struct CommitWakeups {
    publisher: stitch_mq::Publisher,
    events: Arc<watch::Sender<u64>>,
}

impl CommitListener for CommitWakeups {
    fn committed(&self, what: &Committed) {
        for topic in &what.published {
            self.publisher.notify_published(topic);
        }
        if what.events {
            self.events
                .send_modify(|generation| *generation = generation.wrapping_add(1));
        }
    }
}

/// Organizations are keyed by API root and slug.
type OrgKey = (String, String);

/// One request budget per Buildkite organization, shared by all its
/// queues; the smallest configured limit wins.
fn buildkite_budgets(config: &Config) -> BTreeMap<OrgKey, Arc<RequestBudget>> {
    let mut limits: BTreeMap<OrgKey, RateLimit> = BTreeMap::new();
    for q in config.queues.values() {
        let Some(bk) = q
            .buildkite
            .as_ref()
            .filter(|_| q.runner == RunnerName::Buildkite)
        else {
            continue;
        };
        let limit = RateLimit {
            requests: bk.rate_limit.requests,
            window: bk.rate_limit.window,
        };
        let key = (bk.api_url.trim_end_matches('/').to_string(), bk.org.clone());
        limits
            .entry(key)
            .and_modify(|l| {
                let per_sec = |x: &RateLimit| f64::from(x.requests) / x.window.as_secs_f64();
                if per_sec(&limit) < per_sec(l) {
                    *l = limit;
                }
            })
            .or_insert(limit);
    }
    limits
        .into_iter()
        .map(|(k, l)| (k, Arc::new(RequestBudget::new(l))))
        .collect()
}

/// The request budgets of the vendor clients, by rate-limit scope.
struct Budgets {
    buildkite: BTreeMap<OrgKey, Arc<RequestBudget>>,
    github: BTreeMap<GithubScope, Arc<RequestBudget>>,
}

/// A GitHub rate-limit scope: API root and the credentials (token variable
/// or App installation) whose hourly quota the requests spend.
type GithubScope = (String, String);

fn github_scope(gh: &GithubSection) -> GithubScope {
    let who = match (&gh.token_env, gh.installation_id) {
        (Some(env), _) => format!("token:{env}"),
        (None, Some(id)) => format!("installation:{id}"),
        (None, None) => String::new(),
    };
    (gh.api_url.trim_end_matches('/').to_string(), who)
}

/// One request budget per GitHub token or App installation, shared by all
/// its queues; the smallest configured limit wins.
fn github_budgets(config: &Config) -> BTreeMap<GithubScope, Arc<RequestBudget>> {
    let mut limits: BTreeMap<GithubScope, RateLimit> = BTreeMap::new();
    for q in config.queues.values() {
        let Some(gh) = q.github.as_ref().filter(|_| q.runner == RunnerName::Github) else {
            continue;
        };
        let limit = RateLimit {
            requests: gh.rate_limit.requests,
            window: gh.rate_limit.window,
        };
        limits
            .entry(github_scope(gh))
            .and_modify(|l| {
                let per_sec = |x: &RateLimit| f64::from(x.requests) / x.window.as_secs_f64();
                if per_sec(&limit) < per_sec(l) {
                    *l = limit;
                }
            })
            .or_insert(limit);
    }
    limits
        .into_iter()
        .map(|(k, l)| (k, Arc::new(RequestBudget::new(l))))
        .collect()
}

/// The HTTP client of a vendor API: user agent and timeouts; credentials
/// are added by the vendor client (GitHub) or as a default header
/// (Buildkite).
fn http_client(
    timeout: Duration,
    headers: reqwest::header::HeaderMap,
) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .default_headers(headers)
        .user_agent(concat!("stitch/", env!("CARGO_PKG_VERSION")))
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))
}

fn github_runner(
    gh: &GithubSection,
    budgets: &BTreeMap<GithubScope, Arc<RequestBudget>>,
) -> Result<GithubRunner, String> {
    let http = http_client(gh.request_timeout, Default::default())?;
    let api_url = gh.api_url.trim_end_matches('/').to_string();
    let credentials = match (
        &gh.token_env,
        &gh.app_id,
        &gh.private_key_file,
        gh.installation_id,
    ) {
        (Some(env), None, None, None) => {
            let token = std::env::var(env)
                .ok()
                .filter(|t| !t.trim().is_empty())
                .ok_or_else(|| {
                    format!("environment variable {env} (github.token_env) is unset or empty")
                })?;
            Credentials::token(&token).map_err(|e| format!("{env}: {e}"))?
        }
        (None, Some(app_id), Some(key_file), Some(installation)) => {
            let pem = std::fs::read(key_file).map_err(|e| {
                format!(
                    "reading github.private_key_file {}: {e}",
                    key_file.display()
                )
            })?;
            let app = AppTokens::new(
                http.clone(),
                &api_url,
                gh.api_version.clone(),
                app_id.clone(),
                installation,
                &pem,
            )
            .map_err(|e| e.to_string())?;
            Credentials::App(Arc::new(app))
        }
        _ => return Err(
            "set either github.token_env or github.app_id, private_key_file and installation_id"
                .into(),
        ),
    };
    let budget = budgets
        .get(&github_scope(gh))
        .cloned()
        .unwrap_or_else(|| Arc::new(RequestBudget::new(RateLimit::default())));
    let client = github::Client::new(
        http,
        &api_url,
        gh.api_version.clone(),
        credentials,
        budget,
        RetryPolicy::default(),
    )
    .map_err(|e| e.to_string())?;
    let mut config = GithubConfig::new(
        gh.owner.clone(),
        gh.repo.clone(),
        gh.workflow.clone(),
        gh.git_ref.clone(),
    );
    config.inputs = gh.inputs.clone();
    config.max_inputs = gh.max_inputs;
    config.log_poll = gh.log_poll;
    config.lookup_settle = gh.lookup_settle;
    Ok(GithubRunner::new(client, config))
}

fn buildkite_runner(
    bk: &BuildkiteSection,
    budgets: &BTreeMap<OrgKey, Arc<RequestBudget>>,
) -> Result<BuildkiteRunner, String> {
    let token = std::env::var(&bk.token_env)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            format!(
                "environment variable {} (buildkite.token_env) is unset or empty",
                bk.token_env
            )
        })?;
    let mut auth = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| format!("{} holds characters a header cannot carry", bk.token_env))?;
    auth.set_sensitive(true);
    let headers = reqwest::header::HeaderMap::from_iter([(reqwest::header::AUTHORIZATION, auth)]);
    let http = http_client(bk.request_timeout, headers)?;
    let api_url = bk.api_url.trim_end_matches('/').to_string();
    let budget = budgets
        .get(&(api_url.clone(), bk.org.clone()))
        .cloned()
        .unwrap_or_else(|| Arc::new(RequestBudget::new(RateLimit::default())));
    let client =
        Client::new(http, api_url, budget, RetryPolicy::default()).map_err(|e| e.to_string())?;
    let mut config = BuildkiteConfig::new(bk.org.clone(), bk.pipeline.clone(), bk.branch.clone());
    config.commit = bk.commit.clone();
    config.allow_ref_override = bk.allow_ref_override;
    config.log_poll = bk.log_poll;
    config.max_log_bytes = bk.max_log_bytes;
    Ok(BuildkiteRunner::new(client, config))
}

fn build_runtime(
    config: &Config,
    name: &str,
    qc: &QueueConfig,
    budgets: &Budgets,
) -> Result<QueueRuntime, StartError> {
    let err = |message: String| StartError::Runner {
        queue: name.to_string(),
        message,
    };
    let runner: Arc<dyn BuildRunner> = match qc.runner {
        RunnerName::Noop => Arc::new(NoopRunner::new()),
        RunnerName::Fake => {
            let f = qc.fake.clone().unwrap_or_default();
            let fake = FakeConfig {
                accept_delay: f.accept_delay,
                run_duration: f.run_duration,
                slow_factor: f.slow_factor,
                cancel_dir: Some(config.data_dir.join("fake-cancels").join(name)),
            };
            Arc::new(FakeRunner::new(fake).map_err(|e| err(e.to_string()))?)
        }
        RunnerName::Local => {
            let l = qc.local.clone().ok_or_else(|| {
                err("runner \"local\" needs a [queues.NAME.local] table with `command`".into())
            })?;
            let mut lc = LocalConfig::new(l.command, local_state_dir(config, name));
            lc.workdir = l.workdir;
            lc.cancel_grace = l.cancel_grace;
            lc.env = l.env;
            lc.pass_env = l.pass_env;
            lc.run_as = RunAs::resolve(
                l.user.as_deref(),
                l.group.as_deref(),
                nix::unistd::geteuid().as_raw(),
            )
            .map_err(|e| err(e.to_string()))?;
            lc.concurrency = qc.concurrency.unwrap_or(1).max(1) as usize;
            Arc::new(LocalRunner::new(lc).map_err(|e| err(e.to_string()))?)
        }
        RunnerName::Buildkite => {
            let bk = qc.buildkite.as_ref().ok_or_else(|| {
                err("runner \"buildkite\" needs a [queues.NAME.buildkite] table".into())
            })?;
            Arc::new(buildkite_runner(bk, &budgets.buildkite).map_err(err)?)
        }
        RunnerName::Github => {
            let gh = qc.github.as_ref().ok_or_else(|| {
                err("runner \"github\" needs a [queues.NAME.github] table".into())
            })?;
            Arc::new(github_runner(gh, &budgets.github).map_err(err)?)
        }
    };
    let webhook_poll = match (qc.runner, &config.webhooks.github) {
        (RunnerName::Github, Some(w)) => Some(w.poll),
        _ => None,
    };
    Ok(QueueRuntime {
        name: name.to_string(),
        runner_name: RunnerKind::from(qc.runner).as_str(),
        runner,
        config: qc.clone(),
        webhook_poll,
    })
}

/// Poll delay for a status (unknown polls like accepted). With Buildkite
/// webhooks configured, polling is only the safety net (`webhook.poll`).
pub fn poll_delay(config: &QueueConfig, status: stitch_core::BuildStatus) -> Duration {
    if let Some(w) = config.buildkite.as_ref().and_then(|b| b.webhook.as_ref()) {
        if config.runner == RunnerName::Buildkite {
            return w.poll;
        }
    }
    match status {
        stitch_core::BuildStatus::Running => config.poll.running,
        _ => config.poll.accepted,
    }
}
