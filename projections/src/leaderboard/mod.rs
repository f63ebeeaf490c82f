//! The leaderboard projection and its Postgres store.

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use podium_domain::collection::CollectionEvent;
use podium_domain::log::{Change, PodiumEvent, RecordedEvent};
use serde_json::json;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::board_index::BoardIndex;
use crate::checkpointed::{BoxError, ProjectionLogic};
use crate::collections::{self, CollectionBoard, Collections};
use crate::ranking::{Best, Entry, RankKey, Submission};
use crate::tables::Generation;
use crate::windows::{self, Window, PERIODIC};

mod queries;
use queries::ENTRY_COLUMNS;
pub use queries::{Around, LeaderboardQueries, Page, PageStart, RankedEntry, MAX_JUMPED};

pub const NAME: &str = "leaderboard";
pub const TABLES: [&str; 4] = [
    "lb_entries",
    "lb_score_counts",
    "lb_collection_tests",
    "lb_boards",
];
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

/// Entries by (board, user), each with the seq of its last change.
type Entries = HashMap<(Uuid, String), (Entry, u64)>;
/// One of [`Entries`].
type Keyed = ((Uuid, String), (Entry, u64));

impl LeaderboardProjection {
    /// Records a batch of submissions (on their tests): the entries of
    /// everyone in it on the boards it counts on (its test's four, and those
    /// of the collections that hold the test, with their other components)
    /// are read once, the rules run in memory, and the changes are written
    /// back set-wise ([`Self::write`]). `checkpoint`: the seq before the
    /// batch, when the transaction has written nothing yet (the rank index
    /// may rank it then).
    async fn record_batch(
        &self,
        conn: &mut PgConnection,
        submissions: &[(u64, Submission)],
        checkpoint: Option<u64>,
    ) -> Result<Vec<Change>, sqlx::Error> {
        let mut tests: Vec<Uuid> = submissions.iter().map(|(_, s)| s.test_id).collect();
        tests.sort();
        tests.dedup();
        let memberships = self.memberships(conn, &tests, submissions).await?;
        // Each submission's collection boards, with their components.
        let touched: Vec<Vec<CollectionBoard>> = submissions
            .iter()
            .map(|(_, s)| memberships.touched_by(s))
            .collect();
        let mut keys: Vec<(Uuid, String)> = submissions
            .iter()
            .zip(&touched)
            .flat_map(|((_, s), boards)| {
                let user = &s.user_id;
                windows::boards_of(s)
                    .map(|b| b.test_id)
                    .chain(boards.iter().flat_map(|board| {
                        std::iter::once(board.id).chain(board.components.iter().copied())
                    }))
                    .map(move |b| (b, user.clone()))
            })
            .collect();
        keys.sort();
        keys.dedup();
        // The rank index may rank the boards it holds: their last changes
        // are read with the entries.
        let indexed = match (&self.boards, self.generation, checkpoint) {
            (Some(boards), Generation::Live, Some(checkpoint)) => {
                // Keys are sorted: each board is asked about once.
                let mut held: Vec<Uuid> = keys.iter().map(|(board, _)| *board).collect();
                held.dedup();
                held.retain(|board| boards.last_change(*board).is_some());
                Some((checkpoint, held))
            }
            _ => None,
        };
        let held = indexed.as_ref().map_or(&[][..], |(_, held)| &held[..]);
        let (before, last_changes) = self.load(conn, &keys, held).await?;
        let indexed = indexed.map(|(checkpoint, _)| Indexed {
            checkpoint,
            last_changes,
        });
        let mut current: HashMap<(Uuid, String), Entry> = before
            .iter()
            .map(|(key, (entry, _))| (key.clone(), entry.clone()))
            .collect();
        let mut after = Entries::new();
        let mut moves: Vec<(u64, Uuid, Entry)> = Vec::new();
        // Submission by submission, as a replay's fold: its four boards,
        // then the collection entries it changes (a collection entry's
        // change is the last submission that changed it).
        for ((seq, submission), boards) in submissions.iter().zip(touched) {
            let mut put =
                |current: &mut HashMap<(Uuid, String), Entry>, board: Uuid, entry: Entry| {
                    let key = (board, submission.user_id.clone());
                    if let Some(previous) = current
                        .get(&key)
                        .filter(|p| p.rank_key() != entry.rank_key())
                    {
                        moves.push((*seq, board, previous.clone()));
                    }
                    current.insert(key.clone(), entry.clone());
                    after.insert(key, (entry, *seq));
                };
            for on_board in windows::boards_of(submission) {
                let key = (on_board.test_id, on_board.user_id.clone());
                let entry = Entry::record(current.get(&key), &on_board);
                put(&mut current, on_board.test_id, entry);
            }
            for board in boards {
                let user = &submission.user_id;
                let key = (board.id, user.clone());
                let composed = collections::compose(
                    board
                        .components
                        .iter()
                        .filter_map(|part| current.get(&(*part, user.clone()))),
                );
                if let Some(entry) = composed.filter(|e| current.get(&key) != Some(e)) {
                    put(&mut current, board.id, entry);
                }
            }
        }
        self.write(conn, &before, after, &moves, indexed).await
    }

