//! MySQL / MariaDB backend (MySQL 8, MariaDB 10.6+: both have `SKIP LOCKED`).
//!
//! The same locking design as PostgreSQL (ADR 0004), in InnoDB's terms:
//! - connections run at READ COMMITTED, so every statement reads the latest
//!   committed rows and InnoDB takes no gap locks for our statements;
//! - a claim locks due partition rows with `FOR UPDATE SKIP LOCKED`;
//!   every other writer of a partition's delivery state locks the partition
//!   rows first, blocking, in one global byte-wise order (the name columns
//!   are `VARBINARY`);
//! - a publish locks the partition rows of every group before its messages
//!   take their `AUTO_INCREMENT` numbers; it holds its topic's `mq_topics`
//!   row shared and registering a group holds it exclusive;
//! - every `ON DUPLICATE KEY UPDATE` assigns each column from `VALUES()` or
//!   from that column alone, never from a column assigned before it in the
//!   same statement (MySQL applies assignments left to right; nothing here
//!   depends on that order);
//! - a claim deletes the delivery state of the rows its cursor passes, by
//!   primary key (rows only it can hold), instead of a sweep that would read
//!   partition rows other transactions have locked.
//!
//! There is no LISTEN/NOTIFY: other processes' publishes are seen by the
//! claim loop's polling (`poll_interval`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions, MySqlRow};
use sqlx::{Executor, MySql, MySqlConnection, MySqlPool, QueryBuilder, Row, Transaction};

use crate::codec::{decode_detail, decode_meta, encode_detail, encode_meta};
use crate::driver::*;
use crate::error::{MqError, MqResult};
use crate::message::{Failure, Message, Millis};
use crate::window::{exhausted_failure, plan_window, RowState, WindowLimits, WindowRow};

/// Rows read past a window, to skip finished rows the cursor has not passed yet.
const SCAN_LIMIT_EXTRA: i64 = 16;
/// Rows (messages, then partitions) deleted per garbage-collection
/// transaction: small, like the retention pass's batches, so publishers and
/// consumers never wait long behind the collector.
const GC_CHUNK: i64 = 500;
/// Connections of the pool opened by [`MySqlDriver::open`].
const POOL_SIZE: u32 = 10;

/// Applies the queue's migrations (versions 1001+) in the pool's database.
pub async fn migrate(pool: &MySqlPool) -> MqResult<()> {
    let mut migrator = sqlx::migrate!("./migrations/mysql");
    migrator.set_ignore_missing(true);
    migrator.run(pool).await?;
    Ok(())
}

/// Pool options with the session settings the driver relies on. Use them
/// for a pool shared with the build store.
pub fn pool_options() -> MySqlPoolOptions {
    MySqlPoolOptions::new()
        .max_connections(POOL_SIZE)
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    .await?;
                Ok(())
            })
        })
}

/// Connection options from a `mysql://` URL.
pub fn connect_options(url: &str) -> MqResult<MySqlConnectOptions> {
    Ok(MySqlConnectOptions::from_str(url)?)
}

/// The MySQL / MariaDB driver. Cheap to clone.
#[derive(Clone)]
pub struct MySqlDriver {
    pool: MySqlPool,
}

impl MySqlDriver {
    /// Connects to `url` (a `mysql://` URL naming the database) and applies
    /// migrations.
    pub async fn open(url: &str) -> MqResult<Self> {
        let pool = pool_options().connect_with(connect_options(url)?).await?;
        Self::from_pool(pool).await
    }

    /// Uses an existing pool made with [`pool_options`]; applies migrations.
    pub async fn from_pool(pool: MySqlPool) -> MqResult<Self> {
        migrate(&pool).await?;
        Ok(Self { pool })
    }

    /// The pool.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Publishes inside the caller's transaction (READ COMMITTED, as
    /// [`pool_options`] sets): nothing is visible until it commits, and a
    /// rollback publishes nothing. Call `Publisher::notify_published` after
    /// the commit. Validate messages first with `Publisher::prepare`.
    pub async fn publish_in_tx(
        conn: &mut MySqlConnection,
        topic: &str,
        msgs: &[NewMessage],
        now: Millis,
    ) -> MqResult<PublishReport> {
        publish_on(conn, topic, msgs, now).await
    }

    /// Deletes the stored messages of `topic` in the partitions `keys` that
    /// every group is done with, in the caller's transaction (the store's
    /// retention deletes a build's messages with the build); returns how
    /// many. Their ids no longer deduplicate a republish: the caller owns
    /// those partitions and knows nothing publishes to them again. Messages
    /// still pending stay. The partitions' emptied rows go with the next
    /// [`Admin::gc`](crate::Admin::gc). Done messages are never read again
    /// (claims read above the cursor), so no partition lock is taken.
    pub async fn forget_partitions_in_tx(
        conn: &mut MySqlConnection,
        topic: &str,
        keys: &[String],
    ) -> MqResult<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        // MySQL cannot delete from a table its subquery reads: the
        // positions first, then a delete by primary key.
        let mut select =
            QueryBuilder::<MySql>::new("SELECT m.seq FROM mq_messages m WHERE m.topic = ");
        select.push_bind(topic);
        select.push(" AND m.partition_key IN (");
        let mut sep = select.separated(", ");
        for k in keys {
            sep.push_bind(k.as_str());
        }
        select.push(
            ") AND m.seq <= (SELECT MIN(p.`cursor`) FROM mq_partitions p WHERE p.topic = m.topic \
             AND p.partition_key = m.partition_key)",
        );
        let seqs: Vec<i64> = select.build_query_scalar().fetch_all(&mut *conn).await?;
        if seqs.is_empty() {
            return Ok(0);
        }
        let mut delete = QueryBuilder::<MySql>::new("DELETE FROM mq_messages WHERE seq IN (");
        let mut sep = delete.separated(", ");
        for s in &seqs {
            sep.push_bind(*s);
        }
        delete.push(")");
        Ok(delete.build().execute(&mut *conn).await?.rows_affected())
    }

    async fn begin(&self) -> MqResult<Transaction<'static, MySql>> {
        Ok(self.pool.begin().await?)
    }
}

