//! The build operations the HTTP API (and tests) call: validate, persist
//! intent and publish in one transaction, wake the stages, return. The
//! stages are the only writers of status transitions (docs/architecture.md).

use serde::{Deserialize, Serialize};
use stitch_core::metadata::keys;
use stitch_core::{BuildId, BuildMetadata, BuildStatus, ChangeSet, ValidationError};
use stitch_job::PromiseFailure;
use stitch_mq::{now_millis, Message, MqError};
use stitch_store::{Build, BuildFilter, CreateOutcome, Cursor, NewBuild, StoreError};

use crate::job_token::JobTokens;
use crate::state::{topics, AppState};

pub use stitch_api::CreateBuild;

/// The payload of `trigger` and `signal` messages.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct BuildMessage {
    pub build_id: BuildId,
    pub queue: String,
}

/// Why a build operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("unknown queue {0:?}")]
    UnknownQueue(String),
    #[error("{0}")]
    Invalid(#[from] ValidationError),
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error("build {0} not found")]
    NotFound(BuildId),
    #[error(
        "idempotency key {key:?} was already used for build {existing} with a different request"
    )]
    IdempotencyConflict { key: String, existing: BuildId },
    /// The job token is not this build's.
    #[error("the job token does not belong to build {0}")]
    WrongJobToken(BuildId),
    /// A different exit status was promised first.
    #[error("exit status {promised} was already promised for build {id}; a build promises one exit status")]
    PromisedDifferently { id: BuildId, promised: String },
    /// The build is terminal: there is nothing left to promise about.
    #[error("build {id} is no longer running (it is {status})")]
    NotRunning { id: BuildId, status: BuildStatus },
    /// The build was not handed to its runner yet, so no job runs for it.
    #[error("build {0} has not started yet")]
    NotStarted(BuildId),
    #[error("store: {0}")]
    Store(StoreError),
    #[error("queue: {0}")]
    Queue(#[from] MqError),
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => ServiceError::NotFound(id),
            StoreError::InvalidInput(m) => ServiceError::BadRequest(m),
            other => ServiceError::Store(other),
        }
    }
}

impl ServiceError {
    /// Stable snake_case code for the HTTP error body.
    pub fn code(&self) -> &'static str {
        match self {
            ServiceError::UnknownQueue(_) => "unknown_queue",
            ServiceError::Invalid(_) | ServiceError::BadRequest(_) => "invalid_request",
            ServiceError::NotFound(_) => "build_not_found",
            ServiceError::IdempotencyConflict { .. } => "idempotency_key_reused",
            ServiceError::WrongJobToken(_) => "forbidden",
            ServiceError::PromisedDifferently { .. } => "different_exit_status_promised",
            ServiceError::NotRunning { .. } => "build_not_running",
            ServiceError::NotStarted(_) => "build_not_started",
            ServiceError::Store(_) | ServiceError::Queue(_) => "internal",
        }
    }
}

/// The message for one step of a build (`trigger` or `signal`): its id is
/// `<build>/<step>` and its partition the build id, so a republish while
/// the step is alive is absorbed and a build's messages stay in order.
pub fn build_message(id: &BuildId, queue: &str, step: &str) -> Message {
    let body = BuildMessage {
        build_id: id.clone(),
        queue: queue.to_string(),
    };
    // A struct of two strings always serializes.
    let payload = serde_json::to_vec(&body).unwrap_or_default();
    Message::new(format!("{id}/{step}"), id.to_string(), payload)
}

/// Creates a build on `queue`: validates, then inserts the build and
/// publishes its `trigger` message in one transaction. Returns the build and
/// whether it was created (false: the idempotency key matched an existing one).
pub async fn create_build(
    state: &AppState,
    queue: &str,
    req: CreateBuild,
) -> Result<(Build, bool), ServiceError> {
    let runtime = state
        .build_queue(queue)
        .ok_or_else(|| ServiceError::UnknownQueue(queue.to_string()))?;
    ChangeSet::new(req.base.clone(), req.head.clone()).validate()?;
    BuildMetadata::from(req.metadata.clone()).validate()?;
    if let Some(key) = &req.idempotency_key {
        // Characters, not bytes: what the message (and the schema) promise.
        if key.is_empty() || key.chars().count() > 256 || key.chars().any(char::is_control) {
            return Err(ServiceError::BadRequest(
                "idempotency_key must be 1-256 printable characters".into(),
            ));
        }
    }
    let (base, head, metadata) = (req.base.clone(), req.head.clone(), req.metadata.clone());
    let id = BuildId::new();
    let msgs = state.queue().publisher().prepare(
        topics::TRIGGER,
        vec![build_message(&id, queue, topics::TRIGGER)],
        None,
    )?;
    let new = NewBuild {
        id: id.clone(),
        queue: queue.to_string(),
        runner: runtime.runner_name.to_string(),
        base: req.base,
        head: req.head,
        metadata: req.metadata,
        idempotency_key: req.idempotency_key,
        // The job token is a function of the build id, so its hash is
        // stored with the insert rather than by a write of its own when the
        // build is triggered.
        job_token_hash: Some(JobTokens::hash(&state.job_tokens().token_for(&id))),
    };
    // Group-committed with other writes (creates arriving together share a
    // transaction); the trigger message is published only with a new build.
    let outcome = state
        .store()
        .write_build(&id, move |w| -> Result<CreateOutcome, ServiceError> {
            let outcome = w.create_build(new)?;
            if let CreateOutcome::Created(_) = &outcome {
                w.publish(topics::TRIGGER, &msgs, now_millis())?;
            }
            Ok(outcome)
        })
        .await?;
    match outcome {
        CreateOutcome::Created(build) => {
            tracing::info!(build_id = %build.id, queue, "build created");
            Ok((build, true))
        }
        CreateOutcome::Existing(build) => {
            // A replay must be the same request; the same key for different
            // changes is a caller bug that would otherwise hide a build.
            if build.base != base || build.head != head || build.caller_metadata != metadata {
                return Err(ServiceError::IdempotencyConflict {
                    key: build.idempotency_key.clone().unwrap_or_default(),
                    existing: build.id,
                });
            }
            Ok((build, false))
        }
    }
}