    /// Writes the entries a batch changed (`after`, each with the seq of its
    /// change; `before`: every entry the batch read, as it was): entries,
    /// score counts and moves in one statement ([`Self::store`]). A live
    /// batch announces, for each entry it changed, the entry's rank after
    /// the batch and before it (from the rank index when `indexed`, or else
    /// one set-wise rank query before the write), or one `resync` for a board
    /// with more than [`ANNOUNCE_LIMIT`] changes.
    async fn write(
        &self,
        conn: &mut PgConnection,
        before: &Entries,
        entries: Entries,
        moves: &[(u64, Uuid, Entry)],
        indexed: Option<Indexed>,
    ) -> Result<Vec<Change>, sqlx::Error> {
        let live = self.generation == Generation::Live;
        // Where each changed entry stood, and how the score counts move.
        let mut deltas: HashMap<(Uuid, u32), i32> = HashMap::new();
        let mut old_keys: HashMap<(Uuid, String), RankKey> = HashMap::new();
        for (key, (entry, _)) in &entries {
            let previous = before.get(key).map(|(entry, _)| entry);
            if previous.map(|p| p.best_score) != Some(entry.best_score) {
                if let Some(previous) = previous {
                    *deltas.entry((key.0, previous.best_score)).or_default() -= 1;
                }
                *deltas.entry((key.0, entry.best_score)).or_default() += 1;
            }
            if let Some(previous) = previous.filter(|_| live) {
                old_keys.insert(key.clone(), previous.rank_key());
            }
        }
        // Boards with more changed entries than are announced one by one.
        let mut per_board: HashMap<Uuid, (usize, u64)> = HashMap::new();
        for ((board, _), (_, seq)) in &entries {
            let (count, last) = per_board.entry(*board).or_default();
            *count += 1;
            *last = (*last).max(*seq);
        }
        let crowded: HashMap<Uuid, u64> = per_board
            .into_iter()
            .filter(|(_, (count, _))| *count > ANNOUNCE_LIMIT)
            .map(|(board, (_, last))| (board, last))
            .collect();
        // Boards ranked in memory, then the rest in SQL.
        let in_memory = match (&self.boards, indexed) {
            (Some(boards), Some(indexed)) if live => {
                rank_in_memory(
                    conn,
                    boards.as_ref(),
                    &entries,
                    &old_keys,
                    &crowded,
                    indexed,
                )
                .await?
            }
            _ => BatchRanks::new(),
        };
        let in_sql = if live {
            // A board is ranked in memory whole, or not at all.
            let ranked: HashSet<Uuid> = in_memory.keys().map(|(board, _)| *board).collect();
            let wanted = |board: &Uuid| !crowded.contains_key(board) && !ranked.contains(board);
            let tables = (self.entries.as_str(), self.counts.as_str());
            rank_in_sql(&mut *conn, tables, &entries, &old_keys, wanted).await?
        } else {
            BatchRanks::new()
        };
        self.store(conn, &entries, deltas, if live { moves } else { &[] })
            .await?;
        if !live {
            return Ok(Vec::new());
        }
        // In the order of their last change.
        let mut changed: Vec<(u64, Uuid, &Entry)> = entries
            .iter()
            .filter(|((board, _), _)| !crowded.contains_key(board))
            .map(|((board, _), (entry, seq))| (*seq, *board, entry))
            .collect();
        changed.sort_by_key(|(seq, _, _)| *seq);
        let mut changes: Vec<Change> = changed
            .into_iter()
            .map(|(seq, board, entry)| {
                let key = (board, entry.user_id.clone());
                let (previous, rank) = in_memory
                    .get(&key)
                    .or_else(|| in_sql.get(&key))
                    .copied()
                    .expect("every uncrowded board ranked in memory or in SQL");
                entry_change(board, seq, entry, rank, previous)
            })
            .chain(
                crowded
                    .into_iter()
                    .map(|(board, seq)| resync_change(board, seq)),
            )
            .collect();
        changes.sort_by_key(|change| change.seq);
        Ok(changes)
    }

