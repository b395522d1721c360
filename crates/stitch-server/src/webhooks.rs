//! Push for the poll loop: which Buildkite webhook secrets are configured
//! (per queue, by environment variable name) and the GitHub webhook
//! (`[webhooks.github]`), and verifying a request against them. A verified
//! webhook wakes its build through the queue, which keeps the wake even
//! when the build's poll is running (ADR 0012).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use axum::http::HeaderMap;
use stitch_core::BuildId;
use stitch_runners::buildkite::webhook::{
    verify_signature, verify_token, WebhookError, WebhookMode, SIGNATURE_HEADER, TOKEN_HEADER,
};
use stitch_runners::github::webhook::{self as github_webhook, WebhookError as GithubWebhookError};

use crate::config::{Config, RunnerSection, WebhookModeName};

struct Entry {
    mode: WebhookMode,
    secret: Vec<u8>,
    max_age: Duration,
    queues: BTreeSet<String>,
}

/// The configured Buildkite webhook secrets, each with the queues it
/// speaks for.
#[derive(Default)]
pub struct BuildkiteWebhooks {
    entries: Vec<Entry>,
}

impl BuildkiteWebhooks {
    /// Reads `queues.*.buildkite.webhook` and the secrets their `secret_env`
    /// name; queues sharing a mode and secret share an entry.
    pub fn from_config(config: &Config, env: impl Fn(&str) -> Option<String>) -> Self {
        let mut entries: Vec<Entry> = Vec::new();
        for (name, q) in &config.queues {
            let RunnerSection::Buildkite(bk) = &q.runner else {
                continue;
            };
            let Some(w) = &bk.webhook else {
                continue;
            };
            let Some(secret) = env(&w.secret_env).map(|s| s.trim().as_bytes().to_vec()) else {
                continue;
            };
            if secret.is_empty() {
                continue;
            }
            let mode = match w.mode {
                WebhookModeName::Signature => WebhookMode::Signature,
                WebhookModeName::Token => WebhookMode::Token,
            };
            match entries
                .iter_mut()
                .find(|e| e.mode == mode && e.secret == secret && e.max_age == w.max_age)
            {
                Some(e) => {
                    e.queues.insert(name.clone());
                }
                None => entries.push(Entry {
                    mode,
                    secret,
                    max_age: w.max_age,
                    queues: BTreeSet::from([name.clone()]),
                }),
            }
        }
        Self { entries }
    }

