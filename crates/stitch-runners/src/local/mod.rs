//! `local`: runs a queue's shell command as a real child process per build.
//!
//! - Each build runs `sh -c <command>` in `workdir` (default: a fresh
//!   private directory per build under the system temporary directory,
//!   removed when the build ends), in its own process group, optionally as
//!   another account (`run_as`), with a clean environment: the allow-list
//!   [`INHERITED_ENV`] and `LC_*` of stitch's own, the queue's `pass_env`
//!   and `env`, and `STITCH_BUILD_ID`, `STITCH_QUEUE`, `STITCH_BASE` and
//!   `STITCH_HEAD` (JSON arrays) and `STITCH_METADATA` (JSON object).
//! - Output becomes one step of `LogLine`s: a control `start` carrying the
//!   command, one data line per output line tagged `stdout`/`stderr`, a
//!   control `end`.
//! - Exit 0 → `succeeded`; other exit codes → `failed` with `exit_status`;
//!   death by signal → `failed` with `signal`.
//! - When the trigger carries `job_env` (`STITCH_JOB_TOKEN`, `STITCH_SERVER`,
//!   `STITCH_BUILD_ID`), it is added to the command's environment and the
//!   runner hosts a job API for the build in-process (a Unix socket, see
//!   `stitch_job`), setting `STITCH_JOB_API_SOCKET`/`STITCH_JOB_API_TOKEN`,
//!   so `stitch job promise-failure` is debounced per exit status.
//! - Cancel: the build's supervisor sends SIGTERM to the process group,
//!   then SIGKILL after `cancel_grace`; the build ends `cancelled`.
//! - At most `concurrency` builds run per runner; the rest stay `accepted`
//!   and start first come, first served as its slots free.
//! - State lives in `<state_dir>/<build_id>/state.json` (atomic writes)
//!   and `log.jsonl`, so any runner on the directory can answer for any
//!   build. Dropping a runner does not kill running builds — like a crash.
//!
//! Several runners — in several `stitch serve` processes on one machine,
//! or in one process — may share a state directory (ADR 0008):
//!
//! - **trigger** creates the build's state exclusively; a trigger of an id
//!   that exists (from any runner) returns the same ref and starts nothing.
//!   The triggering runner owns the waiting build and starts it when one of
//!   *its* slots frees up: `concurrency` is per runner, not per directory.
//! - The runner running a build holds the build's `flock` (see
//!   `ownership`) for as long as the command runs. A build starts only
//!   under that lock, after re-reading its state as waiting, and "starting"
//!   is recorded before the spawn: a command runs at most once per build.
//! - **status** of a build another runner supervises reads its state file.
//!   A build nobody is in charge of (its lock is free and its owner gone)
//!   is **adopted**: a waiting one is queued here; one that was running or
//!   starting has lost its process and is reported `failed` (or `cancelled`
//!   when that was asked for) with [`PROCESS_LOST`], after SIGKILL to
//!   whatever is left of its process group.
//! - **cancel** drops a `cancel` marker in the build's directory. The
//!   supervising runner notices it within [`CANCEL_POLL`] (at once in the
//!   same runner) and cancels as usual; a build nobody supervises is
//!   cancelled on the spot. The terminal state is written once, by the
//!   lock holder.
//! - **logs** read `log.jsonl`, so they follow a build whichever runner
//!   runs it.
//! - A new runner on the directory recovers what dead runners left: their
//!   waiting builds are queued here, their running ones reported lost.
//!   Builds of live runners are left alone.