    /// Writes a batch in one statement: `entries` (inserted or replaced), the
    /// score counts' `deltas` ((test, score) → change in entries: gains by
    /// upsert, losses by update, since an upsert would check the constraint
    /// `entries >= 0` on the negative delta itself) and `moves` (each
    /// entry's key before a change, for continued cursors and rank
    /// histories). No row is written twice by it: a (test, score) is a gain
    /// or a loss.
    async fn store(
        &self,
        conn: &mut PgConnection,
        entries: &Entries,
        deltas: HashMap<(Uuid, u32), i32>,
        moves: &[(u64, Uuid, Entry)],
    ) -> Result<(), sqlx::Error> {
        // In key order: the indexes then grow in runs instead of at random.
        let mut rows: Vec<_> = entries.iter().collect();
        rows.sort_unstable_by_key(|(key, _)| *key);
        let column = |f: fn(&Entry) -> i32| rows.iter().map(|(_, (e, _))| f(e)).collect::<Vec<_>>();
        let (gains, losses): (Vec<_>, Vec<_>) = deltas
            .into_iter()
            .filter(|(_, d)| *d != 0)
            .partition(|(_, d)| *d > 0);
        let tests = |changes: &[((Uuid, u32), i32)]| {
            changes.iter().map(|((t, _), _)| *t).collect::<Vec<_>>()
        };
        let scores = |changes: &[((Uuid, u32), i32)]| {
            changes
                .iter()
                .map(|((_, s), _)| *s as i32)
                .collect::<Vec<_>>()
        };
        let amounts =
            |changes: &[((Uuid, u32), i32)]| changes.iter().map(|(_, d)| *d).collect::<Vec<_>>();
        sqlx::query(&format!(
            "WITH entries AS (
                INSERT INTO {e} (test_id, user_id, best_score, max_score, attempt_id, achieved_at,
                                 attempts, changed_seq)
                SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::int[], $4::int[], $5::uuid[],
                                     $6::timestamptz[], $7::int[], $8::bigint[])
                ON CONFLICT (test_id, user_id) DO UPDATE
                   SET best_score = EXCLUDED.best_score, max_score = EXCLUDED.max_score,
                       attempt_id = EXCLUDED.attempt_id, achieved_at = EXCLUDED.achieved_at,
                       attempts = EXCLUDED.attempts, changed_seq = EXCLUDED.changed_seq),
             gains AS (
                INSERT INTO {c} (test_id, score, entries)
                SELECT * FROM UNNEST($9::uuid[], $10::int[], $11::int[])
                ON CONFLICT (test_id, score) DO UPDATE SET entries = {c}.entries + EXCLUDED.entries),
             losses AS (
                UPDATE {c} SET entries = {c}.entries + d.delta
                  FROM UNNEST($12::uuid[], $13::int[], $14::int[]) d(test_id, score, delta)
                 WHERE {c}.test_id = d.test_id AND {c}.score = d.score),
             moves AS (
                INSERT INTO lb_moves (seq, test_id, user_id, old_score, old_achieved_at)
                SELECT * FROM UNNEST($15::bigint[], $16::uuid[], $17::text[], $18::int[],
                                     $19::timestamptz[])
                ON CONFLICT (test_id, seq, user_id) DO NOTHING)
             SELECT 1",
            e = self.entries,
            c = self.counts
        ))
        .bind(rows.iter().map(|(k, _)| k.0).collect::<Vec<_>>())
        .bind(rows.iter().map(|(k, _)| k.1.clone()).collect::<Vec<_>>())
        .bind(column(|e| e.best_score as i32))
        .bind(column(|e| e.max_score as i32))
        .bind(rows.iter().map(|(_, (e, _))| e.attempt_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|(_, (e, _))| e.achieved_at).collect::<Vec<_>>())
        .bind(column(|e| e.attempts as i32))
        .bind(rows.iter().map(|(_, (_, seq))| *seq as i64).collect::<Vec<_>>())
        .bind(tests(&gains))
        .bind(scores(&gains))
        .bind(amounts(&gains))
        .bind(tests(&losses))
        .bind(scores(&losses))
        .bind(amounts(&losses))
        .bind(moves.iter().map(|(seq, _, _)| *seq as i64).collect::<Vec<_>>())
        .bind(moves.iter().map(|(_, test, _)| *test).collect::<Vec<_>>())
        .bind(moves.iter().map(|(_, _, e)| e.user_id.clone()).collect::<Vec<_>>())
        .bind(moves.iter().map(|(_, _, e)| e.best_score as i32).collect::<Vec<_>>())
        .bind(moves.iter().map(|(_, _, e)| e.achieved_at).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// The entries under `keys` (board, user) that exist and, in the same
    /// statement, the last change (0: none) of each of the boards `held`.
    /// Each entry is looked up by its key: as a join, a generic plan made
    /// while the table was small goes on hashing it by a whole-table scan as
    /// it grows (`LIMIT 1`, which the key allows anyway, keeps it a lookup).
    async fn load(
        &self,
        conn: &mut PgConnection,
        keys: &[(Uuid, String)],
        held: &[Uuid],
    ) -> Result<(Entries, HashMap<Uuid, u64>), sqlx::Error> {
        let (boards, users): (Vec<Uuid>, Vec<String>) = keys.iter().cloned().unzip();
        // A board's last change is a row without a user.
        let rows = sqlx::query(&format!(
            "SELECT e.test_id, e.user_id, e.best_score, e.max_score, e.attempt_id, e.achieved_at,
                    e.attempts, e.changed_seq
               FROM UNNEST($1::uuid[], $2::text[]) k(test_id, user_id)
               CROSS JOIN LATERAL (
                    SELECT * FROM {e} e
                     WHERE e.test_id = k.test_id AND e.user_id = k.user_id LIMIT 1) e
             UNION ALL
             SELECT t.test_id, NULL, NULL, NULL, NULL, NULL, NULL,
                    COALESCE({last}, 0)
               FROM UNNEST($3::uuid[]) t(test_id)",
            e = self.entries,
            last = queries::last_change_of(&self.entries, "t.test_id"),
        ))
        .bind(&boards)
        .bind(&users)
        .bind(held)
        .fetch_all(&mut *conn)
        .await?;
        let mut entries = Entries::with_capacity(rows.len());
        let mut last_changes = HashMap::with_capacity(held.len());
        for row in &rows {
            if row.try_get::<Option<&str>, _>("user_id")?.is_some() {
                let (key, entry) = keyed_entry(row)?;
                entries.insert(key, entry);
            } else {
                let last: i64 = row.try_get("changed_seq")?;
                last_changes.insert(row.try_get("test_id")?, last as u64);
            }
        }
        Ok((entries, last_changes))
    }

    /// The tests of the collections that hold any of `tests`; in the same
    /// statement, notes the periodic boards `submissions` count on (what a
    /// test joining a collection later is composed over).
    async fn memberships(
        &self,
        conn: &mut PgConnection,
        tests: &[Uuid],
        submissions: &[(u64, Submission)],
    ) -> Result<Collections, sqlx::Error> {
        let mut boards: Vec<(Uuid, Uuid, Window, DateTime<Utc>)> = submissions
            .iter()
            .flat_map(|(_, s)| {
                PERIODIC.into_iter().filter_map(|window| {
                    let start = window.period(s.submitted_at)?.start;
                    Some((
                        windows::board_id(s.test_id, window, start),
                        s.test_id,
                        window,
                        start,
                    ))
                })
            })
            .collect();
        boards.sort_by_key(|(board, ..)| *board);
        boards.dedup_by_key(|(board, ..)| *board);
        let table = self.generation.table("lb_collection_tests");
        let rows: Vec<(Uuid, Uuid)> = sqlx::query_as(&format!(
            "WITH noted AS (
                INSERT INTO {boards} (board_id, test_id, \"window\", period_start)
                SELECT * FROM UNNEST($2::uuid[], $3::uuid[], $4::text[], $5::timestamptz[])
                ON CONFLICT (board_id) DO NOTHING)
             SELECT collection_id, test_id FROM {table}
              WHERE collection_id IN (SELECT collection_id FROM {table} WHERE test_id = ANY($1))
              ORDER BY added_seq, test_id",
            boards = self.generation.table("lb_boards")
        ))
        .bind(tests)
        .bind(boards.iter().map(|b| b.0).collect::<Vec<_>>())
        .bind(boards.iter().map(|b| b.1).collect::<Vec<_>>())
        .bind(boards.iter().map(|b| b.2.as_str()).collect::<Vec<_>>())
        .bind(boards.iter().map(|b| b.3).collect::<Vec<_>>())
        .fetch_all(conn)
        .await?;
        let mut collections = Collections::default();
        for (collection, test) in rows {
            collections.add(collection, test);
        }
        Ok(collections)
    }

    /// Adds `tests` to `collection` (by the event at `seq`). When any is
    /// new, every board of the collection is composed afresh from its
    /// tests' boards: their whole history counts at once.
    async fn add_to_collection(
        &self,
        conn: &mut PgConnection,
        collection: Uuid,
        tests: &[Uuid],
        seq: u64,
    ) -> Result<Vec<Change>, sqlx::Error> {
        let table = self.generation.table("lb_collection_tests");
        let added: Vec<Uuid> = sqlx::query_scalar(&format!(
            "INSERT INTO {table} (collection_id, test_id, added_seq)
             SELECT $1, t, $3 FROM UNNEST($2::uuid[]) t
             ON CONFLICT (collection_id, test_id) DO NOTHING RETURNING test_id"
        ))
        .bind(collection)
        .bind(tests)
        .bind(seq as i64)
        .fetch_all(&mut *conn)
        .await?;
        if added.is_empty() {
            return Ok(Vec::new());
        }
        let members: Vec<Uuid> = sqlx::query_scalar(&format!(
            "SELECT test_id FROM {table} WHERE collection_id = $1 ORDER BY added_seq, test_id"
        ))
        .bind(collection)
        .fetch_all(&mut *conn)
        .await?;
        let periods: Vec<(Uuid, String, DateTime<Utc>)> = sqlx::query_as(&format!(
            "SELECT test_id, \"window\", period_start FROM {} WHERE test_id = ANY($1)",
            self.generation.table("lb_boards")
        ))
        .bind(&members)
        .fetch_all(&mut *conn)
        .await?;
        let mut memberships = Collections::default();
        for test in members {
            memberships.add(collection, test);
        }
        for (test, window, start) in periods {
            if let Some(window) = Window::parse(&window) {
                memberships.note_period(test, window, start);
            }
        }
        let mut changes = Vec::new();
        for board in memberships.boards_of(collection) {
            changes.extend(self.compose_board(conn, &board, seq).await?);
        }
        Ok(changes)
    }

    /// Composes every entry of a collection's `board` afresh from its
    /// components (the change at `seq`), and writes those that differ.
    async fn compose_board(
        &self,
        conn: &mut PgConnection,
        board: &CollectionBoard,
        seq: u64,
    ) -> Result<Vec<Change>, sqlx::Error> {
        let mut composed: Vec<Entry> = Vec::new();
        {
            let statement = format!(
                "SELECT {ENTRY_COLUMNS} FROM {} WHERE test_id = ANY($1) ORDER BY user_id",
                self.entries
            );
            let mut rows = sqlx::query(&statement)
                .bind(&board.components)
                .fetch(&mut *conn);
            let mut parts: Vec<Entry> = Vec::new();
            while let Some(row) = rows.try_next().await? {
                let entry = entry_from_row(&row)?;
                if parts.last().is_some_and(|p| p.user_id != entry.user_id) {
                    composed.extend(collections::compose(&parts));
                    parts.clear();
                }
                parts.push(entry);
            }
            composed.extend(collections::compose(&parts));
        }
        let rows = sqlx::query(&format!(
            "SELECT {ENTRY_COLUMNS}, test_id, changed_seq FROM {} WHERE test_id = $1",
            self.entries
        ))
        .bind(board.id)
        .fetch_all(&mut *conn)
        .await?;
        let existing: Entries = rows.iter().map(keyed_entry).collect::<Result<_, _>>()?;
        let mut moves = Vec::new();
        let mut after = Entries::new();
        for entry in composed {
            let key = (board.id, entry.user_id.clone());
            let previous = existing.get(&key).map(|(entry, _)| entry);
            if previous == Some(&entry) {
                continue;
            }
            if let Some(previous) = previous.filter(|p| p.rank_key() != entry.rank_key()) {
                moves.push((seq, board.id, previous.clone()));
            }
            after.insert(key, (entry, seq));
        }
        self.write(conn, &existing, after, &moves, None).await
    }
}

