//! `jenkins::Client`: the Jenkins remote-access API calls stitch makes,
//! over an injected `reqwest::Client` (timeouts; it must not follow
//! redirects, since Jenkins answers `stop` and `cancelItem` with one), an
//! injected root URL and [`RetryPolicy`], the user's API token sent as
//! HTTP basic auth on every request, and a shared [`RequestBudget`].
//!
//! Retries: safe calls (reads, `stop`, `cancelItem`) are repeated on 5xx,
//! transport failures and 429; **`buildWithParameters` is repeated only
//! on 429, on a refused CSRF crumb** (both refused before processing) and
//! on connection failures (never sent). Any other failure of it comes back
//! with [`JenkinsError::outcome_unknown`] set, for the runner to look the
//! build up by its `STITCH_BUILD_ID` parameter before triggering again.
//!
//! CSRF: Jenkins does not ask API-token requests for a crumb, but a
//! controller configured otherwise (or a password instead of a token)
//! answers a POST with 403 "No valid crumb". The client then fetches one
//! from `crumbIssuer/api/json` (with the session cookie it is bound to),
//! sends it on every later POST, and fetches a new one when it goes stale.

use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use reqwest::header::{HeaderName, HeaderValue, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;

use super::error::{api_error, retry_after, JenkinsError};
use super::model::{Build, BuildRange, CrumbAnswer, Queue, QueueItem};
use crate::http_budget::{Priority, RequestBudget};
use crate::http_metrics;
use crate::http_retry::{RetryPolicy, Safety, Sent};
use crate::http_util::{join_segments, parse_api_root, transport_message};

/// The fields of a build stitch reads (Jenkins' `tree` filter keeps the
/// answers small).
const BUILD_TREE: &str =
    "number,url,building,result,queueId,timestamp,duration,fullDisplayName,actions[parameters[name,value]]";
/// The fields of the queue's items a lookup reads.
const QUEUE_TREE: &str =
    "items[id,cancelled,stuck,why,task[name,url],executable[number,url],actions[parameters[name,value]]]";

/// A job's full name (`team/app`: job `app` in folder `team`) and its URL
/// path segments (`job/team/job/app`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct JobPath {
    full_name: String,
}

impl JobPath {
    /// Reads a full name: names separated by `/`, none empty, `.` or `..`.
    pub fn parse(full_name: &str) -> Result<Self, String> {
        let trimmed = full_name.trim_matches('/');
        if trimmed.is_empty() {
            return Err("a job name must not be empty".into());
        }
        for name in trimmed.split('/') {
            if name.is_empty() || name == "." || name == ".." || name.trim() != name {
                return Err(format!(
                    "{full_name:?} is not a job path (names separated by '/', e.g. \"team/app\")"
                ));
            }
        }
        Ok(Self {
            full_name: trimmed.to_string(),
        })
    }

    /// `team/app`.
    pub fn full_name(&self) -> &str {
        &self.full_name
    }

    /// `["job", "team", "job", "app"]`.
    fn segments(&self) -> Vec<&str> {
        self.full_name
            .split('/')
            .flat_map(|name| ["job", name])
            .collect()
    }
}

/// The Jenkins user and API token requests authenticate with. Its `Debug`
/// shows the user only.
#[derive(Clone)]
pub struct Credentials {
    user: String,
    token: String,
}

