//! `stitch serve`: configuration, wiring of store, queue and runners, the
//! consumer framework with the trigger and signal stages, and the HTTP API.
#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod consumer;
mod dashboard;
pub mod event_feed;
pub mod gitlab_webhooks;
pub mod http;
pub mod job_token;
pub mod retention;
pub mod runners;
pub mod service;
pub mod stages;
pub mod state;
pub mod telemetry;
pub mod webhooks;
