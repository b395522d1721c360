//! Group commit for build creation: create requests that arrive together
//! share one write transaction (one turn at the single SQLite writer, one
//! `BEGIN`/`COMMIT`) instead of queueing for the writer one by one. Each
//! request still gets its own answer, and nothing is acknowledged before the
//! transaction holding it has committed.

use stitch_mq::sqlite::SqliteDriver;
use stitch_mq::{now_millis, NewMessage};
use stitch_store::{CreateOutcome, NewBuild, Store, StoreError};
use tokio::sync::{mpsc, oneshot};

use crate::service::ServiceError;
use crate::state::topics;

/// Most create requests committed in one transaction. Large enough to absorb
/// a burst from many clients, small enough that one transaction holds the
/// writer for a few milliseconds at most.
const MAX_BATCH: usize = 256;

/// Create requests waiting for the committer; beyond this, callers wait to
/// enqueue (back-pressure instead of unbounded memory).
const QUEUE_DEPTH: usize = 4096;

/// What a caller gets back for one request.
pub(crate) type Answer = Result<CreateOutcome, ServiceError>;

/// One create request: the build to insert and its `trigger` message,
/// published in the same transaction only if the build is created.
struct Pending {
    new: NewBuild,
    trigger: Vec<NewMessage>,
    reply: oneshot::Sender<Answer>,
}

/// Handle to the committer task; cheap to share. The task ends when the last
/// handle is dropped.
pub(crate) struct BuildAdmission {
    requests: mpsc::Sender<Pending>,
}

/// Called after a transaction that created builds has committed.
pub(crate) type OnCommit = Box<dyn Fn() + Send + Sync>;

impl BuildAdmission {
    /// Starts the committer on the current tokio runtime.
    pub(crate) fn start(store: Store, on_commit: OnCommit) -> Self {
        let (requests, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(run(rx, store, on_commit));
        Self { requests }
    }

    /// Creates `new` (or finds the build holding its idempotency key) and
    /// publishes `trigger` with it; returns once that is committed.
    pub(crate) async fn create(&self, new: NewBuild, trigger: Vec<NewMessage>) -> Answer {
        let (reply, answer) = oneshot::channel();
        let stopped = || {
            ServiceError::Store(StoreError::Internal(
                "the build admission task has stopped".into(),
            ))
        };
        self.requests
            .send(Pending {
                new,
                trigger,
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn run(mut rx: mpsc::Receiver<Pending>, store: Store, on_commit: OnCommit) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        commit(&store, &on_commit, std::mem::take(&mut batch)).await;
    }
}

/// Commits one batch and answers every request in it. If the shared
/// transaction fails, each request is retried alone so that one request's
/// failure is not reported to the others and each gets its own error.
async fn commit(store: &Store, on_commit: &OnCommit, batch: Vec<Pending>) {
    let news: Vec<NewBuild> = batch.iter().map(|p| p.new.clone()).collect();
    let shared = if batch.len() == 1 {
        None
    } else {
        Some(commit_together(store, news, &batch).await)
    };
    match shared {
        Some(Ok(answers)) => {
            if answers
                .iter()
                .any(|a| matches!(a, Ok(CreateOutcome::Created(_))))
            {
                on_commit();
            }
            for (pending, answer) in batch.into_iter().zip(answers) {
                // A caller that went away still has its build; nobody to tell.
                let _ = pending.reply.send(answer.map_err(ServiceError::from));
            }
        }
        Some(Err(e)) => {
            tracing::warn!(requests = batch.len(), error = %e, "group commit of builds failed; committing them one by one");
            commit_each(store, on_commit, batch).await;
        }
        None => commit_each(store, on_commit, batch).await,
    }
}

async fn commit_each(store: &Store, on_commit: &OnCommit, batch: Vec<Pending>) {
    for pending in batch {
        let answer = commit_one(store, pending.new, &pending.trigger).await;
        if matches!(answer, Ok(CreateOutcome::Created(_))) {
            on_commit();
        }
        let _ = pending.reply.send(answer);
    }
}

async fn commit_together(
    store: &Store,
    news: Vec<NewBuild>,
    batch: &[Pending],
) -> Result<Vec<Result<CreateOutcome, StoreError>>, ServiceError> {
    let mut tx = store.begin().await?;
    let answers = tx.create_builds(news).await?;
    let triggers: Vec<NewMessage> = batch
        .iter()
        .zip(&answers)
        .filter(|(_, a)| matches!(a, Ok(CreateOutcome::Created(_))))
        .flat_map(|(p, _)| p.trigger.iter().cloned())
        .collect();
    if !triggers.is_empty() {
        SqliteDriver::publish_on_handle(
            tx.sqlite_handle(),
            topics::TRIGGER,
            &triggers,
            now_millis(),
        )?;
    }
    tx.commit().await?;
    Ok(answers)
}

async fn commit_one(store: &Store, new: NewBuild, trigger: &[NewMessage]) -> Answer {
    let mut tx = store.begin().await?;
    let outcome = tx.create_build(new).await?;
    if matches!(outcome, CreateOutcome::Created(_)) {
        SqliteDriver::publish_on_handle(
            tx.sqlite_handle(),
            topics::TRIGGER,
            trigger,
            now_millis(),
        )?;
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    Ok(outcome)
}
