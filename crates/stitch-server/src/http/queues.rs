//! `GET /v1/queues` (every queue's configuration summary and live counts),
//! `GET /v1/dead-letters` and `POST /v1/dead-letters/{topic}/{id}/replay`.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde::Deserialize;
use stitch_api::{
    DeadLetterList, DeadLetterRecord, ErrorBody, HourBucket, QueueList, QueueSummary, StatusCounts,
};
use stitch_core::{BuildId, BuildStatus};
use stitch_mq::MqError;
use stitch_store::{FinishedHour, HourlyHistory};
use utoipa::IntoParams;

use super::error::ApiError;
use super::extract::{non_empty, ApiQuery};
use super::Ctx;
use crate::config::RunnerSection;
use crate::state::topics;

/// Hours the overview's history covers.
const HISTORY_HOURS: i64 = 24;
/// The topics whose consumers dead-letter messages.
const TOPICS: [&str; 2] = [topics::TRIGGER, topics::SIGNAL];
/// Largest page of dead letters.
const MAX_DEAD_LETTERS: u32 = 1000;

/// How long a `/v1/queues` answer is reused while no event was committed
/// since: its only time-dependent field, the oldest waiting build's age,
/// is then at most this stale.
const QUEUE_LIST_REUSE: TimeDelta = TimeDelta::seconds(1);

/// The last `/v1/queues` answer. Every open overview page refetches the
/// list after events, so after one event all of them ask at once; they
/// wait on this lock while the first computes the answer (counting every
/// open build, and the day's finished ones from what `history` kept), and
/// reuse it.
#[derive(Default)]
pub(crate) struct QueueListCache {
    last: tokio::sync::Mutex<Computed>,
}

#[derive(Default)]
struct Computed {
    answer: Option<QueueList>,
    /// The day's finished builds hour by hour, kept between answers: an
    /// answer reads only the events since the last (the rule is in
    /// [`HourlyHistory`]).
    history: HourlyHistory,
}

/// Every configured queue with its runner kind, concurrency, builds per
/// status and oldest waiting build, and the last 24 hours of finished
/// builds hour by hour.
#[utoipa::path(
    get,
    path = "/v1/queues",
    tag = "queues",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every configured queue, by name", body = QueueList),
        (status = 401, description = "`unauthorized`", body = ErrorBody)
    )
)]
pub(crate) async fn list_queues(State(ctx): State<Ctx>) -> Result<Json<QueueList>, ApiError> {
    // Read first: an event committed while the counts are read is then
    // also after `event_seq`, so a follower misses nothing.
    let event_seq = ctx.state.store().latest_seq().await?;
    let mut last = ctx.queue_list.last.lock().await;
    if let Some(list) = last.answer.as_ref() {
        // An answer computed after this request's `event_seq` was read is
        // as fresh as one this request would compute.
        if list.event_seq >= event_seq && Utc::now() - list.at < QUEUE_LIST_REUSE {
            return Ok(Json(list.clone()));
        }
    }
    let list = queue_list(&ctx, event_seq, &mut last.history).await?;
    last.answer = Some(list.clone());
    Ok(Json(list))
}

/// The finished builds from `first_hour` on, hour by hour, as of
/// `event_seq` or later: from what `history` kept, unless retention may
/// have deleted builds of the window.
async fn finished_hours(
    ctx: &Ctx,
    now: DateTime<Utc>,
    first_hour: DateTime<Utc>,
    event_seq: u64,
    history: &mut HourlyHistory,
) -> Result<Vec<FinishedHour>, ApiError> {
    let store = ctx.state.store();
    // Retention shorter than the window deletes builds a kept count would
    // still show: count every hour each time.
    let pruned_within = ctx
        .state
        .config()
        .retention
        .builds
        .duration()
        .and_then(|d| TimeDelta::from_std(d).ok())
        .is_some_and(|d| d < TimeDelta::hours(HISTORY_HOURS) + HourlyHistory::SETTLED_AFTER);
    if pruned_within {
        history.forget();
        // Unbounded above, as the queues' totals count a build whose
        // finish time is ahead of this clock.
        return Ok(store.finished_hours(first_hour, None).await?);
    }
    Ok(history.hours(store, now, first_hour, event_seq).await?)
}

