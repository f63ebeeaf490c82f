//! Fencing tokens: what keeps a paused or cut-off ex-owner of a background
//! role from writing once another instance has taken the role over.
//!
//! A role's owner holds a lease (the `leases` table) whose token grows each
//! time the lease changes hands. Every transaction that writes on behalf of
//! the role reads the lease's current token and commits only if it is still
//! the one this owner was given.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use sqlx::PgConnection;

/// The lease a writer must still hold, shared between the holder (which sets
/// the token on each acquisition) and the writers it runs.
#[derive(Debug, Clone)]
pub struct Fence {
    name: Arc<str>,
    /// 0 while the lease is not held.
    token: Arc<AtomicI64>,
}

impl Fence {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            token: Arc::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn token(&self) -> i64 {
        self.token.load(Ordering::Acquire)
    }

    /// Records the token of a fresh acquisition (0: released).
    pub fn set_token(&self, token: i64) {
        self.token.store(token, Ordering::Release);
    }

    /// Whether the lease is still this holder's, read inside the caller's
    /// transaction: a transaction that starts after a takeover sees it and
    /// commits nothing. The row is locked `FOR KEY SHARE` only (it must not
    /// be deleted meanwhile), so that neither the holder's renewals nor a
    /// standby's look at it wait for the transaction. A takeover that commits
    /// while such a transaction runs does not stop it; the checkpoint row,
    /// which that transaction and the new owner's both lock, orders them, so
    /// nothing is applied twice.
    pub async fn holds(&self, conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
        let token = self.token();
        if token == 0 {
            return Ok(false);
        }
        let current: Option<i64> =
            sqlx::query_scalar("SELECT token FROM leases WHERE name = $1 FOR KEY SHARE")
                .bind(&*self.name)
                .fetch_optional(conn)
                .await?;
        Ok(current == Some(token))
    }
}

/// Whether `error` is a passing condition of the infrastructure (Postgres
/// unreachable, restarting, read-only, out of connections, a serialization
/// conflict…) rather than something about the event itself: such failures are
/// retried for as long as they last and never dead-letter an event.
pub fn is_transient(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(sqlx) = error.downcast_ref::<sqlx::Error>() {
            return is_transient_sqlx(sqlx);
        }
        current = error.source();
    }
    false
}

fn is_transient_sqlx(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(database) => database.code().is_some_and(|code| {
            let code = code.as_ref();
            // 08: connection exceptions; 53: insufficient resources (disk
            // full, out of memory, too many connections); 57P0x: the server
            // is shutting down or starting; 58: system errors (I/O).
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("58")
                || matches!(
                    code,
                    "40001" // serialization failure
                        | "40P01" // deadlock detected
                        | "55P03" // lock not available
                        | "57014" // query canceled (statement timeout)
                        | "57P01" // admin shutdown
                        | "57P02" // crash shutdown
                        | "57P03" // cannot connect now
                        | "25006" // read-only transaction (a failover in progress)
                )
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_failures_are_transient_and_bad_data_is_not() {
        let refused = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(is_transient(&refused));
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        let decode = sqlx::Error::Decode("not a number".into());
        assert!(!is_transient(&decode));
        let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(sqlx::Error::PoolTimedOut);
        assert!(is_transient(&*boxed));
        let other: Box<dyn std::error::Error + Send + Sync> = "the event is malformed".into();
        assert!(!is_transient(&*other));
    }
}
