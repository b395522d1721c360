//! PostgreSQL backend: several stitch processes on one database.
//!
//! The partition row is the lock for everything below it (ADR 0004):
//! - a claim locks the due partitions it may serve with
//!   `FOR UPDATE SKIP LOCKED`, so claimers never wait for each other or for
//!   a publisher; a partition someone holds is simply served next time;
//! - every other writer of a partition's delivery state (outcomes, wake,
//!   recover, publish, replay) locks the partition rows first, blocking, in
//!   one global order (topic, group, partition key; byte-wise, the columns
//!   use the "C" collation) — no two of them can deadlock, and a claim never
//!   waits on a row they hold;
//! - a publish locks the partition rows of every group before its messages
//!   take their sequence numbers, so within a partition sequence order is
//!   commit order and a cursor can never pass a message still being written;
//! - a publish holds a shared advisory lock on its topic and registering a
//!   group an exclusive one, so a new group sees every committed message.
//!
//! Publishes, wakes and replays `NOTIFY` a channel after commit; every
//! driver `LISTEN`s on it (reconnecting when the connection drops) and hands
//! the topic to the engine, which wakes its subscriptions. Polling
//! (`poll_interval`) remains the fallback for anything missed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};

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
/// Partitions whose windows one claim statement reads at a time.
const WINDOW_CHUNK: usize = 64;
/// First key of the advisory locks that order publishes against new groups.
const TOPIC_LOCK_CLASS: i32 = 0x5174_6d71; // "Qtmq"
/// Connections of the pool opened by [`PostgresDriver::open`].
const POOL_SIZE: u32 = 10;
/// Longest pause between attempts to re-establish the listener.
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The windows of a chunk of due partitions: ($1 group, $2 topic, $3 keys,
/// $4 cursors, $5 rows per window).
const WINDOWS_SQL: &str = "SELECT u.ord, w.seq, w.available_at, w.attempt, w.invisible_until, w.postponed, w.done \
             FROM unnest($3::text[], $4::int8[]) WITH ORDINALITY AS u(k, c, ord) \
             CROSS JOIN LATERAL (SELECT m.seq, m.available_at, s.attempt, s.invisible_until, s.postponed, s.done \
               FROM mq_messages m LEFT JOIN LATERAL (SELECT attempt, invisible_until, postponed, done \
                 FROM mq_state WHERE grp = $1 AND seq = m.seq LIMIT 1) s ON TRUE \
               WHERE m.topic = $2 AND m.partition_key = u.k AND m.seq > u.c \
               ORDER BY m.seq LIMIT $5) w \
             ORDER BY u.ord, w.seq";

/// The stored messages with these sequence numbers ($1), each one key lookup.
const BODIES_SQL: &str =
    "SELECT seq, msg_id, payload, metadata, published_at FROM mq_messages WHERE seq = ANY($1)";

/// Deletes delivery state at or below its partition's cursor ($1 group, $2 topic).
const SWEEP_STATE_SQL: &str = "DELETE FROM mq_state s WHERE s.grp = $1 AND s.topic = $2 AND s.seq <= (SELECT p.cursor \
         FROM mq_partitions p WHERE p.topic = s.topic AND p.grp = s.grp AND p.partition_key = s.partition_key)";

/// Releases the idle partitions a subscriber holds ($1 topic, $2 group, $3 subscriber).
const RELEASE_IDLE_SQL: &str =
    "UPDATE mq_partitions SET lease_owner = NULL, lease_expires = 0 WHERE ctid = ANY(ARRAY( \
           SELECT ctid FROM mq_partitions WHERE topic = $1 AND grp = $2 AND lease_owner = $3 \
           AND next_due IS NULL FOR UPDATE SKIP LOCKED))";

/// Extends a subscriber's leases ($1 topic, $2 group, $3 subscriber, $4 until).
const EXTEND_LEASES_SQL: &str =
    "UPDATE mq_partitions SET lease_expires = $4 WHERE ctid = ANY(ARRAY( \
           SELECT ctid FROM mq_partitions WHERE topic = $1 AND grp = $2 AND lease_owner = $3 \
           FOR UPDATE SKIP LOCKED))";

/// Releases every partition a subscriber holds, waiting for rows in use
/// ($1 topic, $2 group, $3 subscriber).
const RELEASE_ALL_SQL: &str =
    "UPDATE mq_partitions SET lease_owner = NULL, lease_expires = 0 WHERE ctid = ANY(ARRAY( \
               SELECT ctid FROM mq_partitions WHERE topic = $1 AND grp = $2 AND lease_owner = $3 \
               ORDER BY partition_key FOR UPDATE))";

/// Makes the unfinished deliveries of a subscriber's partitions visible now
/// ($1 now, $2 group, $3 topic, $4 subscriber; the partitions are locked).
/// One key lookup of the partition per state row: a filter on a list of the
/// owned keys is a pass over the list per row.
const RECOVER_STATE_SQL: &str = "UPDATE mq_state s SET invisible_until = $1 WHERE s.grp = $2 AND s.topic = $3 \
     AND s.claimed AND NOT s.done AND s.invisible_until > $1 AND (SELECT p.lease_owner FROM mq_partitions p \
     WHERE p.topic = s.topic AND p.grp = s.grp AND p.partition_key = s.partition_key) = $4";

/// Makes a subscriber's partitions due now ($1 now, $2 group, $3 topic,
/// $4 subscriber; the partitions are locked).
const RECOVER_DUE_SQL: &str =
    "UPDATE mq_partitions SET next_due = $1 WHERE topic = $3 AND grp = $2 \
     AND lease_owner = $4 AND next_due IS NOT NULL AND next_due > $1";

/// Applies the queue's migrations (versions 1001+) in the pool's schema.
/// Other stitch components keep their own versions in the same table.
pub async fn migrate(pool: &PgPool) -> MqResult<()> {
    let mut migrator = sqlx::migrate!("./migrations/postgres");
    migrator.set_ignore_missing(true);
    migrator.run(pool).await?;
    Ok(())
}

/// Connection options from a `postgres://` URL, with stitch's application
/// name (so operators can find the queue's connections in `pg_stat_activity`)
/// unless the URL names one (`?application_name=…`): an operator running
/// several installations tells them apart by it.
pub fn connect_options(url: &str) -> MqResult<PgConnectOptions> {
    let options = PgConnectOptions::from_str(url)?;
    if options.get_application_name().is_some() {
        return Ok(options);
    }
    Ok(options.application_name("stitch"))
}

/// The `NOTIFY` channel of the queue in `schema`. Channels are global to the
/// database, so they are qualified by schema: queues in different schemas
/// (tests, several installations) do not wake each other. A transaction that
/// publishes with [`PostgresDriver::publish_in_tx`] names this channel.
pub fn channel_for_schema(schema: &str) -> String {
    format!("stitch_mq.{schema}")
}

/// What a transaction that publishes several times has done so far (see
/// [`PostgresDriver::publish_in_session`]): the topics whose lock it holds,
/// with their groups, and the topics to wake at its end.
#[derive(Debug, Default)]
pub struct PublishSession {
    groups: HashMap<String, Vec<String>>,
    notify: BTreeSet<String>,
}

impl PublishSession {
    /// Forgets the topic locks: call after rolling back to a savepoint,
    /// which releases locks taken since (the wake-ups are kept; a spare one
    /// costs a poll).
    pub fn forget_locks(&mut self) {
        self.groups.clear();
    }
}

/// The PostgreSQL driver. Cheap to clone.
#[derive(Clone)]
pub struct PostgresDriver {
    pool: PgPool,
    channel: Arc<str>,
    wakeups: broadcast::Sender<String>,
    /// Stops the listener and the statistics keeper when the last clone is
    /// dropped.
    _listener: Arc<DropGuard>,
}

impl PostgresDriver {
    /// Connects to `url` (a `postgres://` URL; `?options=-csearch_path%3D…`
    /// selects a schema) and applies migrations.
    pub async fn open(url: &str) -> MqResult<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(connect_options(url)?)
            .await?;
        Self::from_pool(pool).await
    }

    /// Uses an existing pool (shared with the build store); applies
    /// migrations and starts listening for other processes' publishes.
    pub async fn from_pool(pool: PgPool) -> MqResult<Self> {
        migrate(&pool).await?;
        let schema: String = sqlx::query_scalar("SELECT current_schema()::text")
            .fetch_one(&pool)
            .await?;
        let channel: Arc<str> = channel_for_schema(&schema).into();
        let (wakeups, _) = broadcast::channel(1024);
        let stop = CancellationToken::new();
        tokio::spawn(listen(
            pool.clone(),
            channel.clone(),
            wakeups.clone(),
            stop.clone(),
        ));
        tokio::spawn(crate::pg_statistics::keep_fresh(pool.clone(), stop.clone()));
        Ok(Self {
            pool,
            channel,
            wakeups,
            _listener: Arc::new(stop.drop_guard()),
        })
    }

    /// Analyzes the queue's tables whose planner statistics lag far behind
    /// their size now, instead of at the next background check (tests and
    /// benchmarks that fill a fresh schema use it); returns their names.
    pub async fn refresh_statistics(&self) -> MqResult<Vec<String>> {
        Ok(crate::pg_statistics::analyze_grown_tables(&self.pool).await?)
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The `NOTIFY` channel of this driver's schema.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Publishes inside the caller's transaction: nothing is visible (and no
    /// other process is notified) until it commits, and a rollback publishes
    /// nothing. Call `Publisher::notify_published` after the commit for an
    /// immediate wake-up in this process. Validate messages first with
    /// `Publisher::prepare`. `channel` is [`PostgresDriver::channel`].
    pub async fn publish_in_tx(
        conn: &mut PgConnection,
        channel: &str,
        topic: &str,
        msgs: &[NewMessage],
        now: Millis,
    ) -> MqResult<PublishReport> {
        publish_on(conn, channel, topic, msgs, now).await
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
        conn: &mut PgConnection,
        topic: &str,
        keys: &[String],
    ) -> MqResult<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        Ok(sqlx::query(
            "DELETE FROM mq_messages WHERE seq IN (SELECT m.seq FROM mq_messages m \
             WHERE m.topic = $1 AND m.partition_key = ANY($2) \
             AND m.seq <= (SELECT MIN(p.cursor) FROM mq_partitions p WHERE p.topic = m.topic \
             AND p.partition_key = m.partition_key))",
        )
        .bind(topic)
        .bind(keys)
        .execute(&mut *conn)
        .await?
        .rows_affected())
    }

    /// Publishes inside the caller's transaction like
    /// [`PostgresDriver::publish_in_tx`], for a transaction that publishes
    /// many times (the store's group commit): the topic's lock and its
    /// groups are taken once per transaction, not per publish, and the
    /// `NOTIFY` is left to [`PostgresDriver::finish_session`].
    pub async fn publish_in_session(
        conn: &mut PgConnection,
        session: &mut PublishSession,
        topic: &str,
        msgs: &[NewMessage],
        now: Millis,
    ) -> MqResult<PublishReport> {
        if msgs.is_empty() {
            return Ok(PublishReport::default());
        }
        let groups = match session.groups.get(topic) {
            Some(groups) => groups.clone(),
            None => {
                let groups = lock_topic_groups(conn, topic).await?;
                session.groups.insert(topic.to_string(), groups.clone());
                groups
            }
        };
        let report = insert_published(conn, topic, &groups, msgs, now).await?;
        if report.stored > 0 {
            session.notify.insert(topic.to_string());
        }
        Ok(report)
    }

    /// Sends the session's wake-ups; call last before `COMMIT` (they are
    /// delivered when the transaction commits, and not at all if it rolls
    /// back).
    pub async fn finish_session(
        conn: &mut PgConnection,
        channel: &str,
        session: &mut PublishSession,
    ) -> MqResult<()> {
        for topic in std::mem::take(&mut session.notify) {
            notify(conn, channel, &topic).await?;
        }
        session.groups.clear();
        Ok(())
    }

    async fn begin(&self) -> MqResult<Transaction<'static, Postgres>> {
        Ok(self.pool.begin().await?)
    }
}

