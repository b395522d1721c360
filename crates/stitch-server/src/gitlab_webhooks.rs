//! Push for the poll loop from GitLab: the Pipeline Hook secret tokens of
//! the `gitlab` queues (`[queues.NAME.gitlab.webhook]`, by environment
//! variable name), each with the queues it speaks for and their projects,
//! and verifying a request's `X-Gitlab-Token` against them. A verified
//! hook wakes its build through the queue, as Buildkite's do (ADR 0012).

use std::collections::{BTreeMap, BTreeSet};

use axum::http::HeaderMap;
use stitch_runners::gitlab::webhook::{verify_token, WebhookError, TOKEN_HEADER};

use crate::config::{Config, RunnerSection};

struct Entry {
    secret: Vec<u8>,
    queues: BTreeSet<String>,
}

/// The configured GitLab webhook secrets (see the module docs).
#[derive(Default)]
pub struct GitlabWebhooks {
    entries: Vec<Entry>,
    /// Queue → its project as configured (numeric id or path, lower case).
    projects: BTreeMap<String, String>,
}

impl GitlabWebhooks {
    /// Reads `queues.*.gitlab.webhook` and the secrets their `secret_env`
    /// name; queues sharing a secret share an entry.
    pub fn from_config(config: &Config, env: impl Fn(&str) -> Option<String>) -> Self {
        let mut hooks = Self::default();
        for (name, q) in &config.queues {
            let RunnerSection::Gitlab(gl) = &q.runner else {
                continue;
            };
            let Some(w) = &gl.webhook else {
                continue;
            };
            let Some(secret) = env(&w.secret_env)
                .map(|s| s.trim().as_bytes().to_vec())
                .filter(|s| !s.is_empty())
            else {
                continue;
            };
            hooks
                .projects
                .insert(name.clone(), gl.project.to_ascii_lowercase());
            match hooks.entries.iter_mut().find(|e| e.secret == secret) {
                Some(e) => {
                    e.queues.insert(name.clone());
                }
                None => hooks.entries.push(Entry {
                    secret,
                    queues: BTreeSet::from([name.clone()]),
                }),
            }
        }
        hooks
    }

    /// Whether any queue has a webhook configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Verifies `X-Gitlab-Token`; returns the queues whose secret it
    /// carries. Every secret is compared (each in constant time), so the
    /// answer time does not tell which one came close.
    pub fn verify(&self, headers: &HeaderMap) -> Result<BTreeSet<String>, WebhookError> {
        let presented = headers
            .get(TOKEN_HEADER)
            .ok_or(WebhookError::MissingToken)?
            .as_bytes();
        let mut queues = BTreeSet::new();
        for e in &self.entries {
            if verify_token(&e.secret, presented) {
                queues.extend(e.queues.iter().cloned());
            }
        }
        if queues.is_empty() {
            return Err(WebhookError::BadToken);
        }
        Ok(queues)
    }

    /// Whether `queue`'s project is the hook's (by path or id; a hook that
    /// names neither is taken at its word).
    pub fn speaks_for(&self, queue: &str, path: Option<&str>, id: Option<u64>) -> bool {
        let Some(project) = self.projects.get(queue) else {
            return false;
        };
        match (path, id) {
            (None, None) => true,
            (path, id) => {
                path.is_some_and(|p| p.to_ascii_lowercase() == *project)
                    || id.is_some_and(|i| i.to_string() == *project)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GitlabSection, GitlabWebhookSection, QueueConfig};

    fn queue(project: &str, secret_env: &str) -> QueueConfig {
        let mut gl: GitlabSection =
            serde_json::from_value(serde_json::json!({ "project": project })).unwrap();
        gl.webhook = Some(GitlabWebhookSection {
            secret_env: secret_env.into(),
            poll: std::time::Duration::from_secs(60),
        });
        QueueConfig {
            runner: RunnerSection::Gitlab(gl),
            ..QueueConfig::default()
        }
    }

    fn headers(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(TOKEN_HEADER, token.parse().unwrap());
        h
    }

    #[test]
    fn a_token_speaks_for_the_queues_of_its_secret() {
        let mut c = Config::default();
        c.queues.insert("a".into(), queue("Acme/App", "HOOK_A"));
        c.queues.insert("b".into(), queue("42", "HOOK_B"));
        c.queues.insert("c".into(), queue("acme/other", "HOOK_A"));
        c.queues
            .insert("unset".into(), queue("acme/x", "HOOK_UNSET"));
        let env = |k: &str| match k {
            "HOOK_A" => Some("secret-a".to_string()),
            "HOOK_B" => Some(" secret-b ".to_string()),
            _ => None,
        };
        let hooks = GitlabWebhooks::from_config(&c, env);
        assert!(!hooks.is_empty());
        assert_eq!(
            hooks.verify(&headers("secret-a")).unwrap(),
            BTreeSet::from(["a".to_string(), "c".to_string()])
        );
        assert_eq!(
            hooks.verify(&headers("secret-b")).unwrap(),
            BTreeSet::from(["b".to_string()])
        );
        assert_eq!(hooks.verify(&headers("guess")), Err(WebhookError::BadToken));
        assert_eq!(hooks.verify(&headers("")), Err(WebhookError::BadToken));
        assert_eq!(
            hooks.verify(&HeaderMap::new()),
            Err(WebhookError::MissingToken)
        );
        assert!(hooks.speaks_for("a", Some("acme/app"), None));
        assert!(hooks.speaks_for("b", Some("whatever/path"), Some(42)));
        assert!(!hooks.speaks_for("a", Some("acme/other"), Some(7)));
        assert!(hooks.speaks_for("a", None, None));
        assert!(!hooks.speaks_for("unset", Some("acme/x"), None));
        assert!(GitlabWebhooks::from_config(&c, |_| None).is_empty());
    }
}
