//! The conformance suite on the in-memory backend, on real time and, for
//! the timing checks, on Tokio's paused clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use stitch_mq::conformance::Backend;
use stitch_mq::memory::MemoryDriver;
use stitch_mq::{Clock, Driver, Queue, QueueConfig};

/// Storage survives "restarts" by name within one test.
#[derive(Default)]
struct Memory {
    drivers: Mutex<HashMap<String, Arc<MemoryDriver>>>,
    /// The clock of every queue opened; `None` is the wall clock.
    clock: Option<Clock>,
}

impl Memory {
    /// Queues on Tokio's clock, one clock for every queue of the test so a
    /// restart keeps the time (made inside the test's paused runtime).
    fn paused() -> Self {
        Self {
            clock: Some(Clock::tokio()),
            ..Self::default()
        }
    }
}

#[async_trait]
impl Backend for Memory {
    async fn driver(&self, name: &str) -> Arc<dyn Driver> {
        self.drivers
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(MemoryDriver::new()))
            .clone()
    }

    async fn open(&self, name: &str, config: QueueConfig) -> Queue {
        let clock = self.clock.clone().unwrap_or(config.clock);
        Queue::new(self.driver(name).await, QueueConfig { clock, ..config })
    }
}

stitch_mq::conformance_tests!(Memory::default());

mod paused {
    use super::*;

    stitch_mq::conformance_tests!(paused Memory::paused());
}