/// A row of entry columns with `test_id` and `changed_seq`, keyed by (board, user).
fn keyed_entry(row: &sqlx::postgres::PgRow) -> Result<Keyed, sqlx::Error> {
    let entry = entry_from_row(row)?;
    let changed: i64 = row.try_get("changed_seq")?;
    Ok((
        (row.try_get("test_id")?, entry.user_id.clone()),
        (entry, changed as u64),
    ))
}

/// Whether events of `event_type` give a collection its tests.
fn is_membership(event_type: &str) -> bool {
    matches!(event_type, "CollectionCreated" | "CollectionTestAdded")
}

/// The collection and tests a membership event names.
fn collection_members(event: &RecordedEvent) -> Result<Option<(Uuid, Vec<Uuid>)>, BoxError> {
    if !is_membership(&event.event_type) {
        return Ok(None);
    }
    Ok(match event.decode()? {
        PodiumEvent::Collection(CollectionEvent::CollectionCreated {
            collection_id,
            test_ids,
            ..
        }) => Some((collection_id, test_ids)),
        PodiumEvent::Collection(CollectionEvent::CollectionTestAdded {
            collection_id,
            test_id,
        }) => Some((collection_id, vec![test_id])),
        _ => None,
    })
}

impl ProjectionLogic for LeaderboardProjection {
    fn name(&self) -> &str {
        match self.generation {
            Generation::Live => NAME,
            Generation::Next => "leaderboard__next",
        }
    }

