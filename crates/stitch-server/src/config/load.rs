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
//! ([`TOP_LEVEL_KEYS`]: `listen`, `data_dir`, `storage`, `api`, `queues`,
//! `http`, …) are configuration;
//! others with the `STITCH_` prefix (`STITCH_SERVER`, `STITCH_TOKEN`,
//! `STITCH_API_TOKEN`, `STITCH_JOB_*`, …) are ignored. Empty variables count
//! as unset.
//!
//! [`load`] reports **every** problem it finds (unknown keys, type errors,
//! validation rules), each with its key path; [`render_problems`] prints them
//! one per line for `stitch config check`.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::error::{Actual, Kind};
use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use humantime_serde::re::humantime::{format_duration, parse_duration};

use stitch_runners::local::{check_pass_env, LocalConfigError, RunAs};
use stitch_runners::{FakeConfig, FakeConfigError, LocalConfig};

use super::{Config, FakeSection, LocalSection, RunnerName};

/// Prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "STITCH_";

/// Separator between key path levels in environment variable names.
pub const ENV_SEPARATOR: &str = "__";

/// The top-level keys of [`Config`]. Only `STITCH_*` variables whose first
/// path segment is one of these are read as configuration.
pub const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "data_dir",
    "storage",
    "cluster",
    "api",
    "queues",
    "webhooks",
    "spindle",
    "http",
    "retention",
];

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

    fn env_vars(&self) -> Vec<(String, Result<String, OsString>)> {
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

/// One problem, with the key path it concerns (`queues.ci.local.command`).
///
/// `key` is a TOML-style key path: segments that are not bare keys are
/// quoted (`queues."team/app"`), array elements are `[i]`
/// (`api.tokens_env[0]`). For problems with the file itself (unreadable, not
/// valid TOML) it is the file's path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key: String,
    pub message: String,
}

/// Every problem found.
#[derive(Clone, Debug, thiserror::Error)]
#[error("invalid configuration: {}", .problems.iter().map(|p| format!("{}: {}", p.key, p.message)).collect::<Vec<_>>().join("; "))]
pub struct ConfigError {
    pub problems: Vec<ConfigProblem>,
}

/// One line per problem, `key: message`, lines separated by `\n` (no
/// trailing newline, for `eprintln!`); what `stitch config check` prints:
///
/// ```text
/// queues.ci.local.command: missing; runner "local" needs a command
/// queues.ci.poll.running: must be greater than zero
/// ```
pub fn render_problems(error: &ConfigError) -> String {
    error
        .problems
        .iter()
        .map(|p| {
            if p.key.is_empty() {
                p.message.clone()
            } else {
                format!("{}: {}", p.key, p.message)
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
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

    let Some(mut config) = extract(&mut merged, &mut problems) else {
        return Err(problems.into_error(&env.sources, opts));
    };
    if let Some(listen) = opts.listen {
        config.listen = listen;
    }
    if let Some(data_dir) = &opts.data_dir {
        config.data_dir = data_dir.clone();
    }

    validate(&config, &mut problems, &|name| opts.env_var(name));

    if problems.found.is_empty() {
        Ok(config)
    } else {
        Err(problems.into_error(&env.sources, opts))
    }
}

// ---------------------------------------------------------------------------
// Key paths and collected problems

/// One segment of a key path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Seg {
    Key(String),
    Index(usize),
}

impl Seg {
    fn as_string(&self) -> String {
        match self {
            Seg::Key(k) => k.clone(),
            Seg::Index(i) => i.to_string(),
        }
    }
}

fn path(parts: &[&str]) -> Vec<Seg> {
    parts.iter().map(|p| Seg::Key((*p).to_string())).collect()
}

fn with(base: &[Seg], more: &[&str]) -> Vec<Seg> {
    let mut p = base.to_vec();
    p.extend(more.iter().map(|m| Seg::Key((*m).to_string())));
    p
}

/// Displays a key path TOML-style: `queues."team/app".local.command`,
/// `api.tokens_env[0]`.
struct KeyPath<'a>(&'a [Seg]);

impl fmt::Display for KeyPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Index(n) => write!(f, "[{n}]")?,
                Seg::Key(k) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    let bare = !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if bare {
                        f.write_str(k)?;
                    } else {
                        write!(f, "{k:?}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct Problems {
    found: Vec<(Vec<Seg>, String)>,
    /// Keys whose value was dropped during extraction (unknown, wrong type,
    /// missing): validation rules about them, or depending on them, are
    /// skipped so one mistake is reported once.
    broken: BTreeSet<Vec<Seg>>,
}

impl Problems {
    fn push(&mut self, key: Vec<Seg>, message: impl Into<String>) {
        self.found.push((key, message.into()));
    }

    /// True when `key` or one of its ancestors was dropped.
    fn is_broken(&self, key: &[Seg]) -> bool {
        (0..=key.len()).any(|n| self.broken.contains(&key[..n]))
    }

    /// A validation problem, unless the key was already reported.
    fn report(&mut self, key: Vec<Seg>, message: impl Into<String>) {
        if !self.is_broken(&key) {
            self.push(key, message);
        }
    }

    fn into_error(self, env_sources: &[(Vec<String>, String)], opts: &LoadOptions) -> ConfigError {
        let mut found = self.found;
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let problems = found
            .into_iter()
            .map(|(key, mut message)| {
                if let Some(origin) = origin(&key, env_sources, opts) {
                    message.push_str(&format!(" (set by {origin})"));
                }
                ConfigProblem {
                    key: KeyPath(&key).to_string(),
                    message,
                }
            })
            .collect();
        ConfigError { problems }
    }
}

/// Which CLI flag or environment variable set the value at `key`, if any
/// (the file is implied: `stitch config check --config FILE`).
fn origin(
    key: &[Seg],
    env_sources: &[(Vec<String>, String)],
    opts: &LoadOptions,
) -> Option<String> {
    let key: Vec<String> = key.iter().map(Seg::as_string).collect();
    match key.first().map(String::as_str) {
        Some("listen") if opts.listen.is_some() => return Some("--listen".into()),
        Some("data_dir") if opts.data_dir.is_some() => return Some("--data-dir".into()),
        _ => {}
    }
    env_sources
        .iter()
        .filter(|(p, _)| !p.is_empty() && key.starts_with(p))
        .max_by_key(|(p, _)| p.len())
        .map(|(_, var)| var.clone())
}

// ---------------------------------------------------------------------------
// Layers

/// A figment provider holding one already-parsed layer.
struct Layer {
    name: String,
    dict: Dict,
}

impl Layer {
    fn new(name: impl Into<String>, dict: Dict) -> Self {
        Self {
            name: name.into(),
            dict,
        }
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }

    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// `queues` of [`Config::default`] as a layer: each built-in queue with all
/// its keys at their defaults.
fn builtin_queues() -> Dict {
    let queues: Dict = Config::default()
        .queues
        .keys()
        .map(|name| (name.clone(), Value::from(Dict::new())))
        .collect();
    let mut dict = Dict::new();
    dict.insert("queues".into(), Value::from(queues));
    dict
}

fn read_file(path: &Path) -> Result<Dict, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read configuration file: {e}"))?;
    <Toml as Format>::from_str::<Dict>(&text).map_err(|e| {
        let at = e
            .span()
            .map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                format!(" at line {line}, column {column}")
            })
            .unwrap_or_default();
        let message = e.message().trim().lines().collect::<Vec<_>>().join("; ");
        format!("not valid TOML{at}: {message}")
    })
}

