-- Collections in the catalog, for clients that let a user pick a
-- collection's board (GET /v1/collections).
CREATE TABLE catalog_collections
(
    collection_id uuid        PRIMARY KEY,
    title         text        NOT NULL,
    -- In the order they were added.
    test_ids      uuid[]      NOT NULL,
    created_at    timestamptz NOT NULL
);

-- A deployment with collections in its log rebuilds the catalog from it
-- once, so they are listed too.
INSERT INTO projection_rebuilds (name, state)
SELECT 'catalog', 'requested'
 WHERE EXISTS (SELECT 1 FROM events WHERE aggregate_type = 'Collection')
ON CONFLICT (name) DO UPDATE
   SET state = 'requested', requested_at = now(), runner = NULL, processed = 0,
       total = 0, started_at = NULL, finished_at = NULL, heartbeat_at = NULL,
       error = NULL
 WHERE projection_rebuilds.state NOT IN ('requested', 'rebuilding');
