//! Waits for the tests of every stitch crate, each on an event instead of
//! a sleep.
//!
//! Tests drive real processes and real files: a job writes a marker file,
//! a cancel kills a process tree, a runner rewrites its state file. Waiting
//! for those by re-reading every few milliseconds makes a test slow on an
//! idle machine and flaky on a busy one. The functions here block on what
//! the kernel announces instead:
//!
//! - [`process_exit`]: a pidfd, readable once the process has exited;
//! - [`dir_change`] and the helpers over it: inotify on directories, and the
//!   test's own check re-run after each change the kernel reports;
//! - [`watch_until`]: the test's check re-run after each step a component
//!   announces on a watch channel (committed events, claim passes).
//!
//! - [`serve::Serve`]: a `stitch serve` child process with verbs (create,
//!   get, logs_text, cancel, promise, webhook) and waits on its
//!   `/v1/events` stream.
//! - [`browser`] (feature `browser`): a headless Chromium session over
//!   WebDriver and waits on what its page shows.
//!
//! Every wait is bounded by [`WAIT`] and panics with what it waited for, so a
//! hang is a failing test with a message, never a stuck CI job.

#![forbid(unsafe_code)]

#[cfg(feature = "browser")]
pub mod browser;
pub mod serve;

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::inotify;
use rustix::process::{pidfd_open, Pid, PidfdFlags};
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// How long any wait here lasts before the test fails: far above what a
/// loaded 2-core machine needs, short enough that a hang is reported.
pub const WAIT: Duration = Duration::from_secs(60);

/// Waits until process `pid` has exited (a zombie counts as exited: the
/// tests' processes are grandchildren whose reaping is not theirs to wait
/// for). A pid that no longer exists has exited.
///
/// Panics after [`WAIT`].
pub async fn process_exit(pid: i32) {
    let Some(pid_value) = Pid::from_raw(pid) else {
        panic!("{pid} is not a process id");
    };
    let fd = match pidfd_open(pid_value, PidfdFlags::NONBLOCK) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::SRCH) => return,
        Err(e) => panic!("pidfd_open({pid}): {e}"),
    };
    let fd = watch_fd(fd).unwrap_or_else(|e| panic!("registering the pidfd of {pid}: {e}"));
    // A pidfd turns readable when its process exits, and stays readable.
    if tokio::time::timeout(WAIT, fd.readable()).await.is_err() {
        panic!("process {pid} still runs after {WAIT:?}");
    }
}

/// Runs `wait` to completion from a test that is not async (a `#[test]`
/// driving child processes), on a runtime of its own.
pub fn blocking<F: Future>(wait: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("a runtime for a wait: {e}"))
        .block_on(wait)
}

/// Registers `fd` with the runtime's reactor. `AsyncFd::new` is deprecated
/// because a descriptor it does not own may be closed while registered; it
/// owns this one (an `OwnedFd` moved in), which closes only when the
/// `AsyncFd` is dropped and deregistered, so the concern does not arise, and
/// the safe constructor keeps this crate free of `unsafe`.
#[allow(deprecated)]
fn watch_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    AsyncFd::new(fd)
}

/// Directories watched with inotify: every create, write, rename, delete or
/// attribute change of an entry (and of a watched file itself) wakes
/// [`DirWatch::changed`].
pub struct DirWatch {
    fd: AsyncFd<OwnedFd>,
    what: Vec<PathBuf>,
}

impl DirWatch {
    /// Watches `paths` (directories, or files for changes to their content).
    /// Each must exist. Panics with the path when one cannot be watched.
    pub fn new<P: AsRef<Path>>(paths: &[P]) -> Self {
        Self::try_new(paths).unwrap_or_else(|(p, e)| panic!("watching {}: {e}", p.display()))
    }

