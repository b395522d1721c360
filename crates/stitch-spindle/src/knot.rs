//! One event-stream client per tracked knot (`/events?cursor=<nanos>`):
//! reconnects with backoff, persists its cursor, and hands each
//! `sh.tangled.pipeline` trigger to [`crate::trigger::handle`]. Only knots
//! of the owner's and members' repos are followed, and only when their host
//! is a DNS name (any host in `dev`); knots discovered later (Jetstream)
//! are added without a restart, and a knot whose last such repo record is
//! deleted is no longer followed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::config::Backoff;
use crate::db::{knot_cursor, now_nanos};
use crate::did::check_host;
use crate::error::SpindleError;
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
    let mut backoff = Backoff::new(
        spindle.settings.reconnect_min,
        spindle.settings.reconnect_max,
    );
    let name = knot_cursor(&knot);
    loop {
        let cursor = match spindle.db.cursor(&name).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(knot, error = %e, "spindle: reading the knot cursor failed");
                None
            }
        };
        let mut url = spindle.settings.knot_events_url(&knot);
        if let Some(c) = cursor {
            url.push_str(&format!("?cursor={c}"));
        }
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio_tungstenite::connect_async(url.as_str()) => r,
        };
        match connected {
            Err(e) => tracing::warn!(knot, error = %e, "spindle: connecting to the knot failed"),
            Ok((mut socket, _)) => {
                backoff.reset();
                loop {
                    let msg = tokio::select! {
                        _ = stop.cancelled() => {
                            let _ = socket.close(None).await;
                            return;
                        }
                        m = socket.next() => m,
                    };
                    let text = match msg {
                        None | Some(Ok(Message::Close(_))) => break,
                        Some(Err(e)) => {
                            tracing::warn!(knot, error = %e, "spindle: knot stream failed");
                            break;
                        }
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(_)) => continue,
                    };
                    process_frame(&spindle, &knot, &name, text.as_str()).await;
                }
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
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
