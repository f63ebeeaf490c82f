-- Read models. Each is derived from the log and can be rebuilt by
-- `podium replay`, which fills copies named <table>__next and swaps them in.

-- Leaderboards: one entry per (test, user), the user's best attempt.
CREATE TABLE lb_entries
(
    test_id     uuid        NOT NULL,
    user_id     text        NOT NULL,
    best_score  integer     NOT NULL,
    max_score   integer     NOT NULL,
    attempt_id  uuid        NOT NULL,
    achieved_at timestamptz NOT NULL,
    attempts    integer     NOT NULL,
    PRIMARY KEY (test_id, user_id)
);
-- Rank order: score descending, then earliest, then user id. Negating the
-- score makes the order all-ascending, so "ranked before (s, t, u)" is one
-- row comparison, (-best_score, achieved_at, user_id) < (-s, t, u): an index
-- range in either direction for top pages, keyset pages, neighbours and the
-- tie-break part of a rank lookup.
CREATE INDEX lb_entries_rank ON lb_entries (test_id, (-best_score), achieved_at, user_id);

-- How many entries of a test hold each best score: a rank is the sum of the
-- counts above a score plus a short index range inside it, so a lookup never
-- scans the whole leaderboard.
CREATE TABLE lb_score_counts
(
    test_id uuid    NOT NULL,
    score   integer NOT NULL,
    entries integer NOT NULL CHECK (entries >= 0),
    PRIMARY KEY (test_id, score)
);

-- Notification feeds: newest first by feed_seq (the log seq that created the item).
CREATE TABLE feed_items
(
    notification_id uuid        PRIMARY KEY,
    user_id         text        NOT NULL,
    feed_seq        bigint      NOT NULL,
    kind            text        NOT NULL,
    title           text        NOT NULL,
    body            text        NOT NULL,
    link            text,
    created_at      timestamptz NOT NULL,
    read_at         timestamptz,
    -- The log seq of the last change to this item (creation or read).
    changed_seq     bigint      NOT NULL
);
CREATE INDEX feed_items_user ON feed_items (user_id, feed_seq DESC);
CREATE INDEX feed_items_unread ON feed_items (user_id, feed_seq DESC) WHERE read_at IS NULL;

-- Exact unread counts, kept in the same transaction as the items.
CREATE TABLE feed_counters
(
    user_id text    PRIMARY KEY,
    unread  integer NOT NULL CHECK (unread >= 0)
);

-- Each user's attempts, newest first.
CREATE TABLE my_attempts
(
    attempt_id   uuid        PRIMARY KEY,
    user_id      text        NOT NULL,
    test_id      uuid        NOT NULL,
    status       text        NOT NULL,
    score        integer,
    max_score    integer     NOT NULL,
    correct      integer,
    duration_ms  bigint,
    started_at   timestamptz NOT NULL,
    submitted_at timestamptz
);
CREATE INDEX my_attempts_user ON my_attempts (user_id, started_at DESC, attempt_id DESC);

-- The notification policy's own memory: each user's best per test, in the
-- ranking order, to tell personal bests and who was overtaken in a top 10.
CREATE TABLE policy_bests
(
    test_id     uuid        NOT NULL,
    user_id     text        NOT NULL,
    best_score  integer     NOT NULL,
    achieved_at timestamptz NOT NULL,
    PRIMARY KEY (test_id, user_id)
);
CREATE INDEX policy_bests_rank ON policy_bests (test_id, best_score DESC, achieved_at, user_id);
