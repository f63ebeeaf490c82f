-- The log's horizon, held back only by transactions that may still add events.
--
-- Readers tail the log below a horizon: every transaction that could still
-- insert rows under it has ended, so a row that commits late is never
-- skipped. The plain horizon, pg_snapshot_xmin, is held back by every
-- transaction of the cluster that has a transaction id: a read model's batch,
-- the delivery intake's, a rebuild's, another database's. Here only those
-- that may still write to this log hold it back.
--
-- A transaction that will write no event says so first, before it has a
-- transaction id: podium_writes_no_events() takes a shared transaction-level
-- advisory lock (class 0x7064_6c67, key 1) that shows it in pg_locks, and
-- sets podium.writes_no_events, which the trigger below checks on every
-- insert into the log: a transaction that said so cannot add an event.
-- A transaction that runs in another database cannot either. Every other
-- transaction may.
--
-- Two rules keep this exact, and nothing in Podium breaks them: the advisory
-- key (class 0x7064_6c67, key 1) is taken at transaction level and only
-- here (a session lock on it would pass over every transaction of its
-- session), and a transaction that said it writes no events leaves
-- podium.writes_no_events alone (RESET ALL or SET LOCAL ... off would let it
-- insert while the lock still says it does not). Readers of the log run on
-- the primary: a snapshot taken in recovery lists no running transaction in
-- the part pg_current_snapshot() returns.

CREATE FUNCTION podium_writes_no_events() RETURNS void
    LANGUAGE plpgsql AS
$$
BEGIN
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'podium_writes_no_events() must come before the transaction writes anything'
            USING HINT = 'Call it first: a transaction that already has an id may have written events.';
    END IF;
    PERFORM set_config('podium.writes_no_events', 'on', true);
    PERFORM pg_advisory_xact_lock_shared(x'70646c67'::integer, 1);
END
$$;

CREATE FUNCTION podium_refuse_events_apart() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    IF current_setting('podium.writes_no_events', true) = 'on' THEN
        RAISE EXCEPTION 'this transaction said it writes no events (podium_writes_no_events())';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_writers_only
    BEFORE INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION podium_refuse_events_apart();

-- The oldest transaction id of `snapshot` still running that may add events
-- to this log, or the snapshot's xmax when there is none: rows below it that
-- `snapshot` does not see will never appear.
--
-- A running transaction is passed over only on evidence, read from pg_locks
-- (one consistent view of the lock table) after the snapshot was taken: the
-- transaction holding the id's lock, named by its virtual transaction id
-- (a backend slot's local ids are not reused), also holds the advisory lock
-- above in this database, or a lock on a relation of another database.
-- Only relation locks: the
-- `database` column of other lock types is not always a database (a
-- speculative insertion's, taken by INSERT ... ON CONFLICT, shows its
-- transaction id there). A transaction that ended since the snapshot, or
-- whose locks do not show yet, holds the horizon back.
CREATE FUNCTION podium_log_horizon(snapshot pg_snapshot) RETURNS xid8
    LANGUAGE sql STABLE AS
$$
    WITH here AS (SELECT oid FROM pg_database WHERE datname = current_database()),
         locks AS MATERIALIZED (
             SELECT locktype, database, classid, objid, objsubid, transactionid,
                    virtualtransaction, mode
               FROM pg_locks WHERE granted),
         apart AS (
             SELECT virtualtransaction FROM locks
              WHERE (locktype = 'advisory' AND database = (SELECT oid FROM here)
                     AND classid = x'70646c67'::integer::oid AND objid = 1 AND objsubid = 2)
                 OR (locktype = 'relation' AND database NOT IN (0, (SELECT oid FROM here)))),
         passed AS (
             SELECT l.transactionid::text::bigint AS xid32 FROM locks l
              WHERE l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock'
                AND l.virtualtransaction IN (SELECT virtualtransaction FROM apart))
    SELECT COALESCE(min(x), pg_snapshot_xmax(snapshot))
      FROM pg_snapshot_xip(snapshot) AS x
     WHERE x::text::bigint % 4294967296 NOT IN (SELECT xid32 FROM passed)
$$;
