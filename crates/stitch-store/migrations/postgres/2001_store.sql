-- stitch-store schema (PostgreSQL): build records, the event log, log lines
-- and server secrets in one migration (SQLite reached the same tables in
-- versions 2001-2004). Versions 2001+ share `_sqlx_migrations` with the
-- message queue's 1001+; never renumber below 2001.
--
-- Timestamps are BIGINT milliseconds since the Unix epoch (UTC). base / head /
-- caller_metadata / runner_metadata / runner_ref are JSON text, stored
-- verbatim. Ids, queue names and idempotency keys use the "C" collation:
-- compared and ordered byte-wise, exactly as on SQLite (list pages are
-- ordered by id).
CREATE TABLE builds (
    id                  TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    queue               TEXT COLLATE "C" NOT NULL,
    status              TEXT    NOT NULL CHECK (status IN
                            ('unknown', 'accepted', 'running', 'succeeded', 'failed', 'cancelled')),
    base                TEXT    NOT NULL,
    head                TEXT    NOT NULL,
    caller_metadata     TEXT    NOT NULL,
    runner_metadata     TEXT    NOT NULL,
    runner              TEXT    NOT NULL,
    runner_ref          TEXT,
    idempotency_key     TEXT COLLATE "C",
    cancel_requested    BOOLEAN NOT NULL DEFAULT FALSE,
    cancel_requested_at BIGINT,
    job_token_hash      TEXT,
    failure_reason      TEXT,
    log_line_count      BIGINT  NOT NULL DEFAULT 0,
    created_at          BIGINT  NOT NULL,
    updated_at          BIGINT  NOT NULL,
    started_at          BIGINT,
    finished_at         BIGINT,
    version             BIGINT  NOT NULL DEFAULT 1
) WITH (fillfactor = 80);

-- One build per (queue, idempotency key); NULL keys never collide.
CREATE UNIQUE INDEX builds_queue_idempotency_key ON builds (queue, idempotency_key);
CREATE INDEX builds_queue_id ON builds (queue, id);
CREATE INDEX builds_status_id ON builds (status, id);

-- The store's write lock and the event counter in one row. Every store write
-- transaction locks this row first (SELECT … FOR UPDATE) and holds it until
-- commit, so
--   * event seqs are allocated and committed in order, database-wide: a
--     reader resuming after the last seq it saw never skips one;
--   * a rolled-back transaction rolls its numbers back: no gaps;
--   * store writers in every process take their locks in one order (this
--     row first), so they cannot deadlock each other.
-- See docs/adr/0009-store-on-postgres-and-mysql.md.
CREATE TABLE event_seq (
    id       INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    next_seq BIGINT  NOT NULL
);
INSERT INTO event_seq (id, next_seq) VALUES (1, 1);

CREATE TABLE events (
    seq      BIGINT NOT NULL PRIMARY KEY,
    build_id TEXT COLLATE "C" NOT NULL REFERENCES builds (id),
    queue    TEXT COLLATE "C" NOT NULL,
    kind     TEXT   NOT NULL CHECK (kind IN ('status', 'failing')),
    status   TEXT   NOT NULL CHECK (status IN
                 ('unknown', 'accepted', 'running', 'succeeded', 'failed', 'cancelled')),
    metadata TEXT   NOT NULL,
    at       BIGINT NOT NULL
);
CREATE INDEX events_build_id_seq ON events (build_id, seq);

-- Log lines: the LogLine frame as JSON text, served byte for byte.
CREATE TABLE log_lines (
    build_id TEXT COLLATE "C" NOT NULL REFERENCES builds (id),
    line_no  BIGINT NOT NULL,
    line     TEXT   NOT NULL,
    PRIMARY KEY (build_id, line_no)
);

-- Server-wide secrets (the job token HMAC key, ADR 0003).
CREATE TABLE server_secrets (
    name       TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    secret     BYTEA  NOT NULL,
    created_at BIGINT NOT NULL
);