mod config;
mod follow;
mod ownership;
mod process;
mod section;
mod state;
mod supervise;

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use nix::sys::signal::Signal;
use stitch_core::{
    async_trait, BuildHandle, BuildId, BuildRunner, BuildStatus, LogLine, LogStream, RunnerError,
    RunnerRef, StatusReport, StepKind, TriggerRequest,
};
use stitch_job::{JobApi, PromiseFailureCoordinator, ServerClient, ServerClientError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::{
    check_pass_env, LocalConfig, LocalConfigError, RunAs, INHERITED_ENV, RESERVED_ENV,
    SCRATCH_PREFIX,
};
pub use ownership::BUILD_LOCK_FILE;
pub use section::LocalSection;
pub use state::{CANCEL_FILE, LOG_FILE, STATE_FILE};
pub use supervise::CANCEL_POLL;

use ownership::{BuildLock, RunnerLock};
use process::{signal_group, Leader, Outcome};
use state::{BuildState, LogWriter, StateDir};
use supervise::{log, note, STEP_ID, STEP_NAME};

/// The reason recorded for builds whose process was lost: the stitch
/// process running them stopped (restart, crash, kill), so nobody watched
/// the command to its end.
pub const PROCESS_LOST: &str =
    "process lost: the stitch process running the build stopped (restarted, crashed or was killed), so its exit status was never recorded";

/// How long a waiting build whose lock was busy for a moment (another
/// runner looking at it) waits before this runner tries to start it again.
const START_RETRY: Duration = Duration::from_millis(20);
/// How often, and how many times, `cancel` retries a waiting build whose
/// lock another runner holds for a moment, to cancel it on the spot. After
/// that the marker stays and whoever takes the lock next applies it.
const CANCEL_LOCK_RETRY: Duration = Duration::from_millis(10);
const CANCEL_LOCK_ATTEMPTS: u32 = 50;

/// Runs builds as local processes. See the module docs.
pub struct LocalRunner {
    shared: Arc<Shared>,
    // Dropped after `Drop::drop` released the build locks: while it is
    // held, other runners leave this runner's waiting builds alone.
    _runner_lock: RunnerLock,
}

/// What the runner and its supervisor tasks share.
pub(crate) struct Shared {
    pub(crate) config: LocalConfig,
    pub(crate) dir: StateDir,
    /// This runner's id, recorded as `owner` on the builds it will start.
    me: String,
    registry: Mutex<Registry>,
    pub(crate) shutdown: CancellationToken,
}

/// Builds this runner is in charge of right now.
#[derive(Default)]
pub(crate) struct Registry {
    /// Builds owned here waiting for a slot, oldest first.
    waiting: VecDeque<BuildId>,
    running: HashMap<BuildId, RunningBuild>,
    /// A delayed `pump` is pending (see `START_RETRY`).
    retry_scheduled: bool,
}

struct RunningBuild {
    cancel: watch::Sender<bool>,
    /// Held for as long as the build runs: tells other runners the build
    /// is supervised, and keeps them from writing its state.
    _lock: BuildLock,
}

/// What `Shared::start` did with a waiting build.
enum Start {
    /// Started, failed to start, or found not to be ours to start any more.
    Done,
    /// Its lock was held by another runner for a moment: try again soon.
    Busy,
}

impl std::fmt::Debug for LocalRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRunner")
            .field("config", &self.shared.config)
            .field("runner_id", &self.shared.me)
            .finish_non_exhaustive()
    }
}

impl Drop for LocalRunner {
    /// Like a crash: supervisors stop watching, commands keep running, and
    /// the build locks are released at once so another runner can report
    /// the builds lost (or adopt the waiting ones once the runner lock goes).
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        let running = std::mem::take(&mut self.shared.lock().running);
        drop(running);
    }
}

