-- A wake in one round trip (ADR 0012). The statements and their order are
-- those the driver used to send one by one inside a transaction: lock the
-- partition's rows first (a claim holds them while it decides), then make a
-- postponed delivery due, mark one in flight, make a delayed message
-- available and pull the partition's due time forward; notify listeners
-- only when something changed. Run as one statement, the whole function is
-- one transaction; under load the seven round trips it replaces were most of
-- the time a wake held the partition's lock.
CREATE OR REPLACE FUNCTION mq_wake(p_topic TEXT, p_key TEXT, p_now BIGINT, p_channel TEXT)
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
    IF n_state + n_delayed > 0 THEN
        PERFORM pg_notify(p_channel, p_topic);
    END IF;
    RETURN n_state + n_delayed;
END
$$;
