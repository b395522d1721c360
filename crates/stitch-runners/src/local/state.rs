//! The on-disk record of local builds: `<state_dir>/<build_id>/state.json`
//! (created exclusively, then rewritten atomically: temp file, fsync,
//! rename), `log.jsonl` beside it, and the `cancel` marker any runner may
//! drop to ask the build's supervisor to cancel it. Everything another
//! runner (or a restarted one) needs is here; memory is only a cache.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use stitch_core::metadata::keys;
use stitch_core::{BuildId, BuildMetadata, BuildStatus, LogLine, RunnerError, StatusReport};

use super::ownership::{self, BuildLock};

/// Name of the state file inside a build's directory.
pub const STATE_FILE: &str = "state.json";
/// Name of the log file inside a build's directory.
pub const LOG_FILE: &str = "log.jsonl";
/// Name of the cancel-request marker inside a build's directory: its
/// presence asks whoever is in charge of the build to cancel it.
pub const CANCEL_FILE: &str = "cancel";
/// Format version written to every state file.
const STATE_VERSION: u32 = 1;

/// One build's durable state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BuildState {
    pub version: u32,
    pub build_id: BuildId,
    pub queue: String,
    pub base: Vec<String>,
    pub head: Vec<String>,
    pub metadata: BuildMetadata,
    /// accepted → running → succeeded | failed | cancelled.
    pub status: BuildStatus,
    pub accepted_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgid: Option<i32>,
    /// The leader's start time in clock ticks since boot (Linux), so a
    /// restarted runner can tell our process from a later one with the
    /// same pid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proc_start_ticks: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_requested_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the job needs to call back into stitch (`STITCH_JOB_TOKEN`, …):
    /// kept so a build started after a restart gets it too. A credential,
    /// which is why state files are mode 0600.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub job_env: BTreeMap<String, String>,
    /// The runner that will start the build while it waits (see
    /// `ownership`). Unset in states written before runners could share a
    /// directory: such a waiting build belongs to whoever adopts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The build's own working directory, when no `workdir` is configured:
    /// recorded before the command starts so that whoever ends the build
    /// (its supervisor, or a runner reporting it lost) removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scratch_dir: Option<PathBuf>,
}

impl BuildState {
    pub(crate) fn accepted(
        req: &stitch_core::TriggerRequest,
        now: DateTime<Utc>,
        owner: &str,
    ) -> Self {
        Self {
            version: STATE_VERSION,
            build_id: req.build_id.clone(),
            queue: req.queue.clone(),
            base: req.changes.base.clone(),
            head: req.changes.head.clone(),
            metadata: req.metadata.clone(),
            status: BuildStatus::Accepted,
            accepted_at: now,
            started_at: None,
            pid: None,
            pgid: None,
            proc_start_ticks: None,
            cancel_requested_at: None,
            finished_at: None,
            exit_status: None,
            signal: None,
            error: None,
            job_env: req.job_env.clone(),
            owner: Some(owner.to_string()),
            scratch_dir: None,
        }
    }

    /// Still waiting for a slot: nobody has begun to start its command.
    /// (`started_at` is recorded before the spawn, so a build caught while
    /// starting is not waiting any more.)
    pub(crate) fn is_waiting(&self) -> bool {
        self.status == BuildStatus::Accepted && self.started_at.is_none()
    }

    /// Move to a terminal status.
    pub(crate) fn finish(&mut self, status: BuildStatus, error: Option<String>) {
        self.status = status;
        self.finished_at = Some(Utc::now());
        if error.is_some() {
            self.error = error;
        }
    }

    /// The caller's metadata echoed back, with the runner's keys on top.
    pub(crate) fn report(&self) -> StatusReport {
        let mut meta = self.metadata.clone();
        if let Some(code) = self.exit_status {
            meta.insert(keys::EXIT_STATUS, code.to_string());
        }
        if let Some(sig) = &self.signal {
            meta.insert(keys::SIGNAL, sig.clone());
        }
        if let Some(err) = &self.error {
            meta.insert(keys::ERROR, err.clone());
        }
        StatusReport::new(self.status).with_metadata(meta)
    }
}

/// The state directory: one subdirectory per build.
#[derive(Clone, Debug)]
pub(crate) struct StateDir {
    root: PathBuf,
}

fn internal(what: &str, path: &Path, e: impl std::fmt::Display) -> RunnerError {
    RunnerError::Internal(format!("{what} {}: {e}", path.display()))
}

impl StateDir {
    pub(crate) fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    fn build_dir(&self, id: &BuildId) -> PathBuf {
        self.root.join(id.as_str())
    }

    pub(crate) fn state_path(&self, id: &BuildId) -> PathBuf {
        self.build_dir(id).join(STATE_FILE)
    }

    pub(crate) fn log_path(&self, id: &BuildId) -> PathBuf {
        self.build_dir(id).join(LOG_FILE)
    }

    fn cancel_path(&self, id: &BuildId) -> PathBuf {
        self.build_dir(id).join(CANCEL_FILE)
    }

