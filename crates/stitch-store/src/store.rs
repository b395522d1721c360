//! The public handles: [`Store`] (pool + convenience methods) and
//! [`StoreTx`] (one async write transaction shared with other crates'
//! statements). The synchronous writes of a group-committed job are
//! [`StoreWrite`](crate::write::StoreWrite).

use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use sqlx::mysql::MySqlConnection;
use sqlx::postgres::PgConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqlitePool};
use stitch_core::{BuildId, BuildStatus, RunnerRef};
use stitch_mq::mysql::MySqlDriver;
use stitch_mq::postgres::PostgresDriver;
use stitch_mq::raw_sqlite::RawSqlite;
use stitch_mq::sqlite::SqliteDriver;
use stitch_mq::{BackendKind, Millis, NewMessage, PublishReport};

use crate::announce::{Announcer, CommitListener, Committed};
use crate::error::{wrong_backend, Result, StoreError};
use crate::group_commit::{GroupCommitter, ServerTarget};
use crate::logic;
use crate::model::{
    Build, BuildFilter, CancelOutcome, CreateOutcome, Cursor, Event, FinishedBuild, FinishedHour,
    Metadata, NewBuild, NewEvent, OpenBuildCount, StoredLogLine,
};
use crate::mysql::{self, MySqlOps};
use crate::ops::Ops;
use crate::pool::{self, StorePool};
use crate::postgres::{self, PgOps};
use crate::rows::serialize_lines;
use crate::sequencer::{Sequencer, SequencerPool};
use crate::sqlite::{self, SqliteOps};
use crate::write::StoreWrite;

/// Handle to the build store. Cheap to clone (it is a connection pool).
#[derive(Debug, Clone)]
pub struct Store {
    backend: Backend,
    /// Shared with the message queue on the same SQLite database: one writer
    /// at a time inside the process instead of SQLite busy-handler sleeps.
    /// (PostgreSQL/MySQL writers run side by side and serialize only on the
    /// `event_seq` row, for the commit of their events: ADR 0016.)
    writer: Option<Arc<tokio::sync::Mutex<()>>>,
    /// Started on the first group-committed write, so it sees the writer
    /// lock set by [`Store::with_writer_lock`].
    committer: Arc<tokio::sync::OnceCell<GroupCommitter>>,
    /// Told about every commit that published or appended events.
    announcer: Announcer,
    /// Numbers the events of PostgreSQL/MySQL writers after they commit
    /// (ADR 0020); `None` on SQLite, whose writers number their own.
    sequencer: Option<Sequencer>,
}

/// The database behind a [`Store`].
#[derive(Debug, Clone)]
enum Backend {
    Sqlite(SqlitePool),
    Postgres {
        pool: sqlx::PgPool,
        /// The queue's `NOTIFY` channel in this schema, for outbox publishes.
        channel: Arc<str>,
    },
    MySql(sqlx::MySqlPool),
}

/// Runs `$body` with `$ops` bound to `&mut` the backend's [`Ops`] on a
/// pooled connection. On SQLite the whole body runs synchronously on the raw
/// handle, in one hand-off to the connection (ADR 0002).
macro_rules! with_read_ops {
    ($store:expr, |$ops:ident| $body:expr) => {
        match &$store.backend {
            Backend::Sqlite(pool) => {
                let conn = RawSqlite::acquire::<StoreError>(pool).await?;
                let mut owned = SqliteOps::new(conn.handle());
                let $ops = &mut owned;
                sqlite::complete(async move { $body })
            }
            Backend::Postgres { pool, .. } => {
                let mut conn = pool.acquire().await?;
                let mut owned = PgOps::new(&mut conn);
                let $ops = &mut owned;
                async move { $body }.await
            }
            Backend::MySql(pool) => {
                let mut conn = pool.acquire().await?;
                let mut owned = MySqlOps::new(&mut conn);
                let $ops = &mut owned;
                async move { $body }.await
            }
        }
    };
}

