//! Leaderboards as they stood at a past instant: folded on demand from the
//! test's submissions made up to it ([`ReadStore::submitted_until`], one
//! index range of the attempts read model) by the leaderboard's own rules
//! ([`board_of`]), and kept in a cache bounded in bytes.
//!
//! A board as of an instant at least [`SETTLED`] ago is kept: every
//! submission made up to it has been recorded by then (the attempts read
//! model follows the log within a second or so), so it never changes, and
//! cursor walks over it are stable. A more recent one is folded for each
//! request and not kept.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use podium_projections::ranking::{board_of, Entry};
use uuid::Uuid;

use crate::ops::db::StoreError;
use crate::query::store::ReadStore;

/// How long ago an instant must be for its board to be kept.
pub const SETTLED: chrono::Duration = chrono::Duration::seconds(60);

/// Bytes an entry weighs in the cache, beyond its user id: the entry's own
/// fields and the vector's slot.
const ENTRY_BYTES: usize = std::mem::size_of::<Entry>();

/// Boards as of past instants, by test and instant.
pub struct AsOfBoards {
    cache: moka::future::Cache<(Uuid, DateTime<Utc>), Arc<Vec<Entry>>>,
}

impl AsOfBoards {
    /// A cache of at most `max_bytes` of boards.
    pub fn new(max_bytes: u64) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_, board: &Arc<Vec<Entry>>| {
                let bytes: usize = board
                    .iter()
                    .map(|entry| ENTRY_BYTES + entry.user_id.len())
                    .sum();
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .build();
        Self { cache }
    }

    /// `test_id`'s all-time board as of `at` (at or before `now`), every
    /// entry in rank order.
    pub async fn board(
        &self,
        store: &dyn ReadStore,
        test_id: Uuid,
        at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Arc<Vec<Entry>>, StoreError> {
        let key = (test_id, at);
        if let Some(board) = self.cache.get(&key).await {
            return Ok(board);
        }
        let board = Arc::new(board_of(store.submitted_until(test_id, at).await?));
        if at <= now - SETTLED {
            self.cache.insert(key, board.clone()).await;
        }
        Ok(board)
    }
}
