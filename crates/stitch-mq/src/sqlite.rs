//! SQLite backend: the embedded default.
//!
//! WAL mode, a busy timeout, and `BEGIN IMMEDIATE` write transactions
//! serialized by an in-process writer lock, so concurrent use in one process
//! never meets "database is locked" and several processes on one file wait
//! for each other instead of failing.
//!
//! Transactions are opened and committed through the shared `sqlx` pool (so
//! the build store and the queue can write in one transaction), but the
//! statements of a queue operation run synchronously on the connection's raw
//! handle through `rusqlite`: one hand-off to the connection per operation
//! instead of one per statement, which is what makes the queue's throughput
//! a multiple of the plain per-statement figure (see ADR 0001).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};
use sqlx::sqlite::{
    SqliteAutoVacuum, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::SqlitePool;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::clock::Clock;
use crate::codec::{decode_detail, decode_meta, encode_meta};
use crate::driver::*;
use crate::error::{MqError, MqResult};
use crate::message::{Failure, Message, Millis};
use crate::raw_sqlite::RawSqlite;
use crate::window::{exhausted_failure, plan_window, RowState, WindowLimits, WindowRow};

/// Rows read past a window, to skip finished rows the cursor has not passed yet.
const SCAN_LIMIT_EXTRA: i64 = 16;
/// How often the background checkpointer runs.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// Rows (messages, then partitions) deleted per garbage-collection
/// transaction: small, like the retention pass's batches, so publishers and
/// consumers never wait long behind the collector.
const GC_CHUNK: i64 = 500;

/// Connection settings used for every stitch SQLite database.
pub fn connect_options(path: &Path) -> SqliteConnectOptions {
    tune(SqliteConnectOptions::new().filename(path))
}

/// WAL (readers never block the writer), `synchronous = NORMAL` (durable
/// at checkpoints, never corrupt), a 30 s busy timeout for other processes,
/// a page cache plus memory map large enough that hot queue pages are not
/// re-read with a system call per page, and checkpoints every ~40 MB of WAL
/// instead of every 4 MB (hot pages are copied back once per checkpoint).
fn tune(opts: SqliteConnectOptions) -> SqliteConnectOptions {
    opts.create_if_missing(true)
        // Takes effect only on a file without tables (a new database), so
        // retention's freed pages can be handed back with
        // `PRAGMA incremental_vacuum`; an older file keeps `NONE` (see
        // docs/operations.md for the one-time VACUUM that converts it).
        .auto_vacuum(SqliteAutoVacuum::Incremental)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(30))
        .foreign_keys(true)
        .pragma("cache_size", "-65536")
        .pragma("mmap_size", "268435456")
        .pragma("temp_store", "memory")
        // A safety net: the driver's background checkpointer keeps the WAL
        // well below this, so commits rarely pay for a checkpoint.
        .pragma("wal_autocheckpoint", "10000")
}

/// Opens (creating if needed) a pool on a SQLite file with stitch's settings.
/// The file is private to stitch's user (mode 0600, and SQLite gives its
/// `-wal` and `-shm` files the same mode): it holds job-token keys and
/// every build's record.
pub async fn open_pool(path: &Path) -> MqResult<SqlitePool> {
    make_private(path).map_err(sqlx::Error::Io)?;
    Ok(SqlitePoolOptions::new()
        .max_connections(4)
        // A ping on every acquire is a round trip to the connection's
        // worker thread and proves nothing for a local file.
        .test_before_acquire(false)
        .connect_with(connect_options(path))
        .await?)
}

/// Creates the database file with mode 0600 when it is missing, and takes
/// group and other permissions away from an existing one.
fn make_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    let mode = file.metadata()?.permissions().mode();
    if mode & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o700))?;
    }
    Ok(())
}

/// Applies the queue's migrations (versions 1001+). Other stitch
/// components keep their own versions in the same migrations table.
pub async fn migrate(pool: &SqlitePool) -> MqResult<()> {
    let mut migrator = sqlx::migrate!("./migrations/sqlite");
    migrator.set_ignore_missing(true);
    migrator.run(pool).await?;
    Ok(())
}

/// The SQLite driver.
#[derive(Clone)]
pub struct SqliteDriver {
    pool: SqlitePool,
    /// One writer at a time inside this process: SQLite has one write lock
    /// anyway, and waiting here is cheaper than its busy-handler sleeps.
    writer: Arc<tokio::sync::Mutex<()>>,
    /// Stops the background checkpointer when the last clone is dropped.
    _checkpointer: Arc<DropGuard>,
    /// Holds every wait on sqlx's worker thread ([`Clock::hold`]), so the
    /// driver runs on Tokio's paused clock too.
    clock: Clock,
}

impl SqliteDriver {
    /// Opens `path`, applies migrations.
    pub async fn open(path: &Path) -> MqResult<Self> {
        Self::from_pool(open_pool(path).await?).await
    }

    /// Uses an existing pool (shared with the build store); applies
    /// migrations and starts the background checkpointer.
    pub async fn from_pool(pool: SqlitePool) -> MqResult<Self> {
        Self::from_pool_on(pool, Clock::System).await
    }

    /// [`Self::from_pool`] for queues on `clock`: with [`Clock::Tokio`]
    /// every wait on sqlx's worker thread holds paused time still
    /// ([`Clock::hold`]), so the queue's timing runs on a paused runtime
    /// (tests). Each such wait then also costs a blocking-pool hand-off.
    pub async fn from_pool_on(pool: SqlitePool, clock: Clock) -> MqResult<Self> {
        clock.hold(migrate(&pool)).await?;
        let stop = CancellationToken::new();
        tokio::spawn(checkpointer(pool.clone(), clock.clone(), stop.clone()));
        Ok(Self {
            pool,
            writer: Arc::new(tokio::sync::Mutex::new(())),
            _checkpointer: Arc::new(stop.drop_guard()),
            clock,
        })
    }

