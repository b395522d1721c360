//! `buildkite::Client`: the Buildkite REST v2 calls stitch makes, over an
//! injected `reqwest::Client` (the wiring sets the `Authorization` header,
//! timeouts and anything else transport-level), an injected base URL and
//! [`RetryPolicy`], and the organization's shared [`RequestBudget`].
//!
//! Retries (`research/buildkite.md`, "Implications"): safe calls (GET,
//! cancel) are repeated on 5xx, transport failures and 429; **create is
//! repeated only on 429** (refused before processing) and on connection
//! failures (never sent). Any other create failure is returned with
//! [`BuildkiteError::outcome_unknown`] set, for the runner to look the
//! build up by its stamped meta-data before creating again. Every 429 —
//! any call — pauses the whole organization's budget until the provider's
//! `RateLimit-Reset` (the larger of the organization and user resets).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::header::{ACCEPT, CONTENT_RANGE, LINK, RANGE};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;

use super::error::{api_error, rate_limit_reset, BuildkiteError};
use super::model::{Build, CreateBuild};
use crate::http_budget::{Priority, RequestBudget};
use crate::http_metrics;
use crate::http_retry::{RetryPolicy, Safety, Sent};
use crate::http_util::{next_link, transport_message};

/// The most pages a list follows (100 builds each).
const MAX_PAGES: usize = 10;

/// An organization and pipeline slug pair.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pipeline {
    /// Organization slug.
    pub org: String,
    /// Pipeline slug.
    pub slug: String,
}

/// Part of a raw job log: the log's length when read, and its bytes from
/// the offset asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogChunk {
    /// The log's size in bytes.
    pub total: u64,
    /// The bytes past the offset asked for (empty when nothing new, or when
    /// more than allowed is new).
    pub bytes: Bytes,
}

/// One tail read: the log's size and its bytes from `start`.
struct Tail {
    start: u64,
    total: u64,
    bytes: Bytes,
}

/// Tail reads one `job_log_since` makes at most before giving up on a log
/// growing faster than it can be read.
const TAIL_ROUNDS: usize = 3;

/// Filters of `GET …/pipelines/{p}/builds`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildQuery {
    /// `meta_data[key]=value` filters.
    pub meta_data: Vec<(String, String)>,
    /// `branch=`.
    pub branch: Option<String>,
    /// `created_from=` (ISO 8601): narrows the scan, as Buildkite asks.
    pub created_from: Option<DateTime<Utc>>,
    /// `state[]=` values.
    pub states: Vec<String>,
    /// `exclude_jobs=true` (cheaper when only the state is needed).
    pub exclude_jobs: bool,
}