struct EnvLayer {
    dict: Dict,
    /// Lower-cased key path → the variable that set it.
    sources: Vec<(Vec<String>, String)>,
}

/// Builds the environment layer from the `STITCH_*` variables that are
/// configuration keys. Variables are applied in name order, so a more
/// specific one (`STITCH_QUEUES__CI__RUNNER`) wins over a table given whole
/// (`STITCH_QUEUES__CI={…}`).
fn env_layer(opts: &LoadOptions, problems: &mut Problems) -> EnvLayer {
    let mut vars = opts.env_vars();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut dict = Dict::new();
    let mut sources = Vec::new();
    for (name, value) in vars {
        let Some(segments) = env_key_path(&name) else {
            continue;
        };
        let key: Vec<Seg> = segments.iter().map(|s| Seg::Key(s.clone())).collect();
        if segments.iter().any(String::is_empty) {
            problems.push(
                key,
                format!(
                    "environment variable {name} has an empty key segment (`__` separates levels)"
                ),
            );
            continue;
        }
        let value = match value {
            Ok(value) => value,
            Err(_) => {
                problems.push(
                    key,
                    format!("environment variable {name} is not valid UTF-8"),
                );
                continue;
            }
        };
        if value.is_empty() {
            continue;
        }
        insert_path(&mut dict, &segments, parse_env_value(&segments, &value));
        sources.push((segments, name));
    }
    EnvLayer { dict, sources }
}

/// `STITCH_QUEUES__CI__LOCAL__COMMAND` → `["queues", "ci", "local",
/// "command"]`; `None` when the variable is not configuration (wrong prefix,
/// or first segment not a top-level key).
fn env_key_path(name: &str) -> Option<Vec<String>> {
    let prefix = name.get(..ENV_PREFIX.len())?;
    if !prefix.eq_ignore_ascii_case(ENV_PREFIX) {
        return None;
    }
    let rest = &name[ENV_PREFIX.len()..];
    let segments: Vec<String> = rest.split(ENV_SEPARATOR).map(str::to_lowercase).collect();
    TOP_LEVEL_KEYS
        .contains(&segments[0].as_str())
        .then_some(segments)
}

/// Keys whose values are strings: an environment value for them is taken
/// verbatim (`STITCH_QUEUES__CI__LOCAL__COMMAND=true` is the command `true`,
/// not a boolean).
fn is_string_key(segments: &[String]) -> bool {
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    matches!(
        s.as_slice(),
        ["listen"]
            | ["data_dir"]
            | ["storage", "url"]
            | ["api", "public_url"]
            | ["queues", _, "runner"]
            | [
                "queues",
                _,
                "local",
                "command" | "workdir" | "user" | "group"
            ]
            | ["queues", _, "local", "env", _]
            | [
                "queues",
                _,
                "buildkite",
                "org" | "pipeline" | "branch" | "commit" | "token_env" | "api_url"
            ]
            | ["queues", _, "buildkite", "webhook", "mode" | "secret_env"]
            | [
                "queues",
                _,
                "github",
                "owner"
                    | "repo"
                    | "workflow"
                    | "ref"
                    | "token_env"
                    | "app_id"
                    | "private_key_file"
                    | "api_url"
                    | "api_version"
            ]
            | ["queues", _, "github", "inputs", _]
            | ["webhooks", "github", "secret_env"]
            | [
                "spindle",
                "hostname" | "owner" | "default_queue" | "jetstream_url" | "plc_url"
            ]
    ) || is_duration_key(segments)
}

