//! A shared request budget for vendor HTTP clients: a token bucket every
//! client of one rate-limit scope shares (a Buildkite organization, a
//! GitHub token or App installation), so all queues on that scope together
//! stay inside the provider's limit, plus a shared pause after the provider
//! said "slow down" (a 429, GitHub's 403 rate-limit answers).
//!
//! Bucket shape: a burst of a tenth of the limit, refilled continuously with
//! the rest over the window. Any window of that length then sees at most
//! `burst + refill = requests` requests, which a fixed-window limiter on the
//! provider's side (Buildkite resets per window) never refuses.
//!
//! Priority: log followers draw at [`Priority::Logs`], which only takes a
//! token while the bucket holds more than [`LOG_RESERVE`] of its burst, so
//! however many log viewers there are, triggers, polls and cancels
//! ([`Priority::Control`]) always find that reserve.
//! Hand-written (see `docs/adr/0005-buildkite-client-budget-and-retries.md`):
//! the shared "pause everyone until the provider's reset" is not something
//! the rate-limiter crates offer, and the bucket itself is a dozen lines.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The share of the burst that only [`Priority::Control`] requests may
/// spend: log traffic waits while the bucket holds this much or less.
pub const LOG_RESERVE: f64 = 0.5;

/// Who a request is for: what the build queue needs, or a log viewer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Priority {
    /// Triggers, status polls, cancels, lookups: spend any token.
    #[default]
    Control,
    /// Log following: spends only above the reserve ([`LOG_RESERVE`]).
    Logs,
}

/// How many requests per window one rate-limit scope may send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests allowed in any window; at least 2.
    pub requests: u32,
    /// The window. Buildkite's is one minute.
    pub window: Duration,
}

impl Default for RateLimit {
    /// Buildkite's default organization limit: 200 requests per minute.
    fn default() -> Self {
        Self {
            requests: 200,
            window: Duration::from_secs(60),
        }
    }
}

/// `rate_limit = { requests = 200, window = "1m" }` in a runner's section
/// of `stitch.toml`.
#[derive(Clone, Debug, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSection {
    pub requests: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for RateLimitSection {
    fn default() -> Self {
        let limit = RateLimit::default();
        Self {
            requests: limit.requests,
            window: limit.window,
        }
    }
}

impl RateLimitSection {
    /// The limit this section configures.
    pub fn limit(&self) -> RateLimit {
        RateLimit {
            requests: self.requests,
            window: self.window,
        }
    }
}

impl RateLimit {
    /// Why this limit cannot be used, if it cannot.
    pub fn problem(&self) -> Option<&'static str> {
        if self.requests < 2 {
            Some("rate_limit.requests must be at least 2")
        } else if self.window.is_zero() {
            Some("rate_limit.window must be greater than zero")
        } else {
            None
        }
    }

    fn burst(&self) -> f64 {
        f64::from((self.requests / 10).max(1))
    }

    /// Tokens per second added to the bucket.
    fn refill_rate(&self) -> f64 {
        let refill = f64::from(self.requests) - self.burst();
        refill.max(1.0) / self.window.as_secs_f64().max(1e-3)
    }
}

struct Bucket {
    tokens: f64,
    refilled_at: Instant,
    paused_until: Option<Instant>,
}

/// A token bucket shared (through `Arc`) by every client of one rate-limit
/// scope.
pub struct RequestBudget {
    limit: RateLimit,
    bucket: Mutex<Bucket>,
}

