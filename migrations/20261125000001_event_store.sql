-- The log's epoch: bumped when the database is restored into another cluster
-- (detected by its system identifier), whose transaction ids start over, so
-- that events written after a restore still sort after those before it.
CREATE TABLE log_epoch
(
    singleton         boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch             integer NOT NULL,
    -- pg_control_system().system_identifier of the cluster that wrote last.
    system_identifier bigint
);
INSERT INTO log_epoch (epoch) VALUES (1);

CREATE FUNCTION podium_log_epoch() RETURNS integer
    LANGUAGE sql STABLE AS 'SELECT epoch FROM log_epoch';

-- The event log: the only source of truth. postgres-es inserts name their
-- columns, so the columns below that it does not know are filled by defaults.
CREATE TABLE events
(
    -- Global position, unique and increasing in insertion order (not commit order).
    position       bigint GENERATED ALWAYS AS IDENTITY,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    sequence       bigint      NOT NULL CHECK (sequence >= 0),
    event_type     text        NOT NULL,
    event_version  text        NOT NULL,
    payload        jsonb       NOT NULL,
    metadata       jsonb       NOT NULL,
    -- The writing transaction's id. Readers tail the log in
    -- (epoch, txid, position) order and, within the current epoch, only below
    -- pg_snapshot_xmin(pg_current_snapshot()): every transaction that could
    -- still add rows there has finished, so a row that commits late is never
    -- skipped and the order never changes behind a reader.
    epoch          integer     NOT NULL DEFAULT podium_log_epoch(),
    txid           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence),
    CONSTRAINT events_position_key UNIQUE (position)
);

CREATE INDEX events_commit_order ON events (epoch, txid, position);

-- Aggregate snapshots, for aggregates whose histories grow long.
CREATE TABLE snapshots
(
    aggregate_type   text   NOT NULL,
    aggregate_id     text   NOT NULL,
    last_sequence    bigint NOT NULL CHECK (last_sequence >= 0),
    current_snapshot bigint NOT NULL CHECK (current_snapshot >= 0),
    payload          jsonb  NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);

-- Responses to POST requests that carried an Idempotency-Key, kept 24 hours.
-- A row whose status is NULL belongs to a request still in flight.
CREATE TABLE idempotency_keys
(
    principal    text        NOT NULL,
    key          text        NOT NULL,
    request_hash bytea       NOT NULL,
    status       smallint,
    content_type text,
    body         bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (principal, key)
);

CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
