-- Periods whose podiums were notified: the day, week or month whose first
-- three of each test's board got their `period_podium` notifications. The
-- notifications' ids make them exactly once; this saves instances the work
-- of notifying a period again, and tells where to resume after a stop.
CREATE TABLE period_podiums
(
    window_name  text        NOT NULL CHECK (window_name IN ('day', 'week', 'month')),
    period_start timestamptz NOT NULL,
    notified     integer     NOT NULL CHECK (notified >= 0),
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (window_name, period_start)
);