/// Keys whose values are durations (`"500ms"`, `"5s"`, `"30m"`, `"2h"`).
fn is_duration_key(segments: &[String]) -> bool {
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    matches!(
        s.as_slice(),
        ["queues", _, "accepted_timeout" | "max_duration"]
            | ["queues", _, "poll", "accepted" | "running"]
            | ["queues", _, "retry", "initial" | "max"]
            | ["queues", _, "local", "cancel_grace"]
            | ["queues", _, "fake", "accept_delay" | "run_duration"]
            | ["queues", _, "buildkite", "request_timeout" | "log_poll"]
            | ["queues", _, "buildkite", "rate_limit", "window"]
            | ["queues", _, "buildkite", "webhook", "max_age" | "poll"]
            | [
                "queues",
                _,
                "github",
                "request_timeout" | "log_poll" | "lookup_settle"
            ]
            | ["queues", _, "github", "rate_limit", "window"]
            | ["webhooks", "github", "poll"]
            | ["cluster", "lease" | "delivery_timeout" | "poll_interval"]
            | ["http", "header_read_timeout" | "body_read_timeout"]
    ) || is_retention_key(segments)
}

/// `[retention]` keys: a duration or `"off"`.
fn is_retention_key(segments: &[String]) -> bool {
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    matches!(
        s.as_slice(),
        [
            "retention",
            "builds" | "events" | "dead_letters" | "interval"
        ]
    )
}

/// An environment value: strings verbatim for string keys; for
/// `api.tokens_env` a comma-separated list or a TOML-style array; otherwise
/// numbers, booleans, `[arrays]` and `{inline = "tables"}` as figment's `Env`
/// parses them.
fn parse_env_value(segments: &[String], raw: &str) -> Value {
    if is_string_key(segments) {
        return Value::from(raw.to_string());
    }
    if segments == ["api", "tokens_env"] && !raw.trim_start().starts_with('[') {
        let names: Vec<Value> = raw
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| Value::from(s.to_string()))
            .collect();
        return Value::from(names);
    }
    raw.parse::<Value>().unwrap_or_else(|never| match never {})
}

/// Inserts `value` at `segments`, creating tables on the way; a table
/// replaces a non-table value in the way, tables are merged key by key.
fn insert_path(dict: &mut Dict, segments: &[String], value: Value) {
    let Some((first, rest)) = segments.split_first() else {
        return;
    };
    if rest.is_empty() {
        match (dict.get_mut(first), value) {
            (Some(Value::Dict(_, old)), Value::Dict(_, new)) => {
                for (k, v) in new {
                    insert_path(old, &[k], v);
                }
            }
            (_, value) => {
                dict.insert(first.clone(), value);
            }
        }
        return;
    }
    let entry = dict
        .entry(first.clone())
        .or_insert_with(|| Value::from(Dict::new()));
    if !matches!(entry, Value::Dict(..)) {
        *entry = Value::from(Dict::new());
    }
    if let Value::Dict(_, inner) = entry {
        insert_path(inner, rest, value);
    }
}

// ---------------------------------------------------------------------------
// Extraction: every unknown key and type error, not just the first

/// Deserializes [`Config`] from the merged tree. On an error, records it,
/// drops the offending key (so its default applies) and tries again, until
/// the rest deserializes: every unknown key and type error is reported, each
/// once. `None` when an error cannot be attributed to a key.
fn extract(value: &mut Value, problems: &mut Problems) -> Option<Config> {
    const MAX_ROUNDS: usize = 200;
    for _ in 0..MAX_ROUNDS {
        let error = match value.deserialize::<Config>() {
            Ok(config) => return Some(config),
            Err(error) => error,
        };
        let mut progress = false;
        for e in error {
            let target = classify(value, &e.path);
            let (key, message) = describe(&e.kind, &target);
            problems.push(key.clone(), message);
            problems.broken.insert(key);
            if !target.is_empty() && remove_at(value, &target) {
                problems.broken.insert(target);
                progress = true;
            }
        }
        if !progress {
            return None;
        }
    }
    problems.push(Vec::new(), "too many problems; stopped looking for more");
    None
}

/// The figment error path as segments, telling array indices from keys.
fn classify(value: &Value, raw: &[String]) -> Vec<Seg> {
    let mut out = Vec::with_capacity(raw.len());
    let mut cur = Some(value);
    for seg in raw {
        match cur {
            Some(Value::Array(_, items)) if seg.parse::<usize>().is_ok() => {
                let i: usize = seg.parse().unwrap_or_default();
                out.push(Seg::Index(i));
                cur = items.get(i);
            }
            Some(Value::Dict(_, dict)) => {
                out.push(Seg::Key(seg.clone()));
                cur = dict.get(seg);
            }
            _ => {
                out.push(Seg::Key(seg.clone()));
                cur = None;
            }
        }
    }
    out
}

