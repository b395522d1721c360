//! One queue, `ci`, on a CI provider's fake, served by `stitch serve`:
//! the configuration every provider test file writes ([`QueueConfig`]),
//! and a batch of builds created on it and awaited ([`Batch`]), so that a
//! test says only what is particular to it.

#![allow(dead_code)] // each test file uses its own part of the helpers

use std::collections::BTreeMap;
use std::time::Duration;

use super::provider::Setup;
use super::serve::{Serve, STITCH};

/// A request budget far above what the tests send, unless a test sets its
/// own (`extra` naming `rate_limit`).
const NO_BUDGET: &str = "rate_limit = { requests = 100000, window = \"1s\" }";

/// The `stitch serve` configuration of queue `ci` on one vendor runner:
/// short request timeouts, log polls and retries (a test's faults are
/// retried within seconds), a budget that never binds unless the test
/// sets one, and the provider's own keys.
#[derive(Clone, Debug)]
pub struct QueueConfig {
    runner: &'static str,
    table: String,
    poll: String,
    extra: String,
    tail: String,
    env: Vec<(String, String)>,
}

impl QueueConfig {
    /// Queue `ci` on `runner`, whose `[queues.ci.<runner>]` table holds
    /// `table` (the provider's keys: where it is, what to build, which
    /// variable holds the token); polled every 100 ms.
    pub fn new(runner: &'static str, table: impl Into<String>) -> Self {
        Self {
            runner,
            table: table.into(),
            poll: "100ms".into(),
            extra: String::new(),
            tail: String::new(),
            env: Vec::new(),
        }
    }

    /// Polls accepted and running builds every `every` (`"60s"`: only a
    /// push or a cancel ends a build within a test's waits).
    pub fn poll(mut self, every: &str) -> Self {
        self.poll = every.into();
        self
    }

    /// Appends `lines` to the runner's table (keys, or its sub-tables).
    pub fn extra(mut self, lines: &str) -> Self {
        self.extra.push_str(lines);
        self.extra.push('\n');
        self
    }

    /// Appends `tables` after the runner's table (top-level tables such as
    /// `[webhooks.github]`, or the runner's webhook table).
    pub fn tail(mut self, tables: &str) -> Self {
        self.tail.push_str(tables);
        self.tail.push('\n');
        self
    }

    /// Sets `key = value` in `stitch serve`'s environment (tokens, secrets).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The queue the provider suite's [`Setup`] asks for: `Pushed` takes
    /// webhooks (`webhook`, its tables; empty for a provider without) and
    /// polls once a minute, the others poll (`Storm` within a budget of 30
    /// requests a second).
    pub fn setup(self, setup: Setup, webhook: &str) -> Self {
        match setup {
            Setup::Pushed => self.poll("60s").tail(webhook),
            Setup::Polled => self.poll("100ms"),
            Setup::Batch => self.poll("150ms"),
            Setup::Storm => self
                .poll("200ms")
                .extra("rate_limit = { requests = 30, window = \"1s\" }"),
        }
    }

    /// The configuration file's text (`{data}`: the server's data
    /// directory, filled in by [`Serve::start`]).
    pub fn text(&self) -> String {
        let Self {
            runner,
            table,
            poll,
            extra,
            tail,
            ..
        } = self;
        let budget = if extra.contains("rate_limit") {
            ""
        } else {
            NO_BUDGET
        };
        format!(
            r#"data_dir = "{{data}}"
[queues.ci]
runner = "{runner}"
poll = {{ accepted = "{poll}", running = "{poll}" }}
retry = {{ max_attempts = 30, initial = "100ms", max = "2s" }}
[queues.ci.{runner}]
{table}
request_timeout = "1s"
log_poll = "100ms"
{budget}
{extra}
{tail}
"#
        )
    }

    /// Starts `stitch serve` with this configuration and environment.
    pub async fn serve(&self) -> Serve {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Serve::start(STITCH, &self.text(), &env).await
    }
}

/// `n` change heads; the head `i` carries the marker paired with `i % 10`
/// in `markers` (each marker makes the fake's build fail), the rest
/// succeed.
pub fn heads(n: usize, markers: &[(usize, &str)]) -> Vec<String> {
    (0..n)
        .map(|i| {
            let marker = markers
                .iter()
                .find(|(at, _)| *at == i % 10)
                .map_or("", |(_, m)| m);
            format!("https://git.example/c/{i}{marker}")
        })
        .collect()
}

/// How a build of `head` (from [`heads`]) ends: `failed` if it carries a
/// marker.
pub fn expected(head: &str) -> &'static str {
    if head.contains('?') {
        "failed"
    } else {
        "succeeded"
    }
}

/// Builds created on queue `ci`, one per head, in order.
pub struct Batch {
    pub heads: Vec<String>,
    pub ids: Vec<String>,
}

impl Batch {
    /// Creates a build for each of `heads`.
    pub async fn create(s: &Serve, http: &reqwest::Client, heads: Vec<String>) -> Self {
        Self::create_with(s, http, heads, |_| {}).await
    }

    /// Creates a build for each of `heads`, calling `after(i)` once the
    /// `i`th is accepted (a test's fault at a chosen point).
    pub async fn create_with(
        s: &Serve,
        http: &reqwest::Client,
        heads: Vec<String>,
        mut after: impl FnMut(usize),
    ) -> Self {
        let mut ids = Vec::new();
        for (i, h) in heads.iter().enumerate() {
            ids.push(s.create(http, "ci", h).await);
            after(i);
        }
        Self { heads, ids }
    }

    /// Waits up to `within` for every build to end and asserts each ended
    /// as its head says ([`expected`]) and made exactly one build at the
    /// provider (`made(id)`: how many the fake holds for it). Returns the
    /// final status by id.
    pub async fn ends_as_expected_once_each(
        &self,
        s: &Serve,
        http: &reqwest::Client,
        within: Duration,
        made: impl Fn(&str) -> usize,
    ) -> BTreeMap<String, String> {
        let done = s.wait_all_terminal(http, &self.ids, within).await;
        for (id, h) in self.ids.iter().zip(&self.heads) {
            assert_eq!(done[id], expected(h), "{id} {h}");
            assert_eq!(made(id), 1, "duplicate builds at the provider for {id}");
        }
        done
    }
}
