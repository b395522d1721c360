//! The runner conformance suite: the `BuildRunner` contract as executable
//! checks. Every runner passes it; a new runner's tests call it with a
//! [`Subject`] describing how to make runners and requests.
//!
//! Checks poll `status` with a bounded deadline; none sleeps to assert.
//! A check whose scenario the runner cannot produce (a noop build cannot
//! fail) is [`Checked::Skipped`].

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use stitch_core::{
    BuildHandle, BuildId, BuildRunner, BuildStatus, LogKind, RunnerError, RunnerRef, StatusReport,
    StepStatus, TriggerRequest,
};
use tokio::time::Instant;

/// What a trigger request should make the build do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scenario {
    /// Finish `succeeded` within the deadline.
    Succeed,
    /// Finish `failed` within the deadline.
    Fail,
    /// Reach `running` and stay there far longer than the deadline.
    RunLong,
    /// Reach a provider state stitch does not know (reported `unknown`).
    UnknownState,
}

/// A runner under test: how to make one, and how to ask it for each
/// [`Scenario`].
pub struct Subject {
    new_runner: Box<dyn Fn() -> Arc<dyn BuildRunner> + Send + Sync>,
    request: Box<dyn Fn(Scenario) -> Option<TriggerRequest> + Send + Sync>,
    deadline: Duration,
    poll: Duration,
}

impl Subject {
    /// `new_runner` makes a fresh runner for each check; `request` returns
    /// a request with a **fresh build id** for the scenario, or `None` when
    /// the runner cannot produce it. Deadline 30 s, polling every 50 ms.
    pub fn new(
        new_runner: impl Fn() -> Arc<dyn BuildRunner> + Send + Sync + 'static,
        request: impl Fn(Scenario) -> Option<TriggerRequest> + Send + Sync + 'static,
    ) -> Self {
        Self {
            new_runner: Box::new(new_runner),
            request: Box::new(request),
            deadline: Duration::from_secs(30),
            poll: Duration::from_millis(50),
        }
    }

    /// Builder: how long a check waits for an expected status.
    #[must_use]
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Builder: how often a waiting check polls `status`.
    #[must_use]
    pub fn with_poll_interval(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }
}

/// A check that did not hold.
#[derive(Debug, thiserror::Error)]
#[error("conformance check `{check}` failed: {message}")]
pub struct ConformanceFailure {
    /// The check's name.
    pub check: &'static str,
    /// What went wrong.
    pub message: String,
}

/// How a check ended when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checked {
    /// The contract held.
    Passed,
    /// The runner cannot produce the scenario the check needs.
    Skipped(Scenario),
    /// The check is about logs and the runner has none (`NotSupported`).
    NoLogs,
}

type CheckResult = Result<Checked, ConformanceFailure>;

struct Ctx<'a> {
    check: &'static str,
    subject: &'a Subject,
    runner: Arc<dyn BuildRunner>,
}

impl<'a> Ctx<'a> {
    fn new(check: &'static str, subject: &'a Subject) -> Self {
        Self {
            check,
            subject,
            runner: (subject.new_runner)(),
        }
    }

    fn fail(&self, message: impl Into<String>) -> ConformanceFailure {
        ConformanceFailure {
            check: self.check,
            message: format!("[{} runner] {}", self.runner.name(), message.into()),
        }
    }

    fn request(&self, scenario: Scenario) -> Option<TriggerRequest> {
        (self.subject.request)(scenario)
    }

    async fn trigger(&self, req: &TriggerRequest) -> Result<BuildHandle, ConformanceFailure> {
        let r = self
            .runner
            .trigger(req)
            .await
            .map_err(|e| self.fail(format!("trigger failed: {e}")))?;
        Ok(req.handle().with_ref(r))
    }

    async fn status(&self, handle: &BuildHandle) -> Result<StatusReport, ConformanceFailure> {
        self.runner
            .status(handle)
            .await
            .map_err(|e| self.fail(format!("status failed: {e}")))
    }

    /// Poll until `want` holds; a terminal status that does not satisfy it
    /// ends the wait early.
    async fn wait_for(
        &self,
        handle: &BuildHandle,
        what: &str,
        want: impl Fn(BuildStatus) -> bool,
    ) -> Result<StatusReport, ConformanceFailure> {
        let deadline = Instant::now() + self.subject.deadline;
        loop {
            let report = self.status(handle).await?;
            if want(report.status) {
                return Ok(report);
            }
            if report.status.is_terminal() {
                return Err(self.fail(format!(
                    "waited for {what} but the build ended {} ({:?})",
                    report.status, report.metadata
                )));
            }
            if Instant::now() >= deadline {
                return Err(self.fail(format!(
                    "build still {} after {:?}; expected {what}",
                    report.status, self.subject.deadline
                )));
            }
            // Polled: the suite knows a runner only through the
            // `BuildRunner` contract, which announces no change of a
            // build; asking `status` again is the only way to see one.
            tokio::time::sleep(self.subject.poll).await;
        }
    }

