-- stitch-mq schema (PostgreSQL). See docs/architecture.md "Message queue"
-- and docs/adr/0004-sql-queue-claims.md. Times are epoch milliseconds.
-- Names use the "C" collation so the database sorts them byte-wise, exactly
-- as the driver does when it orders row locks (a shared lock order is what
-- keeps writers from deadlocking). A sequence never hands a number out
-- twice, so a new message never lands at or below a consumer's cursor.
CREATE TABLE mq_messages (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic         TEXT COLLATE "C" NOT NULL,
    partition_key TEXT COLLATE "C" NOT NULL,
    msg_id        TEXT COLLATE "C" NOT NULL,
    payload       BYTEA  NOT NULL,
    metadata      TEXT,
    published_at  BIGINT NOT NULL,
    available_at  BIGINT NOT NULL,
    created_at    BIGINT NOT NULL
);
CREATE UNIQUE INDEX mq_messages_dedup ON mq_messages (topic, partition_key, msg_id);
CREATE INDEX mq_messages_partition ON mq_messages (topic, partition_key, seq);

CREATE TABLE mq_groups (
    topic      TEXT COLLATE "C" NOT NULL,
    grp        TEXT COLLATE "C" NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (topic, grp)
);

-- Rewritten by every claim and outcome: leave room on each page for
-- heap-only-tuple updates.
CREATE TABLE mq_partitions (
    topic         TEXT COLLATE "C" NOT NULL,
    grp           TEXT COLLATE "C" NOT NULL,
    partition_key TEXT COLLATE "C" NOT NULL,
    cursor        BIGINT NOT NULL DEFAULT 0,
    next_due      BIGINT,
    lease_owner   TEXT COLLATE "C",
    lease_expires BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (topic, grp, partition_key)
) WITH (fillfactor = 70);
CREATE INDEX mq_partitions_due ON mq_partitions (topic, grp, next_due);
CREATE INDEX mq_partitions_owner ON mq_partitions (topic, grp, lease_owner);
CREATE INDEX mq_partitions_key ON mq_partitions (topic, partition_key);

CREATE TABLE mq_state (
    grp             TEXT COLLATE "C" NOT NULL,
    seq             BIGINT  NOT NULL,
    topic           TEXT COLLATE "C" NOT NULL,
    partition_key   TEXT COLLATE "C" NOT NULL,
    attempt         INTEGER NOT NULL,
    invisible_until BIGINT  NOT NULL,
    postponed       BOOLEAN NOT NULL DEFAULT FALSE,
    done            BOOLEAN NOT NULL DEFAULT FALSE,
    -- true while a consumer holds the delivery (claimed, no outcome yet)
    claimed         BOOLEAN NOT NULL DEFAULT FALSE,
    token           BIGINT  NOT NULL,
    PRIMARY KEY (grp, seq)
) WITH (fillfactor = 70);

CREATE TABLE mq_subscribers (
    topic        TEXT COLLATE "C" NOT NULL,
    grp          TEXT COLLATE "C" NOT NULL,
    subscriber   TEXT COLLATE "C" NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    PRIMARY KEY (topic, grp, subscriber)
);

CREATE TABLE mq_dead_letters (
    dlq_id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic           TEXT COLLATE "C" NOT NULL,
    grp             TEXT COLLATE "C" NOT NULL,
    partition_key   TEXT COLLATE "C" NOT NULL,
    msg_id          TEXT COLLATE "C" NOT NULL,
    payload         BYTEA   NOT NULL,
    metadata        TEXT,
    failure_message TEXT    NOT NULL,
    failure_detail  TEXT,
    attempts        INTEGER NOT NULL,
    published_at    BIGINT  NOT NULL,
    failed_at       BIGINT  NOT NULL
);
CREATE UNIQUE INDEX mq_dead_letters_key ON mq_dead_letters (topic, grp, partition_key, msg_id);
