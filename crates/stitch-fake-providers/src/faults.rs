//! Fault injection the fakes share: what goes wrong with a request
//! ([`Fault`]), the per-endpoint rules that pick one ([`FaultRules`]), the
//! controls tests drive them with ([`FaultControl`]), the sync points that
//! hold a request in flight ([`Pause`]), and how a fault spoils an answer
//! after the work was done.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;

/// What goes wrong with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status (with an HTML proxy page) without doing the work.
    Status(u16),
    /// Do the work, then answer only after this delay (the client times out
    /// first: "accepted but the response was lost").
    Timeout(std::time::Duration),
    /// Do the work, then drop the connection in the middle of the answer.
    Reset,
    /// Do the work, then answer this status (a proxy that lost the answer).
    LostAfterWork(u16),
}

struct Rule<E> {
    endpoint: E,
    fault: Fault,
    remaining: Option<u32>,
    probability: f64,
}

/// A sync point in a fake: the next request to an endpoint does its work,
/// then waits here before answering until the test calls
/// [`release`](Pause::release). Tests use it to make something happen
/// "while the request is in flight" without timing (a cancel arriving
/// during a poll, a webhook during a trigger).
#[derive(Clone, Debug)]
pub struct Pause {
    held: Arc<watch::Sender<bool>>,
    released: Arc<watch::Sender<bool>>,
}

impl Default for Pause {
    fn default() -> Self {
        Self::new()
    }
}

impl Pause {
    /// A pause nobody is held at yet. The fakes make their own with
    /// `pause_next`; tests that wrap other parts (a runner) hold calls with
    /// [`hold`](Pause::hold) themselves.
    pub fn new() -> Self {
        Self {
            held: Arc::new(watch::channel(false).0),
            released: Arc::new(watch::channel(false).0),
        }
    }

    /// Returns once a request is held here (its work done, its answer not
    /// sent).
    pub async fn arrived(&self) {
        let mut rx = self.held.subscribe();
        // The sender lives in `self`: the wait ends only on arrival.
        let _ = rx.wait_for(|held| *held).await;
    }

    /// Lets the held request answer.
    pub fn release(&self) {
        self.released.send_replace(true);
    }

    /// Announces the held call, then waits for [`release`](Pause::release).
    pub async fn hold(&self) {
        self.held.send_replace(true);
        let mut rx = self.released.subscribe();
        let _ = rx.wait_for(|released| *released).await;
    }
}

/// The fault controls every fake gives its tests, written once: a fake
/// says where its [`FaultRules`] live and names its endpoints; tests bring
/// the trait into scope (`use stitch_fake_providers::buildkite::FaultControl`).
pub trait FaultControl {
    /// The API surface a fault applies to (the fake's `Endpoint`).
    type Endpoint: Copy + PartialEq;

    /// Runs `f` on the fake's rules, under the fake's lock.
    fn with_fault_rules<R>(&self, f: impl FnOnce(&mut FaultRules<Self::Endpoint>) -> R) -> R;

    /// Fails the next `times` requests to `endpoint` with `fault`.
    fn inject(&self, endpoint: Self::Endpoint, fault: Fault, times: u32) {
        self.with_fault_rules(|r| r.inject(endpoint, fault, times));
    }

    /// Fails each request to `endpoint` with `fault` with `probability`,
    /// until [`clear_faults`](Self::clear_faults).
    fn inject_rate(&self, endpoint: Self::Endpoint, fault: Fault, probability: f64) {
        self.with_fault_rules(|r| r.inject_rate(endpoint, fault, probability));
    }

    /// Holds the next request to `endpoint` (after its work, before its
    /// answer) until the returned [`Pause`] is released.
    fn pause_next(&self, endpoint: Self::Endpoint) -> Pause {
        self.with_fault_rules(|r| r.pause_next(endpoint))
    }

    /// Removes every injected fault and releases every pause.
    fn clear_faults(&self) {
        self.with_fault_rules(FaultRules::clear);
    }
}

/// What the tests written once for every provider need of a fake beyond
/// its faults: which request starts a build, which reads its status, and
/// how many builds the provider holds for one stitch build (exactly one,
/// however many answers were lost).
pub trait ProviderFake: FaultControl {
    /// The request that starts a build (Buildkite's and GitLab's create,
    /// GitHub's workflow dispatch, Jenkins's trigger).
    const START: Self::Endpoint;
    /// The read of one build's status.
    const POLL: Self::Endpoint;

    /// The provider's builds carrying stitch build `stitch_build_id`.
    fn builds_for(&self, stitch_build_id: &str) -> usize;

    /// Every build the provider was asked to start and started (Jenkins:
    /// queue items), whatever became of the answer.
    fn builds_started(&self) -> u64;
}

/// What the faults do to one admitted request's answer, once its work is
/// done: hold it at a pause, spoil it, or neither.
#[must_use]
pub(crate) struct AnswerFault {
    pause: Option<Pause>,
    fault: Option<Fault>,
}

