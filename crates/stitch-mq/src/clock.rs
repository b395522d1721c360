//! Where the queue engine reads the time. Storage keeps epoch milliseconds;
//! the engine asks its [`Clock`] for them, so tests can run its timing
//! (delays, backoff, visibility, leases) on Tokio's paused clock.

use crate::message::{now_millis, Millis};

/// The time source of a [`Queue`](crate::Queue) (`QueueConfig::clock`).
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// The system's wall clock.
    #[default]
    System,
    /// Tokio's clock, read as epoch milliseconds from `epoch` (the wall
    /// clock when it was made) on. Under `tokio::time::pause()` it moves only
    /// when the runtime idles or is advanced, and the engine's sleeps follow
    /// it, so timing behaviour shows without waiting. Only for storage that
    /// never makes the runtime idle while working (the memory driver): an
    /// idle wait on a database thread would let paused time jump ahead.
    Tokio {
        /// Epoch milliseconds at `start`.
        epoch: Millis,
        /// Tokio's instant the clock counts from.
        start: tokio::time::Instant,
    },
}

impl Clock {
    /// A [`Clock::Tokio`] starting now.
    pub fn tokio() -> Self {
        Self::Tokio {
            epoch: now_millis(),
            start: tokio::time::Instant::now(),
        }
    }

    /// The current time in epoch milliseconds.
    pub fn now(&self) -> Millis {
        match self {
            Self::System => now_millis(),
            Self::Tokio { epoch, start } => epoch + start.elapsed().as_millis() as Millis,
        }
    }
}