/// Listens on `channel` for topics with new work and forwards them to the
/// engine. A lost connection is re-established (with a capped backoff) and
/// followed by a wake-up of every topic, since notifications sent while it
/// was down are gone.
async fn listen(
    pool: PgPool,
    channel: Arc<str>,
    out: broadcast::Sender<String>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let connected = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(&channel).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            _ = stop.cancelled() => return,
            r = connected => match r {
                Ok(l) => l,
                Err(e) => {
                    if pool.is_closed() {
                        return;
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff, "queue listener cannot connect; polling meanwhile");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(LISTEN_BACKOFF_MAX);
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(50);
        let _ = out.send(crate::driver::WAKE_ALL.to_string());
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                n = listener.try_recv() => n,
            };
            match next {
                Ok(Some(n)) => {
                    let _ = out.send(n.payload().to_string());
                }
                // The connection dropped and was re-established (it listens
                // again by itself); anything sent meanwhile was missed.
                Ok(None) => {
                    tracing::info!("queue listener reconnected");
                    let _ = out.send(crate::driver::WAKE_ALL.to_string());
                }
                Err(e) => {
                    if pool.is_closed() {
                        return;
                    }
                    tracing::warn!(error = %e, "queue listener lost its connection; reconnecting");
                    break;
                }
            }
        }
    }
}

/// Takes the topic's advisory lock for this transaction: shared for
/// publishes, exclusive for registering a group.
async fn lock_topic(conn: &mut PgConnection, topic: &str, exclusive: bool) -> MqResult<()> {
    let sql = if exclusive {
        "SELECT pg_advisory_xact_lock($1, hashtext($2))::text"
    } else {
        "SELECT pg_advisory_xact_lock_shared($1, hashtext($2))::text"
    };
    sqlx::query(sql)
        .bind(TOPIC_LOCK_CLASS)
        .bind(topic)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Locks partition rows, blocking, in the global order. `keys` are
/// (topic, group, partition) and must already be sorted and unique.
async fn lock_partitions(conn: &mut PgConnection, keys: &[(&str, &str, &str)]) -> MqResult<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let (t, g, k) = split3(keys);
    sqlx::query(
        "SELECT 1 FROM mq_partitions p \
         JOIN unnest($1::text[], $2::text[], $3::text[]) AS u(t, g, k) \
         ON p.topic = u.t AND p.grp = u.g AND p.partition_key = u.k \
         ORDER BY p.topic, p.grp, p.partition_key FOR UPDATE OF p",
    )
    .bind(t)
    .bind(g)
    .bind(k)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn split3(keys: &[(&str, &str, &str)]) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut t = Vec::with_capacity(keys.len());
    let mut g = Vec::with_capacity(keys.len());
    let mut k = Vec::with_capacity(keys.len());
    for (a, b, c) in keys {
        t.push(a.to_string());
        g.push(b.to_string());
        k.push(c.to_string());
    }
    (t, g, k)
}

