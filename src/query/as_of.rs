//! Leaderboards as they stood at a past instant: folded on demand from the
//! test's submissions made up to it ([`ReadStore::submitted_between`], one
//! index range of the attempts read model) by the leaderboard's own rules
//! ([`board_of`]), and kept in a cache bounded in bytes.
//!
//! For settled instants the cache also keeps each test's submissions, in
//! log order, up to the settled horizon: a board as of any instant before
//! it is then a fold of a prefix in memory, with no query at all, and the
//! list is extended (one index range) as the horizon moves on.
//!
//! A board is kept only once its instant is *settled*: the attempts read
//! model is known to hold every submission made up to it. Then it never
//! changes, and cursor walks over it are stable. The proof is a mark of the
//! log taken at some time `T` ([`ReadStore::log_mark`]) that the attempts
//! projection has reached: every submission committed before `T` is then
//! recorded, and one made at or before `T - SLACK` has committed before
//! `T`. Marks are taken from the start, every [`MARK_EVERY`] (in the
//! background, and as requests need them), and reached in the order taken,
//! so the horizon moves on steadily even while the projection lags (a
//! backlog, a NATS outage, a replica behind): a lag only delays caching; it
//! never gets an incomplete board kept. Instants less than [`SETTLED`] old
//! are never kept.

use std::collections::VecDeque;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use podium_projections::attempts;
use podium_projections::ranking::{board_of, board_of_ordered, Entry, Submission};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::ops::db::StoreError;
use crate::query::store::{LogMark, ReadStore};

/// How long ago an instant must be, at least, for its board to be kept.
pub const SETTLED: chrono::Duration = chrono::Duration::seconds(60);

/// How long a submission may take from reading its time to committing.
const SLACK: chrono::Duration = chrono::Duration::seconds(10);

/// How often a mark of the log is taken.
const MARK_EVERY: chrono::Duration = chrono::Duration::seconds(2);

/// Most marks waiting to be reached (the oldest are reached first).
const MAX_MARKS: usize = 32;

/// Bytes an entry weighs in the cache, beyond its user id: the entry's own
/// fields and the vector's slot.
const ENTRY_BYTES: usize = std::mem::size_of::<Entry>();

/// Bytes a kept submission weighs, beyond its user id.
const SUBMISSION_BYTES: usize = std::mem::size_of::<Submission>();

/// Boards as of past instants, by test and instant, and the submissions
/// they are folded from, by test.
pub struct AsOfBoards {
    cache: moka::future::Cache<Key, Kept>,
    horizon: Mutex<Horizon>,
    /// Held while a test's submissions are loaded or extended, so that
    /// requests arriving together load them once.
    loading: Mutex<()>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Board(Uuid, DateTime<Utc>),
    Submissions(Uuid),
}

#[derive(Clone)]
enum Kept {
    Board(Arc<Vec<Entry>>),
    Submissions(Arc<Settled>),
}

/// A test's submissions made at or before `until` (a settled instant), in
/// log order.
struct Settled {
    until: DateTime<Utc>,
    submissions: Vec<Submission>,
}

impl Kept {
    fn bytes(&self) -> usize {
        match self {
            Self::Board(board) => board
                .iter()
                .map(|entry| ENTRY_BYTES + entry.user_id.len())
                .sum(),
            Self::Submissions(settled) => settled
                .submissions
                .iter()
                .map(|submission| SUBMISSION_BYTES + submission.user_id.len())
                .sum(),
        }
    }
}

/// How far the attempts read model is known to be complete.
#[derive(Default)]
struct Horizon {
    /// Every submission made at or before this is recorded.
    settled: Option<DateTime<Utc>>,
    /// Marks taken at the times given, oldest first, not reached yet.
    pending: VecDeque<(DateTime<Utc>, LogMark)>,
}

