//! Settings of the local runner and their validation.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Environment variables the local runner sets for every build; the
/// configuration may not set them itself.
pub const RESERVED_ENV: [&str; 8] = [
    "STITCH_BUILD_ID",
    "STITCH_QUEUE",
    "STITCH_BASE",
    "STITCH_HEAD",
    "STITCH_METADATA",
    "STITCH_JOB_TOKEN",
    "STITCH_JOB_API_SOCKET",
    "STITCH_JOB_API_TOKEN",
];

/// How one queue's builds run on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalConfig {
    /// The command, run as `sh -c <command>`.
    pub command: String,
    /// Working directory of the command. `None` (the default): each build
    /// runs in a fresh private directory of its own under the system
    /// temporary directory, outside stitch's data directory, removed when
    /// the build ends (see [`SCRATCH_PREFIX`]). A configured directory is
    /// shared by every build of the queue and never removed.
    pub workdir: Option<PathBuf>,
    /// Builds running at once; later ones wait as `accepted`, first come
    /// first served. Default 1, because builds share `workdir`.
    pub concurrency: usize,
    /// Time between SIGTERM and SIGKILL when a build is cancelled.
    /// Default 10 s.
    pub cancel_grace: Duration,
    /// Where per-build state and logs are kept (`<state_dir>/<build_id>/`).
    /// Runners of one queue in several processes on this machine may share
    /// it (they split the builds, see the module docs); give each queue its
    /// own.
    pub state_dir: PathBuf,
    /// Extra environment for the command. Builds never inherit stitch's
    /// own environment: they get [`INHERITED_ENV`], the `STITCH_*` build
    /// variables, these, and the variables named in `pass_env`.
    pub env: BTreeMap<String, String>,
    /// Names of variables of stitch's own environment handed to builds
    /// (unset ones are left out).
    pub pass_env: Vec<String>,
    /// The account builds run as; `None`: stitch's own.
    pub run_as: Option<RunAs>,
}

/// Variables of stitch's own environment every build gets (when set), plus
/// every `LC_*` one. Nothing else of stitch's environment reaches a build
/// unless a queue names it in `pass_env`: it may hold API tokens and
/// database passwords.
pub const INHERITED_ENV: [&str; 7] = ["PATH", "HOME", "USER", "LANG", "TZ", "TMPDIR", "SHELL"];

/// Name prefix of the per-build working directories created under the
/// system temporary directory when no `workdir` is configured.
pub const SCRATCH_PREFIX: &str = "stitch-build-";

/// An account builds run as (`local.user` / `local.group`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// User id the command runs with.
    pub uid: u32,
    /// Group id the command runs with. Supplementary groups are dropped.
    pub gid: u32,
    /// The user's name and home directory (`USER`, `HOME` of the build);
    /// `None` when only a group was configured.
    pub user: Option<(String, PathBuf)>,
}

impl RunAs {
    /// Resolve `user` and `group` (names or numeric ids) to an account.
    /// `euid` is stitch's effective user id: switching accounts needs
    /// root. `Ok(None)` when neither is set. Without `group`, the user's
    /// primary group is used.
    pub fn resolve(
        user: Option<&str>,
        group: Option<&str>,
        euid: u32,
    ) -> Result<Option<Self>, LocalConfigError> {
        if user.is_none() && group.is_none() {
            return Ok(None);
        }
        if euid != 0 {
            return Err(LocalConfigError::NotRoot);
        }
        let lookup_failed = |what: &'static str, name: &str| LocalConfigError::UnknownAccount {
            what,
            name: name.to_string(),
        };
        let account = match user {
            None => None,
            Some(name) => {
                let found = match name.parse::<u32>() {
                    Ok(uid) => nix::unistd::User::from_uid(uid.into()),
                    Err(_) => nix::unistd::User::from_name(name),
                };
                Some(
                    found
                        .ok()
                        .flatten()
                        .ok_or_else(|| lookup_failed("user", name))?,
                )
            }
        };
        let gid = match group {
            Some(name) => {
                let found = match name.parse::<u32>() {
                    Ok(gid) => nix::unistd::Group::from_gid(gid.into()),
                    Err(_) => nix::unistd::Group::from_name(name),
                };
                found
                    .ok()
                    .flatten()
                    .ok_or_else(|| lookup_failed("group", name))?
                    .gid
                    .as_raw()
            }
            None => account.as_ref().map_or(0, |a| a.gid.as_raw()),
        };
        Ok(Some(match account {
            Some(a) => Self {
                uid: a.uid.as_raw(),
                gid,
                user: Some((a.name, a.dir)),
            },
            // A group alone: stitch's own (root) user with another group.
            None => Self {
                uid: euid,
                gid,
                user: None,
            },
        }))
    }
}