impl AnswerFault {
    /// Whether a fault spoils the answer (a pause alone does not).
    pub(crate) fn spoils(&self) -> bool {
        self.fault.is_some()
    }

    /// Holds the answer at the pause (if any), then spoils it (if a fault).
    pub(crate) async fn apply(self, resp: Response) -> Response {
        if let Some(pause) = self.pause {
            pause.hold().await;
        }
        spoil(self.fault, resp).await
    }

    /// Adds `headers` (the rate-limit headers the gate computed) to a
    /// finished answer, then [`apply`](Self::apply)s the faults to it.
    pub(crate) async fn finish(self, headers: HeaderMap, mut resp: Response) -> Response {
        resp.headers_mut().extend(headers);
        self.apply(resp).await
    }
}

/// The injected faults and pauses of one fake, by endpoint kind `E`.
pub struct FaultRules<E> {
    rules: Vec<Rule<E>>,
    pauses: Vec<(E, Pause)>,
}

impl<E> Default for FaultRules<E> {
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            pauses: Vec::new(),
        }
    }
}

impl<E: Copy + PartialEq> FaultRules<E> {
    /// Holds the next request to `endpoint` at a [`Pause`].
    pub(crate) fn pause_next(&mut self, endpoint: E) -> Pause {
        let pause = Pause::new();
        self.pauses.push((endpoint, pause.clone()));
        pause
    }

    /// The pause for a request to `endpoint`, used up by it.
    fn take_pause(&mut self, endpoint: E) -> Option<Pause> {
        let at = self.pauses.iter().position(|(e, _)| *e == endpoint)?;
        Some(self.pauses.remove(at).1)
    }

    /// Fails the next `times` requests to `endpoint`.
    pub(crate) fn inject(&mut self, endpoint: E, fault: Fault, times: u32) {
        self.rules.push(Rule {
            endpoint,
            fault,
            remaining: Some(times),
            probability: 1.0,
        });
    }

    /// Fails each request to `endpoint` with `probability`, until cleared.
    pub(crate) fn inject_rate(&mut self, endpoint: E, fault: Fault, probability: f64) {
        self.rules.push(Rule {
            endpoint,
            fault,
            remaining: None,
            probability,
        });
    }

    /// Removes every rule and releases every pause.
    pub(crate) fn clear(&mut self) {
        self.rules.clear();
        for (_, p) in self.pauses.drain(..) {
            p.release();
        }
    }

    /// What happens to a request to `endpoint` that passed the fake's own
    /// checks (`any` matches every endpoint): `Err` is the answer of a
    /// fault that refuses it before its work (a proxy's error page).
    #[allow(clippy::result_large_err)]
    pub(crate) fn admit(&mut self, endpoint: E, any: E) -> Result<AnswerFault, Response> {
        if let Some(pause) = self.take_pause(endpoint) {
            return Ok(AnswerFault {
                pause: Some(pause),
                fault: None,
            });
        }
        match self.take(endpoint, any) {
            Some(Fault::Status(code)) => Err(proxy_page(code)),
            fault => Ok(AnswerFault { pause: None, fault }),
        }
    }

    /// The fault for a request to `endpoint` (`any` matches every endpoint),
    /// using up one of a counted rule's occurrences.
    pub(crate) fn take(&mut self, endpoint: E, any: E) -> Option<Fault> {
        let mut fault = None;
        for rule in self.rules.iter_mut() {
            let matches = rule.endpoint == endpoint || rule.endpoint == any;
            if !matches || rule.remaining == Some(0) {
                continue;
            }
            if rule.probability < 1.0 && rand::random::<f64>() >= rule.probability {
                continue;
            }
            if let Some(n) = &mut rule.remaining {
                *n -= 1;
            }
            fault = Some(rule.fault);
            break;
        }
        self.rules.retain(|r| r.remaining != Some(0));
        fault
    }
}

/// The HTML page a proxy in trouble answers with.
pub(crate) fn proxy_page(code: u16) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
    (
        status,
        [(header::CONTENT_TYPE, "text/html")],
        format!("<html><body><h1>{code}</h1>upstream trouble</body></html>"),
    )
        .into_response()
}

/// Applies a post-work fault (`None`: none) to a finished answer.
async fn spoil(fault: Option<Fault>, resp: Response) -> Response {
    match fault {
        None => resp,
        Some(Fault::Timeout(d)) => {
            tokio::time::sleep(d).await;
            resp
        }
        Some(Fault::LostAfterWork(code)) | Some(Fault::Status(code)) => proxy_page(code),
        Some(Fault::Reset) => {
            // Headers go out, then the body fails: hyper drops the connection.
            let (parts, _) = resp.into_parts();
            let broken = futures::stream::iter(vec![
                Ok(bytes::Bytes::from_static(b"{\"id\":")),
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "fake reset",
                )),
            ]);
            let mut resp = Response::from_parts(parts, Body::from_stream(broken));
            resp.headers_mut().remove(header::CONTENT_LENGTH);
            resp
        }
    }
}
