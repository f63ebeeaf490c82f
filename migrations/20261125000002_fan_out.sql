-- Wake the relay when events commit (NOTIFY is delivered at commit; one per
-- inserting statement). The relay also polls, so a lost wake-up only delays.
CREATE FUNCTION podium_notify_events() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    PERFORM pg_notify('podium_events', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER events_notify
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION podium_notify_events();

-- How far the relay has published the log, one row per NATS stream prefix.
-- `seq` counts the events published; (epoch, txid, position) is the order key
-- of the last one.
CREATE TABLE relay_checkpoints
(
    name       text PRIMARY KEY,
    seq        bigint      NOT NULL CHECK (seq >= 0),
    epoch      integer     NOT NULL,
    txid       xid8        NOT NULL,
    position   bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Each projection's last applied log seq, updated in the same transaction as
-- its read model.
CREATE TABLE projection_checkpoints
(
    name       text PRIMARY KEY,
    seq        bigint      NOT NULL CHECK (seq >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);
