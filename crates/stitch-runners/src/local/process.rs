//! Child processes: spawning a build's command in its own process group,
//! signalling the whole group, and telling whether a recorded process is
//! still ours after a restart.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use stitch_core::BuildStatus;
use tokio::process::{Child, Command};

use super::config::LocalConfig;
use super::state::BuildState;

/// Start `sh -c <command>` for a build: in `workdir`, in a new process
/// group (so cancel can signal the whole tree), with the build described
/// in `STITCH_*` variables on top of the configured `env`, plus the job's
/// call-back environment (`job_env` from the trigger, and `job_api`: the
/// socket and token of the build's job API).
pub(crate) fn spawn(
    config: &LocalConfig,
    state: &BuildState,
    job_api: &[(&'static str, String)],
) -> std::io::Result<Child> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(&config.command)
        .current_dir(&config.workdir)
        .envs(&config.env)
        .envs(&state.job_env)
        .envs(job_api.iter().map(|(k, v)| (*k, v.as_str())))
        .env("STITCH_BUILD_ID", state.build_id.as_str())
        .env("STITCH_QUEUE", &state.queue)
        .env("STITCH_BASE", json(&state.base))
        .env("STITCH_HEAD", json(&state.head))
        .env("STITCH_METADATA", json(&state.metadata))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        // The build must outlive a dropped handle: stitch stopping is not
        // a reason to kill it (the next runner reports it lost instead).
        .kill_on_drop(false);
    cmd.spawn()
}

/// JSON for the env values. Lists of strings and string maps always
/// serialize; the fallback only keeps this total.
fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// Send `signal` to every process in group `pgid`. `Ok(false)` when the
/// group no longer exists.
pub(crate) fn signal_group(pgid: i32, signal: Signal) -> Result<bool, Errno> {
    if pgid <= 1 {
        // Never signal "all processes" or init by accident.
        return Ok(false);
    }
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) => Ok(true),
        Err(Errno::ESRCH) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The start time of `pid` in clock ticks since boot and whether it is a
/// zombie, from `/proc/<pid>/stat`. `None` if there is no such process (or
/// no procfs).
pub(crate) fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces; fields
    // after the last ')' are space separated: state is field 3, starttime 22.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// What became of a build's recorded group leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Leader {
    /// Still running.
    Alive,
    /// Exited (or a zombie nobody reaped).
    Gone,
    /// The pid now belongs to a different process: the group is long gone
    /// and must not be signalled.
    Reused,
}

pub(crate) fn leader(pid: i32, recorded_start: Option<u64>) -> Leader {
    let have_procfs = std::path::Path::new("/proc/self/stat").exists();
    if have_procfs {
        return match proc_stat(pid) {
            None => Leader::Gone,
            Some((_, start)) if recorded_start.is_some_and(|r| r != start) => Leader::Reused,
            Some(('Z' | 'X', _)) => Leader::Gone,
            Some(_) => Leader::Alive,
        };
    }
    match nix::sys::signal::kill(Pid::from_raw(pid), None) {
        Err(Errno::ESRCH) => Leader::Gone,
        _ => Leader::Alive,
    }
}

/// Name of a signal number (`SIGKILL`), or the number if unknown.
pub(crate) fn signal_name(sig: i32) -> String {
    Signal::try_from(sig).map_or_else(|_| sig.to_string(), |s| s.as_str().to_string())
}

/// The build's terminal status and the state fields describing the exit.
pub(crate) struct Outcome {
    pub status: BuildStatus,
    pub exit_status: Option<i32>,
    pub signal: Option<String>,
    pub error: Option<String>,
}

/// Map how the command ended to a build outcome. A build whose cancel was
/// requested is `cancelled` however it exited; the exit details stay in
/// the metadata.
pub(crate) fn outcome(exit: &std::io::Result<ExitStatus>, cancelled: bool) -> Outcome {
    let mut out = match exit {
        Ok(st) => match (st.code(), st.signal()) {
            (Some(0), _) => Outcome {
                status: BuildStatus::Succeeded,
                exit_status: Some(0),
                signal: None,
                error: None,
            },
            (Some(code), _) => Outcome {
                status: BuildStatus::Failed,
                exit_status: Some(code),
                signal: None,
                error: Some(format!("command exited with status {code}")),
            },
            (None, Some(sig)) => {
                let name = signal_name(sig);
                Outcome {
                    status: BuildStatus::Failed,
                    exit_status: None,
                    error: Some(format!("command was killed by signal {name}")),
                    signal: Some(name),
                }
            }
            (None, None) => Outcome {
                status: BuildStatus::Failed,
                exit_status: None,
                signal: None,
                error: Some(format!("command ended in an unrecognised way: {st}")),
            },
        },
        Err(e) => Outcome {
            status: BuildStatus::Failed,
            exit_status: None,
            signal: None,
            error: Some(format!("lost track of the command: {e}")),
        },
    };
    if cancelled {
        out.status = BuildStatus::Cancelled;
        out.error = None;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_stat_parses() {
        let me = std::process::id() as i32;
        let (state, start) = proc_stat(me).unwrap();
        assert_ne!(state, 'Z');
        assert_eq!(leader(me, Some(start)), Leader::Alive);
        assert_eq!(leader(me, Some(start + 1)), Leader::Reused);
        assert_eq!(leader(i32::MAX - 1, None), Leader::Gone);
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(15), "SIGTERM");
        assert_eq!(signal_name(1000), "1000");
    }

    #[test]
    fn refuses_to_signal_init_or_everyone() {
        assert_eq!(signal_group(1, Signal::SIGTERM), Ok(false));
        assert_eq!(signal_group(0, Signal::SIGTERM), Ok(false));
        assert_eq!(signal_group(-1, Signal::SIGTERM), Ok(false));
    }

    #[test]
    fn exit_mapping() {
        let ok = outcome(&Ok(ExitStatus::from_raw(0)), false);
        assert_eq!(
            (ok.status, ok.exit_status),
            (BuildStatus::Succeeded, Some(0))
        );
        let failed = outcome(&Ok(ExitStatus::from_raw(3 << 8)), false);
        assert_eq!(
            (failed.status, failed.exit_status),
            (BuildStatus::Failed, Some(3))
        );
        let killed = outcome(&Ok(ExitStatus::from_raw(9)), false);
        assert_eq!(
            (killed.status, killed.signal.as_deref()),
            (BuildStatus::Failed, Some("SIGKILL"))
        );
        let cancelled = outcome(&Ok(ExitStatus::from_raw(15)), true);
        assert_eq!(
            (cancelled.status, cancelled.signal.as_deref()),
            (BuildStatus::Cancelled, Some("SIGTERM"))
        );
        assert!(cancelled.error.is_none());
    }
}
