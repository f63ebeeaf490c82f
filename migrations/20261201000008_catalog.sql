-- The test catalog as a read model (GET /v1/tests folded every Test event,
-- with its full definition, on every request).
CREATE TABLE catalog_tests
(
    test_id         uuid        PRIMARY KEY,
    title           text        NOT NULL,
    max_score       integer     NOT NULL,
    question_count  integer     NOT NULL,
    time_limit_secs integer,
    archived        boolean     NOT NULL DEFAULT false,
    published_at    timestamptz NOT NULL
);
CREATE INDEX catalog_tests_newest ON catalog_tests (published_at DESC, test_id);

-- Filled from the log as it stands, so that a deployment older than the
-- events stream's retention needs no replay for it. Applying a Test event
-- twice changes nothing (a publish inserts once, an archive sets a flag), so
-- the projection's checkpoint starts at the furthest any relay has numbered:
-- every event up to there is committed and read here; later ones reach the
-- projection as usual. The checkpoint is read first: each statement below
-- sees at least what it covers.
INSERT INTO projection_checkpoints (name, seq)
SELECT 'catalog', COALESCE(max(seq), 0) FROM relay_checkpoints
ON CONFLICT (name) DO NOTHING;

INSERT INTO catalog_tests (test_id, title, max_score, question_count, time_limit_secs,
                           published_at)
SELECT (e.payload -> 'TestPublished' ->> 'test_id')::uuid,
       e.payload -> 'TestPublished' -> 'definition' ->> 'title',
       (SELECT COALESCE(sum((q ->> 'points')::int), 0)
          FROM jsonb_array_elements(e.payload -> 'TestPublished' -> 'definition' -> 'questions') q),
       jsonb_array_length(e.payload -> 'TestPublished' -> 'definition' -> 'questions'),
       (e.payload -> 'TestPublished' -> 'definition' ->> 'time_limit_secs')::int,
       e.recorded_at
  FROM events e
 WHERE e.aggregate_type = 'Test' AND e.event_type = 'TestPublished'
ON CONFLICT (test_id) DO NOTHING;

UPDATE catalog_tests c SET archived = true
  FROM events e
 WHERE e.aggregate_type = 'Test' AND e.event_type = 'TestArchived'
   AND (e.payload -> 'TestArchived' ->> 'test_id')::uuid = c.test_id;

