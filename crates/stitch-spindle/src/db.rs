//! The spindle's durable state in the store's SQLite database (migrations
//! 3001+): cursors, tracked repos, members, collaborators, runs and the
//! `/events` log. Reads run on the pool; writes run in the store's
//! group-committed write transactions, so they share its writer lock.

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{params, OptionalExtension};
use sqlx::sqlite::SqlitePool;
use sqlx::Row;
use stitch_core::BuildId;
use stitch_store::Store;
use tokio::sync::watch;

use crate::error::SpindleError;
use crate::records::{pipeline_uri, PipelineState, PipelineStatus, STATUS_NSID};
use crate::tid::next_tid;

/// Name of the Jetstream cursor (unix microseconds).
pub const JETSTREAM_CURSOR: &str = "jetstream";
/// Name of the status translator's cursor (store event seq).
pub const STATUS_CURSOR: &str = "status_seq";

/// The cursor name of a knot's stream (unix nanoseconds).
pub fn knot_cursor(knot: &str) -> String {
    format!("knot:{knot}")
}

/// Applies the spindle's migrations (versions 3001+) to the shared
/// database; the store's and the queue's migrations are ignored.
pub async fn migrate(pool: &SqlitePool) -> Result<(), SpindleError> {
    let mut migrator = sqlx::migrate!("./migrations/sqlite");
    migrator.set_ignore_missing(true);
    migrator.run(pool).await?;
    Ok(())
}

/// One spawned workflow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    /// Knot the trigger came from.
    pub knot: String,
    /// The trigger record's rkey.
    pub rkey: String,
    /// Workflow file name.
    pub workflow: String,
    /// Owner DID of the repository.
    pub repo_did: String,
    /// Repository name.
    pub repo_name: String,
    /// The stitch build, once created.
    pub build_id: Option<BuildId>,
    /// Why it failed before a build existed.
    pub error: Option<String>,
}

/// One stored `/events` record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    /// Unix nanoseconds; the cursor.
    pub created: i64,
    /// TID.
    pub rkey: String,
    /// NSID.
    pub nsid: String,
    /// The record's JSON.
    pub event: String,
}

/// A status transition to record.
#[derive(Clone, Debug)]
pub struct StatusChange {
    /// Knot of the pipeline.
    pub knot: String,
    /// Pipeline rkey.
    pub rkey: String,
    /// Workflow name.
    pub workflow: String,
    /// The new state.
    pub state: PipelineState,
    /// Error message (failed, cancelled).
    pub error: Option<String>,
    /// Exit code (failed, cancelled).
    pub exit_code: Option<i64>,
    /// When the transition happened (the record's `createdAt`).
    pub at: DateTime<Utc>,
}

/// Handle to the spindle's tables. Cheap to clone.
#[derive(Clone)]
pub struct SpindleDb {
    store: Store,
    pool: SqlitePool,
    appended: Arc<watch::Sender<u64>>,
    /// Bumped after every committed write to the spindle's tables.
    written: Arc<watch::Sender<u64>>,
}

impl SpindleDb {
    /// Migrates and opens the spindle's tables in the store's database.
    /// The spindle runs on SQLite only:
    /// [`SpindleError::UnsupportedStorage`] on a PostgreSQL or MySQL store.
    pub async fn open(store: Store) -> Result<Self, SpindleError> {
        let pool = match store.sqlite_pool() {
            Ok(pool) => pool.clone(),
            Err(_) => return Err(SpindleError::UnsupportedStorage(store.backend())),
        };
        migrate(&pool).await?;
        let (appended, _) = watch::channel(0);
        Ok(Self {
            store,
            pool,
            appended: Arc::new(appended),
            written: Arc::new(watch::channel(0).0),
        })
    }

    /// Changes whenever status records were appended.
    pub fn appended(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }

    /// Changes after every committed write to the spindle's tables (a
    /// record applied, a cursor advanced, a run recorded): the sync point a
    /// caller waits on before re-reading, instead of re-reading on a timer.
    pub fn written(&self) -> watch::Receiver<u64> {
        self.written.subscribe()
    }

    /// Runs `write` on the store's committer, then announces it on
    /// [`written`](Self::written) once it committed.
    async fn write<F, T>(&self, write: F) -> Result<T, SpindleError>
    where
        F: FnOnce(&mut stitch_store::StoreWrite<'_>) -> Result<T, SpindleError> + Send + 'static,
        T: Send + 'static,
    {
        let done = self.store.write(write).await?;
        self.written.send_modify(|n| *n = n.wrapping_add(1));
        Ok(done)
    }

    /// A cursor's value.
    pub async fn cursor(&self, name: &str) -> Result<Option<i64>, SpindleError> {
        let row = sqlx::query("SELECT cursor FROM spindle_cursors WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get::<i64, _>(0)))
    }

    /// Sets a cursor, never moving it backwards.
    pub async fn advance_cursor(&self, name: &str, value: i64) -> Result<(), SpindleError> {
        let name = name.to_string();
        self.write(move |w| -> Result<(), SpindleError> {
            upsert_cursor(w.sqlite_handle()?, &name, value)?;
            Ok(())
        })
        .await
    }

    /// Records a repo that names this spindle (or refreshes it).
    pub async fn upsert_repo(
        &self,
        did: &str,
        rkey: &str,
        name: &str,
        knot: &str,
    ) -> Result<(), SpindleError> {
        let (did, rkey, name, knot) = (
            did.to_owned(),
            rkey.to_owned(),
            name.to_owned(),
            knot.to_owned(),
        );
        self.write(move |w| -> Result<(), SpindleError> {
                w.sqlite_handle()?.execute(
                    "INSERT INTO spindle_repos (did, rkey, name, knot) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (did, rkey) DO UPDATE SET name = excluded.name, knot = excluded.knot",
                    params![did, rkey, name, knot],
                )?;
                Ok(())
            })
            .await
    }

    /// Forgets a repo record (deleted, or moved to another spindle).
    pub async fn delete_repo(&self, did: &str, rkey: &str) -> Result<(), SpindleError> {
        self.delete_keyed("spindle_repos", did, rkey).await
    }

    /// Records a member vouched for by the owner.
    pub async fn upsert_member(
        &self,
        did: &str,
        rkey: &str,
        subject: &str,
    ) -> Result<(), SpindleError> {
        let (did, rkey, subject) = (did.to_owned(), rkey.to_owned(), subject.to_owned());
        self.write(move |w| -> Result<(), SpindleError> {
            w.sqlite_handle()?.execute(
                "INSERT INTO spindle_members (did, rkey, subject) VALUES (?1, ?2, ?3)
                     ON CONFLICT (did, rkey) DO UPDATE SET subject = excluded.subject",
                params![did, rkey, subject],
            )?;
            Ok(())
        })
        .await
    }

    /// Forgets a membership record.
    pub async fn delete_member(&self, did: &str, rkey: &str) -> Result<(), SpindleError> {
        self.delete_keyed("spindle_members", did, rkey).await
    }

    /// Records a collaborator.
    pub async fn upsert_collaborator(
        &self,
        did: &str,
        rkey: &str,
        subject: &str,
        repo: &str,
    ) -> Result<(), SpindleError> {
        let (did, rkey, subject, repo) = (
            did.to_owned(),
            rkey.to_owned(),
            subject.to_owned(),
            repo.to_owned(),
        );
        self.write(move |w| -> Result<(), SpindleError> {
                w.sqlite_handle()?.execute(
                    "INSERT INTO spindle_collaborators (did, rkey, subject, repo) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (did, rkey) DO UPDATE SET subject = excluded.subject, repo = excluded.repo",
                    params![did, rkey, subject, repo],
                )?;
                Ok(())
            })
            .await
    }

    /// Forgets a collaborator record.
    pub async fn delete_collaborator(&self, did: &str, rkey: &str) -> Result<(), SpindleError> {
        self.delete_keyed("spindle_collaborators", did, rkey).await
    }

    async fn delete_keyed(
        &self,
        table: &'static str,
        did: &str,
        rkey: &str,
    ) -> Result<(), SpindleError> {
        let (did, rkey) = (did.to_owned(), rkey.to_owned());
        self.write(move |w| -> Result<(), SpindleError> {
            w.sqlite_handle()?.execute(
                &format!("DELETE FROM {table} WHERE did = ?1 AND rkey = ?2"),
                params![did, rkey],
            )?;
            Ok(())
        })
        .await
    }

    /// Whether `(knot, did, name)` is a tracked repo naming this spindle.
    pub async fn repo_tracked(
        &self,
        knot: &str,
        did: &str,
        name: &str,
    ) -> Result<bool, SpindleError> {
        let row = sqlx::query(
            "SELECT 1 FROM spindle_repos WHERE knot = ? AND did = ? AND name = ? LIMIT 1",
        )
        .bind(knot)
        .bind(did)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// The name of the tracked repo record `(did, rkey)`.
    pub async fn repo_name(&self, did: &str, rkey: &str) -> Result<Option<String>, SpindleError> {
        let row = sqlx::query("SELECT name FROM spindle_repos WHERE did = ? AND rkey = ?")
            .bind(did)
            .bind(rkey)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get::<String, _>(0)))
    }

    /// Whether the spindle has a reason to trust `did`: it is the owner, a
    /// member, or owns a repo that names this spindle. Only such DIDs are
    /// resolved for service auth.
    pub async fn knows_did(&self, owner: &str, did: &str) -> Result<bool, SpindleError> {
        if did == owner {
            return Ok(true);
        }
        let row = sqlx::query(
            "SELECT 1 FROM spindle_members WHERE subject = ?1
             UNION ALL SELECT 1 FROM spindle_repos WHERE did = ?1 LIMIT 1",
        )
        .bind(did)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// Knots of the repos of the owner and the members: the only knots the
    /// spindle follows.
    pub async fn trusted_knots(&self, owner: &str) -> Result<Vec<String>, SpindleError> {
        let rows = sqlx::query(
            "SELECT DISTINCT knot FROM spindle_repos
             WHERE did = ?1 OR did IN (SELECT subject FROM spindle_members)
             ORDER BY knot",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| r.get::<String, _>(0)).collect())
    }

    /// Whether the owner vouched for `subject`.
    pub async fn is_member(&self, subject: &str) -> Result<bool, SpindleError> {
        let row = sqlx::query("SELECT 1 FROM spindle_members WHERE subject = ? LIMIT 1")
            .bind(subject)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// The run of `(knot, rkey, workflow)`.
    pub async fn run(
        &self,
        knot: &str,
        rkey: &str,
        workflow: &str,
    ) -> Result<Option<Run>, SpindleError> {
        let rows = self
            .runs_where(
                "knot = ? AND rkey = ? AND workflow = ?",
                &[knot, rkey, workflow],
            )
            .await?;
        Ok(rows.into_iter().next())
    }

    /// The runs of pipeline `rkey` and `workflow` on any knot (for a cancel
    /// that names the pipeline by its bare TID).
    pub async fn runs_by_rkey(&self, rkey: &str, workflow: &str) -> Result<Vec<Run>, SpindleError> {
        self.runs_where("rkey = ? AND workflow = ?", &[rkey, workflow])
            .await
    }

    async fn runs_where(&self, filter: &str, args: &[&str]) -> Result<Vec<Run>, SpindleError> {
        let sql = format!(
            "SELECT knot, rkey, workflow, repo_did, repo_name, build_id, error FROM spindle_runs WHERE {filter}"
        );
        let mut q = sqlx::query(&sql);
        for a in args {
            q = q.bind(*a);
        }
        let rows = q.fetch_all(&self.pool).await?;
        Ok(rows
            .into_iter()
            .map(|r| Run {
                knot: r.get(0),
                rkey: r.get(1),
                workflow: r.get(2),
                repo_did: r.get(3),
                repo_name: r.get(4),
                build_id: r
                    .get::<Option<String>, _>(5)
                    .and_then(|s| s.parse::<BuildId>().ok()),
                error: r.get(6),
            })
            .collect())
    }

    /// Claims `(knot, rkey, workflow)` for a spawn: true when this call
    /// created the row, or the row exists without a build or error (a spawn
    /// interrupted by a restart, to finish idempotently).
    pub async fn claim_run(&self, run: &Run, queue: &str) -> Result<bool, SpindleError> {
        let run = run.clone();
        let queue = queue.to_string();
        self.write(move |w| -> Result<bool, SpindleError> {
            let conn = w.sqlite_handle()?;
            let inserted = conn.execute(
                "INSERT OR IGNORE INTO spindle_runs
                       (knot, rkey, workflow, repo_did, repo_name, queue, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    run.knot,
                    run.rkey,
                    run.workflow,
                    run.repo_did,
                    run.repo_name,
                    queue,
                    now_nanos()
                ],
            )?;
            if inserted == 1 {
                return Ok(true);
            }
            let unfinished: Option<i64> = conn
                .query_row(
                    "SELECT 1 FROM spindle_runs WHERE knot = ?1 AND rkey = ?2 AND workflow = ?3
                           AND build_id IS NULL AND error IS NULL",
                    params![run.knot, run.rkey, run.workflow],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(unfinished.is_some())
        })
        .await
    }

    /// Records the build a run became.
    pub async fn set_run_build(&self, run: &Run, build: &BuildId) -> Result<(), SpindleError> {
        let run = run.clone();
        let build = build.to_string();
        self.write(move |w| -> Result<(), SpindleError> {
                w.sqlite_handle()?.execute(
                    "UPDATE spindle_runs SET build_id = ?4 WHERE knot = ?1 AND rkey = ?2 AND workflow = ?3",
                    params![run.knot, run.rkey, run.workflow, build],
                )?;
                Ok(())
            })
            .await
    }

    /// Fails a run that never got a build: records the error and appends a
    /// `failed` status (exit code -1), once. False when the run already had
    /// a build or an error (a replay).
    pub async fn fail_run(&self, run: &Run, error: &str) -> Result<bool, SpindleError> {
        let run = run.clone();
        let error = error.to_string();
        let appended = self.write(move |w| -> Result<bool, SpindleError> {
                let conn = w.sqlite_handle()?;
                conn.execute(
                    "INSERT OR IGNORE INTO spindle_runs
                       (knot, rkey, workflow, repo_did, repo_name, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![run.knot, run.rkey, run.workflow, run.repo_did, run.repo_name, now_nanos()],
                )?;
                let changed = conn.execute(
                    "UPDATE spindle_runs SET error = ?4
                     WHERE knot = ?1 AND rkey = ?2 AND workflow = ?3 AND build_id IS NULL AND error IS NULL",
                    params![run.knot, run.rkey, run.workflow, error],
                )?;
                if changed == 0 {
                    return Ok(false);
                }
                let change = StatusChange {
                    knot: run.knot,
                    rkey: run.rkey,
                    workflow: run.workflow,
                    state: PipelineState::Failed,
                    error: Some(error),
                    exit_code: Some(-1),
                    at: Utc::now(),
                };
                append_status(conn, &change)?;
                Ok(true)
            })
            .await?;
        if appended {
            self.notify();
        }
        Ok(appended)
    }

    /// Appends the status change of a build's run unless the run's last
    /// status already is that state, and moves the translator's cursor to
    /// `seq`, in one transaction. True when a record was appended.
    pub async fn record_build_status(
        &self,
        change: StatusChange,
        seq: u64,
    ) -> Result<bool, SpindleError> {
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        let appended = self.write(move |w| -> Result<bool, SpindleError> {
                let conn = w.sqlite_handle()?;
                let last: Option<Option<String>> = conn
                    .query_row(
                        "SELECT last_status FROM spindle_runs WHERE knot = ?1 AND rkey = ?2 AND workflow = ?3",
                        params![change.knot, change.rkey, change.workflow],
                        |r| r.get(0),
                    )
                    .optional()?;
                let fresh = match last {
                    // A build carrying spindle metadata without a run row was
                    // not spawned by this spindle: nothing to report.
                    None => false,
                    Some(last) => last.as_deref() != Some(change.state.as_str()),
                };
                if fresh {
                    append_status(conn, &change)?;
                }
                upsert_cursor(conn, STATUS_CURSOR, seq)?;
                Ok(fresh)
            })
            .await?;
        if appended {
            self.notify();
        }
        Ok(appended)
    }

    /// Up to `limit` records with `created > after`, oldest first.
    pub async fn events_after(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, SpindleError> {
        let rows = sqlx::query(
            "SELECT created, rkey, nsid, event FROM spindle_events WHERE created > ? ORDER BY created LIMIT ?",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| StoredEvent {
                created: r.get(0),
                rkey: r.get(1),
                nsid: r.get(2),
                event: r.get(3),
            })
            .collect())
    }

    /// The newest status record of a workflow.
    pub async fn latest_status(
        &self,
        knot: &str,
        rkey: &str,
        workflow: &str,
    ) -> Result<Option<PipelineStatus>, SpindleError> {
        let row = sqlx::query(
            "SELECT event FROM spindle_events
             WHERE json_extract(event, '$.pipeline') = ? AND json_extract(event, '$.workflow') = ?
             ORDER BY created DESC LIMIT 1",
        )
        .bind(pipeline_uri(knot, rkey))
        .bind(workflow)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            None => Ok(None),
            Some(r) => Ok(Some(serde_json::from_str(&r.get::<String, _>(0))?)),
        }
    }

    fn notify(&self) {
        self.appended.send_modify(|n| *n = n.wrapping_add(1));
    }
}

fn upsert_cursor(conn: &rusqlite::Connection, name: &str, value: i64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO spindle_cursors (name, cursor) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET cursor = max(cursor, excluded.cursor)",
        params![name, value],
    )?;
    Ok(())
}

/// Appends one status record with a fresh TID and a `created` strictly
/// greater than every earlier record's (the `/events` cursor), and notes it
/// as the run's last status.
fn append_status(conn: &rusqlite::Connection, change: &StatusChange) -> Result<(), SpindleError> {
    let last: i64 = conn.query_row(
        "SELECT COALESCE(MAX(created), 0) FROM spindle_events",
        [],
        |r| r.get(0),
    )?;
    let created = now_nanos().max(last.saturating_add(1));
    let record = PipelineStatus {
        type_: String::new(),
        pipeline: pipeline_uri(&change.knot, &change.rkey),
        workflow: change.workflow.clone(),
        status: change.state,
        created_at: change.at.to_rfc3339_opts(SecondsFormat::Secs, true),
        error: change.error.clone(),
        exit_code: change.exit_code,
    };
    let json = serde_json::to_string(&record)?;
    conn.execute(
        "INSERT INTO spindle_events (created, rkey, nsid, event) VALUES (?1, ?2, ?3, ?4)",
        params![created, next_tid(), STATUS_NSID, json],
    )?;
    conn.execute(
        "UPDATE spindle_runs SET last_status = ?4 WHERE knot = ?1 AND rkey = ?2 AND workflow = ?3",
        params![
            change.knot,
            change.rkey,
            change.workflow,
            change.state.as_str()
        ],
    )?;
    Ok(())
}

/// Wall-clock unix nanoseconds.
pub fn now_nanos() -> i64 {
    Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}
