//! `gitlab`: builds as GitLab CI pipelines, through the REST API v4.
//!
//! - [`Client`]: the REST calls, with an injected transport, API root,
//!   token (and optional pipeline trigger token),
//!   [`RetryPolicy`](crate::http_retry::RetryPolicy) and the token's shared
//!   [`RequestBudget`](crate::http_budget::RequestBudget).
//! - [`GitlabRunner`]: the `BuildRunner` contract on top of it.
//! - [`error`]: what a call fails with; [`model`]: the REST objects and the
//!   status mapping; [`logs`]: job traces as `LogLine`s; [`webhook`]:
//!   verifying and reading Pipeline Hook requests.
//!
//! Setup: `docs/runners/gitlab.md`.

pub mod client;
pub mod error;
pub mod logs;
pub mod model;
pub mod runner;
pub mod section;
pub mod webhook;

pub use client::{Client, PipelineQuery};
pub use error::{GitlabDetail, GitlabError};
pub use model::{
    pipeline_name, Job, Pipeline, PipelineStatus, RESERVED_VARIABLES, VAR_PIPELINE_NAME,
};
pub use runner::{status_report, GitlabConfig, GitlabRunner};
pub use section::{GitlabSection, GitlabWebhookSection};