impl LocalRunner {
    /// Open (creating if needed) the state directory, register this runner
    /// there, and recover what runners that are gone left: their waiting
    /// builds are queued here, their running ones are reported lost. Builds
    /// of runners still alive (in this or other processes) are left alone.
    /// Builds start once a Tokio runtime is available (at once when called
    /// inside one).
    pub fn new(config: LocalConfig) -> Result<Self, LocalConfigError> {
        config.validate()?;
        let root = config.state_dir.clone();
        let dir_err = |source| LocalConfigError::StateDir {
            path: root.clone(),
            source,
        };
        // Private: state files hold job tokens.
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&root)
            .map_err(dir_err)?;
        ownership::sweep_dead_runners(&root);
        let runner_lock = RunnerLock::acquire(&root).map_err(dir_err)?;
        let shared = Arc::new(Shared {
            dir: StateDir::new(root.clone()),
            me: runner_lock.id().to_string(),
            config,
            registry: Mutex::new(Registry::default()),
            shutdown: CancellationToken::new(),
        });
        let previous = shared.dir.list().map_err(dir_err)?;
        {
            let mut reg = shared.lock();
            for state in previous {
                if state.status.is_terminal() || (state.is_waiting() && shared.owner_alive(&state))
                {
                    continue;
                }
                if let Err(e) = shared.take_charge(&mut reg, &state.build_id) {
                    tracing::warn!(build_id = %state.build_id, error = %e, "cannot recover local build");
                }
            }
        }
        Shared::pump(&shared);
        Ok(Self {
            shared,
            _runner_lock: runner_lock,
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &LocalConfig {
        &self.shared.config
    }

    fn check_ref(handle: &BuildHandle) -> Result<(), RunnerError> {
        match &handle.runner_ref {
            Some(r) if r.id != handle.build_id.as_str() => Err(RunnerError::NotFound(format!(
                "local runner ref {:?} does not belong to build {}",
                r.id, handle.build_id
            ))),
            _ => Ok(()),
        }
    }

    fn not_found(&self, id: &BuildId) -> RunnerError {
        RunnerError::NotFound(format!(
            "build {id} is not in the local runner's state directory {}",
            self.shared.dir.root().display()
        ))
    }

    fn read_known(&self, id: &BuildId) -> Result<BuildState, RunnerError> {
        self.shared.dir.read(id)?.ok_or_else(|| self.not_found(id))
    }
}

/// The build's job API, hosted in this process for as long as its command
/// runs, when the trigger gave the build a way to call back into stitch
/// (`STITCH_SERVER`, `STITCH_BUILD_ID`, `STITCH_JOB_TOKEN`). Without it the
/// command still runs; `stitch job promise-failure` then declares directly.
fn start_job_api(state: &BuildState, run_as: Option<&RunAs>) -> Option<JobApi> {
    let declarer = match ServerClient::from_lookup(|name| state.job_env.get(name).cloned()) {
        Ok(d) => d,
        Err(ServerClientError::MissingEnv(_)) => return None,
        Err(e) => {
            tracing::warn!(build_id = %state.build_id, error = %e, "no job API for this build");
            return None;
        }
    };
    match JobApi::start(PromiseFailureCoordinator::new(Arc::new(declarer))) {
        Ok(api) => {
            if let Some(account) = run_as {
                if let Err(e) = process::hand_over_job_api(api.socket(), account) {
                    tracing::warn!(build_id = %state.build_id, error = %e, "cannot give the job API to the build's account; the build runs without it");
                    return None;
                }
            }
            Some(api)
        }
        Err(e) => {
            tracing::warn!(build_id = %state.build_id, error = %e, "cannot start the job API; the build runs without it");
            None
        }
    }
}

fn runner_ref(id: &BuildId) -> RunnerRef {
    RunnerRef::new(id.as_str())
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        // Registry updates are single inserts/removes; a panic elsewhere
        // cannot leave it half-changed, so a poisoned lock is still usable.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the runner a waiting build belongs to is alive (this one
    /// included). Builds without an owner belong to nobody.
    fn owner_alive(&self, state: &BuildState) -> bool {
        match state.owner.as_deref() {
            None => false,
            Some(owner) if owner == self.me => true,
            Some(owner) => ownership::runner_alive(self.dir.root(), owner),
        }
    }

    /// Start waiting builds while slots are free. Needs a Tokio runtime
    /// (child processes and supervisors live on it); without one it waits
    /// for the next call that has one. A dropped runner starts nothing.
    pub(crate) fn pump(self: &Arc<Self>) {
        if tokio::runtime::Handle::try_current().is_err() || self.shutdown.is_cancelled() {
            return;
        }
        let mut reg = self.lock();
        let mut busy = Vec::new();
        while reg.running.len() < self.config.concurrency {
            let Some(id) = reg.waiting.pop_front() else {
                break;
            };
            if let Start::Busy = self.start(&mut reg, id.clone()) {
                busy.push(id);
            }
        }
        if busy.is_empty() {
            return;
        }
        // Back at the front, in order: they keep their turn.
        for id in busy.into_iter().rev() {
            reg.waiting.push_front(id);
        }
        if !reg.retry_scheduled {
            reg.retry_scheduled = true;
            let weak: Weak<Self> = Arc::downgrade(self);
            tokio::spawn(async move {
                tokio::time::sleep(START_RETRY).await;
                if let Some(shared) = weak.upgrade() {
                    shared.lock().retry_scheduled = false;
                    shared.pump();
                }
            });
        }
    }

    /// Start one waiting build owned here, under its lock, after re-reading
    /// its state as waiting (at most once, across every runner).
    fn start(self: &Arc<Self>, reg: &mut Registry, id: BuildId) -> Start {
        let lock = match self.dir.try_lock(&id) {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                // Another runner holds it: it runs there, or someone is
                // looking at it for a moment.
                return match self.dir.read(&id) {
                    Ok(Some(s)) if s.is_waiting() && s.owner.as_deref() == Some(&self.me) => {
                        Start::Busy
                    }
                    _ => Start::Done,
                };
            }
            Err(e) => {
                // Likely transient (out of file descriptors): keep its turn.
                tracing::warn!(build_id = %id, error = %e, "cannot lock local build to start it; retrying");
                return Start::Busy;
            }
        };
        let mut state = match self.dir.read(&id) {
            // Cancelled or adopted elsewhere while waiting: not ours to start.
            Ok(Some(s)) if s.is_waiting() && s.owner.as_deref() == Some(&self.me) => s,
            Ok(_) => return Start::Done,
            Err(e) => {
                tracing::error!(build_id = %id, error = %e, "cannot start local build");
                return Start::Done;
            }
        };
        if let Some(at) = self.dir.cancel_requested(&id) {
            state.cancel_requested_at = Some(at);
            state.finish(BuildStatus::Cancelled, None);
            self.write_logged(&state);
            return Start::Done;
        }
        let mut writer = self
            .dir
            .open_log(&id)
            .map_err(|e| tracing::warn!(build_id = %id, error = %e, "build log unavailable"))
            .ok();
        let now = Utc::now();
        log(
            &mut writer,
            LogLine::step_start(
                STEP_ID,
                STEP_NAME,
                StepKind::User,
                Some(self.config.command.clone()),
                now,
            ),
        );
        let workdir = match &self.config.workdir {
            Some(dir) => dir.clone(),
            None => match process::create_scratch(id.as_str(), self.config.run_as.as_ref()) {
                Ok(dir) => {
                    state.scratch_dir = Some(dir.clone());
                    dir
                }
                Err(e) => {
                    let reason = format!("could not create the build's working directory: {e}");
                    self.fail_unstarted(&mut writer, &mut state, reason);
                    return Start::Done;
                }
            },
        };
        // Recorded before the spawn: if stitch dies between the spawn and the
        // `running` record below, a restart finds `started_at` without a pid
        // and fails the build as lost instead of running the command twice.
        state.started_at = Some(now);
        if let Err(e) = self.dir.write(&state) {
            state.started_at = None;
            self.fail_unstarted(
                &mut writer,
                &mut state,
                format!("could not record the build's state: {e}"),
            );
            return Start::Done;
        }
        let job_api = start_job_api(&state, self.config.run_as.as_ref());
        let job_api_env = job_api.as_ref().map(|api| api.env()).unwrap_or_default();
        let child = match process::spawn(&self.config, &state, &workdir, &job_api_env) {
            Ok(child) => child,
            Err(e) => {
                let reason = format!("could not start `sh -c` in {}: {e}", workdir.display());
                self.fail_unstarted(&mut writer, &mut state, reason);
                return Start::Done;
            }
        };
        let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
            self.fail_unstarted(
                &mut writer,
                &mut state,
                "the command exited before it could be tracked".into(),
            );
            return Start::Done;
        };
        state.status = BuildStatus::Running;
        state.started_at = Some(now);
        state.pid = Some(pid);
        state.pgid = Some(pid);
        state.proc_start_ticks = process::proc_stat(pid).map(|(_, start)| start);
        if let Err(e) = self.dir.write(&state) {
            // Unrecorded, the process could not be accounted for after a
            // restart; do not let it run.
            let _ = signal_group(pid, Signal::SIGKILL);
            tracing::error!(build_id = %id, error = %e, "cannot record running build; killed it");
            state.status = BuildStatus::Accepted;
            self.fail_unstarted(
                &mut writer,
                &mut state,
                format!("could not record the build's state: {e}"),
            );
            return Start::Done;
        }
        let (cancel, cancel_rx) = watch::channel(false);
        reg.running.insert(
            id.clone(),
            RunningBuild {
                cancel,
                _lock: lock,
            },
        );
        tokio::spawn(supervise::supervise(
            Arc::clone(self),
            id,
            child,
            pid,
            cancel_rx,
            writer,
            job_api,
        ));
        Start::Done
    }

