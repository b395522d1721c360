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
    /// Working directory of the command. Default `.`.
    pub workdir: PathBuf,
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
    /// Extra environment for the command, on top of stitch's own environment.
    pub env: BTreeMap<String, String>,
}

impl LocalConfig {
    /// A configuration with the defaults for everything but the command
    /// and the state directory.
    pub fn new(command: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            command: command.into(),
            workdir: PathBuf::from("."),
            concurrency: 1,
            cancel_grace: Duration::from_secs(10),
            state_dir: state_dir.into(),
            env: BTreeMap::new(),
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
        Ok(())
    }
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
        assert_eq!(c.workdir, PathBuf::from("."));
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
        ];
        for (config, expected) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{err:?} should contain {expected:?}"
            );
        }
    }
}
