//! `local`: runs a queue's shell command as a real child process per build.
//!
//! - Each build runs `sh -c <command>` in `workdir`, in its own process
//!   group, with `STITCH_BUILD_ID`, `STITCH_QUEUE`, `STITCH_BASE` and
//!   `STITCH_HEAD` (JSON arrays) and `STITCH_METADATA` (JSON object) on top
//!   of the configured `env`.
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
//! - Cancel sends SIGTERM to the process group, then SIGKILL after
//!   `cancel_grace`; the build ends `cancelled`.
//! - At most `concurrency` builds run; the rest stay `accepted` and start
//!   first come, first served as slots free.
//! - Restart safety: state lives in `<state_dir>/<build_id>/state.json`
//!   (atomic writes) and `log.jsonl`. A new runner on the same directory
//!   starts builds that were still waiting, and reports builds that were
//!   running (their process can no longer be watched) as `failed` with an
//!   `error` saying so, killing whatever is left of their process group.
//!   Dropping a runner does not kill running builds — like a crash.
//!
//! One runner owns a state directory at a time (an exclusive `flock` on
//! `<state_dir>/.lock`).

mod config;
mod follow;
mod process;
mod state;
mod supervise;

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::Utc;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::Signal;
use stitch_core::{
    async_trait, BuildHandle, BuildId, BuildRunner, BuildStatus, LogLine, LogStream, RunnerError,
    RunnerRef, StatusReport, StepKind, TriggerRequest,
};
use stitch_job::{JobApi, PromiseFailureCoordinator, ServerClient, ServerClientError};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

pub use config::{LocalConfig, LocalConfigError, RESERVED_ENV};
pub use state::{LOG_FILE, STATE_FILE};

use process::{signal_group, Leader, Outcome};
use state::{BuildState, LogWriter, StateDir};
use supervise::{log, note, STEP_ID, STEP_NAME};

/// The reason recorded for builds whose process a restart lost.
pub const PROCESS_LOST: &str =
    "process lost: stitch restarted while the build was running, so its exit status was never recorded";

/// Runs builds as local processes. See the module docs.
pub struct LocalRunner {
    shared: Arc<Shared>,
    // Field order is drop order: stop the supervisors, then unlock.
    _stop_supervisors: DropGuard,
    _dir_lock: Flock<File>,
}

/// What the runner and its supervisor tasks share.
pub(crate) struct Shared {
    pub(crate) config: LocalConfig,
    dir: StateDir,
    registry: Mutex<Registry>,
    pub(crate) shutdown: CancellationToken,
}

/// Builds this runner is responsible for right now. Every state-file write
/// happens under this lock, so read-modify-write never loses an update.
#[derive(Default)]
pub(crate) struct Registry {
    /// Accepted builds waiting for a slot, oldest first.
    waiting: VecDeque<BuildId>,
    running: HashMap<BuildId, RunningBuild>,
}

struct RunningBuild {
    /// `None` once the process was reaped: its group id may be reused.
    pgid: Option<i32>,
    cancel: watch::Sender<bool>,
}

impl Registry {
    pub(crate) fn forget_pgid(&mut self, id: &BuildId) {
        if let Some(r) = self.running.get_mut(id) {
            r.pgid = None;
        }
    }

    fn knows(&self, id: &BuildId) -> bool {
        self.running.contains_key(id) || self.waiting.contains(id)
    }
}

