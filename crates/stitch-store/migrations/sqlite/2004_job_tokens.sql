-- Server-wide secrets, created once and kept for the database's lifetime.
-- `job_token_key` is the HMAC key job tokens are derived from
-- (token = HMAC-SHA256(key, build id)), so the trigger stage can hand a
-- redelivered trigger the same token the provider's build already holds
-- (docs/adr/0003-job-tokens.md). Builds keep only the SHA-256 of their
-- token (builds.job_token_hash).
CREATE TABLE server_secrets (
    name       TEXT    NOT NULL PRIMARY KEY,
    secret     BLOB    NOT NULL,
    created_at INTEGER NOT NULL
);
