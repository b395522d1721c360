//! Group commit of store writes: write jobs from concurrent callers run one
//! after another inside one shared transaction, each in its own savepoint,
//! and all of them are answered after that transaction commits.
//!
//! Every transaction pays for `BEGIN`, the event counter (SQLite's write
//! lock; on PostgreSQL/MySQL a sequencing pass after the commit, ADR 0020)
//! and a commit; sharing them pays those once per batch. A job's failure rolls back its savepoint only, so it is reported
//! to its caller alone.
//!
//! Jobs are synchronous closures over [`StoreWrite`]. On SQLite the
//! committer is a task and the statements run on the raw handle without
//! awaiting (ADR 0006). On PostgreSQL/MySQL there are four committers taking
//! turns at one queue, each an OS thread with its own current-thread runtime
//! and its own connection: `StoreWrite` drives each async operation there
//! with `block_on`, which is never nested because jobs run on that thread
//! outside any runtime (ADR 0009).

use std::sync::Arc;

use sqlx::mysql::{MySqlConnectOptions, MySqlConnection};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Executor};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};

use crate::announce::{Announcer, Committed};
use crate::error::{Result, StoreError};
use crate::mysql;
use crate::sequencer::Sequencer;
use crate::sqlite::SqliteWriteTx;
use crate::write::StoreWrite;
use sqlx::sqlite::SqlitePool;
use stitch_mq::postgres::{PostgresDriver, PublishSession};

/// Most jobs in one transaction: enough to absorb a burst, few enough that
/// one transaction holds the writer for milliseconds, not seconds.
const MAX_BATCH: usize = 512;

/// Jobs waiting for the committer before callers wait to submit.
const QUEUE_DEPTH: usize = 8192;

/// Committer threads (each with its own connection) per PostgreSQL/MySQL
/// store. With one, a write that arrives while a batch runs waits for that
/// batch and then for its own; with several, an idle committer takes it at
/// once. Batches of one process then run side by side exactly as those of
/// two processes already do (ADR 0016: they serialize only on the event
/// counter at their end, and lock build rows in one global order). Four,
/// measured (docs/benchmarks.md, "several committers per node"): two nodes
/// at 100 builds/s answered creates p50 63–167 ms with one, 40–49 with
/// two, 29–38 with four. SQLite has one writer, so one committer.
const SERVER_COMMITTERS: usize = 4;

/// One caller's write, type-erased so jobs of any result type share a batch.
trait Job: Send {
    /// The build the write is about, if it is about one: a PostgreSQL/MySQL
    /// batch runs its jobs in this order, so two processes' batches lock
    /// build rows in the same order and cannot deadlock on them.
    fn build_key(&self) -> Option<&str>;

    /// Runs the write inside the shared transaction; false when it failed
    /// (its savepoint is then rolled back).
    fn run(&mut self, w: &mut StoreWrite<'_>) -> bool;

    /// Answers the caller once the batch's fate is known: its own result if
    /// the transaction committed, `failure` otherwise.
    fn finish(self: Box<Self>, failure: Option<&BatchFailure>);
}

/// Why a whole batch did not commit.
#[derive(Debug, Clone)]
struct BatchFailure {
    message: String,
    retryable: bool,
}

impl BatchFailure {
    fn from_error(e: &StoreError) -> Self {
        Self {
            message: e.to_string(),
            retryable: e.is_retryable(),
        }
    }

