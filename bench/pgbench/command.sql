-- The shape of one Podium command at the event store: read an aggregate's
-- events, append one. Each client appends to aggregates of its own, as
-- commands on different attempts do, so clients never conflict.
\set agg random(1, 1000)
BEGIN;
SELECT event_type, payload FROM events
 WHERE aggregate_type = 'Bench' AND aggregate_id = :client_id || '-' || :agg
 ORDER BY sequence;
INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
SELECT 'Bench', :client_id || '-' || :agg, COALESCE(max(sequence), 0) + 1, 'BenchAppended', '1.0',
       '{"BenchAppended": {"score": 7}}', '{"actor": "bench", "request_id": "pgbench"}'
  FROM events WHERE aggregate_type = 'Bench' AND aggregate_id = :client_id || '-' || :agg;
COMMIT;
