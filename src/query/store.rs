//! The storage port of the query side: every read the HTTP API makes, as
//! the [`ReadStore`] trait, with its two adapters side by side — Postgres
//! ([`PgReadStore`]: one REPEATABLE READ snapshot per read, on the read pool)
//! and the embedded mode's in-memory read models ([`MemoryModels`]). Each
//! answer comes with the checkpoint it reflects, which the cache and SSE
//! resume depend on. Failures are [`StoreError`]s; `http` decides what they
//! answer.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use podium_projections::attempts::{AttemptQueries, AttemptSummary};
use podium_projections::catalog::{CollectionSummary, TestSummary};
use podium_projections::checkpoint_of;
use podium_projections::feed::{self, FeedChange, FeedItem, FeedQueries};
use podium_projections::leaderboard::{
    self, Around, LeaderboardQueries, Page, PageStart, RankedEntry,
};
use podium_projections::memory::MemoryModels;
use podium_projections::ranking::{Entry, RankKey, Submission};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::ops::db::StoreError;
use crate::query::rank_index::RankIndex;

/// A point in the log: a projection has "reached" it once it has applied
/// every event committed before it was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogMark {
    /// The order key of the last committed event, until the relay has
    /// numbered it.
    Key(crate::log::postgres::LogKey),
    /// A log seq.
    Seq(u64),
}

/// A feed page: items newest first, whether more follow, the unread count.
pub struct FeedPage {
    pub items: Vec<FeedItem>,
    pub more: bool,
    pub unread: u64,
}

/// Where the query API reads the read models.
#[async_trait]
pub trait ReadStore: Send + Sync {
    /// Whether the store answers.
    async fn is_ready(&self) -> bool;

    /// Whether the read models live in this process (the embedded mode).
    fn in_memory(&self) -> bool {
        false
    }

    /// A page of a leaderboard with the checkpoint it reflects, or
    /// `Err(horizon)` for a cursor older than the moves still known.
    async fn leaderboard_page(
        &self,
        test_id: Uuid,
        start: &PageStart,
        limit: i64,
    ) -> Result<(u64, Result<Page, u64>), StoreError>;

    /// The first `limit` entries of a board as the read model holds them,
    /// for background work (period podiums): never through the rank index,
    /// which would warm, and keep, boards nobody reads.
    async fn leaderboard_top(&self, test_id: Uuid, limit: i64) -> Result<Page, StoreError> {
        first_page(
            self.leaderboard_page(test_id, &PageStart::Offset(0), limit)
                .await?,
        )
    }

    /// `user_id`'s entry and neighbours.
    async fn around(&self, test_id: Uuid, user_id: &str, radius: i64)
        -> Result<Around, StoreError>;

    /// Entries of `test_id` changed after `after` (for SSE resume), with the
    /// checkpoint; `None` when more than `limit` changed (decided before any
    /// is ranked).
    async fn leaderboard_changed_since(
        &self,
        test_id: Uuid,
        after: Option<u64>,
        limit: i64,
    ) -> Result<(u64, Option<Vec<(u64, RankedEntry)>>), StoreError>;

    /// A page of `user_id`'s notifications with the unread count.
    async fn feed_page(
        &self,
        user_id: &str,
        before: Option<u64>,
        unread_only: bool,
        limit: i64,
    ) -> Result<FeedPage, StoreError>;

    /// `user_id`'s items changed after `after` (none without), the unread
    /// count, and the checkpoint.
    async fn feed_changed_since(
        &self,
        user_id: &str,
        after: Option<u64>,
        limit: i64,
    ) -> Result<(u64, Vec<FeedChange>, u64), StoreError>;

    /// Up to `limit` of `user_id`'s attempts, newest first, after `after`.
    async fn attempts_page(
        &self,
        user_id: &str,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: i64,
    ) -> Result<(Vec<AttemptSummary>, bool), StoreError>;

    /// Every published test, newest first.
    async fn tests(&self) -> Result<Vec<TestSummary>, StoreError>;

