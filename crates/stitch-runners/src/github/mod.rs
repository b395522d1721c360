//! `github`: builds as GitHub Actions workflow runs, through the REST API.
//!
//! - [`Client`]: the REST calls, with an injected transport, API root,
//!   [`Credentials`] (token or App), API version,
//!   [`RetryPolicy`](crate::http_retry::RetryPolicy) and the shared
//!   [`RequestBudget`](crate::http_budget::RequestBudget).
//! - [`GithubRunner`]: the `BuildRunner` contract on top of it.
//! - [`model`]: the REST objects and the status mapping; [`logs`]: job logs
//!   as `LogLine`s; [`webhook`]: verifying and reading webhook requests;
//!   [`auth`]: tokens and GitHub App installation tokens.
//!
//! Facts about the API: `research/github_actions.md`; setup:
//! `docs/runners/github.md`.

pub mod auth;
pub mod client;
pub mod error;
pub mod logs;
pub mod model;
pub mod runner;
pub mod section;
pub mod webhook;

pub use auth::{AppTokens, Credentials};
pub use client::{Client, Repo, RunQuery};
pub use error::{GithubDetail, GithubError};
pub use model::{map_status, Job, Run, API_VERSION_2022, INPUT_BUILD_ID, RESERVED_INPUTS};
pub use runner::{status_report, GithubConfig, GithubRunner};
pub use section::GithubSection;
