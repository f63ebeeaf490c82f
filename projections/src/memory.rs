//! In-memory read models for the embedded mode: the leaderboards, feeds,
//! attempt lists and test catalog of the Postgres stores, kept by the same
//! rules ([`crate::ranking`]) from the same events, announcing the same
//! changes. One lock guards them all, so a read sees every model and the
//! checkpoint at one point of the log, as a Postgres snapshot does.
//!
//! The conformance suite (`tests/conformance`) runs one set of behaviour
//! tests against these and the Postgres stores.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{OnceLock, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use podium_domain::attempt::AttemptEvent;
use podium_domain::collection::CollectionEvent;
use podium_domain::log::{Change, PodiumEvent, RecordedEvent};
use podium_domain::notification::{InboxEvent, NotificationEvent};
use podium_domain::test::TestEvent;
use uuid::Uuid;

use crate::attempts::AttemptSummary;
use crate::catalog::{CollectionSummary, TestSummary};
use crate::checkpointed::BoxError;
use crate::collections::{self, Collections};
use crate::feed::{self, FeedChange, FeedItem};
use crate::leaderboard::{self, Around, Page, PageStart, RankedEntry};
use crate::ranked_set::RankedSet;
use crate::ranking::{Entry, RankKey, Submission};

/// Every read model, in memory.
#[derive(Default)]
pub struct MemoryModels {
    inner: RwLock<Models>,
    /// The seq of the last event in the log these models follow, when told
    /// how to read it ([`MemoryModels::follow_head`]).
    head: OnceLock<Box<dyn Fn() -> u64 + Send + Sync>>,
}

#[derive(Default)]
struct Models {
    /// The seq of the last event applied.
    checkpoint: u64,
    boards: HashMap<Uuid, Board>,
    feeds: HashMap<String, Feed>,
    attempts: HashMap<String, BTreeMap<AttemptKey, AttemptSummary>>,
    /// Which user's list holds an attempt, and under which key.
    attempt_owners: HashMap<Uuid, (String, AttemptKey)>,
    tests: HashMap<Uuid, TestSummary>,
    /// Which tests each collection holds, for its boards.
    collections: Collections,
    /// The collections as the catalog lists them.
    collection_list: HashMap<Uuid, CollectionSummary>,
    /// Moves at or below this seq are forgotten (see [`MemoryModels::prune_moves`]).
    moves_horizon: u64,
}

/// Newest first: later start, then larger id.
type AttemptKey = (std::cmp::Reverse<DateTime<Utc>>, std::cmp::Reverse<Uuid>);

#[derive(Default)]
struct Board {
    entries: HashMap<String, (Entry, u64)>,
    /// Rank order, with positions: a rank is O(log n), not a walk.
    order: RankedSet<RankKey>,
    /// (seq, user, where the user stood before, when): for cursor walks.
    moves: Vec<(u64, String, RankKey, Instant)>,
}

impl Board {
    /// 1-based rank of `key`, which is on the board.
    fn rank(&self, key: &RankKey) -> u64 {
        self.order.position(key) as u64 + 1
    }

    fn ranked(&self, key: &RankKey) -> RankedEntry {
        RankedEntry {
            rank: self.rank(key),
            entry: self.entries[&key.user_id].0.clone(),
        }
    }

    /// Up to `limit` entries after `key` (from the top with `None`), ranked
    /// from `first_rank`.
    fn after(&self, key: Option<&RankKey>, limit: usize) -> Vec<RankedEntry> {
        // A cursor's key may have left the board since (its user moved up).
        let start = key.map_or(0, |key| {
            self.order.position(key) + usize::from(self.order.contains(key))
        });
        self.entries_from(start, limit)
    }

    /// Up to `limit` entries from 0-based position `start`, ranked.
    fn entries_from(&self, start: usize, limit: usize) -> Vec<RankedEntry> {
        self.order
            .iter_from(start)
            .take(limit)
            .enumerate()
            .map(|(i, k)| RankedEntry {
                rank: (start + i) as u64 + 1,
                entry: self.entries[&k.user_id].0.clone(),
            })
            .collect()
    }
}