    /// Every collection, newest first.
    async fn collections(&self) -> Result<Vec<CollectionSummary>, StoreError>;

    /// Forgets leaderboard moves older than `retention` (what cursors'
    /// "moved" lists read); returns how many.
    async fn prune_moves(&self, retention: Duration) -> Result<u64, StoreError>;

    /// Whether `user_id` has nothing unread as of now: the feed holds every
    /// event committed so far, and none of the user's items is unread. False
    /// when it cannot tell (a feed behind the log).
    async fn all_read(&self, user_id: &str) -> Result<bool, StoreError>;

    /// Every submission of `test_id` made at or before `until`, and at or
    /// after `since` if given, in no order (what a board as of `until`, or a
    /// period's history, is folded from).
    async fn submitted_between(
        &self,
        test_id: Uuid,
        since: Option<DateTime<Utc>>,
        until: DateTime<Utc>,
    ) -> Result<Vec<Submission>, StoreError>;

    /// Where the log ends now.
    async fn log_mark(&self) -> Result<LogMark, StoreError>;

    /// Whether `projection` has applied everything before `mark`, which it
    /// may refine (a key becomes the seq the relay gave it) so that the next
    /// question is cheaper. False when it cannot tell.
    async fn reached(&self, projection: &str, mark: &mut LogMark) -> Result<bool, StoreError>;
}

/// The page of an offset start: only a cursor can be too old, so an offset
/// page always answers.
fn first_page((seq, page): (u64, Result<Page, u64>)) -> Result<Page, StoreError> {
    page.map_err(|_| StoreError::Failed(format!("a first page refused at {seq}").into()))
}

/// The read models in Postgres.
#[derive(Clone)]
pub struct PgReadStore {
    /// The primary: where moves are pruned.
    pub pool: PgPool,
    /// Where queries read: a replica when `DATABASE_READ_URL` is set.
    pub read_pool: PgPool,
    /// The relay that numbers the log for this deployment's projections
    /// (its NATS prefix, or the in-process one's name), if any.
    pub relay: Option<String>,
    /// Where ranks are answered from memory, when on: around-user and offset
    /// pages of a warm board never reach the database.
    pub ranks: Option<Arc<RankIndex>>,
}

impl PgReadStore {
    /// [`ReadStore::leaderboard_page`] read from the read model.
    async fn page_from_sql(
        &self,
        test_id: Uuid,
        start: &PageStart,
        limit: i64,
    ) -> Result<(u64, Result<Page, u64>), StoreError> {
        let mut tx = crate::ops::db::snapshot(&self.read_pool).await?;
        let seq = checkpoint_of(&mut *tx, leaderboard::NAME).await?;
        if let PageStart::After { since, .. } = start {
            let horizon = LeaderboardQueries::moves_horizon(&mut *tx).await?;
            if *since < horizon {
                return Ok((seq, Err(horizon)));
            }
        }
        let page = LeaderboardQueries::page(&mut tx, test_id, start, limit).await?;
        tx.commit().await?;
        // Too much moved past the cursor to continue it exactly.
        Ok((seq, page.ok_or(seq)))
    }

    /// `changed` entries of `test_id` (each with the seq of its change)
    /// with their ranks as the snapshot `conn` reads them: from the rank
    /// index when its board is exactly that snapshot's (its last change is
    /// the snapshot's), by counting otherwise.
    async fn rank_changed(
        &self,
        conn: &mut PgConnection,
        test_id: Uuid,
        changed: Vec<(u64, Entry)>,
    ) -> Result<Vec<(u64, RankedEntry)>, sqlx::Error> {
        let (seqs, entries): (Vec<u64>, Vec<Entry>) = changed.into_iter().unzip();
        let in_memory = match &self.ranks {
            Some(ranks) if !entries.is_empty() => {
                let last = LeaderboardQueries::last_changes(&mut *conn, &[test_id])
                    .await?
                    .get(&test_id)
                    .copied()
                    .unwrap_or(0);
                let keys: Vec<RankKey> = entries.iter().map(Entry::rank_key).collect();
                ranks.ranks_at(test_id, last, &keys)
            }
            _ => None,
        };
        let ranked = match in_memory {
            Some(ranks) => entries
                .into_iter()
                .zip(ranks)
                .map(|(entry, rank)| RankedEntry { rank, entry })
                .collect(),
            None => LeaderboardQueries::ranked(conn, test_id, entries).await?,
        };
        Ok(seqs.into_iter().zip(ranked).collect())
    }
}

