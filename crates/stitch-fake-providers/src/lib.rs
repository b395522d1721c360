//! Stateful fakes of the CI providers stitch drives, served over real HTTP
//! on `127.0.0.1:0`, for tests and benchmarks. Each models the provider's
//! behaviour (state progression, filtering, pagination, rate limits,
//! webhooks) closely enough that stitch's real clients cannot tell, and
//! injects the faults real providers have (5xx bursts, timeouts,
//! connection resets, answers lost after the work was done).
//!
//! - [`buildkite`]: the Buildkite REST API v2 and its webhooks.
//! - [`github`]: the GitHub Actions REST API, App installation tokens and
//!   `workflow_run` / `workflow_job` webhooks.
//! - [`gitlab`]: the GitLab REST API v4 (pipelines, jobs, traces) and
//!   Pipeline Hook webhooks.
//! - [`jenkins`]: a Jenkins controller's remote-access API (queue, builds,
//!   progressive console text, CSRF crumbs).
//!
//! [`faults`] is the fault injection they share, `serving` the serving
//! plumbing (background tasks, the clock, the webhook sender).
#![forbid(unsafe_code)]

pub mod buildkite;
pub mod faults;
pub mod github;
pub mod gitlab;
pub mod jenkins;
mod serving;
