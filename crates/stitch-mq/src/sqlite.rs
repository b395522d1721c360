//! SQLite backend: the embedded default. WAL mode, a busy timeout, and
//! `BEGIN IMMEDIATE` write transactions serialized by an in-process writer
//! lock, so concurrent use in one process never meets "database is locked"
//! and several processes on one file wait for each other instead of failing.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool, Transaction};

use crate::driver::*;
use crate::error::{MqError, MqResult};
use crate::message::{Failure, Message, Millis};
use crate::window::{plan_window, RowState, WindowLimits, WindowRow};

const SCAN_LIMIT_EXTRA: i64 = 64;
/// Rows per multi-row statement (SQLite allows 32766 bound parameters).
const CHUNK: usize = 400;

/// Connection settings used for every stitch SQLite database.
pub fn connect_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(30))
        .foreign_keys(true)
}

/// Opens (creating if needed) a pool on a SQLite file with stitch's settings.
pub async fn open_pool(path: &Path) -> MqResult<SqlitePool> {
    Ok(SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(connect_options(path))
        .await?)
}

/// Opens a pool from a `sqlite://` URL with stitch's settings.
pub async fn open_pool_url(url: &str) -> MqResult<SqlitePool> {
    let opts = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(30))
        .foreign_keys(true);
    Ok(SqlitePoolOptions::new().max_connections(4).connect_with(opts).await?)
}

/// Applies the queue's migrations (versions 1001+) to a pool. Other stitch
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
}

/// A write transaction holding the in-process writer lock. Use it to
/// publish in the same transaction as other writes (transactional outbox).
pub struct WriteTx {
    _guard: tokio::sync::OwnedMutexGuard<()>,
    tx: Transaction<'static, Sqlite>,
}

impl WriteTx {
    /// The connection, for the caller's own statements in this transaction.
    pub fn conn(&mut self) -> &mut SqliteConnection {
        &mut self.tx
    }

    /// Commits everything written in the transaction.
    pub async fn commit(self) -> MqResult<()> {
        self.tx.commit().await?;
        Ok(())
    }
}

impl SqliteDriver {
    /// Opens `path`, applies migrations.
    pub async fn open(path: &Path) -> MqResult<Self> {
        Self::from_pool(open_pool(path).await?).await
    }

