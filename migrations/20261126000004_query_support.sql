-- What the query API needs beyond the read models' current state.

-- The log seq of each entry's last change: an SSE client that reconnects with
-- `Last-Event-ID` is sent the entries changed after it.
ALTER TABLE lb_entries ADD COLUMN changed_seq bigint NOT NULL DEFAULT 0;
CREATE INDEX lb_entries_changed ON lb_entries (test_id, changed_seq);

-- Where each improved entry stood before it moved up. A cursor walk keeps the
-- snapshot seq of its last page; entries that moved from behind its cursor to
-- ahead of it since then are found here and returned with the next page, so
-- a walk returns every entry exactly once while scores change.
CREATE TABLE lb_moves
(
    seq             bigint      PRIMARY KEY,
    test_id         uuid        NOT NULL,
    user_id         text        NOT NULL,
    old_score       integer     NOT NULL,
    old_achieved_at timestamptz NOT NULL,
    moved_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX lb_moves_test ON lb_moves (test_id, seq);
CREATE INDEX lb_moves_age ON lb_moves (moved_at);

-- Moves at or below this seq have been pruned (or were never recorded, as
-- across a rebuild's swap): a cursor from before it cannot be continued
-- exactly, and is refused as expired.
CREATE TABLE lb_moves_horizon
(
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    seq       bigint  NOT NULL
);
INSERT INTO lb_moves_horizon (singleton, seq) VALUES (true, 0);
