//! `gitlab::Client`: the GitLab REST v4 calls stitch makes, over an
//! injected `reqwest::Client` (timeouts, user agent), an injected API root
//! (`https://gitlab.com/api/v4`), the API token (sent as `PRIVATE-TOKEN`),
//! an optional pipeline trigger token, a [`RetryPolicy`] and the token's
//! shared [`RequestBudget`].
//!
//! - **Retries**: safe calls (GETs, cancel) are repeated on 5xx and
//!   transport failures. A **create** is repeated only when it was refused
//!   before processing (429, connection never made); any other failure
//!   comes back with [`GitlabError::outcome_unknown`] for the runner to
//!   look for the pipeline by its name before creating again.
//! - **Rate limits**: a 429 pauses the token's whole budget for
//!   `Retry-After` (else until `RateLimit-Reset`, a Unix time; else the
//!   policy's backoff); a success that leaves `RateLimit-Remaining: 0`
//!   pauses it until the reset before GitLab has to refuse anything. A
//!   wait longer than the policy's `max_rate_limit_wait` goes back to the
//!   caller as the error's `retry_after`.
//! - **Job traces** are served whole (GitLab takes no ranges): the client
//!   streams the body, skips what was read before and keeps at most the
//!   new bytes asked for.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::header::{HeaderMap, HeaderValue, LINK};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;

use super::error::{api_error, header_u64, rate_limit_wait, until_reset, GitlabError};
use super::model::{CreatePipeline, Job, Pipeline, TriggerPipeline};
use crate::http_budget::{Priority, RequestBudget};
use crate::http_metrics;
use crate::http_retry::{RetryPolicy, Safety, Sent};
use crate::http_util::{join_segments, next_link, parse_api_root, same_origin, transport_message};

/// The most pages a list follows (100 items each).
const MAX_PAGES: usize = 10;
/// The token header of GitLab's REST API.
pub const TOKEN_HEADER: &str = "private-token";

/// Filters of `GET /projects/:id/pipelines`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PipelineQuery {
    /// `name=` (exact).
    pub name: Option<String>,
    /// `ref=`.
    pub git_ref: Option<String>,
    /// `updated_after=`: narrows the scan.
    pub updated_after: Option<DateTime<Utc>>,
}

/// New bytes of a job's trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceChunk {
    /// The bytes past the offset asked for, at most `max_new + 1` of them
    /// (one more than allowed says the trace outgrew the allowance).
    pub bytes: Bytes,
}