/// Runs `$body` with `$ops` bound to `&mut` the [`Ops`] of a [`StoreTx`]'s
/// transaction: synchronously on SQLite's raw handle, awaited elsewhere.
macro_rules! on_tx {
    ($tx:expr, |$ops:ident| $body:expr) => {
        match &mut $tx.inner {
            TxInner::Sqlite(tx) => {
                let mut owned = SqliteOps::new(tx.handle());
                let $ops = &mut owned;
                sqlite::complete(async move { $body })
            }
            TxInner::Postgres { tx, .. } => {
                let mut owned = PgOps::new(&mut **tx);
                let $ops = &mut owned;
                async move { $body }.await
            }
            TxInner::MySql(tx) => {
                let mut owned = MySqlOps::new(&mut **tx);
                let $ops = &mut owned;
                async move { $body }.await
            }
        }
    };
}

impl Store {
    /// Opens (creating if missing) the SQLite database file at `path` with WAL,
    /// `synchronous = NORMAL`, foreign keys on and a 10 s busy timeout, and
    /// applies the store's migrations.
    pub async fn open(path: &Path) -> Result<Store> {
        let pool = sqlite::open_pool(path).await?;
        Store::from_pool(pool).await
    }

    /// Connects to the database `url` names (`sqlite://PATH`,
    /// `postgres://…`, `mysql://…`; see [`StorePool::connect`]) and applies
    /// the store's migrations.
    pub async fn open_url(url: &str) -> Result<Store> {
        Store::from_pool(StorePool::connect(url).await?).await
    }

    /// Uses an existing pool (the one the message queue also uses) and applies
    /// the store's migrations to it. A SQLite pool should have been built
    /// from [`Store::sqlite_connect_options`] (or the queue's settings) so the
    /// pragmas match; a MySQL pool from `stitch_mq::mysql::pool_options`
    /// (READ COMMITTED).
    pub async fn from_pool(pool: impl Into<StorePool>) -> Result<Store> {
        let pool = pool.into();
        pool::migrate(&pool).await?;
        let announcer = Announcer::default();
        let (backend, sequencer) = match pool {
            StorePool::Sqlite(pool) => (Backend::Sqlite(pool), None),
            StorePool::Postgres(pool) => {
                let sequencer =
                    Sequencer::start(SequencerPool::Postgres(pool.clone()), announcer.clone());
                let backend = Backend::Postgres {
                    channel: postgres::notify_channel(&pool).await?.into(),
                    pool,
                };
                (backend, Some(sequencer))
            }
            StorePool::MySql(pool) => {
                let sequencer =
                    Sequencer::start(SequencerPool::MySql(pool.clone()), announcer.clone());
                (Backend::MySql(pool), Some(sequencer))
            }
        };
        Ok(Store {
            backend,
            writer: None,
            committer: Default::default(),
            announcer,
            sequencer,
        })
    }

    /// The connection settings [`Store::open`] uses, for building a pool that
    /// the store and the message queue then share.
    pub fn sqlite_connect_options(path: &Path) -> SqliteConnectOptions {
        sqlite::connect_options(path)
    }

    /// Which database engine the store is on.
    pub fn backend(&self) -> BackendKind {
        match &self.backend {
            Backend::Sqlite(_) => BackendKind::Sqlite,
            Backend::Postgres { .. } => BackendKind::Postgres,
            Backend::MySql(_) => BackendKind::MySql,
        }
    }

    /// The underlying pool, to share with the message queue.
    pub fn pool(&self) -> StorePool {
        match &self.backend {
            Backend::Sqlite(pool) => StorePool::Sqlite(pool.clone()),
            Backend::Postgres { pool, .. } => StorePool::Postgres(pool.clone()),
            Backend::MySql(pool) => StorePool::MySql(pool.clone()),
        }
    }

