//! The leaderboard projection and its Postgres store.

use podium_domain::log::{Change, RecordedEvent};
use serde_json::json;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use std::collections::HashMap;
use std::sync::Arc;

use crate::board_index::BoardIndex;
use crate::checkpointed::{BoxError, ProjectionLogic};
use crate::ranking::{Entry, RankKey, Submission};
use crate::tables::Generation;
use crate::windows;

mod queries;
pub use queries::{Around, LeaderboardQueries, Page, PageStart, RankedEntry, MAX_JUMPED};

pub const NAME: &str = "leaderboard";
pub const TABLES: [&str; 2] = ["lb_entries", "lb_score_counts"];
/// The topic of leaderboard change notifications (key: the test id).
pub const TOPIC: &str = "leaderboard";

/// Keeps `lb_entries` and `lb_score_counts` from `AttemptSubmitted` events.
pub struct LeaderboardProjection {
    generation: Generation,
    entries: String,
    counts: String,
    /// Where a live batch ranks in memory, when it can.
    boards: Option<Arc<dyn LiveBoards>>,
}

impl LeaderboardProjection {
    pub fn new(generation: Generation) -> Self {
        Self {
            generation,
            entries: generation.table("lb_entries"),
            counts: generation.table("lb_score_counts"),
            boards: None,
        }
    }

    /// Ranks the changes a live batch announces on `boards` wherever one
    /// holds exactly what the batch's transaction sees (SQL elsewhere).
    pub fn ranking_with(mut self, boards: Option<Arc<dyn LiveBoards>>) -> Self {
        self.boards = boards;
        self
    }
}

/// Leaderboards held in memory (an instance's rank index), which a live
/// batch ranks with when one holds exactly what its transaction sees: the
/// board's last change is the read model's.
pub trait LiveBoards: Send + Sync {
    /// The seq of the last change `test_id`'s board holds, if it is warm (a
    /// cold board starts warming).
    fn last_change(&self, test_id: Uuid) -> Option<u64>;

    /// Brings the board forward: `changed` holds every entry changed after
    /// some seq at or before the board's last change, each with the seq of
    /// its change, as the read model stood at checkpoint `checkpoint`.
    fn advance(&self, test_id: Uuid, changed: &[(u64, Entry)], checkpoint: u64);

    /// Runs `rank` on the board if its last change is `last_change`;
    /// false (and `rank` not run) otherwise.
    fn rank_with(&self, test_id: Uuid, last_change: u64, rank: &mut dyn FnMut(&BoardIndex))
        -> bool;
}

/// Most changed entries a batch pulls into a board that is behind.
const PULL_LIMIT: i64 = 10_000;

/// Ranks of the entries a live batch changes, by (test, user): before the
/// batch (if the user had an entry) and after it.
type BatchRanks = HashMap<(Uuid, String), (Option<u64>, u64)>;

/// Most entries of one test a batch announces one by one, with their ranks;
/// beyond that (a backlog being worked off) it announces one `resync` for the
/// test, and its clients reload, rather than ranking every entry.
pub const ANNOUNCE_LIMIT: usize = 100;

/// The change a batch that moved too many entries of a test announces: the
/// test's streams tell their clients to reload.
pub fn resync_change(test_id: Uuid, seq: u64) -> Change {
    Change {
        topic: TOPIC.into(),
        key: test_id.to_string(),
        seq,
        data: json!({"resync": true}),
        prev: None,
    }
}

/// Whether `change` asks the test's clients to reload.
pub fn is_resync(change: &Change) -> bool {
    change.data.get("resync") == Some(&serde_json::Value::Bool(true))
}

/// The change a recorded submission announces: the entry's new rank.
pub fn entry_change(
    test_id: Uuid,
    seq: u64,
    entry: &Entry,
    rank: u64,
    previous_rank: Option<u64>,
) -> Change {
    Change {
        topic: TOPIC.into(),
        key: test_id.to_string(),
        seq,
        data: json!({
            "user_id": entry.user_id,
            "score": entry.best_score,
            "rank": rank,
            "previous_rank": previous_rank,
            "attempts": entry.attempts,
        }),
        prev: None,
    }
}

