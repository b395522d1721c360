//! The signal stage: the poll loop. One partition per build; each delivery
//! asks the runner for the status, records a change with its event, issues
//! a requested cancel (level-triggered), enforces the queue's deadlines and
//! holds the message for the status's poll delay until the build is terminal.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use stitch_core::metadata::keys;
use stitch_core::metric;
use stitch_core::{BuildStatus, RunnerError, StatusReport};
use stitch_mq::{now_millis, Delivery, Millis, SubscriptionConfig};
use stitch_store::Build;

use super::{
    budget_for, fail_build, handle_of, live_build, parse, record_status, runtime_of, subject_of,
    subscription,
};
use crate::consumer::{DeliverySubject, RetryBudget, Stage, StageError, StageOutcome};
use crate::runners::QueueRuntime;
use crate::state::{topics, AppState};

/// While a cancel is pending, poll this often to confirm it.
const CANCEL_CONFIRM_POLL: Duration = Duration::from_millis(500);

/// Held polls remembered for [`POLL_LAG`](metric::POLL_LAG) before the
/// ones long overdue are forgotten: a build whose partition another process
/// took over never comes back here to clear its entry.
const MAX_EXPECTED_POLLS: usize = 50_000;
/// How overdue an expected poll may get before a full map forgets it.
const FORGET_AFTER_MS: Millis = 10 * 60 * 1000;

/// Consumer of `signal`.
pub struct SignalStage {
    state: AppState,
    /// When each build's next poll is due (epoch ms), by build id: set when
    /// this process holds a build's message for its poll delay, taken when
    /// the message comes back. The difference is the poll's lateness.
    expected: Mutex<HashMap<String, Millis>>,
}

impl SignalStage {
    /// The stage over the service's state.
    pub fn new(state: AppState) -> Self {
        Self {
            state,
            expected: Mutex::default(),
        }
    }

    /// The due time of this delivery's poll, if this process held it.
    fn take_expected(&self, partition: &str) -> Option<Millis> {
        // A poisoned lock only means another poll panicked between two map
        // operations; the map is still usable.
        let mut expected = self.expected.lock().unwrap_or_else(|p| p.into_inner());
        expected.remove(partition)
    }

    /// Remembers that `partition`'s next poll is due `delay` from now.
    fn expect_poll(&self, partition: &str, delay: Duration) {
        let now = now_millis();
        let due = now.saturating_add(Millis::try_from(delay.as_millis()).unwrap_or(Millis::MAX));
        let mut expected = self.expected.lock().unwrap_or_else(|p| p.into_inner());
        if expected.len() >= MAX_EXPECTED_POLLS {
            expected.retain(|_, due| *due > now - FORGET_AFTER_MS);
        }
        expected.insert(partition.to_string(), due);
    }

    async fn record(
        &self,
        build: &Build,
        report: &StatusReport,
        reason: Option<&str>,
    ) -> Result<(), StageError> {
        // Most polls change nothing: skip the write transaction then.
        let unchanged = report.status == build.status
            && reason.is_none()
            && report
                .metadata
                .iter()
                .all(|(k, v)| build.runner_metadata.get(k) == Some(v));
        if unchanged {
            return Ok(());
        }
        record_status(
            &self.state,
            build,
            report.status,
            report.metadata.as_map(),
            reason,
        )
        .await?;
        if report.status != build.status {
            tracing::info!(build_id = %build.id, status = %report.status, reason, "build status changed");
        }
        Ok(())
    }

    /// A promised failure on a `fail_fast` queue: cancel the provider's
    /// build, then fail the build with the promise as the reason. A failed
    /// cancel is retried under the queue's budget (the build stays live
    /// until it goes through); a provider build that already finished makes
    /// `cancel` a no-op.
    async fn fail_fast(
        &self,
        runtime: &QueueRuntime,
        build: &Build,
        promised: &str,
    ) -> Result<StageOutcome, StageError> {
        runtime.runner.cancel(&handle_of(build)?).await?;
        fail_build(
            &self.state,
            &build.id,
            &format!("promised exit status {promised}"),
        )
        .await?;
        Ok(StageOutcome::Done)
    }

    /// Cancels at the provider (best effort) and fails the build with `reason`.
    async fn expire(
        &self,
        runtime: &QueueRuntime,
        build: &Build,
        reason: String,
    ) -> Result<StageOutcome, StageError> {
        let handle = handle_of(build)?;
        if let Err(e) = runtime.runner.cancel(&handle).await {
            tracing::warn!(build = %build.id, error = %e, "cancel after a deadline failed; failing the build anyway");
        }
        fail_build(&self.state, &build.id, &reason).await?;
        Ok(StageOutcome::Done)
    }
}