    async fn expect_terminal(
        &self,
        handle: &BuildHandle,
        expected: BuildStatus,
    ) -> Result<StatusReport, ConformanceFailure> {
        let report = self
            .wait_for(handle, &format!("{expected}"), BuildStatus::is_terminal)
            .await?;
        if report.status != expected {
            return Err(self.fail(format!(
                "expected {expected}, got {} ({:?})",
                report.status, report.metadata
            )));
        }
        // Terminal is final: asking again must not change the answer.
        let again = self.status(handle).await?;
        if again.status != expected {
            return Err(self.fail(format!("terminal {expected} turned into {}", again.status)));
        }
        Ok(report)
    }
}

/// A build triggered to succeed ends `succeeded`, and stays so.
pub async fn succeeding_build_succeeds(subject: &Subject) -> CheckResult {
    terminal_outcome(
        subject,
        "succeeding_build_succeeds",
        Scenario::Succeed,
        BuildStatus::Succeeded,
    )
    .await
}

/// A build triggered to fail ends `failed`, and stays so.
pub async fn failing_build_fails(subject: &Subject) -> CheckResult {
    terminal_outcome(
        subject,
        "failing_build_fails",
        Scenario::Fail,
        BuildStatus::Failed,
    )
    .await
}

async fn terminal_outcome(
    subject: &Subject,
    check: &'static str,
    scenario: Scenario,
    expected: BuildStatus,
) -> CheckResult {
    let ctx = Ctx::new(check, subject);
    let Some(req) = ctx.request(scenario) else {
        return Ok(Checked::Skipped(scenario));
    };
    let handle = ctx.trigger(&req).await?;
    ctx.expect_terminal(&handle, expected).await?;
    Ok(Checked::Passed)
}

/// Cancelling a running build ends it `cancelled`.
pub async fn cancel_running_build(subject: &Subject) -> CheckResult {
    let ctx = Ctx::new("cancel_running_build", subject);
    let Some(req) = ctx.request(Scenario::RunLong) else {
        return Ok(Checked::Skipped(Scenario::RunLong));
    };
    let handle = ctx.trigger(&req).await?;
    ctx.wait_for(&handle, "running", |s| s == BuildStatus::Running)
        .await?;
    ctx.runner
        .cancel(&handle)
        .await
        .map_err(|e| ctx.fail(format!("cancel failed: {e}")))?;
    ctx.expect_terminal(&handle, BuildStatus::Cancelled).await?;
    // Cancelling again is a no-op on the now terminal build.
    ctx.runner
        .cancel(&handle)
        .await
        .map_err(|e| ctx.fail(format!("second cancel failed: {e}")))?;
    ctx.expect_terminal(&handle, BuildStatus::Cancelled).await?;
    Ok(Checked::Passed)
}

/// Cancelling a build that already finished succeeds and changes nothing.
pub async fn cancel_terminal_build_is_noop(subject: &Subject) -> CheckResult {
    let ctx = Ctx::new("cancel_terminal_build_is_noop", subject);
    let Some(req) = ctx.request(Scenario::Succeed) else {
        return Ok(Checked::Skipped(Scenario::Succeed));
    };
    let handle = ctx.trigger(&req).await?;
    ctx.expect_terminal(&handle, BuildStatus::Succeeded).await?;
    ctx.runner
        .cancel(&handle)
        .await
        .map_err(|e| ctx.fail(format!("cancel of a terminal build failed: {e}")))?;
    ctx.expect_terminal(&handle, BuildStatus::Succeeded).await?;
    Ok(Checked::Passed)
}

/// Triggering the same build id again — one after the other and
/// concurrently — returns the same ref, and the build is reachable by it.
pub async fn trigger_is_idempotent(subject: &Subject) -> CheckResult {
    let ctx = Ctx::new("trigger_is_idempotent", subject);
    let Some(req) = ctx.request(Scenario::Succeed) else {
        return Ok(Checked::Skipped(Scenario::Succeed));
    };
    let first = ctx.trigger(&req).await?;
    let again = ctx.trigger(&req).await?;
    if again.runner_ref != first.runner_ref {
        return Err(ctx.fail(format!(
            "second trigger returned {:?}, first {:?}",
            again.runner_ref, first.runner_ref
        )));
    }
    let concurrent = futures::future::join_all((0..8).map(|_| ctx.runner.trigger(&req))).await;
    for r in concurrent {
        let r: RunnerRef = r.map_err(|e| ctx.fail(format!("concurrent trigger failed: {e}")))?;
        if Some(&r) != first.runner_ref.as_ref() {
            return Err(ctx.fail(format!(
                "concurrent trigger returned {r:?}, first {:?}",
                first.runner_ref
            )));
        }
    }
    ctx.expect_terminal(&first, BuildStatus::Succeeded).await?;
    Ok(Checked::Passed)
}

