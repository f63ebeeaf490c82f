//! Leaderboard windows: a test's board of all time, and one board per UTC
//! day, ISO week (from Monday 00:00) and calendar month, each ranked by the
//! usual rules over the submissions made in that period only.
//!
//! A periodic board is a board like any other, under an id of its own
//! ([`board_id`]: derived from the test, the window and the period's start;
//! the all-time board keeps the test's id). The leaderboard projection
//! records each submission on the four boards it counts on ([`boards_of`]),
//! so pages, ranks, cursors, the cache, change streams and the rank index
//! serve every window the same way.

use chrono::{DateTime, Datelike, Duration, Months, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ranking::Submission;

/// Where periodic boards' ids are derived (UUIDv5).
const NAMESPACE: Uuid = Uuid::from_u128(0x7c1f_52a0_9d3b_4e61_8f07_2a5e_c4d9_1b36);

/// A leaderboard window.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Window {
    All,
    Day,
    Week,
    Month,
}

/// The windows that have periods.
pub const PERIODIC: [Window; 3] = [Window::Day, Window::Week, Window::Month];

/// One period of a window: `[start, end)`; `end` is when the next begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl Window {
    /// The window a query names: `all`, `day`, `week` or `month`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "all" => Some(Self::All),
            "day" => Some(Self::Day),
            "week" => Some(Self::Week),
            "month" => Some(Self::Month),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Day => "day",
            Self::Week => "week",
            Self::Month => "month",
        }
    }

    /// The period of this window that holds `at`; `None` for `all`.
    pub fn period(self, at: DateTime<Utc>) -> Option<Period> {
        let day = at.date_naive();
        let start = match self {
            Self::All => return None,
            Self::Day => day,
            Self::Week => day - Duration::days(i64::from(day.weekday().num_days_from_monday())),
            Self::Month => day.with_day(1).expect("every month has a first day"),
        };
        let end = match self {
            Self::All => unreachable!("returned above"),
            Self::Day => start + Duration::days(1),
            Self::Week => start + Duration::days(7),
            Self::Month => start + Months::new(1),
        };
        Some(Period {
            start: midnight(start),
            end: midnight(end),
        })
    }
}

fn midnight(day: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0).expect("midnight exists"))
}

/// An instant inside the wanted period, as a query gives it: a date
/// (`YYYY-MM-DD`, its midnight UTC) or an RFC 3339 time.
pub fn parse_instant(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(day) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Some(midnight(day));
    }
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|at| at.with_timezone(&Utc))
}

/// The board of `test_id` in `window`'s period that starts at `start`: the
/// test's own id for `all` (whose `start` is ignored).
pub fn board_id(test_id: Uuid, window: Window, start: DateTime<Utc>) -> Uuid {
    if window == Window::All {
        return test_id;
    }
    let mut name = [0u8; 25];
    name[..16].copy_from_slice(test_id.as_bytes());
    name[16] = window as u8;
    name[17..].copy_from_slice(&start.timestamp().to_be_bytes());
    Uuid::new_v5(&NAMESPACE, &name)
}

/// The board of `test_id` in `window`'s period that holds `at`.
pub fn board_at(test_id: Uuid, window: Window, at: DateTime<Utc>) -> Uuid {
    match window.period(at) {
        Some(period) => board_id(test_id, window, period.start),
        None => test_id,
    }
}

/// `submission` as recorded on each board it counts on: its test's
/// all-time board first, then the day, week and month that hold its
/// `submitted_at`.
pub fn boards_of(submission: &Submission) -> impl Iterator<Item = Submission> + '_ {
    std::iter::once(Window::All)
        .chain(PERIODIC)
        .map(move |window| Submission {
            test_id: board_at(submission.test_id, window, submission.submitted_at),
            ..submission.clone()
        })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        parse_instant(text).unwrap()
    }

    #[test]
    fn periods_follow_the_utc_calendar() {
        let week = Window::Week.period(at("2028-03-01T10:00:00Z")).unwrap();
        // 2028-02-28 is a Monday; 2028 is a leap year.
        assert_eq!(week.start, at("2028-02-28"));
        assert_eq!(week.end, at("2028-03-06"));
        let month = Window::Month
            .period(at("2028-02-29T23:59:59.999999Z"))
            .unwrap();
        assert_eq!(
            (month.start, month.end),
            (at("2028-02-01"), at("2028-03-01"))
        );
        let day = Window::Day.period(at("2026-12-31T23:30:00-01:00")).unwrap();
        assert_eq!((day.start, day.end), (at("2027-01-01"), at("2027-01-02")));
        let december = Window::Month.period(at("2026-12-15")).unwrap();
        assert_eq!(december.end, at("2027-01-01"));
        assert_eq!(Window::All.period(at("2026-12-15")), None);
    }

    #[test]
    fn queries_name_windows_and_instants() {
        assert_eq!(Window::parse("week"), Some(Window::Week));
        assert_eq!(Window::parse("year"), None);
        assert_eq!(Window::parse("Week"), None);
        assert!(parse_instant("2026-02-30").is_none());
        assert!(parse_instant("yesterday").is_none());
        assert_eq!(
            parse_instant("2026-12-01T00:00:00+02:00"),
            Some(at("2026-11-30T22:00:00Z"))
        );
    }

    #[test]
    fn each_period_has_its_own_board_and_all_time_is_the_test() {
        let test = Uuid::from_u128(7);
        let monday = at("2026-11-30");
        assert_eq!(board_id(test, Window::All, monday), test);
        let ids = [
            board_id(test, Window::Day, monday),
            board_id(test, Window::Week, monday),
            board_id(test, Window::Month, at("2026-11-01")),
            board_id(test, Window::Day, at("2026-12-01")),
            board_id(Uuid::from_u128(8), Window::Day, monday),
        ];
        for (i, a) in ids.iter().enumerate() {
            assert_ne!(*a, test);
            for b in &ids[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    proptest! {
        /// A period holds its start, not its end, and the instant; the next
        /// period starts where it ends; weeks start on Mondays.
        #[test]
        fn periods_tile_time(secs in 0i64..8_000_000_000, w in 1usize..4) {
            let window = [Window::All, Window::Day, Window::Week, Window::Month][w];
            let instant = DateTime::from_timestamp(secs, 0).unwrap();
            let period = window.period(instant).unwrap();
            prop_assert!(period.start <= instant && instant < period.end);
            prop_assert_eq!(window.period(period.start), Some(period));
            let next = window.period(period.end).unwrap();
            prop_assert_eq!(next.start, period.end);
            prop_assert_eq!(window.period(period.end - Duration::microseconds(1)), Some(period));
            if window == Window::Week {
                prop_assert_eq!(period.start.weekday(), chrono::Weekday::Mon);
            }
        }
    }
}