impl LeaderboardProjection {
    /// Records a batch of submissions: the entries of everyone in it are
    /// read once, the rules run in memory, and entries, score counts and
    /// moves are written back in a few set-wise statements. A live batch
    /// announces, for each entry it changed, the entry's rank after the
    /// batch and before it (two set-wise rank queries in all).
    async fn record_batch(
        &self,
        conn: &mut PgConnection,
        submissions: &[(u64, Submission)],
        checkpoint: u64,
    ) -> Result<Vec<Change>, sqlx::Error> {
        let live = self.generation == Generation::Live;
        let mut keys: Vec<(Uuid, String)> = submissions
            .iter()
            .map(|(_, s)| (s.test_id, s.user_id.clone()))
            .collect();
        keys.sort();
        keys.dedup();
        let (tests, users): (Vec<Uuid>, Vec<String>) = keys.into_iter().unzip();
        let rows = sqlx::query(&format!(
            "SELECT e.test_id, e.user_id, e.best_score, e.max_score, e.attempt_id, e.achieved_at,
                    e.attempts, e.changed_seq
               FROM {} e JOIN UNNEST($1::uuid[], $2::text[]) k(test_id, user_id)
                 ON e.test_id = k.test_id AND e.user_id = k.user_id",
            self.entries
        ))
        .bind(&tests)
        .bind(&users)
        .fetch_all(&mut *conn)
        .await?;
        // Each entry with the seq of its last change.
        let mut entries: HashMap<(Uuid, String), (Entry, u64)> = HashMap::new();
        for row in &rows {
            let test: Uuid = row.try_get("test_id")?;
            let entry = entry_from_row(row)?;
            let changed: i64 = row.try_get("changed_seq")?;
            entries.insert((test, entry.user_id.clone()), (entry, changed as u64));
        }
        let before: HashMap<(Uuid, String), RankKey> = if live {
            entries
                .iter()
                .map(|(key, (entry, _))| (key.clone(), entry.rank_key()))
                .collect()
        } else {
            HashMap::new()
        };
        let mut deltas: HashMap<(Uuid, u32), i32> = HashMap::new();
        let mut moves: Vec<(u64, Uuid, Entry)> = Vec::new();
        for (seq, submission) in submissions {
            let key = (submission.test_id, submission.user_id.clone());
            let previous = entries.get(&key).map(|(entry, _)| entry);
            let entry = Entry::record(previous, submission);
            count_move(&mut deltas, previous, &entry, submission);
            if let Some(previous) = previous.filter(|p| live && p.rank_key() != entry.rank_key()) {
                moves.push((*seq, submission.test_id, previous.clone()));
            }
            entries.insert(key, (entry, *seq));
        }
        // Tests with more changed entries than are announced one by one.
        let mut per_test: HashMap<Uuid, (usize, u64)> = HashMap::new();
        for ((test, _), (_, seq)) in &entries {
            let (count, last) = per_test.entry(*test).or_default();
            *count += 1;
            *last = (*last).max(*seq);
        }
        let crowded: HashMap<Uuid, u64> = per_test
            .into_iter()
            .filter(|(_, (count, _))| *count > ANNOUNCE_LIMIT)
            .map(|(test, (_, last))| (test, last))
            .collect();
        // Tests ranked in memory, then the rest in SQL.
        let in_memory = match (&self.boards, live) {
            (Some(boards), true) => {
                rank_in_memory(
                    conn,
                    boards.as_ref(),
                    &entries,
                    &before,
                    &crowded,
                    checkpoint,
                )
                .await?
            }
            _ => BatchRanks::new(),
        };
        let ranked_in_memory =
            |test: &Uuid, user: &String| in_memory.contains_key(&(*test, user.clone()));
        let previous_ranks = if live {
            let keys: Vec<(Uuid, RankKey)> = before
                .iter()
                .filter(|((test, user), _)| {
                    !crowded.contains_key(test) && !ranked_in_memory(test, user)
                })
                .map(|((test, _), key)| (*test, key.clone()))
                .collect();
            let ranks = ranks_of(&mut *conn, &self.entries, &self.counts, &keys).await?;
            keys.into_iter()
                .map(|(test, key)| (test, key.user_id))
                .zip(ranks)
                .collect()
        } else {
            HashMap::new()
        };
        let touched: Vec<(&(Uuid, String), &Entry)> = entries
            .iter()
            .map(|(key, (entry, _))| (key, entry))
            .collect();
        let changed: Vec<i64> = entries.values().map(|(_, seq)| *seq as i64).collect();
        sqlx::query(&format!(
            "INSERT INTO {} (test_id, user_id, best_score, max_score, attempt_id, achieved_at,
                             attempts, changed_seq)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::int[], $4::int[], $5::uuid[],
                                  $6::timestamptz[], $7::int[], $8::bigint[])
             ON CONFLICT (test_id, user_id) DO UPDATE
                SET best_score = EXCLUDED.best_score, max_score = EXCLUDED.max_score,
                    attempt_id = EXCLUDED.attempt_id, achieved_at = EXCLUDED.achieved_at,
                    attempts = EXCLUDED.attempts, changed_seq = EXCLUDED.changed_seq",
            self.entries
        ))
        .bind(touched.iter().map(|(k, _)| k.0).collect::<Vec<_>>())
        .bind(touched.iter().map(|(k, _)| k.1.clone()).collect::<Vec<_>>())
        .bind(
            touched
                .iter()
                .map(|(_, e)| e.best_score as i32)
                .collect::<Vec<_>>(),
        )
        .bind(
            touched
                .iter()
                .map(|(_, e)| e.max_score as i32)
                .collect::<Vec<_>>(),
        )
        .bind(
            touched
                .iter()
                .map(|(_, e)| e.attempt_id)
                .collect::<Vec<_>>(),
        )
        .bind(
            touched
                .iter()
                .map(|(_, e)| e.achieved_at)
                .collect::<Vec<_>>(),
        )
        .bind(
            touched
                .iter()
                .map(|(_, e)| e.attempts as i32)
                .collect::<Vec<_>>(),
        )
        .bind(&changed)
        .execute(&mut *conn)
        .await?;
        self.apply_count_deltas(conn, deltas).await?;
        if !live {
            return Ok(Vec::new());
        }
        record_moves(&mut *conn, &moves).await?;
        // Every entry read was touched by the batch: in the order of its
        // last change.
        let mut after: Vec<(u64, Uuid, &Entry)> = entries
            .iter()
            .filter(|((test, _), _)| !crowded.contains_key(test))
            .map(|((test, _), (entry, seq))| (*seq, *test, entry))
            .collect();
        after.sort_by_key(|(seq, _, _)| *seq);
        let keys: Vec<(Uuid, RankKey)> = after
            .iter()
            .filter(|(_, test, entry)| !ranked_in_memory(test, &entry.user_id))
            .map(|(_, test, entry)| (*test, entry.rank_key()))
            .collect();
        let mut ranks = ranks_of(&mut *conn, &self.entries, &self.counts, &keys)
            .await?
            .into_iter();
        let mut changes: Vec<Change> = after
            .into_iter()
            .map(|(seq, test, entry)| {
                let key = (test, entry.user_id.clone());
                let (previous, rank) = match in_memory.get(&key) {
                    Some(ranked) => *ranked,
                    None => (
                        previous_ranks.get(&key).copied(),
                        ranks.next().expect("a rank for each entry ranked in SQL"),
                    ),
                };
                entry_change(test, seq, entry, rank, previous)
            })
            .chain(
                crowded
                    .into_iter()
                    .map(|(test, seq)| resync_change(test, seq)),
            )
            .collect();
        changes.sort_by_key(|change| change.seq);
        Ok(changes)
    }

    /// Adds `deltas` ((test, score) → change in entries) to the score table:
    /// gains by upsert, losses by update (an upsert would check the
    /// constraint `entries >= 0` on the negative delta itself).
    async fn apply_count_deltas(
        &self,
        conn: &mut PgConnection,
        deltas: HashMap<(Uuid, u32), i32>,
    ) -> Result<(), sqlx::Error> {
        let (gains, losses): (Vec<_>, Vec<_>) = deltas
            .into_iter()
            .filter(|(_, d)| *d != 0)
            .partition(|(_, d)| *d > 0);
        for (changes, statement) in [
            (
                gains,
                format!(
                    "INSERT INTO {c} (test_id, score, entries)
                     SELECT * FROM UNNEST($1::uuid[], $2::int[], $3::int[])
                     ON CONFLICT (test_id, score) DO UPDATE SET entries = {c}.entries + EXCLUDED.entries",
                    c = self.counts
                ),
            ),
            (
                losses,
                format!(
                    "UPDATE {c} SET entries = {c}.entries + d.delta
                       FROM UNNEST($1::uuid[], $2::int[], $3::int[]) d(test_id, score, delta)
                      WHERE {c}.test_id = d.test_id AND {c}.score = d.score",
                    c = self.counts
                ),
            ),
        ] {
            if changes.is_empty() {
                continue;
            }
            sqlx::query(&statement)
                .bind(changes.iter().map(|((t, _), _)| *t).collect::<Vec<_>>())
                .bind(changes.iter().map(|((_, s), _)| *s as i32).collect::<Vec<_>>())
                .bind(changes.iter().map(|(_, d)| *d).collect::<Vec<_>>())
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }
}

