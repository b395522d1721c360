//! One event-stream client per tracked knot (`/events?cursor=<nanos>`):
//! reconnects with backoff, persists its cursor, and hands each
//! `sh.tangled.pipeline` trigger to [`crate::trigger::handle`]. Only knots
//! of the owner's and members' repos are followed, and only when their host
//! is a DNS name (any host in `dev`); knots discovered later (Jetstream)
//! are added without a restart, and a knot whose last such repo record is
//! deleted is no longer followed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::config::Backoff;
use crate::db::{knot_cursor, now_nanos};
use crate::did::check_host;
use crate::error::SpindleError;
use crate::event_stream::{self, AfterFrame, EventStream};
use crate::records::{KnotFrame, PipelineRecord, PIPELINE_NSID};
use crate::Spindle;

/// The knots with a running client, each with the token that stops it.
#[derive(Clone, Default)]
pub struct KnotClients {
    // Touched briefly and never across an await: a std mutex is enough.
    running: Arc<Mutex<HashMap<String, CancellationToken>>>,
}

impl KnotClients {
    /// Follows exactly the knots of the owner's and the members' repos
    /// whose host names pass [`check_host`]: starts a client for each new
    /// one and stops the clients of knots no longer in that set (a deleted
    /// repo record, a membership withdrawn).
    pub(crate) async fn sync(
        &self,
        spindle: &Spindle,
        stop: &CancellationToken,
    ) -> Result<(), SpindleError> {
        let mut wanted = HashSet::new();
        for knot in spindle.db.trusted_knots(&spindle.settings.owner).await? {
            match check_host(&knot, spindle.settings.dev) {
                Ok(()) => {
                    wanted.insert(knot);
                }
                Err(why) => {
                    tracing::warn!(knot, reason = %why, "spindle: not following a knot whose host is not a DNS name")
                }
            }
        }
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.retain(|knot, client| {
            let keep = wanted.contains(knot);
            if !keep {
                tracing::info!(knot, "spindle: no longer following knot");
                client.cancel();
            }
            keep
        });
        for knot in wanted {
            if running.contains_key(&knot) {
                continue;
            }
            tracing::info!(knot, "spindle: following knot");
            let client = stop.child_token();
            running.insert(knot.clone(), client.clone());
            spindle.tasks.spawn(follow(spindle.clone(), knot, client));
        }
        Ok(())
    }

    /// The knots followed now, sorted.
    pub fn followed(&self) -> Vec<String> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mut knots: Vec<String> = running.keys().cloned().collect();
        knots.sort();
        knots
    }
}

/// Follows one knot until `stop`.
async fn follow(spindle: Spindle, knot: String, stop: CancellationToken) {
    let backoff = Backoff::new(
        spindle.settings.reconnect_min,
        spindle.settings.reconnect_max,
    );
    let cursor_name = knot_cursor(&knot);
    let stream = KnotEvents {
        spindle,
        knot,
        cursor_name,
    };
    event_stream::follow(stream, backoff, stop).await;
}

/// One knot's `/events` as an [`EventStream`].
struct KnotEvents {
    spindle: Spindle,
    knot: String,
    cursor_name: String,
}

impl EventStream for KnotEvents {
    fn name(&self) -> &str {
        &self.knot
    }

    async fn url(&mut self) -> Option<String> {
        let cursor = match self.spindle.db.cursor(&self.cursor_name).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(knot = %self.knot, error = %e, "spindle: reading the knot cursor failed");
                None
            }
        };
        let mut url = self.spindle.settings.knot_events_url(&self.knot);
        if let Some(c) = cursor {
            url.push_str(&format!("?cursor={c}"));
        }
        Some(url)
    }

    async fn frame(&mut self, text: &str) -> AfterFrame {
        process_frame(&self.spindle, &self.knot, &self.cursor_name, text).await;
        AfterFrame::Next
    }
}

/// One text frame: a malformed one is logged and skipped (it must not stop
/// the stream); the cursor moves past every frame.
async fn process_frame(spindle: &Spindle, knot: &str, cursor_name: &str, text: &str) {
    let frame: KnotFrame = match serde_json::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(knot, error = %e, "spindle: skipping a malformed knot frame");
            return;
        }
    };
    if frame.nsid == PIPELINE_NSID {
        match serde_json::from_value::<PipelineRecord>(frame.event) {
            Ok(record) => crate::trigger::handle(spindle, knot, &frame.rkey, record).await,
            Err(e) => {
                tracing::warn!(knot, rkey = %frame.rkey, error = %e, "spindle: skipping a malformed pipeline record")
            }
        }
    }
    // Knots without `created` get the old consumer's behaviour: our clock.
    let cursor = frame.created.unwrap_or_else(now_nanos);
    if let Err(e) = spindle.db.advance_cursor(cursor_name, cursor).await {
        tracing::error!(knot, error = %e, "spindle: saving the knot cursor failed");
    }
}