/// The problem for a figment error at `target`: its key and message.
fn describe(kind: &Kind, target: &[Seg]) -> (Vec<Seg>, String) {
    let strings: Vec<String> = target.iter().map(Seg::as_string).collect();
    let duration_hint = if is_retention_key(&strings) {
        " (a duration like \"30d\", \"12h\", \"10m\", or \"off\")"
    } else if is_duration_key(&strings) {
        " (durations are strings like \"500ms\", \"5s\", \"30m\", \"2h\")"
    } else {
        ""
    };
    match kind {
        Kind::UnknownField(_, expected) => (
            target.to_vec(),
            format!("unknown key; expected one of: {}", expected.join(", ")),
        ),
        Kind::MissingField(field) => {
            let key = with(target, &[field.as_ref()]);
            let message = if strings.len() == 3 && strings[0] == "queues" && strings[2] == "local" {
                "missing; runner \"local\" needs a command".to_string()
            } else if strings.len() == 3 && strings[0] == "queues" && strings[2] == "buildkite" {
                format!("missing; runner \"buildkite\" needs {field}")
            } else if strings.len() == 3 && strings[0] == "queues" && strings[2] == "github" {
                format!("missing; runner \"github\" needs {field}")
            } else {
                "missing".to_string()
            };
            (key, message)
        }
        Kind::UnknownVariant(found, expected) => (
            target.to_vec(),
            format!(
                "unknown value {found:?}; expected one of: {}",
                expected.join(", ")
            ),
        ),
        Kind::InvalidType(actual, expected) => (
            target.to_vec(),
            format!("expected {expected}, found {actual}{duration_hint}"),
        ),
        Kind::InvalidValue(Actual::Str(text), _) if !duration_hint.is_empty() => {
            let reason = parse_duration(text)
                .err()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            (
                target.to_vec(),
                format!("invalid duration {text:?}{reason}{duration_hint}"),
            )
        }
        Kind::InvalidValue(actual, expected) => (
            target.to_vec(),
            format!("invalid value {actual}; expected {expected}{duration_hint}"),
        ),
        Kind::Message(message) if !duration_hint.is_empty() => (
            target.to_vec(),
            format!("invalid duration: {message}{duration_hint}"),
        ),
        Kind::Message(message) => (target.to_vec(), format!("invalid value: {message}")),
        other => (target.to_vec(), other.to_string()),
    }
}

/// Removes the value at `path`; false if there is none.
fn remove_at(value: &mut Value, path: &[Seg]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut cur = value;
    for seg in parents {
        let next = match (cur, seg) {
            (Value::Dict(_, dict), Seg::Key(k)) => dict.get_mut(k),
            (Value::Array(_, items), Seg::Index(i)) => items.get_mut(*i),
            _ => None,
        };
        match next {
            Some(next) => cur = next,
            None => return false,
        }
    }
    match (cur, last) {
        (Value::Dict(_, dict), Seg::Key(k)) => dict.remove(k).is_some(),
        (Value::Array(_, items), Seg::Index(i)) if *i < items.len() => {
            items.remove(*i);
            true
        }
        _ => false,
    }
}

// ---------------------------------------------------------------------------
// Validation rules

/// 127.0.0.0/8, ::1 and IPv4-mapped loopback (as `http::check_bind`).
fn is_loopback(addr: SocketAddr) -> bool {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        std::net::IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

fn runner_str(runner: RunnerName) -> &'static str {
    match runner {
        RunnerName::Noop => "noop",
        RunnerName::Fake => "fake",
        RunnerName::Local => "local",
        RunnerName::Buildkite => "buildkite",
        RunnerName::Github => "github",
    }
}