    fn wants(&self, _aggregate_type: &str, event_type: &str) -> bool {
        Submission::is(event_type) || is_membership(event_type)
    }

    /// Submissions in runs between collection events, each run one
    /// [`Self::record_batch`].
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<Vec<Change>, BoxError> {
        let mut changes = Vec::new();
        let mut run: Vec<(u64, Submission)> = Vec::new();
        // The seq before the batch, while the transaction has written nothing.
        let mut untouched = events.first().map(|e| e.seq - 1);
        for event in events {
            if let Some(submission) = Submission::of(event)? {
                run.push((event.seq, submission));
            } else if let Some((collection, tests)) = collection_members(event)? {
                if !run.is_empty() {
                    let run = std::mem::take(&mut run);
                    changes.extend(self.record_batch(conn, &run, untouched.take()).await?);
                }
                untouched = None;
                changes.extend(
                    self.add_to_collection(conn, collection, &tests, event.seq)
                        .await?,
                );
            }
        }
        if !run.is_empty() {
            changes.extend(self.record_batch(conn, &run, untouched).await?);
        }
        Ok(changes)
    }
}

/// What a batch changes on one board: each changed user's key after it, and
/// the keys the changed users had before it, so that ranks after the batch
/// follow from ranks on the board as it was.
struct BoardBatch<'a> {
    board: Uuid,
    /// Each changed user, with its key after the batch and before it.
    changed: Vec<(&'a String, RankKey, Option<&'a RankKey>)>,
    /// The keys before the batch, and after it, in rank order.
    old: Vec<&'a RankKey>,
    new: Vec<RankKey>,
}

impl<'a> BoardBatch<'a> {
    /// A batch's `entries` (after it) with `before` (the keys of those that
    /// had an entry), board by board, for the boards `wanted`.
    fn by_board(
        entries: &'a Entries,
        before: &'a HashMap<(Uuid, String), RankKey>,
        wanted: impl Fn(&Uuid) -> bool,
    ) -> HashMap<Uuid, Self> {
        let mut boards: HashMap<Uuid, Self> = HashMap::new();
        for (key, (entry, _)) in entries.iter().filter(|((board, _), _)| wanted(board)) {
            let batch = boards.entry(key.0).or_insert_with(|| Self {
                board: key.0,
                changed: Vec::new(),
                old: Vec::new(),
                new: Vec::new(),
            });
            let old = before.get(key);
            batch.changed.push((&key.1, entry.rank_key(), old));
            batch.old.extend(old);
            batch.new.push(entry.rank_key());
        }
        for batch in boards.values_mut() {
            batch.old.sort();
            batch.new.sort();
        }
        boards
    }

