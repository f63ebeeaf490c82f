-- Collection leaderboards. The leaderboard projection keeps each collection's
-- tests (from CollectionCreated and CollectionTestAdded) and the periods each
-- test has boards in, so that a test joining a collection is counted on the
-- collection's boards of every period at once.
CREATE TABLE lb_collection_tests
(
    collection_id uuid   NOT NULL,
    test_id       uuid   NOT NULL,
    -- The log seq of the event that added the test.
    added_seq     bigint NOT NULL,
    PRIMARY KEY (collection_id, test_id)
);
CREATE INDEX lb_collection_tests_test ON lb_collection_tests (test_id);

-- The periodic boards of each test: its day, week and month boards that
-- hold an entry (the all-time board is the test's own id).
CREATE TABLE lb_boards
(
    board_id     uuid        PRIMARY KEY,
    test_id      uuid        NOT NULL,
    "window"     text        NOT NULL,
    period_start timestamptz NOT NULL
);
CREATE INDEX lb_boards_test ON lb_boards (test_id);

-- A test joining a collection moves many users on one of its boards at the
-- same seq.
ALTER TABLE lb_moves DROP CONSTRAINT lb_moves_pkey;
ALTER TABLE lb_moves ADD PRIMARY KEY (test_id, seq, user_id);

-- A deployment with submissions or collections already in its log rebuilds
-- the leaderboard from it once, so the new tables and the collections'
-- boards hold the whole history.
INSERT INTO projection_rebuilds (name, state)
SELECT 'leaderboard', 'requested'
 WHERE EXISTS (SELECT 1 FROM lb_entries)
    OR EXISTS (SELECT 1 FROM events WHERE aggregate_type = 'Collection')
ON CONFLICT (name) DO UPDATE
   SET state = 'requested', requested_at = now(), runner = NULL, processed = 0,
       total = 0, started_at = NULL, finished_at = NULL, heartbeat_at = NULL,
       error = NULL
 WHERE projection_rebuilds.state NOT IN ('requested', 'rebuilding');