    /// The SQLite pool, for components that only run on SQLite;
    /// [`StoreError::WrongBackend`] on another backend.
    pub fn sqlite_pool(&self) -> Result<&SqlitePool> {
        match &self.backend {
            Backend::Sqlite(pool) => Ok(pool),
            _ => Err(wrong_backend("the SQLite pool", self.backend())),
        }
    }

    /// Closes the pool, waiting for checked-out connections to come back.
    pub async fn close(&self) {
        self.pool().close().await
    }

    /// Starts a write transaction. On SQLite it takes the database write lock
    /// at once (`BEGIN IMMEDIATE`), waiting for other writers, so it never
    /// fails later on a lock upgrade. On PostgreSQL/MySQL it locks rows as
    /// it writes them, beside other writers, and its events take their seqs
    /// in [`StoreTx::commit`] (ADR 0016); keep one transaction to one build
    /// where you can, since rows locked in different orders by two
    /// transactions can deadlock (the database then fails one of them with a
    /// retryable error). Dropping it uncommitted rolls back.
    pub async fn begin(&self) -> Result<StoreTx<'_>> {
        let guard = match &self.writer {
            Some(lock) => Some(lock.clone().lock_owned().await),
            None => None,
        };
        let inner = match &self.backend {
            Backend::Sqlite(pool) => TxInner::Sqlite(sqlite::SqliteWriteTx::begin(pool).await?),
            Backend::Postgres { pool, channel } => TxInner::Postgres {
                tx: pool.begin().await?,
                channel: channel.clone(),
            },
            Backend::MySql(pool) => TxInner::MySql(pool.begin().await?),
        };
        Ok(StoreTx {
            inner,
            committed: Committed::default(),
            staged: Vec::new(),
            announcer: self.announcer.clone(),
            sequencer: self.sequencer.clone(),
            _writer: guard,
            _store: PhantomData,
        })
    }

    /// Sends every later commit that published queue messages or appended
    /// events to `listener` (the server wakes the queue's subscribers and
    /// the event streams there). One listener per store and its clones;
    /// false when one was set before.
    pub fn announce_commits_to(&self, listener: Arc<dyn CommitListener>) -> bool {
        self.announcer.set(listener)
    }

    /// Makes write transactions take `lock` first. Give it the message
    /// queue's writer lock when both share a SQLite database
    /// (`SqliteDriver::writer_lock`), so the two never wait on each other
    /// inside SQLite.
    pub fn with_writer_lock(mut self, lock: Arc<tokio::sync::Mutex<()>>) -> Self {
        self.writer = Some(lock);
        self.committer = Default::default();
        self
    }

    /// Runs `write` in a write transaction shared with other callers' writes
    /// (group commit) and returns its result once that transaction has
    /// committed. `write` runs in its own savepoint: if it returns an error,
    /// its changes are rolled back and the error is returned to this caller
    /// only. If the shared transaction fails to commit, every caller in it
    /// gets [`StoreError::GroupCommit`] and nothing of theirs is written.
    ///
    /// `write` runs synchronously on the committer (a task on SQLite, a
    /// thread of its own with its own connection on PostgreSQL/MySQL) and
    /// must be short: the statements of one build change, not a scan. It
    /// must not block on anything but the [`StoreWrite`] it is given. A
    /// write that was submitted still commits if the caller stops waiting.
    /// A write about one build should use [`Store::write_build`].
    pub async fn write<F, T, E>(&self, write: F) -> std::result::Result<T, E>
    where
        F: FnOnce(&mut StoreWrite<'_>) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.submit(None, write).await
    }

    /// [`Store::write`] for a write that touches one build's rows (and its
    /// queue partitions, whose key is the build id) and no other build's. On
    /// PostgreSQL/MySQL a batch runs such writes in build-id order, so the
    /// batches of several processes lock build rows in one order and never
    /// deadlock on them.
    pub async fn write_build<F, T, E>(&self, id: &BuildId, write: F) -> std::result::Result<T, E>
    where
        F: FnOnce(&mut StoreWrite<'_>) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.submit(Some(id.as_str().to_owned()), write).await
    }

    async fn submit<F, T, E>(
        &self,
        build_key: Option<String>,
        write: F,
    ) -> std::result::Result<T, E>
    where
        F: FnOnce(&mut StoreWrite<'_>) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let committer = self
            .committer
            .get_or_try_init(|| async {
                match &self.backend {
                    Backend::Sqlite(pool) => Ok(GroupCommitter::start_sqlite(
                        pool.clone(),
                        self.writer.clone(),
                        self.announcer.clone(),
                    )),
                    Backend::Postgres { pool, channel } => GroupCommitter::start_server(
                        ServerTarget::Postgres {
                            options: postgres::committer_options(pool),
                            channel: channel.clone(),
                        },
                        self.announcer.clone(),
                        self.sequencer.clone(),
                    ),
                    Backend::MySql(pool) => GroupCommitter::start_server(
                        ServerTarget::MySql {
                            options: mysql::committer_options(pool),
                        },
                        self.announcer.clone(),
                        self.sequencer.clone(),
                    ),
                }
            })
            .await
            .map_err(E::from)?;
        committer.submit(build_key, write).await
    }

    /// Creates a build (status `accepted`, plus its first event), or returns
    /// the build that already holds `(queue, idempotency_key)`.
    /// See [`StoreTx::create_build`].
    pub async fn create_build(&self, new: NewBuild) -> Result<CreateOutcome> {
        let id = new.id.clone();
        self.write_build(&id, move |w| w.create_build(new)).await
    }

    /// Loads a build; [`StoreError::NotFound`] when there is none.
    pub async fn get_build(&self, id: &BuildId) -> Result<Build> {
        with_read_ops!(self, |ops| logic::get_build(ops, id).await)
    }

    /// One page of builds, newest first, and the cursor of the next page
    /// (`None` on the last page).
    pub async fn list_builds(
        &self,
        filter: &BuildFilter,
        cursor: Option<&Cursor>,
    ) -> Result<(Vec<Build>, Option<Cursor>)> {
        let limit = filter.effective_limit();
        // One extra row tells whether another page exists without a COUNT.
        let mut builds = with_read_ops!(self, |ops| {
            ops.list_builds(filter, cursor.map(|c| &c.0), limit + 1)
                .await
        })?;
        let more = builds.len() > limit as usize;
        builds.truncate(limit as usize);
        let next = match builds.last() {
            Some(last) if more => Some(Cursor(last.id.clone())),
            _ => None,
        };
        Ok((builds, next))
    }
    /// Records a status report. See [`StoreTx::record_status`].
    pub async fn record_status(
        &self,
        id: &BuildId,
        expected_from: Option<BuildStatus>,
        new_status: BuildStatus,
        runner_metadata_patch: &Metadata,
        reason: Option<&str>,
    ) -> Result<bool> {
        let (key, patch) = (id.clone(), runner_metadata_patch.clone());
        let reason = reason.map(str::to_owned);
        self.write_build(id, move |w| {
            w.record_status(&key, expected_from, new_status, &patch, reason.as_deref())
        })
        .await
    }

    /// Records the provider's identity of a build. See [`StoreTx::set_runner_ref`].
    pub async fn set_runner_ref(&self, id: &BuildId, runner_ref: &RunnerRef) -> Result<Build> {
        let (key, runner_ref) = (id.clone(), runner_ref.clone());
        self.write_build(id, move |w| w.set_runner_ref(&key, &runner_ref))
            .await
    }

    /// Records a cancel request. See [`StoreTx::request_cancel`].
    pub async fn request_cancel(&self, id: &BuildId) -> Result<CancelOutcome> {
        let key = id.clone();
        self.write_build(id, move |w| w.request_cancel(&key)).await
    }

    /// Records a promised failure. See [`StoreTx::record_failing`].
    pub async fn record_failing(&self, id: &BuildId, metadata: &Metadata) -> Result<bool> {
        let (key, metadata) = (id.clone(), metadata.clone());
        self.write_build(id, move |w| w.record_failing(&key, &metadata))
            .await
    }

    /// The server secret `name`: `candidate` is stored when there is none
    /// yet, and whatever is stored is returned, so every process on the
    /// database (and every restart) uses the first secret ever stored.
    /// An empty candidate is [`StoreError::InvalidInput`].
    pub async fn ensure_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>> {
        if candidate.is_empty() || name.is_empty() {
            return Err(StoreError::InvalidInput(
                "a server secret needs a name and at least one byte".into(),
            ));
        }
        let (name, candidate) = (name.to_owned(), candidate.to_vec());
        self.write(move |w| w.ensure_secret(&name, &candidate))
            .await
    }

    /// Every build that is not terminal, oldest first: what a restarting
    /// server must make sure is being watched.
    pub async fn builds_not_terminal(&self) -> Result<Vec<Build>> {
        with_read_ops!(self, |ops| ops.builds_not_terminal().await)
    }

    /// Per queue and non-terminal status (`accepted`, `running`,
    /// `unknown`): how many builds, and when the oldest was created. Queues
    /// and statuses without builds are absent.
    pub async fn open_build_counts(&self) -> Result<Vec<OpenBuildCount>> {
        with_read_ops!(self, |ops| ops.open_build_counts().await)
    }

    /// Up to `limit` builds that finished at or after `since`, in no
    /// particular order (read through the `finished_at` index).
    pub async fn finished_since(
        &self,
        since: chrono::DateTime<chrono::Utc>,
        limit: u32,
    ) -> Result<Vec<FinishedBuild>> {
        let since_ms = since.timestamp_millis();
        with_read_ops!(self, |ops| ops.finished_since(since_ms, limit).await)
    }

    /// The builds that finished at or after `since` (and before `until`,
    /// when given), hour by hour (UTC hours; `since` is meant to be on the
    /// hour), oldest first: per queue and status how many, and the hour's
    /// median run time. Counted by the database: the answer is a few rows
    /// per hour however many builds finished. Hours without builds are
    /// absent. The caller's clock decides the window; the store reads none.
    pub async fn finished_hours(
        &self,
        since: chrono::DateTime<chrono::Utc>,
        until: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<Vec<FinishedHour>> {
        let since_ms = since.timestamp_millis();
        let until_ms = until.map_or(i64::MAX, |u| u.timestamp_millis());
        with_read_ops!(self, |ops| crate::hour_counts::finished_hours(
            ops, since_ms, until_ms
        )
        .await)
    }

    /// Up to `limit` events with `seq > after`, in seq order, each as its
    /// seq and, when its build has finished, that build: what
    /// [`crate::HourlyHistory`] counts the unsettled hours from.
    pub(crate) async fn finished_by_events(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<(u64, Option<FinishedBuild>)>> {
        with_read_ops!(self, |ops| ops.finished_by_events(after, limit).await)
    }

    /// Up to `limit` events with `seq > after`, in seq order. Because seqs are
    /// allocated under a lock held until commit (SQLite's write lock, the
    /// `event_seq` row elsewhere) and committed in order, a reader that
    /// resumes from the last seq it saw never skips an event — also when
    /// several processes write one PostgreSQL/MySQL database.
    pub async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<Event>> {
        with_read_ops!(self, |ops| ops.events_after(after, limit).await)
    }

    /// The highest committed event seq; 0 when there are no events.
    pub async fn latest_seq(&self) -> Result<u64> {
        with_read_ops!(self, |ops| ops.latest_seq().await)
    }

    /// Every event of one build, in seq order; [`StoreError::NotFound`] for an
    /// unknown build.
    pub async fn events_for_build(&self, id: &BuildId) -> Result<Vec<Event>> {
        with_read_ops!(self, |ops| {
            if ops.load_build(id).await?.is_none() {
                return Err(StoreError::NotFound(id.clone()));
            }
            ops.events_for_build(id).await
        })
    }

    /// Appends log lines (each serialized to JSON) and returns the number of
    /// the last line stored. See [`StoreTx::append_log_lines`].
    pub async fn append_log_lines<T: Serialize>(&self, id: &BuildId, lines: &[T]) -> Result<u64> {
        let lines = serialize_lines(lines)?;
        let key = id.clone();
        self.write_build(id, move |w| w.append_json_log_lines(&key, &lines))
            .await
    }

    /// Up to `limit` log lines numbered above `after_line`, in order;
    /// [`StoreError::NotFound`] for an unknown build.
    pub async fn log_lines(
        &self,
        id: &BuildId,
        after_line: u64,
        limit: u32,
    ) -> Result<Vec<StoredLogLine>> {
        with_read_ops!(self, |ops| {
            if ops.log_line_count(id).await?.is_none() {
                return Err(StoreError::NotFound(id.clone()));
            }
            ops.log_lines(id, after_line, limit).await
        })
    }

    /// Whether any log line is stored for the build; [`StoreError::NotFound`]
    /// for an unknown build.
    pub async fn has_logs(&self, id: &BuildId) -> Result<bool> {
        with_read_ops!(self, |ops| match ops.log_line_count(id).await? {
            Some(count) => Ok(count > 0),
            None => Err(StoreError::NotFound(id.clone())),
        })
    }
}

/// One write transaction on the store's database.
///
/// Every store write is available here, and the transaction's connection is
/// open to other crates' statements ([`StoreTx::connection`],
/// [`StoreTx::publish`] for the message queue), so "record the change +
/// publish the message" commits or rolls back as one. Dropping the
/// transaction without [`StoreTx::commit`] rolls it back.
pub struct StoreTx<'s> {
    // Dropped before the writer guard below: the transaction ends first.
    inner: TxInner,
    /// What this transaction will announce when it commits.
    committed: Committed,
    /// The events it appends when it commits (ADR 0016).
    staged: Vec<NewEvent>,
    announcer: Announcer,
    /// Numbers them after the commit on PostgreSQL/MySQL (ADR 0020).
    sequencer: Option<Sequencer>,
    _writer: Option<tokio::sync::OwnedMutexGuard<()>>,
    // Ties the transaction to its store so it cannot outlive the handle.
    _store: PhantomData<&'s Store>,
}

