//! The conformance suite on the in-memory backend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use stitch_mq::conformance::Backend;
use stitch_mq::memory::MemoryDriver;
use stitch_mq::Driver;

/// Storage survives "restarts" by name within one test.
#[derive(Default)]
struct Memory {
    drivers: Mutex<HashMap<String, Arc<MemoryDriver>>>,
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
}

stitch_mq::conformance_tests!(Memory::default());