/// A name column (VARBINARY) as text.
fn text(row: &MySqlRow, i: usize) -> MqResult<String> {
    let raw: Vec<u8> = row.try_get(i)?;
    String::from_utf8(raw).map_err(|e| MqError::Corrupt(format!("stored name: {e}")))
}

fn opt_text(row: &MySqlRow, i: usize) -> MqResult<Option<String>> {
    let raw: Option<Vec<u8>> = row.try_get(i)?;
    raw.map(|r| String::from_utf8(r).map_err(|e| MqError::Corrupt(format!("stored name: {e}"))))
        .transpose()
}

/// Holds the topic's row: shared for publishes, exclusive for new groups.
async fn lock_topic(conn: &mut MySqlConnection, topic: &str, exclusive: bool) -> MqResult<()> {
    let sql = if exclusive {
        "SELECT topic FROM mq_topics WHERE topic = ? FOR UPDATE"
    } else {
        "SELECT topic FROM mq_topics WHERE topic = ? LOCK IN SHARE MODE"
    };
    let found = sqlx::query(sql)
        .bind(topic)
        .fetch_optional(&mut *conn)
        .await?;
    if found.is_none() {
        sqlx::query("INSERT IGNORE INTO mq_topics (topic) VALUES (?)")
            .bind(topic)
            .execute(&mut *conn)
            .await?;
        sqlx::query(sql).bind(topic).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Locks partition rows one by one in the global order (`keys` sorted).
async fn lock_partitions(conn: &mut MySqlConnection, keys: &[(&str, &str, &str)]) -> MqResult<()> {
    for (t, g, k) in keys {
        sqlx::query(
            "SELECT 1 FROM mq_partitions WHERE topic = ? AND grp = ? AND partition_key = ? FOR UPDATE",
        )
        .bind(*t)
        .bind(*g)
        .bind(*k)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

async fn groups_of(conn: &mut MySqlConnection, topic: &str) -> MqResult<Vec<String>> {
    let rows = sqlx::query("SELECT grp FROM mq_groups WHERE topic = ? ORDER BY grp")
        .bind(topic)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(|r| text(r, 0)).collect()
}

/// Most rows one multi-row INSERT of a publish writes.
const ROWS_PER_STATEMENT: usize = 200;
/// Payload bytes after which a publish starts its next INSERT (MariaDB's
/// default `max_allowed_packet` is 16 MiB; a payload may be 1 MiB).
const BYTES_PER_STATEMENT: usize = 4 * 1024 * 1024;

async fn publish_on(
    conn: &mut MySqlConnection,
    topic: &str,
    msgs: &[NewMessage],
    now: Millis,
) -> MqResult<PublishReport> {
    if msgs.is_empty() {
        return Ok(PublishReport::default());
    }
    lock_topic(conn, topic, false).await?;
    let groups = groups_of(conn, topic).await?;
    if !groups.is_empty() {
        let mut due: BTreeMap<&str, Millis> = BTreeMap::new();
        for m in msgs {
            let e = due
                .entry(m.message.partition_key.as_str())
                .or_insert(m.available_at);
            *e = (*e).min(m.available_at);
        }
        // In (group, partition) order: the global lock order (a multi-row
        // INSERT writes, and locks, its rows in the order of its VALUES).
        let rows: Vec<(&str, &str, Millis)> = groups
            .iter()
            .flat_map(|g| due.iter().map(move |(p, at)| (g.as_str(), *p, *at)))
            .collect();
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<MySql>::new(
                "INSERT INTO mq_partitions (topic, grp, partition_key, `cursor`, next_due, lease_owner, lease_expires) ",
            );
            q.push_values(chunk, |mut b, (g, p, at)| {
                b.push_bind(topic)
                    .push_bind(*g)
                    .push_bind(*p)
                    .push("0")
                    .push_bind(*at)
                    .push("NULL")
                    .push("0");
            });
            q.push(
                " ON DUPLICATE KEY UPDATE \
                 next_due = IF(next_due IS NULL OR next_due > VALUES(next_due), VALUES(next_due), next_due)",
            );
            q.build().execute(&mut *conn).await?;
        }
    }
    let mut report = PublishReport::default();
    // Several messages per statement (rows are numbered in VALUES order),
    // each statement well below the server's packet limit.
    let mut rest = msgs;
    while !rest.is_empty() {
        let mut take = 0;
        let mut bytes = 0;
        while take < rest.len() && take < ROWS_PER_STATEMENT {
            bytes += rest[take].message.payload.len();
            take += 1;
            if bytes >= BYTES_PER_STATEMENT {
                break;
            }
        }
        let (chunk, tail) = rest.split_at(take);
        rest = tail;
        // IGNORE only ever skips the duplicate key here: every other value
        // was validated (lengths fit the columns).
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT IGNORE INTO mq_messages (topic, partition_key, msg_id, payload, metadata, published_at, available_at, created_at) ",
        );
        q.push_values(chunk, |mut b, m| {
            b.push_bind(topic)
                .push_bind(&m.message.partition_key)
                .push_bind(&m.message.id)
                .push_bind(&m.message.payload)
                .push_bind(encode_meta(&m.message.metadata))
                .push_bind(now)
                .push_bind(m.available_at)
                .push_bind(now);
        });
        let stored = q.build().execute(&mut *conn).await?.rows_affected() as usize;
        report.stored += stored;
        report.duplicates += chunk.len() - stored;
    }
    Ok(report)
}

/// Copies a stored message into the dead letters (re-dead-lettering the same
/// id refreshes the failure instead of failing).
async fn insert_dead_letter(
    conn: &mut MySqlConnection,
    topic: &str,
    group: &str,
    seq: i64,
    attempts: u32,
    failure: &Failure,
    now: Millis,
) -> MqResult<()> {
    sqlx::query(
        "INSERT INTO mq_dead_letters (topic, grp, partition_key, msg_id, payload, metadata, failure_message, \
         failure_detail, attempts, published_at, failed_at) \
         SELECT topic, ?, partition_key, msg_id, payload, metadata, ?, ?, ?, published_at, ? \
         FROM mq_messages WHERE seq = ? AND topic = ? \
         ON DUPLICATE KEY UPDATE payload = VALUES(payload), metadata = VALUES(metadata), \
         failure_message = VALUES(failure_message), failure_detail = VALUES(failure_detail), \
         attempts = VALUES(attempts), published_at = VALUES(published_at), failed_at = VALUES(failed_at)",
    )
    .bind(group)
    .bind(&failure.message)
    .bind(encode_detail(&failure.detail))
    .bind(attempts as i32)
    .bind(now)
    .bind(seq)
    .bind(topic)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A stored message's id, payload, metadata JSON and publish time.
type StoredBody = (String, Vec<u8>, Option<String>, Millis);

async fn claim_on(conn: &mut MySqlConnection, req: &ClaimRequest) -> MqResult<ClaimResult> {
    let now = req.now;
    let due_rows = sqlx::query(
        "SELECT partition_key, `cursor`, lease_owner, lease_expires FROM mq_partitions \
         WHERE topic = ? AND grp = ? AND next_due <= ? \
         AND (lease_owner = ? OR lease_owner IS NULL OR lease_expires <= ?) \
         ORDER BY next_due LIMIT ? FOR UPDATE SKIP LOCKED",
    )
    .bind(&req.topic)
    .bind(&req.group)
    .bind(now)
    .bind(&req.subscriber)
    .bind(now)
    .bind((req.max_messages + 16) as i64)
    .fetch_all(&mut *conn)
    .await?;

    let mut result = ClaimResult::default();
    let mut may_acquire = req.may_acquire;
    let scan = req.batch_size as i64 + SCAN_LIMIT_EXTRA;
    let until = now + req.visibility_ms;
    for row in &due_rows {
        if result.messages.len() >= req.max_messages {
            break;
        }
        let partition = text(row, 0)?;
        let cursor: i64 = row.try_get(1)?;
        let owner = opt_text(row, 2)?;
        let expires: i64 = row.try_get(3)?;
        let owned = owner.as_deref() == Some(req.subscriber.as_str()) && expires > now;
        if !owned {
            if may_acquire == 0 {
                continue;
            }
            may_acquire -= 1;
            result.acquired += 1;
            if let Some(prev) = owner.as_deref().filter(|o| *o != req.subscriber) {
                result.taken_over += take_over(conn, req, prev, &partition, cursor).await?;
            }
        }
        let rows = sqlx::query(
            "SELECT m.seq, m.available_at, s.attempt, s.invisible_until, s.postponed, s.done, \
             m.msg_id, m.payload, m.metadata, m.published_at \
             FROM mq_messages m LEFT JOIN mq_state s ON s.grp = ? AND s.seq = m.seq \
             WHERE m.topic = ? AND m.partition_key = ? AND m.seq > ? ORDER BY m.seq LIMIT ?",
        )
        .bind(&req.group)
        .bind(&req.topic)
        .bind(&partition)
        .bind(cursor)
        .bind(scan + 1)
        .fetch_all(&mut *conn)
        .await?;
        let truncated = rows.len() as i64 > scan;
        let mut window = Vec::with_capacity(rows.len());
        let mut bodies: HashMap<i64, StoredBody> = HashMap::new();
        for r in rows.iter().take(scan as usize) {
            let seq: i64 = r.try_get(0)?;
            let attempt: Option<i32> = r.try_get(2)?;
            let state = match attempt {
                Some(a) => Some(RowState {
                    attempt: a.max(0) as u32,
                    invisible_until: r.try_get::<Option<i64>, _>(3)?.unwrap_or(0),
                    postponed: r.try_get::<Option<i8>, _>(4)?.unwrap_or(0) != 0,
                    done: r.try_get::<Option<i8>, _>(5)?.unwrap_or(0) != 0,
                }),
                None => None,
            };
            window.push(WindowRow {
                seq,
                available_at: r.try_get(1)?,
                state,
            });
            bodies.insert(
                seq,
                (text(r, 6)?, r.try_get(7)?, r.try_get(8)?, r.try_get(9)?),
            );
        }
        let plan = plan_window(
            cursor,
            &window,
            truncated,
            WindowLimits::for_claim(req, result.messages.len()),
        );
        for (seq, attempts) in &plan.exhausted {
            let failure = exhausted_failure(*attempts);
            insert_dead_letter(conn, &req.topic, &req.group, *seq, *attempts, &failure, now)
                .await?;
            sqlx::query("UPDATE mq_state SET done = 1, claimed = 0 WHERE grp = ? AND seq = ?")
                .bind(&req.group)
                .bind(seq)
                .execute(&mut *conn)
                .await?;
            result.dead_lettered += 1;
        }
        // The cursor passes these rows: their delivery state is never read
        // again, and only this transaction can hold them.
        let passed: Vec<i64> = window
            .iter()
            .filter(|w| w.seq <= plan.cursor && w.state.is_some())
            .map(|w| w.seq)
            .collect();
        if !passed.is_empty() {
            let mut q = QueryBuilder::<MySql>::new("DELETE FROM mq_state WHERE grp = ");
            q.push_bind(&req.group).push(" AND seq IN (");
            let mut sep = q.separated(", ");
            for s in &passed {
                sep.push_bind(*s);
            }
            q.push(")");
            q.build().execute(&mut *conn).await?;
        }
        for (seq, attempt) in &plan.deliver {
            let Some((id, payload, metadata, published_at)) = bodies.remove(seq) else {
                continue;
            };
            let token = rand::random::<i64>() & i64::MAX;
            sqlx::query(
                "INSERT INTO mq_state (grp, seq, topic, partition_key, attempt, invisible_until, postponed, done, claimed, token) \
                 VALUES (?, ?, ?, ?, ?, ?, 0, 0, 1, ?) ON DUPLICATE KEY UPDATE attempt = VALUES(attempt), \
                 invisible_until = VALUES(invisible_until), postponed = 0, done = 0, claimed = 1, token = VALUES(token), \
                 woken = 0",
            )
            .bind(&req.group)
            .bind(seq)
            .bind(&req.topic)
            .bind(&partition)
            .bind(*attempt as i32)
            .bind(until)
            .bind(token)
            .execute(&mut *conn)
            .await?;
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
        sqlx::query(
            "UPDATE mq_partitions SET `cursor` = ?, next_due = ?, lease_owner = ?, lease_expires = ? \
             WHERE topic = ? AND grp = ? AND partition_key = ?",
        )
        .bind(plan.cursor)
        .bind(plan.next_due)
        .bind(&req.subscriber)
        .bind(lease_until)
        .bind(&req.topic)
        .bind(&req.group)
        .bind(&partition)
        .execute(&mut *conn)
        .await?;
    }
    let (held_due, any_due): (Option<Millis>, Option<Millis>) = sqlx::query_as(
        "SELECT \
           MIN(CASE WHEN lease_owner = ? AND lease_expires > ? THEN next_due END), MIN(next_due) \
         FROM mq_partitions WHERE topic = ? AND grp = ? AND next_due IS NOT NULL \
         AND (lease_owner = ? OR lease_owner IS NULL OR lease_expires <= ?)",
    )
    .bind(&req.subscriber)
    .bind(now)
    .bind(&req.topic)
    .bind(&req.group)
    .bind(&req.subscriber)
    .bind(now)
    .fetch_one(&mut *conn)
    .await?;
    (result.next_due, result.share_spent) = claim_due(now, may_acquire, held_due, any_due);
    if result.messages.is_empty() && result.dead_lettered == 0 {
        result.next_due = result.next_due.map(|d| d.max(now + LOCKED_RETRY_MS));
    }
    Ok(result)
}

/// Makes the in-flight deliveries of `partition` (locked by the claim)
/// deliverable now if its previous owner is dead (no heartbeat within the
/// lease); returns how many.
async fn take_over(
    conn: &mut MySqlConnection,
    req: &ClaimRequest,
    previous: &str,
    partition: &str,
    cursor: i64,
) -> MqResult<usize> {
    let alive = sqlx::query(
        "SELECT 1 FROM mq_subscribers WHERE topic = ? AND grp = ? AND subscriber = ? AND heartbeat_at > ?",
    )
    .bind(&req.topic)
    .bind(&req.group)
    .bind(previous)
    .bind(req.now - req.lease_ms)
    .fetch_optional(&mut *conn)
    .await?
    .is_some();
    if alive {
        return Ok(0);
    }
    let released = sqlx::query(
        "UPDATE mq_state SET invisible_until = ? WHERE grp = ? AND claimed = 1 AND done = 0 \
         AND invisible_until > ? AND seq IN (SELECT seq FROM mq_messages \
         WHERE topic = ? AND partition_key = ? AND seq > ?)",
    )
    .bind(req.now)
    .bind(&req.group)
    .bind(req.now)
    .bind(&req.topic)
    .bind(partition)
    .bind(cursor)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(released as usize)
}

async fn apply_on(
    conn: &mut MySqlConnection,
    outcomes: &[Outcome],
    now: Millis,
) -> MqResult<Vec<MqResult<()>>> {
    let keys: BTreeSet<(&str, &str, &str)> = outcomes
        .iter()
        .map(|o| (o.topic.as_str(), o.group.as_str(), o.partition_key.as_str()))
        .collect();
    let keys: Vec<(&str, &str, &str)> = keys.into_iter().collect();
    lock_partitions(conn, &keys).await?;
    const GUARD: &str = " WHERE grp = ? AND seq = ? AND token = ? AND done = 0";
    let mut results = Vec::with_capacity(outcomes.len());
    let mut due: BTreeMap<(&str, &str, &str), Millis> = BTreeMap::new();
    for o in outcomes {
        // Each assignment reads only its own column; a postpone reads the
        // wake mark first (the partition row is locked, so it cannot move).
        let (sql, value, due_at): (String, Option<i64>, Option<Millis>) = match &o.kind {
            OutcomeKind::Ack | OutcomeKind::DeadLetter { .. } => (
                format!("UPDATE mq_state SET done = 1, claimed = 0{GUARD}"),
                None,
                Some(now),
            ),
            OutcomeKind::Retry { retry_at, .. } => (
                format!("UPDATE mq_state SET invisible_until = ?, postponed = 0, claimed = 0{GUARD}"),
                Some(*retry_at),
                Some(*retry_at),
            ),
            OutcomeKind::Postpone { until } => {
                // A wake during the delivery ends the hold now (ADR 0012).
                let woken: Option<bool> = sqlx::query_scalar(
                    "SELECT woken <> 0 FROM mq_state WHERE grp = ? AND seq = ? AND token = ? AND done = 0",
                )
                .bind(&o.group)
                .bind(o.seq)
                .bind(o.token)
                .fetch_optional(&mut *conn)
                .await?;
                let at = if woken == Some(true) { now } else { *until };
                (
                    format!("UPDATE mq_state SET invisible_until = ?, postponed = 1, attempt = 0, claimed = 0, woken = 0{GUARD}"),
                    Some(at),
                    Some(at),
                )
            }
            OutcomeKind::Extend { until } => (
                format!("UPDATE mq_state SET invisible_until = ?{GUARD}"),
                Some(*until),
                None,
            ),
            OutcomeKind::Release => (
                format!("UPDATE mq_state SET invisible_until = ?, attempt = GREATEST(attempt - 1, 0), claimed = 0{GUARD}"),
                Some(now),
                Some(now),
            ),
        };
        let mut q = sqlx::query(&sql);
        if let Some(v) = value {
            q = q.bind(v);
        }
        // The connection reports matched rows (CLIENT_FOUND_ROWS), so an
        // extend to the same time still counts as live.
        let affected = q
            .bind(&o.group)
            .bind(o.seq)
            .bind(o.token)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        if affected == 0 {
            results.push(Err(MqError::StaleDelivery(o.message_id.clone())));
            continue;
        }
        if let OutcomeKind::DeadLetter { failure } = &o.kind {
            insert_dead_letter(conn, &o.topic, &o.group, o.seq, o.attempt, failure, now).await?;
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
        sqlx::query(
            "UPDATE mq_partitions SET next_due = ? WHERE topic = ? AND grp = ? AND partition_key = ? \
             AND (next_due IS NULL OR next_due > ?)",
        )
        .bind(at)
        .bind(topic)
        .bind(group)
        .bind(partition)
        .bind(at)
        .execute(&mut *conn)
        .await?;
    }
    Ok(results)
}

/// Sets columns of the listed partitions (already locked by this transaction).
async fn update_partitions(
    conn: &mut MySqlConnection,
    set: &str,
    topic: &str,
    group: &str,
    keys: &[String],
) -> MqResult<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut q =
        QueryBuilder::<MySql>::new(format!("UPDATE mq_partitions SET {set} WHERE topic = "));
    q.push_bind(topic)
        .push(" AND grp = ")
        .push_bind(group)
        .push(" AND partition_key IN (");
    let mut sep = q.separated(", ");
    for k in keys {
        sep.push_bind(k);
    }
    q.push(")");
    q.build().execute(&mut *conn).await?;
    Ok(())
}

async fn lease_tick_on(conn: &mut MySqlConnection, t: &LeaseTick) -> MqResult<LeaseReport> {
    sqlx::query(
        "INSERT INTO mq_subscribers (topic, grp, subscriber, heartbeat_at) VALUES (?, ?, ?, ?) \
         ON DUPLICATE KEY UPDATE heartbeat_at = VALUES(heartbeat_at)",
    )
    .bind(&t.topic)
    .bind(&t.group)
    .bind(&t.subscriber)
    .bind(t.now)
    .execute(&mut *conn)
    .await?;
    let active: Vec<String> = sqlx::query(
        "SELECT subscriber FROM mq_subscribers WHERE topic = ? AND grp = ? AND heartbeat_at > ? ORDER BY subscriber",
    )
    .bind(&t.topic)
    .bind(&t.group)
    .bind(t.now - t.lease_ms)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| text(r, 0))
    .collect::<MqResult<_>>()?;
    let busy: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM mq_partitions WHERE topic = ? AND grp = ? \
         AND (next_due IS NOT NULL OR (lease_owner IS NOT NULL AND lease_expires > ?))",
    )
    .bind(&t.topic)
    .bind(&t.group)
    .bind(t.now)
    .fetch_one(&mut *conn)
    .await?;
    let cap = fair_share_cap(busy as usize, &active, &t.subscriber);
    // Only rows nobody holds right now: lease bookkeeping never waits, and
    // the next tick catches up on the rest.
    let held = sqlx::query(
        "SELECT partition_key, next_due FROM mq_partitions WHERE topic = ? AND grp = ? AND lease_owner = ? \
         ORDER BY partition_key FOR UPDATE SKIP LOCKED",
    )
    .bind(&t.topic)
    .bind(&t.group)
    .bind(&t.subscriber)
    .fetch_all(&mut *conn)
    .await?;
    let mut idle = Vec::new();
    let mut busy_keys = Vec::new();
    for r in &held {
        let k = text(r, 0)?;
        if r.try_get::<Option<i64>, _>(1)?.is_none() {
            idle.push(k);
        } else {
            busy_keys.push(k);
        }
    }
    update_partitions(
        conn,
        "lease_owner = NULL, lease_expires = 0",
        &t.topic,
        &t.group,
        &idle,
    )
    .await?;
    update_partitions(
        conn,
        &format!("lease_expires = {}", t.now + t.lease_ms),
        &t.topic,
        &t.group,
        &busy_keys,
    )
    .await?;
    let mine: Vec<String> = sqlx::query(
        "SELECT partition_key FROM mq_partitions WHERE topic = ? AND grp = ? AND lease_owner = ? ORDER BY partition_key",
    )
    .bind(&t.topic)
    .bind(&t.group)
    .bind(&t.subscriber)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| text(r, 0))
    .collect::<MqResult<_>>()?;
    if mine.len() > cap {
        // Shed only rows this transaction could lock.
        let lockable: BTreeSet<&String> = busy_keys.iter().collect();
        let shed: Vec<String> = mine[cap..]
            .iter()
            .filter(|k| lockable.contains(k))
            .cloned()
            .collect();
        update_partitions(
            conn,
            "lease_owner = NULL, lease_expires = 0",
            &t.topic,
            &t.group,
            &shed,
        )
        .await?;
    }
    if mine.len() < cap {
        // Dead owners' partitions whose only pending work may be their
        // in-flight deliveries: due now, so a claim takes them over.
        let expired = sqlx::query(
            "SELECT partition_key, lease_owner FROM mq_partitions WHERE topic = ? AND grp = ? \
             AND lease_owner IS NOT NULL AND lease_expires <= ? AND next_due > ? \
             ORDER BY partition_key FOR UPDATE SKIP LOCKED",
        )
        .bind(&t.topic)
        .bind(&t.group)
        .bind(t.now)
        .bind(t.now)
        .fetch_all(&mut *conn)
        .await?;
        let mut dead = Vec::new();
        for r in &expired {
            if !active.contains(&text(r, 1)?) {
                dead.push(text(r, 0)?);
            }
        }
        update_partitions(
            conn,
            &format!("next_due = {}", t.now),
            &t.topic,
            &t.group,
            &dead,
        )
        .await?;
    }
    Ok(LeaseReport {
        cap,
        owned: mine.len().min(cap),
        active_subscribers: active.len().max(1),
    })
}

async fn replay_on(
    conn: &mut MySqlConnection,
    topic: &str,
    dlq_id: i64,
    now: Millis,
) -> MqResult<()> {
    let row = sqlx::query(
        "SELECT partition_key, msg_id, payload, metadata FROM mq_dead_letters WHERE dlq_id = ? AND topic = ? FOR UPDATE",
    )
    .bind(dlq_id)
    .bind(topic)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Err(MqError::UnknownDeadLetter {
            topic: topic.to_string(),
            id: dlq_id,
        });
    };
    let partition_key = text(&row, 0)?;
    let id = text(&row, 1)?;
    let payload: Vec<u8> = row.try_get(2)?;
    let metadata: Option<String> = row.try_get(3)?;
    lock_topic(conn, topic, false).await?;
    let groups = groups_of(conn, topic).await?;
    let keys: Vec<(&str, &str, &str)> = groups
        .iter()
        .map(|g| (topic, g.as_str(), partition_key.as_str()))
        .collect();
    lock_partitions(conn, &keys).await?;
    // The stored original still holds the id; remove it so the replayed copy
    // is a new message after every group's cursor.
    sqlx::query("DELETE FROM mq_messages WHERE topic = ? AND partition_key = ? AND msg_id = ?")
        .bind(topic)
        .bind(&partition_key)
        .bind(&id)
        .execute(&mut *conn)
        .await?;
    let message = Message {
        id,
        partition_key,
        payload,
        metadata: decode_meta(metadata)?,
    };
    publish_on(
        conn,
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
        .execute(&mut *conn)
        .await?;
    Ok(())
}

#[async_trait]
impl Driver for MySqlDriver {
    fn name(&self) -> &'static str {
        "mysql"
    }

    async fn publish(
        &self,
        topic: &str,
        msgs: &[NewMessage],
        now: Millis,
    ) -> MqResult<PublishReport> {
        let mut tx = self.begin().await?;
        let report = publish_on(&mut tx, topic, msgs, now).await?;
        tx.commit().await?;
        Ok(report)
    }

    async fn register_group(&self, topic: &str, group: &str, now: Millis) -> MqResult<()> {
        let mut tx = self.begin().await?;
        lock_topic(&mut tx, topic, true).await?;
        let exists = sqlx::query("SELECT 1 FROM mq_groups WHERE topic = ? AND grp = ?")
            .bind(topic)
            .bind(group)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if !exists {
            sqlx::query("INSERT INTO mq_groups (topic, grp, created_at) VALUES (?, ?, ?)")
                .bind(topic)
                .bind(group)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT IGNORE INTO mq_partitions (topic, grp, partition_key, `cursor`, next_due, lease_owner, lease_expires) \
                 SELECT topic, ?, partition_key, 0, MIN(available_at), NULL, 0 FROM mq_messages WHERE topic = ? \
                 GROUP BY topic, partition_key",
            )
            .bind(group)
            .bind(topic)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn lease_tick(&self, t: &LeaseTick) -> MqResult<LeaseReport> {
        let mut tx = self.begin().await?;
        let report = lease_tick_on(&mut tx, t).await?;
        tx.commit().await?;
        Ok(report)
    }

    async fn deregister(&self, topic: &str, group: &str, subscriber: &str) -> MqResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM mq_subscribers WHERE topic = ? AND grp = ? AND subscriber = ?")
            .bind(topic)
            .bind(group)
            .bind(subscriber)
            .execute(&mut *tx)
            .await?;
        let owned: Vec<String> = sqlx::query(
            "SELECT partition_key FROM mq_partitions WHERE topic = ? AND grp = ? AND lease_owner = ? \
             ORDER BY partition_key FOR UPDATE",
        )
        .bind(topic)
        .bind(group)
        .bind(subscriber)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| text(r, 0))
        .collect::<MqResult<_>>()?;
        update_partitions(
            &mut tx,
            "lease_owner = NULL, lease_expires = 0",
            topic,
            group,
            &owned,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn recover(
        &self,
        topic: &str,
        group: &str,
        subscriber: &str,
        now: Millis,
    ) -> MqResult<u64> {
        let mut tx = self.begin().await?;
        let owned: Vec<String> = sqlx::query(
            "SELECT partition_key FROM mq_partitions WHERE topic = ? AND grp = ? AND lease_owner = ? \
             ORDER BY partition_key FOR UPDATE",
        )
        .bind(topic)
        .bind(group)
        .bind(subscriber)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| text(r, 0))
        .collect::<MqResult<_>>()?;
        let mut released = 0;
        for p in &owned {
            released += sqlx::query(
                "UPDATE mq_state SET invisible_until = ? WHERE grp = ? AND claimed = 1 AND done = 0 \
                 AND invisible_until > ? AND seq IN (SELECT seq FROM mq_messages WHERE topic = ? AND partition_key = ?)",
            )
            .bind(now)
            .bind(group)
            .bind(now)
            .bind(topic)
            .bind(p)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        sqlx::query(
            "UPDATE mq_partitions SET next_due = ? WHERE topic = ? AND grp = ? AND lease_owner = ? \
             AND next_due IS NOT NULL AND next_due > ?",
        )
        .bind(now)
        .bind(topic)
        .bind(group)
        .bind(subscriber)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(released)
    }

    async fn claim(&self, req: &ClaimRequest) -> MqResult<ClaimResult> {
        let mut tx = self.begin().await?;
        let result = claim_on(&mut tx, req).await?;
        tx.commit().await?;
        Ok(result)
    }

    async fn apply(&self, outcomes: &[Outcome], now: Millis) -> MqResult<Vec<MqResult<()>>> {
        if outcomes.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin().await?;
        let results = apply_on(&mut tx, outcomes, now).await?;
        tx.commit().await?;
        Ok(results)
    }

    async fn wake(&self, topic: &str, partition_key: &str, now: Millis) -> MqResult<u64> {
        let mut tx = self.begin().await?;
        let groups = groups_of(&mut tx, topic).await?;
        let keys: Vec<(&str, &str, &str)> = groups
            .iter()
            .map(|g| (topic, g.as_str(), partition_key))
            .collect();
        lock_partitions(&mut tx, &keys).await?;
        // Postponed → due now; in flight → marked, its postpone ends at
        // once; delayed by `publish_after` → available now (ADR 0012).
        let mut woken = 0;
        for g in &groups {
            woken += sqlx::query(
                "UPDATE mq_state SET invisible_until = ? WHERE grp = ? \
                 AND seq IN (SELECT seq FROM mq_messages WHERE topic = ? AND partition_key = ?) \
                 AND postponed = 1 AND done = 0 AND invisible_until > ?",
            )
            .bind(now)
            .bind(g)
            .bind(topic)
            .bind(partition_key)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            woken += sqlx::query(
                "UPDATE mq_state SET woken = 1 WHERE grp = ? \
                 AND seq IN (SELECT seq FROM mq_messages WHERE topic = ? AND partition_key = ?) \
                 AND claimed = 1 AND done = 0 AND woken = 0",
            )
            .bind(g)
            .bind(topic)
            .bind(partition_key)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        woken += sqlx::query(
            "UPDATE mq_messages SET available_at = ? \
             WHERE topic = ? AND partition_key = ? AND available_at > ?",
        )
        .bind(now)
        .bind(topic)
        .bind(partition_key)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query(
            "UPDATE mq_partitions SET next_due = ? WHERE topic = ? AND partition_key = ? \
             AND next_due IS NOT NULL AND next_due > ?",
        )
        .bind(now)
        .bind(topic)
        .bind(partition_key)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(woken)
    }

    async fn dead_letters(
        &self,
        topic: &str,
        after_id: i64,
        limit: usize,
    ) -> MqResult<Vec<DeadLetter>> {
        let rows = sqlx::query(
            "SELECT dlq_id, topic, grp, partition_key, msg_id, payload, metadata, failure_message, failure_detail, \
             attempts, published_at, failed_at FROM mq_dead_letters WHERE topic = ? AND dlq_id > ? ORDER BY dlq_id LIMIT ?",
        )
        .bind(topic)
        .bind(after_id)
        .bind(limit.min(i64::MAX as usize) as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DeadLetter {
                    dlq_id: r.try_get(0)?,
                    original_topic: text(r, 1)?,
                    group: text(r, 2)?,
                    message: Message {
                        id: text(r, 4)?,
                        partition_key: text(r, 3)?,
                        payload: r.try_get(5)?,
                        metadata: decode_meta(r.try_get(6)?)?,
                    },
                    failure: Failure {
                        message: r.try_get(7)?,
                        detail: decode_detail(r.try_get(8)?),
                    },
                    attempts: r.try_get::<i32, _>(9)?.max(0) as u32,
                    published_at: r.try_get(10)?,
                    failed_at: r.try_get(11)?,
                })
            })
            .collect()
    }

    async fn replay_dead_letter(&self, topic: &str, dlq_id: i64, now: Millis) -> MqResult<()> {
        let mut tx = self.begin().await?;
        replay_on(&mut tx, topic, dlq_id, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn prune_dead_letters(&self, failed_before: Millis, limit: usize) -> MqResult<u64> {
        // MySQL refuses LIMIT in an IN subquery; a single-table DELETE
        // takes ORDER BY and LIMIT itself.
        Ok(
            sqlx::query("DELETE FROM mq_dead_letters WHERE failed_at < ? ORDER BY dlq_id LIMIT ?")
                .bind(failed_before)
                .bind(limit.min(i64::MAX as usize) as i64)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }

    async fn count_dead_letters_before(&self, failed_before: Millis) -> MqResult<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM mq_dead_letters WHERE failed_at < ?")
            .bind(failed_before)
            .fetch_one(&self.pool)
            .await?;
        Ok(n as u64)
    }

    async fn gc(&self, now: Millis, retention_ms: Millis, stale_ms: Millis) -> MqResult<GcReport> {
        let mut report = GcReport::default();
        loop {
            // Small transactions so publishers and consumers interleave.
            let seqs: Vec<i64> = sqlx::query_scalar(
                "SELECT m.seq FROM mq_messages m WHERE m.created_at < ? \
                 AND m.seq <= (SELECT MIN(p.`cursor`) FROM mq_partitions p WHERE p.topic = m.topic \
                 AND p.partition_key = m.partition_key) ORDER BY m.seq LIMIT ?",
            )
            .bind(now - retention_ms)
            .bind(GC_CHUNK)
            .fetch_all(&self.pool)
            .await?;
            if seqs.is_empty() {
                break;
            }
            let mut q = QueryBuilder::<MySql>::new("DELETE FROM mq_messages WHERE seq IN (");
            let mut sep = q.separated(", ");
            for s in &seqs {
                sep.push_bind(*s);
            }
            q.push(")");
            report.messages += q.build().execute(&self.pool).await?.rows_affected();
            if (seqs.len() as i64) < GC_CHUNK {
                break;
            }
        }
        loop {
            let mut tx = self.begin().await?;
            // Rows someone holds (a publish about to add a message) are left
            // for the next pass.
            let empty = sqlx::query(
                "SELECT topic, grp, partition_key FROM mq_partitions q \
                 WHERE q.next_due IS NULL AND q.lease_owner IS NULL AND NOT EXISTS \
                 (SELECT 1 FROM mq_messages m WHERE m.topic = q.topic AND m.partition_key = q.partition_key) \
                 ORDER BY topic, grp, partition_key LIMIT ? FOR UPDATE SKIP LOCKED",
            )
            .bind(GC_CHUNK)
            .fetch_all(&mut *tx)
            .await?;
            for r in &empty {
                let t: Vec<u8> = r.try_get(0)?;
                let g: Vec<u8> = r.try_get(1)?;
                let k: Vec<u8> = r.try_get(2)?;
                report.partitions += sqlx::query(
                    "DELETE FROM mq_partitions WHERE topic = ? AND grp = ? AND partition_key = ? \
                     AND next_due IS NULL AND lease_owner IS NULL",
                )
                .bind(t)
                .bind(g)
                .bind(k)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
            tx.commit().await?;
            if (empty.len() as i64) < GC_CHUNK {
                break;
            }
        }
        report.subscribers = sqlx::query("DELETE FROM mq_subscribers WHERE heartbeat_at <= ?")
            .bind(now - stale_ms)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(report)
    }

    async fn stats(&self, topic: &str, group: &str) -> MqResult<TopicStats> {
        let row = sqlx::query(
            "SELECT \
             (SELECT COUNT(*) FROM mq_messages WHERE topic = ?), \
             (SELECT COUNT(*) FROM mq_messages m JOIN mq_partitions p ON p.topic = m.topic AND p.grp = ? \
                AND p.partition_key = m.partition_key AND m.seq > p.`cursor` \
                WHERE m.topic = ? AND NOT EXISTS (SELECT 1 FROM mq_state s WHERE s.grp = ? AND s.seq = m.seq AND s.done = 1)), \
             (SELECT COUNT(*) FROM mq_partitions WHERE topic = ? AND grp = ?), \
             (SELECT COUNT(*) FROM mq_partitions WHERE topic = ? AND grp = ? AND lease_owner IS NOT NULL), \
             (SELECT COUNT(*) FROM mq_dead_letters WHERE topic = ?)",
        )
        .bind(topic)
        .bind(group)
        .bind(topic)
        .bind(group)
        .bind(topic)
        .bind(group)
        .bind(topic)
        .bind(group)
        .bind(topic)
        .fetch_one(&self.pool)
        .await?;
        let n = |i: usize| -> MqResult<u64> { Ok(row.try_get::<i64, _>(i)?.max(0) as u64) };
        Ok(TopicStats {
            stored: n(0)?,
            pending: n(1)?,
            partitions: n(2)?,
            leased: n(3)?,
            dead_letters: n(4)?,
        })
    }

    async fn groups(&self, topic: &str) -> MqResult<Vec<String>> {
        let mut conn = self.pool.acquire().await?;
        groups_of(&mut conn, topic).await
    }

    async fn partitions(&self, q: &PartitionQuery) -> MqResult<Vec<PartitionInfo>> {
        // The in-flight count reaches each message's state by primary key.
        let rows = sqlx::query(
            "SELECT p.partition_key, p.`cursor`, p.next_due, p.lease_owner, p.lease_expires, \
             (SELECT COUNT(*) FROM mq_messages m WHERE m.topic = p.topic AND m.partition_key = p.partition_key \
               AND m.seq > p.`cursor` AND EXISTS (SELECT 1 FROM mq_state s WHERE s.grp = p.grp \
               AND s.seq = m.seq AND s.claimed = 1 AND s.done = 0 AND s.invisible_until > ?)) \
             FROM mq_partitions p WHERE p.topic = ? AND p.grp = ? AND p.partition_key > ? \
             AND (? IS NULL OR p.lease_owner = ?) AND (? IS NULL OR p.next_due <= ?) \
             ORDER BY p.partition_key LIMIT ?",
        )
        .bind(q.now)
        .bind(&q.topic)
        .bind(&q.group)
        .bind(q.after.as_deref().unwrap_or(""))
        .bind(q.owner.as_deref())
        .bind(q.owner.as_deref())
        .bind(q.due_by)
        .bind(q.due_by)
        .bind(q.limit.min(i64::MAX as usize) as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(PartitionInfo::from_stored(
                    text(r, 0)?,
                    r.try_get(1)?,
                    r.try_get(2)?,
                    opt_text(r, 3)?,
                    r.try_get(4)?,
                    r.try_get(5)?,
                ))
            })
            .collect()
    }
}