    /// The keys whose ranks on the board before the batch [`Self::ranks`]
    /// asks for, each once.
    fn keys(&self) -> impl Iterator<Item = &RankKey> {
        self.changed
            .iter()
            .flat_map(|(_, new, old)| std::iter::once(new).chain(*old))
    }

    /// Each changed user's rank before the batch (if it had an entry) and
    /// after it, from `rank_before`: the 1-based rank a key has or would have
    /// on the board before the batch. After it, a key's rank is that, minus
    /// the batch's old keys ahead of it, plus its new keys ahead of it.
    fn ranks(&self, mut rank_before: impl FnMut(&RankKey) -> u64) -> BatchRanks {
        self.changed
            .iter()
            .map(|(user, key, old)| {
                let previous = old.map(&mut rank_before);
                let old_ahead = self.old.partition_point(|k| *k < key) as u64;
                let new_ahead = self.new.partition_point(|k| k < key) as u64;
                // The board holds every old key, so at least `old_ahead` rank ahead.
                let rank = (rank_before(key) + new_ahead).saturating_sub(old_ahead);
                ((self.board, (*user).clone()), (previous, rank))
            })
            .collect()
    }
}

/// Ranks the changed `entries` of every board `wanted` (not crowded, not
/// ranked in memory) in SQL, in one statement before the batch writes: each
/// key's rank on its board as it was, which [`BoardBatch::ranks`] turns into
/// the ranks before and after the batch.
async fn rank_in_sql(
    conn: &mut PgConnection,
    (entries_table, counts_table): (&str, &str),
    entries: &Entries,
    before: &HashMap<(Uuid, String), RankKey>,
    wanted: impl Fn(&Uuid) -> bool,
) -> Result<BatchRanks, sqlx::Error> {
    let batches = BoardBatch::by_board(entries, before, wanted);
    if batches.is_empty() {
        return Ok(BatchRanks::new());
    }
    let keys: Vec<(Uuid, RankKey)> = batches
        .values()
        .flat_map(|batch| batch.keys().map(|key| (batch.board, key.clone())))
        .collect();
    let ranks = ranks_of(conn, entries_table, counts_table, &keys).await?;
    let mut by_key: HashMap<(Uuid, &RankKey), u64> = HashMap::with_capacity(keys.len());
    for ((board, key), rank) in keys.iter().zip(ranks) {
        by_key.insert((*board, key), rank);
    }
    Ok(batches
        .values()
        .flat_map(|batch| batch.ranks(|key| by_key[&(batch.board, key)]))
        .collect())
}

/// What the rank index needs to rank a batch: the seq before it (the
/// transaction has written nothing yet) and the last changes of the boards
/// the index held when the batch read its entries, read with them.
struct Indexed {
    checkpoint: u64,
    last_changes: HashMap<Uuid, u64>,
}

/// Ranks the changed `entries` (each user's entry after the batch, by test
/// and user; `before`: the keys of those who had one) of every uncrowded
/// test whose board `boards` holds exactly as the transaction sees it,
/// bringing a board that is a few changes behind forward first. Before the
/// batch, a key's rank is its board's; after it, the board's minus the
/// batch's old keys ahead of it plus its new keys ahead of it. Checked
/// before the batch writes anything. A board whose last change the batch
/// did not read is left to SQL.
async fn rank_in_memory(
    conn: &mut PgConnection,
    boards: &dyn LiveBoards,
    entries: &HashMap<(Uuid, String), (Entry, u64)>,
    before: &HashMap<(Uuid, String), RankKey>,
    crowded: &HashMap<Uuid, u64>,
    indexed: Indexed,
) -> Result<BatchRanks, sqlx::Error> {
    let Indexed {
        checkpoint,
        last_changes: current,
    } = indexed;
    let mut tests: Vec<Uuid> = entries
        .keys()
        .map(|(test, _)| *test)
        .filter(|test| !crowded.contains_key(test) && current.contains_key(test))
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
    let batches = BoardBatch::by_board(entries, before, |board| tests.binary_search(board).is_ok());
    for (test, held) in held {
        let now = current[&test];
        if held < now {
            match LeaderboardQueries::changed_after(conn, test, held, PULL_LIMIT).await? {
                Some(changed) => boards.advance(test, &changed, checkpoint),
                None => continue,
            }
        }
        let Some(batch) = batches.get(&test) else {
            continue;
        };
        let mut test_ranks = BatchRanks::new();
        let ranked_all = boards.rank_with(test, now, &mut |board| {
            test_ranks = batch.ranks(|key| board.rank_of_key(key));
        });
        if ranked_all {
            ranked.extend(test_ranks);
        }
    }
    Ok(ranked)
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

/// The leaderboard folded in memory for a rebuild: each (board, user)'s
/// entry by the same rules as [`LeaderboardProjection`], with the seq of the
/// last event that changed it (collections' entries composed as each
/// submission or joining test arrives, as the live path does); written with
/// COPY, score counts, memberships and periods included. A rebuild records
/// no moves (as the set-wise path records none).
///
/// Boards and users are numbered as they first appear, and an entry is kept
/// under the pair of numbers without its user id: a fold of millions of
/// entries then touches half the memory (56 bytes an entry instead of 112
/// and two strings), which is most of what folding costs.
#[derive(Default)]
pub struct LeaderboardFold {
    entries: HashMap<u64, Folded>,
    users: Numbered<String>,
    boards: Numbered<Uuid>,
    /// The board of each (test, window, period start) met so far: its id is
    /// a hash worth computing once.
    periods: HashMap<(Uuid, Window, DateTime<Utc>), u32>,
    collections: Collections,
    /// (collection, test, the seq that added it).
    added: Vec<(Uuid, Uuid, u64)>,
}

/// Values numbered in the order they are first met.
struct Numbered<T> {
    number: HashMap<T, u32>,
    values: Vec<T>,
}

impl<T> Default for Numbered<T> {
    fn default() -> Self {
        Self {
            number: HashMap::new(),
            values: Vec::new(),
        }
    }
}

impl<T: std::hash::Hash + Eq + Clone> Numbered<T> {
    fn of<Q>(&mut self, value: &Q) -> u32
    where
        T: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ToOwned<Owned = T> + ?Sized,
    {
        if let Some(&number) = self.number.get(value) {
            return number;
        }
        let number = self.values.len() as u32;
        self.values.push(value.to_owned());
        self.number.insert(value.to_owned(), number);
        number
    }

    fn get<Q>(&self, value: &Q) -> Option<u32>
    where
        T: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.number.get(value).copied()
    }
}

