-- The event log: one row per build status change or promised failure.
--
-- `seq` is gapless per database. It is allocated from the one-row counter
-- below inside the same transaction as the change it records, so a rolled
-- back change also rolls back its number, and (because the counter row is
-- write-locked until commit) events become visible in seq order.
CREATE TABLE event_seq (
    id   INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    next INTEGER NOT NULL
);
INSERT INTO event_seq (id, next) VALUES (1, 1);

CREATE TABLE events (
    seq      INTEGER NOT NULL PRIMARY KEY,
    build_id TEXT    NOT NULL REFERENCES builds (id),
    queue    TEXT    NOT NULL,
    kind     TEXT    NOT NULL CHECK (kind IN ('status', 'failing')),
    status   TEXT    NOT NULL CHECK (status IN
                 ('unknown', 'accepted', 'running', 'succeeded', 'failed', 'cancelled')),
    metadata TEXT    NOT NULL,
    at       INTEGER NOT NULL
);

CREATE INDEX events_build_id_seq ON events (build_id, seq);
