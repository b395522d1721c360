//! Each configured build queue's runner, built from its section of the
//! configuration: the vendor clients with their shared request budgets,
//! and the queue's poll cadence.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use stitch_core::{BuildRunner, BuildStatus};
use stitch_runners::buildkite::{BuildkiteConfig, BuildkiteRunner, BuildkiteSection, Client};
use stitch_runners::github::{
    self, AppTokens, Credentials, GithubConfig, GithubRunner, GithubSection,
};
use stitch_runners::gitlab::{self, GitlabConfig, GitlabRunner, GitlabSection};
use stitch_runners::http_budget::{RateLimit, RequestBudget};
use stitch_runners::http_retry::RetryPolicy;
use stitch_runners::jenkins::{self, JenkinsConfig, JenkinsRunner, JenkinsSection, JobPath};
use stitch_runners::local::{LocalSection, RunAs};
use stitch_runners::{FakeConfig, FakeRunner, LocalConfig, LocalRunner, NoopRunner};

use crate::config::{Config, QueueConfig, RunnerSection};

/// One configured build queue with its runner.
pub struct QueueRuntime {
    /// Queue name.
    pub name: String,
    /// Runner kind name stored on builds (`fake`, `local`, …).
    pub runner_name: &'static str,
    /// The runner.
    pub runner: Arc<dyn BuildRunner>,
    /// The queue's settings (poll cadence, deadlines, retry budget).
    pub config: QueueConfig,
    /// How often its builds are polled.
    pub poll: PollPolicy,
}

impl QueueRuntime {
    /// Poll delay for a build in `status`.
    pub fn poll_delay(&self, status: BuildStatus) -> Duration {
        self.poll.delay(status)
    }
}

/// How often a queue's builds are polled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollPolicy {
    accepted: Duration,
    running: Duration,
    /// The safety-net cadence while the provider's webhooks push changes.
    webhook: Option<Duration>,
}

impl PollPolicy {
    /// Poll delay for a status (unknown polls like accepted); with webhooks,
    /// polling is only the safety net.
    pub fn delay(&self, status: BuildStatus) -> Duration {
        match (self.webhook, status) {
            (Some(safety_net), _) => safety_net,
            (None, BuildStatus::Running) => self.running,
            (None, _) => self.accepted,
        }
    }
}

/// The poll policy of `queue`: its `poll` cadences, or the webhook safety
/// net (`[queues.NAME.buildkite.webhook] poll`, `[webhooks.github] poll`)
/// when the provider's webhooks push its changes.
pub fn poll_policy(config: &Config, queue: &QueueConfig) -> PollPolicy {
    let webhook = match &queue.runner {
        RunnerSection::Buildkite(bk) => bk.webhook.as_ref().map(|w| w.poll),
        RunnerSection::Github(_) => config.webhooks.github.as_ref().map(|w| w.poll),
        RunnerSection::Gitlab(gl) => gl.webhook.as_ref().map(|w| w.poll),
        _ => None,
    };
    PollPolicy {
        accepted: queue.poll.accepted,
        running: queue.poll.running,
        webhook,
    }
}

/// The state directory of the `local` runner of queue `name`.
pub fn local_state_dir(config: &Config, name: &str) -> PathBuf {
    config.data_dir.join("local").join(name)
}

/// The state directories of every `local` queue of a configuration.
pub fn local_state_dirs(config: &Config) -> Vec<PathBuf> {
    config
        .queues
        .iter()
        .filter(|(_, q)| matches!(q.runner, RunnerSection::Local(_)))
        .map(|(name, _)| local_state_dir(config, name))
        .collect()
}

/// Why a queue's runner could not be built.
#[derive(Debug, thiserror::Error)]
#[error("queue {queue}: {message}")]
pub struct RunnerError {
    pub queue: String,
    pub message: String,
}

