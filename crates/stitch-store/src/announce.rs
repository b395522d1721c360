//! What a committed write tells the rest of the process: the queue topics it
//! published to and whether it appended events. The store announces each of
//! its own commits to one [`CommitListener`], so no caller has to remember to
//! wake the queue's subscribers or the event streams after writing.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

/// What one committed transaction (or group commit) changed that others
/// wait for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// Queue topics messages were published to (transactional outbox).
    pub published: BTreeSet<String>,
    /// Whether events were appended to the event log.
    pub events: bool,
}

impl Committed {
    /// Nothing anyone waits for.
    pub fn is_empty(&self) -> bool {
        self.published.is_empty() && !self.events
    }

    pub(crate) fn merge(&mut self, other: Committed) {
        self.published.extend(other.published);
        self.events |= other.events;
    }
}

/// Told about every commit of the store that published or appended events,
/// right after it committed and before the writers get their answers. Runs
/// on the committing task or thread: keep it short and non-blocking.
pub trait CommitListener: Send + Sync {
    /// A transaction committed `what`.
    fn committed(&self, what: &Committed);
}

/// The listener slot every clone of a store shares; set once.
#[derive(Clone, Default)]
pub(crate) struct Announcer(Arc<OnceLock<Arc<dyn CommitListener>>>);

impl std::fmt::Debug for Announcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announcer")
            .field("listening", &self.0.get().is_some())
            .finish()
    }
}

impl Announcer {
    /// Sets the listener; false when one was set before.
    pub(crate) fn set(&self, listener: Arc<dyn CommitListener>) -> bool {
        self.0.set(listener).is_ok()
    }

    /// Tells the listener, if any, about a commit.
    pub(crate) fn announce(&self, what: &Committed) {
        if what.is_empty() {
            return;
        }
        if let Some(listener) = self.0.get() {
            listener.committed(what);
        }
    }
}
