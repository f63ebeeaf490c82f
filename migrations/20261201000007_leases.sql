-- Who runs each background role (the relay of a NATS prefix, each
-- projection): one row per role. A lease lapses when its owner stops renewing
-- it (paused, killed, cut off); another instance then takes it and the token
-- grows, so every write of the old owner can be fenced by comparing tokens.
-- All times come from this server's clock, never an instance's.
CREATE TABLE leases
(
    name        text PRIMARY KEY,
    owner       text        NOT NULL,
    token       bigint      NOT NULL CHECK (token > 0),
    expires_at  timestamptz NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now()
);