impl Credentials {
    /// `user` and its API token (both non-empty).
    pub fn new(user: impl Into<String>, token: impl Into<String>) -> Result<Self, JenkinsError> {
        let (user, token) = (user.into(), token.into());
        if user.is_empty() || token.is_empty() {
            return Err(JenkinsError::Auth(
                "a user and an API token are needed".into(),
            ));
        }
        if user.contains(':') {
            return Err(JenkinsError::Auth(
                "a user name cannot contain ':' in basic auth".into(),
            ));
        }
        Ok(Self { user, token })
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// A crumb and the session cookie it is bound to.
#[derive(Clone)]
struct Crumb {
    field: HeaderName,
    value: HeaderValue,
    cookie: Option<HeaderValue>,
}

/// One read of a build's console: bytes from the offset asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleChunk {
    /// The bytes read (at most the maximum asked for).
    pub bytes: bytes::Bytes,
    /// The offset to read from next (`X-Text-Size`, or less when the read
    /// was cut at the maximum).
    pub next: u64,
    /// Jenkins said more may come (`X-More-Data: true`: still building).
    pub more: bool,
}

/// The Jenkins client. Cheap to clone; clones share the crumb.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    root: Url,
    credentials: Credentials,
    budget: Arc<RequestBudget>,
    priority: Priority,
    retry: RetryPolicy,
    crumb: Arc<Mutex<Option<Crumb>>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("jenkins::Client")
            .field("root", &self.root.as_str())
            .field("user", &self.credentials.user)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the controller at `root` (`https://ci.example.com`,
    /// or with a path prefix); `http` must not follow redirects.
    pub fn new(
        http: reqwest::Client,
        root: &str,
        credentials: Credentials,
        budget: Arc<RequestBudget>,
        retry: RetryPolicy,
    ) -> Result<Self, JenkinsError> {
        let (_, root) = parse_api_root(root).map_err(JenkinsError::Url)?;
        Ok(Self {
            http,
            root,
            credentials,
            budget,
            priority: Priority::Control,
            retry,
            crumb: Arc::new(Mutex::new(None)),
        })
    }

    /// The same client drawing from the budget at `priority` (log
    /// followers use [`Priority::Logs`]).
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

    fn url(&self, segments: &[&str]) -> Result<Url, JenkinsError> {
        join_segments(&self.root, segments).map_err(JenkinsError::Url)
    }

    /// The job's URL (with a trailing `/`, as Jenkins writes it).
    pub fn job_url(&self, job: &JobPath) -> Result<Url, JenkinsError> {
        let mut segments = job.segments();
        segments.push("");
        self.url(&segments)
    }

    fn job_api(&self, job: &JobPath, rest: &[&str]) -> Result<Url, JenkinsError> {
        let mut segments = job.segments();
        segments.extend_from_slice(rest);
        self.url(&segments)
    }

    /// `POST job/…/buildWithParameters?delay=0sec` with the parameters as
    /// a form body (never in the URL: they carry the job token). Returns
    /// the id of the queue item Jenkins answered with (`Location:
    /// …/queue/item/N/`). Never repeated after an unknown outcome (see
    /// the module docs).
    pub async fn build_with_parameters(
        &self,
        job: &JobPath,
        parameters: &[(String, String)],
    ) -> Result<u64, JenkinsError> {
        let mut url = self.job_api(job, &["buildWithParameters"])?;
        url.query_pairs_mut().append_pair("delay", "0sec");
        let resp = self
            .send(
                "build_with_parameters",
                Safety::StartsBuild,
                Method::POST,
                &url,
                Some(parameters),
            )
            .await?;
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        queue_id_of(location).ok_or_else(|| JenkinsError::Decode {
            status,
            message: format!("no queue item in the Location {location:?}"),
        })
    }

    /// `GET queue/item/N/api/json`. Jenkins forgets items a few minutes
    /// after they left the queue (then 404).
    pub async fn queue_item(&self, id: u64) -> Result<QueueItem, JenkinsError> {
        let url = self.url(&["queue", "item", &id.to_string(), "api", "json"])?;
        self.get_json("queue_item", &url).await
    }

    /// `GET queue/api/json`: every item waiting now (all jobs).
    pub async fn queue(&self) -> Result<Vec<QueueItem>, JenkinsError> {
        let mut url = self.url(&["queue", "api", "json"])?;
        url.query_pairs_mut().append_pair("tree", QUEUE_TREE);
        let queue: Queue = self.get_json("queue", &url).await?;
        Ok(queue.items)
    }

    /// `POST queue/cancelItem?id=N`. Jenkins answers a redirect or 204; a
    /// 404 means the item is no longer waiting (it left the queue).
    pub async fn cancel_queue_item(&self, id: u64) -> Result<(), JenkinsError> {
        let mut url = self.url(&["queue", "cancelItem"])?;
        url.query_pairs_mut().append_pair("id", &id.to_string());
        self.send("cancel_queue_item", Safety::Safe, Method::POST, &url, None)
            .await?;
        Ok(())
    }

    /// `GET job/…/N/api/json`.
    pub async fn get_build(&self, job: &JobPath, number: u64) -> Result<Build, JenkinsError> {
        let mut url = self.job_api(job, &[&number.to_string(), "api", "json"])?;
        url.query_pairs_mut().append_pair("tree", BUILD_TREE);
        self.get_json("get_build", &url).await
    }

    /// `GET job/…/api/json?tree=allBuilds[…]{from,to}`: the job's builds
    /// `from` (inclusive, 0 the newest) to `to` (exclusive), newest first.
    pub async fn list_builds(
        &self,
        job: &JobPath,
        from: u32,
        to: u32,
    ) -> Result<Vec<Build>, JenkinsError> {
        let mut url = self.job_api(job, &["api", "json"])?;
        url.query_pairs_mut()
            .append_pair("tree", &format!("allBuilds[{BUILD_TREE}]{{{from},{to}}}"));
        let range: BuildRange = self.get_json("list_builds", &url).await?;
        Ok(range.all_builds)
    }

    /// `POST job/…/N/stop`: aborts a running build (a finished one is
    /// left as it is).
    pub async fn stop_build(&self, job: &JobPath, number: u64) -> Result<(), JenkinsError> {
        let url = self.job_api(job, &[&number.to_string(), "stop"])?;
        self.send("stop_build", Safety::Safe, Method::POST, &url, None)
            .await?;
        Ok(())
    }

    /// `GET job/…/N/logText/progressiveText?start=S`: the console from byte
    /// `start` on, read no further than `max` bytes.
    pub async fn console_since(
        &self,
        job: &JobPath,
        number: u64,
        start: u64,
        max: u64,
    ) -> Result<ConsoleChunk, JenkinsError> {
        let mut url = self.job_api(job, &[&number.to_string(), "logText", "progressiveText"])?;
        url.query_pairs_mut()
            .append_pair("start", &start.to_string());
        let mut resp = self
            .send("console", Safety::Safe, Method::GET, &url, None)
            .await?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let size = header("x-text-size")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| JenkinsError::Decode {
                status,
                message: "a console answer without X-Text-Size".into(),
            })?;
        let more = header("x-more-data").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let wanted = usize::try_from(max).unwrap_or(usize::MAX);
        let mut body = BytesMut::new();
        while body.len() < wanted {
            match resp.chunk().await {
                Ok(Some(piece)) => body.extend_from_slice(&piece),
                Ok(None) => break,
                Err(e) => {
                    return Err(JenkinsError::Decode {
                        status,
                        message: transport_message(&e),
                    })
                }
            }
        }
        let cut = body.len() > wanted;
        body.truncate(wanted);
        let next = if cut {
            start + body.len() as u64
        } else {
            size.max(start)
        };
        Ok(ConsoleChunk {
            bytes: body.freeze(),
            next,
            more,
        })
    }

