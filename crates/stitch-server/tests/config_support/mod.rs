//! What the `config_*` tests share: a configuration source made of a real
//! TOML file in a temporary directory and an environment passed in (never
//! the process's own, never mutated), loaded with `config::load`, and
//! assertions on the problems it reports by key.

#![allow(dead_code)] // each test file uses its own part of the helpers

use std::collections::BTreeMap;

use stitch_server::config::{load, render_problems, Config, ConfigError, LoadOptions};
use tempfile::TempDir;

/// A configuration source: an optional file, an environment, CLI flags
/// (`opts`, which a test may set before loading).
pub struct Setup {
    _dir: TempDir,
    pub opts: LoadOptions,
}

/// `toml` as the configuration file (`None`: no file) and `env` as the
/// environment.
pub fn setup(toml: Option<&str>, env: &[(&str, &str)]) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = toml.map(|text| {
        let path = dir.path().join("stitch.toml");
        std::fs::write(&path, text).expect("write config");
        path
    });
    let env: BTreeMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Setup {
        _dir: dir,
        opts: LoadOptions {
            file,
            env: Some(env),
            ..LoadOptions::default()
        },
    }
}

impl Setup {
    pub fn load(&self) -> Result<Config, ConfigError> {
        load(&self.opts)
    }

    /// The configuration, which must load.
    pub fn ok(&self) -> Config {
        self.load()
            .unwrap_or_else(|e| panic!("unexpected problems:\n{}", render_problems(&e)))
    }

    /// The problems reported, as `(key, message)`; there must be some.
    pub fn problems(&self) -> Vec<(String, String)> {
        match self.load() {
            Ok(c) => panic!("expected problems, got {c:#?}"),
            Err(e) => e.problems.into_iter().map(|p| (p.key, p.message)).collect(),
        }
    }
}

/// Loads the file `toml` with the environment `env`.
pub fn load_text(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    setup(Some(toml), env).load()
}

/// The configuration of the file `toml` with the environment `env`,
/// which must load.
pub fn ok(toml: &str, env: &[(&str, &str)]) -> Config {
    setup(Some(toml), env).ok()
}

/// The problems the file `toml` with the environment `env` reports.
pub fn problems(toml: &str, env: &[(&str, &str)]) -> Vec<(String, String)> {
    setup(Some(toml), env).problems()
}

/// Asserts a problem at exactly `key` whose message contains `fragment`.
#[track_caller]
pub fn assert_problem(problems: &[(String, String)], key: &str, fragment: &str) {
    assert!(
        problems
            .iter()
            .any(|(k, m)| k == key && m.contains(fragment)),
        "no problem `{key}: …{fragment}…` in {problems:#?}"
    );
}

/// Asserts there is exactly one problem, at `key`, containing `fragment`.
#[track_caller]
pub fn assert_only_problem(problems: &[(String, String)], key: &str, fragment: &str) {
    assert_eq!(problems.len(), 1, "expected one problem, got {problems:#?}");
    assert_problem(problems, key, fragment);
}
