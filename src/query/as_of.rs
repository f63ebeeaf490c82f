//! Leaderboards as they stood at a past instant: folded on demand from the
//! test's submissions made up to it ([`ReadStore::submitted_between`], one
//! index range of the attempts read model) by the leaderboard's own rules
//! ([`board_of`]), and kept in a cache bounded in bytes.
//!
//! A board is kept only once its instant is *settled*: the attempts read
//! model is known to hold every submission made up to it. Then it never
//! changes, and cursor walks over it are stable. The proof is a mark of the
//! log taken at some time `T` ([`ReadStore::log_mark`]) that the attempts
//! projection has reached: every submission committed before `T` is then
//! recorded, and one made at or before `T - SLACK` has committed before
//! `T`. Marks are taken as requests need them, one at a time, so a lagging
//! projection (a NATS outage, a replica behind) only delays caching; it
//! never gets an incomplete board kept. Instants less than [`SETTLED`] old
//! are never kept.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use podium_projections::attempts;
use podium_projections::ranking::{board_of, Entry};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::ops::db::StoreError;
use crate::query::store::{LogMark, ReadStore};

/// How long ago an instant must be, at least, for its board to be kept.
pub const SETTLED: chrono::Duration = chrono::Duration::seconds(60);

/// How long a submission may take from reading its time to committing.
const SLACK: chrono::Duration = chrono::Duration::seconds(10);

/// Bytes an entry weighs in the cache, beyond its user id: the entry's own
/// fields and the vector's slot.
const ENTRY_BYTES: usize = std::mem::size_of::<Entry>();

/// Boards as of past instants, by test and instant.
pub struct AsOfBoards {
    cache: moka::future::Cache<(Uuid, DateTime<Utc>), Arc<Vec<Entry>>>,
    horizon: Mutex<Horizon>,
}

/// How far the attempts read model is known to be complete.
#[derive(Default)]
struct Horizon {
    /// Every submission made at or before this is recorded.
    settled: Option<DateTime<Utc>>,
    /// A mark taken at the time given, not reached yet.
    pending: Option<(DateTime<Utc>, LogMark)>,
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
        Self {
            cache,
            horizon: Mutex::new(Horizon::default()),
        }
    }

    /// Whether the board as of `at` is settled at `now`: it will never
    /// change (see the module's documentation).
    pub async fn settled(
        &self,
        store: &dyn ReadStore,
        at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        if at > now - SETTLED {
            return Ok(false);
        }
        let mut horizon = self.horizon.lock().await;
        if horizon.settled.is_some_and(|settled| settled >= at) {
            return Ok(true);
        }
        if horizon.pending.is_none() {
            horizon.pending = Some((now, store.log_mark().await?));
        }
        let Some((taken, mark)) = horizon.pending.as_mut() else {
            unreachable!("set above");
        };
        let taken = *taken;
        if store.reached(attempts::NAME, mark).await? {
            horizon.pending = None;
            horizon.settled = Some(taken - SLACK);
        }
        Ok(horizon.settled.is_some_and(|settled| settled >= at))
    }

    /// `test_id`'s all-time board as of `at`, every entry in rank order;
    /// kept when `settled` (as [`AsOfBoards::settled`] said).
    pub async fn board(
        &self,
        store: &dyn ReadStore,
        test_id: Uuid,
        at: DateTime<Utc>,
        settled: bool,
    ) -> Result<Arc<Vec<Entry>>, StoreError> {
        let key = (test_id, at);
        if let Some(board) = self.cache.get(&key).await {
            return Ok(board);
        }
        let board = Arc::new(board_of(store.submitted_between(test_id, None, at).await?));
        if settled {
            self.cache.insert(key, board.clone()).await;
        }
        Ok(board)
    }
}