    /// [`DirWatch::new`], returning the path that cannot be watched and why
    /// instead of panicking.
    pub fn try_new<P: AsRef<Path>>(paths: &[P]) -> Result<Self, (PathBuf, io::Error)> {
        let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)
            .unwrap_or_else(|e| panic!("inotify_init: {e}"));
        let flags = inotify::WatchFlags::CREATE
            | inotify::WatchFlags::MODIFY
            | inotify::WatchFlags::CLOSE_WRITE
            | inotify::WatchFlags::MOVED_TO
            | inotify::WatchFlags::MOVED_FROM
            | inotify::WatchFlags::DELETE
            | inotify::WatchFlags::ATTRIB
            | inotify::WatchFlags::DELETE_SELF;
        let mut what = Vec::new();
        for p in paths {
            let p = p.as_ref();
            inotify::add_watch(&fd, p, flags).map_err(|e| (p.to_path_buf(), e.into()))?;
            what.push(p.to_path_buf());
        }
        let fd = watch_fd(fd).unwrap_or_else(|e| panic!("registering inotify: {e}"));
        Ok(Self { fd, what })
    }

    /// Waits for the next change (or batch of changes) in the watched
    /// paths, until `deadline`. Returns false when the deadline passed.
    pub async fn changed(&mut self, deadline: Instant) -> bool {
        loop {
            let ready = tokio::time::timeout_at(deadline, self.fd.readable()).await;
            let Ok(ready) = ready else { return false };
            let mut guard = ready.unwrap_or_else(|e| panic!("inotify readiness: {e}"));
            // Drains every queued event: the caller re-checks the state,
            // which covers all of them at once.
            let mut buf = [0u8; 4096];
            let mut got = false;
            loop {
                match rustix::io::read(guard.get_inner(), &mut buf) {
                    Ok(0) => break,
                    Ok(_) => got = true,
                    Err(rustix::io::Errno::AGAIN) => {
                        guard.clear_ready();
                        break;
                    }
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => panic!("reading inotify: {}", io::Error::from(e)),
                }
            }
            if got {
                return true;
            }
        }
    }

    /// Runs `check` now and after every change in the watched paths until it
    /// returns `Some`. Panics with `what` after [`WAIT`].
    pub async fn until<T, F, Fut>(&mut self, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + WAIT;
        loop {
            // Checked after the watch was set up, so a change between the
            // check and the wait is still reported by `changed`.
            if let Some(v) = check().await {
                return v;
            }
            if !self.changed(deadline).await {
                // One last look: the final change may have landed with the
                // deadline.
                if let Some(v) = check().await {
                    return v;
                }
                panic!("{what}: not after {WAIT:?} (watching {:?})", self.what);
            }
        }
    }
}

/// Runs `check` now and after every change in `dirs` until it returns
/// `Some`; see [`DirWatch::until`].
pub async fn dir_change<T, P, F, Fut>(dirs: &[P], what: &str, check: F) -> T
where
    P: AsRef<Path>,
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    DirWatch::new(dirs).until(what, check).await
}

/// Runs `check` now and after every change of `changes` until it returns
/// `Some`; panics with `what` after [`WAIT`]. For a value a component
/// publishes on each step it takes (a server's committed-event seq, a
/// queue's claim passes): the test re-reads what it waits for after each
/// step instead of on a timer.
pub async fn watch_until<W, T, F, Fut>(
    changes: &mut tokio::sync::watch::Receiver<W>,
    what: &str,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        // Marked seen before the check: a step after it wakes the wait.
        changes.borrow_and_update();
        if let Some(v) = check().await {
            return v;
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("{what}: the watched component stopped"),
            Err(_) => panic!("{what}: not after {WAIT:?}"),
        }
    }
}

/// The parent directory of `path` (which must have one).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Waits until `path` holds a complete text (ending in a newline: the
/// tests' scripts write one line at a time) and returns it. Its directory
/// must exist.
pub async fn file_text(path: &Path) -> String {
    file_text_where(path, |_| true).await
}

/// Waits until `path` holds a text ending in a newline that `accept` takes,
/// and returns it. Its directory must exist.
pub async fn file_text_where(path: &Path, accept: impl Fn(&str) -> bool) -> String {
    let what = format!("{} with the expected text", path.display());
    dir_change(&[parent(path)], &what, || {
        let text = std::fs::read_to_string(path).ok();
        let got = text.filter(|t| t.ends_with('\n') && accept(t));
        std::future::ready(got)
    })
    .await
}

/// Waits until `path` exists. Its directory must exist.
pub async fn file_exists(path: &Path) {
    let what = format!("{} to exist", path.display());
    dir_change(&[parent(path)], &what, || {
        std::future::ready(path.exists().then_some(()))
    })
    .await
}

/// Waits until `path` no longer exists (its directory may go with it).
pub async fn file_gone(path: &Path) {
    let what = format!("{} to be removed", path.display());
    // A directory removed with the file (a private temporary directory)
    // cannot be watched, and the file is gone with it.
    let mut watch = match DirWatch::try_new(&[parent(path)]) {
        Ok(w) => w,
        Err(_) if !path.exists() => return,
        Err((p, e)) => panic!("watching {}: {e}", p.display()),
    };
    watch
        .until(&what, || std::future::ready((!path.exists()).then_some(())))
        .await
}

/// Waits until the file at `path` has at least `n` complete (newline
/// terminated) lines and returns its text. Its directory must exist.
pub async fn file_lines(path: &Path, n: usize) -> String {
    let what = format!("{} to have {n} lines", path.display());
    dir_change(&[parent(path)], &what, || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        std::future::ready((text.matches('\n').count() >= n).then_some(text))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_written_later_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("marker");
        let writer = {
            let path = path.clone();
            tokio::spawn(async move {
                std::fs::write(&path, "partial").unwrap();
                std::fs::write(&path, "done\n").unwrap();
            })
        };
        assert_eq!(file_text(&path).await, "done\n");
        writer.await.unwrap();
        std::fs::remove_file(&path).unwrap();
        file_gone(&path).await;
    }

    #[tokio::test]
    async fn a_killed_child_is_seen_to_exit_and_a_gone_pid_is_exited() {
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let waiting = tokio::spawn(process_exit(pid));
        child.kill().unwrap();
        waiting.await.unwrap();
        child.wait().unwrap();
        // Reaped: the pid is gone.
        process_exit(pid).await;
    }
}
