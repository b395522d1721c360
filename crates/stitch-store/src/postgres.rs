//! The PostgreSQL backend: its pool, migrations and `NOTIFY` channel, and
//! its [`Dialect`]: what its SQL writes differently from MySQL's (numbered
//! placeholders, `ON CONFLICT`, `RETURNING`, events inserted from arrays).
//! The statements themselves are shared ([`crate::server`]).

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::PgConnection;

use crate::error::Result;
use crate::model::Event;
use crate::rows::{millis, to_i64, to_json};
use crate::server::{bind, Arg, Dialect, EventTable, ServerOps};

/// Connections of a pool opened from a URL.
const POOL_SIZE: u32 = 10;

/// Opens a pool on `url` with stitch's application name (as the queue's
/// driver does, so the two can share it).
pub(crate) async fn open_pool(url: &str) -> Result<PgPool> {
    let options = stitch_mq::postgres::connect_options(url)?;
    Ok(PgPoolOptions::new()
        .max_connections(POOL_SIZE)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?)
}

/// Applies the store's migrations (versions 2001+) in the pool's schema;
/// the queue's versions in the same table are ignored.
pub(crate) async fn migrate(pool: &PgPool) -> Result<()> {
    let mut migrator = sqlx::migrate!("./migrations/postgres");
    migrator.set_ignore_missing(true);
    migrator.run(pool).await?;
    Ok(())
}

/// The queue's `NOTIFY` channel for the pool's schema, so a publish in a
/// store transaction wakes the queue's listeners in every process.
pub(crate) async fn notify_channel(pool: &PgPool) -> Result<String> {
    let schema: String = sqlx::query_scalar("SELECT current_schema()::text")
        .fetch_one(pool)
        .await?;
    Ok(stitch_mq::postgres::channel_for_schema(&schema))
}

/// Connection options of a pool, for the group committer's own connection.
pub(crate) fn committer_options(pool: &PgPool) -> PgConnectOptions {
    (*pool.connect_options()).clone()
}

/// [`crate::ops::Ops`] on one PostgreSQL connection (pooled, or inside a
/// transaction).
pub(crate) type PgOps<'c> = ServerOps<'c, Postgres>;

/// PostgreSQL's [`Dialect`].
pub(crate) struct Postgres;

/// `sql` with its `?` placeholders numbered (`$1`, `$2`, …) as PostgreSQL
/// wants them. The shared statements hold no `?` of their own (no string
/// literal or JSON operator with one).
pub(crate) fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

impl Dialect for Postgres {
    type Conn = PgConnection;
    type Row = PgRow;

    async fn execute(conn: &mut PgConnection, sql: &str, args: &[Arg<'_>]) -> Result<u64> {
        let sql = numbered(sql);
        let done = bind::<sqlx::Postgres>(&sql, args).execute(conn).await?;
        Ok(done.rows_affected())
    }

    async fn fetch_all(conn: &mut PgConnection, sql: &str, args: &[Arg<'_>]) -> Result<Vec<PgRow>> {
        let sql = numbered(sql);
        Ok(bind::<sqlx::Postgres>(&sql, args).fetch_all(conn).await?)
    }

    async fn insert_unless_taken(
        conn: &mut PgConnection,
        insert: &str,
        args: &[Arg<'_>],
    ) -> Result<bool> {
        let sql = format!("{insert} ON CONFLICT DO NOTHING");
        Ok(Self::execute(conn, &sql, args).await? == 1)
    }

    async fn add_returning(
        conn: &mut PgConnection,
        table: &str,
        column: &str,
        by: i64,
        id: Arg<'_>,
    ) -> Result<Option<i64>> {
        let sql = numbered(&format!(
            "UPDATE {table} SET {column} = {column} + ? WHERE id = ? RETURNING {column}"
        ));
        let row = bind::<sqlx::Postgres>(&sql, &[Arg::Int(by), id])
            .fetch_optional(conn)
            .await?;
        Ok(row.map(|row| sqlx::Row::try_get(&row, 0)).transpose()?)
    }

    async fn insert_events(
        conn: &mut PgConnection,
        into: EventTable,
        events: &[Event],
    ) -> Result<()> {
        // One statement for the whole batch, its columns as arrays.
        let mut seqs = Vec::with_capacity(events.len());
        let mut builds = Vec::with_capacity(events.len());
        let mut queues = Vec::with_capacity(events.len());
        let mut kinds = Vec::with_capacity(events.len());
        let mut statuses = Vec::with_capacity(events.len());
        let mut metadata = Vec::with_capacity(events.len());
        let mut ats = Vec::with_capacity(events.len());
        for e in events {
            seqs.push(to_i64(e.seq, "event seq")?);
            builds.push(e.build_id.as_str());
            queues.push(e.queue.as_str());
            kinds.push(e.kind.as_str());
            statuses.push(e.status.as_str());
            metadata.push(to_json(&e.metadata)?);
            ats.push(millis(e.at));
        }
        let query = match into {
            EventTable::Log => sqlx::query(
                "INSERT INTO events (seq, build_id, queue, kind, status, metadata, at) \
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], \
                                      $5::text[], $6::text[], $7::bigint[])",
            )
            .bind(seqs),
            // `WITH ORDINALITY`: the ids follow the events' order.
            EventTable::Pending => sqlx::query(
                "INSERT INTO event_pending (build_id, queue, kind, status, metadata, at) \
                 SELECT b, q, k, s, m, a FROM unnest($1::text[], $2::text[], $3::text[], \
                                      $4::text[], $5::text[], $6::bigint[]) \
                 WITH ORDINALITY AS u(b, q, k, s, m, a, n) ORDER BY n",
            ),
        };
        query
            .bind(builds)
            .bind(queues)
            .bind(kinds)
            .bind(statuses)
            .bind(metadata)
            .bind(ats)
            .execute(conn)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::placeholders;

    #[test]
    fn placeholders_are_numbered_for_postgres() {
        assert_eq!(
            numbered("DELETE FROM t WHERE a IN (?, ?) LIMIT ?"),
            "DELETE FROM t WHERE a IN ($1, $2) LIMIT $3"
        );
        assert_eq!(placeholders(3), "?, ?, ?");
    }
}
