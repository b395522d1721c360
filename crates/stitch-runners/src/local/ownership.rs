//! Who is in charge of a build when several runners (in one process or
//! several) share a state directory.
//!
//! - A **build lock** (`flock` on `<state_dir>/<build_id>/lock`) is held by
//!   the runner supervising the build for as long as its command runs, and
//!   briefly by any runner changing a build it does not supervise. Every
//!   write of a build's state happens under it, except the exclusive create
//!   in `trigger`.
//! - A **runner lock** (`flock` on `<state_dir>/.runners/<runner_id>.lock`)
//!   is held by each runner for its lifetime. A waiting build records its
//!   owner's id; the build belongs to that runner while the lock is held and
//!   may be adopted by another runner once it is not (the owner died).
//!
//! `flock` locks belong to an open file description, so two runners in one
//! process exclude each other exactly as two processes do, and a process
//! that dies (even by SIGKILL) releases everything it held at once. Lock
//! files are opened close-on-exec, so a build's command never inherits one.
//! Only running builds hold a descriptor: a runner uses `concurrency + 1`
//! lock descriptors at most, however many builds wait.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Name of the lock file inside a build's directory.
pub const BUILD_LOCK_FILE: &str = "lock";
/// Directory (inside the state directory) of the runners' liveness locks.
/// Its name cannot be a build id, so listing builds skips it.
pub(crate) const RUNNERS_DIR: &str = ".runners";
const RUNNER_LOCK_SUFFIX: &str = ".lock";

/// Exclusive charge of one build; released when dropped.
#[derive(Debug)]
pub(crate) struct BuildLock {
    _flock: Flock<File>,
}

/// Take the build's lock if nobody holds it. `Ok(None)` when another
/// runner (or another open of the file in this runner) holds it.
pub(crate) fn try_lock_build(build_dir: &Path) -> io::Result<Option<BuildLock>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(build_dir.join(BUILD_LOCK_FILE))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(flock) => Ok(Some(BuildLock { _flock: flock })),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(errno.into()),
    }
}

/// This runner's liveness lock, held for the runner's lifetime.
#[derive(Debug)]
pub(crate) struct RunnerLock {
    id: String,
    _flock: Flock<File>,
}

impl RunnerLock {
    /// Create and lock a liveness file under a fresh id. The file is locked
    /// under a temporary name and only then renamed into place, so a runner
    /// sweeping dead runners' files never sees it unlocked.
    pub(crate) fn acquire(state_dir: &Path) -> io::Result<Self> {
        let dir = state_dir.join(RUNNERS_DIR);
        fs::create_dir_all(&dir)?;
        let id = format!("{:x}-{:016x}", std::process::id(), rand::random::<u64>());
        let tmp = dir.join(format!("{id}.new"));
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        let flock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| io::Error::from(errno))?;
        fs::rename(&tmp, runner_lock_path(state_dir, &id))?;
        Ok(Self { id, _flock: flock })
    }

    /// The id recorded as `owner` on the builds this runner waits to start.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }
}

fn runner_lock_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir
        .join(RUNNERS_DIR)
        .join(format!("{id}{RUNNER_LOCK_SUFFIX}"))
}

/// Ids are minted by `RunnerLock::acquire`; anything else (a hand-edited
/// state file) names no runner.
fn is_runner_id(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// Whether the runner `id` still holds its liveness lock. Probing takes a
/// *shared* lock, so probes never make each other see a live runner; the
/// owner holds it exclusively. A missing file or an id that is not one is a
/// dead owner; a probe that fails otherwise counts as dead too (logged), so
/// waiting builds are never stranded — starting still needs the build lock,
/// so this cannot make a build run twice.
pub(crate) fn runner_alive(state_dir: &Path, id: &str) -> bool {
    if !is_runner_id(id) {
        return false;
    }
    let path = runner_lock_path(state_dir, id);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return false,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot probe local runner liveness; treating it as gone");
            return false;
        }
    };
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_probe) => false,
        Err((_, Errno::EWOULDBLOCK)) => true,
        Err((_, errno)) => {
            tracing::warn!(path = %path.display(), error = %errno, "cannot probe local runner liveness; treating it as gone");
            false
        }
    }
}

/// Remove the liveness files of runners that are gone (best effort, at
/// start): one file per runner lifetime would otherwise pile up. A file is
/// removed only while this sweep holds it exclusively; a missing file reads
/// as a dead owner, which it is.
pub(crate) fn sweep_dead_runners(state_dir: &Path) {
    let dir = state_dir.join(RUNNERS_DIR);
    let Ok(entries) = fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_lock = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(RUNNER_LOCK_SUFFIX));
        if !is_lock {
            continue;
        }
        let Ok(file) = OpenOptions::new().write(true).open(&path) else {
            continue;
        };
        if let Ok(_held) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            if let Err(e) = fs::remove_file(&path) {
                tracing::debug!(path = %path.display(), error = %e, "cannot remove a dead runner's lock file");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_lock_excludes_a_second_open_even_in_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let first = try_lock_build(dir.path()).unwrap();
        assert!(first.is_some());
        assert!(try_lock_build(dir.path()).unwrap().is_none());
        drop(first);
        assert!(try_lock_build(dir.path()).unwrap().is_some());
    }

    #[test]
    fn runner_is_alive_while_its_lock_lives_and_swept_after() {
        let dir = tempfile::tempdir().unwrap();
        let runner = RunnerLock::acquire(dir.path()).unwrap();
        let id = runner.id().to_string();
        assert!(runner_alive(dir.path(), &id));
        // Probes do not disturb each other or the owner.
        assert!(runner_alive(dir.path(), &id));
        sweep_dead_runners(dir.path());
        assert!(runner_lock_path(dir.path(), &id).exists());
        drop(runner);
        assert!(!runner_alive(dir.path(), &id));
        sweep_dead_runners(dir.path());
        assert!(!runner_lock_path(dir.path(), &id).exists());
        assert!(!runner_alive(dir.path(), &id));
    }

    #[test]
    fn ids_that_are_not_runner_ids_name_nobody() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!runner_alive(dir.path(), "../../etc/passwd"));
        assert!(!runner_alive(dir.path(), ""));
    }
}
