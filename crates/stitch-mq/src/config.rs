//! Queue-wide and per-subscription settings, with the defaults documented
//! in `docs/architecture.md`.

use std::time::Duration;

use rand::Rng;

use crate::clock::Clock;
use crate::error::MqError;
use crate::message::validate_name;

/// Settings for one queue (one database).
#[derive(Clone, Debug)]
pub struct QueueConfig {
    /// Largest accepted payload + metadata, in bytes (default 1 MiB).
    pub max_payload_bytes: usize,
    /// How long an acked message's id keeps deduplicating republishes
    /// (default 7 days). This is the dedup horizon: a message id published
    /// again after it was acked *and* this much time passed since it was
    /// first stored may be accepted as new.
    pub dedup_retention: Duration,
    /// How often the background collector deletes acked messages past the
    /// retention, empty partitions and stale heartbeats (default 60 s).
    /// `None` disables the background task (tests call `Admin::gc`).
    pub gc_interval: Option<Duration>,
    /// Where the engine reads the time (default the wall clock; tests may
    /// use Tokio's, see [`Clock`]).
    pub clock: Clock,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1024 * 1024,
            dedup_retention: Duration::from_secs(7 * 24 * 3600),
            gc_interval: Some(Duration::from_secs(60)),
            clock: Clock::System,
        }
    }
}

/// Exponential backoff between failed attempts, persisted in the message's
/// delivery state so a restart keeps the schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Deliveries before a failure dead-letters; the attempt that reaches it
    /// dead-letters with the caller's failure. 0 = never dead-letter on nack.
    pub max_attempts: u32,
    /// Delay after the first failure.
    pub initial_backoff: Duration,
    /// Upper bound on any delay.
    pub max_backoff: Duration,
    /// Growth factor per attempt (≥ 1.0).
    pub multiplier: f64,
    /// Fraction of the delay that is randomised away (0.0 – 1.0): the delay
    /// is drawn from `[d·(1-jitter), d]` so retries of many messages spread out.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 10,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// The delay before the next delivery after `attempt` (1-based) failed.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let base = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exp);
        let capped = base.min(self.max_backoff.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = if jitter > 0.0 {
            1.0 - rand::thread_rng().gen_range(0.0..=jitter)
        } else {
            1.0
        };
        Duration::from_secs_f64((capped * factor).max(0.0))
    }

    fn validate(&self) -> Result<(), MqError> {
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            return Err(MqError::InvalidConfig(format!(
                "retry multiplier must be a finite number >= 1.0, got {}",
                self.multiplier
            )));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(MqError::InvalidConfig(format!(
                "retry jitter must be within 0.0..=1.0, got {}",
                self.jitter
            )));
        }
        if self.initial_backoff > self.max_backoff {
            return Err(MqError::InvalidConfig(
                "retry initial backoff is larger than the max backoff".into(),
            ));
        }
        Ok(())
    }
}

/// How one subscriber consumes one topic.
#[derive(Clone, Debug)]
pub struct SubscriptionConfig {
    /// Consumer group: groups keep independent delivery state.
    pub group: String,
    /// Unique per subscriber within the group (leases are held in its name).
    pub subscriber: String,
    /// Window per partition: at most this many unfinished messages of one
    /// partition are in play at once; 1 gives strict serialization.
    pub batch_size: u32,
    /// A delivery not finalized within this is redelivered (attempt + 1).
    pub visibility_timeout: Duration,
    /// A partition lease not renewed within this may be taken by a peer.
    pub lease_duration: Duration,
    /// How often leases are renewed and fair share recomputed.
    pub lease_renewal: Duration,
    /// Cross-process fallback: how long to sleep when nothing is due and no
    /// in-process wake-up arrives (another process may have published).
    pub poll_interval: Duration,
    /// Deliveries handed out and not yet finalized, at most.
    pub max_in_flight: usize,
    /// Backoff and dead-lettering of failures.
    pub retry: RetryPolicy,
}

impl SubscriptionConfig {
    /// Defaults for `group`, with a random subscriber name.
    pub fn new(group: impl Into<String>) -> Self {
        Self {
            group: group.into(),
            subscriber: format!("sub-{:016x}", rand::random::<u64>()),
            batch_size: 10,
            visibility_timeout: Duration::from_secs(60),
            lease_duration: Duration::from_secs(30),
            lease_renewal: Duration::from_secs(10),
            poll_interval: Duration::from_millis(500),
            max_in_flight: 256,
            retry: RetryPolicy::default(),
        }
    }

    /// Rejects settings that cannot work.
    pub fn validate(&self) -> Result<(), MqError> {
        validate_name("consumer group", &self.group)?;
        validate_name("subscriber name", &self.subscriber)?;
        let bad = |m: &str| Err(MqError::InvalidConfig(m.to_string()));
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1");
        }
        if self.max_in_flight == 0 {
            return bad("max_in_flight must be at least 1");
        }
        if self.visibility_timeout.is_zero() {
            return bad("visibility_timeout must be greater than zero");
        }
        if self.lease_duration.is_zero() || self.lease_renewal.is_zero() {
            return bad("lease_duration and lease_renewal must be greater than zero");
        }
        if self.lease_renewal >= self.lease_duration {
            return bad("lease_renewal must be shorter than lease_duration");
        }
        if self.poll_interval.is_zero() {
            return bad("poll_interval must be greater than zero");
        }
        self.retry.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let p = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            multiplier: 3.0,
            jitter: 0.0,
        };
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(300));
        assert_eq!(p.backoff(3), Duration::from_millis(900));
        assert_eq!(p.backoff(4), Duration::from_millis(1000));
        assert_eq!(p.backoff(400), Duration::from_millis(1000));
    }

    #[test]
    fn jitter_stays_in_range() {
        let p = RetryPolicy {
            jitter: 0.5,
            initial_backoff: Duration::from_millis(1000),
            ..RetryPolicy::default()
        };
        for _ in 0..200 {
            let d = p.backoff(1);
            assert!(
                d >= Duration::from_millis(500) && d <= Duration::from_millis(1000),
                "{d:?}"
            );
        }
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let mut c = SubscriptionConfig::new("g");
        assert!(c.validate().is_ok());
        c.batch_size = 0;
        assert!(matches!(c.validate(), Err(MqError::InvalidConfig(_))));
        let mut c = SubscriptionConfig::new("g");
        c.lease_renewal = c.lease_duration;
        assert!(c.validate().is_err());
        let mut c = SubscriptionConfig::new("g");
        c.retry.multiplier = 0.5;
        assert!(c.validate().is_err());
        let c = SubscriptionConfig::new("");
        assert!(matches!(c.validate(), Err(MqError::InvalidName { .. })));
    }
}
