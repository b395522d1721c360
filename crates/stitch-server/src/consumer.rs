//! The consumer framework: runs a [`Stage`] on its topic and turns the
//! stage's result into the delivery's outcome. Stages never ack or nack.
//!
//! | stage result | outcome |
//! |---|---|
//! | `Ok(Done)` | ack |
//! | `Ok(Hold(d))` | postpone `d` (the poll loop's cadence; a barrier for the build) |
//! | `Err(Retryable)` | nack after the queue's backoff (or the provider's `Retry-After`) |
//! | `Err(Retryable)` on the last attempt, or `Err(Permanent)` | the stage's `give_up` (fails the build), then dead-letter |

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use stitch_core::RunnerError;
use stitch_mq::{Delivery, Failure, MqError, NackOutcome, Queue, SubscriptionConfig};
use stitch_store::StoreError;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// What a stage asks for after processing a message successfully.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageOutcome {
    /// Finished with this message.
    Done,
    /// Come back after this delay (the message's partition waits behind it).
    Hold(Duration),
}

/// How a stage failed. Classification decides retry vs dead-letter.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Worth retrying: the provider or database may recover.
    #[error("{message}")]
    Retryable {
        message: String,
        /// The provider said when to come back (`Retry-After`, rate-limit reset).
        retry_after: Option<Duration>,
    },
    /// Retrying cannot help (malformed message, a 4xx from the provider).
    #[error("{0}")]
    Permanent(String),
}

impl StageError {
    /// A permanent error from any message.
    pub fn permanent(message: impl Into<String>) -> Self {
        StageError::Permanent(message.into())
    }
}

impl From<RunnerError> for StageError {
    fn from(e: RunnerError) -> Self {
        if e.is_retryable() {
            StageError::Retryable {
                retry_after: e.retry_after(),
                message: format!("runner: {e}"),
            }
        } else {
            StageError::Permanent(format!("runner: {e}"))
        }
    }
}

impl From<StoreError> for StageError {
    fn from(e: StoreError) -> Self {
        if e.is_retryable() {
            StageError::Retryable {
                message: format!("store: {e}"),
                retry_after: None,
            }
        } else {
            StageError::Permanent(format!("store: {e}"))
        }
    }
}

impl From<MqError> for StageError {
    fn from(e: MqError) -> Self {
        if e.is_retryable() {
            StageError::Retryable {
                message: format!("queue: {e}"),
                retry_after: None,
            }
        } else {
            StageError::Permanent(format!("queue: {e}"))
        }
    }
}

/// Retry schedule a stage applies to one message.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryBudget {
    /// Attempts before giving up.
    pub max_attempts: u32,
    /// First backoff.
    pub initial: Duration,
    /// Largest backoff.
    pub max: Duration,
}

impl RetryBudget {
    /// Exponential backoff after `attempt` failed (×2, capped, 20 % jitter).
    pub fn backoff(&self, attempt: u32) -> Duration {
        stitch_mq::RetryPolicy {
            max_attempts: self.max_attempts,
            initial_backoff: self.initial,
            max_backoff: self.max,
            multiplier: 2.0,
            jitter: 0.2,
        }
        .backoff(attempt)
    }
}

/// What a delivery is about, named on its span so that every line a stage
/// writes while processing it carries the build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliverySubject {
    /// The build the message moves.
    pub build_id: String,
    /// The build queue it runs on.
    pub queue: String,
}

/// One consumer of one topic.
#[async_trait]
pub trait Stage: Send + Sync + 'static {
    /// Name for logs and metrics (`trigger`, `signal`).
    fn name(&self) -> &'static str;
    /// The topic it consumes.
    fn topic(&self) -> &'static str;
    /// How it subscribes.
    fn subscription(&self) -> SubscriptionConfig;
    /// The retry budget for this message (per build queue).
    fn budget(&self, delivery: &Delivery) -> RetryBudget;
    /// The build a message is about, for its span; `None` when the
    /// message names none (or is malformed).
    fn subject(&self, _delivery: &Delivery) -> Option<DeliverySubject> {
        None
    }
    /// Processes one message.
    async fn process(&self, delivery: &Delivery) -> Result<StageOutcome, StageError>;
    /// The message is about to be dead-lettered: leave its subject in a
    /// terminal, visible state (fail closed). An error here keeps the message.
    async fn give_up(&self, delivery: &Delivery, reason: &str) -> Result<(), StageError>;
}

/// Runs `stage` until `shutdown`; in-flight messages finish first.
pub async fn run_stage(
    stage: Arc<dyn Stage>,
    queue: Queue,
    shutdown: CancellationToken,
) -> Result<(), MqError> {
    let mut sub = queue
        .subscriber()
        .subscribe(stage.topic(), stage.subscription())
        .await?;
    let mut running = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            next = sub.recv() => {
                let Some(delivery) = next else { break };
                let stage = stage.clone();
                running.spawn(async move { handle(stage.as_ref(), delivery).await });
            }
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
    }
    // Graceful: finish what is being processed, hand back what is buffered.
    let drain = async { while running.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(30), drain)
        .await
        .is_err()
    {
        tracing::warn!(
            stage = stage.name(),
            "in-flight messages did not finish within 30 s; they will be redelivered"
        );
    }
    sub.close().await;
    Ok(())
}

fn count(stage: &str, outcome: &'static str) {
    metrics::counter!(stitch_core::metric::STAGE_OUTCOMES, "stage" => stage.to_string(), "outcome" => outcome).increment(1);
}

