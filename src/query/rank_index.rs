//! Each instance's leaderboards in memory, for ranks at Redis speed: a
//! [`BoardIndex`] per test that has been asked about, warmed from the read
//! model in the background, kept current from the change stream, evicted
//! least-recently-used under a byte budget.
//!
//! - **Warm-up.** The first read of a test starts it: one snapshot of the
//!   read model streamed into an index, with the checkpoint it reflects.
//!   Reads are answered from SQL meanwhile.
//! - **Current.** A warm board follows its test's change notifications: each
//!   one newer than the board pulls the entries changed since the board's
//!   last change (one indexed query, in a snapshot, with the checkpoint), so
//!   a lost, late or out-of-order notification costs nothing but a pull; too
//!   many changed entries (a backlog) reload the board whole. A pull also
//!   runs every few seconds, and whenever notifications may have been lost.
//! - **Fresh.** A board answers only once it has caught up with every change
//!   this instance has heard of for its test; while a pull is on its way the
//!   read waits for it briefly, then falls back to SQL.
//! - **Bounded.** Boards are evicted least-recently-used when their bytes
//!   pass `PODIUM_RANK_INDEX_MAX_BYTES`; a board that could not fit alone is
//!   never warmed.
//!
//! Answers carry the checkpoint the board reflects, as SQL answers do.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use podium_projections::board_index::BoardIndex;
use podium_projections::checkpoint_of;
use podium_projections::leaderboard::{self, LeaderboardQueries, LiveBoards};
use podium_projections::ranking::{Entry, RankKey};
use sqlx::PgPool;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::ops::metrics::{Metrics, Probe};
use crate::query::changes::ChangeHub;

/// Most changed entries one pull applies; more reload the board.
const PULL_LIMIT: i64 = 20_000;
/// How often a warm board pulls without being told to.
const PULL_EVERY: Duration = Duration::from_secs(5);
/// How long a read waits for a board to catch up with a change it was told
/// of before answering from SQL.
const FRESH_WAIT: Duration = Duration::from_millis(100);
/// How long a board that failed to warm, or cannot fit, stays cold.
const COLD_FOR: Duration = Duration::from_secs(30);
/// Bytes a board is assumed to take per entry before it is loaded (index
/// and a typical user id): a board that cannot fit is not loaded at all.
const ESTIMATED_ENTRY_BYTES: u64 = 80;

/// A warm board and where it stands in the log.
struct Warm {
    index: BoardIndex,
    /// The checkpoint of the snapshot it was last brought up to.
    seq: u64,
    /// The seq of the last change it holds.
    last_change: u64,
    /// The read model's table it was loaded from: a rebuild swaps in
    /// another, and the board is loaded again.
    table: u32,
}

enum State {
    Warming,
    Warm(Warm),
    /// Failed, or cannot fit: answered from SQL until forgotten.
    Cold,
}

/// One test's board.
struct Board {
    state: RwLock<State>,
    /// The checkpoint of the warm board (`None` while not warm).
    seq: watch::Sender<Option<u64>>,
    /// When it was last read, on the index's clock.
    used: AtomicU64,
    bytes: AtomicU64,
    /// Of `bytes`, those of the user ids.
    user_id_bytes: AtomicU64,
    entries: AtomicU64,
    stop: CancellationToken,
}

impl Board {
    fn new(stop: CancellationToken) -> Self {
        Self {
            state: RwLock::new(State::Warming),
            seq: watch::channel(None).0,
            used: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            user_id_bytes: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            stop,
        }
    }

    fn set(&self, state: State) {
        let seq = match &state {
            State::Warm(warm) => {
                self.measure(warm);
                Some(warm.seq)
            }
            _ => {
                self.entries.store(0, Ordering::Relaxed);
                self.bytes.store(0, Ordering::Relaxed);
                self.user_id_bytes.store(0, Ordering::Relaxed);
                None
            }
        };
        *self
            .state
            .write()
            .expect("a board's lock is never poisoned") = state;
        self.seq.send_replace(seq);
    }

    /// Brings the warm board forward with `changed`: every entry changed
    /// after some seq at or before the board's last change, as of checkpoint
    /// `checkpoint`. Entries the board already holds (changed at or before
    /// its last change) are skipped, so a pull and the owner's worker may
    /// both bring it forward, in any order, and a snapshot older than the
    /// board (a lagging replica) takes nothing back. False if not warm.
    fn advance(&self, changed: &[(u64, Entry)], checkpoint: u64) -> bool {
        let mut state = self
            .state
            .write()
            .expect("a board's lock is never poisoned");
        let State::Warm(warm) = &mut *state else {
            return false;
        };
        let held = warm.last_change;
        for (seq, entry) in changed.iter().filter(|(seq, _)| *seq > held) {
            warm.index.upsert(entry);
            warm.last_change = warm.last_change.max(*seq);
        }
        warm.seq = warm.seq.max(checkpoint);
        self.measure(warm);
        let seq = warm.seq;
        drop(state);
        self.seq.send_replace(Some(seq));
        true
    }