async fn notify(conn: &mut PgConnection, channel: &str, topic: &str) -> MqResult<()> {
    sqlx::query("SELECT pg_notify($1, $2)::text")
        .bind(channel)
        .bind(topic)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A transaction's only publish: a session of one.
async fn publish_on(
    conn: &mut PgConnection,
    channel: &str,
    topic: &str,
    msgs: &[NewMessage],
    now: Millis,
) -> MqResult<PublishReport> {
    let mut session = PublishSession::default();
    let report = PostgresDriver::publish_in_session(conn, &mut session, topic, msgs, now).await?;
    PostgresDriver::finish_session(conn, channel, &mut session).await?;
    Ok(report)
}

/// Takes the topic's shared lock for this transaction and reads its groups:
/// no group can be registered until the transaction ends, so the list stays
/// right for every publish the transaction makes.
async fn lock_topic_groups(conn: &mut PgConnection, topic: &str) -> MqResult<Vec<String>> {
    lock_topic(conn, topic, false).await?;
    Ok(
        sqlx::query_scalar("SELECT grp FROM mq_groups WHERE topic = $1 ORDER BY grp")
            .bind(topic)
            .fetch_all(&mut *conn)
            .await?,
    )
}

/// Locks (creating if needed) every group's partition rows, then stores the
/// messages. The topic's lock must be held (see [`lock_topic_groups`]).
async fn insert_published(
    conn: &mut PgConnection,
    topic: &str,
    groups: &[String],
    msgs: &[NewMessage],
    now: Millis,
) -> MqResult<PublishReport> {
    if !groups.is_empty() {
        // Lock (creating if needed) every group's partition rows before the
        // messages take sequence numbers. Rows are locked in input order,
        // which is the global (group, partition) order.
        let mut due: BTreeMap<&str, Millis> = BTreeMap::new();
        for m in msgs {
            let e = due
                .entry(m.message.partition_key.as_str())
                .or_insert(m.available_at);
            *e = (*e).min(m.available_at);
        }
        let n = groups.len() * due.len();
        let (mut g, mut k, mut at) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for grp in groups {
            for (p, a) in &due {
                g.push(grp.as_str());
                k.push(*p);
                at.push(*a);
            }
        }
        sqlx::query(
            "INSERT INTO mq_partitions (topic, grp, partition_key, cursor, next_due, lease_expires) \
             SELECT $1, u.g, u.k, 0, u.at, 0 \
             FROM unnest($2::text[], $3::text[], $4::int8[]) WITH ORDINALITY AS u(g, k, at, ord) ORDER BY u.ord \
             ON CONFLICT (topic, grp, partition_key) DO UPDATE SET next_due = excluded.next_due \
             WHERE mq_partitions.next_due IS NULL OR mq_partitions.next_due > excluded.next_due",
        )
        .bind(topic)
        .bind(&g)
        .bind(&k)
        .bind(&at)
        .execute(&mut *conn)
        .await?;
    }
    let mut k = Vec::with_capacity(msgs.len());
    let mut ids = Vec::with_capacity(msgs.len());
    let mut payloads: Vec<&[u8]> = Vec::with_capacity(msgs.len());
    let mut meta = Vec::with_capacity(msgs.len());
    let mut at = Vec::with_capacity(msgs.len());
    for m in msgs {
        k.push(m.message.partition_key.as_str());
        ids.push(m.message.id.as_str());
        payloads.push(&m.message.payload);
        meta.push(encode_meta(&m.message.metadata));
        at.push(m.available_at);
    }
    // Rows are inserted (and numbered) in input order; a duplicate id, stored
    // or earlier in the same batch, is skipped.
    let stored = sqlx::query(
        "INSERT INTO mq_messages (topic, partition_key, msg_id, payload, metadata, published_at, available_at, created_at) \
         SELECT $1, u.k, u.id, u.p, u.m, $2, u.at, $2 \
         FROM unnest($3::text[], $4::text[], $5::bytea[], $6::text[], $7::int8[]) WITH ORDINALITY AS u(k, id, p, m, at, ord) \
         ORDER BY u.ord ON CONFLICT (topic, partition_key, msg_id) DO NOTHING",
    )
    .bind(topic)
    .bind(now)
    .bind(&k)
    .bind(&ids)
    .bind(&payloads)
    .bind(&meta)
    .bind(&at)
    .execute(&mut *conn)
    .await?
    .rows_affected() as usize;
    Ok(PublishReport {
        stored,
        duplicates: msgs.len() - stored,
    })
}

/// A message to dead-letter: (seq, attempts, failure).
type DeadItem<'a> = (i64, u32, &'a Failure);