    fn to_error(&self) -> StoreError {
        StoreError::GroupCommit {
            message: self.message.clone(),
            retryable: self.retryable,
        }
    }
}

struct TypedJob<F, T, E> {
    build_key: Option<String>,
    write: Option<F>,
    result: Option<std::result::Result<T, E>>,
    reply: oneshot::Sender<std::result::Result<T, E>>,
}

impl<F, T, E> Job for TypedJob<F, T, E>
where
    F: FnOnce(&mut StoreWrite<'_>) -> std::result::Result<T, E> + Send,
    T: Send,
    E: From<StoreError> + Send,
{
    fn build_key(&self) -> Option<&str> {
        self.build_key.as_deref()
    }

    fn run(&mut self, w: &mut StoreWrite<'_>) -> bool {
        let Some(write) = self.write.take() else {
            return false;
        };
        // A panicking job must not take the committer (and every later
        // write) down with it: it fails alone, and its savepoint rolls back.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write(w)))
            .unwrap_or_else(|_| Err(StoreError::Internal("a write job panicked".into()).into()));
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn finish(self: Box<Self>, failure: Option<&BatchFailure>) {
        let answer = match (failure, self.result) {
            (None, Some(result)) => result,
            (Some(failure), _) => Err(failure.to_error().into()),
            (None, None) => Err(StoreError::Internal("a write job never ran".into()).into()),
        };
        // A caller that went away does not undo its committed write.
        let _ = self.reply.send(answer);
    }
}

/// Handle to the committer task. The task ends when the last handle drops.
#[derive(Debug)]
pub(crate) struct GroupCommitter {
    jobs: mpsc::Sender<Box<dyn Job>>,
}

impl GroupCommitter {
    /// Starts a SQLite committer on the current tokio runtime. `writer` is
    /// the in-process writer lock shared with the message queue, if any.
    pub(crate) fn start_sqlite(
        pool: SqlitePool,
        writer: Option<Arc<tokio::sync::Mutex<()>>>,
        announcer: Announcer,
    ) -> Self {
        let (jobs, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(run(rx, pool, writer, announcer));
        Self { jobs }
    }

    /// Starts [`SERVER_COMMITTERS`] PostgreSQL/MySQL committers, each on
    /// its own thread with its own runtime and connection to `server`,
    /// taking batches from one queue. The threads end when the last handle
    /// drops.
    /// A batch that appended events is answered once `sequencer` has
    /// numbered them (ADR 0020).
    pub(crate) fn start_server(
        server: ServerTarget,
        announcer: Announcer,
        sequencer: Option<Sequencer>,
    ) -> Result<Self> {
        let (jobs, rx) = mpsc::channel(QUEUE_DEPTH);
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for n in 0..SERVER_COMMITTERS {
            let (rx, server, announcer) = (rx.clone(), server.clone(), announcer.clone());
            let sequencer = sequencer.clone();
            std::thread::Builder::new()
                .name(format!("stitch-store-committer-{n}"))
                .spawn(move || run_server(&rx, &server, &announcer, sequencer.as_ref()))
                .map_err(|e| {
                    StoreError::Internal(format!("cannot start the store's write committer: {e}"))
                })?;
        }
        Ok(Self { jobs })
    }

    /// Runs `write` in the next shared transaction and returns its result
    /// once that transaction has committed. A write submitted before its
    /// caller went away still commits. `build_key` orders the write within
    /// its batch (see [`Job::build_key`]).
    pub(crate) async fn submit<F, T, E>(
        &self,
        build_key: Option<String>,
        write: F,
    ) -> std::result::Result<T, E>
    where
        F: FnOnce(&mut StoreWrite<'_>) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(TypedJob {
            build_key,
            write: Some(write),
            result: None,
            reply,
        });
        let stopped = || StoreError::Internal("the store's write committer has stopped".into());
        self.jobs.send(job).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| E::from(stopped()))?
    }
}

async fn run(
    mut rx: mpsc::Receiver<Box<dyn Job>>,
    pool: SqlitePool,
    writer: Option<Arc<tokio::sync::Mutex<()>>>,
    announcer: Announcer,
) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let guard = match &writer {
            Some(lock) => Some(lock.clone().lock_owned().await),
            None => None,
        };
        let failure = match commit_batch(&pool, &mut batch).await {
            Ok(committed) => {
                announcer.announce(&committed);
                None
            }
            Err(failure) => Some(failure),
        };
        drop(guard);
        metrics_batch(batch.len());
        for job in batch.drain(..) {
            job.finish(failure.as_ref());
        }
    }
}

/// Runs every job of `batch` in one transaction and commits it.
/// Returns what the committed jobs announce.
async fn commit_batch(
    pool: &SqlitePool,
    batch: &mut [Box<dyn Job>],
) -> std::result::Result<Committed, BatchFailure> {
    let tx = SqliteWriteTx::begin(pool)
        .await
        .map_err(|e| BatchFailure::from_error(&e))?;
    let committed = run_jobs(&tx, batch).map_err(|e| BatchFailure::from_error(&e))?;
    tx.commit().map_err(|e| BatchFailure::from_error(&e))?;
    Ok(committed)
}

