//! The retry policy vendor HTTP clients (Buildkite, GitHub, GitLab,
//! Jenkins) are given by their wiring: how many attempts a *safe* call
//! gets, the backoff between them, and the longest wait a provider's
//! rate-limit reset may impose before the client gives the error back to
//! its caller (whose own, slower retry schedule takes over); and the one
//! send of an attempt every client shares ([`RetryPolicy::send_attempt`]).
//!
//! Which calls are safe to repeat is the client's knowledge, not the
//! policy's: the client says it per call ([`Safety`]), the policy only
//! answers "may I try again, and after how long".
//! Hand-written rather than a crate because it is a value type of four
//! numbers and one formula; see `docs/adr/0005-buildkite-client-budget-and-retries.md`.

use std::time::Duration;

use rand::Rng;

use crate::http_budget::RequestBudget;
use crate::http_error::{AnswerDetail, HttpError};
use crate::http_metrics;

/// Whether a call may be sent again after an unknown outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Safety {
    /// Repeating it changes nothing (reads, cancels).
    Safe,
    /// Repeating it may start a second build (a create, a workflow
    /// dispatch, a job trigger).
    StartsBuild,
}

/// What one send of a request came to.
pub(crate) enum Sent<D> {
    /// The vendor answered (with any status).
    Answered(reqwest::Response),
    /// No answer, and the call may be sent again: the backoff was waited.
    Again,
    /// No answer, and the call may not be sent again.
    Failed(HttpError<D>),
}