impl std::fmt::Debug for LocalRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRunner")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl LocalRunner {
    /// Open (creating if needed) the state directory, take its lock, and
    /// recover what a previous runner left: waiting builds are queued again,
    /// running ones are reported lost. Builds start once a Tokio runtime is
    /// available (at once when called inside one).
    pub fn new(config: LocalConfig) -> Result<Self, LocalConfigError> {
        config.validate()?;
        let root = config.state_dir.clone();
        let dir_err = |source| LocalConfigError::StateDir {
            path: root.clone(),
            source,
        };
        std::fs::create_dir_all(&root).map_err(dir_err)?;
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(".lock"))
            .map_err(dir_err)?;
        let dir_lock =
            Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
                match errno {
                    nix::errno::Errno::EWOULDBLOCK => {
                        LocalConfigError::StateDirInUse { path: root.clone() }
                    }
                    other => dir_err(other.into()),
                }
            })?;
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            dir: StateDir::new(root.clone()),
            config,
            registry: Mutex::new(Registry::default()),
            shutdown: shutdown.clone(),
        });
        let previous = shared.dir.list().map_err(dir_err)?;
        {
            let mut reg = shared.lock();
            for state in previous {
                if !state.status.is_terminal() {
                    shared.reconcile(&mut reg, state, false);
                }
            }
        }
        Shared::pump(&shared);
        Ok(Self {
            shared,
            _stop_supervisors: shutdown.drop_guard(),
            _dir_lock: dir_lock,
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
}

/// The build's job API, hosted in this process for as long as its command
/// runs, when the trigger gave the build a way to call back into stitch
/// (`STITCH_SERVER`, `STITCH_BUILD_ID`, `STITCH_JOB_TOKEN`). Without it the
/// command still runs; `stitch job promise-failure` then declares directly.
fn start_job_api(state: &BuildState) -> Option<JobApi> {
    let declarer = match ServerClient::from_lookup(|name| state.job_env.get(name).cloned()) {
        Ok(d) => d,
        Err(ServerClientError::MissingEnv(_)) => return None,
        Err(e) => {
            tracing::warn!(build_id = %state.build_id, error = %e, "no job API for this build");
            return None;
        }
    };
    match JobApi::start(PromiseFailureCoordinator::new(Arc::new(declarer))) {
        Ok(api) => Some(api),
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

    /// Start waiting builds while slots are free. Needs a Tokio runtime
    /// (child processes and supervisors live on it); without one it waits
    /// for the next call that has one.
    pub(crate) fn pump(self: &Arc<Self>) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let mut reg = self.lock();
        while reg.running.len() < self.config.concurrency {
            let Some(id) = reg.waiting.pop_front() else {
                break;
            };
            self.start(&mut reg, id);
        }
    }

    fn start(self: &Arc<Self>, reg: &mut Registry, id: BuildId) {
        let mut state = match self.dir.read(&id) {
            Ok(Some(s)) if s.status == BuildStatus::Accepted && s.started_at.is_none() => s,
            Ok(_) => return, // cancelled while waiting
            Err(e) => {
                tracing::error!(build_id = %id, error = %e, "cannot start local build");
                return;
            }
        };
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
            return;
        }
        let job_api = start_job_api(&state);
        let job_api_env = job_api.as_ref().map(|api| api.env()).unwrap_or_default();
        let child = match process::spawn(&self.config, &state, &job_api_env) {
            Ok(child) => child,
            Err(e) => {
                let reason = format!(
                    "could not start `sh -c` in {}: {e}",
                    self.config.workdir.display()
                );
                self.fail_unstarted(&mut writer, &mut state, reason);
                return;
            }
        };
        let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
            self.fail_unstarted(
                &mut writer,
                &mut state,
                "the command exited before it could be tracked".into(),
            );
            return;
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
            return;
        }
        let (cancel, cancel_rx) = watch::channel(false);
        reg.running.insert(
            id.clone(),
            RunningBuild {
                pgid: Some(pid),
                cancel,
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
    }

    /// Record a supervised build's end and free its slot.
    pub(crate) fn finish_running(self: &Arc<Self>, id: &BuildId, outcome: Outcome) {
        {
            let mut reg = self.lock();
            match self.dir.read(id) {
                Ok(Some(mut state)) => {
                    state.exit_status = outcome.exit_status;
                    state.signal = outcome.signal;
                    state.finish(outcome.status, outcome.error);
                    if let Err(e) = self.dir.write(&state) {
                        tracing::error!(build_id = %id, error = %e, "cannot record build outcome");
                    }
                }
                Ok(None) => tracing::error!(build_id = %id, "build state vanished while it ran"),
                Err(e) => {
                    tracing::error!(build_id = %id, error = %e, "cannot record build outcome")
                }
            }
            reg.running.remove(id);
        }
        self.pump();
    }

    /// Take charge of a non-terminal build this runner did not know:
    /// left behind by an earlier runner on the same directory. Waiting
    /// builds are queued (or cancelled); running ones are lost.
    fn reconcile(&self, reg: &mut Registry, mut state: BuildState, cancel: bool) -> BuildState {
        // Accepted with `started_at` set: the spawn may have happened before
        // stitch stopped, so the build is treated as lost, never re-run.
        if state.status == BuildStatus::Accepted && state.started_at.is_none() {
            if cancel {
                state.cancel_requested_at = Some(Utc::now());
                state.finish(BuildStatus::Cancelled, None);
                self.write_logged(&state);
            } else {
                reg.waiting.push_back(state.build_id.clone());
            }
            return state;
        }
        self.mark_lost(state, cancel)
    }

    /// A build recorded as running whose process nobody watches any more.
    fn mark_lost(&self, mut state: BuildState, cancel: bool) -> BuildState {
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
        let cancelled = cancel || state.cancel_requested_at.is_some();
        let status = if cancelled {
            BuildStatus::Cancelled
        } else {
            BuildStatus::Failed
        };
        state.finish(status, Some(reason));
        self.write_logged(&state);
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
            // The state directory is the idempotency record: it survives
            // restarts, so a re-trigger never starts a second process.
            if self.shared.dir.read(&req.build_id)?.is_none() {
                let state = BuildState::accepted(req, Utc::now());
                self.shared.dir.write(&state)?;
                reg.waiting.push_back(req.build_id.clone());
            }
        }
        Shared::pump(&self.shared);
        Ok(runner_ref(&req.build_id))
    }

    async fn status(&self, handle: &BuildHandle) -> Result<StatusReport, RunnerError> {
        Self::check_ref(handle)?;
        Shared::pump(&self.shared);
        let report = {
            let mut reg = self.shared.lock();
            let state = self
                .shared
                .dir
                .read(&handle.build_id)?
                .ok_or_else(|| self.not_found(&handle.build_id))?;
            let state = if state.status.is_terminal() || reg.knows(&handle.build_id) {
                state
            } else {
                self.shared.reconcile(&mut reg, state, false)
            };
            state.report()
        };
        // A build adopted above may be able to start right away.
        Shared::pump(&self.shared);
        Ok(report)
    }

    async fn cancel(&self, handle: &BuildHandle) -> Result<(), RunnerError> {
        Self::check_ref(handle)?;
        let id = &handle.build_id;
        let mut reg = self.shared.lock();
        let mut state = self
            .shared
            .dir
            .read(id)?
            .ok_or_else(|| self.not_found(id))?;
        if state.status.is_terminal() {
            return Ok(());
        }
        if let Some(pos) = reg.waiting.iter().position(|w| w == id) {
            reg.waiting.remove(pos);
            state.cancel_requested_at = Some(Utc::now());
            state.finish(BuildStatus::Cancelled, None);
            return self.shared.dir.write(&state);
        }
        if let Some(run) = reg.running.get(id) {
            run.cancel.send_replace(true);
            if let Some(pgid) = run.pgid {
                signal_group(pgid, Signal::SIGTERM).map_err(|e| {
                    RunnerError::Internal(format!("sending SIGTERM to process group {pgid}: {e}"))
                })?;
            }
            if state.cancel_requested_at.is_none() {
                state.cancel_requested_at = Some(Utc::now());
                self.shared.dir.write(&state)?;
            }
            return Ok(());
        }
        self.shared.reconcile(&mut reg, state, true);
        Ok(())
    }

    async fn logs(&self, handle: &BuildHandle) -> Result<LogStream, RunnerError> {
        Self::check_ref(handle)?;
        if self.shared.dir.read(&handle.build_id)?.is_none() {
            return Err(self.not_found(&handle.build_id));
        }
        Ok(follow::follow(
            self.shared.dir.clone(),
            handle.build_id.clone(),
        ))
    }
}
