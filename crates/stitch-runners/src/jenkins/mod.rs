//! `jenkins`: builds as runs of a parameterised Jenkins job, through the
//! remote-access API (`buildWithParameters`, the queue, build `api/json`,
//! `stop`, progressive console text, the crumb issuer).
//!
//! - [`Client`]: the API calls, with an injected transport, root URL,
//!   [`RetryPolicy`](crate::http_retry::RetryPolicy), basic-auth
//!   [`Credentials`] and a shared [`RequestBudget`](crate::http_budget::RequestBudget).
//! - [`JenkinsRunner`]: the `BuildRunner` contract on top of it.
//! - [`error`]: what a call fails with (the shared
//!   [`HttpError`](crate::http_error::HttpError) over Jenkins' answers).
//! - [`model`]: the API objects and the status mapping; [`logs`]: console
//!   lines.
//!
//! Setup: `docs/runners/jenkins.md`.

pub mod client;
pub mod error;
pub mod logs;
pub mod model;
pub mod runner;
pub mod section;

pub use client::{Client, ConsoleChunk, Credentials, JobPath};
pub use error::{JenkinsDetail, JenkinsError};
pub use model::{Build, BuildResult, QueueItem, PARAM_BUILD_ID};
pub use runner::{status_report, JenkinsConfig, JenkinsRunner, Progress};
pub use section::JenkinsSection;