/// `status` of a build the runner never created is `NotFound` — with no
/// ref, and with a ref that belongs to another build.
pub async fn unknown_build_is_not_found(subject: &Subject) -> CheckResult {
    let ctx = Ctx::new("unknown_build_is_not_found", subject);
    let stranger = BuildHandle::new(BuildId::new(), "conformance");
    match ctx.runner.status(&stranger).await {
        Err(RunnerError::NotFound(_)) => {}
        other => {
            return Err(ctx.fail(format!(
                "status without a ref: expected NotFound, got {other:?}"
            )))
        }
    }
    if let Some(req) = ctx.request(Scenario::Succeed) {
        let real = ctx.trigger(&req).await?;
        let borrowed = BuildHandle {
            runner_ref: real.runner_ref,
            ..stranger
        };
        match ctx.runner.status(&borrowed).await {
            Err(RunnerError::NotFound(_)) => {}
            other => {
                return Err(ctx.fail(format!(
                    "status with another build's ref: expected NotFound, got {other:?}"
                )))
            }
        }
    }
    Ok(Checked::Passed)
}

/// A provider state the runner does not recognise is reported `unknown`,
/// which is not terminal.
pub async fn unknown_state_is_unknown(subject: &Subject) -> CheckResult {
    let ctx = Ctx::new("unknown_state_is_unknown", subject);
    let Some(req) = ctx.request(Scenario::UnknownState) else {
        return Ok(Checked::Skipped(Scenario::UnknownState));
    };
    let handle = ctx.trigger(&req).await?;
    ctx.wait_for(&handle, "unknown", |s| s == BuildStatus::Unknown)
        .await?;
    // Leave nothing running behind; unknown builds can still be cancelled.
    let _ = ctx.runner.cancel(&handle).await;
    Ok(Checked::Passed)
}

/// For runners with logs: the log of a finished build is a finite stream
/// whose steps are opened before they are closed and whose data lines name
/// their stream.
pub async fn finished_build_log_is_complete(subject: &Subject) -> CheckResult {
    let ctx = Ctx::new("finished_build_log_is_complete", subject);
    let Some(req) = ctx.request(Scenario::Succeed) else {
        return Ok(Checked::Skipped(Scenario::Succeed));
    };
    let handle = ctx.trigger(&req).await?;
    ctx.expect_terminal(&handle, BuildStatus::Succeeded).await?;
    let stream = match ctx.runner.logs(&handle).await {
        Err(RunnerError::NotSupported) => return Ok(Checked::NoLogs),
        Err(e) => return Err(ctx.fail(format!("logs failed: {e}"))),
        Ok(s) => s,
    };
    let lines = tokio::time::timeout(subject.deadline, stream.collect::<Vec<_>>())
        .await
        .map_err(|_| ctx.fail("the log of a finished build did not end"))?;
    let mut open = std::collections::BTreeSet::new();
    let mut closed = 0;
    for line in lines {
        let line = line.map_err(|e| ctx.fail(format!("log stream error: {e}")))?;
        match (line.kind, line.step_status) {
            (LogKind::Control, Some(StepStatus::Start)) => {
                open.insert(line.step_id);
            }
            (LogKind::Control, Some(StepStatus::End)) => {
                if !open.remove(&line.step_id) {
                    return Err(ctx.fail(format!("step {} ended without starting", line.step_id)));
                }
                closed += 1;
            }
            (LogKind::Data, _) if line.stream.is_none() => {
                return Err(ctx.fail(format!("data line without stream: {line:?}")));
            }
            _ => {}
        }
    }
    if !open.is_empty() || closed == 0 {
        return Err(ctx.fail(format!(
            "unbalanced steps: {closed} closed, {open:?} left open"
        )));
    }
    Ok(Checked::Passed)
}

/// Every check by name, in the order [`run_all`] runs them.
pub const CHECKS: [&str; 8] = [
    "succeeding_build_succeeds",
    "failing_build_fails",
    "cancel_running_build",
    "cancel_terminal_build_is_noop",
    "trigger_is_idempotent",
    "unknown_build_is_not_found",
    "unknown_state_is_unknown",
    "finished_build_log_is_complete",
];

/// Run every check in turn; the first failure stops the run. Returns each
/// check's name and result.
pub async fn run_all(
    subject: &Subject,
) -> Result<Vec<(&'static str, Checked)>, ConformanceFailure> {
    Ok(vec![
        (CHECKS[0], succeeding_build_succeeds(subject).await?),
        (CHECKS[1], failing_build_fails(subject).await?),
        (CHECKS[2], cancel_running_build(subject).await?),
        (CHECKS[3], cancel_terminal_build_is_noop(subject).await?),
        (CHECKS[4], trigger_is_idempotent(subject).await?),
        (CHECKS[5], unknown_build_is_not_found(subject).await?),
        (CHECKS[6], unknown_state_is_unknown(subject).await?),
        (CHECKS[7], finished_build_log_is_complete(subject).await?),
    ])
}
