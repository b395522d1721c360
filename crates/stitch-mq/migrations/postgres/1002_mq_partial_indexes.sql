-- Partial indexes for the claim and lease scans (ADR 0011).
-- A lookup of partition rows by key must use the primary key. While the
-- table's statistics are young (a fresh installation filling up faster
-- than autovacuum analyzes), the planner cannot tell a (topic, grp, …)
-- index from the primary key and picked the due or owner index with the
-- key as a filter: every lookup read the whole group, and statements over
-- n partitions became quadratic. Indexes that only hold rows with a due
-- time or an owner are unusable for key lookups, and smaller: finished
-- partitions fall out of them.
DROP INDEX mq_partitions_due;
CREATE INDEX mq_partitions_due ON mq_partitions (topic, grp, next_due) WHERE next_due IS NOT NULL;
DROP INDEX mq_partitions_owner;
CREATE INDEX mq_partitions_owner ON mq_partitions (topic, grp, lease_owner) WHERE lease_owner IS NOT NULL;

-- Queue tables are rewritten continuously: vacuum and analyze them after a
-- twentieth of their rows changed, not the default fifth / tenth.
ALTER TABLE mq_partitions SET (autovacuum_vacuum_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.05);
ALTER TABLE mq_state SET (autovacuum_vacuum_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.05);
ALTER TABLE mq_messages SET (autovacuum_vacuum_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.05);