#[derive(Default)]
struct Feed {
    /// By feed seq (the seq that created the item).
    items: BTreeMap<u64, (FeedItem, u64)>,
    /// The feed seq of each item, by notification id.
    by_id: HashMap<Uuid, u64>,
    unread: u64,
}

impl MemoryModels {
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Models> {
        self.inner
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The seq of the last event applied (0 before any).
    pub fn checkpoint(&self) -> u64 {
        self.read().checkpoint
    }

    /// Tells the models where the head of their log is, so that they can
    /// tell when they hold all of it.
    pub fn follow_head(&self, head: impl Fn() -> u64 + Send + Sync + 'static) {
        let _ = self.head.set(Box::new(head));
    }

    /// The seq of the log's last event, when the models know how to read it.
    pub fn head(&self) -> Option<u64> {
        self.head.get().map(|head| head())
    }

    /// Whether `user_id` has nothing unread as of now: every event of the
    /// log is applied and none of the user's items is unread (false when
    /// the head is unknown).
    pub fn all_read(&self, user_id: &str) -> bool {
        let Some(head) = self.head.get() else {
            return false;
        };
        let (checkpoint, unread) = self.unread(user_id);
        unread == 0 && checkpoint >= head()
    }

    /// Applies the next event of the log and returns the changes to
    /// announce. Events at or below the checkpoint are skipped; a gap is an
    /// error, as in the Postgres stores.
    pub fn apply(&self, event: &RecordedEvent) -> Result<Vec<Change>, BoxError> {
        let mut models = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if event.seq <= models.checkpoint {
            return Ok(Vec::new());
        }
        if event.seq != models.checkpoint + 1 {
            return Err(format!(
                "the read models are at seq {}; event seq {} would leave a gap",
                models.checkpoint, event.seq
            )
            .into());
        }
        let changes = models.apply(event)?;
        models.checkpoint = event.seq;
        Ok(changes)
    }

    /// Forgets leaderboard moves older than `retention`; cursors from before
    /// them answer `cursor-expired`.
    pub fn prune_moves(&self, retention: Duration) -> u64 {
        let mut models = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let Some(cutoff) = Instant::now().checked_sub(retention) else {
            return 0;
        };
        let mut pruned = 0;
        let mut horizon = models.moves_horizon;
        for board in models.boards.values_mut() {
            let old = board.moves.partition_point(|m| m.3 < cutoff);
            if let Some(last) = board.moves.get(old.wrapping_sub(1)) {
                horizon = horizon.max(last.0);
            }
            board.moves.drain(..old);
            pruned += old as u64;
        }
        models.moves_horizon = horizon;
        pruned
    }

    /// A page of `test_id`'s leaderboard and the checkpoint it reflects, or
    /// `Err(horizon)` when a cursor is older than the moves kept.
    pub fn leaderboard_page(
        &self,
        test_id: Uuid,
        start: &PageStart,
        limit: i64,
    ) -> (u64, Result<Page, u64>) {
        let models = self.read();
        let seq = models.checkpoint;
        let limit = limit.max(1) as usize;
        let Some(board) = models.boards.get(&test_id) else {
            let empty = Page {
                total: 0,
                entries: Vec::new(),
                more: false,
            };
            return match start {
                PageStart::After { since, .. } if *since < models.moves_horizon => {
                    (seq, Err(models.moves_horizon))
                }
                _ => (seq, Ok(empty)),
            };
        };
        let total = board.order.len() as u64;
        let (mut entries, more) = match start {
            PageStart::Offset(offset) => {
                let start = usize::try_from(*offset).unwrap_or(usize::MAX);
                let mut entries = board.entries_from(start, limit + 1);
                let more = entries.len() > limit;
                entries.truncate(limit);
                (entries, more)
            }
            PageStart::After { key, since } => {
                if *since < models.moves_horizon {
                    return (seq, Err(models.moves_horizon));
                }
                // Where each user that moved since stood first, then: those
                // behind the cursor then and at or ahead of it now jumped it.
                let mut first_moves: HashMap<&str, &RankKey> = HashMap::new();
                for (_, user, old, _) in board.moves.iter().filter(|m| m.0 > *since) {
                    first_moves.entry(user.as_str()).or_insert(old);
                }
                let passed: Vec<&str> = first_moves
                    .into_iter()
                    .filter(|(user, old)| {
                        let now = board.entries[*user].0.rank_key();
                        *old > key && now <= *key
                    })
                    .map(|(user, _)| user)
                    .collect();
                // As in Postgres: more than a page's worth cannot be
                // continued exactly; the cursor is expired.
                if passed.len() as i64 > crate::leaderboard::MAX_JUMPED {
                    return (seq, Err(seq));
                }
                let mut jumped: Vec<RankedEntry> = passed
                    .into_iter()
                    .map(|user| board.ranked(&board.entries[user].0.rank_key()))
                    .collect();
                let room = limit.saturating_sub(jumped.len()).max(1);
                let mut rows = board.after(Some(key), room + 1);
                let more = rows.len() > room;
                rows.truncate(room);
                jumped.append(&mut rows);
                (jumped, more)
            }
        };
        entries.sort_by_key(|e| e.rank);
        (
            seq,
            Ok(Page {
                total,
                entries,
                more,
            }),
        )
    }

    /// `user_id`'s entry with up to `radius` neighbours on each side.
    pub fn around(&self, test_id: Uuid, user_id: &str, radius: i64) -> Around {
        let models = self.read();
        let mut around = Around {
            total: 0,
            checkpoint: models.checkpoint,
            entry: None,
            above: Vec::new(),
            below: Vec::new(),
        };
        let Some(board) = models.boards.get(&test_id) else {
            return around;
        };
        around.total = board.order.len() as u64;
        let Some((entry, _)) = board.entries.get(user_id) else {
            return around;
        };
        let key = entry.rank_key();
        let me = board.ranked(&key);
        let radius = radius.max(0) as usize;
        let position = (me.rank - 1) as usize;
        let first = position.saturating_sub(radius);
        let above = board.entries_from(first, position - first);
        around.below = board.after(Some(&key), radius);
        around.above = above;
        around.entry = Some(me);
        around
    }

    /// The entries of `test_id` changed after `after`, oldest change first,
    /// with the checkpoint; `None` when more than `limit` changed (they are
    /// not ranked then).
    pub fn leaderboard_changed_since(
        &self,
        test_id: Uuid,
        after: u64,
        limit: i64,
    ) -> (u64, Option<Vec<(u64, RankedEntry)>>) {
        let models = self.read();
        let Some(board) = models.boards.get(&test_id) else {
            return (models.checkpoint, Some(Vec::new()));
        };
        let mut changed: Vec<(u64, &Entry)> = board
            .entries
            .values()
            .filter(|(_, seq)| *seq > after)
            .map(|(entry, seq)| (*seq, entry))
            .collect();
        if changed.len() > limit.max(0) as usize {
            return (models.checkpoint, None);
        }
        changed.sort_by_key(|(seq, _)| *seq);
        let changed = changed
            .into_iter()
            .map(|(seq, entry)| (seq, board.ranked(&entry.rank_key())))
            .collect();
        (models.checkpoint, Some(changed))
    }

    /// A page of `user_id`'s feed (as [`crate::feed::FeedQueries::page`]),
    /// with the unread count and the checkpoint.
    pub fn feed_page(
        &self,
        user_id: &str,
        before: Option<u64>,
        unread_only: bool,
        limit: i64,
    ) -> (u64, Vec<FeedItem>, bool, u64) {
        let models = self.read();
        let Some(feed) = models.feeds.get(user_id) else {
            return (models.checkpoint, Vec::new(), false, 0);
        };
        let limit = limit.max(0) as usize;
        let mut items: Vec<FeedItem> = feed
            .items
            .range(..before.unwrap_or(u64::MAX))
            .rev()
            .map(|(_, (item, _))| item)
            .filter(|item| !unread_only || item.read_at.is_none())
            .take(limit + 1)
            .cloned()
            .collect();
        let more = items.len() > limit;
        items.truncate(limit);
        (models.checkpoint, items, more, feed.unread)
    }

    /// `user_id`'s unread count and the checkpoint.
    pub fn unread(&self, user_id: &str) -> (u64, u64) {
        let models = self.read();
        let unread = models.feeds.get(user_id).map_or(0, |feed| feed.unread);
        (models.checkpoint, unread)
    }

    /// `user_id`'s items changed after `after` (oldest change first), the
    /// unread count and the checkpoint.
    pub fn feed_changed_since(
        &self,
        user_id: &str,
        after: u64,
        limit: i64,
    ) -> (u64, Vec<FeedChange>, u64) {
        let models = self.read();
        let Some(feed) = models.feeds.get(user_id) else {
            return (models.checkpoint, Vec::new(), 0);
        };
        let mut changed: Vec<FeedChange> = feed
            .items
            .values()
            .filter(|(_, changed)| *changed > after)
            .map(|(item, changed)| FeedChange {
                seq: *changed,
                item: item.clone(),
            })
            .collect();
        changed.sort_by_key(|c| (c.seq, c.item.feed_seq));
        changed.truncate(limit.max(0) as usize);
        (models.checkpoint, changed, feed.unread)
    }

    /// Up to `limit` of `user_id`'s attempts, newest first, after `after`.
    pub fn attempts_page(
        &self,
        user_id: &str,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: i64,
    ) -> (Vec<AttemptSummary>, bool) {
        let models = self.read();
        let Some(list) = models.attempts.get(user_id) else {
            return (Vec::new(), false);
        };
        let limit = limit.max(0) as usize;
        let start = after.map(|(at, id)| (std::cmp::Reverse(at), std::cmp::Reverse(id)));
        let range = match &start {
            Some(key) => list.range((Bound::Excluded(key), Bound::Unbounded)),
            None => list.range(..),
        };
        let mut items: Vec<AttemptSummary> =
            range.take(limit + 1).map(|(_, a)| a.clone()).collect();
        let more = items.len() > limit;
        items.truncate(limit);
        (items, more)
    }

    /// Every submission of `test_id` made at or before `until` (and at or
    /// after `since`, if given), in no order.
    pub fn submitted_between(
        &self,
        test_id: Uuid,
        since: Option<DateTime<Utc>>,
        until: DateTime<Utc>,
    ) -> Vec<Submission> {
        let models = self.read();
        models
            .attempts
            .values()
            .flat_map(|list| list.values())
            .filter(|a| a.test_id == test_id && a.status == "submitted")
            .filter_map(|a| {
                let submitted_at = a
                    .submitted_at
                    .filter(|at| *at <= until && since.is_none_or(|since| *at >= since))?;
                Some(Submission {
                    test_id,
                    user_id: a.user_id.clone(),
                    attempt_id: a.attempt_id,
                    score: a.score?,
                    max_score: a.max_score,
                    correct: a.correct.unwrap_or(0),
                    submitted_at,
                })
            })
            .collect()
    }

    /// Every collection, newest first.
    pub fn collections(&self) -> Vec<CollectionSummary> {
        let mut collections: Vec<CollectionSummary> =
            self.read().collection_list.values().cloned().collect();
        crate::catalog::newest_collections_first(&mut collections);
        collections
    }

    /// Every published test, newest first.
    pub fn tests(&self) -> Vec<TestSummary> {
        let models = self.read();
        let mut tests: Vec<TestSummary> = models.tests.values().cloned().collect();
        crate::catalog::newest_first(&mut tests);
        tests
    }
}

impl Models {
    fn apply(&mut self, event: &RecordedEvent) -> Result<Vec<Change>, BoxError> {
        let seq = event.seq;
        Ok(match event.decode()? {
            PodiumEvent::Test(TestEvent::TestPublished {
                test_id,
                definition,
            }) => {
                self.tests.insert(
                    test_id,
                    TestSummary::published(test_id, &definition, event.recorded_at),
                );
                Vec::new()
            }
            PodiumEvent::Test(TestEvent::TestArchived { test_id }) => {
                if let Some(test) = self.tests.get_mut(&test_id) {
                    test.archived = true;
                }
                Vec::new()
            }
            PodiumEvent::Attempt(AttemptEvent::AttemptStarted {
                attempt_id,
                test_id,
                user_id,
                started_at,
                max_score,
                ..
            }) => {
                let user = user_id.to_string();
                let key = (std::cmp::Reverse(started_at), std::cmp::Reverse(attempt_id));
                self.attempt_owners.insert(attempt_id, (user.clone(), key));
                self.attempts.entry(user.clone()).or_default().insert(
                    key,
                    AttemptSummary {
                        attempt_id,
                        test_id,
                        user_id: user,
                        status: "in_progress".into(),
                        started_at,
                        max_score,
                        score: None,
                        correct: None,
                        duration_ms: None,
                        submitted_at: None,
                    },
                );
                Vec::new()
            }
            PodiumEvent::Attempt(
                submitted @ AttemptEvent::AttemptSubmitted {
                    attempt_id,
                    score,
                    max_score,
                    correct,
                    duration_ms,
                    submitted_at,
                    ..
                },
            ) => {
                let summary = self
                    .attempt_owners
                    .get(&attempt_id)
                    .and_then(|(user, key)| self.attempts.get_mut(user)?.get_mut(key));
                if let Some(summary) = summary {
                    summary.status = "submitted".into();
                    summary.score = Some(score);
                    summary.max_score = max_score;
                    summary.correct = Some(correct);
                    summary.duration_ms = Some(duration_ms);
                    summary.submitted_at = Some(submitted_at);
                }
                let submission = Submission::from_event(&submitted).expect("a submission event");
                self.collections.note(&submission);
                let mut changes: Vec<Change> = crate::windows::boards_of(&submission)
                    .map(|on_board| self.record(&on_board, seq))
                    .collect();
                for board in self.collections.touched_by(&submission) {
                    changes.extend(self.compose(&board, &submission.user_id, seq));
                }
                changes
            }
            PodiumEvent::Collection(collection_event) => {
                let (collection, tests) = match collection_event {
                    CollectionEvent::CollectionCreated {
                        collection_id,
                        title,
                        test_ids,
                    } => {
                        self.collection_list
                            .entry(collection_id)
                            .or_insert_with(|| CollectionSummary {
                                id: collection_id,
                                title,
                                test_ids: test_ids.clone(),
                                created_at: event.recorded_at,
                            });
                        (collection_id, test_ids)
                    }
                    CollectionEvent::CollectionTestAdded {
                        collection_id,
                        test_id,
                    } => {
                        if let Some(listed) = self.collection_list.get_mut(&collection_id) {
                            if !listed.test_ids.contains(&test_id) {
                                listed.test_ids.push(test_id);
                            }
                        }
                        (collection_id, vec![test_id])
                    }
                };
                let mut added = false;
                for test in tests {
                    added |= self.collections.add(collection, test);
                }
                if !added {
                    return Ok(Vec::new());
                }
                // Everyone's history on the new tests counts at once.
                let mut changes = Vec::new();
                for board in self.collections.boards_of(collection) {
                    let mut users: Vec<String> = board
                        .components
                        .iter()
                        .filter_map(|c| self.boards.get(c))
                        .flat_map(|b| b.entries.keys().cloned())
                        .collect();
                    users.sort_unstable();
                    users.dedup();
                    for user in users {
                        changes.extend(self.compose(&board, &user, seq));
                    }
                }
                changes
            }
            PodiumEvent::Notification(NotificationEvent::NotificationCreated {
                notification_id,
                content,
                created_at,
            }) => {
                let user = content.recipient.to_string();
                let message = &content.message;
                let item = FeedItem::created(notification_id, message, created_at, seq);
                let feed = self.feeds.entry(user.clone()).or_default();
                if feed.by_id.contains_key(&notification_id) {
                    return Ok(Vec::new());
                }
                feed.unread += 1;
                let change = feed::created_change(&user, seq, &item, feed.unread);
                feed.by_id.insert(notification_id, seq);
                feed.items.insert(seq, (item, seq));
                vec![change]
            }
            PodiumEvent::Notification(NotificationEvent::NotificationRead {
                notification_id,
                recipient,
                read_at,
            }) => {
                let user = recipient.to_string();
                let Some(feed) = self.feeds.get_mut(&user) else {
                    return Ok(Vec::new());
                };
                let Some((item, changed)) = feed
                    .by_id
                    .get(&notification_id)
                    .and_then(|feed_seq| feed.items.get_mut(feed_seq))
                    .filter(|(item, _)| item.read_at.is_none())
                else {
                    return Ok(Vec::new());
                };
                item.read_at = Some(read_at);
                *changed = seq;
                feed.unread -= 1;
                vec![feed::read_change(
                    &user,
                    seq,
                    &[notification_id],
                    feed.unread,
                )]
            }
            PodiumEvent::Inbox(InboxEvent::AllNotificationsRead { user_id, read_at }) => {
                let user = user_id.to_string();
                let Some(feed) = self.feeds.get_mut(&user) else {
                    return Ok(Vec::new());
                };
                let mut ids = Vec::new();
                for (item, changed) in feed.items.range_mut(..seq).map(|(_, v)| v) {
                    if item.read_at.is_none() {
                        item.read_at = Some(read_at);
                        *changed = seq;
                        ids.push(item.id);
                    }
                }
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                feed.unread -= ids.len() as u64;
                vec![feed::read_change(&user, seq, &ids, feed.unread)]
            }
            _ => Vec::new(),
        })
    }