    fn fail_unstarted(
        &self,
        writer: &mut Option<LogWriter>,
        state: &mut BuildState,
        reason: String,
    ) {
        note(writer, &reason);
        log(
            writer,
            LogLine::step_end(STEP_ID, STEP_NAME, StepKind::User, Utc::now()),
        );
        state.finish(BuildStatus::Failed, Some(reason));
        if let Err(e) = self.dir.write(state) {
            tracing::error!(build_id = %state.build_id, error = %e, "cannot record failed start");
        }
        if let Some(dir) = &state.scratch_dir {
            process::remove_scratch(state.build_id.as_str(), dir);
        }
    }

    /// Record a supervised build's end, release its lock and free its
    /// slot. Nothing is recorded when the runner was dropped meanwhile (its
    /// lock is gone; another runner reports the build lost).
    pub(crate) fn finish_running(self: &Arc<Self>, id: &BuildId, outcome: Outcome) {
        {
            let mut reg = self.lock();
            let Some(run) = reg.running.remove(id) else {
                return;
            };
            match self.dir.read(id) {
                Ok(Some(mut state)) => {
                    state.exit_status = outcome.exit_status;
                    state.signal = outcome.signal;
                    if outcome.status == BuildStatus::Cancelled {
                        if let Some(at) = self.dir.cancel_requested(id) {
                            state.cancel_requested_at.get_or_insert(at);
                        }
                    }
                    state.finish(outcome.status, outcome.error);
                    if let Err(e) = self.dir.write(&state) {
                        tracing::error!(build_id = %id, error = %e, "cannot record build outcome");
                    }
                    if let Some(dir) = &state.scratch_dir {
                        process::remove_scratch(id.as_str(), dir);
                    }
                }
                Ok(None) => tracing::error!(build_id = %id, "build state vanished while it ran"),
                Err(e) => {
                    tracing::error!(build_id = %id, error = %e, "cannot record build outcome")
                }
            }
            // Released only now that the outcome is recorded.
            drop(run);
        }
        self.pump();
    }

