//! `github::Client`: the GitHub Actions REST calls stitch makes, over an
//! injected `reqwest::Client` (timeouts, user agent; it must follow
//! redirects, as reqwest does by default, and carry no `Authorization`
//! header of its own), an injected API root (GitHub Enterprise Server is
//! `https://HOST/api/v3`), [`Credentials`], a pinned API version, a
//! [`RetryPolicy`] and the [`RequestBudget`] of the token or installation.
//!
//! - **Retries**: safe calls (GETs, cancel) are repeated on 5xx and
//!   transport failures. A **dispatch** is repeated only when it was
//!   refused before processing (rate limits, connection never made); any
//!   other failure comes back with [`GithubError::outcome_unknown`] for the
//!   runner to look for the run before dispatching again.
//! - **Rate limits** (`research/github_actions.md` §4): a 403 or 429 with
//!   `retry-after`, `x-ratelimit-remaining: 0` or a rate-limit message is
//!   a rate limit (other 403s are permission errors). The wait is
//!   `retry-after`, else until `x-ratelimit-reset`, else 60 s; it pauses
//!   the whole budget, and one longer than the policy's
//!   `max_rate_limit_wait` goes back to the caller as the error's
//!   `retry_after`. A success that leaves `x-ratelimit-remaining: 0` pauses
//!   the budget until the reset too, before GitHub has to refuse anything.
//! - **Conditional requests**: every GET remembers its `ETag` and body and
//!   sends `If-None-Match`; a `304` (free of primary quota) returns the
//!   remembered body.
//! - **Auth**: a 401 with App credentials mints a new installation token
//!   and repeats the call once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, ETAG, IF_NONE_MATCH, LINK};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;

use super::auth::Credentials;
use super::error::{api_error, header_u64, until_reset, GithubDetail, GithubError};
use super::model::{
    DispatchBody, DispatchResponse, Job, JobList, Run, RunList, API_VERSION_HEADER, MEDIA_TYPE,
};
use crate::http_budget::{Priority, RequestBudget};
use crate::http_metrics;
use crate::http_retry::{RetryPolicy, Safety, Sent};
use crate::http_util::{join_segments, next_link, parse_api_root, same_origin, transport_message};

/// The most pages a list follows (100 runs each).
const MAX_PAGES: usize = 10;
/// The wait after a secondary rate limit that named none (GitHub: "at least
/// one minute").
const SECONDARY_LIMIT_WAIT: Duration = Duration::from_secs(60);
/// Remembered conditional-request answers before the cache is cleared.
const ETAG_CACHE_LIMIT: usize = 20_000;

/// A repository.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Repo {
    /// Owner (user or organization) login.
    pub owner: String,
    /// Repository name.
    pub name: String,
}

impl std::fmt::Display for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)
    }
}

/// Filters of `GET …/actions/workflows/{wf}/runs`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunQuery {
    /// `event=` (`workflow_dispatch`).
    pub event: Option<String>,
    /// `branch=`.
    pub branch: Option<String>,
    /// `created=>=<time>`: narrows the scan below GitHub's 1,000-result cap.
    pub created_from: Option<DateTime<Utc>>,
    /// `status=` (a status or a conclusion).
    pub status: Option<String>,
}

/// An answer read whole.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// Remembered `ETag`s and bodies of GETs, by URL.
#[derive(Default)]
struct EtagCache {
    entries: HashMap<String, (String, Bytes)>,
}