fn run_jobs(tx: &SqliteWriteTx, batch: &mut [Box<dyn Job>]) -> Result<Committed> {
    let conn = tx.handle();
    let mut w = StoreWrite::sqlite(conn);
    let mut committed = Committed::default();
    let mut events = Vec::new();
    for job in batch.iter_mut() {
        conn.execute_batch("SAVEPOINT job")?;
        let ok = job.run(&mut w);
        // A rolled-back job announces nothing and appends nothing.
        let (announced, staged) = w.take_effects();
        if ok {
            conn.execute_batch("RELEASE job")?;
            committed.merge(announced);
            events.extend(staged);
        } else {
            conn.execute_batch("ROLLBACK TO job; RELEASE job")?;
        }
    }
    w.append_events(events)?;
    Ok(committed)
}

/// Where a PostgreSQL/MySQL committer connects to.
#[derive(Debug, Clone)]
pub(crate) enum ServerTarget {
    /// PostgreSQL, with the queue's `NOTIFY` channel for outbox publishes.
    Postgres {
        options: PgConnectOptions,
        channel: Arc<str>,
    },
    /// MySQL / MariaDB.
    MySql { options: MySqlConnectOptions },
}

/// The committer's own connection (PostgreSQL's with its `NOTIFY` channel).
enum ServerConn {
    Postgres(PgConnection, Arc<str>),
    MySql(MySqlConnection),
}

impl ServerTarget {
    async fn connect(&self) -> Result<ServerConn> {
        Ok(match self {
            ServerTarget::Postgres { options, channel } => {
                ServerConn::Postgres(options.connect().await?, channel.clone())
            }
            ServerTarget::MySql { options } => {
                let mut conn = options.connect().await?;
                conn.execute(mysql::READ_COMMITTED).await?;
                ServerConn::MySql(conn)
            }
        })
    }
}

impl ServerConn {
    async fn execute(&mut self, sql: &str) -> Result<()> {
        match self {
            ServerConn::Postgres(c, _) => c.execute(sql).await.map(drop)?,
            ServerConn::MySql(c) => c.execute(sql).await.map(drop)?,
        }
        Ok(())
    }

    fn store_write<'c>(
        &'c mut self,
        rt: &'c Runtime,
        session: &'c mut PublishSession,
    ) -> StoreWrite<'c> {
        match self {
            ServerConn::Postgres(c, _) => StoreWrite::postgres(c, rt, session),
            ServerConn::MySql(c) => StoreWrite::mysql(c, rt),
        }
    }

    /// Sends the batch's queue wake-ups (PostgreSQL); due before `COMMIT`.
    async fn finish_publishes(&mut self, session: &mut PublishSession) -> Result<()> {
        if let ServerConn::Postgres(c, channel) = self {
            PostgresDriver::finish_session(c, channel, session).await?;
        }
        Ok(())
    }
}

/// Jobs shared by a store's committer threads.
type SharedJobs = std::sync::Mutex<mpsc::Receiver<Box<dyn Job>>>;

/// One PostgreSQL/MySQL committer thread: takes whatever jobs are waiting
/// (up to [`MAX_BATCH`]), runs them in one transaction and answers them.
/// The committers take turns at the queue: the one holding it waits for the
/// next job and leaves with everything waiting behind that job.
fn run_server(
    rx: &SharedJobs,
    server: &ServerTarget,
    announcer: &Announcer,
    sequencer: Option<&Sequencer>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let failure = BatchFailure {
                message: format!("cannot start the store committer's runtime: {e}"),
                retryable: false,
            };
            let mut batch = Vec::new();
            while take_batch(rx, &mut batch) {
                for job in batch.drain(..) {
                    job.finish(Some(&failure));
                }
            }
            return;
        }
    };
    let mut conn: Option<ServerConn> = None;
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(MAX_BATCH);
    while take_batch(rx, &mut batch) {
        let failure = match commit_server_batch(&rt, server, &mut conn, &mut batch) {
            Ok(committed) => match sequencer {
                Some(sequencer) if committed.events => {
                    // Publishes wake the queue now; the jobs are answered,
                    // and the events announced, once the events are in the
                    // log. This thread goes on to the next batch meanwhile.
                    announcer.announce(&Committed {
                        published: committed.published,
                        events: false,
                    });
                    metrics_batch(batch.len());
                    let jobs = std::mem::take(&mut batch);
                    sequencer.after_next_pass(Box::new(move || {
                        for job in jobs {
                            job.finish(None);
                        }
                    }));
                    continue;
                }
                _ => {
                    announcer.announce(&committed);
                    None
                }
            },
            Err(failure) => Some(failure),
        };
        metrics_batch(batch.len());
        for job in batch.drain(..) {
            job.finish(failure.as_ref());
        }
    }
}