fn validate(config: &Config, problems: &mut Problems, env: &dyn Fn(&str) -> Option<String>) {
    if config.data_dir.as_os_str().is_empty() {
        problems.report(path(&["data_dir"]), "must not be empty");
    }

    if let Some(url) = &config.storage.url {
        // The URL is not echoed: a database URL may hold a password.
        let key = path(&["storage", "url"]);
        let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("sqlite") => {
                if url["sqlite://".len()..].is_empty() {
                    problems.report(
                        key,
                        "sqlite:// needs a path, e.g. sqlite://stitch-data/stitch.db",
                    );
                }
            }
            Some("postgres" | "postgresql" | "mysql" | "mariadb") => {
                let rest = url.split_once("://").map_or("", |(_, rest)| rest);
                if rest.is_empty() {
                    problems.report(
                        key,
                        "a database server URL needs a host and database, e.g. postgres://stitch@db/stitch",
                    );
                }
            }
            _ => problems.report(
                key,
                "unsupported storage url; use sqlite://PATH, postgres://… or mysql://…",
            ),
        }
    }

    let cluster = &config.cluster;
    if cluster.lease < Duration::from_millis(300) {
        problems.report(path(&["cluster", "lease"]), "must be at least 300ms");
    }
    if cluster.delivery_timeout < Duration::from_secs(1) {
        problems.report(
            path(&["cluster", "delivery_timeout"]),
            "must be at least 1s",
        );
    }
    if cluster.poll_interval.is_zero() {
        problems.report(
            path(&["cluster", "poll_interval"]),
            "must be greater than zero",
        );
    }

    let http = &config.http;
    for (key, value) in [
        ("header_read_timeout", http.header_read_timeout),
        ("body_read_timeout", http.body_read_timeout),
    ] {
        if value.is_zero() {
            problems.report(path(&["http", key]), "must be greater than zero");
        }
    }
    if http.max_connections == 0 {
        problems.report(path(&["http", "max_connections"]), "must be at least 1");
    }
    if http.ws_max_message_bytes < super::HttpConfig::MIN_WS_MESSAGE_BYTES {
        problems.report(
            path(&["http", "ws_max_message_bytes"]),
            format!(
                "must be at least {} (a WebSocket close or ping frame carries up to 125 bytes)",
                super::HttpConfig::MIN_WS_MESSAGE_BYTES
            ),
        );
    }
    validate_retention(&config.retention, problems);

    let api = &config.api;
    if api.max_body_bytes == 0 {
        problems.report(path(&["api", "max_body_bytes"]), "must be at least 1");
    }
    for (i, name) in api.tokens_env.iter().enumerate() {
        let set = env(name).is_some_and(|v| !v.trim().is_empty());
        if !set {
            let mut key = path(&["api", "tokens_env"]);
            key.push(Seg::Index(i));
            problems.report(
                key,
                format!("environment variable {name:?} is unset or empty; it must hold an accepted bearer token"),
            );
        }
    }
    if let Some(url) = &api.public_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            problems.report(
                path(&["api", "public_url"]),
                "must be an http:// or https:// URL (jobs reach the server through it)",
            );
        }
    }
    if api.tokens_env.is_empty()
        && !is_loopback(config.listen)
        && !problems.is_broken(&path(&["api", "tokens_env"]))
    {
        problems.report(
            path(&["listen"]),
            format!(
                "{} is not a loopback address, but api.tokens_env is empty; \
                 without API tokens the server only binds loopback addresses",
                config.listen
            ),
        );
    }

    if config.queues.is_empty() && !problems.is_broken(&path(&["queues"])) {
        problems.report(
            path(&["queues"]),
            "no queues defined; define a [queues.NAME] table, or leave [queues] out \
             for the built-in \"default\" queue",
        );
    }

    for (name, q) in &config.queues {
        let base = path(&["queues", name]);
        if let Err(e) = stitch_core::validate_queue_name(name) {
            problems.report(base.clone(), e.to_string());
        }

        let runner_known = !problems.is_broken(&with(&base, &["runner"]));
        match (&q.local, q.runner) {
            (None, RunnerName::Local) if runner_known => problems.report(
                with(&base, &["local", "command"]),
                "missing; runner \"local\" needs a command",
            ),
            (Some(local), RunnerName::Local) if local.command.trim().is_empty() => problems.report(
                with(&base, &["local", "command"]),
                "empty; runner \"local\" needs a command",
            ),
            (Some(_), runner) if runner != RunnerName::Local && runner_known => {
                let table = with(&base, &["local"]);
                problems.report(
                    table.clone(),
                    format!(
                        "table [{}] is only read by runner = \"local\" (this queue has runner = \"{}\")",
                        KeyPath(&table),
                        runner_str(runner)
                    ),
                );
            }
            _ => {}
        }
        if q.fake.is_some() && q.runner != RunnerName::Fake && runner_known {
            let table = with(&base, &["fake"]);
            problems.report(
                table.clone(),
                format!(
                    "table [{}] is only read by runner = \"fake\" (this queue has runner = \"{}\")",
                    KeyPath(&table),
                    runner_str(q.runner)
                ),
            );
        }

        if let (Some(local), RunnerName::Local) = (&q.local, q.runner) {
            validate_local_env(&base, local, problems);
            validate_local_account(&base, local, problems);
        }
        if let (Some(fake), RunnerName::Fake) = (&q.fake, q.runner) {
            validate_fake(&base, fake, problems);
        }
        match (&q.buildkite, q.runner) {
            (None, RunnerName::Buildkite) if runner_known => problems.report(
                with(&base, &["buildkite"]),
                "missing; runner \"buildkite\" needs a [queues.NAME.buildkite] table with org and pipeline",
            ),
            (Some(bk), RunnerName::Buildkite) => validate_buildkite(&base, bk, problems, env),
            (Some(_), runner) if runner_known => {
                let table = with(&base, &["buildkite"]);
                problems.report(
                    table.clone(),
                    format!(
                        "table [{}] is only read by runner = \"buildkite\" (this queue has runner = \"{}\")",
                        KeyPath(&table),
                        runner_str(runner)
                    ),
                );
            }
            _ => {}
        }

        match (&q.github, q.runner) {
            (None, RunnerName::Github) if runner_known => problems.report(
                with(&base, &["github"]),
                "missing; runner \"github\" needs a [queues.NAME.github] table with owner, repo and workflow",
            ),
            (Some(gh), RunnerName::Github) => validate_github(&base, gh, problems, env),
            (Some(_), runner) if runner_known => {
                let table = with(&base, &["github"]);
                problems.report(
                    table.clone(),
                    format!(
                        "table [{}] is only read by runner = \"github\" (this queue has runner = \"{}\")",
                        KeyPath(&table),
                        runner_str(runner)
                    ),
                );
            }
            _ => {}
        }

        if q.concurrency == Some(0) {
            problems.report(with(&base, &["concurrency"]), "must be at least 1");
        }
        for (key, value) in [
            ("accepted_timeout", q.accepted_timeout),
            ("max_duration", q.max_duration),
        ] {
            if value == Some(Duration::ZERO) {
                problems.report(
                    with(&base, &[key]),
                    "must be greater than zero (leave it out for no limit)",
                );
            }
        }
        for (key, value) in [("accepted", q.poll.accepted), ("running", q.poll.running)] {
            if value.is_zero() {
                problems.report(with(&base, &["poll", key]), "must be greater than zero");
            }
        }
        let retry = &q.retry;
        if retry.max_attempts == 0 {
            problems.report(
                with(&base, &["retry", "max_attempts"]),
                "must be at least 1",
            );
        }
        if retry.initial.is_zero() {
            problems.report(
                with(&base, &["retry", "initial"]),
                "must be greater than zero",
            );
        } else if retry.initial > retry.max && !problems.is_broken(&with(&base, &["retry", "max"]))
        {
            problems.report(
                with(&base, &["retry", "initial"]),
                format!(
                    "{} is longer than retry.max ({})",
                    format_duration(retry.initial),
                    format_duration(retry.max)
                ),
            );
        }
    }

    if let Some(w) = &config.webhooks.github {
        if env(&w.secret_env).is_none_or(|v| v.trim().is_empty()) {
            problems.report(
                path(&["webhooks", "github", "secret_env"]),
                format!(
                    "environment variable {:?} is unset or empty; it must hold the GitHub webhook secret",
                    w.secret_env
                ),
            );
        }
        if w.poll.is_zero() {
            problems.report(
                path(&["webhooks", "github", "poll"]),
                "must be greater than zero",
            );
        }
    }

    if let Some(spindle) = &config.spindle {
        validate_spindle(config, spindle, problems);
    }
}

