//! Helpers shared by the end-to-end tests.

pub mod provider;
pub mod queue;
pub mod serve;
