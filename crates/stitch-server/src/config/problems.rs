//! The problems a load finds, each with the key path it concerns, collected
//! so that `stitch config check` reports all of them at once.

use std::collections::BTreeSet;
use std::fmt;

use super::LoadOptions;

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

/// One segment of a key path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

impl Seg {
    pub(super) fn as_string(&self) -> String {
        match self {
            Seg::Key(k) => k.clone(),
            Seg::Index(i) => i.to_string(),
        }
    }
}

/// The key path of `parts`.
pub(super) fn path(parts: &[&str]) -> Vec<Seg> {
    parts.iter().map(|p| Seg::Key((*p).to_string())).collect()
}

/// `base` followed by `more`.
pub(super) fn with(base: &[Seg], more: &[&str]) -> Vec<Seg> {
    let mut p = base.to_vec();
    p.extend(more.iter().map(|m| Seg::Key((*m).to_string())));
    p
}

/// `base` followed by the array index `i`.
pub(super) fn at_index(base: &[Seg], i: usize) -> Vec<Seg> {
    let mut p = base.to_vec();
    p.push(Seg::Index(i));
    p
}

/// Displays a key path TOML-style: `queues."team/app".local.command`,
/// `api.tokens_env[0]`.
pub(super) struct KeyPath<'a>(pub(super) &'a [Seg]);

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

/// The problems found so far.
#[derive(Default)]
pub(super) struct Problems {
    found: Vec<(Vec<Seg>, String)>,
    /// Keys whose value was dropped during extraction (unknown, wrong type,
    /// missing): validation rules about them, or depending on them, are
    /// skipped so one mistake is reported once.
    broken: BTreeSet<Vec<Seg>>,
}

impl Problems {
    /// A problem, reported whatever else was found.
    pub(super) fn push(&mut self, key: Vec<Seg>, message: impl Into<String>) {
        self.found.push((key, message.into()));
    }

    /// Marks `key` as dropped: rules about it and below it stay quiet.
    pub(super) fn mark_broken(&mut self, key: Vec<Seg>) {
        self.broken.insert(key);
    }

    /// True when `key` or one of its ancestors was dropped.
    pub(super) fn is_broken(&self, key: &[Seg]) -> bool {
        (0..=key.len()).any(|n| self.broken.contains(&key[..n]))
    }

    /// A validation problem, unless the key was already reported.
    pub(super) fn report(&mut self, key: Vec<Seg>, message: impl Into<String>) {
        if !self.is_broken(&key) {
            self.push(key, message);
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    /// The error listing every problem in key order, each with the flag or
    /// environment variable that set its value.
    pub(super) fn into_error(
        self,
        env_sources: &[(Vec<String>, String)],
        opts: &LoadOptions,
    ) -> ConfigError {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_key_path_display() {
        let p = path(&["queues", "team/app", "local"]);
        assert_eq!(KeyPath(&p).to_string(), "queues.\"team/app\".local");
        let p = at_index(&path(&["api", "tokens_env"]), 2);
        assert_eq!(KeyPath(&p).to_string(), "api.tokens_env[2]");
    }
}