/// `[queues.NAME.github]`: names, URL, exactly one way to authenticate,
/// the input limits, and that the named environment variables and key
/// file hold something.
fn validate_retention(retention: &super::RetentionConfig, problems: &mut Problems) {
    use super::RetentionSetting::After;
    for (key, setting) in [
        ("builds", retention.builds),
        ("events", retention.events),
        ("dead_letters", retention.dead_letters),
    ] {
        if setting == After(Duration::ZERO) {
            problems.report(
                path(&["retention", key]),
                "must be greater than zero; use \"off\" to keep everything",
            );
        }
    }
    if let After(interval) = retention.interval {
        if interval < Duration::from_secs(1) {
            problems.report(
                path(&["retention", "interval"]),
                "must be at least 1s; use \"off\" for no background pruning",
            );
        }
    }
}

fn validate_github(
    base: &[Seg],
    gh: &super::GithubSection,
    problems: &mut Problems,
    env: &dyn Fn(&str) -> Option<String>,
) {
    let key = |more: &[&str]| {
        let mut k = with(base, &["github"]);
        k.extend(more.iter().map(|m| Seg::Key((*m).to_string())));
        k
    };
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    };
    for (field, value) in [("owner", &gh.owner), ("repo", &gh.repo)] {
        if !name_ok(value) {
            problems.report(
                key(&[field]),
                format!("{value:?} is not a GitHub name (letters, digits, '-', '_', '.')"),
            );
        }
    }
    if gh.workflow.trim().is_empty() || gh.workflow.contains('/') {
        problems.report(
            key(&["workflow"]),
            "must be the workflow's file name (stitch.yml) or numeric id",
        );
    }
    if gh.git_ref.trim().is_empty() {
        problems.report(key(&["ref"]), "must not be empty");
    }
    if !(gh.api_url.starts_with("http://") || gh.api_url.starts_with("https://")) {
        problems.report(key(&["api_url"]), "must be an http:// or https:// URL");
    }
    let version_ok = gh.api_version.len() == 10
        && chrono::NaiveDate::parse_from_str(&gh.api_version, "%Y-%m-%d").is_ok();
    if !version_ok {
        problems.report(
            key(&["api_version"]),
            format!(
                "{:?} is not a GitHub API version (a date like 2022-11-28)",
                gh.api_version
            ),
        );
    }
    let app = [
        gh.app_id.is_some(),
        gh.private_key_file.is_some(),
        gh.installation_id.is_some(),
    ];
    match (&gh.token_env, app) {
        (Some(_), [false, false, false]) | (None, [true, true, true]) => {}
        (None, [false, false, false]) => problems.report(
            key(&["token_env"]),
            "missing; set token_env, or app_id, private_key_file and installation_id",
        ),
        (Some(_), _) => problems.report(
            key(&["token_env"]),
            "set either token_env or the GitHub App keys (app_id, private_key_file, installation_id), not both",
        ),
        (None, _) => {
            for (field, set) in ["app_id", "private_key_file", "installation_id"]
                .iter()
                .zip(app)
            {
                if !set {
                    problems.report(
                        key(&[field]),
                        "missing; a GitHub App needs app_id, private_key_file and installation_id",
                    );
                }
            }
        }
    }
    if let Some(name) = &gh.token_env {
        if env(name).is_none_or(|v| v.trim().is_empty()) {
            problems.report(
                key(&["token_env"]),
                format!(
                    "environment variable {name:?} is unset or empty; it must hold a GitHub token"
                ),
            );
        }
    }
    if let Some(file) = &gh.private_key_file {
        match std::fs::read(file) {
            Ok(pem) if pem.starts_with(b"-----BEGIN") => {}
            Ok(_) => problems.report(
                key(&["private_key_file"]),
                format!("{} is not a PEM private key", file.display()),
            ),
            Err(e) => problems.report(
                key(&["private_key_file"]),
                format!("cannot read {}: {e}", file.display()),
            ),
        }
    }
    if gh.app_id.as_deref().is_some_and(|a| a.trim().is_empty()) {
        problems.report(key(&["app_id"]), "must not be empty");
    }
    if gh.max_inputs < stitch_runners::github::RESERVED_INPUTS.len() {
        problems.report(
            key(&["max_inputs"]),
            format!(
                "must be at least {} (stitch's own inputs)",
                stitch_runners::github::RESERVED_INPUTS.len()
            ),
        );
    } else {
        let reserved = stitch_runners::github::RESERVED_INPUTS;
        let total = reserved.len()
            + gh.inputs
                .keys()
                .filter(|k| !reserved.contains(&k.as_str()))
                .count();
        if total > gh.max_inputs {
            problems.report(
                key(&["inputs"]),
                format!(
                    "{} extra inputs plus stitch's 5 exceed GitHub's limit of {} inputs",
                    gh.inputs.len(),
                    gh.max_inputs
                ),
            );
        }
    }
    let limit = stitch_runners::http_budget::RateLimit {
        requests: gh.rate_limit.requests,
        window: gh.rate_limit.window,
    };
    if let Some(problem) = limit.problem() {
        let field = if gh.rate_limit.requests < 2 {
            "requests"
        } else {
            "window"
        };
        problems.report(key(&["rate_limit", field]), problem);
    }
    for (field, value) in [
        ("request_timeout", gh.request_timeout),
        ("log_poll", gh.log_poll),
    ] {
        if value.is_zero() {
            problems.report(key(&[field]), "must be greater than zero");
        }
    }
}

