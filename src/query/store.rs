//! The storage port of the query side: every read the HTTP API makes, from
//! Postgres (one REPEATABLE READ snapshot per read, on the read pool) or from
//! the embedded mode's in-memory read models. Each answer comes with the
//! checkpoint it reflects, which the cache and SSE resume depend on.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use podium_projections::attempts::{AttemptQueries, AttemptSummary};
use podium_projections::catalog::TestSummary;
use podium_projections::checkpoint_of;
use podium_projections::feed::{self, FeedChange, FeedItem, FeedQueries};
use podium_projections::leaderboard::{
    self, Around, LeaderboardQueries, Page, PageStart, RankedEntry,
};
use sqlx::PgPool;
use uuid::Uuid;

use crate::http::error::ApiError;
use crate::projector::local::Embedded;

/// Where the read models (and the idempotency keys) live.
#[derive(Clone)]
pub enum Backend {
    Postgres {
        /// The primary: commands, the event store, idempotency keys.
        pool: PgPool,
        /// Where queries read: a replica when `DATABASE_READ_URL` is set.
        read_pool: PgPool,
    },
    Embedded(Arc<Embedded>),
}

/// A feed page: items newest first, whether more follow, the unread count.
pub struct FeedPage {
    pub items: Vec<FeedItem>,
    pub more: bool,
    pub unread: u64,
}

impl Backend {
    /// The primary pool, in production.
    pub fn pool(&self) -> Option<&PgPool> {
        match self {
            Self::Postgres { pool, .. } => Some(pool),
            Self::Embedded(_) => None,
        }
    }

    /// Whether the store answers.
    pub async fn is_ready(&self) -> bool {
        match self {
            Self::Postgres { pool, .. } => crate::ops::db::is_ready(pool).await,
            Self::Embedded(_) => true,
        }
    }

    /// A page of a leaderboard with the checkpoint it reflects, or
    /// `Err(horizon)` for a cursor older than the moves still known.
    pub async fn leaderboard_page(
        &self,
        test_id: Uuid,
        start: &PageStart,
        limit: i64,
    ) -> Result<(u64, Result<Page, u64>), ApiError> {
        let read_pool = match self {
            Self::Embedded(embedded) => {
                return Ok(embedded.models.leaderboard_page(test_id, start, limit))
            }
            Self::Postgres { read_pool, .. } => read_pool,
        };
        let mut tx = crate::ops::db::snapshot(read_pool).await?;
        let seq = checkpoint_of(&mut *tx, leaderboard::NAME).await?;
        if let PageStart::After { since, .. } = start {
            let horizon = LeaderboardQueries::moves_horizon(&mut *tx).await?;
            if *since < horizon {
                return Ok((seq, Err(horizon)));
            }
        }
        let page = LeaderboardQueries::page(&mut tx, test_id, start, limit).await?;
        tx.commit().await?;
        Ok((seq, Ok(page)))
    }

    /// `user_id`'s entry and neighbours.
    pub async fn around(
        &self,
        test_id: Uuid,
        user_id: &str,
        radius: i64,
    ) -> Result<Around, ApiError> {
        Ok(match self {
            Self::Embedded(embedded) => embedded.models.around(test_id, user_id, radius),
            Self::Postgres { read_pool, .. } => {
                LeaderboardQueries::around(read_pool, test_id, user_id, radius, leaderboard::NAME)
                    .await?
            }
        })
    }

    /// Entries of `test_id` changed after `after` (for SSE resume), with the
    /// checkpoint.
    pub async fn leaderboard_changed_since(
        &self,
        test_id: Uuid,
        after: Option<u64>,
        limit: i64,
    ) -> Result<(u64, Vec<(u64, RankedEntry)>), ApiError> {
        let read_pool = match self {
            Self::Embedded(embedded) => {
                let models = &embedded.models;
                return Ok(match after {
                    Some(after) => models.leaderboard_changed_since(test_id, after, limit),
                    None => (models.checkpoint(), Vec::new()),
                });
            }
            Self::Postgres { read_pool, .. } => read_pool,
        };
        let mut tx = crate::ops::db::snapshot(read_pool).await?;
        let seq = checkpoint_of(&mut *tx, leaderboard::NAME).await?;
        let changed = match after {
            Some(after) => {
                LeaderboardQueries::changed_since(&mut tx, test_id, after, limit).await?
            }
            None => Vec::new(),
        };
        tx.commit().await?;
        Ok((seq, changed))
    }

    /// A page of `user_id`'s notifications with the unread count.
    pub async fn feed_page(
        &self,
        user_id: &str,
        before: Option<u64>,
        unread_only: bool,
        limit: i64,
    ) -> Result<FeedPage, ApiError> {
        let read_pool = match self {
            Self::Embedded(embedded) => {
                let (_, items, more, unread) =
                    embedded
                        .models
                        .feed_page(user_id, before, unread_only, limit);
                return Ok(FeedPage {
                    items,
                    more,
                    unread,
                });
            }
            Self::Postgres { read_pool, .. } => read_pool,
        };
        let mut tx = crate::ops::db::snapshot(read_pool).await?;
        let (items, more) = FeedQueries::page(&mut tx, user_id, before, unread_only, limit).await?;
        let unread = FeedQueries::unread(&mut *tx, user_id).await?;
        tx.commit().await?;
        Ok(FeedPage {
            items,
            more,
            unread,
        })
    }

    /// `user_id`'s items changed after `after` (none without), the unread
    /// count, and the checkpoint.
    pub async fn feed_changed_since(
        &self,
        user_id: &str,
        after: Option<u64>,
        limit: i64,
    ) -> Result<(u64, Vec<FeedChange>, u64), ApiError> {
        let read_pool = match self {
            Self::Embedded(embedded) => {
                let models = &embedded.models;
                return Ok(match after {
                    Some(after) => models.feed_changed_since(user_id, after, limit),
                    None => {
                        let (seq, unread) = models.unread(user_id);
                        (seq, Vec::new(), unread)
                    }
                });
            }
            Self::Postgres { read_pool, .. } => read_pool,
        };
        let mut tx = crate::ops::db::snapshot(read_pool).await?;
        let seq = checkpoint_of(&mut *tx, feed::NAME).await?;
        let changed = match after {
            Some(after) => FeedQueries::changed_since(&mut tx, user_id, after, limit).await?,
            None => Vec::new(),
        };
        let unread = FeedQueries::unread(&mut *tx, user_id).await?;
        tx.commit().await?;
        Ok((seq, changed, unread))
    }

    /// Up to `limit` of `user_id`'s attempts, newest first, after `after`.
    pub async fn attempts_page(
        &self,
        user_id: &str,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: i64,
    ) -> Result<(Vec<AttemptSummary>, bool), ApiError> {
        Ok(match self {
            Self::Embedded(embedded) => embedded.models.attempts_page(user_id, after, limit),
            Self::Postgres { read_pool, .. } => {
                let mut conn = read_pool.acquire().await?;
                AttemptQueries::page(&mut conn, user_id, after, limit).await?
            }
        })
    }

    /// Every published test, newest first.
    pub async fn tests(&self) -> Result<Vec<TestSummary>, ApiError> {
        Ok(match self {
            Self::Embedded(embedded) => embedded.models.tests(),
            Self::Postgres { read_pool, .. } => {
                podium_projections::catalog::tests(read_pool).await?
            }
        })
    }
}
