//! `[queues.NAME.local]`, checked by the local runner's own rules.

use stitch_runners::local::{check_pass_env, LocalConfigError, LocalSection, RunAs};
use stitch_runners::LocalConfig;

use super::super::problems::{at_index, with, Problems, Seg};

pub(super) fn validate(key: &[Seg], local: &LocalSection, problems: &mut Problems) {
    if local.command.trim().is_empty() {
        problems.report(
            with(key, &["command"]),
            "empty; runner \"local\" needs a command",
        );
    }
    validate_env(key, local, problems);
    validate_account(key, local, problems);
}

/// `env` entries, checked by the local runner's own rules (reserved names,
/// invalid names or values), one entry at a time so that every bad entry is
/// reported; `pass_env` names likewise.
fn validate_env(key: &[Seg], local: &LocalSection, problems: &mut Problems) {
    for (name, value) in &local.env {
        let mut one = LocalConfig::new("true", "state");
        one.env.insert(name.clone(), value.clone());
        if let Err(e) = one.validate() {
            problems.report(with(key, &["env", name]), e.to_string());
        }
    }
    for (i, name) in local.pass_env.iter().enumerate() {
        let at = at_index(&with(key, &["pass_env"]), i);
        if let Err(e) = check_pass_env(name) {
            problems.report(at, e.to_string());
        } else if local.env.contains_key(name) {
            let e = LocalConfigError::PassEnvAlsoSet { name: name.clone() };
            problems.report(at, e.to_string());
        }
    }
}

/// `user` / `group`: the account must exist, and switching accounts needs
/// stitch to run as root.
fn validate_account(key: &[Seg], local: &LocalSection, problems: &mut Problems) {
    let euid = nix::unistd::geteuid().as_raw();
    if let Err(e) = RunAs::resolve(local.user.as_deref(), local.group.as_deref(), euid) {
        let field = match &e {
            LocalConfigError::UnknownAccount { what: "group", .. } => "group",
            LocalConfigError::NotRoot if local.user.is_none() => "group",
            _ => "user",
        };
        problems.report(with(key, &[field]), e.to_string());
    }
}
