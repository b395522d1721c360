-- Retention (docs/configuration.md `[retention]`): the pruner finds builds
-- terminal for longer than the window by `finished_at` (NULL until terminal).
CREATE INDEX builds_finished_at ON builds (finished_at);

-- Leases that let one process of several sharing the database do a periodic
-- job (the pruning pass) at a time: the holder and until when (epoch ms).
-- An empty owner is a free lease. ADR 0012.
CREATE TABLE store_leases (
    name       VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    owner      VARCHAR(400) CHARACTER SET utf8mb4 NOT NULL,
    expires_at BIGINT NOT NULL
) ENGINE = InnoDB;
INSERT INTO store_leases (name, owner, expires_at) VALUES ('retention', '', 0);
