-- Events written but not numbered yet (ADR 0020). A writer inserts its
-- events here, beside its other changes and without any shared lock; a
-- sequencing pass moves the committed ones into `events` in `id` order with
-- the next gapless seqs under the `event_seq` row, one holder per pass
-- instead of one per writing transaction. `id` orders the rows of one
-- build as their writers committed (they hold the build row while they
-- write). No foreign key: the pass drops rows whose build is gone.
CREATE TABLE event_pending (
    id       BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    build_id VARCHAR(64)  CHARACTER SET ascii   COLLATE ascii_bin   NOT NULL,
    queue    VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    kind     VARCHAR(16)  CHARACTER SET ascii NOT NULL,
    status   VARCHAR(16)  CHARACTER SET ascii NOT NULL,
    metadata LONGTEXT     CHARACTER SET utf8mb4 NOT NULL,
    at       BIGINT NOT NULL
) ENGINE = InnoDB;
