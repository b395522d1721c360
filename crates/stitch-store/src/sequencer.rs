//! The sequencing pass of the server backends (ADR 0020): numbers the
//! events writers left in `event_pending`, one pass at a time in this
//! process, and then answers the writers that waited for their events to
//! be readable.
//!
//! A writer that appended events asks for the next pass after its commit
//! ([`Sequencer::after_next_pass`]); a pass that begins after that commit
//! has either moved the writer's events or found them moved by another
//! process's pass, so once it ends the events are in the log. Passes also
//! run every [`RECHECK`] for events whose writer died before its pass (or
//! ran in another process that died).

use std::time::Duration;

use sqlx::{MySqlPool, PgPool};
use tokio::sync::{mpsc, oneshot};

use crate::announce::{Announcer, Committed};
use crate::error::Result;
use crate::mysql::MySqlOps;
use crate::postgres::PgOps;

/// How often a pass looks for events nobody asked to number (a read of
/// `event_pending` when there are none).
const RECHECK: Duration = Duration::from_secs(1);

/// Attempts of one pass before its writers are answered without it (their
/// writes committed; their events wait for the next pass).
const ATTEMPTS: usize = 3;

/// What to do once the pass after a commit has ended.
pub(crate) type AfterPass = Box<dyn FnOnce() + Send>;

/// The pool a pass runs on.
#[derive(Clone, Debug)]
pub(crate) enum SequencerPool {
    Postgres(PgPool),
    MySql(MySqlPool),
}

/// Handle to the sequencing task of one store; the task ends when the last
/// handle is dropped.
#[derive(Clone, Debug)]
pub(crate) struct Sequencer {
    requests: mpsc::UnboundedSender<AfterPass>,
}

impl Sequencer {
    /// Starts the task on the current runtime.
    pub(crate) fn start(pool: SequencerPool, announcer: Announcer) -> Self {
        let (requests, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(pool, announcer, rx));
        Self { requests }
    }

    /// Runs `then` once a pass that began after this call has ended (at
    /// once if the task is gone: nothing numbers events any more then).
    pub(crate) fn after_next_pass(&self, then: AfterPass) {
        if let Err(unsent) = self.requests.send(then) {
            (unsent.0)();
        }
    }

    /// Waits for a pass that begins after this call to end.
    pub(crate) async fn next_pass(&self) {
        let (done, ended) = oneshot::channel();
        self.after_next_pass(Box::new(move || {
            let _ = done.send(());
        }));
        let _ = ended.await;
    }
}

async fn run(
    pool: SequencerPool,
    announcer: Announcer,
    mut rx: mpsc::UnboundedReceiver<AfterPass>,
) {
    let mut waiting: Vec<AfterPass> = Vec::new();
    loop {
        tokio::select! {
            got = rx.recv() => match got {
                Some(then) => waiting.push(then),
                None => return,
            },
            // The recheck for events nobody asked to number.
            _ = tokio::time::sleep(RECHECK) => {}
        }
        while let Ok(then) = rx.try_recv() {
            waiting.push(then);
        }
        let mut moved = 0;
        // Asked for: something was written (a pass of another process may
        // have moved it, and then finds nothing). Not asked: look first.
        let look_first = waiting.is_empty();
        for attempt in 1..=ATTEMPTS {
            match pass(&pool, look_first).await {
                Ok(n) => {
                    moved = n;
                    break;
                }
                Err(_) if pool.is_closed() => break,
                Err(e) => tracing::warn!(
                    error = %e,
                    attempt,
                    "numbering the store's new events failed; the next pass retries"
                ),
            }
        }
        // The writers that waited announce their events here, whichever
        // process's pass moved them.
        if moved > 0 || !waiting.is_empty() {
            announcer.announce(&Committed {
                events: true,
                ..Committed::default()
            });
        }
        for then in waiting.drain(..) {
            then();
        }
        if pool.is_closed() {
            return;
        }
    }
}

impl SequencerPool {
    fn is_closed(&self) -> bool {
        match self {
            SequencerPool::Postgres(pool) => pool.is_closed(),
            SequencerPool::MySql(pool) => pool.is_closed(),
        }
    }
}

/// One pass: a transaction that takes the event counter and moves what is
/// pending; with `look_first`, only a read when nothing is. Events moved.
async fn pass(pool: &SequencerPool, look_first: bool) -> Result<u64> {
    macro_rules! pass_on {
        ($pool:expr, $ops:ident) => {{
            let mut conn = $pool.acquire().await?;
            if look_first && !$ops::new(&mut conn).any_pending().await? {
                return Ok(0);
            }
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            let moved = $ops::new(&mut tx).sequence_pending().await?;
            tx.commit().await?;
            Ok(moved)
        }};
    }
    match pool {
        SequencerPool::Postgres(pool) => pass_on!(pool, PgOps),
        SequencerPool::MySql(pool) => pass_on!(pool, MySqlOps),
    }
}
