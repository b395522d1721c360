//! The HTTP API's wire types: what `/v1` sends and accepts, each deriving
//! its OpenAPI schema. The server answers with them, `/openapi.json` lists
//! them and the CLI reads them, so the JSON, the document and the client
//! cannot drift apart. The domain types they carry (`BuildId`,
//! `BuildStatus`, `RunnerRef`, `LogLine`) are stitch-core's, with their
//! schemas derived there.
//!
//! - [`builds`]: the build record, a page of builds, the create request,
//!   the promise-failure request.
//! - [`events`]: an entry of the event log.
//! - [`queues`]: queue summaries with live counts, dead letters.
//! - [`answers`]: the error envelope, health and webhook answers.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod answers;
pub mod builds;
pub mod events;
pub mod queues;

pub use answers::{ErrorBody, ErrorDetail, HealthBody, WebhookOutcome};
pub use builds::{BuildList, BuildRecord, CreateBuild, Metadata, PromiseFailureBody};
pub use events::{Event, EventKind};
pub use queues::{
    DeadLetterList, DeadLetterRecord, HourBucket, QueueList, QueueSummary, StatusCounts,
};
