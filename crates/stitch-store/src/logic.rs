//! The store's rules, written once against [`Ops`] so every backend behaves
//! the same. Each function runs inside the caller's write transaction.

use stitch_core::{BuildId, BuildStatus, RunnerRef};

use crate::error::{Conflict, Result, StoreError};
use crate::model::{
    now, Build, CancelOutcome, CreateOutcome, EventKind, Metadata, NewBuild, NewEvent, ERROR_KEY,
};
use crate::ops::Ops;

/// Creates a build; a new one comes with its first event, which the caller's
/// transaction appends when it commits.
pub(crate) async fn create_build<O: Ops>(
    ops: &mut O,
    new: NewBuild,
) -> Result<(CreateOutcome, Option<NewEvent>)> {
    if new.queue.is_empty() {
        return Err(StoreError::InvalidInput("queue name is empty".into()));
    }
    if new.runner.is_empty() {
        return Err(StoreError::InvalidInput("runner name is empty".into()));
    }
    if new.idempotency_key.as_deref() == Some("") {
        return Err(StoreError::InvalidInput("idempotency key is empty".into()));
    }
    // A key already taken answers with its build; anything else (a replayed
    // id included) is caught by the insert's unique indexes, so a fresh
    // build costs no lookup by id.
    if let Some(key) = new.idempotency_key.as_deref() {
        if let Some(existing) = ops.find_by_idempotency_key(&new.queue, key).await? {
            return Ok((CreateOutcome::Existing(existing), None));
        }
    }

    let at = now();
    let build = Build {
        id: new.id,
        queue: new.queue,
        status: BuildStatus::Accepted,
        base: new.base,
        head: new.head,
        caller_metadata: new.metadata,
        runner_metadata: Metadata::new(),
        runner: new.runner,
        runner_ref: None,
        idempotency_key: new.idempotency_key,
        cancel_requested: false,
        cancel_requested_at: None,
        job_token_hash: new.job_token_hash,
        failure_reason: None,
        created_at: at,
        updated_at: at,
        started_at: None,
        finished_at: None,
        version: 1,
    };
    if !ops.insert_build(&build).await? {
        // The id is taken (a replay of this request, or a clash), or — where
        // writers are not serialised (PostgreSQL/MySQL) — a concurrent create
        // won the key between our check and the insert.
        let key = build.idempotency_key.as_deref();
        return match existing_for(ops, &build.id, &build.queue, key).await? {
            Some(existing) => Ok((CreateOutcome::Existing(existing), None)),
            None => Err(Conflict::DuplicateId(build.id).into()),
        };
    }
    let event = NewEvent::of(&build, EventKind::Status, at);
    Ok((CreateOutcome::Created(build), Some(event)))
}

/// The build a create request resolves to without inserting: the holder of
/// its idempotency key, or the same id created by the same request before.
async fn existing_for<O: Ops>(
    ops: &mut O,
    id: &BuildId,
    queue: &str,
    key: Option<&str>,
) -> Result<Option<Build>> {
    if let Some(key) = key {
        if let Some(existing) = ops.find_by_idempotency_key(queue, key).await? {
            return Ok(Some(existing));
        }
    }
    match ops.load_build(id).await? {
        // A retried insert of the very same request is a replay, not a clash.
        Some(existing) if existing.queue == queue && existing.idempotency_key.as_deref() == key => {
            Ok(Some(existing))
        }
        Some(_) => Err(Conflict::DuplicateId(id.clone()).into()),
        None => Ok(None),
    }
}

pub(crate) async fn get_build<O: Ops>(ops: &mut O, id: &BuildId) -> Result<Build> {
    ops.load_build(id)
        .await?
        .ok_or_else(|| StoreError::NotFound(id.clone()))
}

pub(crate) async fn get_build_for_update<O: Ops>(ops: &mut O, id: &BuildId) -> Result<Build> {
    ops.load_build_for_update(id)
        .await?
        .ok_or_else(|| StoreError::NotFound(id.clone()))
}

/// Writes `next` over `current` (bumping version and `updated_at`).
async fn write<O: Ops>(ops: &mut O, current: &Build, next: &mut Build) -> Result<()> {
    next.version = current.version + 1;
    if !ops.update_build(next, current.version).await? {
        return Err(Conflict::VersionMismatch {
            id: current.id.clone(),
            expected: current.version,
        }
        .into());
    }
    Ok(())
}

