//! `noop`: a runner that does no work and reports every build succeeded.
//! A baseline for wiring tests and benchmarks (the best case where every
//! build passes at once).

use stitch_core::{
    async_trait, BuildHandle, BuildRunner, BuildStatus, RunnerError, RunnerRef, StatusReport,
    TriggerRequest,
};

/// The ref id prefix; the rest is the build id.
const REF_PREFIX: &str = "noop-";

/// Succeeds at once. Stateless: the ref is `noop-<build id>`, so ids are
/// unique per build, triggering the same build id again returns the same ref
/// on any instance, and `status` needs nothing but the ref.
///
/// Because it keeps nothing, it can only find a build through its ref:
/// `status`/`cancel` without a ref (or with a ref for another build) are
/// [`RunnerError::NotFound`]. Re-triggering is always safe instead.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopRunner;

impl NoopRunner {
    /// A noop runner.
    pub fn new() -> Self {
        Self
    }

    fn check_ref(handle: &BuildHandle) -> Result<(), RunnerError> {
        let expected = format!("{REF_PREFIX}{}", handle.build_id);
        match &handle.runner_ref {
            Some(r) if r.id == expected => Ok(()),
            Some(r) => Err(RunnerError::NotFound(format!(
                "noop runner ref {:?} does not belong to build {}",
                r.id, handle.build_id
            ))),
            None => Err(RunnerError::NotFound(format!(
                "noop runner keeps no state and finds builds only by their ref; \
                 build {} has none (triggering it again is safe)",
                handle.build_id
            ))),
        }
    }
}

#[async_trait]
impl BuildRunner for NoopRunner {
    fn name(&self) -> &'static str {
        "noop"
    }

    async fn trigger(&self, req: &TriggerRequest) -> Result<RunnerRef, RunnerError> {
        req.validate()
            .map_err(|e| RunnerError::InvalidRequest(e.to_string()))?;
        Ok(RunnerRef::new(format!("{REF_PREFIX}{}", req.build_id)))
    }

    async fn status(&self, handle: &BuildHandle) -> Result<StatusReport, RunnerError> {
        Self::check_ref(handle)?;
        Ok(StatusReport::new(BuildStatus::Succeeded))
    }

    async fn cancel(&self, handle: &BuildHandle) -> Result<(), RunnerError> {
        // Every noop build is already terminal, so cancel is always a no-op.
        Self::check_ref(handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;
    use stitch_core::{BuildId, ChangeSet};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ids_are_unique_under_1000_concurrent_triggers() {
        let runner = Arc::new(NoopRunner::new());
        let tasks: Vec<_> = (0..1000)
            .map(|i| {
                let runner = Arc::clone(&runner);
                tokio::spawn(async move {
                    let req = TriggerRequest::new(
                        BuildId::new(),
                        "q",
                        ChangeSet::head_only([format!("c/{i}")]),
                    );
                    runner.trigger(&req).await.unwrap()
                })
            })
            .collect();
        let mut ids = HashSet::new();
        for t in tasks {
            assert!(ids.insert(t.await.unwrap().id), "duplicate ref id");
        }
        assert_eq!(ids.len(), 1000);
    }

    #[tokio::test]
    async fn bad_requests_are_invalid() {
        let req = TriggerRequest::new(BuildId::new(), "q", ChangeSet::default());
        let err = NoopRunner::new().trigger(&req).await.unwrap_err();
        assert!(
            matches!(&err, RunnerError::InvalidRequest(m) if m.contains("head")),
            "{err}"
        );
    }
}
