-- The builds list filtered by queue and status together (the dashboard's
-- filters, `stitch build list --queue Q --status S`): without this index
-- such a page scans every build of the queue for the few of that status.
CREATE INDEX builds_queue_status_id ON builds (queue, status, id);