/// Builds every queue's runner, passing each through `wrap` (queue name,
/// runner) before the stages use it.
pub fn build_queue_runtimes(
    config: &Config,
    wrap: impl Fn(&str, Arc<dyn BuildRunner>) -> Arc<dyn BuildRunner>,
) -> Result<BTreeMap<String, QueueRuntime>, RunnerError> {
    let budgets = shared_budgets(config.queues.values().filter_map(|q| budget_of(&q.runner)));
    config
        .queues
        .iter()
        .map(|(name, queue)| {
            let runner =
                build_runner(config, name, queue, &budgets).map_err(|message| RunnerError {
                    queue: name.clone(),
                    message,
                })?;
            let runtime = QueueRuntime {
                name: name.clone(),
                runner_name: queue.runner.kind().as_str(),
                runner: wrap(name, runner),
                config: queue.clone(),
                poll: poll_policy(config, queue),
            };
            Ok((name.clone(), runtime))
        })
        .collect()
}

fn build_runner(
    config: &Config,
    name: &str,
    queue: &QueueConfig,
    budgets: &BTreeMap<BudgetScope, Arc<RequestBudget>>,
) -> Result<Arc<dyn BuildRunner>, String> {
    let section = &queue.runner;
    let budget = || {
        budget_of(section)
            .and_then(|(scope, _)| budgets.get(&scope).cloned())
            .unwrap_or_else(|| Arc::new(RequestBudget::new(RateLimit::default())))
    };
    Ok(match section {
        RunnerSection::Noop => Arc::new(NoopRunner::new()),
        RunnerSection::Fake(f) => {
            let fake = FakeConfig {
                accept_delay: f.accept_delay,
                run_duration: f.run_duration,
                slow_factor: f.slow_factor,
                cancel_dir: Some(config.data_dir.join("fake-cancels").join(name)),
            };
            Arc::new(FakeRunner::new(fake).map_err(|e| e.to_string())?)
        }
        RunnerSection::Local(l) => Arc::new(local_runner(
            l,
            local_state_dir(config, name),
            queue.concurrency,
        )?),
        RunnerSection::Buildkite(bk) => Arc::new(buildkite_runner(bk, budget())?),
        RunnerSection::Github(gh) => Arc::new(github_runner(gh, budget())?),
        RunnerSection::Gitlab(gl) => Arc::new(gitlab_runner(gl, budget())?),
        RunnerSection::Jenkins(jk) => Arc::new(jenkins_runner(jk, budget())?),
    })
}

/// Whose request budget a runner spends: the vendor, its API root, and
/// the account (Buildkite organization, GitHub token or App installation).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct BudgetScope {
    vendor: &'static str,
    api_url: String,
    account: String,
}

/// A section's budget scope and configured limit; `None` for runners
/// without a vendor API.
fn budget_of(section: &RunnerSection) -> Option<(BudgetScope, RateLimit)> {
    let scope = |vendor, api_url: &str, account| BudgetScope {
        vendor,
        api_url: api_url.trim_end_matches('/').to_string(),
        account,
    };
    match section {
        RunnerSection::Buildkite(bk) => Some((
            scope("buildkite", &bk.api_url, bk.org.clone()),
            bk.rate_limit.limit(),
        )),
        RunnerSection::Github(gh) => {
            let account = match (&gh.token_env, gh.installation_id) {
                (Some(env), _) => format!("token:{env}"),
                (None, Some(id)) => format!("installation:{id}"),
                (None, None) => String::new(),
            };
            Some((scope("github", &gh.api_url, account), gh.rate_limit.limit()))
        }
        // One budget per token: GitLab limits each user's requests.
        RunnerSection::Gitlab(gl) => Some((
            scope("gitlab", &gl.api_url, format!("token:{}", gl.token_env)),
            gl.rate_limit.limit(),
        )),
        RunnerSection::Jenkins(jk) => Some((
            scope("jenkins", &jk.url, jk.user.clone()),
            jk.rate_limit.limit(),
        )),
        RunnerSection::Noop | RunnerSection::Fake(_) | RunnerSection::Local(_) => None,
    }
}

