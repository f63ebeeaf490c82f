//! The one clock commands read.

use chrono::{DateTime, SubsecRound, Utc};

/// Now, to the microsecond: the precision Postgres keeps, so a time in an
/// event and the same time in a read model compare equal (leaderboard ties
/// are broken by time).
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}
