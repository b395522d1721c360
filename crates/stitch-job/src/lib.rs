//! The job API: what a CI job talks to while it runs.
//!
//! A build's command runs with a job API beside it (`stitch job exec`, or the
//! local runner's in-process one): HTTP on a Unix socket in a directory only
//! the user can open, guarded by a random bearer token. Its one route today,
//! `POST /api/current-job/v0/promise-failure`, lets a test suite call
//! `stitch job promise-failure` on every failing test while the stitch server
//! sees one declaration per exit status (Buildkite agent PR #3996, see
//! `docs/early-failure.md`).
//!
//! - [`promise`]: the wire types (request, result, outcome) and their limits.
//! - [`coordinator`]: [`PromiseFailureCoordinator`], the per-exit-status
//!   debounce: one leader declares, concurrent callers share its result.
//! - [`upstream`]: [`ServerClient`], the declaration to the stitch server
//!   with the job token and the retry policy.
//! - [`server`]: [`JobApi`], the Unix-socket HTTP server.
//! - [`client`]: [`JobApiClient`], its client (used by the CLI).
//! - [`env`]: the environment variable names a job sees.
#![forbid(unsafe_code)]

pub mod client;
pub mod coordinator;
pub mod promise;
pub mod server;
pub mod upstream;

pub use client::{JobApiClient, JobApiError};
pub use coordinator::{Declare, PromiseFailureCoordinator};
pub use promise::{Declaration, InvalidPromise, Outcome, PromiseFailure, PromiseFailureResult};
pub use server::JobApi;
pub use upstream::{RetryPolicy, ServerClient, ServerClientError, Unconfigured};

/// Environment variables a job sees.
pub mod env {
    /// The stitch server's base URL (`api.public_url`).
    pub const SERVER: &str = "STITCH_SERVER";
    /// The build-scoped job token: authenticates promise-failure for this
    /// build only.
    pub const JOB_TOKEN: &str = "STITCH_JOB_TOKEN";
    /// The build's id.
    pub const BUILD_ID: &str = "STITCH_BUILD_ID";
    /// Path of the job API's Unix socket.
    pub const JOB_API_SOCKET: &str = "STITCH_JOB_API_SOCKET";
    /// Bearer token of the job API.
    pub const JOB_API_TOKEN: &str = "STITCH_JOB_API_TOKEN";
}
