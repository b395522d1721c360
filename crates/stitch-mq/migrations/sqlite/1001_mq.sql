-- stitch-mq schema (SQLite). See docs/architecture.md "Message queue".
-- Times are epoch milliseconds. AUTOINCREMENT keeps seq strictly increasing
-- even after the newest rows are deleted, so a new message never lands
-- at or below a consumer's cursor.
CREATE TABLE mq_messages (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    topic         TEXT    NOT NULL,
    partition_key TEXT    NOT NULL,
    msg_id        TEXT    NOT NULL,
    payload       BLOB    NOT NULL,
    metadata      TEXT,
    published_at  INTEGER NOT NULL,
    available_at  INTEGER NOT NULL,
    created_at    INTEGER NOT NULL
);
CREATE UNIQUE INDEX mq_messages_dedup ON mq_messages (topic, partition_key, msg_id);
CREATE INDEX mq_messages_partition ON mq_messages (topic, partition_key, seq);

CREATE TABLE mq_groups (
    topic      TEXT    NOT NULL,
    grp        TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (topic, grp)
) WITHOUT ROWID;

CREATE TABLE mq_partitions (
    topic         TEXT    NOT NULL,
    grp           TEXT    NOT NULL,
    partition_key TEXT    NOT NULL,
    cursor        INTEGER NOT NULL DEFAULT 0,
    next_due      INTEGER,
    lease_owner   TEXT,
    lease_expires INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (topic, grp, partition_key)
) WITHOUT ROWID;
CREATE INDEX mq_partitions_due ON mq_partitions (topic, grp, next_due);
CREATE INDEX mq_partitions_owner ON mq_partitions (topic, grp, lease_owner);
CREATE INDEX mq_partitions_key ON mq_partitions (topic, partition_key);

CREATE TABLE mq_state (
    grp             TEXT    NOT NULL,
    seq             INTEGER NOT NULL,
    topic           TEXT    NOT NULL,
    partition_key   TEXT    NOT NULL,
    attempt         INTEGER NOT NULL,
    invisible_until INTEGER NOT NULL,
    postponed       INTEGER NOT NULL DEFAULT 0,
    done            INTEGER NOT NULL DEFAULT 0,
    -- 1 while a consumer holds the delivery (claimed, no outcome yet)
    claimed         INTEGER NOT NULL DEFAULT 0,
    token           INTEGER NOT NULL,
    PRIMARY KEY (grp, seq)
) WITHOUT ROWID;

CREATE TABLE mq_subscribers (
    topic        TEXT    NOT NULL,
    grp          TEXT    NOT NULL,
    subscriber   TEXT    NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    PRIMARY KEY (topic, grp, subscriber)
) WITHOUT ROWID;

CREATE TABLE mq_dead_letters (
    dlq_id          INTEGER PRIMARY KEY AUTOINCREMENT,
    topic           TEXT    NOT NULL,
    grp             TEXT    NOT NULL,
    partition_key   TEXT    NOT NULL,
    msg_id          TEXT    NOT NULL,
    payload         BLOB    NOT NULL,
    metadata        TEXT,
    failure_message TEXT    NOT NULL,
    failure_detail  TEXT,
    attempts        INTEGER NOT NULL,
    published_at    INTEGER NOT NULL,
    failed_at       INTEGER NOT NULL
);
CREATE UNIQUE INDEX mq_dead_letters_key ON mq_dead_letters (topic, grp, partition_key, msg_id);
