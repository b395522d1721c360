//! The layers a configuration is merged from, later ones winning key by
//! key: the embedded defaults, the TOML file, the `STITCH_*` environment
//! (the CLI flags are applied by [`super::load`]).

use std::collections::BTreeMap;
use std::path::Path;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider};

use super::problems::{Problems, Seg};
use super::{Config, LoadOptions};

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
    "telemetry",
];

/// A figment provider holding one already-parsed layer.
pub(super) struct Layer {
    name: String,
    dict: Dict,
}

impl Layer {
    pub(super) fn new(name: impl Into<String>, dict: Dict) -> Self {
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
pub(super) fn builtin_queues() -> Dict {
    let queues: Dict = Config::default()
        .queues
        .keys()
        .map(|name| (name.clone(), Value::from(Dict::new())))
        .collect();
    let mut dict = Dict::new();
    dict.insert("queues".into(), Value::from(queues));
    dict
}

/// The file's layer, or why it cannot be read.
pub(super) fn read_file(path: &Path) -> Result<Dict, String> {
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

/// The environment's layer.
pub(super) struct EnvLayer {
    pub(super) dict: Dict,
    /// Lower-cased key path → the variable that set it.
    pub(super) sources: Vec<(Vec<String>, String)>,
    /// Key path → the variable's text, for values the types want in
    /// another form than they were first read in (see
    /// [`super::extract`]).
    pub(super) texts: BTreeMap<Vec<String>, String>,
}

/// Builds the environment layer from the `STITCH_*` variables that are
/// configuration keys. Variables are applied in name order, so a more
/// specific one (`STITCH_QUEUES__CI__RUNNER`) wins over a table given whole
/// (`STITCH_QUEUES__CI={…}`).
pub(super) fn env_layer(opts: &LoadOptions, problems: &mut Problems) -> EnvLayer {
    let mut vars = opts.env_vars();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut layer = EnvLayer {
        dict: Dict::new(),
        sources: Vec::new(),
        texts: BTreeMap::new(),
    };
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
        let Ok(value) = value else {
            problems.push(
                key,
                format!("environment variable {name} is not valid UTF-8"),
            );
            continue;
        };
        if value.is_empty() {
            continue;
        }
        insert_path(&mut layer.dict, &segments, env_value(&segments, &value));
        layer.texts.insert(segments.clone(), value);
        layer.sources.push((segments, name));
    }
    layer
}

/// `STITCH_QUEUES__CI__LOCAL__COMMAND` → `["queues", "ci", "local",
/// "command"]`; `None` when the variable is not configuration (wrong prefix,
/// or first segment not a top-level key).
pub(super) fn env_key_path(name: &str) -> Option<Vec<String>> {
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

/// An environment value as first read: `[arrays]` and `{inline = "tables"}`
/// parsed (so that more specific variables can merge into a table given
/// whole), anything else the text verbatim; for `api.tokens_env` also a
/// comma-separated list. Where a key's type wants a number or a boolean,
/// [`super::extract`] reads the text again.
pub(super) fn env_value(segments: &[String], raw: &str) -> Value {
    let structured = matches!(raw.trim_start().chars().next(), Some('[' | '{'));
    if segments == ["api", "tokens_env"] && !structured {
        let names: Vec<Value> = raw
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| Value::from(s.to_string()))
            .collect();
        return Value::from(names);
    }
    if structured {
        parse_value(raw)
    } else {
        Value::from(raw.to_string())
    }
}

/// `raw` as figment reads environment values: numbers, booleans, arrays,
/// inline tables, otherwise a string.
pub(super) fn parse_value(raw: &str) -> Value {
    raw.parse::<Value>().unwrap_or_else(|never| match never {})
}

/// Inserts `value` at `segments`, creating tables on the way; a table
/// replaces a non-table value in the way, tables are merged key by key.
pub(super) fn insert_path(dict: &mut Dict, segments: &[String], value: Value) {
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

#[cfg(test)]
mod tests {
    use figment::error::Kind;

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
        assert_eq!(env_value(&cmd, "true"), Value::from("true"));
        assert_eq!(
            env_value(&cmd, "[ -f x ] && make"),
            parse_value("[ -f x ] && make")
        );
        let tokens = strings(&["api", "tokens_env"]);
        let list = Value::from(vec![Value::from("A"), Value::from("B")]);
        assert_eq!(env_value(&tokens, "A, B,"), list);
        assert_eq!(env_value(&tokens, "[\"A\", \"B\"]"), list);
        assert_eq!(env_value(&tokens, "[A,B]"), list);
        let conc = strings(&["queues", "ci", "concurrency"]);
        assert_eq!(env_value(&conc, "4"), Value::from("4"));
        assert_eq!(parse_value("4").to_u128(), Some(4));
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
