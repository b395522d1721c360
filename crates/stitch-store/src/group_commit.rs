//! Group commit of SQLite writes: write jobs from concurrent callers run one
//! after another inside one shared transaction, each in its own savepoint,
//! and all of them are answered after that transaction commits.
//!
//! SQLite has one writer at a time. Giving every status change its own
//! transaction makes each pay for the writer lock, `BEGIN`, statement
//! preparation and a WAL commit; sharing them pays those once per batch, and
//! statements prepared by one job are reused by the next. A job's failure
//! rolls back its savepoint only, so it is reported to its caller alone.

use std::sync::Arc;

use sqlx::sqlite::SqlitePool;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Result, StoreError};
use crate::sqlite::SqliteWriteTx;
use crate::store::StoreWrite;

/// Most jobs in one transaction: enough to absorb a burst, few enough that
/// one transaction holds the writer for milliseconds, not seconds.
const MAX_BATCH: usize = 512;

/// Jobs waiting for the committer before callers wait to submit.
const QUEUE_DEPTH: usize = 8192;

/// One caller's write, type-erased so jobs of any result type share a batch.
trait Job: Send {
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
    fn run(&mut self, w: &mut StoreWrite<'_>) -> bool {
        let Some(write) = self.write.take() else {
            return false;
        };
        let result = write(w);
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
    /// Starts the committer on the current tokio runtime. `writer` is the
    /// in-process writer lock shared with the message queue, if any.
    pub(crate) fn start(pool: SqlitePool, writer: Option<Arc<tokio::sync::Mutex<()>>>) -> Self {
        let (jobs, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(run(rx, pool, writer));
        Self { jobs }
    }

    /// Runs `write` in the next shared transaction and returns its result
    /// once that transaction has committed. A write submitted before its
    /// caller went away still commits.
    pub(crate) async fn submit<F, T, E>(&self, write: F) -> std::result::Result<T, E>
    where
        F: FnOnce(&mut StoreWrite<'_>) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(TypedJob {
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
) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let guard = match &writer {
            Some(lock) => Some(lock.clone().lock_owned().await),
            None => None,
        };
        let failure = commit_batch(&pool, &mut batch).await.err();
        drop(guard);
        metrics_batch(batch.len());
        for job in batch.drain(..) {
            job.finish(failure.as_ref());
        }
    }
}

/// Runs every job of `batch` in one transaction and commits it.
async fn commit_batch(
    pool: &SqlitePool,
    batch: &mut [Box<dyn Job>],
) -> std::result::Result<(), BatchFailure> {
    let tx = SqliteWriteTx::begin(pool)
        .await
        .map_err(|e| BatchFailure::from_error(&e))?;
    run_jobs(&tx, batch).map_err(|e| BatchFailure::from_error(&e))?;
    tx.commit().map_err(|e| BatchFailure::from_error(&e))
}

fn run_jobs(tx: &SqliteWriteTx, batch: &mut [Box<dyn Job>]) -> Result<()> {
    let conn = tx.handle();
    let mut w = StoreWrite::new(conn);
    for job in batch.iter_mut() {
        conn.execute_batch("SAVEPOINT job")?;
        if job.run(&mut w) {
            conn.execute_batch("RELEASE job")?;
        } else {
            conn.execute_batch("ROLLBACK TO job; RELEASE job")?;
        }
    }
    Ok(())
}

fn metrics_batch(size: usize) {
    metrics::histogram!("stitch_store_group_commit_jobs").record(size as f64);
}
