//! The public handles: [`Store`] (pool + convenience methods) and
//! [`StoreTx`] (one write transaction shared with other crates' statements).

use std::marker::PhantomData;
use std::path::Path;

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqlitePool};
use stitch_core::{BuildId, BuildStatus};

use crate::error::{Result, StoreError};
use crate::group_commit::GroupCommitter;
use crate::logic;
use crate::model::{
    Build, BuildFilter, CancelOutcome, CreateOutcome, Cursor, Event, EventKind, Metadata, NewBuild,
    StoredLogLine,
};
use crate::ops::Ops;
use crate::sqlite::{self, SqliteOps};

/// Handle to the build store. Cheap to clone (it is a connection pool).
#[derive(Debug, Clone)]
pub struct Store {
    backend: Backend,
    /// Shared with the message queue on the same database: one writer at a
    /// time inside the process instead of SQLite busy-handler sleeps.
    writer: Option<std::sync::Arc<tokio::sync::Mutex<()>>>,
    /// Started on the first group-committed write, so it sees the writer
    /// lock set by [`Store::with_writer_lock`].
    committer: std::sync::Arc<std::sync::OnceLock<GroupCommitter>>,
}

/// The database behind a [`Store`]. PostgreSQL and MySQL become variants here;
/// callers of [`Store`] do not change.
#[derive(Debug, Clone)]
enum Backend {
    Sqlite(SqlitePool),
}

/// Runs `$body` with `$ops` bound to the backend's [`Ops`] on `$conn`.
/// On SQLite the whole body runs synchronously on the raw handle, in one
/// hand-off to the connection (ADR 0002).
macro_rules! on_conn {
    ($conn:expr, |$ops:ident| $body:expr) => {
        sqlite::on_handle($conn, |raw| {
            #[allow(unused_mut)]
            let mut $ops = SqliteOps::new(raw);
            sqlite::complete(async { $body })
        })
        .await
    };
}