/// An [`Entry`] as the fold keeps it: without its user id (the key holds
/// the user's number), with the seq of its last change.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Folded {
    best_score: u32,
    max_score: u32,
    attempts: u32,
    attempt_id: Uuid,
    achieved_at: DateTime<Utc>,
    seq: u64,
}

impl Folded {
    fn of(entry: &Entry, seq: u64) -> Self {
        Self {
            best_score: entry.best_score,
            max_score: entry.max_score,
            attempts: entry.attempts,
            attempt_id: entry.attempt_id,
            achieved_at: entry.achieved_at,
            seq,
        }
    }

    /// The entry `submission` opens (as [`Entry::record`] with none before),
    /// without building the user id it does not keep.
    fn first(submission: &Submission, seq: u64) -> Self {
        Self {
            best_score: submission.score,
            max_score: submission.max_score,
            attempts: 1,
            attempt_id: submission.attempt_id,
            achieved_at: submission.submitted_at,
            seq,
        }
    }

    fn entry(&self, user_id: &str) -> Entry {
        Entry {
            user_id: user_id.to_string(),
            best_score: self.best_score,
            max_score: self.max_score,
            attempt_id: self.attempt_id,
            achieved_at: self.achieved_at,
            attempts: self.attempts,
        }
    }
}

fn key(board: u32, user: u32) -> u64 {
    (u64::from(board) << 32) | u64::from(user)
}

/// The board and user numbers of a [`key`].
fn numbers(key: u64) -> (usize, usize) {
    ((key >> 32) as usize, (key & u64::from(u32::MAX)) as usize)
}

/// Each value's place in the sorted order of `values`.
fn places<T: Ord>(values: &[T]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..values.len() as u32).collect();
    order.sort_unstable_by(|a, b| values[*a as usize].cmp(&values[*b as usize]));
    let mut place = vec![0u32; values.len()];
    for (at, number) in order.into_iter().enumerate() {
        place[number as usize] = at as u32;
    }
    place
}

impl LeaderboardFold {
    /// The number of the board `test_id`'s `window` has at `at`.
    fn board(&mut self, test_id: Uuid, window: Window, at: DateTime<Utc>) -> u32 {
        let Some(period) = window.period(at) else {
            return self.boards.of(&test_id);
        };
        if let Some(&board) = self.periods.get(&(test_id, window, period.start)) {
            return board;
        }
        let board = self
            .boards
            .of(&windows::board_id(test_id, window, period.start));
        self.periods.insert((test_id, window, period.start), board);
        board
    }

    /// `user`'s entry on `board`, as an [`Entry`].
    fn entry(&self, board: Uuid, user: &str) -> Option<Entry> {
        let (board, number) = (self.boards.get(&board)?, self.users.get(user)?);
        let folded = self.entries.get(&key(board, number))?;
        Some(folded.entry(user))
    }

    /// Composes `user`'s entry on a collection's `board` from its
    /// components; recorded at `seq` if it changed (as the live path does).
    fn compose(&mut self, board: &CollectionBoard, user: &str, seq: u64) {
        let parts: Vec<Entry> = board
            .components
            .iter()
            .filter_map(|c| self.entry(*c, user))
            .collect();
        let Some(entry) = collections::compose(&parts) else {
            return;
        };
        if self.entry(board.id, user).as_ref() != Some(&entry) {
            let key = key(self.boards.of(&board.id), self.users.of(user));
            self.entries.insert(key, Folded::of(&entry, seq));
        }
    }