    /// Whether any queue has a webhook configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Verifies a request; returns the queues whose secret it carries.
    /// Every entry of the request's mode is checked (each in constant time),
    /// so the answer time does not tell which secret came close.
    pub fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: i64,
    ) -> Result<BTreeSet<String>, WebhookError> {
        let token = headers.get(TOKEN_HEADER).map(|v| v.as_bytes());
        let signature = headers
            .get(SIGNATURE_HEADER)
            .map(|v| v.to_str().unwrap_or_default());
        let mode = match (token, signature) {
            (_, Some(_)) => WebhookMode::Signature,
            (Some(_), None) => WebhookMode::Token,
            (None, None) => {
                return Err(WebhookError::MissingHeader(
                    "X-Buildkite-Signature or X-Buildkite-Token",
                ))
            }
        };
        let mut queues = BTreeSet::new();
        let mut first_error = None;
        let mut candidates = 0;
        for e in self.entries.iter().filter(|e| e.mode == mode) {
            candidates += 1;
            let checked = match mode {
                WebhookMode::Token => verify_token(&e.secret, token.unwrap_or_default()),
                WebhookMode::Signature => verify_signature(
                    &e.secret,
                    signature.unwrap_or_default(),
                    body,
                    now,
                    e.max_age,
                ),
            };
            match checked {
                Ok(()) => queues.extend(e.queues.iter().cloned()),
                // A stale genuine signature says more than a mismatch.
                Err(err @ WebhookError::Stale { .. }) => first_error = Some(err),
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        if candidates == 0 {
            let expected = if mode == WebhookMode::Token {
                "X-Buildkite-Signature (no queue takes token webhooks)"
            } else {
                "X-Buildkite-Token (no queue takes signed webhooks)"
            };
            return Err(WebhookError::MissingHeader(expected));
        }
        if queues.is_empty() {
            return Err(first_error.unwrap_or(WebhookError::BadSignature));
        }
        Ok(queues)
    }
}

/// The GitHub webhook (`[webhooks.github]`): its secret, the repository of
/// every `github` queue, which deliveries were handled, and an index from
/// run id to build for events whose title names no build.
pub struct GithubWebhooks {
    secret: Vec<u8>,
    /// Queue → `owner/repo`, lower case (GitHub names are case-insensitive).
    repos: BTreeMap<String, String>,
    runs: tokio::sync::Mutex<RunIndex>,
    deliveries: Mutex<RecentDeliveries>,
}

/// Run id → build of live `github` builds, rebuilt from the store on a
/// miss (at most once per [`RunIndex::REFRESH_EVERY`]).
#[derive(Default)]
struct RunIndex {
    by_run: HashMap<u64, BuildId>,
    refreshed_at: Option<tokio::time::Instant>,
}

impl RunIndex {
    const REFRESH_EVERY: Duration = Duration::from_secs(1);
}

/// Delivery ids already handled, oldest first (a bounded window: GitHub
/// redelivers by hand, within days, with the same id).
#[derive(Default)]
struct RecentDeliveries {
    order: VecDeque<String>,
    seen: HashSet<String>,
}

impl RecentDeliveries {
    const LIMIT: usize = 100_000;
}

impl GithubWebhooks {
    /// Reads `[webhooks.github]` and the secret its `secret_env` names;
    /// `None` when not configured (or the secret is unset).
    pub fn from_config(config: &Config, env: impl Fn(&str) -> Option<String>) -> Option<Self> {
        let w = config.webhooks.github.as_ref()?;
        let secret = env(&w.secret_env)
            .map(|s| s.trim().as_bytes().to_vec())
            .filter(|s| !s.is_empty())?;
        let repos = config
            .queues
            .iter()
            .filter_map(|(name, q)| match &q.runner {
                RunnerSection::Github(gh) => Some((
                    name.clone(),
                    format!("{}/{}", gh.owner, gh.repo).to_ascii_lowercase(),
                )),
                _ => None,
            })
            .collect();
        Some(Self {
            secret,
            repos,
            runs: tokio::sync::Mutex::default(),
            deliveries: Mutex::default(),
        })
    }

    /// Checks `X-Hub-Signature-256` over the raw body.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), GithubWebhookError> {
        let header = headers
            .get(github_webhook::SIGNATURE_HEADER)
            .map(|v| v.to_str().unwrap_or_default());
        github_webhook::verify_signature(&self.secret, header, body)
    }

    /// Whether `queue` is a `github` queue on `repository` (`owner/repo`;
    /// `None` when the event named none).
    pub fn speaks_for(&self, queue: &str, repository: Option<&str>) -> bool {
        match (self.repos.get(queue), repository) {
            (Some(repo), Some(named)) => *repo == named.to_ascii_lowercase(),
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// Whether delivery `id` was handled already.
    pub fn seen(&self, id: &str) -> bool {
        self.deliveries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .seen
            .contains(id)
    }

    /// Records delivery `id` as handled.
    pub fn handled(&self, id: &str) {
        let mut d = self.deliveries.lock().unwrap_or_else(|p| p.into_inner());
        if d.seen.insert(id.to_string()) {
            d.order.push_back(id.to_string());
            if d.order.len() > RecentDeliveries::LIMIT {
                if let Some(old) = d.order.pop_front() {
                    d.seen.remove(&old);
                }
            }
        }
    }

    /// The live build whose recorded run is `run_id`: from the index, or
    /// (at most once a second) from the store's live builds.
    pub async fn build_for_run(
        &self,
        store: &stitch_store::Store,
        run_id: u64,
    ) -> Result<Option<BuildId>, stitch_store::StoreError> {
        let mut index = self.runs.lock().await;
        if let Some(id) = index.by_run.get(&run_id) {
            return Ok(Some(id.clone()));
        }
        let fresh = index
            .refreshed_at
            .is_some_and(|t| t.elapsed() < RunIndex::REFRESH_EVERY);
        if fresh {
            return Ok(None);
        }
        let live = store.builds_not_terminal().await?;
        index.by_run = live
            .into_iter()
            .filter(|b| self.repos.contains_key(&b.queue))
            .filter_map(|b| Some((b.runner_ref?.id.parse::<u64>().ok()?, b.id)))
            .collect();
        index.refreshed_at = Some(tokio::time::Instant::now());
        Ok(index.by_run.get(&run_id).cloned())
    }
}

/// Build ids a run title names (`run-name: stitch ${{ inputs.stitch_build_id }}`).
pub fn build_ids_in_title(title: &str) -> Vec<BuildId> {
    title
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        .filter(|w| w.starts_with("b_"))
        .filter_map(|w| w.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GithubSection, GithubWebhookSection, QueueConfig, RateLimitSection};

    fn github_queue(owner: &str, repo: &str) -> QueueConfig {
        QueueConfig {
            runner: RunnerSection::Github(GithubSection {
                owner: owner.into(),
                repo: repo.into(),
                workflow: "stitch.yml".into(),
                git_ref: "main".into(),
                token_env: Some("T".into()),
                app_id: None,
                private_key_file: None,
                installation_id: None,
                api_url: "https://api.github.com".into(),
                api_version: "2022-11-28".into(),
                inputs: Default::default(),
                max_inputs: 25,
                rate_limit: RateLimitSection::default(),
                request_timeout: Duration::from_secs(30),
                log_poll: Duration::from_secs(5),
                lookup_settle: Duration::from_secs(10),
            }),
            ..QueueConfig::default()
        }
    }

    fn config() -> Config {
        let mut c = Config::default();
        c.queues.insert("gh".into(), github_queue("Acme", "App"));
        c.queues.insert("other".into(), QueueConfig::default());
        c.webhooks.github = Some(GithubWebhookSection {
            secret_env: "HOOK".into(),
            poll: Duration::from_secs(60),
        });
        c
    }

    #[test]
    fn titles_yield_the_build_ids_they_name() {
        let id = BuildId::new();
        assert_eq!(
            build_ids_in_title(&format!("stitch {id}")),
            vec![id.clone()]
        );
        assert_eq!(build_ids_in_title(&format!("ci ({id}): main")), vec![id]);
        assert!(build_ids_in_title("stitch b_notanid").is_empty());
        assert!(build_ids_in_title("Nightly docs build").is_empty());
    }

    #[test]
    fn the_secret_speaks_for_github_queues_of_their_repository() {
        assert!(GithubWebhooks::from_config(&config(), |_| None).is_none());
        let hooks = GithubWebhooks::from_config(&config(), |_| Some("s".into())).unwrap();
        assert!(hooks.speaks_for("gh", Some("acme/app")));
        assert!(hooks.speaks_for("gh", Some("ACME/App")));
        assert!(hooks.speaks_for("gh", None));
        assert!(!hooks.speaks_for("gh", Some("acme/other")));
        assert!(!hooks.speaks_for("other", Some("acme/app")));
        let mut no_hook = config();
        no_hook.webhooks.github = None;
        assert!(GithubWebhooks::from_config(&no_hook, |_| Some("s".into())).is_none());
    }

    #[test]
    fn deliveries_are_remembered_within_a_window() {
        let hooks = GithubWebhooks::from_config(&config(), |_| Some("s".into())).unwrap();
        assert!(!hooks.seen("d-1"));
        hooks.handled("d-1");
        hooks.handled("d-1");
        assert!(hooks.seen("d-1"));
        for i in 0..RecentDeliveries::LIMIT {
            hooks.handled(&format!("x-{i}"));
        }
        assert!(!hooks.seen("d-1"), "the oldest delivery left the window");
        assert!(hooks.seen(&format!("x-{}", RecentDeliveries::LIMIT - 1)));
    }
}
