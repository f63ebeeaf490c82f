//! Rate limits per user and per client IP, shared by every API instance
//! through Postgres.
//!
//! Budgets are fixed windows (`120/min` = 120 requests per calendar minute).
//! An instance leases tokens from the shared row of a (budget, key, window) in
//! chunks of about a twentieth of the budget and spends them locally: one
//! Postgres statement per chunk, not per request. Leases are atomic and never
//! exceed the budget, so the requests accepted by all instances together never
//! exceed it either; an instance may refuse up to (instances − 1) × chunk
//! requests early, while others hold tokens they have not spent. As with any
//! fixed window, a client can spend one window's budget at its end and the next
//! one's at the start of the next. When the shared windows cannot be reached
//! (Postgres away, or slower than 250 ms) an instance keeps what is left of
//! the budget by itself for the rest of the window, without asking again, and
//! logs it: limits protect the service, they should not take it down or make
//! every request wait on a database that does not answer.
//!
//! The windows' counts sit behind a port ([`WindowStore`]) with a Postgres
//! and an in-memory adapter; the limiter reads the time from a
//! [`Clock`]. Its budgets are settings ([`crate::config::Budgets`]). May use
//! `ops`, `config` and `clock`.

use std::net::IpAddr;
use std::str::FromStr;

pub use crate::config::{Budget, Budgets};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Clock;
use crate::ops::db::StoreError;

mod windows;
pub use windows::{MemoryWindows, PgWindows, Window, WindowStore};

/// The client's address: the socket peer, or, when the peer is a trusted
/// proxy, the last address in `X-Forwarded-For` that is not one.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    forwarded_for
        .into_iter()
        .flat_map(|list| list.rsplit(','))
        .filter_map(|hop| IpAddr::from_str(hop.trim()).ok())
        .find(|hop| !trusted.contains(hop))
        .unwrap_or(peer)
}

/// What a check decided, with what the `RateLimit-*` headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub budget: &'static str,
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the window ends.
    pub reset_secs: u64,
}

/// This instance's tokens for one (budget, key) in the current window.
#[derive(Default)]
struct Tokens {
    window: u64,
    /// Leased and not spent yet.
    left: u32,
    /// The shared count after our last lease.
    used: u32,
    /// The shared budget is spent: no lease until the window ends.
    spent: bool,
}

/// One (budget, key)'s tokens: spent under a plain lock (never held across
/// an await), leased under an async one so that one lease runs at a time.
#[derive(Default)]
struct BucketState {
    tokens: std::sync::Mutex<Tokens>,
    leasing: tokio::sync::Mutex<()>,
}

type Bucket = Arc<BucketState>;

/// What spending a token found.
enum Spend {
    Done(bool),
    NeedLease,
}

impl BucketState {
    /// Whether a token could be spent now, without spending it.
    fn spend_check(&self, window: u64) -> Spend {
        let tokens = self.tokens.lock().expect("never poisoned");
        if window > tokens.window || (tokens.left == 0 && !tokens.spent) {
            Spend::NeedLease
        } else {
            Spend::Done(tokens.left > 0)
        }
    }

    fn spend(&self, window: u64) -> (Spend, u32, u32) {
        let mut tokens = self.tokens.lock().expect("never poisoned");
        // A request that read the clock just before a rollover spends from
        // the new window rather than take the bucket back to the old one.
        if window > tokens.window {
            *tokens = Tokens {
                window,
                ..Tokens::default()
            };
        }
        let outcome = if tokens.left > 0 {
            tokens.left -= 1;
            Spend::Done(true)
        } else if tokens.spent {
            Spend::Done(false)
        } else {
            Spend::NeedLease
        };
        (outcome, tokens.used, tokens.left)
    }
}

/// How long a lease from the shared windows may take before this instance
/// stops asking for the rest of the window and keeps the budget by itself.
const LEASE_TIMEOUT: Duration = Duration::from_millis(250);

pub struct RateLimiter {
    /// The shared windows' counts.
    windows: Arc<dyn WindowStore>,
    /// What says which window it is.
    clock: Clock,
    pub budgets: Budgets,
    buckets: moka::sync::Cache<String, Bucket>,
}