/// The Buildkite REST client. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    budget: Arc<RequestBudget>,
    /// What this client's requests are for ([`Client::with_priority`]).
    priority: Priority,
    retry: RetryPolicy,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("buildkite::Client")
            .field("base", &self.base)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client over `http`, which must already carry the
    /// `Authorization: Bearer …` header; `base` is the API root
    /// (`https://api.buildkite.com`); `budget` is shared by every client of
    /// the same organization.
    pub fn new(
        http: reqwest::Client,
        base: impl Into<String>,
        budget: Arc<RequestBudget>,
        retry: RetryPolicy,
    ) -> Result<Self, BuildkiteError> {
        let base = base.into().trim_end_matches('/').to_string();
        let parsed = Url::parse(&base).map_err(|e| BuildkiteError::Url(format!("{base}: {e}")))?;
        if parsed.cannot_be_a_base() || !matches!(parsed.scheme(), "http" | "https") {
            return Err(BuildkiteError::Url(format!(
                "{base}: must be an http:// or https:// URL"
            )));
        }
        Ok(Self {
            http,
            base,
            budget,
            priority: Priority::Control,
            retry,
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

    /// The organization budget this client draws from.
    pub fn budget(&self) -> &Arc<RequestBudget> {
        &self.budget
    }

    fn url(&self, segments: &[&str]) -> Result<Url, BuildkiteError> {
        let mut url = Url::parse(&self.base)
            .map_err(|e| BuildkiteError::Url(format!("{}: {e}", self.base)))?;
        url.path_segments_mut()
            .map_err(|_| BuildkiteError::Url(self.base.clone()))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    fn builds_url(&self, p: &Pipeline, rest: &[&str]) -> Result<Url, BuildkiteError> {
        let mut segments = vec![
            "v2",
            "organizations",
            &p.org,
            "pipelines",
            &p.slug,
            "builds",
        ];
        segments.extend_from_slice(rest);
        self.url(&segments)
    }

    /// `POST …/builds`. Never repeated after an unknown outcome (see the
    /// module docs): check [`BuildkiteError::outcome_unknown`].
    pub async fn create_build(
        &self,
        p: &Pipeline,
        body: &CreateBuild,
    ) -> Result<Build, BuildkiteError> {
        let url = self.builds_url(p, &[])?;
        let resp = self
            .send("create_build", Safety::StartsBuild, || {
                self.http.request(Method::POST, url.clone()).json(body)
            })
            .await?;
        decode(resp).await
    }

    /// `GET …/builds/{number}` (with jobs and `job_state_counts`).
    pub async fn get_build(&self, p: &Pipeline, number: u64) -> Result<Build, BuildkiteError> {
        let url = self.builds_url(p, &[&number.to_string()])?;
        let resp = self
            .send("get_build", Safety::Safe, || {
                self.http.request(Method::GET, url.clone())
            })
            .await?;
        decode(resp).await
    }

    /// `GET …/pipelines/{p}/builds` with filters, following `Link: rel="next"`
    /// (at most 10 pages of 100). Newest first, as Buildkite lists them.
    pub async fn list_builds(
        &self,
        p: &Pipeline,
        query: &BuildQuery,
    ) -> Result<Vec<Build>, BuildkiteError> {
        let mut url = self.builds_url(p, &[])?;
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in &query.meta_data {
                q.append_pair(&format!("meta_data[{k}]"), v);
            }
            if let Some(branch) = &query.branch {
                q.append_pair("branch", branch);
            }
            if let Some(from) = query.created_from {
                q.append_pair(
                    "created_from",
                    &from.to_rfc3339_opts(SecondsFormat::Secs, true),
                );
            }
            for s in &query.states {
                q.append_pair("state[]", s);
            }
            if query.exclude_jobs {
                q.append_pair("exclude_jobs", "true");
            }
            q.append_pair("per_page", "100");
        }
        let mut builds = Vec::new();
        let mut next = Some(url);
        for _ in 0..MAX_PAGES {
            let Some(page) = next.take() else { break };
            let resp = self
                .send("list_builds", Safety::Safe, || {
                    self.http.request(Method::GET, page.clone())
                })
                .await?;
            next = match resp.headers().get(LINK).and_then(|v| v.to_str().ok()) {
                Some(link) => next_link(link).map(|u| self.same_origin(&u)).transpose()?,
                None => None,
            };
            let mut chunk: Vec<Build> = decode(resp).await?;
            builds.append(&mut chunk);
        }
        Ok(builds)
    }

    /// A pagination link, refused unless it points at this client's API
    /// (the auth header must not travel to another host).
    fn same_origin(&self, link: &str) -> Result<Url, BuildkiteError> {
        let url = Url::parse(link).map_err(|e| BuildkiteError::Url(format!("{link}: {e}")))?;
        let base = Url::parse(&self.base).map_err(|e| BuildkiteError::Url(e.to_string()))?;
        if url.origin() != base.origin() {
            return Err(BuildkiteError::Url(format!(
                "pagination link {link} leaves {}",
                self.base
            )));
        }
        Ok(url)
    }

    /// `PUT …/builds/{number}/cancel`. A 422 "already finished" comes back
    /// as an error for which [`BuildkiteError::is_already_finished`] holds.
    pub async fn cancel_build(&self, p: &Pipeline, number: u64) -> Result<Build, BuildkiteError> {
        let url = self.builds_url(p, &[&number.to_string(), "cancel"])?;
        let resp = self
            .send("cancel_build", Safety::Safe, || {
                self.http.request(Method::PUT, url.clone())
            })
            .await?;
        decode(resp).await
    }

    /// The jobs of a build (read from the build's JSON).
    pub async fn list_jobs(
        &self,
        p: &Pipeline,
        number: u64,
    ) -> Result<Vec<super::model::Job>, BuildkiteError> {
        Ok(self.get_build(p, number).await?.jobs)
    }

    /// The bytes of a job's raw log from offset `have` on, at most
    /// `max_new` of them, read with the tail ranges Buildkite serves
    /// (`Accept: text/plain`, `Range: bytes=-N`; explicit ranges are
    /// refused, an empty log is a 416). The first request asks for the
    /// last `window` bytes; when the log grew by more since `have`, one
    /// more asks for everything past `have` (plus a window for what grows
    /// meanwhile), and its body is read no further than `max_new` bytes.
    pub async fn job_log_since(
        &self,
        p: &Pipeline,
        number: u64,
        job_id: &str,
        have: u64,
        window: u64,
        max_new: u64,
    ) -> Result<LogChunk, BuildkiteError> {
        let url = self.builds_url(p, &[&number.to_string(), "jobs", job_id, "log"])?;
        let window = window.max(1);
        let until = have.saturating_add(max_new);
        let mut suffix = window;
        for _ in 0..TAIL_ROUNDS {
            let tail = match self.log_tail(&url, suffix, until).await {
                Ok(tail) => tail,
                // Buildkite's answer for a log with no bytes yet.
                Err(BuildkiteError::Api { status: 416, .. }) => {
                    return Ok(LogChunk {
                        total: 0,
                        bytes: Bytes::new(),
                    })
                }
                Err(e) => return Err(e),
            };
            if tail.start <= have || tail.total <= have {
                let skip = usize::try_from(have.saturating_sub(tail.start))
                    .unwrap_or(usize::MAX)
                    .min(tail.bytes.len());
                return Ok(LogChunk {
                    total: tail.total,
                    bytes: tail.bytes.slice(skip..),
                });
            }
            suffix = (tail.total - have).saturating_add(window);
        }
        Err(BuildkiteError::Decode {
            status: 206,
            message: format!("the log of job {job_id} kept outgrowing its tail ranges"),
        })
    }

    /// One `Range: bytes=-suffix` read of a raw job log, its body read no
    /// further than the absolute offset `until`.
    async fn log_tail(&self, url: &Url, suffix: u64, until: u64) -> Result<Tail, BuildkiteError> {
        let mut resp = self
            .send("job_log", Safety::Safe, || {
                self.http
                    .request(Method::GET, url.clone())
                    .header(ACCEPT, "text/plain")
                    .header(RANGE, format!("bytes=-{suffix}"))
            })
            .await?;
        let status = resp.status().as_u16();
        let range = resp
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let unreadable = |message: String| BuildkiteError::Decode { status, message };
        // A 200 is the whole log (a server or proxy that ignores ranges).
        let (start, total) = match (status, range) {
            (206, Some(range)) => parse_content_range(&range)
                .ok_or_else(|| unreadable(format!("unusable Content-Range {range:?}")))?,
            (206, None) => return Err(unreadable("a partial answer without Content-Range".into())),
            _ => (0, resp.content_length().unwrap_or(u64::MAX)),
        };
        let wanted = usize::try_from(until.saturating_sub(start)).unwrap_or(usize::MAX);
        let mut body = BytesMut::new();
        let mut complete = false;
        while body.len() < wanted {
            match resp.chunk().await {
                Ok(Some(piece)) => body.extend_from_slice(&piece),
                Ok(None) => {
                    complete = true;
                    break;
                }
                Err(e) => return Err(unreadable(transport_message(&e))),
            }
        }
        body.truncate(wanted);
        let total = if status == 206 {
            if complete && start + body.len() as u64 != total {
                return Err(unreadable(format!(
                    "a partial answer of {} bytes for the range {start}-{}",
                    body.len(),
                    total - 1
                )));
            }
            total
        } else if complete {
            body.len() as u64
        } else {
            total
        };
        Ok(Tail {
            start,
            total,
            bytes: body.freeze(),
        })
    }

    /// Sends with the budget, the retry policy and the 429 handling; each
    /// attempt is counted under `operation` (a constant naming the call).
    async fn send(
        &self,
        operation: &'static str,
        safety: Safety,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, BuildkiteError> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            self.budget.acquire(self.priority).await;
            let resp = match self
                .retry
                .send_attempt(
                    request(),
                    http_metrics::BUILDKITE,
                    operation,
                    safety,
                    attempt,
                )
                .await
            {
                Sent::Answered(resp) => resp,
                Sent::Again => continue,
                Sent::Failed(err) => return Err(err),
            };
            let status = resp.status();
            http_metrics::note_remaining(
                http_metrics::BUILDKITE,
                resp.headers(),
                "ratelimit-remaining",
            );
            if status.is_success() {
                return Ok(resp);
            }
            let reset = rate_limit_reset(resp.headers());
            let body = resp.text().await.unwrap_or_default();
            let err = api_error(status, &body, reset);
            let rate_limit = (status == StatusCode::TOO_MANY_REQUESTS)
                .then(|| reset.unwrap_or_else(|| self.retry.backoff(attempt)));
            if self
                .retry
                .again_after_error_answer(
                    &self.budget,
                    http_metrics::BUILDKITE,
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
}

/// The first offset and the total length in `Content-Range: bytes
/// a-b/total`, when the range runs to the end of the log.
fn parse_content_range(value: &str) -> Option<(u64, u64)> {
    let (range, total) = value.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let (first, last, total): (u64, u64, u64) =
        (first.parse().ok()?, last.parse().ok()?, total.parse().ok()?);
    (first <= last && last.checked_add(1)? == total).then_some((first, total))
}

async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, BuildkiteError> {
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.map_err(|e| BuildkiteError::Decode {
        status,
        message: transport_message(&e),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| BuildkiteError::Decode {
        status,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_must_be_the_tail_they_claim() {
        assert_eq!(parse_content_range("bytes 90-99/100"), Some((90, 100)));
        assert_eq!(parse_content_range("bytes 0-0/1"), Some((0, 1)));
        for bad in [
            "bytes 90-99/120",
            "bytes 90-99/100x",
            "bytes */100",
            "bytes 99-90/100",
            "items 90-99/100",
            "bytes 0-18446744073709551615/18446744073709551615",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn base_urls_are_checked() {
        let budget = Arc::new(RequestBudget::new(Default::default()));
        let http = reqwest::Client::new();
        assert!(Client::new(http.clone(), "ftp://x", budget.clone(), RetryPolicy::none()).is_err());
        assert!(Client::new(
            http.clone(),
            "not a url",
            budget.clone(),
            RetryPolicy::none()
        )
        .is_err());
        let c = Client::new(http, "http://127.0.0.1:1/api/", budget, RetryPolicy::none()).unwrap();
        let p = Pipeline {
            org: "acme".into(),
            slug: "app ci".into(),
        };
        assert_eq!(
            c.builds_url(&p, &["7", "cancel"]).unwrap().as_str(),
            "http://127.0.0.1:1/api/v2/organizations/acme/pipelines/app%20ci/builds/7/cancel"
        );
        assert!(c
            .same_origin("http://evil.example/v2/builds?page=2")
            .is_err());
        assert!(c.same_origin("http://127.0.0.1:1/api/v2/x?page=2").is_ok());
    }
}