/// The GitLab REST client. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    root: String,
    token: HeaderValue,
    trigger_token: Option<Arc<str>>,
    budget: Arc<RequestBudget>,
    /// What this client's requests are for ([`Client::with_priority`]).
    priority: Priority,
    retry: RetryPolicy,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("gitlab::Client")
            .field("base", &self.root)
            .field("trigger_token", &self.trigger_token.is_some())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for the API at `api_root`, authenticating with `token`;
    /// `budget` is shared by every client of the same token.
    pub fn new(
        http: reqwest::Client,
        api_root: &str,
        token: &str,
        budget: Arc<RequestBudget>,
        retry: RetryPolicy,
    ) -> Result<Self, GitlabError> {
        let (root, base) = parse_api_root(api_root).map_err(GitlabError::Url)?;
        let mut token = HeaderValue::from_str(token.trim()).map_err(|_| {
            GitlabError::Auth("the token holds characters a header cannot carry".into())
        })?;
        token.set_sensitive(true);
        Ok(Self {
            http,
            base,
            root,
            token,
            trigger_token: None,
            budget,
            priority: Priority::Control,
            retry,
        })
    }

    /// The same client creating pipelines through the trigger endpoint
    /// with `token` (a pipeline trigger token).
    pub fn with_trigger_token(mut self, token: &str) -> Self {
        self.trigger_token = Some(Arc::from(token.trim()));
        self
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

    /// The budget this client draws from.
    pub fn budget(&self) -> &Arc<RequestBudget> {
        &self.budget
    }

    fn project_url(&self, project: &str, rest: &[&str]) -> Result<Url, GitlabError> {
        // One segment: a `group/name` path travels as `group%2Fname`.
        let mut segments = vec!["projects", project];
        segments.extend_from_slice(rest);
        join_segments(&self.base, &segments).map_err(GitlabError::Url)
    }

    /// Creates a pipeline on `body.ref` with its variables: `POST
    /// …/pipeline`, or `POST …/trigger/pipeline` with the trigger token
    /// when one is set. Never repeated after an unknown outcome.
    pub async fn create_pipeline(
        &self,
        project: &str,
        body: &CreatePipeline,
    ) -> Result<Pipeline, GitlabError> {
        let answer = match &self.trigger_token {
            None => {
                let url = self.project_url(project, &["pipeline"])?;
                self.send(
                    "create_pipeline",
                    Method::POST,
                    &url,
                    Some(body),
                    Safety::StartsBuild,
                )
                .await?
            }
            Some(token) => {
                let url = self.project_url(project, &["trigger", "pipeline"])?;
                let trigger = TriggerPipeline {
                    token,
                    git_ref: &body.git_ref,
                    variables: body.variable_map(),
                };
                self.send(
                    "trigger_pipeline",
                    Method::POST,
                    &url,
                    Some(&trigger),
                    Safety::StartsBuild,
                )
                .await?
            }
        };
        decode(&answer)
    }

    /// `GET …/pipelines/:id`.
    pub async fn get_pipeline(&self, project: &str, id: u64) -> Result<Pipeline, GitlabError> {
        let url = self.project_url(project, &["pipelines", &id.to_string()])?;
        let answer = self
            .send::<()>("get_pipeline", Method::GET, &url, None, Safety::Safe)
            .await?;
        decode(&answer)
    }

    /// `GET …/pipelines` with filters, following `Link: rel="next"` (at
    /// most 10 pages of 100). Newest first, as GitLab lists them.
    pub async fn list_pipelines(
        &self,
        project: &str,
        query: &PipelineQuery,
    ) -> Result<Vec<Pipeline>, GitlabError> {
        let mut url = self.project_url(project, &["pipelines"])?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(name) = &query.name {
                q.append_pair("name", name);
            }
            if let Some(r) = &query.git_ref {
                q.append_pair("ref", r);
            }
            if let Some(after) = query.updated_after {
                q.append_pair(
                    "updated_after",
                    &after.to_rfc3339_opts(SecondsFormat::Secs, true),
                );
            }
            q.append_pair("per_page", "100");
        }
        self.paged("list_pipelines", url).await
    }

    /// `POST …/pipelines/:id/cancel`: the pipeline as GitLab left it.
    pub async fn cancel_pipeline(&self, project: &str, id: u64) -> Result<Pipeline, GitlabError> {
        let url = self.project_url(project, &["pipelines", &id.to_string(), "cancel"])?;
        let answer = self
            .send::<()>("cancel_pipeline", Method::POST, &url, None, Safety::Safe)
            .await?;
        decode(&answer)
    }

    /// `GET …/pipelines/:id/jobs` (every page; the latest try of each job).
    pub async fn list_jobs(&self, project: &str, pipeline: u64) -> Result<Vec<Job>, GitlabError> {
        let mut url = self.project_url(project, &["pipelines", &pipeline.to_string(), "jobs"])?;
        url.query_pairs_mut().append_pair("per_page", "100");
        self.paged("list_jobs", url).await
    }

    /// GETs `first` and the pages its `Link` headers name.
    async fn paged<T: DeserializeOwned>(
        &self,
        operation: &'static str,
        first: Url,
    ) -> Result<Vec<T>, GitlabError> {
        let mut items = Vec::new();
        let mut next = Some(first);
        for _ in 0..MAX_PAGES {
            let Some(page) = next.take() else { break };
            let answer = self
                .send::<()>(operation, Method::GET, &page, None, Safety::Safe)
                .await?;
            next = match answer.headers.get(LINK).and_then(|v| v.to_str().ok()) {
                Some(link) => next_link(link).map(|u| self.same_origin(&u)).transpose()?,
                None => None,
            };
            let mut chunk: Vec<T> = decode(&answer)?;
            items.append(&mut chunk);
        }
        Ok(items)
    }

    /// A pagination link, refused unless it points at this client's API
    /// (the token must not travel to another host).
    fn same_origin(&self, link: &str) -> Result<Url, GitlabError> {
        let url = Url::parse(link).map_err(|e| GitlabError::Url(format!("{link}: {e}")))?;
        if !same_origin(&self.base, &url) {
            return Err(GitlabError::Url(format!(
                "pagination link {link} leaves {}",
                self.root
            )));
        }
        Ok(url)
    }

    /// `GET …/jobs/:id/trace`: the bytes past offset `have`, at most
    /// `max_new + 1` of them; the rest of the body is not read.
    pub async fn job_trace_since(
        &self,
        project: &str,
        job: u64,
        have: u64,
        max_new: u64,
    ) -> Result<TraceChunk, GitlabError> {
        let url = self.project_url(project, &["jobs", &job.to_string(), "trace"])?;
        let mut resp = self.send_streamed("job_trace", Method::GET, &url).await?;
        let status = resp.status().as_u16();
        let wanted = usize::try_from(max_new.saturating_add(1)).unwrap_or(usize::MAX);
        let mut skip = usize::try_from(have).unwrap_or(usize::MAX);
        let mut body = BytesMut::new();
        while body.len() < wanted {
            match resp.chunk().await {
                Ok(Some(mut piece)) => {
                    if skip > 0 {
                        let dropped = skip.min(piece.len());
                        skip -= dropped;
                        piece = piece.slice(dropped..);
                    }
                    body.extend_from_slice(&piece);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(GitlabError::Decode {
                        status,
                        message: transport_message(&e),
                    })
                }
            }
        }
        body.truncate(wanted);
        Ok(TraceChunk {
            bytes: body.freeze(),
        })
    }

    /// Sends a JSON call and reads its answer whole.
    async fn send<B: serde::Serialize>(
        &self,
        operation: &'static str,
        method: Method,
        url: &Url,
        body: Option<&B>,
        safety: Safety,
    ) -> Result<Answer, GitlabError> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let resp = match self
                .attempt(operation, &method, url, body, safety, attempt)
                .await?
            {
                Some(resp) => resp,
                None => continue,
            };
            let status = resp.status();
            let headers = resp.headers().clone();
            match resp.bytes().await {
                Ok(body) => {
                    return Ok(Answer {
                        status,
                        headers,
                        body,
                    })
                }
                Err(e) => {
                    let err = GitlabError::Transport {
                        message: transport_message(&e),
                        maybe_processed: true,
                    };
                    if safety == Safety::Safe && self.retry.may_retry(attempt) {
                        tokio::time::sleep(self.retry.backoff(attempt)).await;
                        continue;
                    }
                    return Err(err);
                }
            }
        }
    }

    /// Sends a GET whose body the caller streams.
    async fn send_streamed(
        &self,
        operation: &'static str,
        method: Method,
        url: &Url,
    ) -> Result<reqwest::Response, GitlabError> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            if let Some(resp) = self
                .attempt::<()>(operation, &method, url, None, Safety::Safe, attempt)
                .await?
            {
                return Ok(resp);
            }
        }
    }

    /// One attempt with the budget, the retry policy and the rate-limit
    /// handling: `Ok(Some)` a success, `Ok(None)` try again (the wait is
    /// done), `Err` give up. Each attempt is counted under `operation`.
    async fn attempt<B: serde::Serialize>(
        &self,
        operation: &'static str,
        method: &Method,
        url: &Url,
        body: Option<&B>,
        safety: Safety,
        attempt: u32,
    ) -> Result<Option<reqwest::Response>, GitlabError> {
        self.budget.acquire(self.priority).await;
        let mut req = self
            .http
            .request(method.clone(), url.clone())
            .header(TOKEN_HEADER, self.token.clone());
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = match self
            .retry
            .send_attempt(req, http_metrics::GITLAB, operation, safety, attempt)
            .await
        {
            Sent::Answered(resp) => resp,
            Sent::Again => return Ok(None),
            Sent::Failed(err) => return Err(err),
        };
        let status = resp.status();
        let now = Utc::now().timestamp();
        self.note_quota(resp.headers(), now);
        if status.is_success() {
            return Ok(Some(resp));
        }
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        let err = api_error(status, &headers, &text, now);
        // A 429 was refused before processing: safe for every call.
        let rate_limit = (status == StatusCode::TOO_MANY_REQUESTS)
            .then(|| rate_limit_wait(&headers, now).unwrap_or_else(|| self.retry.backoff(attempt)));
        if self
            .retry
            .again_after_error_answer(
                &self.budget,
                http_metrics::GITLAB,
                status,
                rate_limit,
                safety,
                attempt,
            )
            .await
        {
            return Ok(None);
        }
        Err(err)
    }

    /// A success that spent the window pauses the budget until the reset.
    fn note_quota(&self, headers: &HeaderMap, now: i64) {
        http_metrics::note_remaining(http_metrics::GITLAB, headers, "ratelimit-remaining");
        if header_u64(headers, "ratelimit-remaining") != Some(0) {
            return;
        }
        if let Some(reset) = until_reset(headers, now) {
            if let Some(wait) = self.retry.rate_limit_wait(reset) {
                self.budget.pause_for(wait);
                http_metrics::rate_limit_pause(http_metrics::GITLAB);
            }
        }
    }
}