    /// The build's state as this runner reports it, taking charge of the
    /// build first when nobody else is in charge of it.
    fn observe(&self, reg: &mut Registry, id: &BuildId) -> Result<Option<BuildState>, RunnerError> {
        let Some(state) = self.dir.read(id)? else {
            return Ok(None);
        };
        if state.status.is_terminal() || reg.running.contains_key(id) {
            return Ok(Some(state));
        }
        // A waiting build with a live owner is in good hands, unless a
        // cancel waits to be applied.
        if state.is_waiting() && self.owner_alive(&state) && self.dir.cancel_requested(id).is_none()
        {
            return Ok(Some(state));
        }
        // `None`: its lock is held, so a live runner is at it (running it,
        // or looking at it for a moment): its recorded state is the answer.
        Ok(Some(self.take_charge(reg, id)?.unwrap_or(state)))
    }

    /// Under the build's lock, when it is free, apply the rules for a build
    /// this runner does not supervise: a requested cancel ends a waiting
    /// build; a waiting build whose owner is gone is adopted (queued here);
    /// a build that was running or starting with nobody holding its lock
    /// lost its process. `Ok(None)` when the lock is held elsewhere.
    fn take_charge(
        &self,
        reg: &mut Registry,
        id: &BuildId,
    ) -> Result<Option<BuildState>, RunnerError> {
        let Some(_lock) = self.dir.try_lock(id)? else {
            return Ok(None);
        };
        let Some(mut state) = self.dir.read(id)? else {
            return Ok(None);
        };
        if state.status.is_terminal() {
            return Ok(Some(state));
        }
        let cancel = self.dir.cancel_requested(id);
        if !state.is_waiting() {
            // Accepted with `started_at` set: the spawn may have happened,
            // so the build is treated as lost, never run again.
            return Ok(Some(self.mark_lost(state, cancel)));
        }
        if let Some(at) = cancel {
            reg.waiting.retain(|w| w != id);
            state.cancel_requested_at = Some(at);
            state.finish(BuildStatus::Cancelled, None);
            self.dir.write(&state)?;
            return Ok(Some(state));
        }
        if state.owner.as_deref() != Some(&self.me) {
            if self.owner_alive(&state) {
                return Ok(Some(state));
            }
            state.owner = Some(self.me.clone());
            self.dir.write(&state)?;
        }
        if !reg.waiting.contains(id) {
            reg.waiting.push_back(id.clone());
        }
        Ok(Some(state))
    }