impl RateLimiter {
    pub fn new(windows: Arc<dyn WindowStore>, budgets: Budgets, clock: Clock) -> Self {
        let longest = [budgets.user_commands, budgets.user_queries, budgets.ip]
            .iter()
            .map(|b| b.period)
            .max()
            .unwrap_or(Duration::from_secs(60));
        Self {
            windows,
            clock,
            budgets,
            buckets: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_idle(longest)
                .build(),
        }
    }

    /// Spends one request of `budget` for `key`.
    pub async fn check(&self, budget: &Budget, key: &str) -> Decision {
        let now = self.clock.unix_secs();
        let period = budget.period.as_secs().max(1);
        let window = now / period;
        let reset_secs = (window + 1) * period - now;
        let bucket_key = format!("{}:{key}", budget.name);
        let bucket = self.buckets.get_with_by_ref(&bucket_key, Bucket::default);
        let decision = |allowed: bool, used: u32, left: u32| Decision {
            budget: budget.name,
            allowed,
            limit: budget.limit,
            // What is left overall: the budget minus what has been handed
            // out, plus what this instance holds unspent.
            remaining: budget.limit.saturating_sub(used) + left,
            reset_secs,
        };
        loop {
            if let (Spend::Done(allowed), used, left) = bucket.spend(window) {
                return decision(allowed, used, left);
            }
            let _leasing = bucket.leasing.lock().await;
            // Another request may have leased while this one waited.
            if !matches!(bucket.spend_check(window), Spend::NeedLease) {
                continue;
            }
            let leased = self.lease(budget, &bucket_key, window, period);
            let failure = match tokio::time::timeout(LEASE_TIMEOUT, leased).await {
                Ok(Ok((granted, used))) => {
                    let mut tokens = bucket.tokens.lock().expect("never poisoned");
                    if tokens.window == window {
                        tokens.left = granted;
                        tokens.used = used;
                        tokens.spent = granted == 0;
                    }
                    continue;
                }
                Ok(Err(err)) => err.to_string(),
                Err(_) => format!("no answer within {LEASE_TIMEOUT:?}"),
            };
            tracing::warn!(
                error = failure,
                budget = budget.name,
                "the shared rate-limit windows cannot be reached; this instance keeps the \
                 budget by itself until the window ends"
            );
            let mut tokens = bucket.tokens.lock().expect("never poisoned");
            if tokens.window == window {
                // What the shared count had not handed out yet, spent here
                // without asking again until the window ends.
                tokens.left = budget.limit.saturating_sub(tokens.used);
                // All of it is accounted for: what remains is what is held.
                tokens.used = budget.limit;
                tokens.spent = true;
            }
        }
    }

    /// Takes up to a chunk of tokens from the shared window: returns the
    /// tokens granted and the shared count after the lease.
    async fn lease(
        &self,
        budget: &Budget,
        bucket: &str,
        window: u64,
        period: u64,
    ) -> Result<(u32, u32), StoreError> {
        let window = Window {
            start: window * period,
            end: (window + 1) * period,
        };
        self.windows
            .lease(bucket, window, budget.chunk(), budget.limit)
            .await
    }