/// An answer read whole.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

fn decode<T: DeserializeOwned>(answer: &Answer) -> Result<T, GitlabError> {
    serde_json::from_slice(&answer.body).map_err(|e| GitlabError::Decode {
        status: answer.status.as_u16(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(root: &str) -> Result<Client, GitlabError> {
        Client::new(
            reqwest::Client::new(),
            root,
            "glpat-x",
            Arc::new(RequestBudget::new(Default::default())),
            RetryPolicy::none(),
        )
    }

    #[test]
    fn project_paths_travel_as_one_segment() {
        let c = client("https://gitlab.example/api/v4/").unwrap();
        assert_eq!(
            c.project_url("group/sub/app", &["pipelines", "7", "cancel"])
                .unwrap()
                .as_str(),
            "https://gitlab.example/api/v4/projects/group%2Fsub%2Fapp/pipelines/7/cancel"
        );
        assert_eq!(
            c.project_url("42", &["jobs", "9", "trace"])
                .unwrap()
                .as_str(),
            "https://gitlab.example/api/v4/projects/42/jobs/9/trace"
        );
        assert!(c.same_origin("https://evil.example/api/v4/x").is_err());
        assert!(c
            .same_origin("https://gitlab.example/api/v4/projects/42/pipelines?page=2")
            .is_ok());
    }

    #[test]
    fn bad_roots_and_tokens_are_refused() {
        assert!(matches!(client("ftp://x"), Err(GitlabError::Url(_))));
        assert!(matches!(client("not a url"), Err(GitlabError::Url(_))));
        let e = Client::new(
            reqwest::Client::new(),
            "https://gitlab.example/api/v4",
            "bad\ntoken",
            Arc::new(RequestBudget::new(Default::default())),
            RetryPolicy::none(),
        )
        .unwrap_err();
        assert!(matches!(e, GitlabError::Auth(_)));
        assert!(!e.to_string().contains("bad"), "the token is not echoed");
        let debug = format!(
            "{:?}",
            client("https://gitlab.example/api/v4")
                .unwrap()
                .with_trigger_token("glptt-secret")
        );
        assert!(
            !debug.contains("glptt") && !debug.contains("glpat"),
            "{debug}"
        );
    }
}