/// Computes the `/v1/queues` answer as of `event_seq`.
async fn queue_list(
    ctx: &Ctx,
    event_seq: u64,
    history: &mut HourlyHistory,
) -> Result<QueueList, ApiError> {
    let now = Utc::now();
    let first_hour = hour_of(now) - TimeDelta::hours(HISTORY_HOURS - 1);
    let open = ctx.state.store().open_build_counts().await?;
    let hours = finished_hours(ctx, now, first_hour, event_seq, history).await?;

    let mut summaries: BTreeMap<&str, QueueSummary> = ctx
        .state
        .build_queues()
        .map(|q| {
            let concurrency = match &q.config.runner {
                // The local runner runs one build at a time unless told more.
                RunnerSection::Local(_) => Some(q.config.concurrency.unwrap_or(1).max(1)),
                _ => q.config.concurrency,
            };
            let summary = QueueSummary {
                name: q.name.clone(),
                runner: q.runner_name.to_string(),
                concurrency,
                counts: StatusCounts::default(),
                oldest_waiting_at: None,
                oldest_waiting_seconds: None,
            };
            (q.name.as_str(), summary)
        })
        .collect();
    for c in &open {
        let Some(s) = summaries.get_mut(c.queue.as_str()) else {
            // Builds of a queue no longer configured: not a queue to show.
            continue;
        };
        *count_of(&mut s.counts, c.status) += c.count;
        if c.status == BuildStatus::Accepted {
            s.oldest_waiting_at = Some(c.oldest_created_at);
            let age = (now - c.oldest_created_at).num_seconds().max(0);
            s.oldest_waiting_seconds = u64::try_from(age).ok();
        }
    }
    for c in hours.iter().flat_map(|h| &h.counts) {
        if let Some(s) = summaries.get_mut(c.queue.as_str()) {
            *count_of(&mut s.counts, c.status) += c.count;
        }
    }
    Ok(QueueList {
        at: now,
        event_seq,
        queues: summaries.into_values().collect(),
        last_24h: hour_buckets(first_hour, &hours),
    })
}

/// The start of `t`'s hour.
fn hour_of(t: DateTime<Utc>) -> DateTime<Utc> {
    // Rounding a current time down to the hour cannot overflow; the
    // fallback keeps the answer defined anyway.
    t.duration_trunc(TimeDelta::hours(1)).unwrap_or(t)
}

fn count_of(c: &mut StatusCounts, status: BuildStatus) -> &mut u64 {
    match status {
        BuildStatus::Accepted => &mut c.accepted,
        BuildStatus::Running => &mut c.running,
        BuildStatus::Unknown => &mut c.unknown,
        BuildStatus::Succeeded => &mut c.succeeded,
        BuildStatus::Failed => &mut c.failed,
        BuildStatus::Cancelled => &mut c.cancelled,
    }
}

/// [`HISTORY_HOURS`] buckets from `first_hour`: finished builds per
/// outcome (of every queue, configured or not) and their median run time.
/// Hours outside the window are left out.
fn hour_buckets(first_hour: DateTime<Utc>, hours: &[FinishedHour]) -> Vec<HourBucket> {
    let mut buckets: Vec<HourBucket> = (0..HISTORY_HOURS)
        .map(|i| HourBucket {
            start: first_hour + TimeDelta::hours(i),
            succeeded: 0,
            failed: 0,
            cancelled: 0,
            median_duration_ms: None,
        })
        .collect();
    for hour in hours {
        let i = (hour.start - first_hour).num_hours();
        let Some(bucket) = usize::try_from(i).ok().and_then(|i| buckets.get_mut(i)) else {
            continue;
        };
        let mut counts = StatusCounts::default();
        for c in &hour.counts {
            *count_of(&mut counts, c.status) += c.count;
        }
        bucket.succeeded = counts.succeeded;
        bucket.failed = counts.failed;
        bucket.cancelled = counts.cancelled;
        bucket.median_duration_ms = hour.median_duration_ms;
    }
    buckets
}

/// Query parameters of `GET /v1/dead-letters`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct DeadLetterParams {
    /// The stage topic: `trigger` or `signal`.
    #[param(value_type = String, required = true, pattern = "^(trigger|signal)$")]
    topic: Option<String>,
    /// The `next_after` of the previous page (default 0: from the oldest).
    #[param(value_type = Option<i64>, minimum = 0)]
    after: Option<String>,
    /// Page size, 1–1000 (default 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
}