/// `[spindle]`: the values the Tangled appview and the network will hold
/// the spindle to.
fn validate_spindle(config: &Config, spindle: &super::SpindleConfig, problems: &mut Problems) {
    let host = spindle.hostname.trim();
    if host.is_empty() {
        problems.report(path(&["spindle", "hostname"]), "must not be empty");
    } else if host.contains("://") || host.contains('/') || host.contains(char::is_whitespace) {
        problems.report(
            path(&["spindle", "hostname"]),
            "must be a bare hostname (e.g. spindle.example.com), without scheme or path",
        );
    }
    if !spindle.owner.starts_with("did:") || spindle.owner.len() < 8 {
        problems.report(
            path(&["spindle", "owner"]),
            "must be the operator's DID, e.g. did:plc:abc123",
        );
    }
    if !config.queues.contains_key(&spindle.default_queue)
        && !problems.is_broken(&path(&["queues"]))
    {
        problems.report(
            path(&["spindle", "default_queue"]),
            format!(
                "{:?} is not a configured queue (known: {})",
                spindle.default_queue,
                config.queues.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        );
    }
    if !(spindle.jetstream_url.starts_with("ws://") || spindle.jetstream_url.starts_with("wss://"))
    {
        problems.report(
            path(&["spindle", "jetstream_url"]),
            "must be a ws:// or wss:// URL",
        );
    }
    if !(spindle.plc_url.starts_with("http://") || spindle.plc_url.starts_with("https://")) {
        problems.report(
            path(&["spindle", "plc_url"]),
            "must be an http:// or https:// URL",
        );
    }
}

/// `[queues.NAME.buildkite]`: slugs, URL, budget, and that the named
/// environment variables hold secrets.
fn validate_buildkite(
    base: &[Seg],
    bk: &super::BuildkiteSection,
    problems: &mut Problems,
    env: &dyn Fn(&str) -> Option<String>,
) {
    let key = |more: &[&str]| {
        let mut k = with(base, &["buildkite"]);
        k.extend(more.iter().map(|m| Seg::Key((*m).to_string())));
        k
    };
    let slug_ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    };
    for (field, value) in [("org", &bk.org), ("pipeline", &bk.pipeline)] {
        if !slug_ok(value) {
            problems.report(
                key(&[field]),
                format!("{value:?} is not a Buildkite slug (letters, digits, '-', '_', '.')"),
            );
        }
    }
    for (field, value) in [("branch", &bk.branch), ("commit", &bk.commit)] {
        if value.trim().is_empty() {
            problems.report(key(&[field]), "must not be empty");
        }
    }
    if !(bk.api_url.starts_with("http://") || bk.api_url.starts_with("https://")) {
        problems.report(key(&["api_url"]), "must be an http:// or https:// URL");
    }
    if env(&bk.token_env).is_none_or(|v| v.trim().is_empty()) {
        problems.report(
            key(&["token_env"]),
            format!(
                "environment variable {:?} is unset or empty; it must hold a Buildkite API token",
                bk.token_env
            ),
        );
    }
    let limit = stitch_runners::buildkite::RateLimit {
        requests: bk.rate_limit.requests,
        window: bk.rate_limit.window,
    };
    if let Some(problem) = limit.problem() {
        let field = if bk.rate_limit.requests < 2 {
            "requests"
        } else {
            "window"
        };
        problems.report(key(&["rate_limit", field]), problem);
    }
    for (field, value) in [
        ("request_timeout", bk.request_timeout),
        ("log_poll", bk.log_poll),
    ] {
        if value.is_zero() {
            problems.report(key(&[field]), "must be greater than zero");
        }
    }
    if bk.max_log_bytes == 0 {
        problems.report(key(&["max_log_bytes"]), "must be at least 1");
    }
    if let Some(w) = &bk.webhook {
        if env(&w.secret_env).is_none_or(|v| v.trim().is_empty()) {
            problems.report(
                key(&["webhook", "secret_env"]),
                format!(
                    "environment variable {:?} is unset or empty; it must hold the webhook token",
                    w.secret_env
                ),
            );
        }
        for (field, value) in [("max_age", w.max_age), ("poll", w.poll)] {
            if value.is_zero() {
                problems.report(key(&["webhook", field]), "must be greater than zero");
            }
        }
    }
}

/// `local.env` entries, checked by the local runner's own rules (reserved
/// names, invalid names or values), one entry at a time so that every bad
/// entry is reported.
fn validate_local_env(base: &[Seg], local: &LocalSection, problems: &mut Problems) {
    for (name, value) in &local.env {
        let mut one = LocalConfig::new("true", "state");
        one.env.insert(name.clone(), value.clone());
        if let Err(e) = one.validate() {
            problems.report(with(base, &["local", "env", name]), e.to_string());
        }
    }
    for (i, name) in local.pass_env.iter().enumerate() {
        let mut key = with(base, &["local", "pass_env"]);
        key.push(Seg::Index(i));
        if let Err(e) = check_pass_env(name) {
            problems.report(key, e.to_string());
        } else if local.env.contains_key(name) {
            let e = LocalConfigError::PassEnvAlsoSet { name: name.clone() };
            problems.report(key, e.to_string());
        }
    }
}