/// Records in `deltas` how `submission` moved its user between scores.
fn count_move(
    deltas: &mut HashMap<(Uuid, u32), i32>,
    previous: Option<&Entry>,
    entry: &Entry,
    submission: &Submission,
) {
    if Entry::improved_by(previous, submission) {
        if let Some(previous) = previous {
            *deltas
                .entry((submission.test_id, previous.best_score))
                .or_default() -= 1;
        }
        *deltas
            .entry((submission.test_id, entry.best_score))
            .or_default() += 1;
    }
}

impl ProjectionLogic for LeaderboardProjection {
    fn name(&self) -> &str {
        match self.generation {
            Generation::Live => NAME,
            Generation::Next => "leaderboard__next",
        }
    }

    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<Vec<Change>, BoxError> {
        let mut submissions: Vec<(u64, Submission)> = Vec::new();
        for event in events {
            if let Some(submission) = Submission::of(event)? {
                submissions.extend(windows::boards_of(&submission).map(|s| (event.seq, s)));
            }
        }
        if submissions.is_empty() {
            return Ok(Vec::new());
        }
        let checkpoint = events[0].seq - 1;
        Ok(self.record_batch(conn, &submissions, checkpoint).await?)
    }
}

/// Ranks the changed `entries` (each user's entry after the batch, by test
/// and user; `before`: the keys of those who had one) of every uncrowded
/// test whose board `boards` holds exactly as the transaction sees it,
/// bringing a board that is a few changes behind forward first. Before the
/// batch, a key's rank is its board's; after it, the board's minus the
/// batch's old keys ahead of it plus its new keys ahead of it. Checked
/// before the batch writes anything (`checkpoint`: the seq before it).
async fn rank_in_memory(
    conn: &mut PgConnection,
    boards: &dyn LiveBoards,
    entries: &HashMap<(Uuid, String), (Entry, u64)>,
    before: &HashMap<(Uuid, String), RankKey>,
    crowded: &HashMap<Uuid, u64>,
    checkpoint: u64,
) -> Result<BatchRanks, sqlx::Error> {
    let mut tests: Vec<Uuid> = entries
        .keys()
        .map(|(test, _)| *test)
        .filter(|test| !crowded.contains_key(test))
        .collect();
    tests.sort();
    tests.dedup();
    let held: Vec<(Uuid, u64)> = tests
        .into_iter()
        .filter_map(|test| boards.last_change(test).map(|last| (test, last)))
        .collect();
    let mut ranked = BatchRanks::new();
    if held.is_empty() {
        return Ok(ranked);
    }
    let tests: Vec<Uuid> = held.iter().map(|(test, _)| *test).collect();
    let current = LeaderboardQueries::last_changes(&mut *conn, &tests).await?;
    for (test, held) in held {
        let now = current.get(&test).copied().unwrap_or(0);
        if held < now {
            match LeaderboardQueries::changed_after(conn, test, held, PULL_LIMIT).await? {
                Some(changed) => boards.advance(test, &changed, checkpoint),
                None => continue,
            }
        }
        let mut old: Vec<&RankKey> = before
            .iter()
            .filter(|((t, _), _)| *t == test)
            .map(|(_, key)| key)
            .collect();
        old.sort();
        let changed: Vec<(&String, RankKey)> = entries
            .iter()
            .filter(|((t, _), _)| *t == test)
            .map(|((_, user), (entry, _))| (user, entry.rank_key()))
            .collect();
        let mut new: Vec<&RankKey> = changed.iter().map(|(_, key)| key).collect();
        new.sort();
        let mut test_ranks = Vec::with_capacity(changed.len());
        let ranked_all = boards.rank_with(test, now, &mut |board| {
            test_ranks.clear();
            for (user, key) in &changed {
                let previous = before
                    .get(&(test, (*user).clone()))
                    .map(|old_key| board.rank_of_key(old_key));
                let old_ahead = old.partition_point(|k| *k < key) as u64;
                let new_ahead = new.partition_point(|k| *k < key) as u64;
                // The board holds every old key, so at least `old_ahead` rank ahead.
                let rank = (board.rank_of_key(key) + new_ahead).saturating_sub(old_ahead);
                test_ranks.push(((test, (*user).clone()), (previous, rank)));
            }
        });
        if ranked_all {
            ranked.extend(test_ranks);
        }
    }
    Ok(ranked)
}

