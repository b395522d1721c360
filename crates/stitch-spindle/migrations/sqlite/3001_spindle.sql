-- The Tangled spindle's durable state, beside the store's and the queue's
-- tables in the same database (versions 3001+).

-- Resume points: 'jetstream' (time_us), 'knot:<host>' (nanos),
-- 'status_seq' (the last store event seq translated into status records).
CREATE TABLE spindle_cursors (
    name   TEXT PRIMARY KEY NOT NULL,
    cursor INTEGER NOT NULL
);

-- sh.tangled.repo records that name this spindle, keyed like the record.
CREATE TABLE spindle_repos (
    did  TEXT NOT NULL,
    rkey TEXT NOT NULL,
    name TEXT NOT NULL,
    knot TEXT NOT NULL,
    PRIMARY KEY (did, rkey)
);
CREATE INDEX spindle_repos_by_name ON spindle_repos (knot, did, name);

-- sh.tangled.spindle.member records of the owner for this instance.
CREATE TABLE spindle_members (
    did     TEXT NOT NULL,
    rkey    TEXT NOT NULL,
    subject TEXT NOT NULL,
    PRIMARY KEY (did, rkey)
);
CREATE INDEX spindle_members_by_subject ON spindle_members (subject);

-- sh.tangled.repo.collaborator records (kept for ownership questions).
CREATE TABLE spindle_collaborators (
    did     TEXT NOT NULL,
    rkey    TEXT NOT NULL,
    subject TEXT NOT NULL,
    repo    TEXT NOT NULL,
    PRIMARY KEY (did, rkey)
);

-- One row per (knot, pipeline rkey, workflow) ever spawned: a replayed
-- trigger finds its row and starts nothing. build_id is set once the stitch
-- build exists; error is set when the workflow failed before any build.
CREATE TABLE spindle_runs (
    knot        TEXT NOT NULL,
    rkey        TEXT NOT NULL,
    workflow    TEXT NOT NULL,
    repo_did    TEXT NOT NULL,
    repo_name   TEXT NOT NULL,
    queue       TEXT,
    build_id    TEXT,
    error       TEXT,
    last_status TEXT,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (knot, rkey, workflow)
);
CREATE UNIQUE INDEX spindle_runs_by_build ON spindle_runs (build_id) WHERE build_id IS NOT NULL;

-- The spindle's /events log: one row per sh.tangled.pipeline.status record.
-- created is unix nanos, strictly increasing (the /events cursor).
CREATE TABLE spindle_events (
    created INTEGER PRIMARY KEY NOT NULL,
    rkey    TEXT NOT NULL UNIQUE,
    nsid    TEXT NOT NULL,
    event   TEXT NOT NULL
);