/// The promised exit status of a build whose job now reports success.
fn broken_promise<'b>(build: &'b Build, report: &StatusReport) -> Option<&'b str> {
    if report.status != BuildStatus::Succeeded {
        return None;
    }
    build
        .runner_metadata
        .get(keys::PROMISED_EXIT_STATUS)
        .map(String::as_str)
}

fn deadline_reason(runtime: &QueueRuntime, build: &Build) -> Option<String> {
    let age = (Utc::now() - build.created_at).to_std().unwrap_or_default();
    let cfg = &runtime.config;
    if let Some(limit) = cfg.accepted_timeout {
        if matches!(build.status, BuildStatus::Accepted | BuildStatus::Unknown) && age > limit {
            return Some(format!(
                "still {} after {} (accepted_timeout)",
                build.status,
                humantime_serde::re::humantime::format_duration(limit)
            ));
        }
    }
    if let Some(limit) = cfg.max_duration {
        if age > limit {
            return Some(format!(
                "not finished after {} (max_duration)",
                humantime_serde::re::humantime::format_duration(limit)
            ));
        }
    }
    None
}

#[async_trait]
impl Stage for SignalStage {
    fn name(&self) -> &'static str {
        "signal"
    }

    fn topic(&self) -> &'static str {
        topics::SIGNAL
    }

    fn subscription(&self) -> SubscriptionConfig {
        subscription(&self.state.config().cluster, super::SIGNAL_GROUP)
    }

    fn subject(&self, delivery: &Delivery) -> Option<DeliverySubject> {
        subject_of(delivery)
    }

    fn budget(&self, delivery: &Delivery) -> RetryBudget {
        budget_for(&self.state, delivery)
    }

    async fn process(&self, delivery: &Delivery) -> Result<StageOutcome, StageError> {
        let expected = self.take_expected(delivery.partition_key());
        let Some(build) = live_build(&self.state, delivery).await? else {
            return Ok(StageOutcome::Done);
        };
        // Only a poll that ran after its due time is late; one a wake
        // brought forward (a webhook, a cancel) is not measured.
        if let Some(late) = expected
            .map(|due| delivery.received_at() - due)
            .filter(|late| *late >= 0)
        {
            metrics::histogram!(metric::POLL_LAG, "queue" => build.queue.clone())
                .record(late as f64 / 1000.0);
        }
        let runtime = runtime_of(&self.state, &build)?;
        if let Some(reason) = deadline_reason(runtime, &build) {
            return self.expire(runtime, &build, reason).await;
        }
        if runtime.config.fail_fast {
            if let Some(promised) = build.runner_metadata.get(keys::PROMISED_EXIT_STATUS) {
                return self.fail_fast(runtime, &build, promised).await;
            }
        }
        let handle = handle_of(&build)?;
        let report = match runtime.runner.status(&handle).await {
            Ok(r) => r,
            Err(RunnerError::NotFound(what)) => {
                return Err(StageError::permanent(format!(
                    "the runner no longer knows this build: {what}"
                )))
            }
            Err(e) => return Err(e.into()),
        };
        // Level-triggered cancel: re-issued on every poll until terminal.
        let cancelling = build.cancel_requested && !report.status.is_terminal();
        if cancelling {
            if let Err(e) = runtime.runner.cancel(&handle).await {
                tracing::warn!(build = %build.id, error = %e, "cancel failed; the next poll retries");
            }
        }
        let mut report = report;
        let mut reason = (build.cancel_requested && report.status == BuildStatus::Cancelled)
            .then(|| "cancel requested".to_string());
        if let Some(promised) = broken_promise(&build, &report) {
            // A promised failure is binding: success after it is a failure.
            report.status = BuildStatus::Failed;
            reason = Some(format!(
                "the job promised exit status {promised} but finished successfully"
            ));
        }
        self.record(&build, &report, reason.as_deref()).await?;
        if report.status.is_terminal() {
            return Ok(StageOutcome::Done);
        }
        // A wake during this poll (a webhook, a cancel) makes this hold end
        // at once: the queue records it against the delivery (ADR 0012).
        let delay = if cancelling {
            CANCEL_CONFIRM_POLL
        } else {
            runtime.poll_delay(report.status)
        };
        self.expect_poll(delivery.partition_key(), delay);
        Ok(StageOutcome::Hold(delay))
    }

    async fn give_up(&self, delivery: &Delivery, reason: &str) -> Result<(), StageError> {
        match parse(delivery) {
            Ok(msg) => {
                fail_build(
                    &self.state,
                    &msg.build_id,
                    &format!("status polling failed: {reason}"),
                )
                .await
            }
            Err(_) => Ok(()),
        }
    }
}