    /// The in-process writer lock; give it to other writers of the same
    /// database (the build store) so writes queue here, not in SQLite.
    pub fn writer_lock(&self) -> Arc<tokio::sync::Mutex<()>> {
        self.writer.clone()
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Runs `f` in one write transaction and commits it.
    ///
    /// The transaction runs in its own task: a caller that is cancelled (a
    /// subscription killed mid-claim) cannot leave a half-finished
    /// transaction or a connection locked away from its worker; the write
    /// either completes or never starts.
    async fn write<T, F>(&self, f: F) -> MqResult<T>
    where
        F: FnOnce(&rusqlite::Connection) -> MqResult<T> + Send + 'static,
        T: Send + 'static,
    {
        let this = self.clone();
        tokio::spawn(async move {
            let _guard = this.writer.clone().lock_owned().await;
            let mut conn = this
                .clock
                .hold(RawSqlite::acquire::<MqError>(&this.pool))
                .await?;
            // BEGIN, the statements and COMMIT all run on the raw handle: one
            // hand-off to sqlx's worker for the whole transaction, which runs
            // under the writer lock (every hand-off inside it is time no other
            // writer can use). In-process writers queue on the lock above, so
            // BEGIN IMMEDIATE only ever waits on another process's writer.
            let c = conn.handle();
            c.execute_batch("BEGIN IMMEDIATE")?;
            // A panic in `f` must not send the connection back to the pool
            // inside an open write transaction: roll back first.
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(c)));
            let out = match out {
                Ok(out) => out.and_then(|out| {
                    c.execute_batch("COMMIT")?;
                    Ok(out)
                }),
                Err(panic) => {
                    let _ = c.execute_batch("ROLLBACK");
                    std::panic::resume_unwind(panic);
                }
            };
            if !c.is_autocommit() {
                let _ = c.execute_batch("ROLLBACK");
            }
            if !conn.handle().is_autocommit() {
                conn.close_on_drop();
            }
            out
        })
        .await
        .map_err(|e| MqError::Internal(format!("queue write task failed: {e}")))?
    }

    /// Runs `f` on a pooled connection outside any write transaction (in its
    /// own task, for the same reason as [`Self::write`]).
    async fn read<T, F>(&self, f: F) -> MqResult<T>
    where
        F: FnOnce(&rusqlite::Connection) -> MqResult<T> + Send + 'static,
        T: Send + 'static,
    {
        let (pool, clock) = (self.pool.clone(), self.clock.clone());
        tokio::spawn(async move {
            let conn = clock.hold(RawSqlite::acquire::<MqError>(&pool)).await?;
            f(conn.handle())
        })
        .await
        .map_err(|e| MqError::Internal(format!("queue read task failed: {e}")))?
    }

    /// Publishes inside the caller's transaction, which it runs on the raw
    /// SQLite connection (the store's write transactions): nothing is
    /// visible until it commits, and a rollback publishes nothing.
    /// Synchronous, no hand-off to sqlx's worker thread. Validate messages
    /// first with `Publisher::prepare`.
    pub fn publish_on_handle(
        conn: &rusqlite::Connection,
        topic: &str,
        msgs: &[NewMessage],
        now: Millis,
    ) -> MqResult<PublishReport> {
        publish_sync(conn, topic, msgs, now)
    }

    /// Deletes the stored messages of `topic` in the partitions `keys` that
    /// every group is done with, in the caller's transaction (the store's
    /// retention deletes a build's messages with the build); returns how
    /// many. Their ids no longer deduplicate a republish: the caller owns
    /// those partitions and knows nothing publishes to them again. Messages
    /// still pending stay. The partitions' emptied rows go with the next
    /// [`Admin::gc`](crate::Admin::gc).
    pub fn forget_partitions_on_handle(
        conn: &rusqlite::Connection,
        topic: &str,
        keys: &[String],
    ) -> MqResult<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        let in_keys = vec!["?"; keys.len()].join(", ");
        let sql = format!(
            "DELETE FROM mq_messages WHERE seq IN (SELECT m.seq FROM mq_messages m \
             WHERE m.topic = ? AND m.partition_key IN ({in_keys}) \
             AND m.seq <= (SELECT MIN(p.cursor) FROM mq_partitions p WHERE p.topic = m.topic \
             AND p.partition_key = m.partition_key))"
        );
        let args: Vec<&dyn rusqlite::ToSql> = std::iter::once(&topic as &dyn rusqlite::ToSql)
            .chain(keys.iter().map(|k| k as &dyn rusqlite::ToSql))
            .collect();
        Ok(conn.execute(&sql, args.as_slice())? as u64)
    }
}

/// Copies committed WAL pages back into the database file off the commit
/// path: a PASSIVE checkpoint runs beside writers and readers without
/// blocking them. Ends when the pool closes.
async fn checkpointer(pool: SqlitePool, clock: Clock, stop: CancellationToken) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if pool.is_closed() {
            return;
        }
        let checkpoint = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool);
        if let Err(e) = clock.hold(checkpoint).await {
            if pool.is_closed() {
                return;
            }
            tracing::debug!(error = %e, "background WAL checkpoint failed; the next one retries");
        }
    }
}