enum TxInner {
    Sqlite(sqlite::SqliteWriteTx),
    Postgres {
        tx: sqlx::Transaction<'static, sqlx::Postgres>,
        channel: Arc<str>,
    },
    MySql(sqlx::Transaction<'static, sqlx::MySql>),
}

impl std::fmt::Debug for StoreTx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreTx")
            .field("backend", &self.backend())
            .finish_non_exhaustive()
    }
}

/// The connection of a [`StoreTx`], for another crate's statements that must
/// commit or roll back with the store's writes.
#[derive(Debug)]
pub enum TxConnection<'t> {
    /// SQLite (sqlx's connection; statements are sent to its worker thread).
    Sqlite(&'t mut SqliteConnection),
    /// PostgreSQL.
    Postgres(&'t mut PgConnection),
    /// MySQL / MariaDB.
    MySql(&'t mut MySqlConnection),
}

impl StoreTx<'_> {
    /// Which database engine the transaction runs on.
    pub fn backend(&self) -> BackendKind {
        match &self.inner {
            TxInner::Sqlite(_) => BackendKind::Sqlite,
            TxInner::Postgres { .. } => BackendKind::Postgres,
            TxInner::MySql(_) => BackendKind::MySql,
        }
    }

    /// The transaction's connection, for statements of other crates that must
    /// commit or roll back together with the store's writes.
    pub fn connection(&mut self) -> TxConnection<'_> {
        match &mut self.inner {
            TxInner::Sqlite(tx) => TxConnection::Sqlite(tx.conn()),
            TxInner::Postgres { tx, .. } => TxConnection::Postgres(tx),
            TxInner::MySql(tx) => TxConnection::MySql(tx),
        }
    }

    /// The transaction's raw SQLite connection, for another crate's
    /// statements that run synchronously in this transaction: no hand-off to
    /// sqlx's worker thread. [`StoreError::WrongBackend`] on another backend.
    pub fn sqlite_handle(&self) -> Result<&rusqlite::Connection> {
        match &self.inner {
            TxInner::Sqlite(tx) => Ok(tx.handle()),
            _ => Err(wrong_backend("the raw SQLite handle", self.backend())),
        }
    }

    /// Publishes queue messages in this transaction (transactional outbox):
    /// they become visible when it commits and vanish if it rolls back; the
    /// commit announces the topic (see [`Store::announce_commits_to`]).
    /// Validate the messages with `Publisher::prepare` first.
    pub async fn publish(
        &mut self,
        topic: &str,
        msgs: &[NewMessage],
        now: Millis,
    ) -> Result<PublishReport> {
        self.committed.published.insert(topic.to_string());
        Ok(match &mut self.inner {
            TxInner::Sqlite(tx) => SqliteDriver::publish_on_handle(tx.handle(), topic, msgs, now)?,
            TxInner::Postgres { tx, channel } => {
                PostgresDriver::publish_in_tx(tx, channel, topic, msgs, now).await?
            }
            TxInner::MySql(tx) => MySqlDriver::publish_in_tx(tx, topic, msgs, now).await?,
        })
    }

    /// Deletes the queue messages of `topic` in the partitions `keys` that
    /// every consumer group is done with, in this transaction; returns how
    /// many. Retention uses it for the messages of the builds it deletes
    /// (a build's partition key is its id), so they go with the build.
    pub async fn forget_queue_partitions(&mut self, topic: &str, keys: &[String]) -> Result<u64> {
        Ok(match &mut self.inner {
            TxInner::Sqlite(tx) => {
                SqliteDriver::forget_partitions_on_handle(tx.handle(), topic, keys)?
            }
            TxInner::Postgres { tx, .. } => {
                PostgresDriver::forget_partitions_in_tx(tx, topic, keys).await?
            }
            TxInner::MySql(tx) => MySqlDriver::forget_partitions_in_tx(tx, topic, keys).await?,
        })
    }

    /// Appends the transaction's events, commits every write made through
    /// it, then announces what it published and whether it appended events.
    /// On PostgreSQL/MySQL it returns once its events are numbered (the
    /// sequencing pass after the commit, ADR 0020), so they are readable
    /// when it returns, as on SQLite.
    pub async fn commit(mut self) -> Result<()> {
        let staged = std::mem::take(&mut self.staged);
        let appended = !staged.is_empty();
        self.committed.events |= appended;
        on_tx!(self, |ops| logic::append_events(ops, staged).await)?;
        match self.inner {
            TxInner::Sqlite(tx) => tx.commit()?,
            TxInner::Postgres { tx, .. } => tx.commit().await?,
            TxInner::MySql(tx) => tx.commit().await?,
        }
        match &self.sequencer {
            Some(sequencer) if appended => {
                // Publishes wake the queue now; the pass announces the
                // events once they are in the log.
                self.announcer.announce(&Committed {
                    published: std::mem::take(&mut self.committed.published),
                    events: false,
                });
                sequencer.next_pass().await;
            }
            _ => self.announcer.announce(&self.committed),
        }
        Ok(())
    }

    /// Rolls back every write made through this transaction.
    pub async fn rollback(self) -> Result<()> {
        match self.inner {
            TxInner::Sqlite(tx) => tx.rollback(),
            TxInner::Postgres { tx, .. } => Ok(tx.rollback().await?),
            TxInner::MySql(tx) => Ok(tx.rollback().await?),
        }
    }

    /// Creates a build in status `accepted` and appends its first `status`
    /// event. When `(queue, idempotency_key)` is already taken — or the same
    /// id was already created for the same queue and key — returns
    /// [`CreateOutcome::Existing`] and writes nothing. An id taken by a
    /// different request is [`crate::Conflict::DuplicateId`]; an empty queue,
    /// runner or key is [`StoreError::InvalidInput`].
    pub async fn create_build(&mut self, new: NewBuild) -> Result<CreateOutcome> {
        let (outcome, event) = on_tx!(self, |ops| logic::create_build(ops, new).await)?;
        self.staged.extend(event);
        Ok(outcome)
    }

    /// Loads a build inside this transaction (sees its uncommitted writes).
    pub async fn get_build(&mut self, id: &BuildId) -> Result<Build> {
        on_tx!(self, |ops| logic::get_build(ops, id).await)
    }

    /// Loads a build and locks it until this transaction ends, so nothing
    /// changes it between the caller's checks and its writes (SQLite's write
    /// lock covers that already; PostgreSQL/MySQL lock the row).
    pub async fn lock_build(&mut self, id: &BuildId) -> Result<Build> {
        on_tx!(self, |ops| logic::get_build_for_update(ops, id).await)
    }

    /// Records a status report: merges `runner_metadata_patch` into the runner
    /// metadata, stores `reason` as the failure reason (and as runner metadata
    /// `error` unless the patch sets `error`), sets `started_at` on the first
    /// `running` and `finished_at` on a terminal status, and appends a
    /// `status` event in the same transaction.
    ///
    /// Returns `false` and writes nothing when status, metadata and reason
    /// are unchanged. Errors: [`StoreError::NotFound`];
    /// [`crate::Conflict::UnexpectedStatus`] when `expected_from` is given
    /// and differs; [`StoreError::InvalidTransition`] for any change to a
    /// terminal build.
    pub async fn record_status(
        &mut self,
        id: &BuildId,
        expected_from: Option<BuildStatus>,
        new_status: BuildStatus,
        runner_metadata_patch: &Metadata,
        reason: Option<&str>,
    ) -> Result<bool> {
        let event = on_tx!(self, |ops| {
            logic::record_status(
                ops,
                id,
                expected_from,
                new_status,
                runner_metadata_patch,
                reason,
            )
            .await
        })?;
        let recorded = event.is_some();
        self.staged.extend(event);
        Ok(recorded)
    }

    /// Records the provider's identity of the build (also on terminal builds:
    /// it is a cache). Setting the same value again writes nothing.
    pub async fn set_runner_ref(&mut self, id: &BuildId, runner_ref: &RunnerRef) -> Result<Build> {
        on_tx!(self, |ops| logic::set_runner_ref(ops, id, runner_ref).await)
    }

    /// Records that cancellation was requested. Idempotent:
    /// `newly_requested` is false when it already was, or when the build is
    /// terminal (nothing left to cancel; nothing is written then).
    pub async fn request_cancel(&mut self, id: &BuildId) -> Result<CancelOutcome> {
        on_tx!(self, |ops| logic::request_cancel(ops, id).await)
    }

    /// Records a promised failure: merges `metadata` (e.g.
    /// `promised_exit_status`) into the runner metadata and appends a
    /// `failing` event. `false` when the same promise was already recorded.
    /// [`StoreError::InvalidTransition`] on a terminal build.
    pub async fn record_failing(&mut self, id: &BuildId, metadata: &Metadata) -> Result<bool> {
        let event = on_tx!(self, |ops| logic::record_failing(ops, id, metadata).await)?;
        let recorded = event.is_some();
        self.staged.extend(event);
        Ok(recorded)
    }

    /// Appends log lines, each serialized to JSON, numbering them after the
    /// build's existing lines; returns the number of the last line (the
    /// current count when `lines` is empty). Allowed on terminal builds, whose
    /// output may trail their status.
    pub async fn append_log_lines<T: Serialize>(
        &mut self,
        id: &BuildId,
        lines: &[T],
    ) -> Result<u64> {
        let lines = serialize_lines(lines)?;
        on_tx!(self, |ops| logic::append_log_lines(ops, id, &lines).await)
    }
}