#[async_trait]
impl ReadStore for PgReadStore {
    async fn is_ready(&self) -> bool {
        crate::ops::db::is_ready(&self.pool).await
    }

    async fn leaderboard_page(
        &self,
        test_id: Uuid,
        start: &PageStart,
        limit: i64,
    ) -> Result<(u64, Result<Page, u64>), StoreError> {
        if let (PageStart::Offset(offset), Some(ranks)) = (start, &self.ranks) {
            let limit = usize::try_from(limit).unwrap_or(0);
            let page = ranks
                .read(test_id, |board, seq| {
                    let mut entries = board.page(*offset, limit + 1);
                    let more = entries.len() > limit;
                    entries.truncate(limit);
                    let total = board.len();
                    (
                        seq,
                        Ok(Page {
                            total,
                            entries,
                            more,
                        }),
                    )
                })
                .await;
            if let Some(page) = page {
                return Ok(page);
            }
        }
        self.page_from_sql(test_id, start, limit).await
    }

    async fn leaderboard_top(&self, test_id: Uuid, limit: i64) -> Result<Page, StoreError> {
        first_page(
            self.page_from_sql(test_id, &PageStart::Offset(0), limit)
                .await?,
        )
    }

    async fn around(
        &self,
        test_id: Uuid,
        user_id: &str,
        radius: i64,
    ) -> Result<Around, StoreError> {
        if let Some(ranks) = &self.ranks {
            let radius = usize::try_from(radius).unwrap_or(0);
            let around = ranks
                .read(test_id, |board, checkpoint| {
                    let found = board.around(user_id, radius);
                    let (entry, above, below) = match found {
                        Some((entry, above, below)) => (Some(entry), above, below),
                        None => (None, Vec::new(), Vec::new()),
                    };
                    Around {
                        total: board.len(),
                        checkpoint,
                        entry,
                        above,
                        below,
                    }
                })
                .await;
            if let Some(around) = around {
                return Ok(around);
            }
        }
        Ok(
            LeaderboardQueries::around(
                &self.read_pool,
                test_id,
                user_id,
                radius,
                leaderboard::NAME,
            )
            .await?,
        )
    }

    async fn leaderboard_changed_since(
        &self,
        test_id: Uuid,
        after: Option<u64>,
        limit: i64,
    ) -> Result<(u64, Option<Vec<(u64, RankedEntry)>>), StoreError> {
        let mut tx = crate::ops::db::snapshot(&self.read_pool).await?;
        let seq = checkpoint_of(&mut *tx, leaderboard::NAME).await?;
        let changed = match after {
            Some(after) => {
                match LeaderboardQueries::changed_after(&mut tx, test_id, after, limit).await? {
                    Some(changed) => Some(self.rank_changed(&mut tx, test_id, changed).await?),
                    None => None,
                }
            }
            None => Some(Vec::new()),
        };
        tx.commit().await?;
        Ok((seq, changed))
    }

    async fn feed_page(
        &self,
        user_id: &str,
        before: Option<u64>,
        unread_only: bool,
        limit: i64,
    ) -> Result<FeedPage, StoreError> {
        let mut tx = crate::ops::db::snapshot(&self.read_pool).await?;
        let (items, more) = FeedQueries::page(&mut tx, user_id, before, unread_only, limit).await?;
        let unread = FeedQueries::unread(&mut *tx, user_id).await?;
        tx.commit().await?;
        Ok(FeedPage {
            items,
            more,
            unread,
        })
    }