/// Copies stored messages into the dead letters (re-dead-lettering the same
/// id refreshes the failure instead of failing).
async fn insert_dead_letters(
    conn: &mut PgConnection,
    topic: &str,
    group: &str,
    items: &[DeadItem<'_>],
    now: Millis,
) -> MqResult<()> {
    if items.is_empty() {
        return Ok(());
    }
    let seqs: Vec<i64> = items.iter().map(|i| i.0).collect();
    let attempts: Vec<i32> = items.iter().map(|i| i.1 as i32).collect();
    let messages: Vec<&str> = items.iter().map(|i| i.2.message.as_str()).collect();
    let details: Vec<Option<String>> = items.iter().map(|i| encode_detail(&i.2.detail)).collect();
    sqlx::query(
        "INSERT INTO mq_dead_letters (topic, grp, partition_key, msg_id, payload, metadata, failure_message, \
         failure_detail, attempts, published_at, failed_at) \
         SELECT m.topic, $1, m.partition_key, m.msg_id, m.payload, m.metadata, u.fm, u.fd, u.a, m.published_at, $2 \
         FROM unnest($3::int8[], $4::int4[], $5::text[], $6::text[]) WITH ORDINALITY AS u(seq, a, fm, fd, ord) \
         JOIN mq_messages m ON m.seq = u.seq AND m.topic = $7 ORDER BY u.ord \
         ON CONFLICT (topic, grp, partition_key, msg_id) DO UPDATE SET \
         payload = excluded.payload, metadata = excluded.metadata, failure_message = excluded.failure_message, \
         failure_detail = excluded.failure_detail, attempts = excluded.attempts, \
         published_at = excluded.published_at, failed_at = excluded.failed_at",
    )
    .bind(group)
    .bind(now)
    .bind(&seqs)
    .bind(&attempts)
    .bind(&messages)
    .bind(&details)
    .bind(topic)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A due partition locked by a claim: key, cursor, owner, lease expiry.
type DuePartition = (String, i64, Option<String>, i64);

async fn claim_on(conn: &mut PgConnection, req: &ClaimRequest) -> MqResult<ClaimResult> {
    let now = req.now;
    let due: Vec<DuePartition> = sqlx::query_as(
        "SELECT partition_key, cursor, lease_owner, lease_expires FROM mq_partitions \
         WHERE topic = $1 AND grp = $2 AND next_due <= $3 \
         AND (lease_owner = $4 OR lease_owner IS NULL OR lease_expires <= $3) \
         ORDER BY next_due LIMIT $5 FOR UPDATE SKIP LOCKED",
    )
    .bind(&req.topic)
    .bind(&req.group)
    .bind(now)
    .bind(&req.subscriber)
    .bind((req.max_messages + 16) as i64)
    .fetch_all(&mut *conn)
    .await?;

    let mut result = ClaimResult::default();
    let mut may_acquire = req.may_acquire;
    let scan = req.batch_size as i64 + SCAN_LIMIT_EXTRA;
    let until = now + req.visibility_ms;
    // What the claim writes back, gathered so each table gets one statement.
    let mut deliver: Vec<(i64, String, u32, i64)> = Vec::new();
    let mut exhausted: Vec<(i64, u32, Failure)> = Vec::new();
    let mut part_rows: Vec<(String, i64, Option<Millis>, Millis)> = Vec::new();
    let mut remaining = due.as_slice();
    'chunks: while !remaining.is_empty() && result.messages.len() + deliver.len() < req.max_messages
    {
        // Take the next chunk of partitions this subscriber may serve.
        let mut chunk: Vec<(&DuePartition, bool)> = Vec::new();
        while let Some((first, rest)) = remaining.split_first() {
            if chunk.len() >= WINDOW_CHUNK {
                break;
            }
            remaining = rest;
            let owned = first.2.as_deref() == Some(req.subscriber.as_str()) && first.3 > now;
            if !owned {
                if may_acquire == 0 {
                    continue;
                }
                may_acquire -= 1;
            }
            chunk.push((first, owned));
        }
        if chunk.is_empty() {
            break;
        }
        // Before the windows are read, so the released deliveries go out in
        // this claim. (A partition the delivery budget then leaves unserved
        // keeps them deliverable for the next claimer.)
        result.taken_over += take_over(conn, req, &chunk).await?;
        let keys: Vec<&str> = chunk.iter().map(|(p, _)| p.0.as_str()).collect();
        let cursors: Vec<i64> = chunk.iter().map(|(p, _)| p.1).collect();
        // The state lookup is a LATERAL subquery with a LIMIT (which the
        // planner cannot flatten into a join) so it is always one key
        // lookup; as a join it was planned as a rescan of the group's whole
        // state per message while the tables had no statistics yet.
        let rows = sqlx::query(WINDOWS_SQL)
            .bind(&req.group)
            .bind(&req.topic)
            .bind(&keys)
            .bind(&cursors)
            .bind(scan + 1)
            .fetch_all(&mut *conn)
            .await?;
        let mut windows: Vec<Vec<WindowRow>> = vec![Vec::new(); chunk.len()];
        for r in rows {
            let ord: i64 = r.try_get(0)?;
            let attempt: Option<i32> = r.try_get(3)?;
            let state = match attempt {
                Some(a) => Some(RowState {
                    attempt: a.max(0) as u32,
                    invisible_until: r.try_get(4)?,
                    postponed: r.try_get(5)?,
                    done: r.try_get(6)?,
                }),
                None => None,
            };
            if let Some(w) = windows.get_mut((ord - 1) as usize) {
                w.push(WindowRow {
                    seq: r.try_get(1)?,
                    available_at: r.try_get(2)?,
                    state,
                });
            }
        }
        for ((partition, owned), mut window) in chunk.into_iter().zip(windows) {
            let delivered = result.messages.len() + deliver.len();
            if delivered >= req.max_messages {
                break 'chunks;
            }
            if !owned {
                result.acquired += 1;
            }
            let truncated = window.len() as i64 > scan;
            window.truncate(scan as usize);
            let plan = plan_window(
                partition.1,
                &window,
                truncated,
                WindowLimits::for_claim(req, delivered),
            );
            for (seq, attempts) in &plan.exhausted {
                exhausted.push((*seq, *attempts, exhausted_failure(*attempts)));
            }
            for (seq, attempt) in &plan.deliver {
                let token = rand::random::<i64>() & i64::MAX;
                deliver.push((*seq, partition.0.clone(), *attempt, token));
            }
            let lease_until = if owned {
                partition.3
            } else {
                now + req.lease_ms
            };
            part_rows.push((partition.0.clone(), plan.cursor, plan.next_due, lease_until));
        }
    }

    if !exhausted.is_empty() {
        let items: Vec<DeadItem> = exhausted.iter().map(|(s, a, f)| (*s, *a, f)).collect();
        insert_dead_letters(conn, &req.topic, &req.group, &items, now).await?;
        let seqs: Vec<i64> = exhausted.iter().map(|e| e.0).collect();
        sqlx::query(
            "UPDATE mq_state SET done = TRUE, claimed = FALSE WHERE grp = $1 AND seq = ANY($2)",
        )
        .bind(&req.group)
        .bind(&seqs)
        .execute(&mut *conn)
        .await?;
        result.dead_lettered = exhausted.len();
    }
    if !deliver.is_empty() {
        let seqs: Vec<i64> = deliver.iter().map(|d| d.0).collect();
        let keys: Vec<&str> = deliver.iter().map(|d| d.1.as_str()).collect();
        let attempts: Vec<i32> = deliver.iter().map(|d| d.2 as i32).collect();
        let tokens: Vec<i64> = deliver.iter().map(|d| d.3).collect();
        sqlx::query(
            "INSERT INTO mq_state (grp, seq, topic, partition_key, attempt, invisible_until, postponed, done, claimed, token) \
             SELECT $1, u.seq, $2, u.k, u.a, $3, FALSE, FALSE, TRUE, u.t \
             FROM unnest($4::int8[], $5::text[], $6::int4[], $7::int8[]) AS u(seq, k, a, t) \
             ON CONFLICT (grp, seq) DO UPDATE SET attempt = excluded.attempt, \
             invisible_until = excluded.invisible_until, postponed = FALSE, done = FALSE, claimed = TRUE, \
             token = excluded.token, woken = FALSE",
        )
        .bind(&req.group)
        .bind(&req.topic)
        .bind(until)
        .bind(&seqs)
        .bind(&keys)
        .bind(&attempts)
        .bind(&tokens)
        .execute(&mut *conn)
        .await?;
        let bodies = sqlx::query(BODIES_SQL)
            .bind(&seqs)
            .fetch_all(&mut *conn)
            .await?;
        let mut by_seq: HashMap<i64, (String, Vec<u8>, Option<String>, Millis)> =
            HashMap::with_capacity(bodies.len());
        for r in bodies {
            by_seq.insert(
                r.try_get(0)?,
                (r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?),
            );
        }
        for (seq, partition, attempt, token) in deliver {
            let Some((id, payload, metadata, published_at)) = by_seq.remove(&seq) else {
                return Err(MqError::Internal(format!(
                    "message {seq} vanished while its partition was locked"
                )));
            };
            result.messages.push(ClaimedMessage {
                seq,
                message: Message {
                    id,
                    partition_key: partition,
                    payload,
                    metadata: decode_meta(metadata)?,
                },
                published_at,
                attempt,
                token,
            });
        }
    }
    if !part_rows.is_empty() {
        let keys: Vec<&str> = part_rows.iter().map(|p| p.0.as_str()).collect();
        let cursors: Vec<i64> = part_rows.iter().map(|p| p.1).collect();
        let next: Vec<Option<i64>> = part_rows.iter().map(|p| p.2).collect();
        let leases: Vec<i64> = part_rows.iter().map(|p| p.3).collect();
        sqlx::query(
            "UPDATE mq_partitions p SET cursor = u.c, next_due = u.nd, lease_owner = $3, lease_expires = u.le \
             FROM unnest($4::text[], $5::int8[], $6::int8[], $7::int8[]) AS u(k, c, nd, le) \
             WHERE p.topic = $1 AND p.grp = $2 AND p.partition_key = u.k",
        )
        .bind(&req.topic)
        .bind(&req.group)
        .bind(&req.subscriber)
        .bind(&keys)
        .bind(&cursors)
        .bind(&next)
        .bind(&leases)
        .execute(&mut *conn)
        .await?;
    }
    let (held_due, any_due) = due_times(&mut *conn, req).await?;
    (result.next_due, result.share_spent) = claim_due(now, may_acquire, held_due, any_due);
    if result.messages.is_empty() && result.dead_lettered == 0 {
        // Nothing could be done although something is due: the due
        // partitions are locked by someone else for a moment.
        result.next_due = result.next_due.map(|d| d.max(now + LOCKED_RETRY_MS));
    }
    Ok(result)
}

/// When the first partition this subscriber holds the lease of is due, and
/// when the first one it may serve (held, free or expired) is due (`None`:
/// nothing pending). Each ordered and limited so it reads the due index
/// only up to that row.
async fn due_times<'c, E>(conn: E, req: &ClaimRequest) -> MqResult<(Option<Millis>, Option<Millis>)>
where
    E: sqlx::PgExecutor<'c>,
{
    Ok(sqlx::query_as(
        "SELECT \
           (SELECT next_due FROM mq_partitions WHERE topic = $1 AND grp = $2 AND next_due IS NOT NULL \
            AND lease_owner = $3 AND lease_expires > $4 ORDER BY next_due LIMIT 1), \
           (SELECT next_due FROM mq_partitions WHERE topic = $1 AND grp = $2 AND next_due IS NOT NULL \
            AND (lease_owner = $3 OR lease_owner IS NULL OR lease_expires <= $4) ORDER BY next_due LIMIT 1)",
    )
    .bind(&req.topic)
    .bind(&req.group)
    .bind(&req.subscriber)
    .bind(req.now)
    .fetch_one(conn)
    .await?)
}

/// Makes the in-flight deliveries of the partitions in `chunk` that this
/// claim acquires from a dead subscriber (another name, lease expired, no
/// heartbeat within the lease) deliverable now; returns how many. The
/// partition rows are locked by the claim.
async fn take_over(
    conn: &mut PgConnection,
    req: &ClaimRequest,
    chunk: &[(&DuePartition, bool)],
) -> MqResult<usize> {
    let previous = |(p, owned): &(&DuePartition, bool)| -> Option<String> {
        p.2.clone().filter(|o| !*owned && *o != req.subscriber)
    };
    let owners: BTreeSet<String> = chunk.iter().filter_map(previous).collect();
    if owners.is_empty() {
        return Ok(0);
    }
    let owners: Vec<String> = owners.into_iter().collect();
    let alive: BTreeSet<String> = sqlx::query_scalar(
        "SELECT subscriber::text FROM mq_subscribers WHERE topic = $1 AND grp = $2 \
         AND subscriber = ANY($3) AND heartbeat_at > $4",
    )
    .bind(&req.topic)
    .bind(&req.group)
    .bind(&owners)
    .bind(req.now - req.lease_ms)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    let dead: Vec<&DuePartition> = chunk
        .iter()
        .filter(|entry| previous(entry).is_some_and(|o| !alive.contains(&o)))
        .map(|(p, _)| *p)
        .collect();
    if dead.is_empty() {
        return Ok(0);
    }
    let keys: Vec<&str> = dead.iter().map(|p| p.0.as_str()).collect();
    let cursors: Vec<i64> = dead.iter().map(|p| p.1).collect();
    // The state rows are addressed by primary key: the sequence numbers
    // come from one ordered index range per partition.
    let released = sqlx::query(
        "UPDATE mq_state SET invisible_until = $3 WHERE grp = $1 AND seq = ANY(ARRAY( \
           SELECT m.seq FROM unnest($4::text[], $5::int8[]) AS u(k, c) \
           CROSS JOIN LATERAL (SELECT seq FROM mq_messages WHERE topic = $2 AND partition_key = u.k \
             AND seq > u.c) m)) \
         AND claimed AND NOT done AND invisible_until > $3",
    )
    .bind(&req.group)
    .bind(&req.topic)
    .bind(req.now)
    .bind(&keys)
    .bind(&cursors)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(released as usize)
}

/// Stored kinds of outcome, as the apply statement's CASE arms know them.
fn outcome_code(kind: &OutcomeKind, now: Millis) -> (i16, Millis) {
    match kind {
        OutcomeKind::Ack => (0, 0),
        OutcomeKind::DeadLetter { .. } => (1, 0),
        OutcomeKind::Retry { retry_at, .. } => (2, *retry_at),
        OutcomeKind::Postpone { until } => (3, *until),
        OutcomeKind::Extend { until } => (4, *until),
        OutcomeKind::Release => (5, now),
    }
}

/// When an outcome makes its partition due again (`None`: it does not).
fn outcome_due(kind: &OutcomeKind, now: Millis) -> Option<Millis> {
    match kind {
        OutcomeKind::Ack | OutcomeKind::DeadLetter { .. } | OutcomeKind::Release => Some(now),
        OutcomeKind::Retry { retry_at, .. } => Some(*retry_at),
        OutcomeKind::Postpone { until } => Some(*until),
        OutcomeKind::Extend { .. } => None,
    }
}

async fn apply_on(
    conn: &mut PgConnection,
    outcomes: &[Outcome],
    now: Millis,
) -> MqResult<Vec<MqResult<()>>> {
    let keys: BTreeSet<(&str, &str, &str)> = outcomes
        .iter()
        .map(|o| (o.topic.as_str(), o.group.as_str(), o.partition_key.as_str()))
        .collect();
    let keys: Vec<(&str, &str, &str)> = keys.into_iter().collect();
    lock_partitions(conn, &keys).await?;

    // One statement per round; a delivery named twice in one batch (an
    // extend, then the ack) goes to a later round so both apply in order.
    let mut round_of: Vec<usize> = Vec::with_capacity(outcomes.len());
    let mut seen: HashMap<(&str, i64), usize> = HashMap::new();
    for o in outcomes {
        let n = seen.entry((o.group.as_str(), o.seq)).or_insert(0);
        round_of.push(*n);
        *n += 1;
    }
    let rounds = round_of.iter().copied().max().map_or(0, |m| m + 1);
    let mut applied = vec![false; outcomes.len()];
    let mut held: Vec<Millis> = vec![0; outcomes.len()];
    for round in 0..rounds {
        let idx: Vec<usize> = (0..outcomes.len())
            .filter(|i| round_of[*i] == round)
            .collect();
        let mut g = Vec::with_capacity(idx.len());
        let mut seq = Vec::with_capacity(idx.len());
        let mut tok = Vec::with_capacity(idx.len());
        let mut kind = Vec::with_capacity(idx.len());
        let mut val = Vec::with_capacity(idx.len());
        for i in &idx {
            let o = &outcomes[*i];
            let (k, v) = outcome_code(&o.kind, now);
            g.push(o.group.as_str());
            seq.push(o.seq);
            tok.push(o.token);
            kind.push(k);
            val.push(v);
        }
        // Each column's new value depends only on its own old value and the
        // outcome; the guard fences stale and finished deliveries.
        let hit: Vec<(String, i64, i64)> = sqlx::query_as(
            "UPDATE mq_state s SET \
               done = s.done OR u.kind IN (0, 1), \
               claimed = CASE WHEN u.kind = 4 THEN s.claimed ELSE FALSE END, \
               invisible_until = CASE WHEN u.kind IN (0, 1) THEN s.invisible_until \
                 WHEN u.kind = 3 AND s.woken THEN $6 ELSE u.v END, \
               postponed = CASE WHEN u.kind = 2 THEN FALSE WHEN u.kind = 3 THEN TRUE ELSE s.postponed END, \
               attempt = CASE WHEN u.kind = 3 THEN 0 WHEN u.kind = 5 THEN GREATEST(s.attempt - 1, 0) ELSE s.attempt END, \
               woken = CASE WHEN u.kind = 4 THEN s.woken ELSE FALSE END \
             FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int2[], $5::int8[]) AS u(g, seq, tok, kind, v) \
             WHERE s.grp = u.g AND s.seq = u.seq AND s.token = u.tok AND NOT s.done \
             RETURNING s.grp::text, s.seq, s.invisible_until",
        )
        .bind(&g)
        .bind(&seq)
        .bind(&tok)
        .bind(&kind)
        .bind(&val)
        .bind(now)
        .fetch_all(&mut *conn)
        .await?;
        // A postpone of a delivery a wake marked is due now (ADR 0012): the
        // returned visibility is the hold that was really stored.
        let hit: HashMap<(String, i64), Millis> = hit
            .into_iter()
            .map(|(g, seq, until)| ((g, seq), until))
            .collect();
        for i in idx {
            let o = &outcomes[i];
            if let Some(until) = hit.get(&(o.group.clone(), o.seq)) {
                applied[i] = true;
                held[i] = *until;
            }
        }
    }

    // Dead letters, per (topic, group).
    let mut dead: BTreeMap<(&str, &str), Vec<DeadItem>> = BTreeMap::new();
    let mut due: BTreeMap<(&str, &str, &str), Millis> = BTreeMap::new();
    let mut results = Vec::with_capacity(outcomes.len());
    for ((o, ok), held) in outcomes.iter().zip(&applied).zip(&held) {
        if !ok {
            results.push(Err(MqError::StaleDelivery(o.message_id.clone())));
            continue;
        }
        if let OutcomeKind::DeadLetter { failure } = &o.kind {
            dead.entry((o.topic.as_str(), o.group.as_str()))
                .or_default()
                .push((o.seq, o.attempt, failure));
        }
        let at = match o.kind {
            OutcomeKind::Postpone { .. } => Some(*held),
            _ => outcome_due(&o.kind, now),
        };
        if let Some(at) = at {
            let e = due
                .entry((o.topic.as_str(), o.group.as_str(), o.partition_key.as_str()))
                .or_insert(at);
            *e = (*e).min(at);
        }
        results.push(Ok(()));
    }
    for ((topic, group), items) in dead {
        insert_dead_letters(conn, topic, group, &items, now).await?;
    }
    if !due.is_empty() {
        let keys: Vec<(&str, &str, &str)> = due.keys().copied().collect();
        let (t, g, k) = split3(&keys);
        let at: Vec<Millis> = due.values().copied().collect();
        // Lowers next_due, never raises it; rows already due that early are
        // not rewritten.
        sqlx::query(
            "UPDATE mq_partitions p SET next_due = u.at \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[]) AS u(t, g, k, at) \
             WHERE p.topic = u.t AND p.grp = u.g AND p.partition_key = u.k \
             AND (p.next_due IS NULL OR p.next_due > u.at)",
        )
        .bind(&t)
        .bind(&g)
        .bind(&k)
        .bind(&at)
        .execute(&mut *conn)
        .await?;
    }
    Ok(results)
}

/// Deletes delivery state at or below its partition's cursor.
async fn sweep_state(pool: &PgPool, t: &LeaseTick) -> MqResult<()> {
    // Delivery state at or below a cursor is never read again; claims leave
    // it behind so they stay cheap, and it is swept here: one key lookup of
    // the partition per state row (a join on `seq <= cursor` is quadratic).
    sqlx::query(SWEEP_STATE_SQL)
        .bind(&t.group)
        .bind(&t.topic)
        .execute(pool)
        .await?;
    Ok(())
}

/// An early recheck of the fair share: reads only. The full tick locks every
/// partition row the subscriber holds to extend its leases, and claims,
/// wakes and publishes wait behind that; run every 50 ms by a capped node
/// (measured in the two-node cancel benchmark) it doubled create and cancel
/// latency. Heartbeat, lease extension and shedding wait for the renewal.
async fn fair_share_now(pool: &PgPool, t: &LeaseTick) -> MqResult<LeaseReport> {
    let active: Vec<String> = sqlx::query_scalar(
        "SELECT subscriber FROM mq_subscribers WHERE topic = $1 AND grp = $2 AND heartbeat_at > $3 ORDER BY subscriber",
    )
    .bind(&t.topic)
    .bind(&t.group)
    .bind(t.now - t.lease_ms)
    .fetch_all(pool)
    .await?;
    let (busy, mine): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*) FILTER (WHERE next_due IS NOT NULL OR (lease_owner IS NOT NULL AND lease_expires > $3)), \
                COUNT(*) FILTER (WHERE lease_owner = $4 AND lease_expires > $3) \
         FROM mq_partitions WHERE topic = $1 AND grp = $2",
    )
    .bind(&t.topic)
    .bind(&t.group)
    .bind(t.now)
    .bind(&t.subscriber)
    .fetch_one(pool)
    .await?;
    let cap = fair_share_cap(busy as usize, &active, &t.subscriber);
    Ok(LeaseReport {
        cap,
        owned: (mine as usize).min(cap),
        active_subscribers: active.len().max(1),
    })
}