    fn record(&mut self, submission: &Submission, seq: u64) -> Change {
        let previous = self
            .boards
            .get(&submission.test_id)
            .and_then(|board| board.entries.get(&submission.user_id))
            .map(|(e, _)| e);
        let entry = Entry::record(previous, submission);
        self.put(submission.test_id, entry, seq)
    }

    /// Composes `user`'s entry on a collection's `board` from its
    /// components; the change, if it changed.
    fn compose(
        &mut self,
        board: &collections::CollectionBoard,
        user: &str,
        seq: u64,
    ) -> Option<Change> {
        let entry = collections::compose(
            board
                .components
                .iter()
                .filter_map(|c| Some(&self.boards.get(c)?.entries.get(user)?.0)),
        )?;
        let unchanged = self
            .boards
            .get(&board.id)
            .and_then(|b| b.entries.get(user))
            .is_some_and(|(previous, _)| *previous == entry);
        (!unchanged).then(|| self.put(board.id, entry, seq))
    }

    /// Puts `entry` on board `board_id` (the change at `seq`).
    fn put(&mut self, board_id: Uuid, entry: Entry, seq: u64) -> Change {
        let board = self.boards.entry(board_id).or_default();
        let previous = board.entries.get(&entry.user_id).map(|(e, _)| e.clone());
        let previous_rank = previous.as_ref().map(|p| board.rank(&p.rank_key()));
        if let Some(previous) = &previous {
            board.order.remove(&previous.rank_key());
            if previous.rank_key() != entry.rank_key() {
                board.moves.push((
                    seq,
                    entry.user_id.clone(),
                    previous.rank_key(),
                    Instant::now(),
                ));
            }
        }
        board.order.insert(entry.rank_key());
        let rank = board.rank(&entry.rank_key());
        let change = leaderboard::entry_change(board_id, seq, &entry, rank, previous_rank);
        board.entries.insert(entry.user_id.clone(), (entry, seq));
        change
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;
    use proptest::prelude::*;

    use super::*;
    use crate::ranking::Board as Reference;
    use crate::windows::Window;

    fn submitted(seq: u64, user: u8, score: u32, test_id: Uuid) -> (RecordedEvent, Submission) {
        let submission = Submission {
            test_id,
            user_id: format!("u{user}"),
            attempt_id: Uuid::from_u128(seq as u128),
            score,
            max_score: 10,
            correct: 0,
            submitted_at: DateTime::<Utc>::UNIX_EPOCH + TimeDelta::minutes(seq as i64),
        };
        let recorded = submission.recorded(seq);
        (recorded, submission)
    }

    /// Instants where periods end: day ends, Monday 00:00, month ends, a
    /// leap day, a year end.
    const BOUNDARIES: [&str; 6] = [
        "2026-12-07T00:00:00Z",
        "2028-02-28T00:00:00Z",
        "2028-02-29T00:00:00Z",
        "2028-03-01T00:00:00Z",
        "2027-01-01T00:00:00Z",
        "2026-11-30T12:00:00Z",
    ];
    /// Microseconds from a boundary: the day before, just before, on it,
    /// just after, an hour after.
    const OFFSETS: [i64; 5] = [-86_400_000_000, -1, 0, 1, 3_600_000_000];

    fn page_users(page: &Page) -> Vec<(u64, String)> {
        page.entries
            .iter()
            .map(|e| (e.rank, e.entry.user_id.clone()))
            .collect()
    }

    proptest! {
        /// Every announced rank, every page and every neighbourhood of the
        /// in-memory leaderboard is what the pure rules say.
        #[test]
        fn the_memory_leaderboard_follows_the_ranking_rules(
            raw in prop::collection::vec((0u8..12, 0u32..5), 1..80),
            limit in 1i64..6,
        ) {
            let test_id = Uuid::from_u128(7);
            let models = MemoryModels::new();
            let mut reference = Reference::default();
            for (i, (user, score)) in raw.iter().enumerate() {
                let (event, submission) = submitted(i as u64 + 1, *user, *score, test_id);
                let changes = models.apply(&event).unwrap();
                let (previous, rank) = reference.record(&submission);
                // One change per board: all time first, then day, week, month.
                prop_assert_eq!(changes.len(), 4);
                prop_assert_eq!(&changes[0].key, &test_id.to_string());
                prop_assert_eq!(&changes[0].data["rank"], &serde_json::json!(rank));
                prop_assert_eq!(&changes[0].data["previous_rank"], &serde_json::json!(previous));
            }
            let expected: Vec<(u64, String)> = reference
                .ranked()
                .into_iter()
                .enumerate()
                .map(|(i, e)| (i as u64 + 1, e.user_id))
                .collect();
            // Offset pages and a cursor walk both give the reference order.
            let (seq, top) = models.leaderboard_page(test_id, &PageStart::Offset(0), 1000);
            prop_assert_eq!(seq, raw.len() as u64);
            prop_assert_eq!(page_users(&top.unwrap()), expected.clone());
            let mut walked = Vec::new();
            let mut start = PageStart::Offset(0);
            loop {
                let page = models.leaderboard_page(test_id, &start, limit).1.unwrap();
                walked.extend(page_users(&page));
                let Some(last) = page.entries.last().filter(|_| page.more) else { break };
                start = PageStart::After { key: last.entry.rank_key(), since: seq };
            }
            prop_assert_eq!(walked, expected.clone());
            for (rank, user) in &expected {
                let around = models.around(test_id, user, 2);
                prop_assert_eq!(around.entry.map(|e| e.rank), Some(*rank));
                let above: Vec<u64> = around.above.iter().map(|e| e.rank).collect();
                let below: Vec<u64> = around.below.iter().map(|e| e.rank).collect();
                let want_above: Vec<u64> = (rank.saturating_sub(2).max(1)..*rank).collect();
                let want_below: Vec<u64> =
                    (rank + 1..=(rank + 2).min(expected.len() as u64)).collect();
                prop_assert_eq!(above, want_above);
                prop_assert_eq!(below, want_below);
            }
        }

        /// Each window's boards hold what the rules give over that period's
        /// submissions alone, for submissions on either side of day ends,
        /// Monday week starts, month ends and a leap day.
        #[test]
        fn window_boards_are_the_rules_over_each_periods_submissions(
            raw in prop::collection::vec(
                (0u8..8, 0u32..5, 0usize..BOUNDARIES.len(), 0usize..OFFSETS.len()),
                1..60,
            ),
        ) {
            let test_id = Uuid::from_u128(11);
            let models = MemoryModels::new();
            let mut submissions = Vec::new();
            for (i, (user, score, boundary, offset)) in raw.iter().enumerate() {
                let (_, mut submission) = submitted(i as u64 + 1, *user, *score, test_id);
                submission.submitted_at = crate::windows::parse_instant(BOUNDARIES[*boundary])
                    .unwrap()
                    + TimeDelta::microseconds(OFFSETS[*offset]);
                models.apply(&submission.recorded(i as u64 + 1)).unwrap();
                submissions.push(submission);
            }
            for window in [Window::All, Window::Day, Window::Week, Window::Month] {
                for submission in &submissions {
                    let period = window.period(submission.submitted_at);
                    let mut reference = Reference::default();
                    for s in &submissions {
                        if window.period(s.submitted_at) == period {
                            reference.record(s);
                        }
                    }
                    let expected: Vec<(u64, String, u32, u32)> = reference
                        .ranked()
                        .into_iter()
                        .enumerate()
                        .map(|(i, e)| (i as u64 + 1, e.user_id, e.best_score, e.attempts))
                        .collect();
                    let board = crate::windows::board_at(test_id, window, submission.submitted_at);
                    let page = models.leaderboard_page(board, &PageStart::Offset(0), 1000).1.unwrap();
                    let got: Vec<(u64, String, u32, u32)> = page
                        .entries
                        .into_iter()
                        .map(|e| (e.rank, e.entry.user_id, e.entry.best_score, e.entry.attempts))
                        .collect();
                    prop_assert_eq!(got, expected, "{:?} {:?}", window, period);
                }
            }
        }

        /// A cursor walk that started before a burst of improvements still
        /// returns every entry exactly once.
        #[test]
        fn a_cursor_walk_sees_every_entry_once_while_scores_change(
            before in prop::collection::vec((0u8..20, 0u32..4), 20..60),
            during in prop::collection::vec((0u8..20, 0u32..8), 1..40),
            limit in 1i64..5,
        ) {
            let test_id = Uuid::from_u128(9);
            let models = MemoryModels::new();
            let mut seq = 0;
            let mut apply = |user: u8, score: u32| {
                seq += 1;
                models.apply(&submitted(seq, user, score, test_id).0).unwrap();
            };
            for (user, score) in &before {
                apply(*user, *score);
            }
            let users_then: std::collections::BTreeSet<String> = models
                .leaderboard_page(test_id, &PageStart::Offset(0), 1000).1.unwrap()
                .entries.into_iter().map(|e| e.entry.user_id).collect();
            let (at, first) = models.leaderboard_page(test_id, &PageStart::Offset(0), limit);
            let mut page = first.unwrap();
            let mut walked: Vec<String> = page.entries.iter().map(|e| e.entry.user_id.clone()).collect();
            let mut since = at;
            let mut during = during.into_iter();
            while let Some(last) = page.entries.last().filter(|_| page.more) {
                let key = last.entry.rank_key();
                // Some submissions land between two pages.
                for (user, score) in during.by_ref().take(3) {
                    apply(user, score);
                }
                let (next_at, next) = models.leaderboard_page(
                    test_id, &PageStart::After { key, since }, limit);
                page = next.unwrap();
                since = next_at;
                walked.extend(page.entries.iter().map(|e| e.entry.user_id.clone()));
            }
            let mut seen = std::collections::BTreeSet::new();
            for user in &walked {
                prop_assert!(seen.insert(user.clone()), "{} twice in {:?}", user, walked);
            }
            for user in &users_then {
                prop_assert!(seen.contains(user), "{} missing from {:?}", user, walked);
            }
        }
    }
}
