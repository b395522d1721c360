//! Child processes: spawning a build's command in its own process group,
//! signalling the whole group, and telling whether a recorded process is
//! still ours after a restart.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use stitch_core::BuildStatus;
use tokio::process::{Child, Command};

use super::config::{LocalConfig, RunAs, INHERITED_ENV, SCRATCH_PREFIX};
use super::state::BuildState;

/// Start `sh -c <command>` for a build: in `workdir`, in a new process
/// group (so cancel can signal the whole tree), as the configured account,
/// with exactly the environment of [`build_env`].
pub(crate) fn spawn(
    config: &LocalConfig,
    state: &BuildState,
    workdir: &Path,
    job_api: &[(&'static str, String)],
) -> std::io::Result<Child> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(&config.command)
        .current_dir(workdir)
        .env_clear()
        .envs(build_env(config, state, job_api, std::env::vars_os()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        // The build must outlive a dropped handle: stitch stopping is not
        // a reason to kill it (the next runner reports it lost instead).
        .kill_on_drop(false);
    if let Some(account) = &config.run_as {
        // When root switches user, std drops every supplementary group
        // (setgroups(0)) before setgid/setuid.
        cmd.gid(account.gid).uid(account.uid);
    }
    cmd.spawn()
}

/// The whole environment of a build's command, later entries winning:
/// the allow-list [`INHERITED_ENV`] and `LC_*` from stitch's environment
/// (`inherited`), with `HOME`/`USER` of the account when builds run as
/// another user; the queue's `pass_env` variables; its `env`; the trigger's
/// `job_env` and the job API's variables; the `STITCH_*` build variables.
/// Nothing else of stitch's environment (API tokens, provider tokens,
/// database passwords) reaches the command.
pub(crate) fn build_env(
    config: &LocalConfig,
    state: &BuildState,
    job_api: &[(&'static str, String)],
    inherited: impl Iterator<Item = (OsString, OsString)>,
) -> BTreeMap<OsString, OsString> {
    let mut env = BTreeMap::new();
    for (name, value) in inherited {
        let allowed = name.to_str().is_some_and(|n| {
            INHERITED_ENV.contains(&n)
                || n.starts_with("LC_")
                || config.pass_env.iter().any(|p| p == n)
        });
        if allowed {
            env.insert(name, value);
        }
    }
    if let Some((user, home)) = config.run_as.as_ref().and_then(|a| a.user.as_ref()) {
        env.insert("USER".into(), user.into());
        env.insert("HOME".into(), home.into());
    }
    let set = config
        .env
        .iter()
        .chain(&state.job_env)
        .map(|(k, v)| (k.as_str(), v.clone()))
        .chain(job_api.iter().map(|(k, v)| (*k, v.clone())))
        .chain([
            ("STITCH_BUILD_ID", state.build_id.as_str().to_string()),
            ("STITCH_QUEUE", state.queue.clone()),
            ("STITCH_BASE", json(&state.base)),
            ("STITCH_HEAD", json(&state.head)),
            ("STITCH_METADATA", json(&state.metadata)),
        ]);
    for (name, value) in set {
        env.insert(name.into(), value.into());
    }
    env
}

/// A fresh private (0700) working directory for one build under the system
/// temporary directory, with a random suffix so nobody can prepare it in
/// advance; handed to the build's account when builds run as another user.
pub(crate) fn create_scratch(build_id: &str, run_as: Option<&RunAs>) -> std::io::Result<PathBuf> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("{SCRATCH_PREFIX}{build_id}-"))
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()?
        .keep();
    let handed_over = match run_as {
        Some(account) => std::os::unix::fs::chown(&dir, Some(account.uid), Some(account.gid)),
        None => Ok(()),
    };
    if let Err(e) = handed_over {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    Ok(dir)
}

/// Remove a build's scratch directory once the build has ended.
pub(crate) fn remove_scratch(build_id: &str, dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(build_id, dir = %dir.display(), error = %e, "cannot remove the build's scratch directory");
        }
    }
}

/// Let the build's account reach its job API: the socket's private
/// directory and the socket itself become the account's.
pub(crate) fn hand_over_job_api(socket: &Path, account: &RunAs) -> std::io::Result<()> {
    let owner = (Some(account.uid), Some(account.gid));
    if let Some(dir) = socket.parent() {
        std::os::unix::fs::chown(dir, owner.0, owner.1)?;
    }
    std::os::unix::fs::chown(socket, owner.0, owner.1)
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

    fn vars(pairs: &[(&str, &str)]) -> impl Iterator<Item = (OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn build_env_keeps_only_the_allow_list_and_what_the_queue_names() {
        let mut config = LocalConfig::new("env", "/tmp/s");
        config.env.insert("CC".into(), "clang".into());
        config.pass_env.push("CARGO_HOME".into());
        let req = stitch_core::TriggerRequest::new(
            stitch_core::BuildId::new(),
            "ci",
            stitch_core::ChangeSet::head_only(["h"]),
        );
        let state = BuildState::accepted(&req, chrono::Utc::now(), "me");
        let inherited = vars(&[
            ("PATH", "/bin"),
            ("LC_ALL", "C"),
            ("CARGO_HOME", "/cargo"),
            ("STITCH_API_TOKEN", "secret"),
            ("GITHUB_TOKEN", "secret"),
            ("STITCH_BUILD_ID", "stale"),
            ("CC", "gcc"),
        ]);
        let env = build_env(
            &config,
            &state,
            &[("STITCH_JOB_API_TOKEN", "t".into())],
            inherited,
        );
        let names: Vec<&str> = env.keys().filter_map(|k| k.to_str()).collect();
        assert_eq!(
            names,
            [
                "CARGO_HOME",
                "CC",
                "LC_ALL",
                "PATH",
                "STITCH_BASE",
                "STITCH_BUILD_ID",
                "STITCH_HEAD",
                "STITCH_JOB_API_TOKEN",
                "STITCH_METADATA",
                "STITCH_QUEUE",
            ]
        );
        assert_eq!(env[&OsString::from("CC")], "clang");
        assert_eq!(
            env[&OsString::from("STITCH_BUILD_ID")],
            state.build_id.as_str()
        );
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