async fn lease_tick_on(conn: &mut PgConnection, t: &LeaseTick) -> MqResult<LeaseReport> {
    sqlx::query(
        "INSERT INTO mq_subscribers (topic, grp, subscriber, heartbeat_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (topic, grp, subscriber) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
    )
    .bind(&t.topic)
    .bind(&t.group)
    .bind(&t.subscriber)
    .bind(t.now)
    .execute(&mut *conn)
    .await?;
    let active: Vec<String> = sqlx::query_scalar(
        "SELECT subscriber FROM mq_subscribers WHERE topic = $1 AND grp = $2 AND heartbeat_at > $3 ORDER BY subscriber",
    )
    .bind(&t.topic)
    .bind(&t.group)
    .bind(t.now - t.lease_ms)
    .fetch_all(&mut *conn)
    .await?;
    let busy: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM mq_partitions WHERE topic = $1 AND grp = $2 \
         AND (next_due IS NOT NULL OR (lease_owner IS NOT NULL AND lease_expires > $3))",
    )
    .bind(&t.topic)
    .bind(&t.group)
    .bind(t.now)
    .fetch_one(&mut *conn)
    .await?;
    let cap = fair_share_cap(busy as usize, &active, &t.subscriber);
    // Lease bookkeeping skips rows someone holds right now (a claim or an
    // outcome): it never waits, and the next tick catches up. The rows it
    // locked are then addressed by `ctid` (stable while we hold the lock):
    // a join back on the key is planned as a nested loop while the table's
    // statistics are young, which is quadratic in the partitions owned.
    sqlx::query(RELEASE_IDLE_SQL)
        .bind(&t.topic)
        .bind(&t.group)
        .bind(&t.subscriber)
        .execute(&mut *conn)
        .await?;
    sqlx::query(EXTEND_LEASES_SQL)
        .bind(&t.topic)
        .bind(&t.group)
        .bind(&t.subscriber)
        .bind(t.now + t.lease_ms)
        .execute(&mut *conn)
        .await?;
    let mine: Vec<String> = sqlx::query_scalar(
        "SELECT partition_key FROM mq_partitions WHERE topic = $1 AND grp = $2 AND lease_owner = $3 ORDER BY partition_key",
    )
    .bind(&t.topic)
    .bind(&t.group)
    .bind(&t.subscriber)
    .fetch_all(&mut *conn)
    .await?;
    if mine.len() > cap {
        sqlx::query(
            "UPDATE mq_partitions SET lease_owner = NULL, lease_expires = 0 WHERE ctid = ANY(ARRAY( \
               SELECT ctid FROM mq_partitions WHERE topic = $1 AND grp = $2 AND partition_key = ANY($4) \
               AND lease_owner = $3 FOR UPDATE SKIP LOCKED))",
        )
        .bind(&t.topic)
        .bind(&t.group)
        .bind(&t.subscriber)
        .bind(&mine[cap..])
        .execute(&mut *conn)
        .await?;
    }
    if mine.len() < cap {
        // Dead owners' partitions whose only pending work may be their
        // in-flight deliveries: due now, so a claim takes them over.
        sqlx::query(
            "UPDATE mq_partitions SET next_due = $3 WHERE ctid = ANY(ARRAY( \
               SELECT ctid FROM mq_partitions WHERE topic = $1 AND grp = $2 AND lease_owner IS NOT NULL \
               AND lease_expires <= $3 AND next_due > $3 AND NOT (lease_owner = ANY($4)) \
               FOR UPDATE SKIP LOCKED))",
        )
        .bind(&t.topic)
        .bind(&t.group)
        .bind(t.now)
        .bind(&active)
        .execute(&mut *conn)
        .await?;
    }
    Ok(LeaseReport {
        cap,
        owned: mine.len().min(cap),
        active_subscribers: active.len().max(1),
    })
}