fn parse_topic(raw: Option<&str>) -> Result<&'static str, ApiError> {
    let raw = raw.unwrap_or("");
    TOPICS.into_iter().find(|t| *t == raw).ok_or_else(|| {
        ApiError::invalid(format!(
            "invalid topic {raw:?}: expected one of {}",
            TOPICS.join(", ")
        ))
    })
}

/// Dead letters of one stage topic, oldest first.
///
/// A message is dead-lettered when its stage gave up on it (a permanent
/// failure, or its retries ran out); its build was failed unless that was
/// impossible. Replay publishes it again.
#[utoipa::path(
    get,
    path = "/v1/dead-letters",
    tag = "queues",
    security(("bearer" = [])),
    params(DeadLetterParams),
    responses(
        (status = 200, description = "A page of dead letters; `next_after` is null on the last page", body = DeadLetterList),
        (status = 400, description = "`invalid_request` (missing or unknown topic, bad `after` or `limit`, unknown parameter)", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody)
    )
)]
pub(crate) async fn list_dead_letters(
    State(ctx): State<Ctx>,
    ApiQuery(p): ApiQuery<DeadLetterParams>,
) -> Result<Json<DeadLetterList>, ApiError> {
    let topic = parse_topic(non_empty(p.topic).as_deref())?;
    let after = match non_empty(p.after) {
        None => 0,
        Some(a) => a.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
            ApiError::invalid(format!(
                "invalid after {a:?}: expected an integer from 0 to {}",
                i64::MAX
            ))
        })?,
    };
    let limit = match non_empty(p.limit) {
        None => 100,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_DEAD_LETTERS).contains(n))
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "invalid limit {l:?}: expected an integer from 1 to {MAX_DEAD_LETTERS}"
                ))
            })?,
    };
    // One more than asked tells whether another page exists.
    let mut dead = ctx
        .state
        .queue()
        .admin()
        .dead_letters(topic, after, limit as usize + 1)
        .await
        .map_err(mq_error)?;
    let more = dead.len() > limit as usize;
    dead.truncate(limit as usize);
    let next_after = dead.last().filter(|_| more).map(|d| d.dlq_id);
    let dead_letters = dead
        .into_iter()
        .map(|d| DeadLetterRecord {
            id: d.dlq_id,
            topic: d.original_topic,
            group: d.group,
            build_id: d.message.partition_key.parse::<BuildId>().ok(),
            message_id: d.message.id,
            attempts: d.attempts,
            failure: d.failure.message,
            detail: (!d.failure.detail.is_null()).then(|| d.failure.detail.to_string()),
            published_at: time(d.published_at),
            failed_at: time(d.failed_at),
        })
        .collect();
    Ok(Json(DeadLetterList {
        dead_letters,
        next_after,
    }))
}

fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn mq_error(e: MqError) -> ApiError {
    match e {
        MqError::UnknownDeadLetter { topic, id } => ApiError::new(
            StatusCode::NOT_FOUND,
            "dead_letter_not_found",
            format!("no dead letter {id} on topic {topic:?} (replayed or pruned already?)"),
        ),
        e => ApiError::internal(e),
    }
}

/// Publish a dead letter again.
///
/// The message goes back to its stage with the same id, partition and
/// payload, and leaves the dead letters. If the stage gives up on it
/// again it is dead-lettered again.
#[utoipa::path(
    post,
    path = "/v1/dead-letters/{topic}/{id}/replay",
    tag = "queues",
    security(("bearer" = [])),
    params(
        ("topic" = String, Path, pattern = "^(trigger|signal)$", description = "The stage topic: `trigger` or `signal`"),
        ("id" = i64, Path, minimum = 1, description = "The dead letter's id")
    ),
    responses(
        (status = 204, description = "Published again"),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`dead_letter_not_found` (also for an unknown topic or an id that is not a number)", body = ErrorBody)
    )
)]
pub(crate) async fn replay_dead_letter(
    State(ctx): State<Ctx>,
    Path((topic, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "dead_letter_not_found",
            format!("no dead letter {id:?} on topic {topic:?}"),
        )
    };
    let topic_name = parse_topic(Some(&topic)).map_err(|_| not_found())?;
    let dlq_id = id.parse::<i64>().map_err(|_| not_found())?;
    ctx.state
        .queue()
        .admin()
        .replay_dead_letter(topic_name, dlq_id)
        .await
        .map_err(mq_error)?;
    tracing::info!(
        topic = topic_name,
        id = dlq_id,
        "dead letter replayed over the API"
    );
    Ok(StatusCode::NO_CONTENT)
}
