-- Boards as of a past instant are folded from each test's submissions made
-- up to it: one index range, read without touching the table.
CREATE INDEX my_attempts_test_submitted ON my_attempts (test_id, submitted_at)
    INCLUDE (user_id, attempt_id, score, max_score, correct)
    WHERE status = 'submitted';
