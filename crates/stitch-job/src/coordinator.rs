//! The per-exit-status debounce of promise-failure (Buildkite agent PR
//! #3996, `promiseFailureCoordinator`).
//!
//! - The first caller for an exit status becomes the leader: it starts the
//!   declaration in a detached task (a caller that disconnects does not
//!   abandon it — others may be waiting) and waits for it.
//! - Callers that find an entry wait for the same result and get a copy
//!   with outcome `debounced`; they make no request.
//! - Acceptance and terminal refusals (4xx except 429) stay cached, so a
//!   test suite with thousands of failures never hammers the server.
//!   Transient failures (5xx, 429, network) are evicted before the waiters
//!   are released, so a later call declares again.
//! - A panicking declaration is caught: every waiter gets an error result
//!   (upstream status 500) and the entry is evicted, so the next call
//!   retries. Nothing can leave a waiter hanging.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use futures::FutureExt;
use tokio::sync::watch;

use crate::promise::{Declaration, Outcome, PromiseFailure, PromiseFailureResult};

/// Declares a promise to the stitch server. [`crate::ServerClient`] is the
/// implementation; the trait lets the job API run without one
/// ([`crate::Unconfigured`]).
#[async_trait]
pub trait Declare: Send + Sync + 'static {
    /// Declare `promise` (with whatever retries apply) and report the outcome.
    async fn declare(&self, promise: &PromiseFailure) -> Declaration;
}

type Slot = Arc<watch::Sender<Option<Declaration>>>;

/// Debounces promise-failure per exit status. See the module docs.
pub struct PromiseFailureCoordinator {
    declarer: Arc<dyn Declare>,
    entries: Mutex<HashMap<i32, Slot>>,
    panic_next: AtomicBool,
    /// Bumped each time a caller joins a declaration (leader or waiter): the
    /// sync point for [`waiting`](Self::waiting), so a test waits for
    /// callers to pile up on an event rather than re-reading on a timer.
    joined: watch::Sender<u64>,
}

impl std::fmt::Debug for PromiseFailureCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromiseFailureCoordinator")
            .field("exit_statuses", &self.lock().len())
            .finish_non_exhaustive()
    }
}

impl PromiseFailureCoordinator {
    /// A coordinator declaring through `declarer`.
    pub fn new(declarer: Arc<dyn Declare>) -> Arc<Self> {
        Arc::new(Self {
            declarer,
            entries: Mutex::new(HashMap::new()),
            panic_next: AtomicBool::new(false),
            joined: watch::channel(0).0,
        })
    }

    /// Test hook: the next declaration this coordinator starts panics
    /// once the declarer has answered (so callers can pile up behind it),
    /// to prove every waiter is released and the next call retries.
    #[doc(hidden)]
    pub fn inject_panic_in_next_declaration(&self) {
        self.panic_next.store(true, Ordering::SeqCst);
    }

    /// How many callers are waiting on (or holding) the declaration of
    /// `exit_status` right now; 0 when there is no entry. For tests and
    /// benchmarks that need to know when callers have piled up.
    pub fn waiting(&self, exit_status: i32) -> usize {
        self.lock()
            .get(&exit_status)
            .map_or(0, |slot| slot.receiver_count())
    }

    /// Changes each time a caller joins a declaration; re-read
    /// [`waiting`](Self::waiting) after each change.
    pub fn joined(&self) -> watch::Receiver<u64> {
        self.joined.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i32, Slot>> {
        // Critical sections are single map operations; a poisoned lock
        // still holds a consistent map.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Declares `promise` once per exit status and tells this caller how it
    /// went: `declared` when this call led the declaration, `debounced`
    /// when it shared an earlier or concurrent one. The declaration is a
    /// task on a runtime thread of its own (see `declarer_runtime`).
    pub async fn declare(self: &Arc<Self>, promise: PromiseFailure) -> PromiseFailureResult {
        let status = promise.exit_status;
        let (mut rx, outcome) = {
            let mut entries = self.lock();
            match entries.get(&status) {
                Some(slot) => (slot.subscribe(), Outcome::Debounced),
                None => {
                    let (tx, rx) = watch::channel(None);
                    let slot = Arc::new(tx);
                    entries.insert(status, Arc::clone(&slot));
                    self.spawn_declaration(slot, promise);
                    (rx, Outcome::Declared)
                }
            }
        };
        self.joined.send_modify(|n| *n += 1);
        let declaration = match rx.wait_for(Option::is_some).await {
            Ok(done) => done.clone().unwrap_or_else(abandoned),
            // Only when the runtime dropped the task mid-flight (shutdown).
            Err(_) => abandoned(),
        };
        PromiseFailureResult::from_declaration(outcome, &declaration)
    }

    fn spawn_declaration(self: &Arc<Self>, slot: Slot, promise: PromiseFailure) {
        let this = Arc::clone(self);
        let inject_panic = self.panic_next.swap(false, Ordering::SeqCst);
        let declaration = async move {
            let declarer = Arc::clone(&this.declarer);
            let run = async {
                let declaration = declarer.declare(&promise).await;
                if inject_panic {
                    panic!("injected panic in the promise-failure declaration (test hook)");
                }
                declaration
            };
            let declaration = match AssertUnwindSafe(run).catch_unwind().await {
                Ok(d) => d,
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "no message".into());
                    tracing::error!(exit_status = promise.exit_status, panic = %what, "promise-failure declaration panicked");
                    Declaration {
                        status: Some(500),
                        error: Some(format!("declaring the promised failure panicked: {what}")),
                    }
                }
            };
            if !declaration.is_final() {
                // Evict before releasing the waiters, so a call made after
                // any of them saw the failure declares again.
                let mut entries = this.lock();
                if entries
                    .get(&promise.exit_status)
                    .is_some_and(|s| Arc::ptr_eq(s, &slot))
                {
                    entries.remove(&promise.exit_status);
                }
            }
            slot.send_replace(Some(declaration));
        };
        match declarer_runtime() {
            Some(runtime) => drop(runtime.spawn(declaration)),
            None => drop(tokio::spawn(declaration)),
        }
    }
}

/// The runtime declarations run on: one thread of its own per process.
///
/// The callers a declaration absorbs arrive as a burst of connections on
/// the job API's runtime; on that runtime the declaration's own request
/// would queue behind them, and every debounced caller waits for it. On its
/// own thread it completes in one upstream round trip, and callers arriving
/// after that are answered from the cache. `None` when the thread cannot be
/// started: declarations then run on the caller's runtime.
fn declarer_runtime() -> Option<&'static tokio::runtime::Handle> {
    static RUNTIME: std::sync::OnceLock<Option<tokio::runtime::Handle>> =
        std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| tracing::warn!(error = %e, "no declarer runtime"))
                .ok()?;
            let handle = runtime.handle().clone();
            std::thread::Builder::new()
                .name("stitch-job-declarer".into())
                // Runs for the life of the process, serving every job API.
                .spawn(move || runtime.block_on(std::future::pending::<()>()))
                .map_err(|e| tracing::warn!(error = %e, "no declarer thread"))
                .ok()?;
            Some(handle)
        })
        .as_ref()
}

fn abandoned() -> Declaration {
    Declaration {
        status: None,
        error: Some("the declaration was abandoned (the job API is shutting down)".into()),
    }
}
