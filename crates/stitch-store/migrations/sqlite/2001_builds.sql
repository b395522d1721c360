-- Build records. Owned by stitch-store; versions 2001+ share `_sqlx_migrations`
-- with stitch-mq (1001+), so never renumber below 2001.
--
-- Timestamps are INTEGER milliseconds since the Unix epoch (UTC) everywhere.
-- base / head / caller_metadata / runner_metadata / runner_ref are JSON text.
CREATE TABLE builds (
    id                  TEXT    NOT NULL PRIMARY KEY,
    queue               TEXT    NOT NULL,
    status              TEXT    NOT NULL CHECK (status IN
                            ('unknown', 'accepted', 'running', 'succeeded', 'failed', 'cancelled')),
    base                TEXT    NOT NULL,
    head                TEXT    NOT NULL,
    caller_metadata     TEXT    NOT NULL,
    runner_metadata     TEXT    NOT NULL,
    runner              TEXT    NOT NULL,
    runner_ref          TEXT,
    idempotency_key     TEXT,
    cancel_requested    INTEGER NOT NULL DEFAULT 0 CHECK (cancel_requested IN (0, 1)),
    cancel_requested_at INTEGER,
    job_token_hash      TEXT,
    failure_reason      TEXT,
    log_line_count      INTEGER NOT NULL DEFAULT 0,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    started_at          INTEGER,
    finished_at         INTEGER,
    version             INTEGER NOT NULL DEFAULT 1
);

-- One build per (queue, idempotency key). NULL keys are distinct from each
-- other on SQLite, PostgreSQL and MySQL alike, so builds without a key never
-- collide.
CREATE UNIQUE INDEX builds_queue_idempotency_key ON builds (queue, idempotency_key);

-- List pages are newest-first by id, optionally filtered by queue or status;
-- recovery scans the non-terminal statuses.
CREATE INDEX builds_queue_id ON builds (queue, id);
CREATE INDEX builds_status_id ON builds (status, id);