    /// `read` of the board while it is warm; `None` otherwise.
    fn warm<R>(&self, read: impl FnOnce(&Warm) -> Option<R>) -> Option<R> {
        match &*self.state.read().expect("a board's lock is never poisoned") {
            State::Warm(warm) => read(warm),
            _ => None,
        }
    }

    /// Notes the size of `warm`, this board's.
    fn measure(&self, warm: &Warm) {
        let bytes = warm.index.bytes();
        self.entries.store(warm.index.len(), Ordering::Relaxed);
        self.bytes.store(bytes.total() as u64, Ordering::Relaxed);
        self.user_id_bytes
            .store(bytes.user_ids as u64, Ordering::Relaxed);
    }
}

/// Counters of what the index did, for `/metrics`.
#[derive(Default)]
struct Counts {
    warm_ups: AtomicU64,
    evictions: AtomicU64,
    refused: AtomicU64,
    from_index: AtomicU64,
    from_sql: AtomicU64,
    /// Boards the leaderboard worker ranked a batch on.
    batches: AtomicU64,
}

/// The instance's rank index.
pub struct RankIndex {
    /// Itself, for the tasks it spawns.
    me: Weak<Self>,
    pool: PgPool,
    hub: Arc<ChangeHub>,
    max_bytes: u64,
    boards: Mutex<HashMap<Uuid, Arc<Board>>>,
    clock: AtomicU64,
    counts: Counts,
    stop: CancellationToken,
}

