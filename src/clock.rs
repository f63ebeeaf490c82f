//! Where time comes from: the system's clock ([`now`]), and the [`Clock`]
//! handle that whatever depends on the time of day is given (the commands
//! the HTTP API issues, leaderboard windows and their streams' rollover, the
//! rate limiter): the system's in production and a manual one in tests, so
//! that no test waits on the wall clock. Uses nothing else of the crate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, SubsecRound, Utc};

/// Now, to the microsecond: the precision Postgres keeps, so a time in an
/// event and the same time in a read model compare equal (leaderboard ties
/// are broken by time).
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// A clock: the system's (the default), or a manual one that moves only
/// when told to. Clones share the same time.
#[derive(Clone, Default)]
pub struct Clock {
    /// Milliseconds since the Unix epoch, for a manual clock.
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// The system's clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock stopped at `at` until [`Clock::advance`] moves it.
    pub fn manual(at: SystemTime) -> Self {
        let millis = at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        Self {
            manual: Some(Arc::new(AtomicU64::new(millis as u64))),
        }
    }

    /// Moves a manual clock forward by `by`; the system's cannot be moved.
    pub fn advance(&self, by: Duration) {
        let manual = self.manual.as_ref().expect("only a manual clock moves");
        manual.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }

    /// Time since the Unix epoch.
    pub fn since_epoch(&self) -> Duration {
        match &self.manual {
            Some(millis) => Duration::from_millis(millis.load(Ordering::SeqCst)),
            None => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        }
    }

    /// Whole seconds since the Unix epoch.
    pub fn unix_secs(&self) -> u64 {
        self.since_epoch().as_secs()
    }

    /// Now on this clock, to the microsecond (as [`now`] for the system's).
    pub fn now(&self) -> DateTime<Utc> {
        match &self.manual {
            None => now(),
            Some(millis) => {
                let millis = i64::try_from(millis.load(Ordering::SeqCst)).unwrap_or(i64::MAX);
                DateTime::from_timestamp_millis(millis).unwrap_or(DateTime::<Utc>::MAX_UTC)
            }
        }
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.manual {
            None => f.write_str("Clock::system"),
            Some(_) => write!(f, "Clock::manual({:?})", self.since_epoch()),
        }
    }
}
