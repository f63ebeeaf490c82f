//! The query cache: leaderboard pages, around-a-user views and unread counts,
//! held per API instance in moka and kept fresh by the change notifications
//! every instance receives (see [`crate::query::changes`]).
//!
//! Each cached answer remembers the projection checkpoint it was read at (in
//! the same snapshot). It is stale once a change with a later seq has been
//! seen for its key — exact even when reads go to a lagging replica. A stale
//! answer is reloaded at most once per `refresh_after`, so a hot page under a
//! stream of submissions is recomputed every few milliseconds, not per
//! request; concurrent misses for one key share one load. A TTL bounds what a
//! lost notification could leave stale.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::ops::metrics::Metrics;
use crate::query::changes::ChangeHub;

/// What is cached, by key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CacheKey {
    /// A leaderboard page: `start` is the offset or the cursor as given.
    LeaderboardPage {
        test_id: Uuid,
        start: String,
        limit: u16,
    },
    /// A user's entry and neighbours.
    Around {
        test_id: Uuid,
        user_id: String,
        radius: u16,
    },
    /// A user's unread count.
    Unread { user_id: String },
}

impl CacheKey {
    /// The change notifications (topic, key) that make this answer stale.
    fn topic_key(&self) -> (&'static str, String) {
        match self {
            Self::LeaderboardPage { test_id, .. } | Self::Around { test_id, .. } => {
                (podium_projections::leaderboard::TOPIC, test_id.to_string())
            }
            Self::Unread { user_id } => (podium_projections::feed::TOPIC, user_id.clone()),
        }
    }

    /// Its size in bytes: the key itself and the strings it holds (a raw
    /// cursor can be long).
    fn weight(&self) -> usize {
        let held = match self {
            Self::LeaderboardPage { start, .. } => start.capacity(),
            Self::Around { user_id, .. } | Self::Unread { user_id } => user_id.capacity(),
        };
        std::mem::size_of_val(self) + held
    }

    /// The cache's name in metrics.
    fn cache_name(&self) -> &'static str {
        match self {
            Self::LeaderboardPage { .. } => "leaderboard_page",
            Self::Around { .. } => "leaderboard_around",
            Self::Unread { .. } => "unread_count",
        }
    }
}

/// What the cache holds: an answer (or a failure) ready to serve again.
pub trait Answer: Clone + Send + Sync + 'static {
    /// A failure that may pass (the database away): loaded again at the
    /// next lookup instead of being served.
    fn is_failure(&self) -> bool;
    /// Its size in bytes, for the cache's bound.
    fn weight(&self) -> usize;
}

/// What a load read: the answer (a 404 is an answer too) and the checkpoint
/// of the projection it was read at (0 when the load failed).
pub struct Loaded<A> {
    pub answer: A,
    pub seq: u64,
}

struct Cached<A> {
    answer: A,
    seq: u64,
    epoch: u64,
    loaded_at: Instant,
}

impl<A: Answer> Cached<A> {
    fn stale(&self, epoch: u64, version: u64, refresh_after: Duration) -> bool {
        self.answer.is_failure()
            || self.epoch != epoch
            || (self.seq < version && self.loaded_at.elapsed() >= refresh_after)
    }
}

/// How the cache behaves.
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// Off: every request reads the database.
    pub enabled: bool,
    pub max_bytes: u64,
    /// Longest an answer is served without a reload.
    pub ttl: Duration,
    /// Shortest time between reloads of an answer that changes constantly.
    pub refresh_after: Duration,
}

/// Answers of type `A` by [`CacheKey`].
#[derive(Clone)]
pub struct QueryCache<A> {
    entries: moka::future::Cache<CacheKey, Arc<Cached<A>>>,
    hub: Arc<ChangeHub>,
    config: CacheConfig,
    metrics: Metrics,
}

impl<A: Answer> QueryCache<A> {
    pub fn new(config: CacheConfig, hub: Arc<ChangeHub>, metrics: Metrics) -> Self {
        let entries = moka::future::Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(|key: &CacheKey, value: &Arc<Cached<A>>| {
                let body = value.answer.weight();
                u32::try_from(body + key.weight() + 64).unwrap_or(u32::MAX)
            })
            .time_to_live(config.ttl)
            .build();
        Self {
            entries,
            hub,
            config,
            metrics,
        }
    }

    /// The answer for `key`: cached if fresh, else from `load` — run once
    /// for all concurrent callers of the same key.
    pub async fn get_or_load(
        &self,
        key: CacheKey,
        load: impl Future<Output = Loaded<A>> + Send,
    ) -> A {
        let name = key.cache_name();
        // Only a miss runs this, so hits pay nothing for the timing.
        let metrics = &self.metrics;
        let load = async move {
            let _timer = metrics.db_timer("query").start_timer();
            load.await
        };
        if !self.config.enabled {
            self.count(name, "miss");
            return load.await.answer;
        }
        let (topic, topic_key) = key.topic_key();
        let epoch = self.hub.epoch();
        let version = self.hub.version(topic, &topic_key);
        let refresh_after = self.config.refresh_after;
        let ran = AtomicBool::new(false);
        let init = async {
            ran.store(true, Ordering::Relaxed);
            let loaded_at = Instant::now();
            let Loaded { answer, seq } = load.await;
            Arc::new(Cached {
                answer,
                seq,
                epoch,
                loaded_at,
            })
        };
        let entry = self
            .entries
            .entry(key)
            .or_insert_with_if(init, |cached| cached.stale(epoch, version, refresh_after))
            .await;
        let outcome = if ran.load(Ordering::Relaxed) {
            "miss"
        } else {
            "hit"
        };
        self.count(name, outcome);
        entry.value().answer.clone()
    }

    fn count(&self, cache: &str, outcome: &str) {
        self.metrics
            .cache_lookups
            .with_label_values(&[cache, outcome])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_weighs_the_strings_it_holds() {
        let page = |start: String| CacheKey::LeaderboardPage {
            test_id: Uuid::nil(),
            start,
            limit: 50,
        };
        let short = page("0".into()).weight();
        let long = page("c".repeat(10_000)).weight();
        assert!(long > 10_000 && long > short, "{short} then {long}");
        let unread = CacheKey::Unread {
            user_id: "u".repeat(500),
        };
        assert!(unread.weight() >= 500);
    }
}
