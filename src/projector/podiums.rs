//! Period podiums: when a day, week or month closes, the first three of
//! each test's board for it get a `period_podium` notification, exactly once.
//!
//! Every instance that runs background work runs [`Podiums::run`], which
//! looks once a second, on the application's clock, for periods that have
//! closed since the last one notified (the [`PodiumLedger`] remembers it).
//! A period is taken up [`GRACE`] after its end, so that a submission whose
//! time was read before the end has committed. Its podium then waits until
//! the leaderboard has applied every event committed by then (a
//! [`LogMark`] taken when the period came due): the boards it reads are
//! final. Then each test's board of the period gives its first three, and
//! each becomes a `CreateNotification` command whose id derives from the
//! board and the place. That id is what makes a podium exactly once: two
//! instances (or one after a restart) that notify the same period issue the
//! same commands, and the event store takes the first of each and turns the
//! rest into no-ops. The ledger only saves the repeated work, and bounds
//! what an instance makes up for after a long stop ([`MAX_BACKLOG`]).
//!
//! The notifications are events in the log like any other: feeds, email
//! and webhooks follow them, and a replay rebuilds them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_es::AggregateError;
use podium_domain::metadata::SYSTEM_ACTOR;
use podium_domain::notification::{
    NotificationCommand, NotificationContent, NotificationError, NotificationKind,
    NotificationMessage,
};
use podium_domain::{EventMetadata, UserId};
use podium_projections::catalog::TestSummary;
use podium_projections::leaderboard::{self, RankedEntry};
use podium_projections::windows::{self, Period, Window, PERIODIC};
use podium_projections::BoxError;
use sqlx::PgPool;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::clock::Clock;
use crate::command::Aggregates;
use crate::query::store::{LogMark, ReadStore};

/// How long after its end a period's podium waits: a submission whose time
/// was read just before the end has committed by then.
pub const GRACE: Duration = Duration::from_secs(30);
/// How often an instance looks for closed periods.
const CHECK: Duration = Duration::from_secs(1);
/// Most closed periods of one window an instance makes up for after a stop
/// (two months of days); older ones are skipped, and logged.
pub const MAX_BACKLOG: usize = 62;
/// Places on a podium.
const PLACES: i64 = 3;
const NAMESPACE: Uuid = Uuid::from_u128(0x6c1f_0a52_9d4e_4b37_8e21_5fa0_c3d9_7b14);

/// Which periods' podiums were notified.
#[async_trait]
pub trait PodiumLedger: Send + Sync {
    /// The start of the last period of `window` whose podium was notified.
    async fn last(&self, window: Window) -> Result<Option<DateTime<Utc>>, BoxError>;

    /// Records that the podium of `window`'s period starting at `start` was
    /// notified (`notified` notifications).
    async fn record(
        &self,
        window: Window,
        start: DateTime<Utc>,
        notified: u32,
    ) -> Result<(), BoxError>;
}

/// The ledger in Postgres, shared by every instance.
pub struct PgPodiumLedger(pub PgPool);

#[async_trait]
impl PodiumLedger for PgPodiumLedger {
    async fn last(&self, window: Window) -> Result<Option<DateTime<Utc>>, BoxError> {
        Ok(sqlx::query_scalar(
            "SELECT max(period_start) FROM period_podiums WHERE window_name = $1",
        )
        .bind(window.as_str())
        .fetch_one(&self.0)
        .await?)
    }

