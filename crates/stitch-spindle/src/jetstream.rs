//! The Jetstream consumer: mirrors `sh.tangled.repo`,
//! `sh.tangled.spindle.member` and `sh.tangled.repo.collaborator` records
//! into the spindle's tables. Every handler is an upsert or delete keyed on
//! (did, rkey), so the rewind on reconnect replays harmlessly.

use tokio_util::sync::CancellationToken;

use crate::config::Backoff;
use crate::db::JETSTREAM_CURSOR;
use crate::error::SpindleError;
use crate::event_stream::{self, AfterFrame, EventStream};
use crate::records::{
    CollaboratorRecord, JetstreamCommit, JetstreamFrame, MemberRecord, RepoRecord,
    COLLABORATOR_NSID, MEMBER_NSID, REPO_NSID,
};
use crate::Spindle;

/// The subscription URL: the wanted collections and, when known, the saved
/// cursor rewound by the configured amount.
pub fn subscribe_url(spindle: &Spindle, cursor: Option<i64>) -> Result<String, String> {
    let mut url =
        reqwest::Url::parse(&spindle.settings.jetstream_url).map_err(|e| e.to_string())?;
    {
        let mut q = url.query_pairs_mut();
        for c in [REPO_NSID, MEMBER_NSID, COLLABORATOR_NSID] {
            q.append_pair("wantedCollections", c);
        }
        if let Some(c) = cursor {
            let rewind =
                i64::try_from(spindle.settings.jetstream_rewind.as_micros()).unwrap_or(i64::MAX);
            q.append_pair("cursor", &c.saturating_sub(rewind).max(0).to_string());
        }
    }
    Ok(url.to_string())
}

/// Follows Jetstream until `stop`.
pub(crate) async fn run(spindle: Spindle, stop: CancellationToken) {
    let backoff = Backoff::new(
        spindle.settings.reconnect_min,
        spindle.settings.reconnect_max,
    );
    let stream = Jetstream {
        spindle,
        stop: stop.clone(),
    };
    event_stream::follow(stream, backoff, stop).await;
}

/// The Jetstream subscription as an [`EventStream`].
struct Jetstream {
    spindle: Spindle,
    stop: CancellationToken,
}

impl EventStream for Jetstream {
    fn name(&self) -> &str {
        "jetstream"
    }

    async fn url(&mut self) -> Option<String> {
        let cursor = self
            .spindle
            .db
            .cursor(JETSTREAM_CURSOR)
            .await
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "spindle: reading the jetstream cursor failed");
                None
            });
        match subscribe_url(&self.spindle, cursor) {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::error!(error = %e, "spindle: invalid jetstream URL");
                None
            }
        }
    }

    async fn frame(&mut self, text: &str) -> AfterFrame {
        let frame: JetstreamFrame = match serde_json::from_str(text) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "spindle: skipping a malformed jetstream frame");
                return AfterFrame::Next;
            }
        };
        if let Err(e) = process(&self.spindle, &frame, &self.stop).await {
            // Not saving the cursor: the frame is retried after a reconnect.
            tracing::error!(error = %e, "spindle: applying a jetstream event failed");
            return AfterFrame::Reconnect;
        }
        if let Err(e) = self
            .spindle
            .db
            .advance_cursor(JETSTREAM_CURSOR, frame.time_us)
            .await
        {
            tracing::error!(error = %e, "spindle: saving the jetstream cursor failed");
        }
        AfterFrame::Next
    }
}

/// Applies one frame. Records that do not decode are skipped with a warning.
async fn process(
    spindle: &Spindle,
    frame: &JetstreamFrame,
    stop: &CancellationToken,
) -> Result<(), SpindleError> {
    let Some(commit) = frame.commit.as_ref().filter(|_| frame.kind == "commit") else {
        return Ok(());
    };
    let did = frame.did.as_str();
    let deleted = commit.operation == "delete";
    match commit.collection.as_str() {
        REPO_NSID => {
            if deleted {
                spindle.db.delete_repo(did, &commit.rkey).await?;
                return spindle.knots.sync(spindle, stop).await;
            }
            let Some(repo) = decode::<RepoRecord>(commit) else {
                return Ok(());
            };
            if repo.spindle.as_deref() == Some(spindle.settings.hostname.as_str()) {
                spindle
                    .db
                    .upsert_repo(did, &commit.rkey, &repo.name, &repo.knot)
                    .await?;
            } else {
                // Moved to another spindle (or none): stop trusting it.
                spindle.db.delete_repo(did, &commit.rkey).await?;
            }
            spindle.knots.sync(spindle, stop).await?;
        }
        MEMBER_NSID => {
            if deleted {
                spindle.db.delete_member(did, &commit.rkey).await?;
                return spindle.knots.sync(spindle, stop).await;
            }
            let Some(member) = decode::<MemberRecord>(commit) else {
                return Ok(());
            };
            if did == spindle.settings.owner && member.instance == spindle.settings.hostname {
                spindle
                    .db
                    .upsert_member(did, &commit.rkey, &member.subject)
                    .await?;
            } else {
                tracing::info!(did, subject = %member.subject, instance = %member.instance, "spindle: ignoring a membership not granted by the owner for this instance");
                spindle.db.delete_member(did, &commit.rkey).await?;
            }
            // A new member's repos recorded earlier now count.
            spindle.knots.sync(spindle, stop).await?;
        }
        COLLABORATOR_NSID => {
            if deleted {
                return spindle.db.delete_collaborator(did, &commit.rkey).await;
            }
            if let Some(c) = decode::<CollaboratorRecord>(commit) {
                spindle
                    .db
                    .upsert_collaborator(did, &commit.rkey, &c.subject, &c.repo)
                    .await?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(commit: &JetstreamCommit) -> Option<T> {
    let record = commit.record.clone()?;
    match serde_json::from_value(record) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(collection = %commit.collection, rkey = %commit.rkey, error = %e, "spindle: skipping a malformed record");
            None
        }
    }
}