    async fn get_json<T: DeserializeOwned>(
        &self,
        operation: &'static str,
        url: &Url,
    ) -> Result<T, JenkinsError> {
        let resp = self
            .send(operation, Safety::Safe, Method::GET, url, None)
            .await?;
        decode(resp).await
    }

    /// `pairs` as an `application/x-www-form-urlencoded` body (the URL
    /// crate's query serializer is that encoding).
    fn form_body(&self, pairs: &[(String, String)]) -> String {
        let mut scratch = self.root.clone();
        scratch.set_query(None);
        scratch.query_pairs_mut().extend_pairs(pairs);
        scratch.query().unwrap_or_default().to_string()
    }

    fn current_crumb(&self) -> Option<Crumb> {
        self.crumb.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Fetches a crumb after a POST was refused for want of one. A
    /// controller without a crumb issuer (404) leaves the refusal as the
    /// answer.
    async fn refresh_crumb(&self, refusal: JenkinsError) -> Result<(), JenkinsError> {
        let url = self.url(&["crumbIssuer", "api", "json"])?;
        self.budget.acquire(self.priority).await;
        let timing = http_metrics::Attempt::start(http_metrics::JENKINS, "crumb");
        let resp = match self
            .http
            .get(url)
            .basic_auth(&self.credentials.user, Some(&self.credentials.token))
            .send()
            .await
        {
            Ok(resp) => {
                timing.answered(resp.status().as_u16());
                resp
            }
            Err(e) => {
                timing.failed();
                return Err(JenkinsError::transport(&e));
            }
        };
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(refusal);
        }
        if !resp.status().is_success() {
            let status = resp.status();
            let wait = retry_after(resp.headers());
            let body = resp.text().await.unwrap_or_default();
            return Err(api_error(status, &body, wait));
        }
        let cookies: Vec<String> = resp
            .headers()
            .get_all(SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.split(';').next())
            .map(|pair| pair.trim().to_string())
            .filter(|pair| pair.contains('='))
            .collect();
        let answer: CrumbAnswer = decode(resp).await?;
        let unusable = || JenkinsError::Decode {
            status: 200,
            message: "the crumb issuer answered a crumb no header can carry".into(),
        };
        let field = HeaderName::from_bytes(answer.crumb_request_field.as_bytes())
            .map_err(|_| unusable())?;
        let mut value = HeaderValue::from_str(&answer.crumb).map_err(|_| unusable())?;
        value.set_sensitive(true);
        let cookie = if cookies.is_empty() {
            None
        } else {
            let mut v = HeaderValue::from_str(&cookies.join("; ")).map_err(|_| unusable())?;
            v.set_sensitive(true);
            Some(v)
        };
        *self.crumb.lock().unwrap_or_else(|p| p.into_inner()) = Some(Crumb {
            field,
            value,
            cookie,
        });
        Ok(())
    }