/// Fills `batch` with the next job and whatever waits behind it (up to
/// [`MAX_BATCH`]); false once every handle is gone.
fn take_batch(rx: &SharedJobs, batch: &mut Vec<Box<dyn Job>>) -> bool {
    let mut rx = rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(job) = rx.blocking_recv() else {
        return false;
    };
    batch.push(job);
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    true
}

/// Runs `batch` in one transaction on the committer's connection, making
/// one first if needed. A connection whose transaction cannot be ended is
/// dropped, and the next batch connects afresh (a lost connection heals).
fn commit_server_batch(
    rt: &Runtime,
    server: &ServerTarget,
    conn: &mut Option<ServerConn>,
    batch: &mut [Box<dyn Job>],
) -> std::result::Result<Committed, BatchFailure> {
    let connect = || {
        rt.block_on(server.connect())
            .map_err(|e| BatchFailure::from_error(&e))
    };
    let c = match conn {
        Some(c) => c,
        None => conn.insert(connect()?),
    };
    // A connection the server closed since this committer's last batch (a
    // restart, a failover, an idle timeout) fails at `BEGIN`, before any
    // job has run: begin once more on a new connection, so a lost
    // connection costs no write. (With several committers, each would
    // otherwise fail one batch after a restart.)
    let c = match rt.block_on(c.execute(BEGIN)) {
        Ok(()) => c,
        Err(_) => {
            let c = conn.insert(connect()?);
            rt.block_on(c.execute(BEGIN))
                .map_err(|e| BatchFailure::from_error(&e))?;
            c
        }
    };
    let result = run_server_jobs(rt, c, batch);
    if result.is_err() && rt.block_on(c.execute("ROLLBACK")).is_err() {
        *conn = None;
    }
    result.map_err(|e| BatchFailure::from_error(&e))
}

/// A batch's first round trip; the first job's savepoint rides along.
const BEGIN: &str = "BEGIN; SAVEPOINT job";

/// Runs the jobs of a batch whose transaction [`BEGIN`] opened, and
/// commits it.
fn run_server_jobs(
    rt: &Runtime,
    conn: &mut ServerConn,
    batch: &mut [Box<dyn Job>],
) -> Result<Committed> {
    // Jobs of different callers are concurrent, so any order is theirs;
    // build order makes every process lock build rows in one global order.
    batch.sort_by(|a, b| a.build_key().cmp(&b.build_key()));
    // No store-wide lock here: batches of several processes run side by
    // side and serialize only on the event counter at the end (ADR 0016).
    // Savepoint bookkeeping rides with the next statement that has no
    // parameters (`BEGIN`, the previous job's release): one round trip per
    // job fewer, on a path where round trips are most of a batch's time.
    let mut bookkeeping: Option<String> = None;
    let mut session = PublishSession::default();
    let mut committed = Committed::default();
    let mut events = Vec::new();
    for job in batch.iter_mut() {
        if let Some(mut sql) = bookkeeping.take() {
            sql.push_str("; SAVEPOINT job");
            rt.block_on(conn.execute(&sql))?;
        }
        let mut w = conn.store_write(rt, &mut session);
        let ok = job.run(&mut w);
        // A rolled-back job announces nothing and appends nothing.
        let (announced, staged) = w.take_effects();
        if ok {
            bookkeeping = Some(String::from("RELEASE SAVEPOINT job"));
            committed.merge(announced);
            events.extend(staged);
        } else {
            bookkeeping = Some(String::from(
                "ROLLBACK TO SAVEPOINT job; RELEASE SAVEPOINT job",
            ));
            // The rollback releases any topic lock the job took.
            session.forget_locks();
        }
    }
    if let Some(sql) = bookkeeping {
        rt.block_on(conn.execute(&sql))?;
    }
    conn.store_write(rt, &mut session).append_events(events)?;
    rt.block_on(async {
        conn.finish_publishes(&mut session).await?;
        conn.execute("COMMIT").await
    })?;
    Ok(committed)
}

fn metrics_batch(size: usize) {
    metrics::histogram!(stitch_core::metric::STORE_GROUP_COMMIT_JOBS).record(size as f64);
}