    /// Take the build's lock if it is free (see `ownership`).
    pub(crate) fn try_lock(&self, id: &BuildId) -> Result<Option<BuildLock>, RunnerError> {
        let dir = self.build_dir(id);
        ownership::try_lock_build(&dir).map_err(|e| internal("locking build", &dir, e))
    }

    /// Record a new build unless one with its id exists: the state is
    /// written whole to a temp file of this writer's own and hard-linked
    /// into place, which fails when `state.json` exists. `false` when the
    /// build was already there (created by this or another runner).
    pub(crate) fn create(&self, state: &BuildState) -> Result<bool, RunnerError> {
        let dir = self.build_dir(&state.build_id);
        fs::create_dir_all(&dir).map_err(|e| internal("creating build directory", &dir, e))?;
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!("{STATE_FILE}.{:016x}.new", rand::random::<u64>()));
        let json = serde_json::to_vec_pretty(state).map_err(|e| internal("encoding", &path, e))?;
        let write = || -> io::Result<bool> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            let created = match fs::hard_link(&tmp, &path) {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
                Err(e) => return Err(e),
            };
            fs::remove_file(&tmp)?;
            File::open(&dir)?.sync_all()?;
            Ok(created)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            internal("creating", &path, e)
        })
    }

    /// Ask for the build to be cancelled: create its marker (once; later
    /// requests keep the first time). Whoever is in charge of the build
    /// acts on it.
    pub(crate) fn request_cancel(&self, id: &BuildId) -> Result<(), RunnerError> {
        let path = self.cancel_path(id);
        let create = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            f.write_all(Utc::now().to_rfc3339().as_bytes())?;
            f.sync_all()
        };
        match create() {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(internal("requesting cancel with", &path, e)),
        }
    }

    /// When a cancel was requested through the marker, if it was. A marker
    /// whose time cannot be read (a crash while creating it) still counts.
    pub(crate) fn cancel_requested(&self, id: &BuildId) -> Option<DateTime<Utc>> {
        let path = self.cancel_path(id);
        match fs::read_to_string(&path) {
            Ok(text) => Some(
                DateTime::parse_from_rfc3339(text.trim())
                    .map(|t| t.with_timezone(&Utc))
                    .unwrap_or_else(|_| Utc::now()),
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read cancel marker; treating it as set");
                Some(Utc::now())
            }
        }
    }

    /// Delete a finished build's directory (state, log, markers): `false`
    /// when there is none. Refused, keeping everything, while the build is
    /// not terminal here or another runner holds its lock.
    pub(crate) fn forget(&self, id: &BuildId) -> Result<bool, RunnerError> {
        let dir = self.build_dir(id);
        match fs::symlink_metadata(&dir) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(internal("reading", &dir, e)),
        }
        let Some(lock) = self.try_lock(id)? else {
            return Err(RunnerError::InvalidRequest(format!(
                "build {id} is in the charge of a local runner; its state stays"
            )));
        };
        if let Some(state) = self.read(id)? {
            if !state.status.is_terminal() {
                return Err(RunnerError::InvalidRequest(format!(
                    "build {id} is {} in the local runner; only finished builds are forgotten",
                    state.status
                )));
            }
        }
        fs::remove_dir_all(&dir).map_err(|e| internal("removing", &dir, e))?;
        drop(lock);
        Ok(true)
    }

    /// The build's state, or `None` when this directory never saw it.
    pub(crate) fn read(&self, id: &BuildId) -> Result<Option<BuildState>, RunnerError> {
        read_state(&self.state_path(id))
    }

    /// Write the state atomically: readers see the old or the new file,
    /// never a torn one, even if stitch dies mid-write. Callers hold the
    /// build's lock, which is also what makes the one temp name safe.
    pub(crate) fn write(&self, state: &BuildState) -> Result<(), RunnerError> {
        let dir = self.build_dir(&state.build_id);
        fs::create_dir_all(&dir).map_err(|e| internal("creating build directory", &dir, e))?;
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let json = serde_json::to_vec_pretty(state).map_err(|e| internal("encoding", &path, e))?;
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            // Make the rename itself durable across a power loss.
            File::open(&dir)?.sync_all()
        };
        write().map_err(|e| internal("writing", &path, e))
    }

    /// Every build recorded here, oldest first. Entries that are not build
    /// directories are skipped; unreadable states are logged and skipped.
    pub(crate) fn list(&self) -> Result<Vec<BuildState>, io::Error> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.root)? {
            let entry = entry?;
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<BuildId>().ok())
            else {
                continue;
            };
            match read_state(&self.state_path(&id)) {
                Ok(Some(state)) => out.push(state),
                Ok(None) => {} // directory created but state never written
                Err(e) => {
                    tracing::warn!(build_id = %id, error = %e, "skipping unreadable local build state")
                }
            }
        }
        out.sort_by(|a, b| (a.accepted_at, &a.build_id).cmp(&(b.accepted_at, &b.build_id)));
        Ok(out)
    }

    /// Open the build's log for appending, creating it if needed.
    pub(crate) fn open_log(&self, id: &BuildId) -> Result<LogWriter, RunnerError> {
        let path = self.log_path(id);
        LogWriter::open(&path).map_err(|e| internal("opening log", &path, e))
    }
}