/// Processes one delivery and applies its outcome, inside a span
/// `stage_delivery` naming the stage, the message, its attempt and the
/// build (see [`Stage::subject`]).
pub async fn handle(stage: &dyn Stage, d: Delivery) {
    let subject = stage.subject(&d);
    let span = tracing::info_span!(
        "stage_delivery",
        otel.name = %format_args!("stage {}", stage.name()),
        stage = stage.name(),
        topic = d.topic(),
        message_id = d.id(),
        // i64: OTLP exports unsigned integers as text.
        attempt = i64::from(d.attempt()),
        build_id = subject.as_ref().map(|s| s.build_id.as_str()),
        queue = subject.as_ref().map(|s| s.queue.as_str()),
    );
    handle_delivery(stage, d).instrument(span).await
}

async fn handle_delivery(stage: &dyn Stage, d: Delivery) {
    let name = stage.name();
    let result = stage.process(&d).await;
    let outcome = match result {
        Ok(StageOutcome::Done) => {
            count(name, "ack");
            repeat_outcome(|| d.ack()).await
        }
        Ok(StageOutcome::Hold(delay)) => {
            count(name, "hold");
            repeat_outcome(|| d.postpone(delay.max(Duration::from_millis(1)))).await
        }
        Err(StageError::Retryable {
            message,
            retry_after,
        }) => {
            let budget = stage.budget(&d);
            if d.attempt() >= budget.max_attempts {
                give_up(
                    stage,
                    &d,
                    &format!("gave up after {} attempts: {message}", d.attempt()),
                )
                .await
            } else {
                count(name, "retry");
                let delay = retry_after.unwrap_or_else(|| budget.backoff(d.attempt()));
                tracing::info!(stage = name, id = d.id(), attempt = d.attempt(), ?delay, error = %message, "retrying");
                repeat_outcome(|| d.nack_after(Failure::new(message.clone()), delay))
                    .await
                    .map(|_| ())
            }
        }
        Err(StageError::Permanent(message)) => give_up(stage, &d, &message).await,
    };
    if let Err(e) = outcome {
        // The visibility timeout redelivers it; nothing is lost.
        tracing::warn!(stage = name, id = d.id(), error = %e, "could not record the outcome");
    }
}

/// How long an outcome is repeated while the database reports a transient
/// failure (a dropped connection, a failover) before the delivery is left to
/// its visibility timeout.
const OUTCOME_RETRY_FOR: Duration = Duration::from_secs(30);

/// Writes an outcome, repeating it with a capped backoff while the failure
/// is transient: a failed outcome leaves the delivery open and invisible, so
/// giving up at once would stall the build until the delivery timeout.
async fn repeat_outcome<T, F, Fut>(mut write: F) -> Result<T, MqError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, MqError>>,
{
    let deadline = tokio::time::Instant::now() + OUTCOME_RETRY_FOR;
    let mut delay = Duration::from_millis(50);
    loop {
        match write().await {
            Err(e) if e.is_retryable() && tokio::time::Instant::now() + delay < deadline => {
                tracing::debug!(error = %e, ?delay, "outcome not written; repeating");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

async fn give_up(stage: &dyn Stage, d: &Delivery, reason: &str) -> Result<(), MqError> {
    match stage.give_up(d, reason).await {
        Ok(()) => {
            count(stage.name(), "dead_letter");
            tracing::warn!(stage = stage.name(), id = d.id(), reason, "dead-lettering");
            repeat_outcome(|| d.reject(Failure::new(reason))).await
        }
        Err(e) => {
            // Failing the build did not work (database down?): keep the message
            // and try again later rather than dead-letter a build nobody watches.
            count(stage.name(), "give_up_failed");
            tracing::warn!(stage = stage.name(), id = d.id(), error = %e, "could not fail the build; retrying later");
            repeat_outcome(|| {
                d.nack_after(
                    Failure::new(format!("{reason}; then: {e}")),
                    Duration::from_secs(5),
                )
            })
            .await
            .map(|o| {
                if o == NackOutcome::DeadLettered {
                    tracing::error!(
                        stage = stage.name(),
                        id = d.id(),
                        "dead-lettered without failing its build"
                    );
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn lost_connection() -> MqError {
        MqError::Storage(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        )))
    }

    #[tokio::test(start_paused = true)]
    async fn an_outcome_is_repeated_until_the_database_is_back() {
        let calls = AtomicU32::new(0);
        let result = repeat_outcome(|| async {
            if calls.fetch_add(1, Ordering::SeqCst) < 3 {
                Err(lost_connection())
            } else {
                Ok(7)
            }
        })
        .await;
        assert_eq!(result.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_final_error_is_not_repeated() {
        let calls = AtomicU32::new(0);
        let result: Result<(), MqError> = repeat_outcome(|| async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(MqError::StaleDelivery("m1".into()))
        })
        .await;
        assert!(matches!(result, Err(MqError::StaleDelivery(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_database_that_stays_away_is_given_up_on() {
        let started = tokio::time::Instant::now();
        let calls = AtomicU32::new(0);
        let result: Result<(), MqError> = repeat_outcome(|| async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(lost_connection())
        })
        .await;
        assert!(result.unwrap_err().is_retryable());
        assert!(started.elapsed() <= OUTCOME_RETRY_FOR);
        assert!(calls.load(Ordering::SeqCst) > 5);
    }
}