fn publish_sync(
    c: &rusqlite::Connection,
    topic: &str,
    msgs: &[NewMessage],
    now: Millis,
) -> MqResult<PublishReport> {
    let groups: Vec<String> = c
        .prepare_cached("SELECT grp FROM mq_groups WHERE topic = ?1")?
        .query_map([topic], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut insert = c.prepare_cached(
        "INSERT INTO mq_messages (topic, partition_key, msg_id, payload, metadata, published_at, available_at, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?6) ON CONFLICT (topic, partition_key, msg_id) DO NOTHING",
    )?;
    let mut report = PublishReport::default();
    let mut due: BTreeMap<&str, Millis> = BTreeMap::new();
    for m in msgs {
        let n = insert.execute(params![
            topic,
            m.message.partition_key,
            m.message.id,
            m.message.payload,
            encode_meta(&m.message.metadata),
            now,
            m.available_at
        ])?;
        if n == 1 {
            report.stored += 1;
            let e = due
                .entry(m.message.partition_key.as_str())
                .or_insert(m.available_at);
            *e = (*e).min(m.available_at);
        } else {
            report.duplicates += 1;
        }
    }
    let mut upsert = c.prepare_cached(
        "INSERT INTO mq_partitions (topic, grp, partition_key, cursor, next_due, lease_expires) VALUES (?1, ?2, ?3, 0, ?4, 0) \
         ON CONFLICT (topic, grp, partition_key) DO UPDATE SET next_due = excluded.next_due \
         WHERE mq_partitions.next_due IS NULL OR mq_partitions.next_due > excluded.next_due",
    )?;
    for g in &groups {
        for (p, at) in &due {
            upsert.execute(params![topic, g, p, at])?;
        }
    }
    Ok(report)
}

/// Lowers a partition's `next_due` to `at` (never raises it; a row already
/// due that early is not rewritten, which keeps commits small).
fn bump_due(
    c: &rusqlite::Connection,
    topic: &str,
    group: &str,
    partition: &str,
    at: Millis,
) -> MqResult<()> {
    c.prepare_cached(
        "UPDATE mq_partitions SET next_due = ?1 \
         WHERE topic = ?2 AND grp = ?3 AND partition_key = ?4 AND (next_due IS NULL OR next_due > ?1)",
    )?
    .execute(params![at, topic, group, partition])?;
    Ok(())
}

/// Copies a stored message into the dead letters (re-dead-lettering the same
/// id refreshes the failure instead of failing).
fn insert_dead_letter(
    c: &rusqlite::Connection,
    topic: &str,
    group: &str,
    seq: i64,
    attempts: u32,
    failure: &Failure,
    now: Millis,
) -> MqResult<()> {
    let detail = if failure.detail.is_null() {
        None
    } else {
        Some(failure.detail.to_string())
    };
    c.prepare_cached(
        "INSERT INTO mq_dead_letters (topic, grp, partition_key, msg_id, payload, metadata, failure_message, \
         failure_detail, attempts, published_at, failed_at) \
         SELECT topic, ?1, partition_key, msg_id, payload, metadata, ?2, ?3, ?4, published_at, ?5 \
         FROM mq_messages WHERE seq = ?6 AND topic = ?7 \
         ON CONFLICT (topic, grp, partition_key, msg_id) DO UPDATE SET \
         payload = excluded.payload, metadata = excluded.metadata, failure_message = excluded.failure_message, \
         failure_detail = excluded.failure_detail, attempts = excluded.attempts, \
         published_at = excluded.published_at, failed_at = excluded.failed_at",
    )?
    .execute(params![group, failure.message, detail, attempts as i64, now, seq, topic])?;
    Ok(())
}

fn register_group_sync(
    c: &rusqlite::Connection,
    topic: &str,
    group: &str,
    now: Millis,
) -> MqResult<()> {
    let added = c.execute(
        "INSERT INTO mq_groups (topic, grp, created_at) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        params![topic, group, now],
    )?;
    if added == 1 {
        c.execute(
            "INSERT INTO mq_partitions (topic, grp, partition_key, cursor, next_due, lease_expires) \
             SELECT topic, ?1, partition_key, 0, MIN(available_at), 0 FROM mq_messages WHERE topic = ?2 \
             GROUP BY partition_key ON CONFLICT (topic, grp, partition_key) DO NOTHING",
            params![group, topic],
        )?;
    }
    Ok(())
}

fn lease_tick_sync(c: &rusqlite::Connection, t: &LeaseTick) -> MqResult<LeaseReport> {
    c.prepare_cached(
        "INSERT INTO mq_subscribers (topic, grp, subscriber, heartbeat_at) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (topic, grp, subscriber) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
    )?
    .execute(params![t.topic, t.group, t.subscriber, t.now])?;
    let active: Vec<String> = c
        .prepare_cached(
            "SELECT subscriber FROM mq_subscribers WHERE topic = ?1 AND grp = ?2 AND heartbeat_at > ?3 ORDER BY subscriber",
        )?
        .query_map(params![t.topic, t.group, t.now - t.lease_ms], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let busy: i64 = c
        .prepare_cached(
            "SELECT COUNT(*) FROM mq_partitions WHERE topic = ?1 AND grp = ?2 \
         AND (next_due IS NOT NULL OR (lease_owner IS NOT NULL AND lease_expires > ?3))",
        )?
        .query_row(params![t.topic, t.group, t.now], |r| r.get(0))?;
    let cap = fair_share_cap(busy as usize, &active, &t.subscriber);
    // Idle partitions give their lease back; the rest are renewed.
    c.prepare_cached(
        "UPDATE mq_partitions SET lease_owner = NULL, lease_expires = 0 \
         WHERE topic = ?1 AND grp = ?2 AND lease_owner = ?3 AND next_due IS NULL",
    )?
    .execute(params![t.topic, t.group, t.subscriber])?;
    c.prepare_cached("UPDATE mq_partitions SET lease_expires = ?1 WHERE topic = ?2 AND grp = ?3 AND lease_owner = ?4")?
        .execute(params![t.now + t.lease_ms, t.topic, t.group, t.subscriber])?;
    let mine: Vec<String> = c
        .prepare_cached(
            "SELECT partition_key FROM mq_partitions WHERE topic = ?1 AND grp = ?2 AND lease_owner = ?3 ORDER BY partition_key",
        )?
        .query_map(params![t.topic, t.group, t.subscriber], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if mine.len() > cap {
        let mut release = c.prepare_cached(
            "UPDATE mq_partitions SET lease_owner = NULL, lease_expires = 0 \
             WHERE topic = ?1 AND grp = ?2 AND partition_key = ?3 AND lease_owner = ?4",
        )?;
        for p in &mine[cap..] {
            release.execute(params![t.topic, t.group, p, t.subscriber])?;
        }
    }
    if mine.len() < cap {
        // Dead owners' partitions whose only pending work may be their
        // in-flight deliveries: due now, so a claim takes them over.
        c.prepare_cached(
            "UPDATE mq_partitions SET next_due = ?1 WHERE topic = ?2 AND grp = ?3 \
             AND lease_owner IS NOT NULL AND lease_expires <= ?1 AND next_due > ?1 \
             AND lease_owner NOT IN (SELECT subscriber FROM mq_subscribers \
             WHERE topic = ?2 AND grp = ?3 AND heartbeat_at > ?4)",
        )?
        .execute(params![t.now, t.topic, t.group, t.now - t.lease_ms])?;
    }
    // Delivery state at or below a cursor is never read again; claims leave
    // it behind so they stay cheap, and it is swept here.
    c.prepare_cached(
        "DELETE FROM mq_state WHERE grp = ?1 AND topic = ?2 AND seq <= (SELECT p.cursor FROM mq_partitions p \
         WHERE p.topic = mq_state.topic AND p.grp = mq_state.grp AND p.partition_key = mq_state.partition_key)",
    )?
    .execute(params![t.group, t.topic])?;
    Ok(LeaseReport {
        cap,
        owned: mine.len().min(cap),
        active_subscribers: active.len().max(1),
    })
}

/// A stored message's id, payload, metadata JSON and publish time.
type StoredBody = (String, Vec<u8>, Option<String>, Millis);

fn claim_sync(c: &rusqlite::Connection, req: &ClaimRequest) -> MqResult<ClaimResult> {
    let now = req.now;
    let due: Vec<(String, i64, Option<String>, i64)> = c
        .prepare_cached(
            "SELECT partition_key, cursor, lease_owner, lease_expires FROM mq_partitions \
             WHERE topic = ?1 AND grp = ?2 AND next_due <= ?3 \
             AND (lease_owner = ?4 OR lease_owner IS NULL OR lease_expires <= ?3) \
             ORDER BY next_due LIMIT ?5",
        )?
        .query_map(
            params![
                req.topic,
                req.group,
                now,
                req.subscriber,
                (req.max_messages + 16) as i64
            ],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?
        .collect::<Result<_, _>>()?;

    let mut result = ClaimResult::default();
    let mut may_acquire = req.may_acquire;
    let scan = req.batch_size as i64 + SCAN_LIMIT_EXTRA;
    // Bodies come with the window: a window is a handful of rows, and one
    // statement per partition beats a second lookup per delivered message.
    let mut window_q = c.prepare_cached(
        "SELECT m.seq, m.available_at, s.attempt, s.invisible_until, s.postponed, s.done, \
         m.msg_id, m.payload, m.metadata, m.published_at \
         FROM mq_messages m LEFT JOIN mq_state s ON s.grp = ?1 AND s.seq = m.seq \
         WHERE m.topic = ?2 AND m.partition_key = ?3 AND m.seq > ?4 ORDER BY m.seq LIMIT ?5",
    )?;
    let mut state_q = c.prepare_cached(
        "INSERT INTO mq_state (grp, seq, topic, partition_key, attempt, invisible_until, postponed, done, claimed, token, woken) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, 0, 1, ?7, 0) \
         ON CONFLICT (grp, seq) DO UPDATE SET attempt = excluded.attempt, \
         invisible_until = excluded.invisible_until, postponed = 0, done = 0, claimed = 1, token = excluded.token, woken = 0",
    )?;
    let mut part_q = c.prepare_cached(
        "UPDATE mq_partitions SET cursor = ?1, next_due = ?2, lease_owner = ?3, lease_expires = ?4 \
         WHERE topic = ?5 AND grp = ?6 AND partition_key = ?7",
    )?;
    let mut alive_q = c.prepare_cached(
        "SELECT 1 FROM mq_subscribers WHERE topic = ?1 AND grp = ?2 AND subscriber = ?3 AND heartbeat_at > ?4",
    )?;
    let mut release_q = c.prepare_cached(
        "UPDATE mq_state SET invisible_until = ?1 WHERE grp = ?2 AND claimed = 1 AND done = 0 \
         AND invisible_until > ?1 AND seq IN (SELECT seq FROM mq_messages \
         WHERE topic = ?3 AND partition_key = ?4 AND seq > ?5)",
    )?;
    let until = now + req.visibility_ms;
    for (partition, cursor, owner, expires) in due {
        if result.messages.len() >= req.max_messages {
            break;
        }
        let owned = owner.as_deref() == Some(req.subscriber.as_str()) && expires > now;
        if !owned {
            if may_acquire == 0 {
                continue;
            }
            may_acquire -= 1;
            result.acquired += 1;
            if let Some(prev) = owner.as_deref().filter(|o| *o != req.subscriber) {
                let alive =
                    alive_q.exists(params![req.topic, req.group, prev, now - req.lease_ms])?;
                if !alive {
                    result.taken_over +=
                        release_q.execute(params![now, req.group, req.topic, partition, cursor])?;
                }
            }
        }
        let mut rows: Vec<(WindowRow, StoredBody)> = window_q
            .query_map(
                params![req.group, req.topic, partition, cursor, scan + 1],
                |r| {
                    let attempt: Option<i64> = r.get(2)?;
                    let state = match attempt {
                        Some(a) => Some(RowState {
                            attempt: a as u32,
                            invisible_until: r.get(3)?,
                            postponed: r.get::<_, i64>(4)? != 0,
                            done: r.get::<_, i64>(5)? != 0,
                        }),
                        None => None,
                    };
                    Ok((
                        WindowRow {
                            seq: r.get(0)?,
                            available_at: r.get(1)?,
                            state,
                        },
                        (r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?),
                    ))
                },
            )?
            .collect::<Result<_, _>>()?;
        let truncated = rows.len() as i64 > scan;
        rows.truncate(scan as usize);
        let window: Vec<WindowRow> = rows.iter().map(|r| r.0).collect();
        let plan = plan_window(
            cursor,
            &window,
            truncated,
            WindowLimits::for_claim(req, result.messages.len()),
        );
        for (seq, attempts) in &plan.exhausted {
            let failure = exhausted_failure(*attempts);
            insert_dead_letter(c, &req.topic, &req.group, *seq, *attempts, &failure, now)?;
            c.prepare_cached("UPDATE mq_state SET done = 1 WHERE grp = ?1 AND seq = ?2")?
                .execute(params![req.group, seq])?;
            result.dead_lettered += 1;
        }
        let mut bodies: HashMap<i64, StoredBody> =
            rows.into_iter().map(|(w, body)| (w.seq, body)).collect();
        for (seq, attempt) in &plan.deliver {
            let Some((id, payload, metadata, published_at)) = bodies.remove(seq) else {
                continue;
            };
            let token = rand::random::<i64>() & i64::MAX;
            state_q.execute(params![
                req.group,
                seq,
                req.topic,
                partition,
                *attempt as i64,
                until,
                token
            ])?;
            result.messages.push(ClaimedMessage {
                seq: *seq,
                message: Message {
                    id,
                    partition_key: partition.clone(),
                    payload,
                    metadata: decode_meta(metadata)?,
                },
                published_at,
                attempt: *attempt,
                token,
            });
        }
        let lease_until = if owned { expires } else { now + req.lease_ms };
        part_q.execute(params![
            plan.cursor,
            plan.next_due,
            req.subscriber,
            lease_until,
            req.topic,
            req.group,
            partition
        ])?;
    }
    let (held_due, any_due): (Option<Millis>, Option<Millis>) = c
        .prepare_cached(
            "SELECT \
               (SELECT next_due FROM mq_partitions WHERE topic = ?1 AND grp = ?2 AND next_due IS NOT NULL \
                AND lease_owner = ?3 AND lease_expires > ?4 ORDER BY next_due LIMIT 1), \
               (SELECT next_due FROM mq_partitions WHERE topic = ?1 AND grp = ?2 AND next_due IS NOT NULL \
                AND (lease_owner = ?3 OR lease_owner IS NULL OR lease_expires <= ?4) ORDER BY next_due LIMIT 1)",
        )?
        .query_row(params![req.topic, req.group, req.subscriber, now], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    (result.next_due, result.share_spent) = claim_due(now, may_acquire, held_due, any_due);
    Ok(result)
}

fn apply_sync(
    c: &rusqlite::Connection,
    outcomes: &[Outcome],
    now: Millis,
) -> MqResult<Vec<MqResult<()>>> {
    let mut results: Vec<MqResult<()>> = Vec::with_capacity(outcomes.len());
    let mut due: HashMap<(&str, &str, &str), Millis> = HashMap::new();
    const GUARD: &str = " WHERE grp = ?1 AND seq = ?2 AND token = ?3 AND done = 0";
    for o in outcomes {
        let (sql, extra, due_at): (String, Option<i64>, Option<Millis>) = match &o.kind {
            OutcomeKind::Ack => (format!("UPDATE mq_state SET done = 1, claimed = 0{GUARD}"), None, Some(now)),
            OutcomeKind::DeadLetter { .. } => (format!("UPDATE mq_state SET done = 1, claimed = 0{GUARD}"), None, Some(now)),
            OutcomeKind::Retry { retry_at, .. } => (
                format!("UPDATE mq_state SET invisible_until = ?4, postponed = 0, claimed = 0{GUARD}"),
                Some(*retry_at),
                Some(*retry_at),
            ),
            OutcomeKind::Postpone { until } => {
                // A wake that came while the delivery was in flight makes the
                // hold end now (ADR 0012).
                let held: Option<Millis> = c
                    .prepare_cached(&format!(
                        "UPDATE mq_state SET invisible_until = CASE WHEN woken = 1 THEN ?5 ELSE ?4 END, \
                         postponed = 1, attempt = 0, claimed = 0, woken = 0{GUARD} RETURNING invisible_until"
                    ))?
                    .query_row(params![o.group, o.seq, o.token, until, now], |r| r.get(0))
                    .optional()?;
                match held {
                    Some(at) => {
                        let e = due
                            .entry((o.topic.as_str(), o.group.as_str(), o.partition_key.as_str()))
                            .or_insert(at);
                        *e = (*e).min(at);
                        results.push(Ok(()));
                    }
                    None => results.push(Err(MqError::StaleDelivery(o.message_id.clone()))),
                }
                continue;
            }
            OutcomeKind::Extend { until } => (
                format!("UPDATE mq_state SET invisible_until = ?4{GUARD}"),
                Some(*until),
                None,
            ),
            OutcomeKind::Release => (
                format!("UPDATE mq_state SET invisible_until = ?4, attempt = MAX(attempt - 1, 0), claimed = 0{GUARD}"),
                Some(now),
                Some(now),
            ),
        };
        let mut stmt = c.prepare_cached(&sql)?;
        let affected = match extra {
            Some(v) => stmt.execute(params![o.group, o.seq, o.token, v])?,
            None => stmt.execute(params![o.group, o.seq, o.token])?,
        };
        if affected == 0 {
            results.push(Err(MqError::StaleDelivery(o.message_id.clone())));
            continue;
        }
        if let OutcomeKind::DeadLetter { failure } = &o.kind {
            insert_dead_letter(c, &o.topic, &o.group, o.seq, o.attempt, failure, now)?;
        }
        if let Some(at) = due_at {
            let e = due
                .entry((o.topic.as_str(), o.group.as_str(), o.partition_key.as_str()))
                .or_insert(at);
            *e = (*e).min(at);
        }
        results.push(Ok(()));
    }
    for ((topic, group, partition), at) in due {
        bump_due(c, topic, group, partition, at)?;
    }
    Ok(results)
}

fn replay_sync(c: &rusqlite::Connection, topic: &str, dlq_id: i64, now: Millis) -> MqResult<()> {
    let row: Option<(String, String, Vec<u8>, Option<String>)> = c
        .query_row(
            "SELECT partition_key, msg_id, payload, metadata FROM mq_dead_letters WHERE dlq_id = ?1 AND topic = ?2",
            params![dlq_id, topic],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((partition_key, id, payload, metadata)) = row else {
        return Err(MqError::UnknownDeadLetter {
            topic: topic.to_string(),
            id: dlq_id,
        });
    };
    // The stored original still holds the id; remove it so the replayed copy
    // is a new message after every group's cursor.
    c.execute(
        "DELETE FROM mq_messages WHERE topic = ?1 AND partition_key = ?2 AND msg_id = ?3",
        params![topic, partition_key, id],
    )?;
    let message = Message {
        id,
        partition_key,
        payload,
        metadata: decode_meta(metadata)?,
    };
    publish_sync(
        c,
        topic,
        &[NewMessage {
            message,
            available_at: now,
        }],
        now,
    )?;
    c.execute("DELETE FROM mq_dead_letters WHERE dlq_id = ?1", [dlq_id])?;
    Ok(())
}

fn dead_letters_sync(
    c: &rusqlite::Connection,
    topic: &str,
    after_id: i64,
    limit: usize,
) -> MqResult<Vec<DeadLetter>> {
    let mut stmt = c.prepare_cached(
        "SELECT dlq_id, topic, grp, partition_key, msg_id, payload, metadata, failure_message, failure_detail, \
         attempts, published_at, failed_at FROM mq_dead_letters WHERE topic = ?1 AND dlq_id > ?2 ORDER BY dlq_id LIMIT ?3",
    )?;
    let rows = stmt.query_map(
        params![topic, after_id, limit.min(i64::MAX as usize) as i64],
        |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Vec<u8>>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, String>(7)?,
                r.get::<_, Option<String>>(8)?,
                r.get::<_, i64>(9)?,
                r.get::<_, i64>(10)?,
                r.get::<_, i64>(11)?,
            ))
        },
    )?;
    let mut out = Vec::new();
    for row in rows {
        let (
            dlq_id,
            original_topic,
            group,
            partition_key,
            id,
            payload,
            metadata,
            msg,
            detail,
            attempts,
            published_at,
            failed_at,
        ) = row?;
        out.push(DeadLetter {
            dlq_id,
            original_topic,
            group,
            message: Message {
                id,
                partition_key,
                payload,
                metadata: decode_meta(metadata)?,
            },
            failure: Failure {
                message: msg,
                detail: decode_detail(detail),
            },
            attempts: attempts as u32,
            published_at,
            failed_at,
        });
    }
    Ok(out)
}

#[async_trait]
impl Driver for SqliteDriver {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    async fn publish(
        &self,
        topic: &str,
        msgs: &[NewMessage],
        now: Millis,
    ) -> MqResult<PublishReport> {
        let (topic, msgs) = (topic.to_string(), msgs.to_vec());
        self.write(move |c| publish_sync(c, &topic, &msgs, now))
            .await
    }

    async fn register_group(&self, topic: &str, group: &str, now: Millis) -> MqResult<()> {
        let (topic, group) = (topic.to_string(), group.to_string());
        self.write(move |c| register_group_sync(c, &topic, &group, now))
            .await
    }

    async fn lease_tick(&self, t: &LeaseTick) -> MqResult<LeaseReport> {
        let t = t.clone();
        self.write(move |c| lease_tick_sync(c, &t)).await
    }

    async fn deregister(&self, topic: &str, group: &str, subscriber: &str) -> MqResult<()> {
        let (topic, group, subscriber) =
            (topic.to_string(), group.to_string(), subscriber.to_string());
        self.write(move |c| {
            c.execute(
                "DELETE FROM mq_subscribers WHERE topic = ?1 AND grp = ?2 AND subscriber = ?3",
                params![topic, group, subscriber],
            )?;
            c.execute(
                "UPDATE mq_partitions SET lease_owner = NULL, lease_expires = 0 \
                 WHERE topic = ?1 AND grp = ?2 AND lease_owner = ?3",
                params![topic, group, subscriber],
            )?;
            Ok(())
        })
        .await
    }

    async fn recover(
        &self,
        topic: &str,
        group: &str,
        subscriber: &str,
        now: Millis,
    ) -> MqResult<u64> {
        let (topic, group, subscriber) =
            (topic.to_string(), group.to_string(), subscriber.to_string());
        self.write(move |c| {
            let released = c.execute(
                "UPDATE mq_state SET invisible_until = ?1 WHERE grp = ?2 AND topic = ?3 \
                 AND claimed = 1 AND done = 0 AND invisible_until > ?1 \
                 AND partition_key IN (SELECT partition_key FROM mq_partitions \
                 WHERE topic = ?3 AND grp = ?2 AND lease_owner = ?4)",
                params![now, group, topic, subscriber],
            )?;
            c.execute(
                "UPDATE mq_partitions SET next_due = ?1 WHERE topic = ?2 AND grp = ?3 AND lease_owner = ?4 \
                 AND next_due IS NOT NULL AND next_due > ?1",
                params![now, topic, group, subscriber],
            )?;
            Ok(released as u64)
        })
        .await
    }

    async fn claim(&self, req: &ClaimRequest) -> MqResult<ClaimResult> {
        let req = req.clone();
        self.write(move |c| claim_sync(c, &req)).await
    }

    async fn apply(&self, outcomes: &[Outcome], now: Millis) -> MqResult<Vec<MqResult<()>>> {
        let outcomes = outcomes.to_vec();
        self.write(move |c| apply_sync(c, &outcomes, now)).await
    }

    async fn wake(&self, topic: &str, partition_key: &str, now: Millis) -> MqResult<u64> {
        let (topic, partition_key) = (topic.to_string(), partition_key.to_string());
        self.write(move |c| {
            // Delivery state is reached through the partition's messages so
            // it needs no index beyond its primary key. Postponed → due now;
            // in flight → marked, its postpone ends at once; delayed by
            // `publish_after` → available now (ADR 0012).
            let postponed = c.execute(
                "UPDATE mq_state SET invisible_until = ?1 \
                 WHERE grp IN (SELECT grp FROM mq_groups WHERE topic = ?2) \
                 AND seq IN (SELECT seq FROM mq_messages WHERE topic = ?2 AND partition_key = ?3) \
                 AND postponed = 1 AND done = 0 AND invisible_until > ?1",
                params![now, topic, partition_key],
            )?;
            let in_flight = c.execute(
                "UPDATE mq_state SET woken = 1 \
                 WHERE grp IN (SELECT grp FROM mq_groups WHERE topic = ?1) \
                 AND seq IN (SELECT seq FROM mq_messages WHERE topic = ?1 AND partition_key = ?2) \
                 AND claimed = 1 AND done = 0 AND woken = 0",
                params![topic, partition_key],
            )?;
            let delayed = c.execute(
                "UPDATE mq_messages SET available_at = ?1 \
                 WHERE topic = ?2 AND partition_key = ?3 AND available_at > ?1",
                params![now, topic, partition_key],
            )?;
            c.execute(
                "UPDATE mq_partitions SET next_due = ?1 WHERE topic = ?2 AND partition_key = ?3 \
                 AND next_due IS NOT NULL AND next_due > ?1",
                params![now, topic, partition_key],
            )?;
            Ok((postponed + in_flight + delayed) as u64)
        })
        .await
    }

    async fn dead_letters(
        &self,
        topic: &str,
        after_id: i64,
        limit: usize,
    ) -> MqResult<Vec<DeadLetter>> {
        let topic = topic.to_string();
        self.read(move |c| dead_letters_sync(c, &topic, after_id, limit))
            .await
    }

    async fn replay_dead_letter(&self, topic: &str, dlq_id: i64, now: Millis) -> MqResult<()> {
        let topic = topic.to_string();
        self.write(move |c| replay_sync(c, &topic, dlq_id, now))
            .await
    }

    async fn prune_dead_letters(&self, failed_before: Millis, limit: usize) -> MqResult<u64> {
        let limit = limit.min(i64::MAX as usize) as i64;
        self.write(move |c| {
            Ok(c.execute(
                "DELETE FROM mq_dead_letters WHERE dlq_id IN (SELECT dlq_id FROM mq_dead_letters \
                 WHERE failed_at < ?1 ORDER BY dlq_id LIMIT ?2)",
                params![failed_before, limit],
            )? as u64)
        })
        .await
    }

    async fn count_dead_letters_before(&self, failed_before: Millis) -> MqResult<u64> {
        self.read(move |c| {
            Ok(c.query_row(
                "SELECT COUNT(*) FROM mq_dead_letters WHERE failed_at < ?1",
                [failed_before],
                |r| r.get::<_, i64>(0),
            )? as u64)
        })
        .await
    }

    async fn gc(&self, now: Millis, retention_ms: Millis, stale_ms: Millis) -> MqResult<GcReport> {
        let mut report = GcReport::default();
        loop {
            // Small transactions so publishers and consumers interleave.
            let n = self
                .write(move |c| {
                    Ok(c.execute(
                        "DELETE FROM mq_messages WHERE seq IN (SELECT m.seq FROM mq_messages m WHERE m.created_at < ?1 \
                         AND m.seq <= (SELECT MIN(p.cursor) FROM mq_partitions p WHERE p.topic = m.topic \
                         AND p.partition_key = m.partition_key) ORDER BY m.seq LIMIT ?2)",
                        params![now - retention_ms, GC_CHUNK],
                    )? as u64)
                })
                .await?;
            report.messages += n;
            if n < GC_CHUNK as u64 {
                break;
            }
        }
        loop {
            let n = self
                .write(move |c| {
                    Ok(c.execute(
                        "DELETE FROM mq_partitions WHERE (topic, grp, partition_key) IN \
                         (SELECT q.topic, q.grp, q.partition_key FROM mq_partitions q \
                         WHERE q.next_due IS NULL AND q.lease_owner IS NULL AND NOT EXISTS \
                         (SELECT 1 FROM mq_messages m WHERE m.topic = q.topic \
                         AND m.partition_key = q.partition_key) LIMIT ?1)",
                        [GC_CHUNK],
                    )? as u64)
                })
                .await?;
            report.partitions += n;
            if n < GC_CHUNK as u64 {
                break;
            }
        }
        report.subscribers = self
            .write(move |c| {
                Ok(c.execute(
                    "DELETE FROM mq_subscribers WHERE heartbeat_at <= ?1",
                    [now - stale_ms],
                )? as u64)
            })
            .await?;
        Ok(report)
    }

    async fn stats(&self, topic: &str, group: &str) -> MqResult<TopicStats> {
        let (topic, group) = (topic.to_string(), group.to_string());
        self.read(move |c| {
            Ok(c.query_row(
                "SELECT \
                 (SELECT COUNT(*) FROM mq_messages WHERE topic = ?1), \
                 (SELECT COUNT(*) FROM mq_messages m JOIN mq_partitions p ON p.topic = m.topic AND p.grp = ?2 \
                    AND p.partition_key = m.partition_key AND m.seq > p.cursor \
                    WHERE m.topic = ?1 AND NOT EXISTS (SELECT 1 FROM mq_state s WHERE s.grp = ?2 AND s.seq = m.seq AND s.done = 1)), \
                 (SELECT COUNT(*) FROM mq_partitions WHERE topic = ?1 AND grp = ?2), \
                 (SELECT COUNT(*) FROM mq_partitions WHERE topic = ?1 AND grp = ?2 AND lease_owner IS NOT NULL), \
                 (SELECT COUNT(*) FROM mq_dead_letters WHERE topic = ?1)",
                params![topic, group],
                |r| {
                    Ok(TopicStats {
                        stored: r.get::<_, i64>(0)? as u64,
                        pending: r.get::<_, i64>(1)? as u64,
                        partitions: r.get::<_, i64>(2)? as u64,
                        leased: r.get::<_, i64>(3)? as u64,
                        dead_letters: r.get::<_, i64>(4)? as u64,
                    })
                },
            )?)
        })
        .await
    }

    async fn groups(&self, topic: &str) -> MqResult<Vec<String>> {
        let topic = topic.to_string();
        self.read(move |c| {
            Ok(
                c.prepare_cached("SELECT grp FROM mq_groups WHERE topic = ?1 ORDER BY grp")?
                    .query_map([topic], |r| r.get(0))?
                    .collect::<Result<_, _>>()?,
            )
        })
        .await
    }

    async fn partitions(&self, query: &PartitionQuery) -> MqResult<Vec<PartitionInfo>> {
        let query = query.clone();
        self.read(move |c| partitions_sync(c, &query)).await
    }
}

/// A partition row as listed: key, cursor, next due, owner, lease expiry.
type PartitionRow = (String, i64, Option<Millis>, Option<String>, Millis);

fn partitions_sync(c: &rusqlite::Connection, q: &PartitionQuery) -> MqResult<Vec<PartitionInfo>> {
    let mut in_flight_q = c.prepare_cached(
        "SELECT COUNT(*) FROM mq_messages m WHERE m.topic = ?2 AND m.partition_key = ?3 AND m.seq > ?4 \
         AND EXISTS (SELECT 1 FROM mq_state s WHERE s.grp = ?1 AND s.seq = m.seq \
         AND s.claimed = 1 AND s.done = 0 AND s.invisible_until > ?5)",
    )?;
    let rows: Vec<PartitionRow> = c
        .prepare_cached(
            "SELECT partition_key, cursor, next_due, lease_owner, lease_expires FROM mq_partitions \
             WHERE topic = ?1 AND grp = ?2 AND partition_key > ?3 \
             AND (?4 IS NULL OR lease_owner = ?4) AND (?5 IS NULL OR next_due <= ?5) \
             ORDER BY partition_key LIMIT ?6",
        )?
        .query_map(
            params![
                q.topic,
                q.group,
                q.after.as_deref().unwrap_or(""),
                q.owner,
                q.due_by,
                q.limit.min(i64::MAX as usize) as i64
            ],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )?
        .collect::<Result<_, _>>()?;
    rows.into_iter()
        .map(|(key, cursor, next_due, owner, expires)| {
            let in_flight: i64 = in_flight_q
                .query_row(params![q.group, q.topic, key, cursor, q.now], |r| r.get(0))?;
            Ok(PartitionInfo::from_stored(
                key, cursor, next_due, owner, expires, in_flight,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count_tables(c: &rusqlite::Connection, name: &str) -> MqResult<i64> {
        Ok(c.query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = ?1",
            [name],
            |row| row.get(0),
        )?)
    }

    /// A write that fails or panics is rolled back, and no pooled connection
    /// is left inside a transaction: more writes than the pool has
    /// connections all begin and commit afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_and_panicking_writes_roll_back_and_free_their_connection() {
        let dir = tempfile::tempdir().unwrap();
        let driver = SqliteDriver::open(&dir.path().join("q.db")).await.unwrap();

        let failed = driver
            .write(|c| -> MqResult<()> {
                c.execute_batch("CREATE TABLE failed_write (x INTEGER)")?;
                Err(MqError::Internal("refused on purpose".into()))
            })
            .await;
        assert!(failed.is_err());

        let panicked = driver
            .write(|c| -> MqResult<()> {
                c.execute_batch("CREATE TABLE panicked_write (x INTEGER)")
                    .map_err(|e| MqError::Internal(e.to_string()))?;
                panic!("a bug inside a queue write");
            })
            .await;
        assert!(
            matches!(panicked, Err(MqError::Internal(_))),
            "{panicked:?}"
        );

        for i in 0..8 {
            driver
                .write(move |c| -> MqResult<()> {
                    c.execute_batch(&format!("CREATE TABLE ok_{i} (x INTEGER)"))?;
                    Ok(())
                })
                .await
                .unwrap();
        }
        let (failed, panicked, ok) = driver
            .read(|c| {
                Ok((
                    count_tables(c, "failed_write")?,
                    count_tables(c, "panicked_write")?,
                    count_tables(c, "ok_7")?,
                ))
            })
            .await
            .unwrap();
        assert_eq!((failed, panicked, ok), (0, 0, 1));
    }
}