    /// A build recorded as running (or starting) whose process nobody
    /// watches any more. Called under the build's lock.
    fn mark_lost(&self, mut state: BuildState, cancel: Option<DateTime<Utc>>) -> BuildState {
        let mut reason = PROCESS_LOST.to_string();
        if state.pid.is_none() {
            reason.push_str(
                " (stitch stopped while starting the command; it is not started again in case it ran)",
            );
        }
        if let (Some(pid), Some(pgid)) = (state.pid, state.pgid) {
            // Reused means the pid is someone else's now and our group is
            // long gone; anything else may still have members to stop.
            if process::leader(pid, state.proc_start_ticks) != Leader::Reused
                && signal_group(pgid, Signal::SIGKILL).unwrap_or(false)
            {
                reason.push_str("; processes left in its process group were sent SIGKILL");
            }
        }
        let mut writer = self.dir.open_log(&state.build_id).ok();
        note(&mut writer, &reason);
        log(
            &mut writer,
            LogLine::step_end(STEP_ID, STEP_NAME, StepKind::User, Utc::now()),
        );
        if let Some(at) = cancel {
            state.cancel_requested_at.get_or_insert(at);
        }
        let cancelled = state.cancel_requested_at.is_some();
        let status = if cancelled {
            BuildStatus::Cancelled
        } else {
            BuildStatus::Failed
        };
        state.finish(status, Some(reason));
        self.write_logged(&state);
        if let Some(dir) = &state.scratch_dir {
            process::remove_scratch(state.build_id.as_str(), dir);
        }
        state
    }

    fn write_logged(&self, state: &BuildState) {
        if let Err(e) = self.dir.write(state) {
            tracing::error!(build_id = %state.build_id, error = %e, "cannot record build state");
        }
    }
}

#[async_trait]
impl BuildRunner for LocalRunner {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn trigger(&self, req: &TriggerRequest) -> Result<RunnerRef, RunnerError> {
        req.validate()
            .map_err(|e| RunnerError::InvalidRequest(e.to_string()))?;
        {
            let mut reg = self.shared.lock();
            // The state directory is the idempotency record, shared by every
            // runner on it and surviving restarts: only the runner whose
            // create wins queues the build, so a re-trigger, here or
            // elsewhere, never starts a second process.
            let state = BuildState::accepted(req, Utc::now(), &self.shared.me);
            if self.shared.dir.create(&state)? {
                reg.waiting.push_back(req.build_id.clone());
            } else {
                // A redelivered trigger may be the first sign that the
                // runner that created the build is gone.
                self.shared.observe(&mut reg, &req.build_id)?;
            }
        }
        Shared::pump(&self.shared);
        Ok(runner_ref(&req.build_id))
    }

    async fn status(&self, handle: &BuildHandle) -> Result<StatusReport, RunnerError> {
        Self::check_ref(handle)?;
        Shared::pump(&self.shared);
        let state = {
            let mut reg = self.shared.lock();
            self.shared.observe(&mut reg, &handle.build_id)?
        };
        let state = state.ok_or_else(|| self.not_found(&handle.build_id))?;
        // A build adopted above may be able to start right away.
        Shared::pump(&self.shared);
        Ok(state.report())
    }

    async fn cancel(&self, handle: &BuildHandle) -> Result<(), RunnerError> {
        Self::check_ref(handle)?;
        let id = &handle.build_id;
        if self.read_known(id)?.status.is_terminal() {
            return Ok(());
        }
        // The marker first: whoever is in charge of the build, here or in
        // another runner, acts on it; a build that ends now records it.
        self.shared.dir.request_cancel(id)?;
        if let Some(run) = self.shared.lock().running.get(id) {
            run.cancel.send_replace(true);
            return Ok(());
        }
        for _ in 0..CANCEL_LOCK_ATTEMPTS {
            let taken = {
                let mut reg = self.shared.lock();
                self.shared.take_charge(&mut reg, id)?
            };
            if taken.is_some() {
                return Ok(());
            }
            // Held elsewhere. A supervisor notices the marker by itself;
            // a waiting build's lock is only held for a moment.
            if !self.read_known(id)?.is_waiting() {
                return Ok(());
            }
            tokio::time::sleep(CANCEL_LOCK_RETRY).await;
        }
        Ok(())
    }

    async fn logs(&self, handle: &BuildHandle) -> Result<LogStream, RunnerError> {
        Self::check_ref(handle)?;
        self.read_known(&handle.build_id)?;
        Ok(follow::follow(
            self.shared.dir.clone(),
            handle.build_id.clone(),
        ))
    }
}

/// Deletes a finished build's directory (state, log, markers) from the
/// local runners' state directory `state_dir`: what retention calls once
/// stitch deleted the build. Needs no runner, so `stitch gc` can call it
/// beside a running server. `Ok(false)` when there is none; a build not
/// terminal there, or in the charge of a runner (its lock is held), is
/// [`RunnerError::InvalidRequest`] and keeps its state. Blocking file I/O.
pub fn forget_build(state_dir: &Path, id: &BuildId) -> Result<bool, RunnerError> {
    StateDir::new(state_dir.to_path_buf()).forget(id)
}