impl LocalConfig {
    /// A configuration with the defaults for everything but the command
    /// and the state directory.
    pub fn new(command: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            command: command.into(),
            workdir: None,
            concurrency: 1,
            cancel_grace: Duration::from_secs(10),
            state_dir: state_dir.into(),
            env: BTreeMap::new(),
            pass_env: Vec::new(),
            run_as: None,
        }
    }

    /// Check the settings without touching the file system.
    pub fn validate(&self) -> Result<(), LocalConfigError> {
        if self.command.trim().is_empty() {
            return Err(LocalConfigError::EmptyCommand);
        }
        if self.concurrency == 0 {
            return Err(LocalConfigError::ZeroConcurrency);
        }
        if self.state_dir.as_os_str().is_empty() {
            return Err(LocalConfigError::EmptyStateDir);
        }
        for name in self.env.keys() {
            if RESERVED_ENV.contains(&name.as_str()) {
                return Err(LocalConfigError::ReservedEnv { name: name.clone() });
            }
            let bad = name.is_empty() || name.contains('=') || name.contains('\0');
            if bad {
                return Err(LocalConfigError::InvalidEnvName { name: name.clone() });
            }
        }
        if let Some((name, _)) = self.env.iter().find(|(_, v)| v.contains('\0')) {
            return Err(LocalConfigError::InvalidEnvValue { name: name.clone() });
        }
        for name in &self.pass_env {
            check_pass_env(name)?;
            if self.env.contains_key(name) {
                return Err(LocalConfigError::PassEnvAlsoSet { name: name.clone() });
            }
        }
        Ok(())
    }
}

/// One `pass_env` name: a valid variable name that is not one of the
/// variables the runner sets itself.
pub fn check_pass_env(name: &str) -> Result<(), LocalConfigError> {
    if RESERVED_ENV.contains(&name) {
        return Err(LocalConfigError::ReservedPassEnv {
            name: name.to_string(),
        });
    }
    if name.is_empty() || name.contains('=') || name.contains('\0') {
        return Err(LocalConfigError::InvalidPassEnvName {
            name: name.to_string(),
        });
    }
    Ok(())
}