    /// Forgets the windows that have ended; returns how many.
    pub async fn purge_expired(&self) -> Result<u64, StoreError> {
        self.windows.purge_expired(self.clock.unix_secs()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(limit: u32, period: Duration, clock: &Clock) -> RateLimiter {
        let budget = Budget {
            name: "user_queries",
            limit,
            period,
        };
        let budgets = Budgets {
            user_queries: budget,
            ..Budgets::default()
        };
        let windows = Arc::new(MemoryWindows::default());
        RateLimiter::new(windows, budgets, clock.clone())
    }

    /// A manual clock `into` seconds into an hour.
    fn clock_at(into: u64) -> Clock {
        let hour = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000 / 3600 * 3600);
        Clock::manual(hour + Duration::from_secs(into))
    }

    #[tokio::test]
    async fn a_spent_budget_refuses_until_its_window_ends() {
        let clock = clock_at(3_000);
        let limiter = limiter(5, Duration::from_secs(3600), &clock);
        let budget = limiter.budgets.user_queries;
        for left in (0..5).rev() {
            let decision = limiter.check(&budget, "alice").await;
            assert!(decision.allowed);
            assert_eq!(decision.remaining, left);
        }
        let refused = limiter.check(&budget, "alice").await;
        assert!(!refused.allowed);
        assert_eq!(refused.reset_secs, 600, "the window ends at the hour");
        // Another key has a budget of its own.
        assert!(limiter.check(&budget, "bob").await.allowed);

        clock.advance(Duration::from_secs(599));
        assert!(!limiter.check(&budget, "alice").await.allowed);
        assert_eq!(limiter.check(&budget, "alice").await.reset_secs, 1);
        clock.advance(Duration::from_secs(1));
        let next = limiter.check(&budget, "alice").await;
        assert!(next.allowed, "a new window has a new budget");
        assert_eq!((next.remaining, next.reset_secs), (4, 3600));
    }

    /// Windows behind a database that never answers.
    #[derive(Default)]
    struct Unreachable {
        leases: std::sync::atomic::AtomicU32,
    }

    #[async_trait::async_trait]
    impl WindowStore for Unreachable {
        async fn lease(
            &self,
            _: &str,
            _: Window,
            _: u32,
            _: u32,
        ) -> Result<(u32, u32), StoreError> {
            self.leases
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::future::pending().await
        }

        async fn purge_expired(&self, _: u64) -> Result<u64, StoreError> {
            std::future::pending().await
        }
    }

    #[tokio::test]
    async fn unreachable_windows_cost_one_short_wait_then_the_budget_is_kept_locally() {
        let clock = clock_at(0);
        let windows = Arc::new(Unreachable::default());
        let budgets = Budgets {
            user_queries: Budget {
                name: "user_queries",
                limit: 3,
                period: Duration::from_secs(60),
            },
            ..Budgets::default()
        };
        let limiter = RateLimiter::new(windows.clone(), budgets, clock.clone());
        let budget = limiter.budgets.user_queries;
        let checks = async {
            let mut allowed = Vec::new();
            for _ in 0..5 {
                let decision = limiter.check(&budget, "alice").await;
                allowed.push((decision.allowed, decision.remaining));
            }
            allowed
        };
        // A check that waited on the database forever would never end.
        let allowed = tokio::time::timeout(Duration::from_secs(10), checks)
            .await
            .expect("the checks end without the database");
        assert_eq!(
            allowed,
            [(true, 2), (true, 1), (true, 0), (false, 0), (false, 0)]
        );
        let leases = || windows.leases.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(leases(), 1, "one try per window, not one per request");
        // The next window tries the shared count again.
        clock.advance(Duration::from_secs(60));
        let next = tokio::time::timeout(Duration::from_secs(10), limiter.check(&budget, "alice"));
        assert!(next.await.unwrap().allowed);
        assert_eq!(leases(), 2);
    }

    #[tokio::test]
    async fn ended_windows_are_purged() {
        let clock = clock_at(0);
        let limiter = limiter(100, Duration::from_secs(60), &clock);
        let budget = limiter.budgets.user_queries;
        for user in ["alice", "bob"] {
            limiter.check(&budget, user).await;
        }
        assert_eq!(limiter.purge_expired().await.unwrap(), 0);
        clock.advance(Duration::from_secs(61));
        assert_eq!(limiter.purge_expired().await.unwrap(), 2);
    }

    #[test]
    fn believes_forwarded_for_only_from_trusted_proxies() {
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let client: IpAddr = "203.0.113.7".parse().unwrap();
        let trusted = [proxy];
        let header = Some("198.51.100.1, 203.0.113.7");
        assert_eq!(client_ip(proxy, header, &trusted), client);
        let stranger: IpAddr = "192.0.2.9".parse().unwrap();
        assert_eq!(client_ip(stranger, header, &trusted), stranger);
        assert_eq!(client_ip(proxy, Some("garbage"), &trusted), proxy);
        assert_eq!(
            client_ip(proxy, Some("203.0.113.7, 10.0.0.1"), &trusted),
            client
        );
    }
}