/// One request budget per scope, shared by every queue spending it; the
/// smallest configured limit (requests per second) wins.
fn shared_budgets<K: Ord>(
    limits: impl IntoIterator<Item = (K, RateLimit)>,
) -> BTreeMap<K, Arc<RequestBudget>> {
    let per_sec = |x: &RateLimit| f64::from(x.requests) / x.window.as_secs_f64();
    let mut smallest: BTreeMap<K, RateLimit> = BTreeMap::new();
    for (scope, limit) in limits {
        smallest
            .entry(scope)
            .and_modify(|l| {
                if per_sec(&limit) < per_sec(l) {
                    *l = limit;
                }
            })
            .or_insert(limit);
    }
    smallest
        .into_iter()
        .map(|(k, l)| (k, Arc::new(RequestBudget::new(l))))
        .collect()
}

fn local_runner(
    l: &LocalSection,
    state_dir: PathBuf,
    concurrency: Option<u32>,
) -> Result<LocalRunner, String> {
    let mut lc = LocalConfig::new(l.command.clone(), state_dir);
    lc.workdir = l.workdir.clone();
    lc.cancel_grace = l.cancel_grace;
    lc.env = l.env.clone();
    lc.pass_env = l.pass_env.clone();
    lc.run_as = RunAs::resolve(
        l.user.as_deref(),
        l.group.as_deref(),
        nix::unistd::geteuid().as_raw(),
    )
    .map_err(|e| e.to_string())?;
    lc.concurrency = concurrency.unwrap_or(1).max(1) as usize;
    LocalRunner::new(lc).map_err(|e| e.to_string())
}

/// The HTTP client of a vendor API: user agent and timeouts; credentials
/// are added by the vendor client (GitHub) or as a default header
/// (Buildkite).
fn http_client(
    timeout: Duration,
    headers: reqwest::header::HeaderMap,
) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .default_headers(headers)
        .user_agent(concat!("stitch/", env!("CARGO_PKG_VERSION")))
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))
}

fn buildkite_runner(
    bk: &BuildkiteSection,
    budget: Arc<RequestBudget>,
) -> Result<BuildkiteRunner, String> {
    let token = std::env::var(&bk.token_env)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            format!(
                "environment variable {} (buildkite.token_env) is unset or empty",
                bk.token_env
            )
        })?;
    let mut auth = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| format!("{} holds characters a header cannot carry", bk.token_env))?;
    auth.set_sensitive(true);
    let headers = reqwest::header::HeaderMap::from_iter([(reqwest::header::AUTHORIZATION, auth)]);
    let http = http_client(bk.request_timeout, headers)?;
    let api_url = bk.api_url.trim_end_matches('/').to_string();
    let client =
        Client::new(http, api_url, budget, RetryPolicy::default()).map_err(|e| e.to_string())?;
    let mut config = BuildkiteConfig::new(bk.org.clone(), bk.pipeline.clone(), bk.branch.clone());
    config.commit = bk.commit.clone();
    config.allow_ref_override = bk.allow_ref_override;
    config.log_poll = bk.log_poll;
    config.max_log_bytes = bk.max_log_bytes;
    Ok(BuildkiteRunner::new(client, config))
}

fn github_runner(gh: &GithubSection, budget: Arc<RequestBudget>) -> Result<GithubRunner, String> {
    let http = http_client(gh.request_timeout, Default::default())?;
    let api_url = gh.api_url.trim_end_matches('/').to_string();
    let credentials = github_credentials(gh, &http, &api_url)?;
    let client = github::Client::new(
        http,
        &api_url,
        gh.api_version.clone(),
        credentials,
        budget,
        RetryPolicy::default(),
    )
    .map_err(|e| e.to_string())?;
    let mut config = GithubConfig::new(
        gh.owner.clone(),
        gh.repo.clone(),
        gh.workflow.clone(),
        gh.git_ref.clone(),
    );
    config.inputs = gh.inputs.clone();
    config.max_inputs = gh.max_inputs;
    config.log_poll = gh.log_poll;
    config.lookup_settle = gh.lookup_settle;
    Ok(GithubRunner::new(client, config))
}

/// The value of the secret environment variable `env` (named by `key`).
fn secret_env(env: &str, key: &str) -> Result<String, String> {
    std::env::var(env)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("environment variable {env} ({key}) is unset or empty"))
}

