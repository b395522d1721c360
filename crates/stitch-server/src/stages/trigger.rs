//! The trigger stage: one message per build; creates the provider's build
//! and hands the build to the signal stage.

use std::collections::BTreeMap;

use async_trait::async_trait;
use stitch_core::{BuildMetadata, BuildStatus, ChangeSet, TriggerRequest};
use stitch_mq::{now_millis, Delivery, SubscriptionConfig};

use super::{
    budget_for, fail_build, live_build, parse, record_status, runtime_of, subject_of, subscription,
};
use crate::consumer::{DeliverySubject, RetryBudget, Stage, StageError, StageOutcome};
use crate::service::build_message;
use crate::state::{topics, AppState};
use stitch_job::env as job_env;

/// Consumer of `trigger`.
pub struct TriggerStage {
    state: AppState,
}

impl TriggerStage {
    /// The stage over the service's state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[async_trait]
impl Stage for TriggerStage {
    fn name(&self) -> &'static str {
        "trigger"
    }

    fn topic(&self) -> &'static str {
        topics::TRIGGER
    }

    fn subscription(&self) -> SubscriptionConfig {
        subscription(&self.state.config().cluster, super::TRIGGER_GROUP)
    }

    fn subject(&self, delivery: &Delivery) -> Option<DeliverySubject> {
        subject_of(delivery)
    }

    fn budget(&self, delivery: &Delivery) -> RetryBudget {
        budget_for(&self.state, delivery)
    }

    async fn process(&self, delivery: &Delivery) -> Result<StageOutcome, StageError> {
        let Some(build) = live_build(&self.state, delivery).await? else {
            return Ok(StageOutcome::Done);
        };
        if build.cancel_requested && build.runner_ref.is_none() {
            // The provider never saw it: nothing to cancel there.
            let reason = "cancelled before the build was triggered";
            record_status(
                &self.state,
                &build,
                BuildStatus::Cancelled,
                &Default::default(),
                Some(reason),
            )
            .await?;
            tracing::info!(build_id = %build.id, status = %BuildStatus::Cancelled, reason, "build status changed");
            return Ok(StageOutcome::Done);
        }
        let runtime = runtime_of(&self.state, &build)?;
        let store = self.state.store();
        let runner_ref = match &build.runner_ref {
            // Triggered before a crash; only the hand-off may be missing.
            Some(raw) => raw.clone(),
            None => {
                // The job token is derived from the build id, so a redelivery
                // hands the runner the token its build may already hold; its
                // hash was stored with the build at create.
                let token = self.state.job_tokens().token_for(&build.id);
                let job_env = BTreeMap::from([
                    (job_env::JOB_TOKEN.to_string(), token),
                    (job_env::SERVER.to_string(), self.state.job_server_url()),
                    (job_env::BUILD_ID.to_string(), build.id.to_string()),
                ]);
                // A redelivery calls trigger again: the runner contract makes a
                // trigger for a build id it already created return that build.
                let req = TriggerRequest::new(
                    build.id.clone(),
                    build.queue.clone(),
                    ChangeSet::new(build.base.clone(), build.head.clone()),
                )
                .with_metadata(BuildMetadata::from(build.caller_metadata.clone()))
                .with_job_env(job_env)
                // Attempt 1 of the build's only trigger message: no trigger
                // ran before (a crash or a retry makes the next one attempt 2).
                .with_first_attempt(delivery.attempt() == 1);
                runtime.runner.trigger(&req).await?
            }
        };
        // Record the ref and start the poll loop in one transaction.
        let msgs = self.state.queue().publisher().prepare(
            topics::SIGNAL,
            vec![build_message(&build.id, &build.queue, topics::SIGNAL)],
            None,
        )?;
        let id = build.id.clone();
        store
            .write_build(&build.id, move |w| -> Result<(), StageError> {
                w.set_runner_ref(&id, &runner_ref)?;
                w.publish(topics::SIGNAL, &msgs, now_millis())?;
                Ok(())
            })
            .await?;
        tracing::info!(build_id = %build.id, "build triggered on the provider");
        Ok(StageOutcome::Done)
    }

    async fn give_up(&self, delivery: &Delivery, reason: &str) -> Result<(), StageError> {
        match parse(delivery) {
            Ok(msg) => {
                fail_build(
                    &self.state,
                    &msg.build_id,
                    &format!("trigger failed: {reason}"),
                )
                .await
            }
            Err(_) => Ok(()), // nothing identifiable to fail
        }
    }
}
