//! `buildkite`: builds on Buildkite pipelines through the REST API v2.
//!
//! - [`Client`]: the REST calls, with an injected transport, base URL and
//!   [`RetryPolicy`](crate::http_retry::RetryPolicy), and the
//!   organization's shared [`RequestBudget`] (from [`crate::http_budget`]).
//! - [`BuildkiteRunner`]: the `BuildRunner` contract on top of it.
//! - [`error`]: what a call fails with (the shared
//!   [`HttpError`](crate::http_error::HttpError) over Buildkite's answers).
//! - [`model`]: the REST objects and the state mapping; [`logs`]: job logs
//!   as `LogLine`s; [`webhook`]: verifying webhook requests.
//!
//! Facts about the API: `research/buildkite.md`; setup: `docs/runners/buildkite.md`.

pub mod client;
pub mod error;
pub mod logs;
pub mod model;
pub mod runner;
pub mod section;
pub mod webhook;

pub use crate::http_budget::{RateLimit, RequestBudget};
pub use client::{BuildQuery, Client, Pipeline};
pub use error::{BuildkiteDetail, BuildkiteError};
pub use model::{Build, BuildState, META_BUILD_ID, META_QUEUE};
pub use runner::{status_report, BuildkiteConfig, BuildkiteRunner};
pub use section::{BuildkiteSection, WebhookModeName, WebhookSection};