    async fn record(
        &self,
        window: Window,
        start: DateTime<Utc>,
        notified: u32,
    ) -> Result<(), BoxError> {
        sqlx::query(
            "INSERT INTO period_podiums (window_name, period_start, notified)
             VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(window.as_str())
        .bind(start)
        .bind(i32::try_from(notified).unwrap_or(i32::MAX))
        .execute(&self.0)
        .await?;
        Ok(())
    }
}

/// The embedded mode's ledger. After a restart the last closed period is
/// notified again, which the notifications' ids make harmless.
#[derive(Default)]
pub struct MemoryPodiumLedger(Mutex<HashMap<&'static str, DateTime<Utc>>>);

#[async_trait]
impl PodiumLedger for MemoryPodiumLedger {
    async fn last(&self, window: Window) -> Result<Option<DateTime<Utc>>, BoxError> {
        Ok(self.lock().get(window.as_str()).copied())
    }

    async fn record(&self, window: Window, start: DateTime<Utc>, _: u32) -> Result<(), BoxError> {
        let mut last = self.lock();
        let entry = last.entry(window.as_str()).or_insert(start);
        *entry = (*entry).max(start);
        Ok(())
    }
}

impl MemoryPodiumLedger {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, DateTime<Utc>>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The loop that notifies podiums; see the module's documentation.
pub struct Podiums {
    pub store: Arc<dyn ReadStore>,
    pub aggregates: Arc<Aggregates>,
    pub ledger: Arc<dyn PodiumLedger>,
    pub clock: Clock,
}

/// What the loop keeps between its checks.
#[derive(Default)]
struct Progress {
    /// The start of the last period of each window known to be notified.
    notified: HashMap<Window, DateTime<Utc>>,
    /// The log mark of each period waiting for the leaderboard.
    marks: HashMap<(Window, DateTime<Utc>), LogMark>,
}

impl Podiums {
    /// Notifies podiums as periods close, until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(CHECK);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut progress = Progress::default();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = stop.cancelled() => return,
            }
            for window in PERIODIC {
                if let Err(err) = self.catch_up(window, &mut progress).await {
                    tracing::warn!(%err, window = window.as_str(), "cannot notify period podiums yet; trying again");
                }
            }
        }
    }

    /// Notifies the podiums of `window`'s periods closed since the last one
    /// notified, oldest first, as far as the leaderboard has caught up.
    async fn catch_up(&self, window: Window, progress: &mut Progress) -> Result<(), BoxError> {
        let Some(closed) = last_closed(window, self.clock.now()) else {
            return Ok(());
        };
        if progress
            .notified
            .get(&window)
            .is_some_and(|last| *last >= closed.start)
        {
            return Ok(());
        }
        let last = self.ledger.last(window).await?;
        for period in due(window, last, closed) {
            let mark = match progress.marks.entry((window, period.start)) {
                std::collections::hash_map::Entry::Occupied(mark) => mark.into_mut(),
                std::collections::hash_map::Entry::Vacant(vacant) => {
                    vacant.insert(self.store.log_mark().await?)
                }
            };
            if !self.store.reached(leaderboard::NAME, mark).await? {
                return Ok(());
            }
            let notified = self.notify(window, period).await?;
            self.ledger.record(window, period.start, notified).await?;
            progress.marks.remove(&(window, period.start));
            progress.notified.insert(window, period.start);
            tracing::info!(
                window = window.as_str(),
                period = %period.start,
                notified,
                "period podiums notified"
            );
        }
        progress.notified.insert(window, closed.start);
        Ok(())
    }

    /// Notifies the first three of each test's board for `window`'s
    /// `period`; returns how many notifications that made.
    async fn notify(&self, window: Window, period: Period) -> Result<u32, BoxError> {
        let mut notified = 0;
        for test in self.store.tests().await? {
            let board = windows::board_id(test.id, window, period.start);
            let page = self.store.leaderboard_top(board, PLACES).await?;
            for ranked in &page.entries {
                self.issue(&test, window, period, board, ranked).await?;
                notified += 1;
            }
        }
        Ok(notified)
    }

    async fn issue(
        &self,
        test: &TestSummary,
        window: Window,
        period: Period,
        board: Uuid,
        ranked: &RankedEntry,
    ) -> Result<(), BoxError> {
        let podium = podium_notice(test, window, period, ranked)?;
        let mut source = board.as_bytes().to_vec();
        source.extend_from_slice(&ranked.rank.to_be_bytes());
        let id = Uuid::new_v5(&NAMESPACE, &source);
        let command = NotificationCommand::CreateNotification {
            notification_id: id,
            content: podium,
            now: period.end,
        };
        let metadata = EventMetadata {
            actor: SYSTEM_ACTOR.to_string(),
            request_id: format!("period_podium:{}:{}", window.as_str(), period.start),
            recorded_at: self.clock.now(),
        };
        match self
            .aggregates
            .notifications
            .execute(&id.to_string(), command, metadata)
            .await
        {
            // Another instance (or this one, before a restart) notified it.
            Ok(())
            | Err(AggregateError::AggregateConflict)
            | Err(AggregateError::UserError(NotificationError::AlreadyExists)) => Ok(()),
            Err(err) => Err(Box::new(err)),
        }
    }
}