/// The GitHub REST client. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    root: String,
    api_version: String,
    credentials: Credentials,
    budget: Arc<RequestBudget>,
    /// What this client's requests are for ([`Client::with_priority`]).
    priority: Priority,
    retry: RetryPolicy,
    etags: Arc<Mutex<EtagCache>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("github::Client")
            .field("base", &self.root)
            .field("api_version", &self.api_version)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for the API at `api_root` (`https://api.github.com`),
    /// sending `X-GitHub-Api-Version: api_version`.
    pub fn new(
        http: reqwest::Client,
        api_root: &str,
        api_version: impl Into<String>,
        credentials: Credentials,
        budget: Arc<RequestBudget>,
        retry: RetryPolicy,
    ) -> Result<Self, GithubError> {
        let (root, base) = parse_api_root(api_root).map_err(GithubError::Url)?;
        Ok(Self {
            http,
            base,
            root,
            api_version: api_version.into(),
            credentials,
            budget,
            priority: Priority::Control,
            retry,
            etags: Arc::default(),
        })
    }

    /// The same client drawing from the budget at `priority`: log
    /// followers use [`Priority::Logs`] so they never spend the reserve the
    /// queue's triggers, polls and cancels need.
    pub fn with_priority(&self, priority: Priority) -> Self {
        Self {
            priority,
            ..self.clone()
        }
    }

    /// The pinned API version.
    pub fn api_version(&self) -> &str {
        &self.api_version
    }

    /// The credentials in use.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    fn repo_url(&self, repo: &Repo, rest: &[&str]) -> Result<Url, GithubError> {
        let mut segments = vec!["repos", repo.owner.as_str(), repo.name.as_str(), "actions"];
        segments.extend_from_slice(rest);
        join_segments(&self.base, &segments).map_err(GithubError::Url)
    }

    /// `POST …/actions/workflows/{workflow}/dispatches`. `Ok(Some)` when
    /// GitHub returned the run (200), `Ok(None)` for a 204 (the run exists
    /// but its id is unknown). Never repeated after an unknown outcome.
    pub async fn dispatch(
        &self,
        repo: &Repo,
        workflow: &str,
        body: &DispatchBody,
    ) -> Result<Option<DispatchResponse>, GithubError> {
        let url = self.repo_url(repo, &["workflows", workflow, "dispatches"])?;
        let answer = self
            .send(
                "dispatch",
                Method::POST,
                &url,
                Some(body),
                Safety::StartsBuild,
            )
            .await?;
        if answer.status == StatusCode::NO_CONTENT || answer.body.is_empty() {
            return Ok(None);
        }
        decode(&answer).map(Some)
    }

    /// `GET …/actions/runs/{id}` (conditional).
    pub async fn get_run(&self, repo: &Repo, run_id: u64) -> Result<Run, GithubError> {
        let url = self.repo_url(repo, &["runs", &run_id.to_string()])?;
        let answer = self
            .send::<()>("get_run", Method::GET, &url, None, Safety::Safe)
            .await?;
        decode(&answer)
    }

    /// `GET …/actions/workflows/{workflow}/runs` with filters, following
    /// `Link: rel="next"` (at most 10 pages of 100). Newest first.
    pub async fn list_runs(
        &self,
        repo: &Repo,
        workflow: &str,
        query: &RunQuery,
    ) -> Result<Vec<Run>, GithubError> {
        let mut url = self.repo_url(repo, &["workflows", workflow, "runs"])?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(event) = &query.event {
                q.append_pair("event", event);
            }
            if let Some(branch) = &query.branch {
                q.append_pair("branch", branch);
            }
            if let Some(from) = query.created_from {
                q.append_pair(
                    "created",
                    &format!(">={}", from.to_rfc3339_opts(SecondsFormat::Secs, true)),
                );
            }
            if let Some(status) = &query.status {
                q.append_pair("status", status);
            }
            q.append_pair("exclude_pull_requests", "true");
            q.append_pair("per_page", "100");
        }
        let mut runs = Vec::new();
        let mut next = Some(url);
        for _ in 0..MAX_PAGES {
            let Some(page) = next.take() else { break };
            let answer = self
                .send::<()>("list_runs", Method::GET, &page, None, Safety::Safe)
                .await?;
            next = match answer.headers.get(LINK).and_then(|v| v.to_str().ok()) {
                Some(link) => next_link(link).map(|u| self.same_origin(&u)).transpose()?,
                None => None,
            };
            let mut list: RunList = decode(&answer)?;
            runs.append(&mut list.workflow_runs);
        }
        Ok(runs)
    }

    fn same_origin(&self, link: &str) -> Result<Url, GithubError> {
        let url = Url::parse(link).map_err(|e| GithubError::Url(format!("{link}: {e}")))?;
        if !same_origin(&self.base, &url) {
            return Err(GithubError::Url(format!(
                "pagination link {link} leaves {}",
                self.root
            )));
        }
        Ok(url)
    }

    /// `POST …/actions/runs/{id}/cancel`: `Ok` on 202. A run that already
    /// completed answers 409 ([`GithubError::is_conflict`]).
    pub async fn cancel_run(&self, repo: &Repo, run_id: u64) -> Result<(), GithubError> {
        let url = self.repo_url(repo, &["runs", &run_id.to_string(), "cancel"])?;
        self.send::<()>("cancel_run", Method::POST, &url, None, Safety::Safe)
            .await
            .map(|_| ())
    }

    /// `GET …/actions/runs/{id}/jobs?filter=latest` (conditional; the
    /// latest attempt's jobs, in GitHub's order).
    pub async fn list_jobs(&self, repo: &Repo, run_id: u64) -> Result<Vec<Job>, GithubError> {
        let mut url = self.repo_url(repo, &["runs", &run_id.to_string(), "jobs"])?;
        url.query_pairs_mut()
            .append_pair("filter", "latest")
            .append_pair("per_page", "100");
        let mut jobs = Vec::new();
        let mut next = Some(url);
        for _ in 0..MAX_PAGES {
            let Some(page) = next.take() else { break };
            let answer = self
                .send::<()>("list_jobs", Method::GET, &page, None, Safety::Safe)
                .await?;
            next = match answer.headers.get(LINK).and_then(|v| v.to_str().ok()) {
                Some(link) => next_link(link).map(|u| self.same_origin(&u)).transpose()?,
                None => None,
            };
            let mut list: JobList = decode(&answer)?;
            jobs.append(&mut list.jobs);
        }
        Ok(jobs)
    }

    /// `GET …/actions/jobs/{id}/logs`: the redirect to the log storage is
    /// followed (credentials are not sent there) and the plain text read.
    pub async fn job_log(&self, repo: &Repo, job_id: u64) -> Result<String, GithubError> {
        let url = self.repo_url(repo, &["jobs", &job_id.to_string(), "logs"])?;
        let answer = self
            .send::<()>("job_log", Method::GET, &url, None, Safety::Safe)
            .await?;
        Ok(String::from_utf8_lossy(&answer.body).into_owned())
    }

    fn remembered(&self, url: &Url) -> Option<(String, Bytes)> {
        self.etags
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .get(url.as_str())
            .cloned()
    }

    fn remember(&self, url: &Url, etag: &str, body: &Bytes) {
        let mut cache = self.etags.lock().unwrap_or_else(|p| p.into_inner());
        if cache.entries.len() >= ETAG_CACHE_LIMIT {
            cache.entries.clear();
        }
        cache
            .entries
            .insert(url.to_string(), (etag.to_string(), body.clone()));
    }

    /// Sends with the budget, the credentials, the retry policy, the
    /// rate-limit handling and (GETs) conditional requests; each attempt is
    /// counted under `operation` (a constant naming the call).
    async fn send<B: serde::Serialize>(
        &self,
        operation: &'static str,
        method: Method,
        url: &Url,
        body: Option<&B>,
        safety: Safety,
    ) -> Result<Answer, GithubError> {
        let conditional = method == Method::GET;
        let mut attempt = 0u32;
        let mut reauthorized = false;
        loop {
            attempt += 1;
            self.budget.acquire(self.priority).await;
            let auth = self.credentials.authorization().await?;
            let mut req = self
                .http
                .request(method.clone(), url.clone())
                .header(AUTHORIZATION, auth.clone())
                .header(ACCEPT, MEDIA_TYPE)
                .header(API_VERSION_HEADER, &self.api_version);
            let remembered = conditional.then(|| self.remembered(url)).flatten();
            if let Some((etag, _)) = &remembered {
                req = req.header(IF_NONE_MATCH, etag);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = match self
                .retry
                .send_attempt(req, http_metrics::GITHUB, operation, safety, attempt)
                .await
            {
                Sent::Answered(resp) => resp,
                Sent::Again => continue,
                Sent::Failed(err) => return Err(err),
            };
            let status = resp.status();
            let headers = resp.headers().clone();
            self.note_quota(&headers);
            let bytes = match resp.bytes().await {
                Ok(b) => b,
                Err(e) => {
                    let err = GithubError::Transport {
                        message: transport_message(&e),
                        maybe_processed: true,
                    };
                    if safety == Safety::Safe && self.retry.may_retry(attempt) {
                        tokio::time::sleep(self.retry.backoff(attempt)).await;
                        continue;
                    }
                    return Err(err);
                }
            };
            if status == StatusCode::NOT_MODIFIED {
                if let Some((_, body)) = remembered {
                    return Ok(Answer {
                        status: StatusCode::OK,
                        headers,
                        body,
                    });
                }
            }
            if status.is_success() {
                if conditional {
                    if let Some(etag) = headers.get(ETAG).and_then(|v| v.to_str().ok()) {
                        self.remember(url, etag, &bytes);
                    }
                }
                return Ok(Answer {
                    status,
                    headers,
                    body: bytes,
                });
            }
            let err = api_error(status, &headers, &String::from_utf8_lossy(&bytes));
            if status == StatusCode::UNAUTHORIZED
                && !reauthorized
                && self.credentials.refused(&auth)
            {
                // An installation token GitHub no longer takes: mint anew once.
                reauthorized = true;
                attempt -= 1;
                continue;
            }
            // Rate limits come as 403s or 429s, refused before processing.
            let rate_limit = match &err {
                GithubError::Api {
                    detail:
                        GithubDetail {
                            rate_limited: true,
                            retry_after,
                        },
                    ..
                } => Some(retry_after.unwrap_or(SECONDARY_LIMIT_WAIT)),
                _ => None,
            };
            if self
                .retry
                .again_after_error_answer(
                    &self.budget,
                    http_metrics::GITHUB,
                    status,
                    rate_limit,
                    safety,
                    attempt,
                )
                .await
            {
                continue;
            }
            return Err(err);
        }
    }

    /// A success that spent the quota pauses the budget until the reset.
    fn note_quota(&self, headers: &HeaderMap) {
        http_metrics::note_remaining(http_metrics::GITHUB, headers, "x-ratelimit-remaining");
        if header_u64(headers, "x-ratelimit-remaining") != Some(0) {
            return;
        }
        if let Some(reset) = until_reset(headers) {
            if let Some(wait) = self.retry.rate_limit_wait(reset) {
                self.budget.pause_for(wait);
                http_metrics::rate_limit_pause(http_metrics::GITHUB);
            }
        }
    }
}

fn decode<T: DeserializeOwned>(answer: &Answer) -> Result<T, GithubError> {
    serde_json::from_slice(&answer.body).map_err(|e| GithubError::Decode {
        status: answer.status.as_u16(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::github::model::API_VERSION_2022;

    #[test]
    fn urls_are_built_per_repository() {
        let c = Client::new(
            reqwest::Client::new(),
            "https://ghe.example/api/v3/",
            API_VERSION_2022,
            Credentials::token("t").unwrap(),
            Arc::new(RequestBudget::new(Default::default())),
            RetryPolicy::none(),
        )
        .unwrap();
        let repo = Repo {
            owner: "acme".into(),
            name: "app".into(),
        };
        assert_eq!(
            c.repo_url(&repo, &["workflows", "ci.yml", "dispatches"])
                .unwrap()
                .as_str(),
            "https://ghe.example/api/v3/repos/acme/app/actions/workflows/ci.yml/dispatches"
        );
        assert!(c.same_origin("https://evil.example/api/v3/x").is_err());
        assert!(c.same_origin("https://ghe.example/api/v3/x?page=2").is_ok());
    }
}