/// One build.
pub async fn get_build(state: &AppState, id: &BuildId) -> Result<Build, ServiceError> {
    Ok(state.store().get_build(id).await?)
}

/// A page of builds, newest first, and the cursor of the next page.
pub async fn list_builds(
    state: &AppState,
    filter: &BuildFilter,
    cursor: Option<&Cursor>,
) -> Result<(Vec<Build>, Option<Cursor>), ServiceError> {
    Ok(state.store().list_builds(filter, cursor).await?)
}

/// Records the intent to cancel and wakes the build's poll loop; the signal
/// stage issues and confirms the cancel. Cancelling a terminal build changes
/// nothing.
pub async fn cancel_build(state: &AppState, id: &BuildId) -> Result<Build, ServiceError> {
    // One round trip: `request_cancel` reads the build under its lock and
    // leaves a terminal one (or one already cancelling) unchanged.
    let outcome = state.store().request_cancel(id).await?;
    if outcome.build.status.is_terminal() {
        return Ok(outcome.build);
    }
    state
        .queue()
        .admin()
        .wake(topics::SIGNAL, id.as_str())
        .await?;
    Ok(outcome.build)
}

/// What [`promise_failure`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromiseRecorded {
    /// The promise was recorded now (a `failing` event was appended).
    Declared,
    /// The same exit status was already promised: nothing changed.
    AlreadyPromised,
}

/// Records that the job running build `id` will fail with
/// `promise.exit_status`, authenticated by the build's job token.
///
/// In one transaction the record gets `promised_exit_status`,
/// `promised_exit_status_at` and (if given) `promised_exit_status_reason`
/// plus a `failing` event. On a `fail_fast` queue the build's signal
/// partition is then woken: the signal stage, the one writer of status,
/// cancels the provider's build and fails the build ("promised exit status
/// N") at once. The same status again changes nothing; a different one is
/// [`ServiceError::PromisedDifferently`]; a terminal or not yet triggered
/// build is [`ServiceError::NotRunning`] / [`ServiceError::NotStarted`].
pub async fn promise_failure(
    state: &AppState,
    id: &BuildId,
    job_token: &str,
    promise: &PromiseFailure,
) -> Result<PromiseRecorded, ServiceError> {
    let wanted = promise.exit_status.to_string();
    let mut tx = state.store().begin().await?;
    // Locked until commit: the build cannot change between these checks and
    // the writes (two different promises at once: the second sees the first).
    let build = tx.lock_build(id).await?;
    if !state
        .job_tokens()
        .verify(id, job_token, build.job_token_hash.as_deref())
    {
        return Err(ServiceError::WrongJobToken(id.clone()));
    }
    match build.runner_metadata.get(keys::PROMISED_EXIT_STATUS) {
        Some(promised) if *promised == wanted => return Ok(PromiseRecorded::AlreadyPromised),
        Some(promised) => {
            return Err(ServiceError::PromisedDifferently {
                id: id.clone(),
                promised: promised.clone(),
            })
        }
        None => {}
    }
    if build.status.is_terminal() {
        return Err(ServiceError::NotRunning {
            id: id.clone(),
            status: build.status,
        });
    }
    if build.job_token_hash.is_none() {
        return Err(ServiceError::NotStarted(id.clone()));
    }
    let fail_fast = state
        .build_queue(&build.queue)
        .is_some_and(|q| q.config.fail_fast);
    let mut meta = stitch_store::Metadata::new();
    meta.insert(keys::PROMISED_EXIT_STATUS.into(), wanted.clone());
    meta.insert(
        keys::PROMISED_EXIT_STATUS_AT.into(),
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    );
    if let Some(reason) = &promise.reason {
        meta.insert(keys::PROMISED_EXIT_STATUS_REASON.into(), reason.clone());
    }
    tx.record_failing(id, &meta).await?;
    tx.commit().await?;
    if fail_fast {
        // The signal stage fails the build and cancels the provider's build
        // (the local runner kills the process); a poll running right now is
        // followed by another at once.
        state
            .queue()
            .admin()
            .wake(topics::SIGNAL, id.as_str())
            .await?;
    }
    Ok(PromiseRecorded::Declared)
}