/// What the `rank`-th of `test`'s board for `window`'s `period` is told.
fn podium_notice(
    test: &TestSummary,
    window: Window,
    period: Period,
    ranked: &RankedEntry,
) -> Result<NotificationContent, BoxError> {
    let place = match ranked.rank {
        1 => "1st",
        2 => "2nd",
        _ => "3rd",
    };
    let day = period.start.format("%Y-%m-%d");
    let when = match window {
        Window::Day => format!("the day of {day}"),
        Window::Week => format!("the week from {day}"),
        _ => format!("{}", period.start.format("%B %Y")),
    };
    let entry = &ranked.entry;
    let message = NotificationMessage::new(
        NotificationKind::PeriodPodium,
        format!("{place} place of the {}", window.as_str()),
        format!(
            "You finished {place} on \"{}\" for {when} (UTC), with {} of {}.",
            test.title, entry.best_score, entry.max_score
        ),
        Some(format!(
            "/v1/tests/{}/leaderboard?window={}&period={day}",
            test.id,
            window.as_str()
        )),
    )?;
    Ok(NotificationContent {
        recipient: UserId::parse(entry.user_id.clone())?,
        message,
    })
}

/// The last period of `window` closed [`GRACE`] ago or more at `now`.
fn last_closed(window: Window, now: DateTime<Utc>) -> Option<Period> {
    let grace = chrono::Duration::from_std(GRACE).expect("a short grace");
    let open = window.period(now - grace)?;
    window.period(open.start - chrono::Duration::microseconds(1))
}

/// The periods of `window` after the one starting at `last` up to `closed`,
/// oldest first: `closed` alone when none was notified yet, and at most
/// [`MAX_BACKLOG`] (the latest).
fn due(window: Window, last: Option<DateTime<Utc>>, closed: Period) -> Vec<Period> {
    let Some(last) = last else {
        return vec![closed];
    };
    let mut periods = Vec::new();
    let mut next = window.period(last).and_then(|p| window.period(p.end));
    while let Some(period) = next.filter(|p| p.start <= closed.start) {
        periods.push(period);
        next = window.period(period.end);
    }
    if periods.len() > MAX_BACKLOG {
        let skipped = periods.len() - MAX_BACKLOG;
        tracing::warn!(
            window = window.as_str(),
            skipped,
            "period podiums too far back are not notified"
        );
        periods.drain(..skipped);
    }
    periods
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn a_period_closes_a_grace_after_its_end() {
        let day = |now| last_closed(Window::Day, at(now)).map(|p| p.start);
        assert_eq!(
            day("2028-03-01T00:00:29Z"),
            Some(at("2028-02-28T00:00:00Z"))
        );
        assert_eq!(
            day("2028-03-01T00:00:30Z"),
            Some(at("2028-02-29T00:00:00Z"))
        );
        let month = last_closed(Window::Month, at("2028-03-01T00:00:30Z")).unwrap();
        assert_eq!(
            (month.start, month.end),
            (at("2028-02-01T00:00:00Z"), at("2028-03-01T00:00:00Z"))
        );
        let week = last_closed(Window::Week, at("2028-03-06T00:00:30Z")).unwrap();
        assert_eq!(
            week.start,
            at("2028-02-28T00:00:00Z"),
            "weeks begin on Monday"
        );
    }

    #[test]
    fn due_periods_follow_the_last_notified_up_to_the_closed_one() {
        let closed = Window::Day.period(at("2028-03-02T12:00:00Z")).unwrap();
        assert_eq!(due(Window::Day, None, closed), [closed]);
        let starts: Vec<_> = due(Window::Day, Some(at("2028-02-27T00:00:00Z")), closed)
            .iter()
            .map(|p| p.start.format("%m-%d").to_string())
            .collect();
        assert_eq!(starts, ["02-28", "02-29", "03-01", "03-02"]);
        assert!(due(Window::Day, Some(closed.start), closed).is_empty());
        let long_ago = Some(at("2020-01-01T00:00:00Z"));
        let backlog = due(Window::Day, long_ago, closed);
        assert_eq!(backlog.len(), MAX_BACKLOG);
        assert_eq!(backlog.last(), Some(&closed));
    }
}