    /// Uses an existing pool (shared with the build store); applies migrations.
    pub async fn from_pool(pool: SqlitePool) -> MqResult<Self> {
        migrate(&pool).await?;
        Ok(Self {
            pool,
            writer: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Starts a write transaction (`BEGIN IMMEDIATE`) under the writer lock.
    pub async fn begin_write(&self) -> MqResult<WriteTx> {
        let guard = self.writer.clone().lock_owned().await;
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        Ok(WriteTx { _guard: guard, tx })
    }

    /// Publishes inside the caller's transaction: nothing is visible until
    /// it commits, and a rollback publishes nothing. Call
    /// `Publisher::notify_published` after the commit for an immediate wake-up.
    pub async fn publish_in_tx(
        conn: &mut SqliteConnection,
        topic: &str,
        msgs: &[NewMessage],
        now: Millis,
    ) -> MqResult<PublishReport> {
        let groups: Vec<String> = sqlx::query_scalar("SELECT grp FROM mq_groups WHERE topic = ?")
            .bind(topic)
            .fetch_all(&mut *conn)
            .await?;
        let mut report = PublishReport::default();
        let mut due: BTreeMap<String, Millis> = BTreeMap::new();
        for chunk in msgs.chunks(CHUNK) {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "INSERT INTO mq_messages (topic, partition_key, msg_id, payload, metadata, published_at, available_at, created_at) ",
            );
            qb.push_values(chunk, |mut b, m| {
                b.push_bind(topic)
                    .push_bind(&m.message.partition_key)
                    .push_bind(&m.message.id)
                    .push_bind(&m.message.payload)
                    .push_bind(encode_meta(&m.message.metadata))
                    .push_bind(now)
                    .push_bind(m.available_at)
                    .push_bind(now);
            });
            qb.push(" ON CONFLICT (topic, partition_key, msg_id) DO NOTHING RETURNING partition_key, available_at");
            let rows = qb.build().fetch_all(&mut *conn).await?;
            report.stored += rows.len();
            report.duplicates += chunk.len() - rows.len();
            for r in rows {
                let p: String = r.try_get(0)?;
                let at: Millis = r.try_get(1)?;
                let e = due.entry(p).or_insert(at);
                *e = (*e).min(at);
            }
        }
        if !groups.is_empty() && !due.is_empty() {
            let rows: Vec<(&String, &String, Millis)> = groups
                .iter()
                .flat_map(|g| due.iter().map(move |(p, at)| (g, p, *at)))
                .collect();
            for chunk in rows.chunks(CHUNK) {
                let mut qb = QueryBuilder::<Sqlite>::new(
                    "INSERT INTO mq_partitions (topic, grp, partition_key, cursor, next_due, lease_expires) ",
                );
                qb.push_values(chunk, |mut b, (g, p, at)| {
                    b.push_bind(topic).push_bind(*g).push_bind(*p).push_bind(0i64).push_bind(*at).push_bind(0i64);
                });
                qb.push(
                    " ON CONFLICT (topic, grp, partition_key) DO UPDATE SET next_due = \
                     CASE WHEN mq_partitions.next_due IS NULL OR mq_partitions.next_due > excluded.next_due \
                     THEN excluded.next_due ELSE mq_partitions.next_due END",
                );
                qb.build().execute(&mut *conn).await?;
            }
        }
        Ok(report)
    }
}

fn encode_meta(meta: &BTreeMap<String, String>) -> Option<String> {
    if meta.is_empty() {
        None
    } else {
        serde_json::to_string(meta).ok()
    }
}

fn decode_meta(raw: Option<String>) -> MqResult<BTreeMap<String, String>> {
    match raw {
        None => Ok(BTreeMap::new()),
        Some(s) => serde_json::from_str(&s).map_err(|e| MqError::Corrupt(format!("message metadata: {e}"))),
    }
}

fn decode_detail(raw: Option<String>) -> serde_json::Value {
    raw.and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::Value::Null)
}

async fn bump_due(conn: &mut SqliteConnection, topic: &str, group: &str, partition: &str, due: Millis) -> MqResult<()> {
    sqlx::query(
        "UPDATE mq_partitions SET next_due = CASE WHEN next_due IS NULL OR next_due > ?1 THEN ?1 ELSE next_due END \
         WHERE topic = ?2 AND grp = ?3 AND partition_key = ?4",
    )
    .bind(due)
    .bind(topic)
    .bind(group)
    .bind(partition)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Copies a stored message into the dead letters (re-dead-lettering the same
/// id refreshes the failure instead of failing).
async fn insert_dead_letter(
    conn: &mut SqliteConnection,
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
    sqlx::query(
        "INSERT INTO mq_dead_letters (topic, grp, partition_key, msg_id, payload, metadata, failure_message, \
         failure_detail, attempts, published_at, failed_at) \
         SELECT topic, ?1, partition_key, msg_id, payload, metadata, ?2, ?3, ?4, published_at, ?5 \
         FROM mq_messages WHERE seq = ?6 AND topic = ?7 \
         ON CONFLICT (topic, grp, partition_key, msg_id) DO UPDATE SET \
         payload = excluded.payload, metadata = excluded.metadata, failure_message = excluded.failure_message, \
         failure_detail = excluded.failure_detail, attempts = excluded.attempts, \
         published_at = excluded.published_at, failed_at = excluded.failed_at",
    )
    .bind(group)
    .bind(&failure.message)
    .bind(detail)
    .bind(attempts as i64)
    .bind(now)
    .bind(seq)
    .bind(topic)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

struct ScanRow {
    seq: i64,
    msg_id: String,
    partition_key: String,
    payload: Vec<u8>,
    metadata: Option<String>,
    published_at: Millis,
    row: WindowRow,
}

#[async_trait]
impl Driver for SqliteDriver {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    async fn publish(&self, topic: &str, msgs: &[NewMessage], now: Millis) -> MqResult<PublishReport> {
        let mut tx = self.begin_write().await?;
        let report = Self::publish_in_tx(tx.conn(), topic, msgs, now).await?;
        tx.commit().await?;
        Ok(report)
    }

    async fn register_group(&self, topic: &str, group: &str, now: Millis) -> MqResult<()> {
        let mut tx = self.begin_write().await?;
        let added = sqlx::query("INSERT INTO mq_groups (topic, grp, created_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING")
            .bind(topic)
            .bind(group)
            .bind(now)
            .execute(tx.conn())
            .await?
            .rows_affected();
        if added == 1 {
            sqlx::query(
                "INSERT INTO mq_partitions (topic, grp, partition_key, cursor, next_due, lease_expires) \
                 SELECT topic, ?1, partition_key, 0, MIN(available_at), 0 FROM mq_messages WHERE topic = ?2 \
                 GROUP BY partition_key ON CONFLICT (topic, grp, partition_key) DO NOTHING",
            )
            .bind(group)
            .bind(topic)
            .execute(tx.conn())
            .await?;
        }
        tx.commit().await
    }

    async fn lease_tick(&self, t: &LeaseTick) -> MqResult<LeaseReport> {
        let mut tx = self.begin_write().await?;
        let c = tx.conn();
        sqlx::query(
            "INSERT INTO mq_subscribers (topic, grp, subscriber, heartbeat_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (topic, grp, subscriber) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        )
        .bind(&t.topic)
        .bind(&t.group)
        .bind(&t.subscriber)
        .bind(t.now)
        .execute(&mut *c)
        .await?;
        let active: Vec<String> = sqlx::query_scalar(
            "SELECT subscriber FROM mq_subscribers WHERE topic = ? AND grp = ? AND heartbeat_at > ? ORDER BY subscriber",
        )
        .bind(&t.topic)
        .bind(&t.group)
        .bind(t.now - t.lease_ms)
        .fetch_all(&mut *c)
        .await?;
        let busy: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM mq_partitions WHERE topic = ?1 AND grp = ?2 \
             AND (next_due IS NOT NULL OR (lease_owner IS NOT NULL AND lease_expires > ?3))",
        )
        .bind(&t.topic)
        .bind(&t.group)
        .bind(t.now)
        .fetch_one(&mut *c)
        .await?;
        let cap = fair_share_cap(busy as usize, &active, &t.subscriber);
        // Idle partitions give their lease back; the rest are renewed.
        sqlx::query(
            "UPDATE mq_partitions SET lease_owner = NULL, lease_expires = 0 \
             WHERE topic = ? AND grp = ? AND lease_owner = ? AND next_due IS NULL",
        )
        .bind(&t.topic)
        .bind(&t.group)
        .bind(&t.subscriber)
        .execute(&mut *c)
        .await?;
        sqlx::query("UPDATE mq_partitions SET lease_expires = ? WHERE topic = ? AND grp = ? AND lease_owner = ?")
            .bind(t.now + t.lease_ms)
            .bind(&t.topic)
            .bind(&t.group)
            .bind(&t.subscriber)
            .execute(&mut *c)
            .await?;
        let mine: Vec<String> = sqlx::query_scalar(
            "SELECT partition_key FROM mq_partitions WHERE topic = ? AND grp = ? AND lease_owner = ? ORDER BY partition_key",
        )
        .bind(&t.topic)
        .bind(&t.group)
        .bind(&t.subscriber)
        .fetch_all(&mut *c)
        .await?;
        let owned = mine.len().min(cap);
        if mine.len() > cap {
            for chunk in mine[cap..].chunks(CHUNK) {
                let mut qb = QueryBuilder::<Sqlite>::new(
                    "UPDATE mq_partitions SET lease_owner = NULL, lease_expires = 0 WHERE topic = ",
                );
                qb.push_bind(&t.topic)
                    .push(" AND grp = ")
                    .push_bind(&t.group)
                    .push(" AND lease_owner = ")
                    .push_bind(&t.subscriber)
                    .push(" AND partition_key IN (");
                let mut sep = qb.separated(", ");
                for p in chunk {
                    sep.push_bind(p);
                }
                qb.push(")");
                qb.build().execute(&mut *c).await?;
            }
        }
        tx.commit().await?;
        Ok(LeaseReport {
            cap,
            owned,
            active_subscribers: active.len().max(1),
        })
    }

    async fn deregister(&self, topic: &str, group: &str, subscriber: &str) -> MqResult<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM mq_subscribers WHERE topic = ? AND grp = ? AND subscriber = ?")
            .bind(topic)
            .bind(group)
            .bind(subscriber)
            .execute(tx.conn())
            .await?;
        sqlx::query(
            "UPDATE mq_partitions SET lease_owner = NULL, lease_expires = 0 WHERE topic = ? AND grp = ? AND lease_owner = ?",
        )
        .bind(topic)
        .bind(group)
        .bind(subscriber)
        .execute(tx.conn())
        .await?;
        tx.commit().await
    }

    async fn claim(&self, req: &ClaimRequest) -> MqResult<ClaimResult> {
        let now = req.now;
        let mut tx = self.begin_write().await?;
        let c = tx.conn();
        let due = sqlx::query(
            "SELECT partition_key, cursor, lease_owner, lease_expires FROM mq_partitions \
             WHERE topic = ?1 AND grp = ?2 AND next_due <= ?3 \
             AND (lease_owner = ?4 OR lease_owner IS NULL OR lease_expires <= ?3) \
             ORDER BY next_due LIMIT ?5",
        )
        .bind(&req.topic)
        .bind(&req.group)
        .bind(now)
        .bind(&req.subscriber)
        .bind((req.max_messages + 16) as i64)
        .fetch_all(&mut *c)
        .await?;

        let mut result = ClaimResult::default();
        let mut may_acquire = req.may_acquire;
        let mut deliveries: Vec<(i64, String, u32, i64)> = Vec::new();
        for prow in due {
            if result.messages.len() >= req.max_messages {
                break;
            }
            let partition: String = prow.try_get(0)?;
            let cursor: i64 = prow.try_get(1)?;
            let owner: Option<String> = prow.try_get(2)?;
            let expires: i64 = prow.try_get(3)?;
            let owned = owner.as_deref() == Some(req.subscriber.as_str()) && expires > now;
            if !owned {
                if may_acquire == 0 {
                    continue;
                }
                may_acquire -= 1;
                result.acquired += 1;
            }
            let scan = req.batch_size as i64 + SCAN_LIMIT_EXTRA;
            let rows = sqlx::query(
                "SELECT m.seq, m.msg_id, m.payload, m.metadata, m.published_at, m.available_at, \
                 s.attempt, s.invisible_until, s.postponed, s.done \
                 FROM mq_messages m LEFT JOIN mq_state s ON s.grp = ?1 AND s.seq = m.seq \
                 WHERE m.topic = ?2 AND m.partition_key = ?3 AND m.seq > ?4 ORDER BY m.seq LIMIT ?5",
            )
            .bind(&req.group)
            .bind(&req.topic)
            .bind(&partition)
            .bind(cursor)
            .bind(scan + 1)
            .fetch_all(&mut *c)
            .await?;
            let truncated = rows.len() as i64 > scan;
            let mut scanned = Vec::with_capacity(rows.len());
            for r in rows.iter().take(scan as usize) {
                let attempt: Option<i64> = r.try_get(6)?;
                let state = match attempt {
                    Some(a) => Some(RowState {
                        attempt: a as u32,
                        invisible_until: r.try_get(7)?,
                        postponed: r.try_get::<i64, _>(8)? != 0,
                        done: r.try_get::<i64, _>(9)? != 0,
                    }),
                    None => None,
                };
                let seq: i64 = r.try_get(0)?;
                scanned.push(ScanRow {
                    seq,
                    msg_id: r.try_get(1)?,
                    partition_key: partition.clone(),
                    payload: r.try_get(2)?,
                    metadata: r.try_get(3)?,
                    published_at: r.try_get(4)?,
                    row: WindowRow {
                        seq,
                        available_at: r.try_get(5)?,
                        state,
                    },
                });
            }
            let window: Vec<WindowRow> = scanned.iter().map(|s| s.row).collect();
            let plan = plan_window(
                cursor,
                &window,
                truncated,
                WindowLimits {
                    now,
                    batch_size: req.batch_size,
                    max_deliver: req.max_messages - result.messages.len(),
                    visibility_ms: req.visibility_ms,
                    max_attempts: req.max_attempts,
                },
            );
            for (seq, attempts) in &plan.exhausted {
                let failure = Failure::new(format!(
                    "redelivered {attempts} times without an outcome (consumer crashed or visibility timeout expired)"
                ));
                insert_dead_letter(&mut *c, &req.topic, &req.group, *seq, *attempts, &failure, now).await?;
                sqlx::query("UPDATE mq_state SET done = 1 WHERE grp = ? AND seq = ?")
                    .bind(&req.group)
                    .bind(seq)
                    .execute(&mut *c)
                    .await?;
                result.dead_lettered += 1;
            }
            let by_seq: HashMap<i64, &ScanRow> = scanned.iter().map(|s| (s.seq, s)).collect();
            for (seq, attempt) in &plan.deliver {
                let Some(s) = by_seq.get(seq) else { continue };
                let token = rand::random::<i64>() & i64::MAX;
                deliveries.push((*seq, s.partition_key.clone(), *attempt, token));
                result.messages.push(ClaimedMessage {
                    seq: *seq,
                    message: Message {
                        id: s.msg_id.clone(),
                        partition_key: s.partition_key.clone(),
                        payload: s.payload.clone(),
                        metadata: decode_meta(s.metadata.clone())?,
                    },
                    published_at: s.published_at,
                    attempt: *attempt,
                    token,
                });
            }
            if plan.cursor > cursor {
                sqlx::query("DELETE FROM mq_state WHERE grp = ? AND topic = ? AND partition_key = ? AND seq <= ?")
                    .bind(&req.group)
                    .bind(&req.topic)
                    .bind(&partition)
                    .bind(plan.cursor)
                    .execute(&mut *c)
                    .await?;
            }
            sqlx::query(
                "UPDATE mq_partitions SET cursor = ?, next_due = ?, lease_owner = ?, lease_expires = ? \
                 WHERE topic = ? AND grp = ? AND partition_key = ?",
            )
            .bind(plan.cursor)
            .bind(plan.next_due)
            .bind(&req.subscriber)
            .bind(if owned { expires } else { now + req.lease_ms })
            .bind(&req.topic)
            .bind(&req.group)
            .bind(&partition)
            .execute(&mut *c)
            .await?;
        }
        let until = now + req.visibility_ms;
        for chunk in deliveries.chunks(CHUNK) {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "INSERT INTO mq_state (grp, seq, topic, partition_key, attempt, invisible_until, postponed, done, token) ",
            );
            qb.push_values(chunk, |mut b, (seq, p, attempt, token)| {
                b.push_bind(&req.group)
                    .push_bind(*seq)
                    .push_bind(&req.topic)
                    .push_bind(p)
                    .push_bind(*attempt as i64)
                    .push_bind(until)
                    .push_bind(0i64)
                    .push_bind(0i64)
                    .push_bind(*token);
            });
            qb.push(
                " ON CONFLICT (grp, seq) DO UPDATE SET attempt = excluded.attempt, \
                 invisible_until = excluded.invisible_until, postponed = 0, done = 0, token = excluded.token",
            );
            qb.build().execute(&mut *c).await?;
        }
        result.next_due = sqlx::query_scalar(
            "SELECT next_due FROM mq_partitions WHERE topic = ?1 AND grp = ?2 AND next_due IS NOT NULL \
             AND (lease_owner = ?3 OR lease_owner IS NULL OR lease_expires <= ?4) ORDER BY next_due LIMIT 1",
        )
        .bind(&req.topic)
        .bind(&req.group)
        .bind(&req.subscriber)
        .bind(now)
        .fetch_optional(&mut *c)
        .await?;
        tx.commit().await?;
        Ok(result)
    }

    async fn apply(&self, outcomes: &[Outcome], now: Millis) -> MqResult<Vec<MqResult<()>>> {
        let mut tx = self.begin_write().await?;
        let c = tx.conn();
        let mut results: Vec<MqResult<()>> = Vec::with_capacity(outcomes.len());
        let mut due: HashMap<(&str, &str, &str), Millis> = HashMap::new();

        // Acks are the hot path: one statement for the whole batch.
        let acks: Vec<&Outcome> = outcomes.iter().filter(|o| matches!(o.kind, OutcomeKind::Ack)).collect();
        let mut acked: std::collections::HashSet<(String, i64)> = std::collections::HashSet::new();
        for chunk in acks.chunks(CHUNK) {
            let mut qb = QueryBuilder::<Sqlite>::new("UPDATE mq_state SET done = 1 WHERE done = 0 AND (grp, seq, token) IN (VALUES ");
            let mut sep = qb.separated(", ");
            for o in chunk {
                sep.push("(")
                    .push_bind_unseparated(&o.group)
                    .push_unseparated(", ")
                    .push_bind_unseparated(o.seq)
                    .push_unseparated(", ")
                    .push_bind_unseparated(o.token)
                    .push_unseparated(")");
            }
            qb.push(") RETURNING grp, seq");
            for r in qb.build().fetch_all(&mut *c).await? {
                acked.insert((r.try_get(0)?, r.try_get(1)?));
            }
        }

        for o in outcomes {
            let key = (o.topic.as_str(), o.group.as_str(), o.partition_key.as_str());
            let stale = || Err(MqError::StaleDelivery(o.message_id.clone()));
            let guard = " WHERE grp = ? AND seq = ? AND token = ? AND done = 0";
            let (affected, due_at) = match &o.kind {
                OutcomeKind::Ack => (u64::from(acked.contains(&(o.group.clone(), o.seq))), Some(now)),
                OutcomeKind::DeadLetter { failure } => {
                    let n = sqlx::query(&format!("UPDATE mq_state SET done = 1{guard}"))
                        .bind(&o.group)
                        .bind(o.seq)
                        .bind(o.token)
                        .execute(&mut *c)
                        .await?
                        .rows_affected();
                    if n == 1 {
                        insert_dead_letter(&mut *c, &o.topic, &o.group, o.seq, o.attempt, failure, now).await?;
                    }
                    (n, Some(now))
                }
                OutcomeKind::Retry { retry_at, .. } => {
                    let n = sqlx::query(&format!("UPDATE mq_state SET invisible_until = ?, postponed = 0{guard}"))
                        .bind(retry_at)
                        .bind(&o.group)
                        .bind(o.seq)
                        .bind(o.token)
                        .execute(&mut *c)
                        .await?
                        .rows_affected();
                    (n, Some(*retry_at))
                }
                OutcomeKind::Postpone { until } => {
                    let n = sqlx::query(&format!(
                        "UPDATE mq_state SET invisible_until = ?, postponed = 1, attempt = 0{guard}"
                    ))
                    .bind(until)
                    .bind(&o.group)
                    .bind(o.seq)
                    .bind(o.token)
                    .execute(&mut *c)
                    .await?
                    .rows_affected();
                    (n, Some(*until))
                }
                OutcomeKind::Extend { until } => {
                    let n = sqlx::query(&format!("UPDATE mq_state SET invisible_until = ?{guard}"))
                        .bind(until)
                        .bind(&o.group)
                        .bind(o.seq)
                        .bind(o.token)
                        .execute(&mut *c)
                        .await?
                        .rows_affected();
                    (n, None)
                }
                OutcomeKind::Release => {
                    let n = sqlx::query(&format!(
                        "UPDATE mq_state SET invisible_until = ?, attempt = MAX(attempt - 1, 0){guard}"
                    ))
                    .bind(now)
                    .bind(&o.group)
                    .bind(o.seq)
                    .bind(o.token)
                    .execute(&mut *c)
                    .await?
                    .rows_affected();
                    (n, Some(now))
                }
            };
            if affected == 0 {
                results.push(stale());
                continue;
            }
            if let Some(at) = due_at {
                let e = due.entry(key).or_insert(at);
                *e = (*e).min(at);
            }
            results.push(Ok(()));
        }
        for ((topic, group, partition), at) in due {
            bump_due(&mut *c, topic, group, partition, at).await?;
        }
        tx.commit().await?;
        Ok(results)
    }

    async fn wake(&self, topic: &str, partition_key: &str, now: Millis) -> MqResult<u64> {
        let mut tx = self.begin_write().await?;
        let woken = sqlx::query(
            "UPDATE mq_state SET invisible_until = ?1 WHERE topic = ?2 AND partition_key = ?3 \
             AND postponed = 1 AND done = 0 AND invisible_until > ?1",
        )
        .bind(now)
        .bind(topic)
        .bind(partition_key)
        .execute(tx.conn())
        .await?
        .rows_affected();
        sqlx::query(
            "UPDATE mq_partitions SET next_due = ?1 WHERE topic = ?2 AND partition_key = ?3 \
             AND next_due IS NOT NULL AND next_due > ?1",
        )
        .bind(now)
        .bind(topic)
        .bind(partition_key)
        .execute(tx.conn())
        .await?;
        tx.commit().await?;
        Ok(woken)
    }

    async fn dead_letters(&self, topic: &str, after_id: i64, limit: usize) -> MqResult<Vec<DeadLetter>> {
        let rows = sqlx::query(
            "SELECT dlq_id, topic, grp, partition_key, msg_id, payload, metadata, failure_message, failure_detail, \
             attempts, published_at, failed_at FROM mq_dead_letters WHERE topic = ? AND dlq_id > ? ORDER BY dlq_id LIMIT ?",
        )
        .bind(topic)
        .bind(after_id)
        .bind(limit.min(i64::MAX as usize) as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(DeadLetter {
                    dlq_id: r.try_get(0)?,
                    original_topic: r.try_get(1)?,
                    group: r.try_get(2)?,
                    message: Message {
                        partition_key: r.try_get(3)?,
                        id: r.try_get(4)?,
                        payload: r.try_get(5)?,
                        metadata: decode_meta(r.try_get(6)?)?,
                    },
                    failure: Failure {
                        message: r.try_get(7)?,
                        detail: decode_detail(r.try_get(8)?),
                    },
                    attempts: r.try_get::<i64, _>(9)? as u32,
                    published_at: r.try_get(10)?,
                    failed_at: r.try_get(11)?,
                })
            })
            .collect()
    }

    async fn replay_dead_letter(&self, topic: &str, dlq_id: i64, now: Millis) -> MqResult<()> {
        let mut tx = self.begin_write().await?;
        let c = tx.conn();
        let row = sqlx::query(
            "SELECT partition_key, msg_id, payload, metadata FROM mq_dead_letters WHERE dlq_id = ? AND topic = ?",
        )
        .bind(dlq_id)
        .bind(topic)
        .fetch_optional(&mut *c)
        .await?
        .ok_or_else(|| MqError::UnknownDeadLetter {
            topic: topic.to_string(),
            id: dlq_id,
        })?;
        let message = Message {
            partition_key: row.try_get(0)?,
            id: row.try_get(1)?,
            payload: row.try_get(2)?,
            metadata: decode_meta(row.try_get(3)?)?,
        };
        // The stored original still holds the id; remove it so the replayed
        // copy is a new message after every group's cursor.
        let old: Option<i64> =
            sqlx::query_scalar("SELECT seq FROM mq_messages WHERE topic = ? AND partition_key = ? AND msg_id = ?")
                .bind(topic)
                .bind(&message.partition_key)
                .bind(&message.id)
                .fetch_optional(&mut *c)
                .await?;
        if let Some(seq) = old {
            sqlx::query("DELETE FROM mq_messages WHERE seq = ?").bind(seq).execute(&mut *c).await?;
        }
        Self::publish_in_tx(
            &mut *c,
            topic,
            &[NewMessage {
                message,
                available_at: now,
            }],
            now,
        )
        .await?;
        sqlx::query("DELETE FROM mq_dead_letters WHERE dlq_id = ?")
            .bind(dlq_id)
            .execute(&mut *c)
            .await?;
        tx.commit().await
    }

    async fn gc(&self, now: Millis, retention_ms: Millis, stale_ms: Millis) -> MqResult<GcReport> {
        let mut report = GcReport::default();
        loop {
            let mut tx = self.begin_write().await?;
            let n = sqlx::query(
                "DELETE FROM mq_messages WHERE seq IN (SELECT m.seq FROM mq_messages m WHERE m.created_at < ?1 \
                 AND m.seq <= (SELECT MIN(p.cursor) FROM mq_partitions p WHERE p.topic = m.topic \
                 AND p.partition_key = m.partition_key) ORDER BY m.seq LIMIT 5000)",
            )
            .bind(now - retention_ms)
            .execute(tx.conn())
            .await?
            .rows_affected();
            tx.commit().await?;
            report.messages += n;
            if n < 5000 {
                break;
            }
        }
        let mut tx = self.begin_write().await?;
        report.partitions = sqlx::query(
            "DELETE FROM mq_partitions WHERE next_due IS NULL AND lease_owner IS NULL AND NOT EXISTS \
             (SELECT 1 FROM mq_messages m WHERE m.topic = mq_partitions.topic AND m.partition_key = mq_partitions.partition_key)",
        )
        .execute(tx.conn())
        .await?
        .rows_affected();
        report.subscribers = sqlx::query("DELETE FROM mq_subscribers WHERE heartbeat_at <= ?")
            .bind(now - stale_ms)
            .execute(tx.conn())
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(report)
    }

    async fn stats(&self, topic: &str, group: &str) -> MqResult<TopicStats> {
        let row = sqlx::query(
            "SELECT \
             (SELECT COUNT(*) FROM mq_messages WHERE topic = ?1), \
             (SELECT COUNT(*) FROM mq_messages m JOIN mq_partitions p ON p.topic = m.topic AND p.grp = ?2 \
                AND p.partition_key = m.partition_key AND m.seq > p.cursor \
                WHERE m.topic = ?1 AND NOT EXISTS (SELECT 1 FROM mq_state s WHERE s.grp = ?2 AND s.seq = m.seq AND s.done = 1)), \
             (SELECT COUNT(*) FROM mq_partitions WHERE topic = ?1 AND grp = ?2), \
             (SELECT COUNT(*) FROM mq_partitions WHERE topic = ?1 AND grp = ?2 AND lease_owner IS NOT NULL), \
             (SELECT COUNT(*) FROM mq_dead_letters WHERE topic = ?1)",
        )
        .bind(topic)
        .bind(group)
        .fetch_one(&self.pool)
        .await?;
        Ok(TopicStats {
            stored: row.try_get::<i64, _>(0)? as u64,
            pending: row.try_get::<i64, _>(1)? as u64,
            partitions: row.try_get::<i64, _>(2)? as u64,
            leased: row.try_get::<i64, _>(3)? as u64,
            dead_letters: row.try_get::<i64, _>(4)? as u64,
        })
    }
}