/// Runs `$body` with `$ops` bound to the backend's [`Ops`] on a pooled connection.
macro_rules! with_read_ops {
    ($store:expr, |$ops:ident| $body:expr) => {
        match &$store.backend {
            Backend::Sqlite(pool) => {
                let mut conn = pool.acquire().await?;
                on_conn!(&mut conn, |$ops| $body)
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

    /// Uses an existing pool (the one the message queue also uses) and applies
    /// the store's migrations to it. The pool should have been built from
    /// [`Store::sqlite_connect_options`] so the pragmas match.
    pub async fn from_pool(pool: SqlitePool) -> Result<Store> {
        sqlite::migrate(&pool).await?;
        Ok(Store {
            backend: Backend::Sqlite(pool),
            writer: None,
            committer: Default::default(),
        })
    }

    /// The connection settings [`Store::open`] uses, for building a pool that
    /// the store and the message queue then share.
    pub fn sqlite_connect_options(path: &Path) -> SqliteConnectOptions {
        sqlite::connect_options(path)
    }

    /// The underlying pool, to share with the message queue.
    pub fn pool(&self) -> &SqlitePool {
        match &self.backend {
            Backend::Sqlite(pool) => pool,
        }
    }

    /// Closes the pool, waiting for checked-out connections to come back.
    pub async fn close(&self) {
        match &self.backend {
            Backend::Sqlite(pool) => pool.close().await,
        }
    }

    /// Starts a write transaction. It takes the database write lock at once
    /// (`BEGIN IMMEDIATE`), waiting up to the busy timeout for other writers,
    /// so it never fails later on a lock upgrade. Dropping it uncommitted
    /// rolls back.
    pub async fn begin(&self) -> Result<StoreTx<'_>> {
        let guard = match &self.writer {
            Some(lock) => Some(lock.clone().lock_owned().await),
            None => None,
        };
        let inner = match &self.backend {
            Backend::Sqlite(pool) => TxInner::Sqlite(sqlite::SqliteWriteTx::begin(pool).await?),
        };
        Ok(StoreTx {
            inner,
            _writer: guard,
            _store: PhantomData,
        })
    }

    /// Makes write transactions take `lock` first. Give it the message
    /// queue's writer lock when both share a database (`SqliteDriver::writer_lock`),
    /// so the two never wait on each other inside SQLite.
    pub fn with_writer_lock(mut self, lock: std::sync::Arc<tokio::sync::Mutex<()>>) -> Self {
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
    /// `write` runs synchronously on the committer task and must be short:
    /// the statements of one build change, not a scan. A write that was
    /// submitted still commits if the caller stops waiting for it.
    pub async fn write<F, T, E>(&self, write: F) -> std::result::Result<T, E>
    where
        F: FnOnce(&mut StoreWrite<'_>) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let committer = match &self.backend {
            Backend::Sqlite(pool) => self
                .committer
                .get_or_init(|| GroupCommitter::start(pool.clone(), self.writer.clone())),
        };
        committer.submit(write).await
    }

    /// Creates a build (status `accepted`, plus its first event), or returns
    /// the build that already holds `(queue, idempotency_key)`.
    /// See [`StoreTx::create_build`].
    pub async fn create_build(&self, new: NewBuild) -> Result<CreateOutcome> {
        self.write(move |w| w.create_build(new)).await
    }

    /// Loads a build; [`StoreError::NotFound`] when there is none.
    pub async fn get_build(&self, id: &BuildId) -> Result<Build> {
        with_read_ops!(self, |ops| logic::get_build(&mut ops, id).await)
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
    ) -> Result<Option<Event>> {
        let (id, patch) = (id.clone(), runner_metadata_patch.clone());
        let reason = reason.map(str::to_owned);
        self.write(move |w| {
            w.record_status(&id, expected_from, new_status, &patch, reason.as_deref())
        })
        .await
    }

    /// Records the provider's identity of a build. See [`StoreTx::set_runner_ref`].
    pub async fn set_runner_ref(
        &self,
        id: &BuildId,
        runner_ref: &serde_json::Value,
    ) -> Result<Build> {
        let (id, runner_ref) = (id.clone(), runner_ref.clone());
        self.write(move |w| w.set_runner_ref(&id, &runner_ref))
            .await
    }

    /// Records the hash of a build's job token. See [`StoreTx::set_job_token_hash`].
    pub async fn set_job_token_hash(&self, id: &BuildId, hash: Option<&str>) -> Result<Build> {
        let (id, hash) = (id.clone(), hash.map(str::to_owned));
        self.write(move |w| w.set_job_token_hash(&id, hash.as_deref()))
            .await
    }

    /// Records a cancel request. See [`StoreTx::request_cancel`].
    pub async fn request_cancel(&self, id: &BuildId) -> Result<CancelOutcome> {
        let id = id.clone();
        self.write(move |w| w.request_cancel(&id)).await
    }

    /// Records a promised failure. See [`StoreTx::record_failing`].
    pub async fn record_failing(&self, id: &BuildId, metadata: &Metadata) -> Result<Option<Event>> {
        let (id, metadata) = (id.clone(), metadata.clone());
        self.write(move |w| w.record_failing(&id, &metadata)).await
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
        self.write(move |w| sqlite::complete(w.ops.ensure_secret(&name, &candidate)))
            .await
    }

    /// Every build that is not terminal, oldest first: what a restarting
    /// server must make sure is being watched.
    pub async fn builds_not_terminal(&self) -> Result<Vec<Build>> {
        with_read_ops!(self, |ops| ops.builds_not_terminal().await)
    }

    /// Up to `limit` events with `seq > after`, in seq order. Because seqs are
    /// allocated under the write lock and committed in order, a reader that
    /// resumes from the last seq it saw never skips an event.
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
        let id = id.clone();
        self.write(move |w| w.append_json_log_lines(&id, &lines))
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
/// Every store write is available here, and [`StoreTx::conn`] exposes the
/// connection so another crate (the message queue) can run its own statements
/// in the same transaction: "record the change + publish the message" commits
/// or rolls back as one. Dropping the transaction without
/// [`StoreTx::commit`] rolls it back.
#[derive(Debug)]
pub struct StoreTx<'s> {
    // Dropped before the writer guard below: the transaction ends first.
    inner: TxInner,
    _writer: Option<tokio::sync::OwnedMutexGuard<()>>,
    // Ties the transaction to its store so it cannot outlive the handle.
    _store: PhantomData<&'s Store>,
}

#[derive(Debug)]
enum TxInner {
    Sqlite(sqlite::SqliteWriteTx),
}

impl StoreTx<'_> {
    /// The transaction's connection, for statements of other crates that must
    /// commit or roll back together with the store's writes.
    pub fn conn(&mut self) -> &mut SqliteConnection {
        match &mut self.inner {
            TxInner::Sqlite(tx) => tx.conn(),
        }
    }

    /// The transaction's raw SQLite connection, for another crate's
    /// statements that run synchronously in this transaction (the message
    /// queue's `publish_on_handle`): no hand-off to sqlx's worker thread.
    pub fn sqlite_handle(&self) -> &rusqlite::Connection {
        match &self.inner {
            TxInner::Sqlite(tx) => tx.handle(),
        }
    }

    /// Commits every write made through this transaction.
    pub async fn commit(self) -> Result<()> {
        match self.inner {
            TxInner::Sqlite(tx) => tx.commit(),
        }
    }

    /// Rolls back every write made through this transaction.
    pub async fn rollback(self) -> Result<()> {
        match self.inner {
            TxInner::Sqlite(tx) => tx.rollback(),
        }
    }

    /// Creates a build in status `accepted` and appends its first `status`
    /// event. When `(queue, idempotency_key)` is already taken — or the same
    /// id was already created for the same queue and key — returns
    /// [`CreateOutcome::Existing`] and writes nothing. An id taken by a
    /// different request is [`crate::Conflict::DuplicateId`]; an empty queue,
    /// runner or key is [`StoreError::InvalidInput`].
    pub async fn create_build(&mut self, new: NewBuild) -> Result<CreateOutcome> {
        self.write_ops().create_build(new)
    }

    /// Creates several builds in this transaction, in order (group commit:
    /// one transaction for many concurrent create requests). Each request gets
    /// its own answer as [`StoreTx::create_build`] would give it; a request
    /// refused for its input writes nothing and does not affect the others.
    /// An error that leaves the transaction unusable (a database error) is
    /// returned for the whole call: roll back, then retry the requests one
    /// at a time if their individual answers matter.
    pub async fn create_builds(
        &mut self,
        news: Vec<NewBuild>,
    ) -> Result<Vec<Result<CreateOutcome>>> {
        let mut w = self.write_ops();
        let mut out = Vec::with_capacity(news.len());
        for new in news {
            match w.create_build(new) {
                Err(e) if !e.is_request_refusal() => return Err(e),
                answer => out.push(answer),
            }
        }
        Ok(out)
    }

    /// Loads a build inside this transaction (sees its uncommitted writes).
    pub async fn get_build(&mut self, id: &BuildId) -> Result<Build> {
        self.write_ops().get_build(id)
    }

    /// Records a status report: merges `runner_metadata_patch` into the runner
    /// metadata, stores `reason` as the failure reason (and as runner metadata
    /// `error` unless the patch sets `error`), sets `started_at` on the first
    /// `running` and `finished_at` on a terminal status, and appends a
    /// `status` event in the same transaction.
    ///
    /// Returns `None` and writes nothing when status, metadata and reason are
    /// unchanged. Errors: [`StoreError::NotFound`];
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
    ) -> Result<Option<Event>> {
        self.write_ops()
            .record_status(id, expected_from, new_status, runner_metadata_patch, reason)
    }

    /// Records the provider's identity of the build (also on terminal builds:
    /// it is a cache). Setting the same value again writes nothing.
    pub async fn set_runner_ref(
        &mut self,
        id: &BuildId,
        runner_ref: &serde_json::Value,
    ) -> Result<Build> {
        self.write_ops().set_runner_ref(id, runner_ref)
    }

    /// Sets or clears the hash of the build-scoped job token.
    pub async fn set_job_token_hash(&mut self, id: &BuildId, hash: Option<&str>) -> Result<Build> {
        self.write_ops().set_job_token_hash(id, hash)
    }

    /// Records that cancellation was requested. Idempotent:
    /// `newly_requested` is false when it already was, or when the build is
    /// terminal (nothing left to cancel; nothing is written then).
    pub async fn request_cancel(&mut self, id: &BuildId) -> Result<CancelOutcome> {
        self.write_ops().request_cancel(id)
    }

    /// Records a promised failure: merges `metadata` (e.g.
    /// `promised_exit_status`) into the runner metadata and appends a
    /// `failing` event. `None` when the same promise was already recorded.
    /// [`StoreError::InvalidTransition`] on a terminal build.
    pub async fn record_failing(
        &mut self,
        id: &BuildId,
        metadata: &Metadata,
    ) -> Result<Option<Event>> {
        self.write_ops().record_failing(id, metadata)
    }

    /// Appends an event snapshotting the build's current status and metadata
    /// without changing the build (the status-changing methods append their
    /// own events; this is for callers that need to re-announce a state).
    pub async fn append_event(&mut self, id: &BuildId, kind: EventKind) -> Result<Event> {
        self.write_ops().append_event(id, kind)
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
        self.write_ops().append_log_lines(id, lines)
    }

    /// The store's operations on this transaction's connection; they are
    /// synchronous on SQLite, so the async methods above only forward.
    fn write_ops(&self) -> StoreWrite<'_> {
        match &self.inner {
            TxInner::Sqlite(tx) => StoreWrite::new(tx.handle()),
        }
    }
}