async fn replay_on(
    conn: &mut PgConnection,
    channel: &str,
    topic: &str,
    dlq_id: i64,
    now: Millis,
) -> MqResult<()> {
    let row: Option<(String, String, Vec<u8>, Option<String>)> = sqlx::query_as(
        "SELECT partition_key, msg_id, payload, metadata FROM mq_dead_letters WHERE dlq_id = $1 AND topic = $2 FOR UPDATE",
    )
    .bind(dlq_id)
    .bind(topic)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((partition_key, id, payload, metadata)) = row else {
        return Err(MqError::UnknownDeadLetter {
            topic: topic.to_string(),
            id: dlq_id,
        });
    };
    // The same order as a publish: topic lock, then the partition rows of
    // every group, then the messages.
    lock_topic(conn, topic, false).await?;
    let groups: Vec<String> =
        sqlx::query_scalar("SELECT grp FROM mq_groups WHERE topic = $1 ORDER BY grp")
            .bind(topic)
            .fetch_all(&mut *conn)
            .await?;
    let keys: Vec<(&str, &str, &str)> = groups
        .iter()
        .map(|g| (topic, g.as_str(), partition_key.as_str()))
        .collect();
    lock_partitions(conn, &keys).await?;
    // The stored original still holds the id; remove it so the replayed copy
    // is a new message after every group's cursor.
    sqlx::query("DELETE FROM mq_messages WHERE topic = $1 AND partition_key = $2 AND msg_id = $3")
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
        channel,
        topic,
        &[NewMessage {
            message,
            available_at: now,
        }],
        now,
    )
    .await?;
    sqlx::query("DELETE FROM mq_dead_letters WHERE dlq_id = $1")
        .bind(dlq_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A dead-letter row as read.
type DeadLetterRow = (
    i64,
    String,
    String,
    String,
    String,
    Vec<u8>,
    Option<String>,
    String,
    Option<String>,
    i32,
    i64,
    i64,
);

/// A partition row as listed: key, cursor, next due, owner, lease expiry,
/// in-flight deliveries.
type PartitionRow = (String, i64, Option<i64>, Option<String>, i64, i64);

#[async_trait]
impl Driver for PostgresDriver {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn wakeups(&self) -> Option<broadcast::Receiver<String>> {
        Some(self.wakeups.subscribe())
    }

    async fn publish(
        &self,
        topic: &str,
        msgs: &[NewMessage],
        now: Millis,
    ) -> MqResult<PublishReport> {
        let mut tx = self.begin().await?;
        let report = publish_on(&mut tx, &self.channel, topic, msgs, now).await?;
        tx.commit().await?;
        Ok(report)
    }

    async fn register_group(&self, topic: &str, group: &str, now: Millis) -> MqResult<()> {
        let mut tx = self.begin().await?;
        lock_topic(&mut tx, topic, true).await?;
        let added = sqlx::query(
            "INSERT INTO mq_groups (topic, grp, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(topic)
        .bind(group)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if added == 1 {
            sqlx::query(
                "INSERT INTO mq_partitions (topic, grp, partition_key, cursor, next_due, lease_expires) \
                 SELECT topic, $1, partition_key, 0, MIN(available_at), 0 FROM mq_messages WHERE topic = $2 \
                 GROUP BY topic, partition_key ON CONFLICT (topic, grp, partition_key) DO NOTHING",
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
        if !t.renewal {
            return fair_share_now(&self.pool, t).await;
        }
        let mut tx = self.begin().await?;
        let report = lease_tick_on(&mut tx, t).await?;
        tx.commit().await?;
        // Outside the lease transaction, which holds every owned partition
        // row: the sweep locks none of them and must not make outcomes wait.
        // Housekeeping, so on renewals only: a scan of the group's state
        // (~5 ms at a few thousand rows) on every early recheck of a capped
        // subscriber was a tenth of a core in the two-node benchmark.
        if t.renewal {
            sweep_state(&self.pool, t).await?;
        }
        Ok(report)
    }

    async fn deregister(&self, topic: &str, group: &str, subscriber: &str) -> MqResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM mq_subscribers WHERE topic = $1 AND grp = $2 AND subscriber = $3")
            .bind(topic)
            .bind(group)
            .bind(subscriber)
            .execute(&mut *tx)
            .await?;
        sqlx::query(RELEASE_ALL_SQL)
            .bind(topic)
            .bind(group)
            .bind(subscriber)
            .execute(&mut *tx)
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
        let owned: Vec<String> = sqlx::query_scalar(
            "SELECT partition_key FROM mq_partitions WHERE topic = $1 AND grp = $2 AND lease_owner = $3 \
             ORDER BY partition_key FOR UPDATE",
        )
        .bind(topic)
        .bind(group)
        .bind(subscriber)
        .fetch_all(&mut *tx)
        .await?;
        if owned.is_empty() {
            tx.commit().await?;
            return Ok(0);
        }
        let released = sqlx::query(RECOVER_STATE_SQL)
            .bind(now)
            .bind(group)
            .bind(topic)
            .bind(subscriber)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query(RECOVER_DUE_SQL)
            .bind(now)
            .bind(group)
            .bind(topic)
            .bind(subscriber)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(released)
    }

    async fn claim(&self, req: &ClaimRequest) -> MqResult<ClaimResult> {
        // Most claims can take nothing: every notify wakes every topic's
        // claim loop on every node, and a node at its fair-share cap can
        // serve only what it holds. Those are answered by one read instead
        // of a transaction of four round trips (measured in the two-node
        // cancel benchmark: 27,000 of 42,000 claims took nothing). The
        // answer is the one the claim itself would give.
        let (held_due, any_due) = due_times(&self.pool, req).await?;
        let nothing_due = any_due.is_none_or(|at| at > req.now);
        let nothing_takeable = req.may_acquire == 0 && held_due.is_none_or(|at| at > req.now);
        if nothing_due || nothing_takeable {
            let (next_due, share_spent) = claim_due(req.now, req.may_acquire, held_due, any_due);
            return Ok(ClaimResult {
                next_due,
                share_spent,
                ..ClaimResult::default()
            });
        }
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
        // Two round trips, each its own implicit transaction (migration
        // 1007): the wake's lock and updates commit durably without a
        // notify, then — only when something changed — a notify-only
        // transaction that does not wait for its WAL flush. A notify inside
        // the wake held PostgreSQL's database-wide notify lock through the
        // wake's fsync, so every wake in the cluster queued behind the last.
        let woken: i64 = sqlx::query_scalar("SELECT mq_wake_state($1, $2, $3)")
            .bind(topic)
            .bind(partition_key)
            .bind(now)
            .fetch_one(&self.pool)
            .await?;
        if woken > 0 {
            sqlx::query("SELECT mq_notify_soon($1, $2)")
                .bind(&*self.channel)
                .bind(topic)
                .execute(&self.pool)
                .await?;
        }
        Ok(u64::try_from(woken).unwrap_or(0))
    }

    async fn dead_letters(
        &self,
        topic: &str,
        after_id: i64,
        limit: usize,
    ) -> MqResult<Vec<DeadLetter>> {
        let rows: Vec<DeadLetterRow> = sqlx::query_as(
            "SELECT dlq_id, topic, grp, partition_key, msg_id, payload, metadata, failure_message, failure_detail, \
             attempts, published_at, failed_at FROM mq_dead_letters WHERE topic = $1 AND dlq_id > $2 ORDER BY dlq_id LIMIT $3",
        )
        .bind(topic)
        .bind(after_id)
        .bind(limit.min(i64::MAX as usize) as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(DeadLetter {
                    dlq_id: r.0,
                    original_topic: r.1,
                    group: r.2,
                    message: Message {
                        id: r.4,
                        partition_key: r.3,
                        payload: r.5,
                        metadata: decode_meta(r.6)?,
                    },
                    failure: Failure {
                        message: r.7,
                        detail: decode_detail(r.8),
                    },
                    attempts: r.9.max(0) as u32,
                    published_at: r.10,
                    failed_at: r.11,
                })
            })
            .collect()
    }

    async fn replay_dead_letter(&self, topic: &str, dlq_id: i64, now: Millis) -> MqResult<()> {
        let mut tx = self.begin().await?;
        replay_on(&mut tx, &self.channel, topic, dlq_id, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn prune_dead_letters(&self, failed_before: Millis, limit: usize) -> MqResult<u64> {
        Ok(sqlx::query(
            "DELETE FROM mq_dead_letters WHERE dlq_id IN (SELECT dlq_id FROM mq_dead_letters \
             WHERE failed_at < $1 ORDER BY dlq_id LIMIT $2)",
        )
        .bind(failed_before)
        .bind(limit.min(i64::MAX as usize) as i64)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn count_dead_letters_before(&self, failed_before: Millis) -> MqResult<u64> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM mq_dead_letters WHERE failed_at < $1")
                .bind(failed_before)
                .fetch_one(&self.pool)
                .await?;
        Ok(n as u64)
    }

    async fn gc(&self, now: Millis, retention_ms: Millis, stale_ms: Millis) -> MqResult<GcReport> {
        let mut report = GcReport::default();
        loop {
            // Small transactions so publishers and consumers interleave.
            let n = sqlx::query(
                "DELETE FROM mq_messages WHERE seq IN (SELECT m.seq FROM mq_messages m WHERE m.created_at < $1 \
                 AND m.seq <= (SELECT MIN(p.cursor) FROM mq_partitions p WHERE p.topic = m.topic \
                 AND p.partition_key = m.partition_key) ORDER BY m.seq LIMIT $2)",
            )
            .bind(now - retention_ms)
            .bind(GC_CHUNK)
            .execute(&self.pool)
            .await?
            .rows_affected();
            report.messages += n;
            if n < GC_CHUNK as u64 {
                break;
            }
        }
        loop {
            // Rows someone holds (a publish about to add a message) are left
            // for the next pass.
            let n = sqlx::query(
                "DELETE FROM mq_partitions WHERE ctid = ANY(ARRAY( \
                   SELECT ctid FROM mq_partitions q \
                   WHERE q.next_due IS NULL AND q.lease_owner IS NULL AND NOT EXISTS \
                   (SELECT 1 FROM mq_messages m WHERE m.topic = q.topic AND m.partition_key = q.partition_key) \
                   LIMIT $1 FOR UPDATE SKIP LOCKED))",
            )
            .bind(GC_CHUNK)
            .execute(&self.pool)
            .await?
            .rows_affected();
            report.partitions += n;
            if n < GC_CHUNK as u64 {
                break;
            }
        }
        report.subscribers = sqlx::query("DELETE FROM mq_subscribers WHERE heartbeat_at <= $1")
            .bind(now - stale_ms)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(report)
    }

    async fn stats(&self, topic: &str, group: &str) -> MqResult<TopicStats> {
        let (stored, pending, partitions, leased, dead): (i64, i64, i64, i64, i64) = sqlx::query_as(
            "SELECT \
             (SELECT COUNT(*) FROM mq_messages WHERE topic = $1), \
             (SELECT COUNT(*) FROM mq_messages m JOIN mq_partitions p ON p.topic = m.topic AND p.grp = $2 \
                AND p.partition_key = m.partition_key AND m.seq > p.cursor \
                WHERE m.topic = $1 AND NOT EXISTS (SELECT 1 FROM mq_state s WHERE s.grp = $2 AND s.seq = m.seq AND s.done)), \
             (SELECT COUNT(*) FROM mq_partitions WHERE topic = $1 AND grp = $2), \
             (SELECT COUNT(*) FROM mq_partitions WHERE topic = $1 AND grp = $2 AND lease_owner IS NOT NULL), \
             (SELECT COUNT(*) FROM mq_dead_letters WHERE topic = $1)",
        )
        .bind(topic)
        .bind(group)
        .fetch_one(&self.pool)
        .await?;
        Ok(TopicStats {
            stored: stored as u64,
            pending: pending as u64,
            partitions: partitions as u64,
            leased: leased as u64,
            dead_letters: dead as u64,
        })
    }

    async fn groups(&self, topic: &str) -> MqResult<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT grp::text FROM mq_groups WHERE topic = $1 ORDER BY grp")
                .bind(topic)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn partitions(&self, q: &PartitionQuery) -> MqResult<Vec<PartitionInfo>> {
        // One primary-key range for the page; the in-flight count looks each
        // message's state up by key (a LATERAL with LIMIT, which the planner
        // cannot turn into a join over the group's whole state).
        let rows: Vec<PartitionRow> = sqlx::query_as(
            "SELECT p.partition_key::text, p.cursor, p.next_due, p.lease_owner::text, p.lease_expires, f.n \
             FROM (SELECT partition_key, cursor, next_due, lease_owner, lease_expires FROM mq_partitions \
               WHERE topic = $1 AND grp = $2 AND partition_key > $3 \
               AND ($4::text IS NULL OR lease_owner = $4) AND ($5::int8 IS NULL OR next_due <= $5) \
               ORDER BY partition_key LIMIT $6) p \
             CROSS JOIN LATERAL (SELECT count(*) AS n FROM mq_messages m \
               CROSS JOIN LATERAL (SELECT 1 FROM mq_state s WHERE s.grp = $2 AND s.seq = m.seq \
                 AND s.claimed AND NOT s.done AND s.invisible_until > $7 LIMIT 1) s \
               WHERE m.topic = $1 AND m.partition_key = p.partition_key AND m.seq > p.cursor) f \
             ORDER BY p.partition_key",
        )
        .bind(&q.topic)
        .bind(&q.group)
        .bind(q.after.as_deref().unwrap_or(""))
        .bind(q.owner.as_deref())
        .bind(q.due_by)
        .bind(q.limit.min(i64::MAX as usize) as i64)
        .bind(q.now)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(key, cursor, next_due, owner, expires, n)| {
                PartitionInfo::from_stored(key, cursor, next_due, owner, expires, n)
            })
            .collect())
    }
}

#[cfg(test)]
mod connect_options_tests {
    use super::connect_options;

    #[test]
    fn the_application_name_is_stitch_unless_the_url_names_one() {
        let plain = connect_options("postgres://u@db/stitch").unwrap();
        assert_eq!(plain.get_application_name(), Some("stitch"));
        let named = connect_options(
            "postgres://u@db/stitch?application_name=stitch-eu&options=-csearch_path%3Ds",
        )
        .unwrap();
        assert_eq!(named.get_application_name(), Some("stitch-eu"));
    }
}

#[cfg(test)]
#[path = "postgres_plan_tests.rs"]
mod plan_tests;
