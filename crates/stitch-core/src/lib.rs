//! stitch domain types and the `BuildRunner` contract. No I/O lives here:
//! this crate is what every other stitch crate agrees on.
//!
//! - [`build`]: build identity and the narrow status set.
//! - [`changes`], [`metadata`], [`validation`]: caller input and its limits.
//! - [`runner`]: the `BuildRunner` trait and the values crossing it.
//! - [`log`]: `LogLine`, byte-compatible with Tangled's spindle frames.
//! - [`error`]: `RunnerError` and its retry classification.
//! - [`metric`]: the Prometheus metrics stitch exports, listed once.
#![forbid(unsafe_code)]

pub mod build;
pub mod changes;
pub mod error;
pub mod log;
pub mod metadata;
pub mod metric;
pub mod runner;
pub mod validation;

pub use build::{BuildId, BuildIdError, BuildStatus, ParseStatusError};
pub use changes::ChangeSet;
pub use error::{classify_http_status, ErrorClass, RunnerError};
pub use log::{LogKind, LogLine, OutputStream, StepKind, StepStatus};
pub use metadata::{validate_metadata_key, BuildMetadata};
pub use runner::{BuildHandle, BuildRunner, LogStream, RunnerRef, StatusReport, TriggerRequest};
pub use validation::{limits, validate_queue_name, ChangeList, ValidationError};

/// Re-exported so implementors use the same macro version as the trait.
pub use async_trait::async_trait;
