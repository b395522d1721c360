//! Loading and validating [`Config`](super::Config).
//!
//! Layers, later ones winning key by key:
//!
//! 1. built-in defaults (the serde defaults of the types, plus the built-in
//!    `default` queue on the `fake` runner, see below);
//! 2. the TOML file given with `--config FILE` ([`LoadOptions::file`]);
//! 3. environment variables `STITCH_` + the key path in upper case with `__`
//!    between levels (`STITCH_STORAGE__URL`, `STITCH_QUEUES__CI__LOCAL__COMMAND`);
//! 4. the CLI flags `--listen` and `--data-dir` ([`LoadOptions::listen`],
//!    [`LoadOptions::data_dir`]).
//!
//! **The built-in `default` queue** exists only when neither the file nor the
//! environment defines any queue. As soon as queues are configured anywhere,
//! the configured queues are the whole set (a fake runner never sits silently
//! next to real queues); environment variables add queues to, or override keys
//! of, the file's queues.
//!
//! Only environment variables whose first path segment is a top-level key
//! ([`TOP_LEVEL_KEYS`](super::TOP_LEVEL_KEYS): `listen`, `data_dir`, `storage`, `api`, `queues`,
//! `http`, …) are configuration;
//! others with the `STITCH_` prefix (`STITCH_SERVER`, `STITCH_TOKEN`,
//! `STITCH_API_TOKEN`, `STITCH_JOB_*`, …) are ignored. Empty variables count
//! as unset.
//!
//! [`load`] reports **every** problem it finds (unknown keys, type errors,
//! validation rules), each with its key path; [`render_problems`](super::render_problems) prints them
//! one per line for `stitch config check`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use figment::value::{Dict, Value};
use figment::{Figment, Profile, Provider};

use super::extract::extract;
use super::layers::{builtin_queues, env_layer, read_file, Layer};
use super::problems::{ConfigError, ConfigProblem, Problems};
use super::validate::validate;
use super::{runner_tables, Config};

/// Where configuration comes from.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// `--config FILE`; none = defaults + environment only. A file given here
    /// that cannot be read is an error.
    pub file: Option<PathBuf>,
    /// The environment to read `STITCH_*` overrides and `api.tokens_env`
    /// variables from. `None` = the process environment; `Some` replaces it
    /// entirely (tests use this so they never mutate the process environment).
    pub env: Option<BTreeMap<String, String>>,
    /// `--listen ADDR`: wins over the file and the environment.
    pub listen: Option<SocketAddr>,
    /// `--data-dir DIR`: wins over the file and the environment.
    pub data_dir: Option<PathBuf>,
}

impl LoadOptions {
    /// Looks up an environment variable in [`LoadOptions::env`], or in the
    /// process environment when that is `None`. For [`api_tokens`].
    pub fn env_var(&self, name: &str) -> Option<String> {
        match &self.env {
            Some(env) => env.get(name).cloned(),
            None => std::env::var(name).ok(),
        }
    }

    pub(super) fn env_vars(&self) -> Vec<(String, Result<String, OsString>)> {
        match &self.env {
            Some(env) => env
                .iter()
                .map(|(k, v)| (k.clone(), Ok(v.clone())))
                .collect(),
            None => std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string())))
                .collect(),
        }
    }
}

/// The accepted bearer tokens: the values of the environment variables named
/// by `api.tokens_env`, in order, trimmed; unset or empty variables are
/// skipped (and are a [`load`] error). Empty result: no authentication.
pub fn api_tokens(config: &Config, env: impl Fn(&str) -> Option<String>) -> Vec<String> {
    config
        .api
        .tokens_env
        .iter()
        .filter_map(|name| env(name))
        .map(|token| token.trim().to_string())
        .filter(|token| !token.is_empty())
        .collect()
}

/// Loads the configuration: defaults, then the file, then `STITCH_*`, then
/// the CLI overrides; then validates it. The error lists every problem found.
pub fn load(opts: &LoadOptions) -> Result<Config, ConfigError> {
    let mut problems = Problems::default();

    // 2. The file. Unreadable or malformed: nothing else is worth checking.
    let (file_name, file_dict) = match &opts.file {
        None => (String::from("no file"), Dict::new()),
        Some(path) => match read_file(path) {
            Ok(dict) => (format!("TOML file {}", path.display()), dict),
            Err(message) => {
                return Err(ConfigError {
                    problems: vec![ConfigProblem {
                        key: path.display().to_string(),
                        message,
                    }],
                })
            }
        },
    };

    // 3. The environment.
    let env = env_layer(opts, &mut problems);

    // 1. Built-in defaults: the serde defaults, plus the built-in queue set
    //    unless queues are configured anywhere.
    let mut figment = Figment::new();
    if !file_dict.contains_key("queues") && !env.dict.contains_key("queues") {
        figment = figment.merge(Layer::new("built-in defaults", builtin_queues()));
    }
    figment = figment
        .merge(Layer::new(file_name, file_dict))
        .merge(Layer::new("environment variables", env.dict.clone()));
    let mut merged = match figment.data() {
        Ok(mut data) => Value::from(data.remove(&Profile::Default).unwrap_or_default()),
        Err(e) => {
            problems.push(Vec::new(), e.to_string());
            return Err(problems.into_error(&env.sources, opts));
        }
    };
    runner_tables::check(&mut merged, &mut problems);

    // 4. CLI overrides win over everything: whatever the file or the
    //    environment said for these keys is neither used nor checked.
    if let Value::Dict(_, dict) = &mut merged {
        if opts.listen.is_some() {
            dict.remove("listen");
        }
        if opts.data_dir.is_some() {
            dict.remove("data_dir");
        }
    }

    let Some(mut config) = extract(&mut merged, &env, &mut problems) else {
        return Err(problems.into_error(&env.sources, opts));
    };
    if let Some(listen) = opts.listen {
        config.listen = listen;
    }
    if let Some(data_dir) = &opts.data_dir {
        config.data_dir = data_dir.clone();
    }

    validate(&config, &mut problems, &|name| opts.env_var(name));

    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems.into_error(&env.sources, opts))
    }
}