impl AsOfBoards {
    /// A cache of at most `max_bytes` of boards.
    pub fn new(max_bytes: u64) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_, kept: &Kept| u32::try_from(kept.bytes()).unwrap_or(u32::MAX))
            .build();
        Self {
            cache,
            horizon: Mutex::new(Horizon::default()),
            loading: Mutex::new(()),
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
        let horizon = self.horizon.lock().await.settled;
        if horizon.is_some_and(|settled| settled >= at) {
            return Ok(true);
        }
        Ok(self
            .advance(store, now)
            .await?
            .is_some_and(|settled| settled >= at))
    }

    /// Takes a mark if the last is [`MARK_EVERY`] old, and moves the
    /// horizon past every mark the attempts projection has reached; the
    /// horizon then.
    async fn advance(
        &self,
        store: &dyn ReadStore,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let mut horizon = self.horizon.lock().await;
        let due = horizon
            .pending
            .back()
            .is_none_or(|(taken, _)| now - *taken >= MARK_EVERY);
        if due && horizon.pending.len() < MAX_MARKS {
            horizon.pending.push_back((now, store.log_mark().await?));
        }
        while let Some((taken, mark)) = horizon.pending.front_mut() {
            let taken = *taken;
            if !store.reached(attempts::NAME, mark).await? {
                break;
            }
            horizon.pending.pop_front();
            horizon.settled = Some(taken - SLACK);
        }
        Ok(horizon.settled)
    }

    /// Takes marks and moves the horizon on from the start, whether or
    /// not anyone asks for a board yet, until `stop`; `now` reads the
    /// application's clock.
    pub async fn keep_marking(
        self: Arc<Self>,
        store: Arc<dyn ReadStore>,
        now: impl Fn() -> DateTime<Utc> + Send + 'static,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let every = MARK_EVERY.to_std().expect("a positive period");
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = stop.cancelled() => return,
            }
            if let Err(err) = self.advance(store.as_ref(), now()).await {
                tracing::debug!(%err, "cannot mark the log for as_of boards yet");
            }
        }
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
        let key = Key::Board(test_id, at);
        if let Some(Kept::Board(board)) = self.cache.get(&key).await {
            return Ok(board);
        }
        if !settled {
            return Ok(Arc::new(board_of(
                store.submitted_between(test_id, None, at).await?,
            )));
        }
        let settled = self.submissions(store, test_id, at).await?;
        let made = settled
            .submissions
            .partition_point(|submission| submission.submitted_at <= at);
        let board = Arc::new(board_of_ordered(&settled.submissions[..made]));
        self.cache.insert(key, Kept::Board(board.clone())).await;
        Ok(board)
    }

    /// `test_id`'s submissions made in `[since, until]` (from the first
    /// without `since`), in log order: those up to the settled horizon from
    /// the kept list (a rank history reads every submission of a board),
    /// the rest from `store`.
    pub async fn submitted_between(
        &self,
        store: &dyn ReadStore,
        test_id: Uuid,
        since: Option<DateTime<Utc>>,
        until: DateTime<Utc>,
    ) -> Result<Vec<Submission>, StoreError> {
        let horizon = self.horizon.lock().await.settled;
        let Some(horizon) = horizon.filter(|h| since.is_none_or(|since| since <= *h)) else {
            let mut submissions = store.submitted_between(test_id, since, until).await?;
            Submission::in_log_order(&mut submissions);
            return Ok(submissions);
        };
        let kept = self.submissions(store, test_id, horizon.min(until)).await?;
        let listed = &kept.submissions;
        let from = since.map_or(0, |since| {
            listed.partition_point(|s| s.submitted_at < since)
        });
        let to = listed.partition_point(|s| s.submitted_at <= until);
        let mut submissions = listed[from..to].to_vec();
        if until > kept.until {
            submissions.extend(made_after(store, test_id, Some(kept.until), until).await?);
        }
        Ok(submissions)
    }

    /// `test_id`'s submissions up to the settled horizon, which is at or
    /// after `at`: kept, extended, or loaded.
    async fn submissions(
        &self,
        store: &dyn ReadStore,
        test_id: Uuid,
        at: DateTime<Utc>,
    ) -> Result<Arc<Settled>, StoreError> {
        let key = Key::Submissions(test_id);
        let _loading = self.loading.lock().await;
        let kept = match self.cache.get(&key).await {
            Some(Kept::Submissions(kept)) if kept.until >= at => return Ok(kept),
            Some(Kept::Submissions(kept)) => Some(kept),
            _ => None,
        };
        let horizon = self.horizon.lock().await.settled.unwrap_or(at).max(at);
        let more = made_after(store, test_id, kept.as_ref().map(|k| k.until), horizon).await?;
        let submissions = match kept {
            Some(kept) => [kept.submissions.as_slice(), &more].concat(),
            None => more,
        };
        let settled = Arc::new(Settled {
            until: horizon,
            submissions,
        });
        self.cache
            .insert(key, Kept::Submissions(settled.clone()))
            .await;
        Ok(settled)
    }
}

/// `test_id`'s submissions made after `after` (from the first without it)
/// up to `until`, in log order.
async fn made_after(
    store: &dyn ReadStore,
    test_id: Uuid,
    after: Option<DateTime<Utc>>,
    until: DateTime<Utc>,
) -> Result<Vec<Submission>, StoreError> {
    let mut made = store.submitted_between(test_id, after, until).await?;
    // The range includes its start: those made at `after` are had already.
    if let Some(after) = after {
        made.retain(|submission| submission.submitted_at > after);
    }
    Submission::in_log_order(&mut made);
    Ok(made)
}
