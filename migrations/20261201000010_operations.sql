-- What operators see and act on (the operator API, `podium replay`).

-- Why the owner of a role stopped running it, while it is halted (an event
-- dead-lettered under the stop policy, events missing from the stream): set
-- and cleared by the owner, so that every instance can tell.
ALTER TABLE leases ADD COLUMN halted text;

-- One row per read model rebuilt (or asked to be) through the operator API or
-- `podium replay`: at most one rebuild of a read model runs at a time, on one
-- instance, which reports its progress here every fraction of a second. A
-- rebuild whose runner stopped reporting (killed, paused) is started again by
-- the projection's owner.
CREATE TABLE projection_rebuilds
(
    name         text PRIMARY KEY,
    -- requested, rebuilding, done, failed
    state        text        NOT NULL,
    runner       text,
    processed    bigint      NOT NULL DEFAULT 0,
    total        bigint      NOT NULL DEFAULT 0,
    requested_at timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz,
    heartbeat_at timestamptz,
    error        text
);

-- Events a projection could not apply, written by its worker before the
-- dead letter goes to NATS. Unresolved while the projection's checkpoint is
-- below `seq` and nobody skipped it; `state` says what an operator asked.
CREATE TABLE dead_letters
(
    id          bigserial PRIMARY KEY,
    projection  text        NOT NULL,
    seq         bigint      NOT NULL,
    event_type  text        NOT NULL,
    error       text        NOT NULL,
    failures    integer     NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    -- open, retrying, skipping, skipped
    state       text        NOT NULL DEFAULT 'open',
    resolved_at timestamptz,
    UNIQUE (projection, seq)
);
