//! [`StoreWrite`]: the store's writes inside a group-committed transaction,
//! run synchronously on the committer's thread.

use serde::Serialize;
use sqlx::mysql::MySqlConnection;
use sqlx::postgres::PgConnection;
use stitch_core::{BuildId, BuildStatus, RunnerRef};
use stitch_mq::mysql::MySqlDriver;
use stitch_mq::postgres::{PostgresDriver, PublishSession};
use stitch_mq::sqlite::SqliteDriver;
use stitch_mq::{BackendKind, Millis, NewMessage, PublishReport};
use tokio::runtime::Runtime;

use crate::announce::Committed;
use crate::error::{wrong_backend, Result};
use crate::logic;
use crate::model::{Build, CancelOutcome, CreateOutcome, Metadata, NewBuild, NewEvent};
use crate::mysql::MySqlOps;
use crate::ops::Ops;
use crate::postgres::PgOps;
use crate::rows::serialize_lines;
use crate::sqlite::{self, SqliteOps};

/// Runs `$body` with `$ops` bound to `&mut` the [`Ops`] of a [`StoreWrite`],
/// to completion on the calling thread: SQLite's never waits; PostgreSQL's
/// and MySQL's are driven by the committer thread's own runtime (this runs
/// on that thread, outside any runtime, so `block_on` is never nested).
macro_rules! on_write {
    ($w:expr, |$ops:ident| $body:expr) => {
        match &mut $w.inner {
            WriteInner::Sqlite($ops) => sqlite::complete(async move { $body }),
            WriteInner::Postgres { ops: $ops, rt, .. } => rt.block_on(async move { $body }),
            WriteInner::MySql { ops: $ops, rt } => rt.block_on(async move { $body }),
        }
    };
}

/// The store's writes inside a group-committed transaction
/// ([`Store::write`]); the same operations as [`StoreTx`], synchronous.
pub struct StoreWrite<'c> {
    inner: WriteInner<'c>,
    /// What this job will announce if its savepoint and the batch commit.
    committed: Committed,
    /// The events this job appends when the batch commits (ADR 0016).
    staged: Vec<NewEvent>,
}

enum WriteInner<'c> {
    Sqlite(SqliteOps<'c>),
    Postgres {
        ops: PgOps<'c>,
        rt: &'c Runtime,
        /// The batch's publishes: topic locks taken once per transaction,
        /// wake-ups sent once before its commit.
        session: &'c mut PublishSession,
    },
    MySql {
        ops: MySqlOps<'c>,
        rt: &'c Runtime,
    },
}

impl std::fmt::Debug for StoreWrite<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreWrite")
            .field("backend", &self.backend())
            .finish_non_exhaustive()
    }
}

impl<'c> StoreWrite<'c> {
    pub(crate) fn sqlite(conn: &'c rusqlite::Connection) -> Self {
        Self {
            inner: WriteInner::Sqlite(SqliteOps::new(conn)),
            committed: Committed::default(),
            staged: Vec::new(),
        }
    }

    pub(crate) fn postgres(
        conn: &'c mut PgConnection,
        rt: &'c Runtime,
        session: &'c mut PublishSession,
    ) -> Self {
        Self {
            inner: WriteInner::Postgres {
                ops: PgOps::new(conn),
                rt,
                session,
            },
            committed: Committed::default(),
            staged: Vec::new(),
        }
    }

    pub(crate) fn mysql(conn: &'c mut MySqlConnection, rt: &'c Runtime) -> Self {
        Self {
            inner: WriteInner::MySql {
                ops: MySqlOps::new(conn),
                rt,
            },
            committed: Committed::default(),
            staged: Vec::new(),
        }
    }

    /// Which database engine the shared transaction runs on.
    pub fn backend(&self) -> BackendKind {
        match &self.inner {
            WriteInner::Sqlite(_) => BackendKind::Sqlite,
            WriteInner::Postgres { .. } => BackendKind::Postgres,
            WriteInner::MySql { .. } => BackendKind::MySql,
        }
    }

