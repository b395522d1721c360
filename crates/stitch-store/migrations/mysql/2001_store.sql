-- stitch-store schema (MySQL 8 / MariaDB 10.6+, InnoDB): build records, the
-- event log, log lines and server secrets in one migration (SQLite reached
-- the same tables in versions 2001-2004). Versions 2001+ share
-- `_sqlx_migrations` with the message queue's 1001+; never renumber below 2001.
--
-- Timestamps are BIGINT milliseconds since the Unix epoch (UTC). JSON values
-- are LONGTEXT, stored verbatim. Ids, queue names, idempotency keys and
-- secret names use a binary collation: compared exactly (case and trailing
-- spaces matter) and ordered byte-wise, as on SQLite.
CREATE TABLE builds (
    id                  VARCHAR(64)  CHARACTER SET ascii   COLLATE ascii_bin   NOT NULL PRIMARY KEY,
    queue               VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    status              VARCHAR(16)  CHARACTER SET ascii NOT NULL,
    base                LONGTEXT     CHARACTER SET utf8mb4 NOT NULL,
    head                LONGTEXT     CHARACTER SET utf8mb4 NOT NULL,
    caller_metadata     LONGTEXT     CHARACTER SET utf8mb4 NOT NULL,
    runner_metadata     LONGTEXT     CHARACTER SET utf8mb4 NOT NULL,
    runner              VARCHAR(64)  CHARACTER SET utf8mb4 NOT NULL,
    runner_ref          LONGTEXT     CHARACTER SET utf8mb4 NULL,
    idempotency_key     VARCHAR(256) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    cancel_requested    BOOLEAN      NOT NULL DEFAULT FALSE,
    cancel_requested_at BIGINT       NULL,
    job_token_hash      VARCHAR(200) CHARACTER SET utf8mb4 NULL,
    failure_reason      LONGTEXT     CHARACTER SET utf8mb4 NULL,
    log_line_count      BIGINT       NOT NULL DEFAULT 0,
    created_at          BIGINT       NOT NULL,
    updated_at          BIGINT       NOT NULL,
    started_at          BIGINT       NULL,
    finished_at         BIGINT       NULL,
    version             BIGINT       NOT NULL DEFAULT 1,
    CONSTRAINT builds_status CHECK (status IN
        ('unknown', 'accepted', 'running', 'succeeded', 'failed', 'cancelled')),
    -- One build per (queue, idempotency key); NULL keys never collide.
    UNIQUE KEY builds_queue_idempotency_key (queue, idempotency_key),
    KEY builds_queue_id (queue, id),
    KEY builds_status_id (status, id)
) ENGINE = InnoDB;

-- The store's write lock and the event counter in one row: every store write
-- transaction locks it first (SELECT … FOR UPDATE) and holds it until commit,
-- so seqs are allocated and committed in order and gapless, and store writers
-- in every process lock in one order. See
-- docs/adr/0009-store-on-postgres-and-mysql.md.
CREATE TABLE event_seq (
    id       INTEGER NOT NULL PRIMARY KEY,
    next_seq BIGINT  NOT NULL,
    CONSTRAINT event_seq_one_row CHECK (id = 1)
) ENGINE = InnoDB;
INSERT INTO event_seq (id, next_seq) VALUES (1, 1);

CREATE TABLE events (
    seq      BIGINT NOT NULL PRIMARY KEY,
    build_id VARCHAR(64)  CHARACTER SET ascii   COLLATE ascii_bin   NOT NULL,
    queue    VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    kind     VARCHAR(16)  CHARACTER SET ascii NOT NULL,
    status   VARCHAR(16)  CHARACTER SET ascii NOT NULL,
    metadata LONGTEXT     CHARACTER SET utf8mb4 NOT NULL,
    at       BIGINT NOT NULL,
    CONSTRAINT events_kind CHECK (kind IN ('status', 'failing')),
    CONSTRAINT events_status CHECK (status IN
        ('unknown', 'accepted', 'running', 'succeeded', 'failed', 'cancelled')),
    KEY events_build_id_seq (build_id, seq),
    CONSTRAINT events_build FOREIGN KEY (build_id) REFERENCES builds (id)
) ENGINE = InnoDB;

-- Log lines: the LogLine frame as JSON text, served byte for byte.
CREATE TABLE log_lines (
    build_id VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    line_no  BIGINT   NOT NULL,
    line     LONGTEXT CHARACTER SET utf8mb4 NOT NULL,
    PRIMARY KEY (build_id, line_no),
    CONSTRAINT log_lines_build FOREIGN KEY (build_id) REFERENCES builds (id)
) ENGINE = InnoDB;

-- Server-wide secrets (the job token HMAC key, ADR 0003).
CREATE TABLE server_secrets (
    name       VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    secret     BLOB   NOT NULL,
    created_at BIGINT NOT NULL
) ENGINE = InnoDB;