/// Notes where each moved entry stood before the submission (its seq) that
/// moved it.
async fn record_moves(
    conn: &mut PgConnection,
    moves: &[(u64, Uuid, Entry)],
) -> Result<(), sqlx::Error> {
    if moves.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO lb_moves (seq, test_id, user_id, old_score, old_achieved_at)
         SELECT * FROM UNNEST($1::bigint[], $2::uuid[], $3::text[], $4::int[], $5::timestamptz[])
         ON CONFLICT (test_id, seq) DO NOTHING",
    )
    .bind(
        moves
            .iter()
            .map(|(seq, _, _)| *seq as i64)
            .collect::<Vec<_>>(),
    )
    .bind(moves.iter().map(|(_, test, _)| *test).collect::<Vec<_>>())
    .bind(
        moves
            .iter()
            .map(|(_, _, e)| e.user_id.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        moves
            .iter()
            .map(|(_, _, e)| e.best_score as i32)
            .collect::<Vec<_>>(),
    )
    .bind(
        moves
            .iter()
            .map(|(_, _, e)| e.achieved_at)
            .collect::<Vec<_>>(),
    )
    .execute(conn)
    .await?;
    Ok(())
}

pub(crate) fn entry_from_row(row: &sqlx::postgres::PgRow) -> Result<Entry, sqlx::Error> {
    Ok(Entry {
        user_id: row.try_get("user_id")?,
        best_score: row.try_get::<i32, _>("best_score")? as u32,
        max_score: row.try_get::<i32, _>("max_score")? as u32,
        attempt_id: row.try_get("attempt_id")?,
        achieved_at: row.try_get("achieved_at")?,
        attempts: row.try_get::<i32, _>("attempts")? as u32,
    })
}

