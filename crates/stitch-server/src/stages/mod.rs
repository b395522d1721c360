//! The two stages that move builds: `trigger` creates the provider's build,
//! `signal` polls it until it is terminal (docs/architecture.md, "Build lifecycle").

mod signal;
mod trigger;

use std::sync::Arc;

use stitch_core::metric;
use stitch_core::{BuildHandle, BuildId, BuildStatus};
use stitch_mq::{Delivery, SubscriptionConfig};
use stitch_store::Build;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use signal::SignalStage;
pub use trigger::TriggerStage;

use crate::config::ClusterConfig;
use crate::consumer::{run_stage, DeliverySubject, RetryBudget, Stage, StageError};
use crate::runners::QueueRuntime;
use crate::service::BuildMessage;
use crate::state::AppState;

/// The trigger stage's consumer group on the `trigger` topic.
pub const TRIGGER_GROUP: &str = "trigger-stage";
/// The signal stage's consumer group on the `signal` topic.
pub const SIGNAL_GROUP: &str = "signal-stage";

/// Starts both stages; they stop (finishing in-flight work) on `shutdown`.
pub fn start(state: &AppState, shutdown: CancellationToken) -> Vec<JoinHandle<()>> {
    let stages: Vec<Arc<dyn Stage>> = vec![
        Arc::new(TriggerStage::new(state.clone())),
        Arc::new(SignalStage::new(state.clone())),
    ];
    stages
        .into_iter()
        .map(|stage| {
            let queue = state.queue().clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let name = stage.name();
                if let Err(e) = run_stage(stage, queue, shutdown).await {
                    tracing::error!(stage = name, error = %e, "stage stopped");
                }
            })
        })
        .collect()
}

/// This process's stable name among the stage subscribers: the same after
/// a restart, so the restarted process takes back its leases and the
/// deliveries it died holding at once (see `stitch_mq` `recover`).
pub(crate) fn node_name() -> String {
    std::env::var("STITCH_NODE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
        })
        .unwrap_or_else(|| "stitch".to_string())
}

/// Subscription shared by the stages: one message of a build in flight at a
/// time (`batch_size = 1`), and a high redelivery backstop because each stage
/// applies its queue's own retry budget. Leases, the delivery timeout and the
/// cross-process poll come from `[cluster]`.
fn subscription(cluster: &ClusterConfig, group: &str) -> SubscriptionConfig {
    let mut cfg = SubscriptionConfig::new(group);
    cfg.subscriber = format!("{group}@{}", node_name());
    cfg.batch_size = 1;
    cfg.max_in_flight = 512;
    cfg.visibility_timeout = cluster.delivery_timeout;
    cfg.lease_duration = cluster.lease;
    cfg.lease_renewal = cluster.lease / 3;
    cfg.poll_interval = cluster.poll_interval;
    cfg.retry.max_attempts = 1000;
    cfg
}

fn parse(delivery: &Delivery) -> Result<BuildMessage, StageError> {
    serde_json::from_slice(delivery.payload()).map_err(|e| {
        StageError::permanent(format!(
            "malformed {} message {:?}: {e}",
            delivery.topic(),
            delivery.id()
        ))
    })
}

/// The build and queue a delivery's message names (see
/// [`Stage::subject`]).
fn subject_of(delivery: &Delivery) -> Option<DeliverySubject> {
    parse(delivery).ok().map(|m| DeliverySubject {
        build_id: m.build_id.to_string(),
        queue: m.queue,
    })
}

fn budget_for(state: &AppState, delivery: &Delivery) -> RetryBudget {
    let cfg = parse(delivery)
        .ok()
        .and_then(|m| state.build_queue(&m.queue).map(|q| q.config.retry.clone()))
        .unwrap_or_default();
    RetryBudget {
        max_attempts: cfg.max_attempts.clamp(1, 900),
        initial: cfg.initial,
        max: cfg.max,
    }
}

fn handle_of(build: &Build) -> Result<BuildHandle, StageError> {
    let mut handle = BuildHandle::new(build.id.clone(), build.queue.clone());
    if let Some(r) = &build.runner_ref {
        handle = handle.with_ref(r.clone());
    }
    Ok(handle)
}

/// The build a message is about, or `None` when it is already terminal
/// (nothing left to do). A message about a build that does not exist is
/// permanent.
async fn live_build(state: &AppState, delivery: &Delivery) -> Result<Option<Build>, StageError> {
    let build = load_build(state, delivery).await?;
    Ok((!build.status.is_terminal()).then_some(build))
}

/// The build a delivery is about, terminal or not; a permanent error when it
/// does not exist.
async fn load_build(state: &AppState, delivery: &Delivery) -> Result<Build, StageError> {
    let msg = parse(delivery)?;
    let build = match state.store().get_build(&msg.build_id).await {
        Ok(b) => b,
        Err(e) if e.is_not_found() => {
            return Err(StageError::permanent(format!(
                "build {} does not exist",
                msg.build_id
            )))
        }
        Err(e) => return Err(e.into()),
    };
    Ok(build)
}

/// The configured queue a build runs on.
fn runtime_of<'a>(state: &'a AppState, build: &Build) -> Result<&'a QueueRuntime, StageError> {
    state.build_queue(&build.queue).ok_or_else(|| {
        StageError::permanent(format!("queue {:?} is no longer configured", build.queue))
    })
}

/// Records a status change of `build` (as read before the change) with its
/// event (the store's commit wakes the event streams), and observes the
/// build's queue time or duration when the change starts or ends it. A
/// build that became terminal meanwhile (a deadline, a cancel) is left as
/// it is.
async fn record_status(
    state: &AppState,
    build: &Build,
    status: BuildStatus,
    runner_metadata: &stitch_store::Metadata,
    reason: Option<&str>,
) -> Result<(), StageError> {
    match state
        .store()
        .record_status(&build.id, None, status, runner_metadata, reason)
        .await
    {
        Ok(true) => {
            observe_transition(build, status);
            Ok(())
        }
        Ok(false) | Err(stitch_store::StoreError::InvalidTransition { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// `stitch_build_queued_seconds` when `build` starts running for the
/// first time, `stitch_build_duration_seconds` when it ends: both from its
/// acceptance, labelled with its (configured, so bounded) queue.
fn observe_transition(build: &Build, status: BuildStatus) {
    if status == build.status {
        return;
    }
    let since_accept = (chrono::Utc::now() - build.created_at)
        .to_std()
        .unwrap_or_default()
        .as_secs_f64();
    if status == BuildStatus::Running && build.started_at.is_none() {
        metrics::histogram!(metric::BUILD_QUEUED, "queue" => build.queue.clone())
            .record(since_accept);
    }
    if status.is_terminal() {
        metrics::histogram!(
            metric::BUILD_DURATION,
            "queue" => build.queue.clone(),
            "outcome" => status.as_str()
        )
        .record(since_accept);
    }
}

/// Fails a build that a stage gave up on (fail closed: never "accepted
/// forever"). Terminal builds are left as they are.
async fn fail_build(state: &AppState, id: &BuildId, reason: &str) -> Result<(), StageError> {
    let build = match state.store().get_build(id).await {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if build.status.is_terminal() {
        return Ok(());
    }
    let mut meta = stitch_store::Metadata::new();
    meta.insert("error".into(), reason.to_string());
    record_status(state, &build, BuildStatus::Failed, &meta, Some(reason)).await?;
    tracing::info!(build_id = %id, status = %BuildStatus::Failed, reason, "build status changed");
    Ok(())
}
