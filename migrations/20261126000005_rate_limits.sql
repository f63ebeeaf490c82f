-- Rate-limit budgets shared by every API instance. Each instance leases
-- tokens from a (budget, key, window) row in chunks and spends them locally,
-- so the hot path rarely touches Postgres. Unlogged: after a Postgres crash
-- the current windows start again from zero, which is harmless.
CREATE UNLOGGED TABLE rate_limit_windows
(
    bucket       text    NOT NULL,
    window_start bigint  NOT NULL,
    used         integer NOT NULL,
    -- The tokens the latest lease got (its caller reads it back).
    last_grant   integer NOT NULL,
    expires_at   bigint  NOT NULL,
    PRIMARY KEY (bucket, window_start)
);
CREATE INDEX rate_limit_windows_expiry ON rate_limit_windows (expires_at);
