-- Ties on a leaderboard rank by user id. Rank them by the id's bytes on
-- every database, whatever its locale: the in-memory rank index and the
-- embedded mode compare bytes, and answers must not depend on which of them
-- serves (an "en_US" collation would put "b" before "C" and ignore
-- punctuation). The indexes that hold `user_id` are rebuilt by the change.
ALTER TABLE lb_entries ALTER COLUMN user_id TYPE text COLLATE "C";
ALTER TABLE policy_bests ALTER COLUMN user_id TYPE text COLLATE "C";