fn gitlab_runner(gl: &GitlabSection, budget: Arc<RequestBudget>) -> Result<GitlabRunner, String> {
    let http = http_client(gl.request_timeout, Default::default())?;
    let token = secret_env(&gl.token_env, "gitlab.token_env")?;
    let mut client = gitlab::Client::new(http, &gl.api_url, &token, budget, RetryPolicy::default())
        .map_err(|e| format!("{}: {e}", gl.token_env))?;
    if let Some(env) = &gl.trigger_token_env {
        client = client.with_trigger_token(&secret_env(env, "gitlab.trigger_token_env")?);
    }
    let mut config = GitlabConfig::new(gl.project.clone(), gl.git_ref.clone());
    config.variables = gl.variables.clone();
    config.log_poll = gl.log_poll;
    config.lookup_settle = gl.lookup_settle;
    config.max_log_bytes = gl.max_log_bytes;
    Ok(GitlabRunner::new(client, config))
}

/// The Jenkins runner: basic auth with the user's API token (never in a
/// URL), and a transport that does not follow redirects (Jenkins answers
/// `stop` and `cancelItem` with one, to an HTML page).
fn jenkins_runner(
    jk: &JenkinsSection,
    budget: Arc<RequestBudget>,
) -> Result<JenkinsRunner, String> {
    let token = std::env::var(&jk.token_env)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            format!(
                "environment variable {} (jenkins.token_env) is unset or empty",
                jk.token_env
            )
        })?;
    let credentials =
        jenkins::Credentials::new(jk.user.clone(), token).map_err(|e| e.to_string())?;
    let http = reqwest::Client::builder()
        .user_agent(concat!("stitch/", env!("CARGO_PKG_VERSION")))
        .timeout(jk.request_timeout)
        .connect_timeout(jk.request_timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))?;
    let client = jenkins::Client::new(http, &jk.url, credentials, budget, RetryPolicy::default())
        .map_err(|e| e.to_string())?;
    let mut config = JenkinsConfig::new(JobPath::parse(&jk.job)?);
    config.parameters = jk.parameters.clone();
    config.log_poll = jk.log_poll;
    config.max_log_bytes = jk.max_log_bytes;
    config.lookup_depth = jk.lookup_depth;
    Ok(JenkinsRunner::new(client, config))
}

/// A token from `token_env`, or the tokens a GitHub App mints.
fn github_credentials(
    gh: &GithubSection,
    http: &reqwest::Client,
    api_url: &str,
) -> Result<Credentials, String> {
    match (
        &gh.token_env,
        &gh.app_id,
        &gh.private_key_file,
        gh.installation_id,
    ) {
        (Some(env), None, None, None) => {
            let token = std::env::var(env)
                .ok()
                .filter(|t| !t.trim().is_empty())
                .ok_or_else(|| {
                    format!("environment variable {env} (github.token_env) is unset or empty")
                })?;
            Credentials::token(&token).map_err(|e| format!("{env}: {e}"))
        }
        (None, Some(app_id), Some(key_file), Some(installation)) => {
            let pem = std::fs::read(key_file).map_err(|e| {
                format!(
                    "reading github.private_key_file {}: {e}",
                    key_file.display()
                )
            })?;
            let app = AppTokens::new(
                http.clone(),
                api_url,
                gh.api_version.clone(),
                app_id.clone(),
                installation,
                &pem,
            )
            .map_err(|e| e.to_string())?;
            Ok(Credentials::App(Arc::new(app)))
        }
        _ => Err(
            "set either github.token_env or github.app_id, private_key_file and installation_id"
                .into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(requests: u32, secs: u64) -> RateLimit {
        RateLimit {
            requests,
            window: Duration::from_secs(secs),
        }
    }

    #[test]
    fn a_shared_budget_takes_the_smallest_limit_of_its_scope() {
        let budgets = shared_budgets([
            ("a", limit(200, 60)),
            ("a", limit(100, 60)),
            ("a", limit(6000, 3600)),
            ("b", limit(5000, 3600)),
        ]);
        assert_eq!(budgets.len(), 2);
        assert_eq!(budgets["a"].limit(), limit(100, 60));
        assert_eq!(budgets["b"].limit(), limit(5000, 3600));
    }
}