/// Attempts and backoff for repeatable HTTP calls.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in total (the first one included); at least 1.
    pub max_attempts: u32,
    /// Delay after the first failed attempt.
    pub initial_backoff: Duration,
    /// Upper bound of any backoff.
    pub max_backoff: Duration,
    /// Longest rate-limit wait (`RateLimit-Reset`) honoured inside one
    /// call; a longer reset is returned to the caller as the error's
    /// `retry_after` instead of blocking the call.
    pub max_rate_limit_wait: Duration,
    /// Fraction of each delay added at random (0.0 – 1.0), so many callers
    /// woken by the same reset do not return at the same instant.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    /// Four attempts, 250 ms doubling to at most 5 s, rate-limit waits up
    /// to 2 minutes (the longest Buildkite window), 20 % jitter.
    fn default() -> Self {
        Self {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(5),
            max_rate_limit_wait: Duration::from_secs(120),
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries (one attempt, no waiting).
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            initial_backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
            max_rate_limit_wait: Duration::ZERO,
            jitter: 0.0,
        }
    }

    /// Whether another attempt may follow attempt number `attempt` (1-based).
    pub fn may_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts.max(1)
    }

    /// The delay after attempt `attempt` (1-based) failed: exponential
    /// (×2), capped at `max_backoff`, plus jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(32);
        let base = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(exp))
            .min(self.max_backoff);
        self.with_jitter(base)
    }

    /// The wait before retrying after a rate-limit answer that asked for
    /// `reset` (plus jitter), or `None` when that is longer than
    /// `max_rate_limit_wait` and the caller should get the error instead.
    pub fn rate_limit_wait(&self, reset: Duration) -> Option<Duration> {
        (reset <= self.max_rate_limit_wait).then(|| self.with_jitter(reset))
    }

    /// Sends `request` once as attempt number `attempt` (1-based), timed
    /// into the HTTP metrics as `provider`'s `operation`. When no answer
    /// came, the call is sent again if repeating it is harmless (`Safe`, or
    /// the connection was never made) and attempts are left: the backoff is
    /// waited here and [`Sent::Again`] returned.
    pub(crate) async fn send_attempt<D: AnswerDetail>(
        &self,
        request: reqwest::RequestBuilder,
        provider: &'static str,
        operation: &'static str,
        safety: Safety,
        attempt: u32,
    ) -> Sent<D> {
        let timing = http_metrics::Attempt::start(provider, operation);
        match request.send().await {
            Ok(resp) => {
                timing.answered(resp.status().as_u16());
                Sent::Answered(resp)
            }
            Err(e) => {
                timing.failed();
                let err = HttpError::transport(&e);
                let repeatable = safety == Safety::Safe || !err.outcome_unknown();
                if repeatable && self.may_retry(attempt) {
                    tokio::time::sleep(self.backoff(attempt)).await;
                    return Sent::Again;
                }
                Sent::Failed(err)
            }
        }
    }

    /// Whether a call that got an error answer is sent again, the wait
    /// before it done. A rate-limit answer (`rate_limit`: the wait the
    /// vendor asked for) was refused before processing, so every call may
    /// repeat it: the whole `budget` pauses for the wait when the policy
    /// allows one that long. A server error is repeated only for `Safe`
    /// calls, after the backoff. Anything else is given back.
    pub(crate) async fn again_after_error_answer(
        &self,
        budget: &RequestBudget,
        provider: &'static str,
        status: reqwest::StatusCode,
        rate_limit: Option<Duration>,
        safety: Safety,
        attempt: u32,
    ) -> bool {
        if let Some(reset) = rate_limit {
            let Some(wait) = self.rate_limit_wait(reset) else {
                return false;
            };
            budget.pause_for(wait);
            http_metrics::rate_limit_pause(provider);
            return self.may_retry(attempt);
        }
        if status.is_server_error() && safety == Safety::Safe && self.may_retry(attempt) {
            tokio::time::sleep(self.backoff(attempt)).await;
            return true;
        }
        false
    }

    /// `d` plus up to `jitter · d` (at least 0–50 ms, so a zero reset
    /// still spreads callers out a little).
    pub fn with_jitter(&self, d: Duration) -> Duration {
        let jitter = self.jitter.clamp(0.0, 1.0);
        if jitter == 0.0 {
            return d;
        }
        let spread = d.mul_f64(jitter).max(Duration::from_millis(50));
        d + spread.mul_f64(rand::thread_rng().gen_range(0.0..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        };
        assert_eq!(p.backoff(1), Duration::from_millis(250));
        assert_eq!(p.backoff(2), Duration::from_millis(500));
        assert_eq!(p.backoff(3), Duration::from_secs(1));
        assert_eq!(p.backoff(10), Duration::from_secs(5));
        assert_eq!(p.backoff(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn jitter_only_adds_within_its_fraction() {
        let p = RetryPolicy::default();
        for _ in 0..100 {
            let d = p.backoff(3);
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_millis(1200),
                "{d:?}"
            );
        }
        let zero = p.with_jitter(Duration::ZERO);
        assert!(zero <= Duration::from_millis(50));
    }

    #[test]
    fn attempts_and_rate_limit_waits_are_bounded() {
        let p = RetryPolicy::default();
        assert!(p.may_retry(1) && p.may_retry(3));
        assert!(!p.may_retry(4));
        assert!(!RetryPolicy::none().may_retry(1));
        assert!(p.rate_limit_wait(Duration::from_secs(121)).is_none());
        let w = p.rate_limit_wait(Duration::from_secs(2)).unwrap();
        assert!(w >= Duration::from_secs(2) && w <= Duration::from_millis(2400));
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_answer_is_sent_again_by_its_kind() {
        use crate::http_budget::{Priority, RateLimit};
        use reqwest::StatusCode;
        use tokio::time::Instant;

        let policy = RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            max_rate_limit_wait: Duration::from_secs(10),
            jitter: 0.0,
        };
        let budget = RequestBudget::new(RateLimit::default());
        let again = |status: u16, rate_limit: Option<u64>, safety: Safety, attempt: u32| {
            policy.again_after_error_answer(
                &budget,
                "test",
                StatusCode::from_u16(status).unwrap(),
                rate_limit.map(Duration::from_secs),
                safety,
                attempt,
            )
        };
        // A server error: a safe call after the backoff, one that may
        // start a build never, and none after the last attempt.
        let t0 = Instant::now();
        assert!(again(503, None, Safety::Safe, 1).await);
        assert_eq!(t0.elapsed(), Duration::from_millis(100));
        assert!(!again(503, None, Safety::StartsBuild, 1).await);
        assert!(!again(503, None, Safety::Safe, 3).await);
        // Any other error answer is given back.
        assert!(!again(404, None, Safety::Safe, 1).await);
        assert!(!again(401, None, Safety::Safe, 1).await);
        assert!(budget.try_acquire(Priority::Control), "nothing paused it");
        // A rate limit longer than the policy waits: given back, no pause.
        assert!(!again(429, Some(60), Safety::Safe, 1).await);
        assert!(budget.try_acquire(Priority::Control), "nothing paused it");
        // A rate limit: any call again (it was refused before processing),
        // the whole budget paused for the wait instead of this caller alone.
        let t0 = Instant::now();
        assert!(again(429, Some(2), Safety::StartsBuild, 1).await);
        assert_eq!(
            t0.elapsed(),
            Duration::ZERO,
            "the budget waits, not the call"
        );
        assert!(
            !budget.try_acquire(Priority::Control),
            "the budget is paused"
        );
        // After the last attempt the pause still holds, and the error is given back.
        assert!(!again(429, Some(2), Safety::Safe, 3).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_connection_is_sent_again_even_for_a_create() {
        let policy = RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            max_rate_limit_wait: Duration::ZERO,
            jitter: 0.0,
        };
        // A port held by a socket that never listens: the connection is
        // refused, so nothing reached the vendor and even a create may be
        // sent again. (Holding it keeps another test from taking it.)
        let held = tokio::net::TcpSocket::new_v4().unwrap();
        held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = held.local_addr().unwrap().port();
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}/");
        let send = |attempt| {
            policy.send_attempt::<crate::buildkite::error::BuildkiteDetail>(
                http.post(&url),
                "test",
                "create",
                Safety::StartsBuild,
                attempt,
            )
        };
        assert!(matches!(send(1).await, Sent::Again));
        match send(2).await {
            Sent::Failed(e) => assert!(!e.outcome_unknown(), "{e:?}"),
            _ => panic!("the last attempt gives the error back"),
        }
    }
}