/// The 1-based rank `key` has (or would have) on test `test_id`: the entries
/// with a higher score, counted from the score table, plus the entries with
/// the same score that rank ahead, from a short index range.
pub(crate) async fn rank_in(
    conn: &mut PgConnection,
    entries: &str,
    counts: &str,
    test_id: Uuid,
    key: &RankKey,
) -> Result<u64, sqlx::Error> {
    let ranks = ranks_of(conn, entries, counts, &[(test_id, key.clone())]).await?;
    Ok(ranks[0])
}

/// [`rank_in`] for many keys in one statement, in the order given.
pub(crate) async fn ranks_of(
    conn: &mut PgConnection,
    entries: &str,
    counts: &str,
    keys: &[(Uuid, RankKey)],
) -> Result<Vec<u64>, sqlx::Error> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let ahead: Vec<i64> = sqlx::query_scalar(&format!(
        "SELECT (SELECT COALESCE(sum(c.entries), 0) FROM {counts} c
                  WHERE c.test_id = k.test_id AND c.score > k.score)::bigint
              + (SELECT count(*) FROM {entries} e
                  WHERE e.test_id = k.test_id AND -e.best_score = -k.score
                    AND (e.achieved_at, e.user_id) < (k.achieved_at, k.user_id))
           FROM UNNEST($1::uuid[], $2::int[], $3::timestamptz[], $4::text[])
                WITH ORDINALITY k(test_id, score, achieved_at, user_id, i)
          ORDER BY k.i"
    ))
    .bind(keys.iter().map(|(test, _)| *test).collect::<Vec<_>>())
    .bind(keys.iter().map(|(_, k)| k.score as i32).collect::<Vec<_>>())
    .bind(keys.iter().map(|(_, k)| k.achieved_at).collect::<Vec<_>>())
    .bind(
        keys.iter()
            .map(|(_, k)| k.user_id.clone())
            .collect::<Vec<_>>(),
    )
    .fetch_all(conn)
    .await?;
    Ok(ahead.into_iter().map(|a| a as u64 + 1).collect())
}

