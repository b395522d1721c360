-- stitch-mq schema (MySQL 8 / MariaDB 10.6+, InnoDB). See docs/architecture.md
-- "Message queue" and docs/adr/0004-sql-queue-claims.md. Times are epoch
-- milliseconds. Names are VARBINARY: compared byte-wise with no trailing-space
-- padding (so "a" and "a " are different ids) and sorted exactly as the driver
-- sorts them when it orders row locks.
CREATE TABLE mq_messages (
    seq           BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    topic         VARBINARY(200) NOT NULL,
    partition_key VARBINARY(255) NOT NULL,
    msg_id        VARBINARY(255) NOT NULL,
    payload       LONGBLOB NOT NULL,
    metadata      LONGTEXT CHARACTER SET utf8mb4,
    published_at  BIGINT NOT NULL,
    available_at  BIGINT NOT NULL,
    created_at    BIGINT NOT NULL,
    UNIQUE KEY mq_messages_dedup (topic, partition_key, msg_id),
    KEY mq_messages_partition (topic, partition_key, seq)
) ENGINE = InnoDB;

-- One row per topic: publishes hold it shared, registering a group exclusive.
CREATE TABLE mq_topics (
    topic VARBINARY(200) NOT NULL PRIMARY KEY
) ENGINE = InnoDB;

CREATE TABLE mq_groups (
    topic      VARBINARY(200) NOT NULL,
    grp        VARBINARY(200) NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (topic, grp)
) ENGINE = InnoDB;

CREATE TABLE mq_partitions (
    topic         VARBINARY(200) NOT NULL,
    grp           VARBINARY(200) NOT NULL,
    partition_key VARBINARY(255) NOT NULL,
    `cursor`      BIGINT NOT NULL DEFAULT 0,
    next_due      BIGINT NULL,
    lease_owner   VARBINARY(200) NULL,
    lease_expires BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (topic, grp, partition_key),
    KEY mq_partitions_due (topic, grp, next_due),
    KEY mq_partitions_owner (topic, grp, lease_owner),
    KEY mq_partitions_key (topic, partition_key)
) ENGINE = InnoDB;

CREATE TABLE mq_state (
    grp             VARBINARY(200) NOT NULL,
    seq             BIGINT  NOT NULL,
    topic           VARBINARY(200) NOT NULL,
    partition_key   VARBINARY(255) NOT NULL,
    attempt         INT     NOT NULL,
    invisible_until BIGINT  NOT NULL,
    postponed       TINYINT NOT NULL DEFAULT 0,
    done            TINYINT NOT NULL DEFAULT 0,
    -- 1 while a consumer holds the delivery (claimed, no outcome yet)
    claimed         TINYINT NOT NULL DEFAULT 0,
    token           BIGINT  NOT NULL,
    PRIMARY KEY (grp, seq)
) ENGINE = InnoDB;

CREATE TABLE mq_subscribers (
    topic        VARBINARY(200) NOT NULL,
    grp          VARBINARY(200) NOT NULL,
    subscriber   VARBINARY(200) NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    PRIMARY KEY (topic, grp, subscriber)
) ENGINE = InnoDB;

CREATE TABLE mq_dead_letters (
    dlq_id          BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    topic           VARBINARY(200) NOT NULL,
    grp             VARBINARY(200) NOT NULL,
    partition_key   VARBINARY(255) NOT NULL,
    msg_id          VARBINARY(255) NOT NULL,
    payload         LONGBLOB NOT NULL,
    metadata        LONGTEXT CHARACTER SET utf8mb4,
    failure_message LONGTEXT CHARACTER SET utf8mb4 NOT NULL,
    failure_detail  LONGTEXT CHARACTER SET utf8mb4,
    attempts        INT    NOT NULL,
    published_at    BIGINT NOT NULL,
    failed_at       BIGINT NOT NULL,
    UNIQUE KEY mq_dead_letters_key (topic, grp, partition_key, msg_id)
) ENGINE = InnoDB;
