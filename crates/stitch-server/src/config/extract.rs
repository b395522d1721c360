//! Reading [`Config`] out of the merged layers, reporting every unknown key
//! and type error rather than the first.
//!
//! What type a key has is known only to the types: an environment value is
//! first read as its text (or as an array/table when it looks like one),
//! and where the type then wants a number, a boolean or a list, the text is
//! read again as one — so `STITCH_QUEUES__CI__LOCAL__COMMAND=true` is the
//! command `true`, and `STITCH_QUEUES__CI__CONCURRENCY=4` the number 4.

use std::collections::BTreeSet;

use figment::error::{Actual, Kind};
use figment::value::Value;
use humantime_serde::re::humantime::parse_duration;

use super::layers::{parse_value, EnvLayer};
use super::problems::{with, Problems, Seg};
use super::{runner_tables, Config, RETENTION_FORM};

/// What humantime-serde says it expects of a duration.
const DURATION_EXPECTED: &str = "a duration";

/// Deserializes [`Config`] from the merged tree. On an error, records it,
/// drops the offending key (so its default applies) and tries again, until
/// the rest deserializes: every unknown key and type error is reported, each
/// once. `None` when an error cannot be attributed to a key.
pub(super) fn extract(
    value: &mut Value,
    env: &EnvLayer,
    problems: &mut Problems,
) -> Option<Config> {
    const MAX_ROUNDS: usize = 200;
    let mut reread = BTreeSet::new();
    for _ in 0..MAX_ROUNDS {
        let error = match value.deserialize::<Config>() {
            Ok(config) => return Some(config),
            Err(error) => error,
        };
        let mut progress = false;
        for e in error {
            let target = classify(value, &e.path);
            if reread.insert(target.clone()) && reread_env_text(value, &target, &e.kind, env) {
                progress = true;
                continue;
            }
            let (key, message) = describe(&e.kind, &target);
            // A key dropped for its type is missing next round: said once.
            let dropped = matches!(e.kind, Kind::MissingField(_)) && problems.is_broken(&key);
            if !dropped {
                problems.push(key.clone(), message);
            }
            problems.mark_broken(key);
            if !target.is_empty() && remove_at(value, &target) {
                runner_tables::table_dropped(value, &target);
                problems.mark_broken(target);
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

/// For a type error at a key an environment variable set: the variable's
/// text in the form the type asked for (a number, boolean, list or table
/// where it was read as text; the text where it was read as a list or
/// table but a string is wanted). False when there is no other form.
fn reread_env_text(value: &mut Value, target: &[Seg], kind: &Kind, env: &EnvLayer) -> bool {
    let Kind::InvalidType(_, expected) = kind else {
        return false;
    };
    let key: Vec<String> = target.iter().map(Seg::as_string).collect();
    let Some(text) = env.texts.get(&key) else {
        return false;
    };
    let Some(current) = value_at(value, target) else {
        return false;
    };
    let other = match current {
        Value::String(_, s) if s == text => parse_value(text),
        Value::Array(..) | Value::Dict(..) if expected.contains("string") => {
            Value::from(text.clone())
        }
        _ => return false,
    };
    if matches!(other, Value::String(..)) && matches!(current, Value::String(..)) {
        return false;
    }
    *current = other;
    true
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
    const DURATION_HINT: &str = " (durations are strings like \"500ms\", \"5s\", \"30m\", \"2h\")";
    let duration_form = |expected: &str| -> Option<String> {
        if expected == DURATION_EXPECTED {
            Some(DURATION_HINT.to_string())
        } else if expected == RETENTION_FORM {
            Some(format!(" ({RETENTION_FORM})"))
        } else {
            None
        }
    };
    match kind {
        Kind::UnknownField(_, expected) => (
            target.to_vec(),
            format!("unknown key; expected one of: {}", expected.join(", ")),
        ),
        Kind::MissingField(field) => {
            let message = runner_tables::missing_key_message(target, field)
                .unwrap_or_else(|| "missing".to_string());
            (with(target, &[field.as_ref()]), message)
        }
        Kind::UnknownVariant(found, expected) => (
            target.to_vec(),
            format!(
                "unknown value {found:?}; expected one of: {}",
                expected.join(", ")
            ),
        ),
        Kind::InvalidType(actual, expected) => {
            let hint = if expected == DURATION_EXPECTED {
                DURATION_HINT
            } else {
                ""
            };
            (
                target.to_vec(),
                format!("expected {expected}, found {actual}{hint}"),
            )
        }
        Kind::InvalidValue(Actual::Str(text), expected) if duration_form(expected).is_some() => {
            let reason = parse_duration(text)
                .err()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            let hint = duration_form(expected).unwrap_or_default();
            (
                target.to_vec(),
                format!("invalid duration {text:?}{reason}{hint}"),
            )
        }
        Kind::InvalidValue(actual, expected) => (
            target.to_vec(),
            format!("invalid value {actual}; expected {expected}"),
        ),
        Kind::Message(message) => (target.to_vec(), format!("invalid value: {message}")),
        other => (target.to_vec(), other.to_string()),
    }
}

/// The value at `path`, if there is one.
fn value_at<'v>(value: &'v mut Value, path: &[Seg]) -> Option<&'v mut Value> {
    let mut cur = value;
    for seg in path {
        cur = match (cur, seg) {
            (Value::Dict(_, dict), Seg::Key(k)) => dict.get_mut(k)?,
            (Value::Array(_, items), Seg::Index(i)) => items.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// Removes the value at `path`; false if there is none.
fn remove_at(value: &mut Value, path: &[Seg]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    match (value_at(value, parents), last) {
        (Some(Value::Dict(_, dict)), Seg::Key(k)) => dict.remove(k).is_some(),
        (Some(Value::Array(_, items)), Seg::Index(i)) if *i < items.len() => {
            items.remove(*i);
            true
        }
        _ => false,
    }
}
