//! Reads of the live leaderboard tables: pages by rank, by offset and by
//! cursor, a user's neighbours, and what changed since a point in the log.
//! Callers run them in one snapshot (a repeatable-read transaction) so that a
//! page, its total and its ranks agree with each other.

use std::time::Duration;

use sqlx::{PgConnection, PgExecutor, PgPool, Row};
use uuid::Uuid;

use futures::TryStreamExt;

use super::{entry_from_row, rank_in};
use crate::board_index::BoardIndex;
use crate::ranking::{Entry, RankKey};

/// Entries from `rows`, the `i`-th one with rank `rank_of(i)`.
fn ranked(
    rows: &[sqlx::postgres::PgRow],
    rank_of: impl Fn(u64) -> u64,
) -> Result<Vec<RankedEntry>, sqlx::Error> {
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            Ok(RankedEntry {
                rank: rank_of(i as u64),
                entry: entry_from_row(row)?,
            })
        })
        .collect()
}

/// The rank `key` has in the live tables.
async fn live_rank(
    conn: &mut PgConnection,
    test_id: Uuid,
    key: &RankKey,
) -> Result<u64, sqlx::Error> {
    rank_in(conn, "lb_entries", "lb_score_counts", test_id, key).await
}

async fn with_rank(
    conn: &mut PgConnection,
    test_id: Uuid,
    entry: Entry,
) -> Result<RankedEntry, sqlx::Error> {
    let rank = live_rank(conn, test_id, &entry.rank_key()).await?;
    Ok(RankedEntry { rank, entry })
}

/// `entries` of `test_id`, each with its rank, ranked in one statement.
async fn with_ranks(
    conn: &mut PgConnection,
    test_id: Uuid,
    entries: Vec<Entry>,
) -> Result<Vec<RankedEntry>, sqlx::Error> {
    let keys: Vec<(Uuid, RankKey)> = entries.iter().map(|e| (test_id, e.rank_key())).collect();
    let ranks = super::ranks_of(conn, "lb_entries", "lb_score_counts", &keys).await?;
    Ok(entries
        .into_iter()
        .zip(ranks)
        .map(|(entry, rank)| RankedEntry { rank, entry })
        .collect())
}

/// The most entries a cursor page returns as having moved ahead of its
/// cursor; a cursor that more moved past cannot be continued exactly.
pub const MAX_JUMPED: i64 = 200;

/// A ranked leaderboard entry as queries return it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankedEntry {
    pub rank: u64,
    pub entry: Entry,
}

/// Reads the live leaderboard tables.
pub struct LeaderboardQueries;

pub(crate) const ENTRY_COLUMNS: &str =
    "user_id, best_score, max_score, attempt_id, achieved_at, attempts";
const ENTRY_COLUMNS_E: &str =
    "e.user_id, e.best_score, e.max_score, e.attempt_id, e.achieved_at, e.attempts";

