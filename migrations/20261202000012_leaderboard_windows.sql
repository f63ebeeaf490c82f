-- Leaderboard windows: each submission is recorded on four boards (its
-- test's all-time board and the boards of the day, ISO week and month that
-- hold it), so one seq can move an entry on each of them.
ALTER TABLE lb_moves DROP CONSTRAINT lb_moves_pkey;
DROP INDEX lb_moves_test;
ALTER TABLE lb_moves ADD PRIMARY KEY (test_id, seq);

-- A deployment with submissions already on its boards rebuilds the
-- leaderboard from the log once (an instance picks the request up), so the
-- periodic boards hold the whole history, as the all-time board does.
INSERT INTO projection_rebuilds (name, state)
SELECT 'leaderboard', 'requested' WHERE EXISTS (SELECT 1 FROM lb_entries)
ON CONFLICT (name) DO UPDATE
   SET state = 'requested', requested_at = now(), runner = NULL, processed = 0,
       total = 0, started_at = NULL, finished_at = NULL, heartbeat_at = NULL,
       error = NULL
 WHERE projection_rebuilds.state NOT IN ('requested', 'rebuilding');
