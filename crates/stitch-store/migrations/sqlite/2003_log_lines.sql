-- Log lines of runners that produce logs locally. `line` is the LogLine frame
-- as JSON text, stored verbatim so it is served byte for byte.
-- Line numbers are per build, 1-based, allocated from builds.log_line_count.
CREATE TABLE log_lines (
    build_id TEXT    NOT NULL REFERENCES builds (id),
    line_no  INTEGER NOT NULL,
    line     TEXT    NOT NULL,
    PRIMARY KEY (build_id, line_no)
);