fn serialize_lines<T: Serialize>(lines: &[T]) -> Result<Vec<String>> {
    lines
        .iter()
        .map(|line| {
            serde_json::to_string(line)
                .map_err(|e| StoreError::InvalidInput(format!("log line is not serializable: {e}")))
        })
        .collect()
}

/// The store's writes inside a group-committed transaction
/// ([`Store::write`]); the same operations as [`StoreTx`], synchronous.
pub struct StoreWrite<'c> {
    ops: SqliteOps<'c>,
}

impl std::fmt::Debug for StoreWrite<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreWrite").finish_non_exhaustive()
    }
}

impl<'c> StoreWrite<'c> {
    pub(crate) fn new(conn: &'c rusqlite::Connection) -> Self {
        Self {
            ops: SqliteOps::new(conn),
        }
    }

    /// The raw SQLite connection of the shared transaction, for another
    /// crate's statements (the message queue's `publish_on_handle`).
    pub fn sqlite_handle(&self) -> &'c rusqlite::Connection {
        self.ops.conn()
    }

    /// See [`StoreTx::create_build`].
    pub fn create_build(&mut self, new: NewBuild) -> Result<CreateOutcome> {
        sqlite::complete(logic::create_build(&mut self.ops, new))
    }

    /// See [`StoreTx::get_build`].
    pub fn get_build(&mut self, id: &BuildId) -> Result<Build> {
        sqlite::complete(logic::get_build(&mut self.ops, id))
    }

    /// See [`StoreTx::record_status`].
    pub fn record_status(
        &mut self,
        id: &BuildId,
        expected_from: Option<BuildStatus>,
        new_status: BuildStatus,
        runner_metadata_patch: &Metadata,
        reason: Option<&str>,
    ) -> Result<Option<Event>> {
        sqlite::complete(logic::record_status(
            &mut self.ops,
            id,
            expected_from,
            new_status,
            runner_metadata_patch,
            reason,
        ))
    }

    /// See [`StoreTx::set_runner_ref`].
    pub fn set_runner_ref(
        &mut self,
        id: &BuildId,
        runner_ref: &serde_json::Value,
    ) -> Result<Build> {
        sqlite::complete(logic::set_runner_ref(&mut self.ops, id, runner_ref))
    }

    /// See [`StoreTx::set_job_token_hash`].
    pub fn set_job_token_hash(&mut self, id: &BuildId, hash: Option<&str>) -> Result<Build> {
        sqlite::complete(logic::set_job_token_hash(&mut self.ops, id, hash))
    }

    /// See [`StoreTx::request_cancel`].
    pub fn request_cancel(&mut self, id: &BuildId) -> Result<CancelOutcome> {
        sqlite::complete(logic::request_cancel(&mut self.ops, id))
    }

    /// See [`StoreTx::record_failing`].
    pub fn record_failing(&mut self, id: &BuildId, metadata: &Metadata) -> Result<Option<Event>> {
        sqlite::complete(logic::record_failing(&mut self.ops, id, metadata))
    }

    /// See [`StoreTx::append_event`].
    pub fn append_event(&mut self, id: &BuildId, kind: EventKind) -> Result<Event> {
        sqlite::complete(logic::append_event(&mut self.ops, id, kind))
    }

    /// See [`StoreTx::append_log_lines`].
    pub fn append_log_lines<T: Serialize>(&mut self, id: &BuildId, lines: &[T]) -> Result<u64> {
        let lines = serialize_lines(lines)?;
        self.append_json_log_lines(id, &lines)
    }

    fn append_json_log_lines(&mut self, id: &BuildId, lines: &[String]) -> Result<u64> {
        sqlite::complete(logic::append_log_lines(&mut self.ops, id, lines))
    }
}