impl RankIndex {
    /// An index reading the read model on `pool`, told of changes by `hub`,
    /// holding at most `max_bytes`; its background work ends with `stop`.
    pub fn new(
        pool: PgPool,
        hub: Arc<ChangeHub>,
        max_bytes: u64,
        stop: CancellationToken,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            pool,
            hub,
            max_bytes,
            boards: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
            counts: Counts::default(),
            stop,
        })
    }

    /// `read` applied to `test_id`'s warm board and its checkpoint; `None`
    /// when the board is cold (a warm-up is started) or behind a change this
    /// instance has heard of for longer than a pull takes. Every `None` is
    /// answered from SQL.
    pub async fn read<R>(
        &self,
        test_id: Uuid,
        read: impl FnOnce(&BoardIndex, u64) -> R,
    ) -> Option<R> {
        let answer = self.try_read(test_id, read).await;
        let counter = match answer {
            Some(_) => &self.counts.from_index,
            None => &self.counts.from_sql,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        answer
    }

    async fn try_read<R>(
        &self,
        test_id: Uuid,
        read: impl FnOnce(&BoardIndex, u64) -> R,
    ) -> Option<R> {
        let board = self.board(test_id);
        let heard = self.hub.version(leaderboard::TOPIC, &test_id.to_string());
        let at = (*board.seq.borrow())?;
        if at < heard {
            // Only a read that must wait subscribes (most do not).
            let mut seq = board.seq.subscribe();
            let caught_up =
                tokio::time::timeout(FRESH_WAIT, seq.wait_for(|s| s.is_some_and(|s| s >= heard)));
            if !matches!(caught_up.await, Ok(Ok(_))) {
                return None;
            }
        }
        board.warm(|warm| Some(read(&warm.index, warm.seq)))
    }

    /// The ranks `keys` have on `test_id`'s board if it is warm and its last
    /// change is `last_change` (so it is exactly the board of the snapshot
    /// that read `last_change`); a cold board starts warming.
    pub fn ranks_at(&self, test_id: Uuid, last_change: u64, keys: &[RankKey]) -> Option<Vec<u64>> {
        let ranks = self.board(test_id).warm(|warm| {
            (warm.last_change == last_change)
                .then(|| keys.iter().map(|key| warm.index.rank_of_key(key)).collect())
        });
        let counter = match ranks {
            Some(_) => &self.counts.from_index,
            None => &self.counts.from_sql,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        ranks
    }

    /// `test_id`'s board, marked used; a new one starts warming.
    fn board(&self, test_id: Uuid) -> Arc<Board> {
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut boards = self
            .boards
            .lock()
            .expect("the index's lock is never poisoned");
        let board = match boards.get(&test_id) {
            Some(board) => board.clone(),
            None => {
                let board = Arc::new(Board::new(self.stop.child_token()));
                boards.insert(test_id, board.clone());
                if let Some(me) = self.me.upgrade() {
                    tokio::spawn(me.keep(test_id, board.clone()));
                }
                board
            }
        };
        board.used.store(now, Ordering::Relaxed);
        board
    }

    /// Warms `board`, then keeps it current until it is evicted, fails, or
    /// the index stops; a board that failed or cannot fit stays cold for a
    /// while and is then forgotten, to be warmed again on its next read.
    async fn keep(self: Arc<Self>, test_id: Uuid, board: Arc<Board>) {
        let stop = board.stop.clone();
        let outcome = tokio::select! {
            outcome = self.follow(test_id, &board) => outcome,
            () = stop.cancelled() => return,
        };
        if let Err(err) = &outcome {
            tracing::warn!(%test_id, %err, "the rank index lost a board; SQL answers for it");
        }
        board.set(State::Cold);
        tokio::select! {
            () = tokio::time::sleep(COLD_FOR) => {}
            () = stop.cancelled() => {}
        }
        self.forget(test_id, &board);
    }

    /// `test_id`'s board if the index has one (warm or not), not marked used.
    fn existing_board(&self, test_id: Uuid) -> Option<Arc<Board>> {
        let boards = self
            .boards
            .lock()
            .expect("the index's lock is never poisoned");
        boards.get(&test_id).cloned()
    }

    /// Removes `board` from the index (if it is still `test_id`'s) and stops it.
    fn forget(&self, test_id: Uuid, board: &Arc<Board>) {
        let mut boards = self
            .boards
            .lock()
            .expect("the index's lock is never poisoned");
        if boards.get(&test_id).is_some_and(|b| Arc::ptr_eq(b, board)) {
            boards.remove(&test_id);
        }
        board.stop.cancel();
    }

    /// Loads the board, then pulls what changed whenever told to; returns
    /// only on a failure or when the board cannot fit (`Ok`).
    async fn follow(&self, test_id: Uuid, board: &Board) -> Result<(), sqlx::Error> {
        // Subscribed before the load: no change can fall between the two.
        let mut changes = self.hub.subscribe(leaderboard::TOPIC, &test_id.to_string());
        let mut epochs = self.hub.epochs();
        loop {
            if !self.fits(test_id).await? {
                self.counts.refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%test_id, max_bytes = self.max_bytes, "a board too large for the rank index stays in SQL");
                return Ok(());
            }
            let warm = self.load(test_id).await?;
            board.set(State::Warm(warm));
            self.counts.warm_ups.fetch_add(1, Ordering::Relaxed);
            self.evict_over_budget();
            loop {
                tokio::select! {
                    received = changes.changes.recv() => match received {
                        Ok(delivered) if Some(delivered.change.seq) <= *board.seq.borrow() => continue,
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    },
                    _ = epochs.changed() => {}
                    () = tokio::time::sleep(PULL_EVERY) => {}
                }
                // Whatever else arrived meanwhile, one pull covers it.
                while changes.changes.try_recv().is_ok() {}
                if !self.pull(test_id, board).await? {
                    break;
                }
                self.evict_over_budget();
            }
        }
    }

    /// Whether `test_id`'s board can be held within the budget.
    async fn fits(&self, test_id: Uuid) -> Result<bool, sqlx::Error> {
        let entries = LeaderboardQueries::total(&self.pool, test_id).await?;
        Ok(entries.saturating_mul(ESTIMATED_ENTRY_BYTES) <= self.max_bytes)
    }

    /// The whole board, from one snapshot.
    async fn load(&self, test_id: Uuid) -> Result<Warm, sqlx::Error> {
        let started = Instant::now();
        let mut tx = crate::ops::db::snapshot(&self.pool).await?;
        let seq = checkpoint_of(&mut *tx, leaderboard::NAME).await?;
        let table = LeaderboardQueries::table_id(&mut *tx).await?;
        let (index, last_change) = LeaderboardQueries::board(&mut tx, test_id).await?;
        tx.commit().await?;
        tracing::info!(
            %test_id,
            entries = index.len(),
            bytes = index.bytes().total(),
            ms = started.elapsed().as_millis() as u64,
            "rank index warmed a board"
        );
        Ok(Warm {
            index,
            seq,
            last_change,
            table,
        })
    }

    /// Brings `board` up to the read model's current snapshot; false when
    /// too much changed to pull, or a rebuild swapped the read model's table
    /// (the board is to be reloaded).
    async fn pull(&self, test_id: Uuid, board: &Board) -> Result<bool, sqlx::Error> {
        let Some((after, loaded_from)) = board.warm(|warm| Some((warm.last_change, warm.table)))
        else {
            return Ok(false);
        };
        let mut tx = crate::ops::db::snapshot(&self.pool).await?;
        let seq = checkpoint_of(&mut *tx, leaderboard::NAME).await?;
        if LeaderboardQueries::table_id(&mut *tx).await? != loaded_from {
            return Ok(false);
        }
        let changed =
            LeaderboardQueries::changed_after(&mut tx, test_id, after, PULL_LIMIT).await?;
        tx.commit().await?;
        let Some(changed) = changed else {
            return Ok(false);
        };
        Ok(board.advance(&changed, seq))
    }

    /// Evicts the least recently read boards until the rest fit the budget.
    fn evict_over_budget(&self) {
        let mut boards = self
            .boards
            .lock()
            .expect("the index's lock is never poisoned");
        let mut total: u64 = boards
            .values()
            .map(|b| b.bytes.load(Ordering::Relaxed))
            .sum();
        if total <= self.max_bytes {
            return;
        }
        let mut by_use: Vec<(u64, Uuid)> = boards
            .iter()
            .filter(|(_, b)| b.bytes.load(Ordering::Relaxed) > 0)
            .map(|(test, b)| (b.used.load(Ordering::Relaxed), *test))
            .collect();
        by_use.sort_unstable();
        for (_, test_id) in by_use {
            if total <= self.max_bytes {
                break;
            }
            if let Some(board) = boards.remove(&test_id) {
                total -= board.bytes.load(Ordering::Relaxed);
                board.stop.cancel();
                self.counts.evictions.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%test_id, "rank index evicted a board");
            }
        }
    }

    /// Batches the leaderboard worker ranked in memory (per test).
    pub fn batches_ranked(&self) -> u64 {
        self.counts.batches.load(Ordering::Relaxed)
    }

    /// Boards not loaded because they could not fit the budget alone.
    pub fn refused(&self) -> u64 {
        self.counts.refused.load(Ordering::Relaxed)
    }

    /// What the index holds: warm boards, entries, bytes.
    pub fn stats(&self) -> IndexStats {
        let boards = self
            .boards
            .lock()
            .expect("the index's lock is never poisoned");
        let warm = boards
            .values()
            .filter(|b| b.bytes.load(Ordering::Relaxed) > 0);
        let mut stats = IndexStats::default();
        for board in warm {
            stats.boards += 1;
            stats.entries += board.entries.load(Ordering::Relaxed);
            stats.bytes += board.bytes.load(Ordering::Relaxed);
            stats.user_id_bytes += board.user_id_bytes.load(Ordering::Relaxed);
        }
        stats
    }
}

