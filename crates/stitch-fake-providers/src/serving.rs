//! The serving plumbing every fake shares, written once: the background
//! tasks a running fake owns ([`Tasks`]: its HTTP servers, its clock, its
//! webhook sender), the clock that moves its world ([`Clock`],
//! [`run_clock`]), the webhook sender ([`Webhooks`], [`send_webhooks`],
//! [`until_delivered`]) and small HTTP helpers (fixed rate windows, the
//! busiest span of requests, percent-encoding). What a provider does
//! differently (routes, auth, its answers' shapes, what a webhook carries)
//! stays in its own module.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Webhook deliveries in flight at once, as a provider's delivery workers
/// send them: concurrently, in no guaranteed order.
const DELIVERIES_IN_FLIGHT: usize = 16;
/// How long a webhook delivery waits for the receiver's answer.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// A listener on `127.0.0.1:0` and the address it got.
pub(crate) async fn bind() -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// The background tasks of a running fake, aborted when it is dropped (a
/// fake stops with its handle).
#[derive(Default)]
pub(crate) struct Tasks(Vec<JoinHandle<()>>);

impl Tasks {
    /// Serves `app` on `listener` until the fake is dropped.
    pub(crate) fn serve(&mut self, listener: TcpListener, app: Router) {
        self.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
    }

    /// Runs `task` until the fake is dropped.
    pub(crate) fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.0.push(tokio::spawn(task));
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// What a fake's clock drives: on each tick the world advances, and what
/// moved is announced (a test waits on that instead of re-reading on a
/// timer) and handed on (as webhooks, where the provider sends them).
pub(crate) trait Clock: Send + Sync + 'static {
    /// What one move of the world yields (a webhook to send, or nothing).
    type Move;

    /// Time between ticks.
    fn period(&self) -> Duration;

    /// Bumped after each tick that moved anything.
    fn moved(&self) -> &watch::Sender<u64>;

    /// Moves the world to `now` (under the fake's lock), returning each move.
    fn advance(&self, now: Instant) -> Vec<Self::Move>;

    /// Hands one move on, after the lock is released and the tick announced.
    fn hand_on(&self, m: Self::Move);
}

/// The clock of a fake: ticks every [`Clock::period`] (a late tick is
/// delayed, not bunched) until the fake is dropped.
pub(crate) async fn run_clock<C: Clock>(fake: Arc<C>) {
    let mut every = tokio::time::interval(fake.period());
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let moves = fake.advance(Instant::now());
        if !moves.is_empty() {
            fake.moved().send_modify(|n| *n += 1);
        }
        for m in moves {
            fake.hand_on(m);
        }
    }
}

/// How a fake sends the webhooks its clock queued.
pub(crate) trait Webhooks: Send + Sync + 'static {
    /// A queued webhook (one transition of a build).
    type Transition: Send + 'static;
    /// Where one goes.
    type Target: Send + 'static;

    /// The receiver `t` goes to, counting it as routed (`None`: nobody
    /// receives it, so it is dropped).
    fn route(&self, t: &Self::Transition) -> Option<Self::Target>;

    /// Sends `t` to `target` and records the delivery (which bumps the
    /// count [`until_delivered`] watches).
    fn deliver(
        &self,
        http: &reqwest::Client,
        target: Self::Target,
        t: Self::Transition,
    ) -> impl Future<Output = ()> + Send;
}

/// Posts queued webhooks to their receivers, up to
/// [`DELIVERIES_IN_FLIGHT`] at once, until the fake is dropped.
pub(crate) async fn send_webhooks<W: Webhooks>(
    fake: Arc<W>,
    mut rx: mpsc::UnboundedReceiver<W::Transition>,
) {
    let http = reqwest::Client::builder()
        .timeout(DELIVERY_TIMEOUT)
        .build()
        .unwrap_or_default();
    let slots = Arc::new(tokio::sync::Semaphore::new(DELIVERIES_IN_FLIGHT));
    while let Some(t) = rx.recv().await {
        let Some(target) = fake.route(&t) else {
            continue;
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (fake, http) = (fake.clone(), http.clone());
        tokio::spawn(async move {
            fake.deliver(&http, target, t).await;
            drop(slot);
        });
    }
}

/// Returns once `delivered()` holds, re-checking after each webhook
/// delivery `deliveries` counts (every fake bumps it after every delivery).
pub(crate) async fn until_delivered(deliveries: &watch::Sender<u64>, delivered: impl Fn() -> bool) {
    let mut rx = deliveries.subscribe();
    while !delivered() {
        // The sender lives in the fake: `changed` fails only if the fake is
        // gone, and then nothing will come.
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// A fixed rate-limit window: requests counted from its start until it
/// has lasted its length, then counted afresh.
pub(crate) struct RateWindow {
    started: Instant,
    count: u32,
}

impl RateWindow {
    /// A window starting `now`, nothing counted yet.
    pub(crate) fn starting(now: Instant) -> Self {
        Self {
            started: now,
            count: 0,
        }
    }

    /// Counts one request at `now` in a window of `length` (starting a new
    /// window once the old one is over): the count so far, this request
    /// included, and the time left until the window resets.
    pub(crate) fn count(&mut self, now: Instant, length: Duration) -> (u32, Duration) {
        if now >= self.started + length {
            self.started = now;
            self.count = 0;
        }
        self.count += 1;
        let reset = (self.started + length).saturating_duration_since(now);
        (self.count, reset)
    }
}

/// The most of `times` (in arrival order) within any span of `window`.
pub(crate) fn max_in_window(times: &[Instant], window: Duration) -> usize {
    let (mut best, mut start) = (0, 0);
    for (end, t) in times.iter().enumerate() {
        while *t >= times[start] + window {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

/// `s` percent-encoded for a query value (RFC 3986 unreserved kept).
pub(crate) fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_window_counts_until_it_is_over_then_starts_again() {
        let t0 = Instant::now();
        let length = Duration::from_secs(10);
        let mut w = RateWindow::starting(t0);
        assert_eq!(w.count(t0, length), (1, length));
        assert_eq!(
            w.count(t0 + Duration::from_secs(4), length),
            (2, Duration::from_secs(6))
        );
        assert_eq!(w.count(t0 + length, length), (1, length));
    }

    #[test]
    fn the_busiest_span_counts_requests_within_the_window() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let times = [at(0), at(100), at(900), at(1000), at(1050), at(2500)];
        assert_eq!(max_in_window(&times, Duration::from_secs(1)), 4);
        assert_eq!(max_in_window(&[], Duration::from_secs(1)), 0);
    }

    #[test]
    fn encoding_keeps_only_unreserved_bytes() {
        assert_eq!(encode("a-b_c.d~9"), "a-b_c.d~9");
        assert_eq!(encode("team:a b/é"), "team%3Aa%20b%2F%C3%A9");
    }
}
