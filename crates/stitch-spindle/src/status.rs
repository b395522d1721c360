//! Turns spindle builds' status changes, read from the store's event log in
//! order, into `sh.tangled.pipeline.status` records. Resumes from the seq
//! persisted with the last record it wrote, so a restart neither loses nor
//! repeats a transition (a replayed event whose state is already the run's
//! last status writes nothing).

use futures::StreamExt;
use stitch_core::BuildStatus;
use stitch_store::{Event, EventKind};
use tokio_util::sync::CancellationToken;

use crate::db::{StatusChange, STATUS_CURSOR};
use crate::records::PipelineState;
use crate::trigger::meta;
use crate::Spindle;

/// Error of a workflow the user cancelled (as the stock spindle says it).
pub const CANCELLED_ERROR: &str = "User canceled the workflow";

/// Runs until `stop`: follows the event log and records statuses.
pub(crate) async fn run(spindle: Spindle, stop: CancellationToken) {
    loop {
        let after = match spindle.db.cursor(STATUS_CURSOR).await {
            Ok(c) => c.and_then(|c| u64::try_from(c).ok()).unwrap_or(0),
            Err(e) => {
                tracing::error!(error = %e, "spindle: reading the status cursor failed");
                0
            }
        };
        let mut events = spindle.state.event_stream(after);
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                next = events.next() => next,
            };
            let event = match next {
                None => return,
                Some(Ok(e)) => e,
                Some(Err(e)) => {
                    tracing::error!(error = %e, "spindle: reading the event log failed; resuming");
                    break;
                }
            };
            let Some(change) = status_change(&event.event) else {
                continue;
            };
            if let Err(e) = spindle
                .db
                .record_build_status(change, event.event.seq)
                .await
            {
                tracing::error!(error = %e, seq = event.event.seq, "spindle: recording a status failed; resuming");
                break;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(spindle.settings.reconnect_min) => {}
        }
    }
}

/// The status record an event calls for: only status events of builds the
/// spindle created (they carry its metadata keys), in a state Tangled knows.
pub fn status_change(event: &Event) -> Option<StatusChange> {
    if event.kind != EventKind::Status {
        return None;
    }
    let knot = event.metadata.get(meta::KNOT)?;
    let rkey = event.metadata.get(meta::PIPELINE_RKEY)?;
    let workflow = event.metadata.get(meta::WORKFLOW)?;
    let error = event.metadata.get(stitch_store::ERROR_KEY).cloned();
    let (state, error, exit_code) = match event.status {
        BuildStatus::Unknown => return None,
        BuildStatus::Accepted => (PipelineState::Pending, None, None),
        BuildStatus::Running => (PipelineState::Running, None, None),
        BuildStatus::Succeeded => (PipelineState::Success, None, None),
        BuildStatus::Cancelled => (
            PipelineState::Cancelled,
            Some(CANCELLED_ERROR.to_string()),
            Some(-1),
        ),
        BuildStatus::Failed if error.as_deref().is_some_and(is_deadline) => {
            (PipelineState::Timeout, None, None)
        }
        BuildStatus::Failed => {
            let code = event
                .metadata
                .get(stitch_core::metadata::keys::EXIT_STATUS)
                .and_then(|s| s.parse::<i64>().ok())
                .unwrap_or(1);
            (
                PipelineState::Failed,
                Some(error.unwrap_or_else(|| "workflow failed".to_string())),
                Some(code),
            )
        }
    };
    Some(StatusChange {
        knot: knot.clone(),
        rkey: rkey.clone(),
        workflow: workflow.clone(),
        state,
        error,
        exit_code,
        at: event.at,
    })
}

/// Whether a failure reason is one of the signal stage's deadline reasons
/// (`… (accepted_timeout)`, `… (max_duration)`), which Tangled calls a timeout.
fn is_deadline(reason: &str) -> bool {
    reason.ends_with("(accepted_timeout)") || reason.ends_with("(max_duration)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use stitch_core::BuildId;

    fn event(kind: EventKind, status: BuildStatus, extra: &[(&str, &str)]) -> Event {
        let mut metadata: stitch_store::Metadata = [
            (meta::KNOT, "knot.example.com"),
            (meta::PIPELINE_RKEY, "3lzpipeline22"),
            (meta::WORKFLOW, "ci.yml"),
        ]
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        metadata.retain(|_, v| !v.is_empty());
        Event {
            seq: 7,
            build_id: BuildId::new(),
            queue: "default".into(),
            kind,
            status,
            metadata,
            at: chrono::Utc::now(),
        }
    }

    fn state_of(e: &Event) -> Option<(PipelineState, Option<String>, Option<i64>)> {
        status_change(e).map(|c| (c.state, c.error, c.exit_code))
    }

    #[test]
    fn build_statuses_map_to_tangled_states() {
        use PipelineState::*;
        let s = |st| state_of(&event(EventKind::Status, st, &[]));
        assert_eq!(s(BuildStatus::Accepted), Some((Pending, None, None)));
        assert_eq!(s(BuildStatus::Running), Some((Running, None, None)));
        assert_eq!(s(BuildStatus::Succeeded), Some((Success, None, None)));
        assert_eq!(s(BuildStatus::Unknown), None);
        assert_eq!(
            s(BuildStatus::Cancelled),
            Some((Cancelled, Some(CANCELLED_ERROR.into()), Some(-1)))
        );
        assert_eq!(
            s(BuildStatus::Failed),
            Some((Failed, Some("workflow failed".into()), Some(1)))
        );
        let failed = event(
            EventKind::Status,
            BuildStatus::Failed,
            &[("error", "exit status 3"), ("exit_status", "3")],
        );
        assert_eq!(
            state_of(&failed),
            Some((Failed, Some("exit status 3".into()), Some(3)))
        );
        let deadline = event(
            EventKind::Status,
            BuildStatus::Failed,
            &[("error", "not finished after 1s (max_duration)")],
        );
        assert_eq!(state_of(&deadline), Some((Timeout, None, None)));
    }

    #[test]
    fn other_events_and_other_builds_are_skipped() {
        assert_eq!(
            state_of(&event(EventKind::Failing, BuildStatus::Running, &[])),
            None
        );
        let mut foreign = event(EventKind::Status, BuildStatus::Running, &[]);
        foreign.metadata.remove(meta::WORKFLOW);
        assert_eq!(state_of(&foreign), None);
    }
}