fn read_state(path: &Path) -> Result<Option<BuildState>, RunnerError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| internal("corrupt build state", path, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(internal("reading", path, e)),
    }
}

/// Appends `LogLine`s to `log.jsonl`, one JSON object per line. Each line
/// goes out in a single unbuffered write so a follower sees whole lines as
/// soon as they exist.
pub(crate) struct LogWriter {
    file: File,
    path: PathBuf,
}

impl LogWriter {
    fn open(path: &Path) -> io::Result<Self> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)?;
        // A crash mid-write can leave a torn last line; start on a fresh
        // line so the next frame is not glued to it.
        let len = file.metadata()?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                file.write_all(b"\n")?;
            }
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Append one line. Failures are logged, not returned: losing a log
    /// line must not change the build's outcome.
    pub(crate) fn write(&mut self, line: &LogLine) {
        let result = serde_json::to_vec(line)
            .map_err(io::Error::other)
            .and_then(|mut bytes| {
                bytes.push(b'\n');
                self.file.write_all(&bytes)
            });
        if let Err(e) = result {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot append build log line");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stitch_core::{ChangeSet, OutputStream, TriggerRequest};

    fn state() -> BuildState {
        let req = TriggerRequest::new(BuildId::new(), "ci", ChangeSet::head_only(["h"]))
            .with_metadata(BuildMetadata::new().with("ticket", "T-1"));
        BuildState::accepted(&req, Utc::now(), "1-00")
    }

    #[test]
    fn write_then_read_back_and_list() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::new(dir.path().to_path_buf());
        let mut s = state();
        assert_eq!(sd.read(&s.build_id).unwrap(), None);
        sd.write(&s).unwrap();
        assert_eq!(sd.read(&s.build_id).unwrap(), Some(s.clone()));
        s.status = BuildStatus::Running;
        s.pid = Some(42);
        sd.write(&s).unwrap();
        assert_eq!(sd.read(&s.build_id).unwrap().unwrap().pid, Some(42));
        // No temp file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path().join(s.build_id.as_str()))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
        fs::create_dir(dir.path().join("not-a-build")).unwrap();
        assert_eq!(sd.list().unwrap(), vec![s]);
    }

    #[test]
    fn create_is_exclusive_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::new(dir.path().to_path_buf());
        let first = state();
        assert!(sd.create(&first).unwrap());
        let mut second = first.clone();
        second.owner = Some("2-00".into());
        assert!(!sd.create(&second).unwrap());
        assert_eq!(sd.read(&first.build_id).unwrap(), Some(first.clone()));
        let names: Vec<_> = fs::read_dir(dir.path().join(first.build_id.as_str()))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
    }

    #[test]
    fn cancel_marker_keeps_the_first_request() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::new(dir.path().to_path_buf());
        let s = state();
        sd.create(&s).unwrap();
        assert_eq!(sd.cancel_requested(&s.build_id), None);
        sd.request_cancel(&s.build_id).unwrap();
        let first = sd.cancel_requested(&s.build_id).unwrap();
        sd.request_cancel(&s.build_id).unwrap();
        assert_eq!(sd.cancel_requested(&s.build_id), Some(first));
        // A marker torn by a crash still asks for the cancel.
        fs::write(dir.path().join(s.build_id.as_str()).join(CANCEL_FILE), b"").unwrap();
        assert!(sd.cancel_requested(&s.build_id).is_some());
    }

    #[test]
    fn corrupt_state_is_an_internal_error() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::new(dir.path().to_path_buf());
        let id = BuildId::new();
        fs::create_dir(dir.path().join(id.as_str())).unwrap();
        fs::write(sd.state_path(&id), b"{not json").unwrap();
        assert!(matches!(sd.read(&id), Err(RunnerError::Internal(_))));
        assert!(sd.list().unwrap().is_empty());
    }

    #[test]
    fn report_echoes_caller_metadata_under_runner_keys() {
        let mut s = state();
        s.exit_status = Some(3);
        s.finish(
            BuildStatus::Failed,
            Some("command exited with status 3".into()),
        );
        let r = s.report();
        assert_eq!(r.status, BuildStatus::Failed);
        assert_eq!(r.metadata.get("ticket"), Some("T-1"));
        assert_eq!(r.metadata.get("exit_status"), Some("3"));
        assert_eq!(
            r.metadata.get("error"),
            Some("command exited with status 3")
        );
    }

    #[test]
    fn log_writer_repairs_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::new(dir.path().to_path_buf());
        let id = BuildId::new();
        fs::create_dir(dir.path().join(id.as_str())).unwrap();
        fs::write(sd.log_path(&id), b"{\"kind\":\"da").unwrap();
        let mut w = sd.open_log(&id).unwrap();
        w.write(&LogLine::data(1, OutputStream::Stdout, "after", Utc::now()));
        let text = fs::read_to_string(sd.log_path(&id)).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(serde_json::from_str::<LogLine>(lines[1]).is_ok());
    }
}
