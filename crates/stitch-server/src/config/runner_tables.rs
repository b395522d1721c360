//! Each queue reads the table of its own runner only (`runner = "local"`
//! reads `[queues.NAME.local]`). Checked on the merged layers before
//! extraction, since [`super::RunnerSection`] keeps only the runner's own
//! table: a table of another runner is reported, and so is a missing one
//! that the runner cannot do without.

use figment::value::{Dict, Value};

use super::problems::{path, with, KeyPath, Problems, Seg};
use super::RunnerKind;

/// A runner's table in `[queues.NAME]`.
struct RunnerTable {
    /// Its key, the runner's name.
    name: &'static str,
    /// What a queue without it is told: the key (below the queue) and the
    /// message; `None` when the runner does without.
    when_missing: Option<(&'static [&'static str], &'static str)>,
}

/// The runner's table; `None` when it has none.
fn table(kind: RunnerKind) -> Option<RunnerTable> {
    let when_missing = match kind {
        RunnerKind::Noop => return None,
        RunnerKind::Fake => None,
        RunnerKind::Local => Some((
            &["local", "command"][..],
            "missing; runner \"local\" needs a command",
        )),
        RunnerKind::Buildkite => Some((
            &["buildkite"][..],
            "missing; runner \"buildkite\" needs a [queues.NAME.buildkite] table with org and pipeline",
        )),
        RunnerKind::Github => Some((
            &["github"][..],
            "missing; runner \"github\" needs a [queues.NAME.github] table with owner, repo and workflow",
        )),
        RunnerKind::Gitlab => Some((
            &["gitlab"][..],
            "missing; runner \"gitlab\" needs a [queues.NAME.gitlab] table with project",
        )),
        RunnerKind::Jenkins => Some((
            &["jenkins"][..],
            "missing; runner \"jenkins\" needs a [queues.NAME.jenkins] table with url, job and user",
        )),
    };
    Some(RunnerTable {
        name: kind.as_str(),
        when_missing,
    })
}

/// The runner whose table `key` is (`queues.NAME.TABLE`).
fn runner_of_table(key: &[Seg]) -> Option<RunnerKind> {
    match key {
        [Seg::Key(queues), Seg::Key(_), Seg::Key(name)] if queues == "queues" => RunnerKind::ALL
            .into_iter()
            .find(|k| table(*k).is_some_and(|t| t.name == name)),
        _ => None,
    }
}

/// The message for a key missing from the runner table `table_key`
/// (`queues.ci.local` missing `command`); `None` outside runner tables.
pub(super) fn missing_key_message(table_key: &[Seg], field: &str) -> Option<String> {
    let kind = runner_of_table(table_key)?;
    Some(match table(kind).and_then(|t| t.when_missing) {
        Some((key, message)) if key.last() == Some(&field) => message.to_string(),
        _ => format!("missing; runner \"{kind}\" needs {field}"),
    })
}

/// Reports, for every queue of the merged tree, the tables its runner does
/// not read, and the runner's own table when it is missing; a queue whose
/// table is missing is then read as a `fake` queue, so that the rest of it
/// is still checked (the load fails either way).
pub(super) fn check(merged: &mut Value, problems: &mut Problems) {
    let Some(Value::Dict(_, queues)) = (match merged {
        Value::Dict(_, top) => top.get_mut("queues"),
        _ => None,
    }) else {
        return;
    };
    for (name, queue) in queues.iter_mut() {
        if let Value::Dict(_, queue) = queue {
            check_queue(&path(&["queues", name]), queue, problems);
        }
    }
}

fn check_queue(base: &[Seg], queue: &mut Dict, problems: &mut Problems) {
    let runner = match queue.get("runner") {
        None => RunnerKind::Fake,
        Some(Value::String(_, name)) => {
            match RunnerKind::ALL.into_iter().find(|k| k.as_str() == name) {
                Some(kind) => kind,
                // Extraction reports the unknown runner.
                None => return,
            }
        }
        Some(_) => return,
    };
    for other in RunnerKind::ALL.into_iter().filter(|k| *k != runner) {
        let Some(RunnerTable { name, .. }) = table(other) else {
            continue;
        };
        if queue.contains_key(name) {
            let key = with(base, &[name]);
            let message = format!(
                "table [{}] is only read by runner = \"{other}\" (this queue has runner = \"{runner}\")",
                KeyPath(&key),
            );
            problems.report(key, message);
        }
    }
    if let Some(RunnerTable {
        name,
        when_missing: Some((key, message)),
    }) = table(runner)
    {
        if !queue.contains_key(name) {
            problems.report(with(base, key), message);
            read_as_fake(queue);
        }
    }
}

/// After extraction dropped the value at `key` (already reported): when
/// it was the table of its queue's runner, reads the queue as a `fake`
/// queue, so that the rest of it is still checked.
pub(super) fn table_dropped(merged: &mut Value, key: &[Seg]) {
    let [Seg::Key(queues), Seg::Key(name), Seg::Key(table_name)] = key else {
        return;
    };
    let Value::Dict(_, top) = merged else {
        return;
    };
    let Some(Value::Dict(_, all)) = top.get_mut(queues.as_str()) else {
        return;
    };
    let Some(Value::Dict(_, queue)) = all.get_mut(name.as_str()) else {
        return;
    };
    let runner = match queue.get("runner") {
        Some(Value::String(_, runner)) => runner.as_str(),
        _ => return,
    };
    if queues == "queues" && runner == table_name && runner_of_table(key).is_some() {
        read_as_fake(queue);
    }
}

/// A queue without its runner's table as a `fake` queue with defaults: the
/// load fails anyway, this only lets the queue's other keys be checked.
fn read_as_fake(queue: &mut Dict) {
    queue.insert("runner".into(), Value::from(RunnerKind::Fake.as_str()));
    queue.remove(RunnerKind::Fake.as_str());
}