    /// Composes every board of `collection` afresh (a test joined it at
    /// `seq`): everyone's history on its tests counts at once.
    fn compose_collection(&mut self, collection: Uuid, seq: u64) {
        let boards = self.collections.boards_of(collection);
        let mut users_of: HashMap<Uuid, Vec<String>> = boards
            .iter()
            .flat_map(|board| board.components.iter().map(|c| (*c, Vec::new())))
            .collect();
        for key in self.entries.keys() {
            let (board, user) = numbers(*key);
            if let Some(users) = users_of.get_mut(&self.boards.values[board]) {
                users.push(self.users.values[user].clone());
            }
        }
        for board in &boards {
            let mut users: Vec<&String> = board
                .components
                .iter()
                .flat_map(|c| users_of[c].iter())
                .collect();
            users.sort_unstable();
            users.dedup();
            for user in users {
                self.compose(board, user, seq);
            }
        }
    }
}

impl crate::fold::Fold for LeaderboardFold {
    fn expect(&mut self, rows: &dyn Fn(&str) -> usize) {
        self.entries.reserve(rows("lb_entries"));
    }

    fn add(&mut self, events: &[RecordedEvent]) -> Result<(), BoxError> {
        for event in events {
            if let Some((collection, tests)) = collection_members(event)? {
                let mut added = false;
                for test in tests {
                    if self.collections.add(collection, test) {
                        self.added.push((collection, test, event.seq));
                        added = true;
                    }
                }
                if added {
                    self.compose_collection(collection, event.seq);
                }
                continue;
            }
            let Some(submission) = Submission::of(event)? else {
                continue;
            };
            self.collections.note(&submission);
            let user = self.users.of(submission.user_id.as_str());
            for window in std::iter::once(Window::All).chain(PERIODIC) {
                let board = self.board(submission.test_id, window, submission.submitted_at);
                // As `Entry::record` on the entry.
                let folded = self
                    .entries
                    .entry(key(board, user))
                    .and_modify(|folded| {
                        submission.count_in(Best {
                            score: &mut folded.best_score,
                            max_score: &mut folded.max_score,
                            attempt_id: &mut folded.attempt_id,
                            achieved_at: &mut folded.achieved_at,
                            attempts: &mut folded.attempts,
                        })
                    })
                    .or_insert_with(|| Folded::first(&submission, event.seq));
                folded.seq = event.seq;
            }
            for board in self.collections.touched_by(&submission) {
                self.compose(&board, &submission.user_id, event.seq);
            }
        }
        Ok(())
    }

    fn write<'c>(
        self: Box<Self>,
        conn: &'c mut PgConnection,
    ) -> futures::future::BoxFuture<'c, Result<(), sqlx::Error>> {
        let this = self;
        Box::pin(async move {
            use crate::fold::CopyWriter;
            let next = Generation::Next;
            let mut rows = CopyWriter::fresh(
                conn,
                &next.table("lb_collection_tests"),
                "collection_id, test_id, added_seq",
            )
            .await?;
            for (collection, test, seq) in &this.added {
                rows.field(collection).field(test).field(seq);
                rows.end_row().await?;
            }
            rows.finish().await?;
            let mut rows = CopyWriter::fresh(
                conn,
                &next.table("lb_boards"),
                "board_id, test_id, \"window\", period_start",
            )
            .await?;
            for (test, window, start) in this.collections.periods() {
                rows.field(windows::board_id(test, window, start))
                    .field(test)
                    .field(window.as_str())
                    .field(start);
                rows.end_row().await?;
            }
            rows.finish().await?;
            let mut counts: HashMap<(Uuid, u32), i32> = HashMap::new();
            let mut rows = CopyWriter::fresh(
                conn,
                &next.table("lb_entries"),
                "test_id, user_id, best_score, max_score, attempt_id, achieved_at, attempts, changed_seq",
            )
            .await?;
            // In key order (board id, user id): the copy's primary key then
            // grows at its right edge instead of splitting pages all over.
            // Each number's place in that order, then the entries by them.
            let (boards, users) = (&this.boards.values, &this.users.values);
            let (board_place, user_place) = (places(boards), places(users));
            let mut entries: Vec<(u64, Folded)> = this.entries.into_iter().collect();
            entries.sort_unstable_by_key(|(numbered, _)| {
                let (board, user) = numbers(*numbered);
                key(board_place[board], user_place[user])
            });
            for (numbered, folded) in entries {
                let (board, user) = numbers(numbered);
                let test = boards[board];
                *counts.entry((test, folded.best_score)).or_default() += 1;
                rows.field(test)
                    .field(&users[user])
                    .field(folded.best_score)
                    .field(folded.max_score)
                    .field(folded.attempt_id)
                    .field(folded.achieved_at)
                    .field(folded.attempts)
                    .field(folded.seq);
                rows.end_row().await?;
            }
            rows.finish().await?;
            let mut rows = CopyWriter::fresh(
                conn,
                &next.table("lb_score_counts"),
                "test_id, score, entries",
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