/// `local.user` / `local.group`: the account must exist, and switching
/// accounts needs stitch to run as root.
fn validate_local_account(base: &[Seg], local: &LocalSection, problems: &mut Problems) {
    let euid = nix::unistd::geteuid().as_raw();
    if let Err(e) = RunAs::resolve(local.user.as_deref(), local.group.as_deref(), euid) {
        let key = match &e {
            LocalConfigError::UnknownAccount { what: "group", .. } => "group",
            LocalConfigError::NotRoot if local.user.is_none() => "group",
            _ => "user",
        };
        problems.report(with(base, &["local", key]), e.to_string());
    }
}

/// `[queues.NAME.fake]`, checked by the fake runner's own rules; each
/// reported field is reset and the rest checked again, so that every bad
/// field is reported.
fn validate_fake(base: &[Seg], fake: &FakeSection, problems: &mut Problems) {
    let mut check = FakeConfig {
        accept_delay: fake.accept_delay,
        run_duration: fake.run_duration,
        slow_factor: fake.slow_factor,
        cancel_dir: None,
    };
    for _ in 0..3 {
        let field = match check.validate() {
            Ok(()) => return,
            Err(e @ FakeConfigError::ZeroSlowFactor) => {
                check.slow_factor = 1;
                problems.report(with(base, &["fake", "slow_factor"]), e.to_string());
                continue;
            }
            Err(e @ FakeConfigError::TimingTooLong { field, .. }) => {
                problems.report(with(base, &["fake", field]), e.to_string());
                field
            }
            Err(e) => {
                problems.report(with(base, &["fake"]), e.to_string());
                return;
            }
        };
        match field {
            "accept_delay" => check.accept_delay = Duration::ZERO,
            _ => check.run_duration = Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(parts: &[&str]) -> Vec<String> {
        parts.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn config_top_level_keys_match_the_type() {
        // Deserializing an unknown key makes serde list the real fields.
        let mut dict = Dict::new();
        dict.insert("\u{0}".into(), Value::from(0));
        let err = Value::from(dict).deserialize::<Config>().unwrap_err();
        match err.kind {
            Kind::UnknownField(_, expected) => assert_eq!(expected, TOP_LEVEL_KEYS),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn config_env_key_paths() {
        assert_eq!(
            env_key_path("STITCH_QUEUES__CI__LOCAL__COMMAND"),
            Some(strings(&["queues", "ci", "local", "command"]))
        );
        assert_eq!(
            env_key_path("STITCH_DATA_DIR"),
            Some(strings(&["data_dir"]))
        );
        assert_eq!(env_key_path("STITCH_LISTEN"), Some(strings(&["listen"])));
        for ignored in [
            "STITCH_SERVER",
            "STITCH_TOKEN",
            "STITCH_API_TOKEN",
            "STITCH_BUILD_ID",
            "STITCH_JOB_ID",
            "STITCH_TEST_PG_URL",
            "STITCH_REQUIRE_DATABASES",
            "STITCH_LISTEN_ADDR",
            "STITCH_",
            "STITCH",
            "PATH",
        ] {
            assert_eq!(env_key_path(ignored), None, "{ignored}");
        }
    }

    #[test]
    fn config_env_values() {
        let cmd = strings(&["queues", "ci", "local", "command"]);
        assert_eq!(parse_env_value(&cmd, "true"), Value::from("true"));
        assert_eq!(
            parse_env_value(&cmd, "[ -f x ] && make"),
            Value::from("[ -f x ] && make")
        );
        let tokens = strings(&["api", "tokens_env"]);
        let list = Value::from(vec![Value::from("A"), Value::from("B")]);
        assert_eq!(parse_env_value(&tokens, "A, B,"), list);
        assert_eq!(parse_env_value(&tokens, "[\"A\", \"B\"]"), list);
        assert_eq!(parse_env_value(&tokens, "[A,B]"), list);
        let conc = strings(&["queues", "ci", "concurrency"]);
        assert_eq!(parse_env_value(&conc, "4").to_u128(), Some(4));
    }

    #[test]
    fn config_key_path_display() {
        let mut p = path(&["queues", "team/app", "local"]);
        assert_eq!(KeyPath(&p).to_string(), "queues.\"team/app\".local");
        p = path(&["api", "tokens_env"]);
        p.push(Seg::Index(2));
        assert_eq!(KeyPath(&p).to_string(), "api.tokens_env[2]");
    }

    #[test]
    fn config_insert_path_merges_tables() {
        let mut d = Dict::new();
        let mut inner = Dict::new();
        inner.insert("runner".into(), Value::from("fake"));
        inner.insert("concurrency".into(), Value::from(2u32));
        insert_path(&mut d, &strings(&["queues", "ci"]), Value::from(inner));
        insert_path(
            &mut d,
            &strings(&["queues", "ci", "runner"]),
            Value::from("local"),
        );
        let v = Value::from(d);
        assert_eq!(
            v.find_ref("queues.ci.runner").unwrap().as_str(),
            Some("local")
        );
        assert_eq!(
            v.find_ref("queues.ci.concurrency").unwrap().to_u128(),
            Some(2)
        );
    }
}
