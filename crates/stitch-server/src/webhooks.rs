//! Push for the poll loop: which Buildkite webhook secrets are configured
//! (per queue, by environment variable name), verifying a request against
//! them, and the in-process wake hints that keep a webhook arriving during
//! a poll from being lost (the queue's `wake` only reaches a postponed
//! message, not one being processed).

use std::collections::{BTreeSet, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use axum::http::HeaderMap;
use stitch_core::BuildId;
use stitch_runners::buildkite::webhook::{
    verify_signature, verify_token, WebhookError, WebhookMode, SIGNATURE_HEADER, TOKEN_HEADER,
};

use crate::config::{Config, RunnerName, WebhookModeName};

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
            let Some(w) = q.buildkite.as_ref().and_then(|b| b.webhook.as_ref()) else {
                continue;
            };
            if q.runner != RunnerName::Buildkite {
                continue;
            }
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

/// Builds a webhook woke while their poll may have been running. The
/// signal stage takes a build's hint when a poll starts and checks for a
/// new one before holding: one there means a webhook came in meanwhile,
/// and the poll repeats at once instead of waiting for the safety net.
#[derive(Default)]
pub struct WakeHints {
    pending: Mutex<HashSet<BuildId>>,
}

impl WakeHints {
    /// Most hints kept; past it the set is cleared (a hint only shortens a
    /// wait: losing one costs one safety-net poll delay).
    const LIMIT: usize = 100_000;

    /// Records that `id` was woken.
    pub fn mark(&self, id: &BuildId) {
        let mut set = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if set.len() >= Self::LIMIT {
            set.clear();
        }
        set.insert(id.clone());
    }

    /// Whether `id` has a hint no poll has taken yet.
    pub fn is_pending(&self, id: &BuildId) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    /// Takes `id`'s hint: whether it was woken since the last take.
    pub fn take(&self, id: &BuildId) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }
}