    /// Sends with basic auth, the budget, the retry policy, the crumb
    /// handling and the 429 handling; each attempt is counted under
    /// `operation`. A redirect is an answer (Jenkins' way of saying done).
    async fn send(
        &self,
        operation: &'static str,
        safety: Safety,
        method: Method,
        url: &Url,
        form: Option<&[(String, String)]>,
    ) -> Result<reqwest::Response, JenkinsError> {
        let mut attempt = 0u32;
        let mut crumb_refreshed = false;
        loop {
            attempt += 1;
            self.budget.acquire(self.priority).await;
            let mut req = self
                .http
                .request(method.clone(), url.clone())
                .basic_auth(&self.credentials.user, Some(&self.credentials.token));
            if method == Method::POST {
                if let Some(crumb) = self.current_crumb() {
                    req = req.header(crumb.field, crumb.value);
                    if let Some(cookie) = crumb.cookie {
                        req = req.header(COOKIE, cookie);
                    }
                }
                if let Some(form) = form {
                    req = req
                        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                        .body(self.form_body(form));
                }
            }
            let resp = match self
                .retry
                .send_attempt(req, http_metrics::JENKINS, operation, safety, attempt)
                .await
            {
                Sent::Answered(resp) => resp,
                Sent::Again => continue,
                Sent::Failed(err) => return Err(err),
            };
            let status = resp.status();
            if status.is_success() || status.is_redirection() {
                return Ok(resp);
            }
            let wait = retry_after(resp.headers());
            let body = resp.text().await.unwrap_or_default();
            let err = api_error(status, &body, wait);
            if err.is_crumb_refused() && !crumb_refreshed {
                // Refused before processing: safe to send again, once, with
                // a fresh crumb.
                crumb_refreshed = true;
                attempt -= 1;
                self.refresh_crumb(err).await?;
                continue;
            }
            let rate_limit = (status == StatusCode::TOO_MANY_REQUESTS)
                .then(|| wait.unwrap_or_else(|| self.retry.backoff(attempt)));
            if self
                .retry
                .again_after_error_answer(
                    &self.budget,
                    http_metrics::JENKINS,
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

/// The queue item id in a `Location` (`http://ci/queue/item/17/`).
fn queue_id_of(location: &str) -> Option<u64> {
    let at = location.find("/queue/item/")?;
    let rest = &location[at + "/queue/item/".len()..];
    let digits: &str = rest.split('/').next()?;
    digits.parse().ok()
}

async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, JenkinsError> {
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.map_err(|e| JenkinsError::Decode {
        status,
        message: transport_message(&e),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| JenkinsError::Decode {
        status,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(root: &str) -> Result<Client, JenkinsError> {
        Client::new(
            reqwest::Client::new(),
            root,
            Credentials::new("stitch", "t0ken").unwrap(),
            Arc::new(RequestBudget::new(Default::default())),
            RetryPolicy::none(),
        )
    }

    #[test]
    fn job_paths_name_folders() {
        let job = JobPath::parse("team/app ci").unwrap();
        assert_eq!(job.full_name(), "team/app ci");
        let c = client("http://127.0.0.1:1/jenkins/").unwrap();
        assert_eq!(
            c.job_url(&job).unwrap().as_str(),
            "http://127.0.0.1:1/jenkins/job/team/job/app%20ci/"
        );
        assert_eq!(
            c.job_api(&job, &["7", "stop"]).unwrap().as_str(),
            "http://127.0.0.1:1/jenkins/job/team/job/app%20ci/7/stop"
        );
        assert_eq!(JobPath::parse("/app/").unwrap().full_name(), "app");
        for bad in ["", "/", "a//b", "a/../b", "a/./b", " a"] {
            assert!(JobPath::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn roots_and_credentials_are_checked() {
        assert!(client("ftp://x").is_err());
        assert!(client("not a url").is_err());
        assert!(Credentials::new("", "t").is_err());
        assert!(Credentials::new("u", "").is_err());
        assert!(Credentials::new("a:b", "t").is_err());
        let c = Credentials::new("stitch", "very-secret").unwrap();
        assert!(!format!("{c:?}").contains("very-secret"));
        let client = client("http://127.0.0.1:1").unwrap();
        assert!(!format!("{client:?}").contains("t0ken"));
    }

    #[test]
    fn form_bodies_are_url_encoded() {
        let c = client("http://127.0.0.1:1/?x=1").unwrap();
        let body = c.form_body(&[
            ("STITCH_HEAD".into(), r#"["https://g/c/1?a=b&c"]"#.into()),
            ("EMPTY".into(), String::new()),
        ]);
        assert_eq!(
            body,
            "STITCH_HEAD=%5B%22https%3A%2F%2Fg%2Fc%2F1%3Fa%3Db%26c%22%5D&EMPTY="
        );
    }

    #[test]
    fn queue_ids_come_from_the_location() {
        assert_eq!(queue_id_of("http://ci:8080/queue/item/17/"), Some(17));
        assert_eq!(queue_id_of("https://ci/jenkins/queue/item/3"), Some(3));
        assert_eq!(queue_id_of("http://ci/job/app/"), None);
        assert_eq!(queue_id_of(""), None);
        assert_eq!(queue_id_of("http://ci/queue/item/x/"), None);
    }
}
