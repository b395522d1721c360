-- Events written but not numbered yet (ADR 0020). A writer inserts its
-- events here, beside its other changes and without any shared lock; a
-- sequencing pass moves the committed ones into `events` in `id` order with
-- the next gapless seqs under the `event_seq` row, one holder per pass
-- instead of one per writing transaction. `id` orders the rows of one
-- build as their writers committed (they hold the build row while they
-- write). No foreign key: the pass drops rows whose build is gone.
CREATE TABLE event_pending (
    id       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    build_id TEXT COLLATE "C" NOT NULL,
    queue    TEXT COLLATE "C" NOT NULL,
    kind     TEXT   NOT NULL,
    status   TEXT   NOT NULL,
    metadata TEXT   NOT NULL,
    at       BIGINT NOT NULL
);