    async fn feed_changed_since(
        &self,
        user_id: &str,
        after: Option<u64>,
        limit: i64,
    ) -> Result<(u64, Vec<FeedChange>, u64), StoreError> {
        let mut tx = crate::ops::db::snapshot(&self.read_pool).await?;
        let seq = checkpoint_of(&mut *tx, feed::NAME).await?;
        let changed = match after {
            Some(after) => FeedQueries::changed_since(&mut tx, user_id, after, limit).await?,
            None => Vec::new(),
        };
        let unread = FeedQueries::unread(&mut *tx, user_id).await?;
        tx.commit().await?;
        Ok((seq, changed, unread))
    }

    async fn attempts_page(
        &self,
        user_id: &str,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: i64,
    ) -> Result<(Vec<AttemptSummary>, bool), StoreError> {
        let mut conn = self.read_pool.acquire().await?;
        Ok(AttemptQueries::page(&mut conn, user_id, after, limit).await?)
    }

    async fn tests(&self) -> Result<Vec<TestSummary>, StoreError> {
        Ok(podium_projections::catalog::tests(&self.read_pool).await?)
    }

    async fn collections(&self) -> Result<Vec<CollectionSummary>, StoreError> {
        Ok(podium_projections::catalog::collections(&self.read_pool).await?)
    }

    async fn prune_moves(&self, retention: Duration) -> Result<u64, StoreError> {
        Ok(LeaderboardQueries::prune_moves(&self.pool, retention).await?)
    }

    /// On the primary (a replica may be behind it): the feed has applied
    /// everything the relay numbered, the relay has nothing left to number,
    /// and the user's unread count is 0.
    async fn all_read(&self, user_id: &str) -> Result<bool, StoreError> {
        let Some(relay) = &self.relay else {
            return Ok(false);
        };
        let mut conn = self.pool.acquire().await?;
        let row: Option<(bool, i32, String, i64)> = sqlx::query_as(
            "SELECT COALESCE((SELECT unread FROM feed_counters WHERE user_id = $1), 0) = 0
                    AND f.seq = r.seq,
                    r.epoch, r.txid::text, r.position
               FROM relay_checkpoints r JOIN projection_checkpoints f ON f.name = $3
              WHERE r.name = $2",
        )
        .bind(user_id)
        .bind(relay)
        .bind(feed::NAME)
        .fetch_optional(&mut *conn)
        .await?;
        let Some((true, epoch, txid, position)) = row else {
            return Ok(false);
        };
        let key = crate::log::postgres::LogKey {
            epoch,
            txid,
            position,
        };
        Ok(!crate::log::postgres::any_after(&mut conn, &key).await?)
    }

    async fn submitted_between(
        &self,
        test_id: Uuid,
        since: Option<DateTime<Utc>>,
        until: DateTime<Utc>,
    ) -> Result<Vec<Submission>, StoreError> {
        let mut conn = self.read_pool.acquire().await?;
        Ok(AttemptQueries::submitted_between(&mut conn, test_id, since, until).await?)
    }

    /// The last committed event's key, on the primary.
    async fn log_mark(&self) -> Result<LogMark, StoreError> {
        let mut conn = self.pool.acquire().await?;
        Ok(match crate::log::postgres::last_key(&mut conn).await? {
            Some(key) => LogMark::Key(key),
            None => LogMark::Seq(0),
        })
    }

    /// A key is reached by the relay (on the primary) first: its seq then is
    /// at or past the key's. A seq is reached by the projection where
    /// queries read it.
    async fn reached(&self, projection: &str, mark: &mut LogMark) -> Result<bool, StoreError> {
        if let LogMark::Key(key) = mark {
            let Some(relay) = &self.relay else {
                return Ok(false);
            };
            let numbered: Option<(i64, bool)> = sqlx::query_as(
                "SELECT seq, (epoch, txid, position) >= ($2, $3::text::xid8, $4)
                   FROM relay_checkpoints WHERE name = $1",
            )
            .bind(relay)
            .bind(key.epoch)
            .bind(&key.txid)
            .bind(key.position)
            .fetch_optional(&self.pool)
            .await?;
            match numbered {
                Some((seq, true)) => *mark = LogMark::Seq(seq.max(0) as u64),
                _ => return Ok(false),
            }
        }
        let LogMark::Seq(seq) = *mark else {
            unreachable!("a key became a seq above");
        };
        Ok(checkpoint_of(&self.read_pool, projection).await? >= seq)
    }
}

