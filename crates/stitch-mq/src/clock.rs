//! Where the queue engine reads the time. Storage keeps epoch milliseconds;
//! the engine asks its [`Clock`] for them, so tests can run its timing
//! (delays, backoff, visibility, leases) on Tokio's paused clock.

use std::future::Future;

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
    /// never makes the runtime idle while working: the memory driver, and
    /// the SQLite driver opened with this clock, whose waits on sqlx's worker
    /// thread go through [`Clock::hold`]. Any other wait on a database
    /// thread looks like an idle runtime and lets paused time jump ahead
    /// (past a pool timeout, say).
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

    /// Awaits `work`, a wait on another thread (a database driver's worker),
    /// and on [`Clock::Tokio`] keeps paused time from moving meanwhile: a
    /// blocking task waits beside it until it is done, and Tokio does not
    /// auto-advance a paused current-thread runtime while a blocking task
    /// runs. [`Clock::System`] just awaits `work`.
    pub async fn hold<F: Future>(&self, work: F) -> F::Output {
        match self {
            Self::System => work.await,
            Self::Tokio { .. } => {
                let (done, wait) = std::sync::mpsc::channel::<()>();
                // Returns once `done` is dropped: after `work`, or with it
                // when this future is dropped first.
                let holder = tokio::task::spawn_blocking(move || {
                    let _ = wait.recv();
                });
                let out = work.await;
                drop(done);
                // The holder only waits on `done`; it cannot fail but by a
                // runtime shutting down, when nothing is held any more.
                let _ = holder.await;
                out
            }
        }
    }
}
