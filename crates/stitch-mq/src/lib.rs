//! stitch's durable message queue.
//!
//! Topics carry messages with an id (the dedup key), a partition key, a
//! payload and metadata. Delivery is ordered within a partition and parallel
//! across partitions; consumer groups keep independent state. Each delivery
//! ends with exactly one outcome: `ack`, `nack` (persisted exponential
//! backoff, dead-letter on the last attempt), `reject` (dead-letter now) or
//! `postpone` (a barrier for its partition that resets the failure streak).
//!
//! Storage is behind [`Driver`]; the engine in [`Queue`] is shared by every
//! backend, and [`conformance`] holds the suite every backend must pass.
//! See `docs/architecture.md` for tables, states and guarantees.
#![deny(unsafe_code)]

pub mod clock;
mod codec;
pub mod config;
pub mod conformance;
pub mod driver;
pub mod error;
pub mod memory;
pub mod message;
pub mod mysql;
pub mod open;
mod pg_statistics;
pub mod postgres;
mod queue;
pub mod raw_sqlite;
pub mod sqlite;
mod window;

pub use clock::Clock;
pub use config::{QueueConfig, RetryPolicy, SubscriptionConfig};
pub use driver::{
    DeadLetter, Driver, GcReport, NewMessage, PartitionInfo, PublishReport, TopicStats,
};
pub use error::{MqError, MqResult, StorageFailure};
pub use message::{now_millis, Failure, Message, Millis};
pub use open::{AnyDriver, BackendKind};
pub use queue::{
    Admin, ClaimProgress, Delivery, NackOutcome, PartitionFilter, Publisher, Queue, Subscriber,
    Subscription, MAX_PARTITION_PAGE, MAX_PRUNE_BATCH,
};