/// The owner's leaderboard worker ranks the changes it announces here: it
/// brings the board forward inside its transaction (so the board is exact
/// before every batch, whatever the notifications' timing) and ranks in
/// memory.
impl LiveBoards for RankIndex {
    fn last_change(&self, test_id: Uuid) -> Option<u64> {
        self.board(test_id).warm(|warm| Some(warm.last_change))
    }

    fn advance(&self, test_id: Uuid, changed: &[(u64, Entry)], checkpoint: u64) {
        if let Some(board) = self.existing_board(test_id) {
            board.advance(changed, checkpoint);
        }
    }

    fn rank_with(
        &self,
        test_id: Uuid,
        last_change: u64,
        rank: &mut dyn FnMut(&BoardIndex),
    ) -> bool {
        let Some(board) = self.existing_board(test_id) else {
            return false;
        };
        let ranked =
            board.warm(|warm| (warm.last_change == last_change).then(|| rank(&warm.index)));
        if ranked.is_some() {
            self.counts.batches.fetch_add(1, Ordering::Relaxed);
        }
        ranked.is_some()
    }
}

/// What the index holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IndexStats {
    pub boards: u64,
    pub entries: u64,
    /// All of it, user ids included.
    pub bytes: u64,
    pub user_id_bytes: u64,
}

impl Probe for RankIndex {
    fn read(&self, metrics: &Metrics) {
        let stats = self.stats();
        metrics.rank_index_boards.set(stats.boards as i64);
        metrics.rank_index_entries.set(stats.entries as i64);
        metrics
            .rank_index_bytes
            .with_label_values(&["user_ids"])
            .set(stats.user_id_bytes as i64);
        metrics
            .rank_index_bytes
            .with_label_values(&["index"])
            .set((stats.bytes - stats.user_id_bytes) as i64);
        let counts = &self.counts;
        for (counter, value) in [
            (&metrics.rank_index_warm_ups, &counts.warm_ups),
            (&metrics.rank_index_evictions, &counts.evictions),
        ] {
            crate::ops::metrics::raise_to(counter, value.load(Ordering::Relaxed));
        }
        for (source, value) in [
            ("index", &counts.from_index),
            ("sql", &counts.from_sql),
            ("batch", &counts.batches),
        ] {
            crate::ops::metrics::raise_to(
                &metrics.rank_index_reads.with_label_values(&[source]),
                value.load(Ordering::Relaxed),
            );
        }
    }
}