impl std::fmt::Debug for RequestBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBudget")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl RequestBudget {
    /// A full bucket for `limit`.
    pub fn new(limit: RateLimit) -> Self {
        Self {
            bucket: Mutex::new(Bucket {
                tokens: limit.burst(),
                refilled_at: Instant::now(),
                paused_until: None,
            }),
            limit,
        }
    }

    /// The limit this budget enforces.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Waits until one request may be sent, and takes it from the budget.
    pub async fn acquire(&self, priority: Priority) {
        loop {
            let wait = match self.try_take(priority, Instant::now()) {
                None => return,
                Some(wait) => wait,
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes a token now if `priority` may have one; false (and nothing
    /// taken) otherwise.
    pub fn try_acquire(&self, priority: Priority) -> bool {
        self.try_take(priority, Instant::now()).is_none()
    }

    /// Tokens a request of `priority` leaves in the bucket at least.
    fn floor(&self, priority: Priority) -> f64 {
        match priority {
            Priority::Control => 0.0,
            Priority::Logs => self.limit.burst() * LOG_RESERVE,
        }
    }

    /// Takes a token now, or says how long to wait before trying again.
    fn try_take(&self, priority: Priority, now: Instant) -> Option<Duration> {
        // A poisoned lock only means another task panicked mid-update of two
        // numbers; the numbers are still usable.
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(until) = b.paused_until {
            if until > now {
                return Some(until - now);
            }
            b.paused_until = None;
        }
        let rate = self.limit.refill_rate();
        let elapsed = now.saturating_duration_since(b.refilled_at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(self.limit.burst());
        b.refilled_at = now;
        let needed = 1.0 + self.floor(priority);
        if b.tokens >= needed {
            b.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((needed - b.tokens) / rate))
        }
    }

    /// After a rate-limit answer: nobody on this scope sends before `wait` has
    /// passed (the provider's reset), and the bucket restarts empty so the
    /// requests that queued up meanwhile trickle out at the refill rate
    /// instead of bursting into the fresh window.
    pub fn pause_for(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        if b.paused_until.is_none_or(|p| p < until) {
            b.paused_until = Some(until);
        }
        b.tokens = 0.0;
        b.refilled_at = until;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(requests: u32, secs: u64) -> RateLimit {
        RateLimit {
            requests,
            window: Duration::from_secs(secs),
        }
    }

    /// Counts acquisitions in every window of the limit's length (paused
    /// clock, so the figures are exact).
    #[tokio::test(start_paused = true)]
    async fn no_window_sees_more_than_the_limit() {
        let l = limit(200, 60);
        let budget = RequestBudget::new(l);
        let start = Instant::now();
        let mut times = Vec::new();
        for _ in 0..1000 {
            budget.acquire(Priority::Control).await;
            times.push(Instant::now() - start);
        }
        for (i, t) in times.iter().enumerate() {
            let in_window = times[i..]
                .iter()
                .take_while(|u| **u < *t + l.window)
                .count();
            assert!(
                in_window <= 200,
                "{in_window} requests in the window from {t:?}"
            );
        }
        // And the budget is used: 1000 requests take about 5 windows.
        let total = *times.last().unwrap();
        assert!(total < Duration::from_secs(5 * 60 + 30), "{total:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_everyone_back() {
        let budget = RequestBudget::new(limit(100, 1));
        budget.acquire(Priority::Control).await;
        budget.pause_for(Duration::from_secs(3));
        let before = Instant::now();
        budget.acquire(Priority::Control).await;
        assert!(Instant::now() - before >= Duration::from_secs(3));
        // A shorter pause does not shorten a longer one.
        budget.pause_for(Duration::from_secs(2));
        budget.pause_for(Duration::from_millis(10));
        let before = Instant::now();
        budget.acquire(Priority::Control).await;
        assert!(Instant::now() - before >= Duration::from_secs(2));
    }

    /// With the bucket at its reserve, control requests still go at once
    /// while log requests wait until refills lift it above the reserve.
    #[tokio::test(start_paused = true)]
    async fn logs_leave_the_reserve_to_control_requests() {
        // Burst 10 (reserve 5), one token back every 10 s.
        let budget = RequestBudget::new(limit(100, 900));
        for _ in 0..5 {
            assert!(budget.try_acquire(Priority::Logs));
        }
        assert!(
            !budget.try_acquire(Priority::Logs),
            "logs stop at the reserve"
        );
        let start = Instant::now();
        for _ in 0..5 {
            budget.acquire(Priority::Control).await;
        }
        assert_eq!(Instant::now(), start, "control spent the reserve at once");
        assert!(!budget.try_acquire(Priority::Control));
        // Empty bucket: a log request needs the reserve refilled plus one.
        budget.acquire(Priority::Logs).await;
        let waited = Instant::now() - start;
        assert!(waited >= Duration::from_secs(59), "{waited:?}");
        assert!(waited <= Duration::from_secs(61), "{waited:?}");
    }

    #[test]
    fn limits_are_checked() {
        assert!(RateLimit::default().problem().is_none());
        assert!(limit(1, 60).problem().is_some());
        assert!(limit(10, 0).problem().is_some());
    }
}