impl LeaderboardQueries {
    /// Entries on test `test_id`.
    pub async fn total<'e>(db: impl PgExecutor<'e>, test_id: Uuid) -> Result<u64, sqlx::Error> {
        let total: i64 = sqlx::query_scalar(
            "SELECT COALESCE(sum(entries), 0)::bigint FROM lb_score_counts WHERE test_id = $1",
        )
        .bind(test_id)
        .fetch_one(db)
        .await?;
        Ok(total as u64)
    }

    /// The entry of `user_id` with its rank, if any.
    pub async fn entry_of(
        conn: &mut PgConnection,
        test_id: Uuid,
        user_id: &str,
    ) -> Result<Option<RankedEntry>, sqlx::Error> {
        let row = sqlx::query(&format!(
            "SELECT {ENTRY_COLUMNS} FROM lb_entries WHERE test_id = $1 AND user_id = $2"
        ))
        .bind(test_id)
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(with_rank(conn, test_id, entry_from_row(&row)?).await?))
    }

    /// Up to `limit` entries ranked after `after` (from the top when `None`),
    /// in rank order; `first_rank` is the rank of the first one returned.
    pub async fn page_after(
        conn: &mut PgConnection,
        test_id: Uuid,
        after: Option<&RankKey>,
        first_rank: u64,
        limit: i64,
    ) -> Result<Vec<RankedEntry>, sqlx::Error> {
        let rows = match after {
            None => {
                sqlx::query(&format!(
                    "SELECT {ENTRY_COLUMNS} FROM lb_entries WHERE test_id = $1
                      ORDER BY -best_score, achieved_at, user_id LIMIT $2"
                ))
                .bind(test_id)
                .bind(limit)
                .fetch_all(&mut *conn)
                .await?
            }
            Some(key) => {
                sqlx::query(&format!(
                    "SELECT {ENTRY_COLUMNS} FROM lb_entries
                      WHERE test_id = $1
                        AND (-best_score, achieved_at, user_id) > (-$2, $3, $4)
                      ORDER BY -best_score, achieved_at, user_id LIMIT $5"
                ))
                .bind(test_id)
                .bind(key.score as i32)
                .bind(key.achieved_at)
                .bind(&key.user_id)
                .bind(limit)
                .fetch_all(&mut *conn)
                .await?
            }
        };
        ranked(&rows, |i| first_rank + i)
    }

    /// Up to `limit` entries from rank `offset + 1`: the score table finds the
    /// score holding that rank, an index range the rest.
    pub async fn page_at_offset(
        conn: &mut PgConnection,
        test_id: Uuid,
        offset: u64,
        limit: i64,
    ) -> Result<Vec<RankedEntry>, sqlx::Error> {
        // The highest score whose entries reach past `offset`, and how many
        // entries rank above that score.
        let bucket: Option<(i32, i64)> = sqlx::query_as(
            "SELECT score, above FROM (
                 SELECT score,
                        (COALESCE(sum(entries) OVER (ORDER BY score DESC
                             ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0))::bigint AS above,
                        (sum(entries) OVER (ORDER BY score DESC))::bigint AS through
                   FROM lb_score_counts WHERE test_id = $1 AND entries > 0) buckets
              WHERE through > $2 ORDER BY score DESC LIMIT 1",
        )
        .bind(test_id)
        .bind(offset as i64)
        .fetch_optional(&mut *conn)
        .await?;
        let Some((score, above)) = bucket else {
            return Ok(Vec::new());
        };
        let rows = sqlx::query(&format!(
            "SELECT {ENTRY_COLUMNS} FROM lb_entries
              WHERE test_id = $1 AND -best_score >= -$2
              ORDER BY -best_score, achieved_at, user_id
              OFFSET $3 LIMIT $4"
        ))
        .bind(test_id)
        .bind(score)
        .bind(offset as i64 - above)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
        ranked(&rows, |i| offset + 1 + i)
    }

    /// Up to `radius` entries ranked just above `key`, in rank order.
    pub async fn above(
        conn: &mut PgConnection,
        test_id: Uuid,
        key: &RankKey,
        rank: u64,
        radius: i64,
    ) -> Result<Vec<RankedEntry>, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "SELECT {ENTRY_COLUMNS} FROM lb_entries
              WHERE test_id = $1
                AND (-best_score, achieved_at, user_id) < (-$2, $3, $4)
              ORDER BY -best_score DESC, achieved_at DESC, user_id DESC LIMIT $5"
        ))
        .bind(test_id)
        .bind(key.score as i32)
        .bind(key.achieved_at)
        .bind(&key.user_id)
        .bind(radius)
        .fetch_all(&mut *conn)
        .await?;
        let mut above = ranked(&rows, |i| rank - 1 - i)?;
        above.reverse();
        Ok(above)
    }

    /// A user's entry with its rank, up to `radius` neighbours on each side
    /// (in rank order), the total and the checkpoint of projection
    /// `checkpoint` — all in one statement, so one round trip and one
    /// snapshot. `entry` is `None` when the user has no entry.
    pub async fn around<'e>(
        db: impl PgExecutor<'e>,
        test_id: Uuid,
        user_id: &str,
        radius: i64,
        checkpoint: &str,
    ) -> Result<Around, sqlx::Error> {
        let rows = sqlx::query(
            "WITH me AS MATERIALIZED (
                 SELECT user_id, best_score, max_score, attempt_id, achieved_at, attempts
                   FROM lb_entries WHERE test_id = $1 AND user_id = $2),
             above AS (
                 SELECT y.* FROM me CROSS JOIN LATERAL (
                     SELECT z.user_id, z.best_score, z.max_score, z.attempt_id, z.achieved_at, z.attempts
                       FROM lb_entries z
                      WHERE z.test_id = $1
                        AND (-z.best_score, z.achieved_at, z.user_id) < (-me.best_score, me.achieved_at, me.user_id)
                      ORDER BY -z.best_score DESC, z.achieved_at DESC, z.user_id DESC LIMIT $3) y),
             below AS (
                 SELECT y.* FROM me CROSS JOIN LATERAL (
                     SELECT z.user_id, z.best_score, z.max_score, z.attempt_id, z.achieved_at, z.attempts
                       FROM lb_entries z
                      WHERE z.test_id = $1
                        AND (-z.best_score, z.achieved_at, z.user_id) > (-me.best_score, me.achieved_at, me.user_id)
                      ORDER BY -z.best_score, z.achieved_at, z.user_id LIMIT $3) y),
             parts AS (
                 SELECT 0 AS part, * FROM me
                 UNION ALL SELECT 1, * FROM above
                 UNION ALL SELECT 2, * FROM below),
             meta AS (
                 SELECT (SELECT COALESCE(sum(entries), 0) FROM lb_score_counts WHERE test_id = $1)::bigint AS total,
                        COALESCE((SELECT seq FROM projection_checkpoints WHERE name = $4), 0)::bigint AS checkpoint,
                        (SELECT 1 + COALESCE((SELECT sum(c.entries) FROM lb_score_counts c
                                               WHERE c.test_id = $1 AND c.score > me.best_score), 0)
                                  + (SELECT count(*) FROM lb_entries x
                                      WHERE x.test_id = $1 AND -x.best_score = -me.best_score
                                        AND (x.achieved_at, x.user_id) < (me.achieved_at, me.user_id))
                           FROM me)::bigint AS rank)
             SELECT meta.total, meta.checkpoint, meta.rank, parts.*
               FROM meta LEFT JOIN parts ON true",
        )
        .bind(test_id)
        .bind(user_id)
        .bind(radius)
        .bind(checkpoint)
        .fetch_all(db)
        .await?;
        let first = rows.first().expect("the meta row is always there");
        let mut around = Around {
            total: first.try_get::<i64, _>("total")? as u64,
            checkpoint: first.try_get::<i64, _>("checkpoint")? as u64,
            entry: None,
            above: Vec::new(),
            below: Vec::new(),
        };
        let Some(rank) = first.try_get::<Option<i64>, _>("rank")? else {
            return Ok(around);
        };
        let rank = rank as u64;
        for row in &rows {
            let entry = entry_from_row(row)?;
            match row.try_get::<i32, _>("part")? {
                0 => around.entry = Some(RankedEntry { rank, entry }),
                1 => around.above.push(RankedEntry {
                    rank: rank - 1 - around.above.len() as u64,
                    entry,
                }),
                _ => around.below.push(RankedEntry {
                    rank: rank + 1 + around.below.len() as u64,
                    entry,
                }),
            }
        }
        around.above.reverse();
        Ok(around)
    }

    /// A page: from the top, from rank `offset + 1`, or after a cursor.
    /// `limit` entries at most in rank order, plus, after a cursor, the
    /// entries that moved from behind it to ahead of it since the cursor's
    /// snapshot (`since`): with those, walking every cursor returns each entry
    /// that existed throughout exactly once, whatever moved meanwhile.
    /// `None` when more than [`MAX_JUMPED`] entries moved past the cursor:
    /// it cannot be continued in one page.
    pub async fn page(
        conn: &mut PgConnection,
        test_id: Uuid,
        start: &PageStart,
        limit: i64,
    ) -> Result<Option<Page>, sqlx::Error> {
        let total = Self::total(&mut *conn, test_id).await?;
        let (mut entries, rest) = match start {
            PageStart::Offset(0) => {
                let mut rows = Self::page_after(conn, test_id, None, 1, limit + 1).await?;
                let more = rows.len() as i64 > limit;
                rows.truncate(limit as usize);
                (rows, more)
            }
            PageStart::Offset(offset) => {
                let mut rows = Self::page_at_offset(conn, test_id, *offset, limit + 1).await?;
                let more = rows.len() as i64 > limit;
                rows.truncate(limit as usize);
                (rows, more)
            }
            PageStart::After { key, since } => {
                let Some(mut jumped) = Self::jumped(conn, test_id, key, *since).await? else {
                    return Ok(None);
                };
                let room = (limit - jumped.len() as i64).max(1);
                let mut rows = Self::page_after(conn, test_id, Some(key), 0, room + 1).await?;
                let more = rows.len() as i64 > room;
                rows.truncate(room as usize);
                if let Some(first) = rows.first() {
                    let first_rank = live_rank(conn, test_id, &first.entry.rank_key()).await?;
                    for (i, row) in rows.iter_mut().enumerate() {
                        row.rank = first_rank + i as u64;
                    }
                }
                jumped.append(&mut rows);
                (jumped, more)
            }
        };
        entries.sort_by_key(|e| e.rank);
        Ok(Some(Page {
            total,
            entries,
            more: rest,
        }))
    }

    /// Entries that stood behind `key` at seq `since` and stand at or ahead
    /// of it now, each with its rank; `None` when more than [`MAX_JUMPED`] did.
    async fn jumped(
        conn: &mut PgConnection,
        test_id: Uuid,
        key: &RankKey,
        since: u64,
    ) -> Result<Option<Vec<RankedEntry>>, sqlx::Error> {
        // The first move of each user after `since` tells where they stood then.
        let rows = sqlx::query(&format!(
            "SELECT {ENTRY_COLUMNS_E} FROM lb_entries e
               JOIN (SELECT DISTINCT ON (user_id) user_id, old_score, old_achieved_at
                       FROM lb_moves WHERE test_id = $1 AND seq > $5
                      ORDER BY user_id, seq) m ON m.user_id = e.user_id
              WHERE e.test_id = $1
                AND (-m.old_score, m.old_achieved_at, m.user_id) > (-$2, $3, $4)
                AND (-e.best_score, e.achieved_at, e.user_id) <= (-$2, $3, $4)
              LIMIT $6"
        ))
        .bind(test_id)
        .bind(key.score as i32)
        .bind(key.achieved_at)
        .bind(&key.user_id)
        .bind(since as i64)
        .bind(MAX_JUMPED + 1)
        .fetch_all(&mut *conn)
        .await?;
        if rows.len() as i64 > MAX_JUMPED {
            return Ok(None);
        }
        let entries = rows.iter().map(entry_from_row).collect::<Result<_, _>>()?;
        Ok(Some(with_ranks(conn, test_id, entries).await?))
    }

    /// The entries changed after seq `after`, oldest change first, each
    /// with the seq of its change; `None` when more than `limit` changed.
    pub async fn changed_after(
        conn: &mut PgConnection,
        test_id: Uuid,
        after: u64,
        limit: i64,
    ) -> Result<Option<Vec<(u64, Entry)>>, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "SELECT {ENTRY_COLUMNS}, changed_seq FROM lb_entries
              WHERE test_id = $1 AND changed_seq > $2 ORDER BY changed_seq LIMIT $3"
        ))
        .bind(test_id)
        .bind(after as i64)
        .bind(limit + 1)
        .fetch_all(&mut *conn)
        .await?;
        if rows.len() as i64 > limit {
            return Ok(None);
        }
        rows.iter()
            .map(|row| {
                let seq = row.try_get::<i64, _>("changed_seq")? as u64;
                Ok((seq, entry_from_row(row)?))
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }

    /// `entries` of `test_id`, each with its rank, counted in one statement.
    pub async fn ranked(
        conn: &mut PgConnection,
        test_id: Uuid,
        entries: Vec<Entry>,
    ) -> Result<Vec<RankedEntry>, sqlx::Error> {
        with_ranks(conn, test_id, entries).await
    }

    /// Every entry of `test_id`, as a [`BoardIndex`], with the seq of the
    /// board's last change; rows are streamed into the index as they come.
    pub async fn board(
        conn: &mut PgConnection,
        test_id: Uuid,
    ) -> Result<(BoardIndex, u64), sqlx::Error> {
        let sql = format!("SELECT {ENTRY_COLUMNS}, changed_seq FROM lb_entries WHERE test_id = $1");
        let mut rows = sqlx::query(&sql).bind(test_id).fetch(&mut *conn);
        let mut loading = BoardIndex::loading();
        let mut last = 0;
        while let Some(row) = rows.try_next().await? {
            last = last.max(row.try_get::<i64, _>("changed_seq")? as u64);
            loading.add(&entry_from_row(&row)?);
        }
        Ok((loading.finish(), last))
    }

    /// The identity of the live entries table: a rebuild swaps in another.
    pub async fn table_id<'e>(db: impl PgExecutor<'e>) -> Result<u32, sqlx::Error> {
        let oid: i64 = sqlx::query_scalar("SELECT 'lb_entries'::regclass::oid::int8")
            .fetch_one(db)
            .await?;
        Ok(oid as u32)
    }

    /// The seq of the last change of each board of `tests` (absent: none),
    /// each found at the end of its index range.
    pub async fn last_changes<'e>(
        db: impl PgExecutor<'e>,
        tests: &[Uuid],
    ) -> Result<std::collections::HashMap<Uuid, u64>, sqlx::Error> {
        let rows: Vec<(Uuid, Option<i64>)> = sqlx::query_as(&format!(
            "SELECT t.test_id, {} FROM UNNEST($1::uuid[]) t(test_id)",
            last_change_of("lb_entries", "t.test_id")
        ))
        .bind(tests)
        .fetch_all(db)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(test, seq)| Some((test, seq? as u64)))
            .collect())
    }

    /// The seq at or below which moves are no longer all known: a cursor
    /// whose snapshot is older cannot be continued exactly.
    pub async fn moves_horizon<'e>(db: impl PgExecutor<'e>) -> Result<u64, sqlx::Error> {
        let seq: i64 = sqlx::query_scalar("SELECT seq FROM lb_moves_horizon")
            .fetch_one(db)
            .await?;
        Ok(seq as u64)
    }

    /// Forgets moves older than `retention` and raises the horizon past them.
    /// Returns how many were deleted.
    pub async fn prune_moves(pool: &PgPool, retention: Duration) -> Result<u64, sqlx::Error> {
        let (deleted,): (i64,) = sqlx::query_as(
            "WITH gone AS (DELETE FROM lb_moves WHERE moved_at < now() - $1 RETURNING seq),
                  raised AS (UPDATE lb_moves_horizon
                                SET seq = GREATEST(seq, (SELECT max(seq) FROM gone)))
             SELECT count(*) FROM gone",
        )
        .bind(retention)
        .fetch_one(pool)
        .await?;
        Ok(deleted as u64)
    }

    /// Raises the horizon to `seq`: moves up to it were not all recorded.
    pub async fn raise_moves_horizon(conn: &mut PgConnection, seq: u64) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE lb_moves_horizon SET seq = GREATEST(seq, $1)")
            .bind(seq as i64)
            .execute(conn)
            .await?;
        Ok(())
    }
}

/// A user's place on a leaderboard, as [`LeaderboardQueries::around`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Around {
    pub total: u64,
    /// The projection checkpoint the read reflects.
    pub checkpoint: u64,
    pub entry: Option<RankedEntry>,
    /// In rank order.
    pub above: Vec<RankedEntry>,
    pub below: Vec<RankedEntry>,
}

/// Where a page starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageStart {
    /// From rank `offset + 1` (0: the top).
    Offset(u64),
    /// After `key`, given by a page read when the projection was at `since`.
    After { key: RankKey, since: u64 },
}

/// One page of a leaderboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Entries on the whole leaderboard.
    pub total: u64,
    /// In rank order.
    pub entries: Vec<RankedEntry>,
    /// Whether entries follow the last one.
    pub more: bool,
}

/// The seq of the last change to board `test` (a column or parameter) in
/// `entries`, NULL for an empty board: the newest of its `lb_entries_changed`
/// index.
pub(crate) fn last_change_of(entries: &str, test: &str) -> String {
    format!("(SELECT max(changed_seq) FROM {entries} e WHERE e.test_id = {test})")
}