    /// The raw SQLite connection of the shared transaction, for another
    /// crate's synchronous statements; [`StoreError::WrongBackend`] on
    /// PostgreSQL/MySQL (use [`StoreWrite::publish`] for queue messages).
    pub fn sqlite_handle(&self) -> Result<&'c rusqlite::Connection> {
        match &self.inner {
            WriteInner::Sqlite(ops) => Ok(ops.conn()),
            _ => Err(wrong_backend("the raw SQLite handle", self.backend())),
        }
    }

    /// Publishes queue messages in the shared transaction (transactional
    /// outbox) on any backend: visible when it commits, gone if this write's
    /// savepoint or the transaction rolls back; the commit announces the
    /// topic (see [`Store::announce_commits_to`]). Validate the messages
    /// with `Publisher::prepare` first.
    pub fn publish(
        &mut self,
        topic: &str,
        msgs: &[NewMessage],
        now: Millis,
    ) -> Result<PublishReport> {
        self.committed.published.insert(topic.to_string());
        Ok(match &mut self.inner {
            WriteInner::Sqlite(ops) => {
                SqliteDriver::publish_on_handle(ops.conn(), topic, msgs, now)?
            }
            WriteInner::Postgres { ops, rt, session } => rt.block_on(
                PostgresDriver::publish_in_session(ops.conn(), session, topic, msgs, now),
            )?,
            WriteInner::MySql { ops, rt } => {
                rt.block_on(MySqlDriver::publish_in_tx(ops.conn(), topic, msgs, now))?
            }
        })
    }

    /// What this write will announce and the events it appends; taken by
    /// the committer after the job.
    pub(crate) fn take_effects(&mut self) -> (Committed, Vec<NewEvent>) {
        let mut committed = std::mem::take(&mut self.committed);
        let staged = std::mem::take(&mut self.staged);
        committed.events |= !staged.is_empty();
        (committed, staged)
    }

    /// Appends the batch's events: the committer's last write before `COMMIT`.
    pub(crate) fn append_events(&mut self, staged: Vec<NewEvent>) -> Result<()> {
        on_write!(self, |ops| logic::append_events(ops, staged).await)
    }

    fn stage(&mut self, event: Option<NewEvent>) -> bool {
        let recorded = event.is_some();
        self.staged.extend(event);
        recorded
    }

    /// See [`StoreTx::create_build`].
    pub fn create_build(&mut self, new: NewBuild) -> Result<CreateOutcome> {
        let (outcome, event) = on_write!(self, |ops| logic::create_build(ops, new).await)?;
        self.stage(event);
        Ok(outcome)
    }

    /// See [`StoreTx::get_build`].
    pub fn get_build(&mut self, id: &BuildId) -> Result<Build> {
        on_write!(self, |ops| logic::get_build(ops, id).await)
    }

    /// See [`StoreTx::record_status`].
    pub fn record_status(
        &mut self,
        id: &BuildId,
        expected_from: Option<BuildStatus>,
        new_status: BuildStatus,
        runner_metadata_patch: &Metadata,
        reason: Option<&str>,
    ) -> Result<bool> {
        let event = on_write!(self, |ops| {
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
        Ok(self.stage(event))
    }

    /// See [`StoreTx::set_runner_ref`].
    pub fn set_runner_ref(&mut self, id: &BuildId, runner_ref: &RunnerRef) -> Result<Build> {
        on_write!(self, |ops| logic::set_runner_ref(ops, id, runner_ref).await)
    }

    /// See [`StoreTx::request_cancel`].
    pub fn request_cancel(&mut self, id: &BuildId) -> Result<CancelOutcome> {
        on_write!(self, |ops| logic::request_cancel(ops, id).await)
    }

    /// See [`StoreTx::record_failing`].
    pub fn record_failing(&mut self, id: &BuildId, metadata: &Metadata) -> Result<bool> {
        let event = on_write!(self, |ops| logic::record_failing(ops, id, metadata).await)?;
        Ok(self.stage(event))
    }

    /// See [`StoreTx::append_log_lines`].
    pub fn append_log_lines<T: Serialize>(&mut self, id: &BuildId, lines: &[T]) -> Result<u64> {
        let lines = serialize_lines(lines)?;
        self.append_json_log_lines(id, &lines)
    }

    pub(crate) fn append_json_log_lines(&mut self, id: &BuildId, lines: &[String]) -> Result<u64> {
        on_write!(self, |ops| logic::append_log_lines(ops, id, lines).await)
    }

    pub(crate) fn ensure_secret(&mut self, name: &str, candidate: &[u8]) -> Result<Vec<u8>> {
        on_write!(self, |ops| ops.ensure_secret(name, candidate).await)
    }
}
