-- The instances that run background roles (the relay, the projections),
-- each seen until one lease TTL after its last heartbeat: how many share
-- the roles, so that each takes at most its share of them.
CREATE TABLE instances
(
    id         text PRIMARY KEY,
    seen_until timestamptz NOT NULL
);
