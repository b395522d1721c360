-- The wake's notify leaves its transaction (ADR 0012, 2026-12-03 later).
-- PostgreSQL serializes the commits of every transaction that notifies on
-- one database-wide lock, held through the commit's WAL flush; with a notify
-- inside every wake, wakes (one per cancel and per webhook) queued on that
-- lock one fsync after another. `mq_wake_state` is `mq_wake` without the
-- notify: its commit is durable and takes no such lock. The driver then
-- calls `mq_notify_soon` when something changed: a transaction that only
-- notifies and commits without waiting for its WAL flush, so the lock is held
-- for microseconds. A notification lost in a server crash costs nothing a
-- wake promises: listeners re-read every topic after a reconnect, and the
-- woken state itself was committed durably first.
--
-- `mq_wake` (migration 1006) stays for processes of the previous version
-- sharing the database during an upgrade.
CREATE OR REPLACE FUNCTION mq_wake_state(p_topic TEXT, p_key TEXT, p_now BIGINT)
RETURNS BIGINT
LANGUAGE plpgsql
AS $$
DECLARE
    n_state BIGINT;
    n_delayed BIGINT;
BEGIN
    PERFORM 1 FROM mq_partitions
     WHERE topic = p_topic AND partition_key = p_key
     ORDER BY grp FOR UPDATE;
    UPDATE mq_state SET
        invisible_until = CASE WHEN postponed AND invisible_until > p_now
                               THEN p_now ELSE invisible_until END,
        woken = woken OR claimed
     WHERE grp IN (SELECT grp FROM mq_groups WHERE topic = p_topic)
       AND seq IN (SELECT seq FROM mq_messages WHERE topic = p_topic AND partition_key = p_key)
       AND NOT done
       AND ((postponed AND invisible_until > p_now) OR (claimed AND NOT woken));
    GET DIAGNOSTICS n_state = ROW_COUNT;
    UPDATE mq_messages SET available_at = p_now
     WHERE topic = p_topic AND partition_key = p_key AND available_at > p_now;
    GET DIAGNOSTICS n_delayed = ROW_COUNT;
    UPDATE mq_partitions SET next_due = p_now
     WHERE topic = p_topic AND partition_key = p_key
       AND next_due IS NOT NULL AND next_due > p_now;
    RETURN n_state + n_delayed;
END
$$;

CREATE OR REPLACE FUNCTION mq_notify_soon(p_channel TEXT, p_payload TEXT)
RETURNS VOID
LANGUAGE plpgsql
AS $$
BEGIN
    -- Local to this statement's own transaction: only its commit skips the
    -- WAL flush wait.
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_notify(p_channel, p_payload);
END
$$;
