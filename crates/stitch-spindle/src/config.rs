//! The spindle's settings: the `[spindle]` section plus tunables tests
//! shorten (keepalive cadence, reconnect backoff, Jetstream rewind).

use std::time::Duration;

use stitch_server::config::SpindleConfig;

/// What the spindle runs with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Hostname registered on Tangled.
    pub hostname: String,
    /// Operator DID.
    pub owner: String,
    /// Queue of workflows without a `stitch:` block.
    pub default_queue: String,
    /// Jetstream subscription endpoint.
    pub jetstream_url: String,
    /// PLC directory.
    pub plc_url: String,
    /// `ws://` knots and `http://` did:web.
    pub dev: bool,
    /// WebSocket ping interval on `/events` and `/logs` (Tangled's consumer
    /// times out after 90 s without traffic).
    pub ping_interval: Duration,
    /// First reconnect delay of the Jetstream and knot clients.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// How far the Jetstream cursor is rewound on (re)connect: its
    /// time-based cursor does not guarantee a gapless boundary.
    pub jetstream_rewind: Duration,
}

impl Settings {
    /// Settings from the configuration section, with production tunables.
    pub fn from_config(c: &SpindleConfig) -> Self {
        Self {
            hostname: c.hostname.trim().to_string(),
            owner: c.owner.clone(),
            default_queue: c.default_queue.clone(),
            jetstream_url: c.jetstream_url.clone(),
            plc_url: c.plc_url.clone(),
            dev: c.dev,
            ping_interval: Duration::from_secs(30),
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(60),
            jetstream_rewind: Duration::from_secs(5),
        }
    }

    /// The spindle's own DID: the audience of service-auth tokens.
    pub fn service_did(&self) -> String {
        format!("did:web:{}", self.hostname)
    }

    /// The events URL of a knot.
    pub fn knot_events_url(&self, knot: &str) -> String {
        let scheme = if self.dev { "ws" } else { "wss" };
        format!("{scheme}://{knot}/events")
    }
}

/// Exponential reconnect delays between `min` and `max`.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    /// The delay before the next attempt, doubling up to `max`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// A connection worked: start again from `min`.
    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}