/// The leaderboard folded in memory for a rebuild: each (test, user)'s entry
/// by the same rules as [`LeaderboardProjection`], with the seq of the last
/// submission that touched it; written with COPY, score counts included.
/// A rebuild records no moves (as the set-wise path records none).
#[derive(Default)]
pub struct LeaderboardFold {
    entries: HashMap<(Uuid, String), (Entry, u64)>,
}

impl crate::fold::Fold for LeaderboardFold {
    fn add(&mut self, events: &[RecordedEvent]) -> Result<(), BoxError> {
        for event in events {
            let Some(submission) = Submission::of(event)? else {
                continue;
            };
            for submission in windows::boards_of(&submission) {
                let key = (submission.test_id, submission.user_id.clone());
                let previous = self.entries.get(&key).map(|(entry, _)| entry);
                let entry = Entry::record(previous, &submission);
                self.entries.insert(key, (entry, event.seq));
            }
        }
        Ok(())
    }

    fn write<'c>(
        self: Box<Self>,
        conn: &'c mut PgConnection,
    ) -> futures::future::BoxFuture<'c, Result<(), sqlx::Error>> {
        Box::pin(async move {
            use crate::fold::{copy_time, CopyWriter};
            let next = Generation::Next;
            let mut counts: HashMap<(Uuid, u32), i64> = HashMap::new();
            let mut rows = CopyWriter::start(
                conn,
                &format!(
                    "COPY {} (test_id, user_id, best_score, max_score, attempt_id, achieved_at,
                              attempts, changed_seq) FROM STDIN",
                    next.table("lb_entries")
                ),
            )
            .await?;
            // In key order: the copy's primary key then grows at its right
            // edge instead of splitting pages all over.
            let mut entries: Vec<_> = self.entries.into_iter().collect();
            entries.sort_unstable_by(|(a, _), (b, _)| a.cmp(b));
            for ((test, _), (entry, seq)) in entries {
                *counts.entry((test, entry.best_score)).or_default() += 1;
                rows.field(test)
                    .field(&entry.user_id)
                    .field(entry.best_score)
                    .field(entry.max_score)
                    .field(entry.attempt_id)
                    .field(copy_time(entry.achieved_at))
                    .field(entry.attempts)
                    .field(seq);
                rows.end_row().await?;
            }
            rows.finish().await?;
            let mut rows = CopyWriter::start(
                conn,
                &format!(
                    "COPY {} (test_id, score, entries) FROM STDIN",
                    next.table("lb_score_counts")
                ),
            )
            .await?;
            for ((test, score), entries) in counts {
                rows.field(test).field(score).field(entries);
                rows.end_row().await?;
            }
            rows.finish().await?;
            Ok(())
        })
    }
}