/// The embedded mode's read models, kept by its projector in this process.
#[async_trait]
impl ReadStore for MemoryModels {
    async fn is_ready(&self) -> bool {
        true
    }

    fn in_memory(&self) -> bool {
        true
    }

    async fn leaderboard_page(
        &self,
        test_id: Uuid,
        start: &PageStart,
        limit: i64,
    ) -> Result<(u64, Result<Page, u64>), StoreError> {
        Ok(MemoryModels::leaderboard_page(self, test_id, start, limit))
    }

    async fn around(
        &self,
        test_id: Uuid,
        user_id: &str,
        radius: i64,
    ) -> Result<Around, StoreError> {
        Ok(MemoryModels::around(self, test_id, user_id, radius))
    }

    async fn leaderboard_changed_since(
        &self,
        test_id: Uuid,
        after: Option<u64>,
        limit: i64,
    ) -> Result<(u64, Option<Vec<(u64, RankedEntry)>>), StoreError> {
        Ok(match after {
            Some(after) => MemoryModels::leaderboard_changed_since(self, test_id, after, limit),
            None => (self.checkpoint(), Some(Vec::new())),
        })
    }

    async fn feed_page(
        &self,
        user_id: &str,
        before: Option<u64>,
        unread_only: bool,
        limit: i64,
    ) -> Result<FeedPage, StoreError> {
        let (_, items, more, unread) =
            MemoryModels::feed_page(self, user_id, before, unread_only, limit);
        Ok(FeedPage {
            items,
            more,
            unread,
        })
    }

    async fn feed_changed_since(
        &self,
        user_id: &str,
        after: Option<u64>,
        limit: i64,
    ) -> Result<(u64, Vec<FeedChange>, u64), StoreError> {
        Ok(match after {
            Some(after) => MemoryModels::feed_changed_since(self, user_id, after, limit),
            None => {
                let (seq, unread) = self.unread(user_id);
                (seq, Vec::new(), unread)
            }
        })
    }

    async fn attempts_page(
        &self,
        user_id: &str,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: i64,
    ) -> Result<(Vec<AttemptSummary>, bool), StoreError> {
        Ok(MemoryModels::attempts_page(self, user_id, after, limit))
    }

    async fn tests(&self) -> Result<Vec<TestSummary>, StoreError> {
        Ok(MemoryModels::tests(self))
    }

    async fn collections(&self) -> Result<Vec<CollectionSummary>, StoreError> {
        Ok(MemoryModels::collections(self))
    }

    async fn prune_moves(&self, retention: Duration) -> Result<u64, StoreError> {
        Ok(MemoryModels::prune_moves(self, retention))
    }

    async fn all_read(&self, user_id: &str) -> Result<bool, StoreError> {
        Ok(MemoryModels::all_read(self, user_id))
    }

    async fn submitted_between(
        &self,
        test_id: Uuid,
        since: Option<DateTime<Utc>>,
        until: DateTime<Utc>,
    ) -> Result<Vec<Submission>, StoreError> {
        Ok(MemoryModels::submitted_between(self, test_id, since, until))
    }

    async fn log_mark(&self) -> Result<LogMark, StoreError> {
        Ok(LogMark::Seq(
            self.head().unwrap_or_else(|| self.checkpoint()),
        ))
    }

    /// The embedded models apply every event together: one checkpoint.
    async fn reached(&self, _: &str, mark: &mut LogMark) -> Result<bool, StoreError> {
        Ok(match mark {
            LogMark::Seq(seq) => self.checkpoint() >= *seq,
            LogMark::Key(_) => false,
        })
    }
}