pub(crate) async fn record_status<O: Ops>(
    ops: &mut O,
    id: &BuildId,
    expected_from: Option<BuildStatus>,
    new_status: BuildStatus,
    runner_metadata_patch: &Metadata,
    reason: Option<&str>,
) -> Result<Option<NewEvent>> {
    let current = get_build_for_update(ops, id).await?;
    if let Some(expected) = expected_from {
        if current.status != expected {
            return Err(Conflict::UnexpectedStatus {
                id: id.clone(),
                expected,
                actual: current.status,
            }
            .into());
        }
    }

    let mut next = current.clone();
    next.status = new_status;
    next.runner_metadata.extend(
        runner_metadata_patch
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    if let Some(reason) = reason {
        next.failure_reason = Some(reason.to_owned());
        // The record shows failures as `metadata.error`; an explicit runner
        // `error` key says more than our summary, so it wins.
        if !runner_metadata_patch.contains_key(ERROR_KEY) {
            next.runner_metadata
                .insert(ERROR_KEY.to_owned(), reason.to_owned());
        }
    }
    if next.status == current.status
        && next.runner_metadata == current.runner_metadata
        && next.failure_reason == current.failure_reason
    {
        return Ok(None);
    }
    if current.status.is_terminal() {
        let attempted = if new_status == current.status {
            "change its metadata".to_owned()
        } else {
            format!("move it to {new_status}")
        };
        return Err(StoreError::InvalidTransition {
            id: id.clone(),
            from: current.status,
            attempted,
        });
    }

    let at = now();
    next.updated_at = at;
    if new_status == BuildStatus::Running && next.started_at.is_none() {
        next.started_at = Some(at);
    }
    if new_status.is_terminal() {
        next.finished_at = Some(at);
    }
    write(ops, &current, &mut next).await?;
    Ok(Some(NewEvent::of(&next, EventKind::Status, at)))
}

pub(crate) async fn record_failing<O: Ops>(
    ops: &mut O,
    id: &BuildId,
    metadata: &Metadata,
) -> Result<Option<NewEvent>> {
    let current = get_build_for_update(ops, id).await?;
    if current.status.is_terminal() {
        return Err(StoreError::InvalidTransition {
            id: id.clone(),
            from: current.status,
            attempted: "record a promised failure".into(),
        });
    }
    let mut next = current.clone();
    next.runner_metadata
        .extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
    if next.runner_metadata == current.runner_metadata {
        // The same promise again: already recorded and announced.
        return Ok(None);
    }
    let at = now();
    next.updated_at = at;
    write(ops, &current, &mut next).await?;
    Ok(Some(NewEvent::of(&next, EventKind::Failing, at)))
}

pub(crate) async fn set_runner_ref<O: Ops>(
    ops: &mut O,
    id: &BuildId,
    runner_ref: &RunnerRef,
) -> Result<Build> {
    let current = get_build_for_update(ops, id).await?;
    if current.runner_ref.as_ref() == Some(runner_ref) {
        return Ok(current);
    }
    // Allowed on terminal builds too: the ref is a cache of the provider's
    // identity, and knowing it late still helps webhooks and operators.
    let mut next = current.clone();
    next.runner_ref = Some(runner_ref.clone());
    next.updated_at = now();
    write(ops, &current, &mut next).await?;
    Ok(next)
}

pub(crate) async fn request_cancel<O: Ops>(ops: &mut O, id: &BuildId) -> Result<CancelOutcome> {
    let current = get_build_for_update(ops, id).await?;
    if current.cancel_requested || current.status.is_terminal() {
        return Ok(CancelOutcome {
            build: current,
            newly_requested: false,
        });
    }
    let at = now();
    let mut next = current.clone();
    next.cancel_requested = true;
    next.cancel_requested_at = Some(at);
    next.updated_at = at;
    write(ops, &current, &mut next).await?;
    Ok(CancelOutcome {
        build: next,
        newly_requested: true,
    })
}

/// Appends a transaction's events as its last statements before `COMMIT`
/// ([`Ops::append_events`]: numbered now on SQLite, by the sequencing pass
/// after the commit on PostgreSQL/MySQL).
pub(crate) async fn append_events<O: Ops>(ops: &mut O, staged: Vec<NewEvent>) -> Result<()> {
    if staged.is_empty() {
        return Ok(());
    }
    ops.append_events(staged).await
}

pub(crate) async fn append_log_lines<O: Ops>(
    ops: &mut O,
    id: &BuildId,
    lines: &[String],
) -> Result<u64> {
    let count = u64::try_from(lines.len())
        .map_err(|_| StoreError::InvalidInput("too many log lines".into()))?;
    if count == 0 {
        return ops
            .log_line_count(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(id.clone()));
    }
    let last = ops
        .reserve_log_lines(id, count)
        .await?
        .ok_or_else(|| StoreError::NotFound(id.clone()))?;
    let first = last + 1 - count;
    for (line_no, json) in (first..=last).zip(lines) {
        ops.insert_log_line(id, line_no, json).await?;
    }
    Ok(last)
}