/// Why a local runner cannot start with its configuration.
#[derive(Debug, thiserror::Error)]
pub enum LocalConfigError {
    /// `command` is empty.
    #[error("local.command is empty; set the shell command each build runs, e.g. \"make test\"")]
    EmptyCommand,
    /// `concurrency` is 0.
    #[error("local.concurrency must be at least 1")]
    ZeroConcurrency,
    /// `state_dir` is empty.
    #[error("local.state_dir is empty; set a directory for build state and logs")]
    EmptyStateDir,
    /// `env` sets a variable the runner sets itself.
    #[error("local.env sets {name}, which the local runner sets for every build; remove it")]
    ReservedEnv {
        /// The variable.
        name: String,
    },
    /// `env` has a name that cannot be an environment variable.
    #[error("local.env has the invalid variable name {name:?}: names must be non-empty without '=' or NUL")]
    InvalidEnvName {
        /// The variable.
        name: String,
    },
    /// `pass_env` names a variable the runner sets itself.
    #[error("local.pass_env names {name}, which the local runner sets for every build; remove it")]
    ReservedPassEnv {
        /// The variable.
        name: String,
    },
    /// `pass_env` has a name that cannot be an environment variable.
    #[error("local.pass_env has the invalid variable name {name:?}: names must be non-empty without '=' or NUL")]
    InvalidPassEnvName {
        /// The variable.
        name: String,
    },
    /// A variable is both passed through and set.
    #[error("local.pass_env names {name}, which local.env also sets; keep one")]
    PassEnvAlsoSet {
        /// The variable.
        name: String,
    },
    /// `user`/`group` without root.
    #[error("local.user and local.group need stitch to run as root (it runs as another user); remove them or run stitch as root")]
    NotRoot,
    /// `user`/`group` names an account this machine does not have.
    #[error("local.{what} {name:?}: no such {what} on this machine")]
    UnknownAccount {
        /// `user` or `group`.
        what: &'static str,
        /// The configured name or id.
        name: String,
    },
    /// `env` has a value with a NUL byte.
    #[error("local.env value of {name} contains a NUL byte")]
    InvalidEnvValue {
        /// The variable.
        name: String,
    },
    /// The state directory could not be created or opened.
    #[error("cannot use local.state_dir {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = LocalConfig::new("make test", "/tmp/s");
        assert_eq!(c.concurrency, 1);
        assert_eq!(c.cancel_grace, Duration::from_secs(10));
        assert_eq!(c.workdir, None);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn bad_settings_are_named() {
        let base = LocalConfig::new("make test", "/tmp/s");
        let cases: Vec<(LocalConfig, &str)> = vec![
            (
                LocalConfig {
                    command: "  ".into(),
                    ..base.clone()
                },
                "local.command is empty",
            ),
            (
                LocalConfig {
                    concurrency: 0,
                    ..base.clone()
                },
                "at least 1",
            ),
            (
                LocalConfig {
                    state_dir: PathBuf::new(),
                    ..base.clone()
                },
                "local.state_dir is empty",
            ),
            (
                LocalConfig {
                    env: [("STITCH_HEAD".into(), "x".into())].into(),
                    ..base.clone()
                },
                "sets STITCH_HEAD",
            ),
            (
                LocalConfig {
                    env: [("A=B".into(), "x".into())].into(),
                    ..base.clone()
                },
                "invalid variable name",
            ),
            (
                LocalConfig {
                    env: [("A".into(), "x\0".into())].into(),
                    ..base.clone()
                },
                "NUL",
            ),
            (
                LocalConfig {
                    pass_env: vec!["STITCH_JOB_TOKEN".into()],
                    ..base.clone()
                },
                "pass_env names STITCH_JOB_TOKEN",
            ),
            (
                LocalConfig {
                    pass_env: vec!["A=B".into()],
                    ..base.clone()
                },
                "pass_env has the invalid variable name",
            ),
            (
                LocalConfig {
                    env: [("CC".into(), "gcc".into())].into(),
                    pass_env: vec!["CC".into()],
                    ..base.clone()
                },
                "local.env also sets",
            ),
        ];
        for (config, expected) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{err:?} should contain {expected:?}"
            );
        }
    }

    #[test]
    fn accounts_need_root_and_must_exist() {
        assert_eq!(RunAs::resolve(None, None, 1000).unwrap(), None);
        let err = RunAs::resolve(Some("root"), None, 1000).unwrap_err();
        assert!(matches!(err, LocalConfigError::NotRoot), "{err}");
        let err = RunAs::resolve(None, Some("0"), 1000).unwrap_err();
        assert!(
            err.to_string().contains("need stitch to run as root"),
            "{err}"
        );
        let err = RunAs::resolve(Some("no-such-user-stitch"), None, 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "local.user \"no-such-user-stitch\": no such user on this machine"
        );
        let err = RunAs::resolve(None, Some("no-such-group-stitch"), 0).unwrap_err();
        assert!(err.to_string().contains("no such group"), "{err}");
        let root = RunAs::resolve(Some("0"), None, 0).unwrap().unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(root.user.map(|u| u.0).as_deref(), Some("root"));
        let group_only = RunAs::resolve(None, Some("0"), 0).unwrap().unwrap();
        assert_eq!(
            (group_only.uid, group_only.gid, group_only.user),
            (0, 0, None)
        );
    }
}
