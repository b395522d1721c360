//! What a running `stitch serve` holds: the store, the queue, the runners of
//! each build queue (built by [`crate::runners`]), and the notifier that
//! wakes event streams.

use std::collections::BTreeMap;
use std::sync::Arc;

use stitch_core::BuildRunner;
use stitch_mq::mysql::MySqlDriver;
use stitch_mq::postgres::PostgresDriver;
use stitch_mq::sqlite::SqliteDriver;
use stitch_mq::{AnyDriver, BackendKind, Queue, QueueConfig as MqQueueConfig};
use stitch_store::{CommitListener, Committed, Store, StorePool};
use tokio::sync::watch;

use crate::config::Config;
use crate::event_feed::{EventFeed, FeedEvent};
use crate::gitlab_webhooks::GitlabWebhooks;
use crate::job_token::{self, JobTokens};
use crate::runners::{build_queue_runtimes, QueueRuntime, RunnerError};
use crate::webhooks::{BuildkiteWebhooks, GithubWebhooks};

/// Message-queue topics the stages consume.
pub mod topics {
    /// One message per build: create the provider's build.
    pub const TRIGGER: &str = "trigger";
    /// One partition per build: the poll loop.
    pub const SIGNAL: &str = "signal";
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
    gitlab_webhooks: GitlabWebhooks,
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
    #[error(transparent)]
    Runner(#[from] RunnerError),
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
        let queues = build_queue_runtimes(&config, wrap)?;
        let buildkite_webhooks = BuildkiteWebhooks::from_config(&config, |k| std::env::var(k).ok());
        let github_webhooks = GithubWebhooks::from_config(&config, |k| std::env::var(k).ok());
        let gitlab_webhooks = GitlabWebhooks::from_config(&config, |k| std::env::var(k).ok());
        let feed = EventFeed::start(store.clone(), events.subscribe()).await?;
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
                gitlab_webhooks,
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

    /// The configured GitLab webhook secrets.
    pub fn gitlab_webhooks(&self) -> &GitlabWebhooks {
        &self.inner.gitlab_webhooks
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
