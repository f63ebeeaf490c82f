//! Reads of the log shared by the readers of one process.
//!
//! A live instance far behind reads the same stretch of the log several
//! times over: the relay publishes it, a far-behind read model's rebuild
//! folds it, the notification policy's catch-up decides on it. Each read
//! costs Postgres the index walk, the rows' JSON written out as text and
//! sent, and costs this process their decoding. Readers that join a log's
//! [`SharedReads`] leave what they read there for the others, and take what
//! is there before they ask Postgres.
//!
//! Rows are kept in stretches known whole: a read after key `a` that came
//! back with rows up to key `b` holds every row the log will ever have in
//! `(a, b]`, because it read only below the log's horizon, where nothing can
//! still appear (see [`super::postgres`]). A read from the stretches is
//! therefore the read Postgres would give, followed by Postgres for the rest.
//!
//! What is kept is bounded: rows that every joined reader has passed are
//! dropped, at most [`KEPT_ROWS`] are kept (those the slowest reader comes
//! to first), and nothing is kept while only one reader is joined.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound::{Excluded, Included, Unbounded};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, LazyLock, Mutex, Weak};

use sqlx::PgConnection;

use podium_domain::log::RecordedEvent;

use super::postgres::{read_after, LogCursor, LogKey, LogRow};

/// Rows kept for a log at most: about 30 MB of submissions.
pub const KEPT_ROWS: usize = 50_000;

/// How long a reader waits for another's read of the same stretch, at most.
const WAIT_FOR_ANOTHER: std::time::Duration = std::time::Duration::from_millis(100);

/// A place in the log's order ([`LogKey::order`]).
type Order = (i32, u64, i64);

/// The first place after `order`: what is after it starts there.
fn just_after(order: Order) -> Order {
    (order.0, order.1, order.2 + 1)
}

/// A log's identity: its cluster's system identifier and its database's oid.
type LogId = (i64, i64);

/// The shared reads of every log this process reads: each held as long as
/// a reader has joined it.
static LOGS: LazyLock<Mutex<HashMap<LogId, Weak<SharedReads>>>> = LazyLock::new(Default::default);

/// What the readers of one log have read and left for the others.
#[derive(Default)]
pub struct SharedReads {
    state: Mutex<Kept>,
    /// Woken when a read from Postgres ends.
    read_done: tokio::sync::Notify,
}

#[derive(Default)]
struct Kept {
    rows: BTreeMap<Order, Arc<LogRow>>,
    /// Stretches held whole, start (exclusive) to end (inclusive), apart
    /// from one another.
    stretches: BTreeMap<Order, Order>,
    /// Where each joined reader reads next from.
    readers: HashMap<u64, Order>,
    /// Where the readers reading from Postgres right now read from.
    reading: HashMap<u64, Order>,
    next_reader: u64,
}

/// One reader's place among the readers of its log. Leaves when dropped.
pub struct Reader {
    shared: Arc<SharedReads>,
    id: u64,
    /// Rows this reader took from the shared reads, and from Postgres: for
    /// the line it logs when it leaves.
    given: std::sync::atomic::AtomicU64,
    read: std::sync::atomic::AtomicU64,
}

impl Reader {
    /// Joins the readers of the log that `conn` reads, as one that reads on
    /// after `from`: what others read from there on is kept for it.
    pub async fn join(conn: &mut PgConnection, from: &LogKey) -> Result<Self, sqlx::Error> {
        let identity: LogId = sqlx::query_as(
            "SELECT COALESCE((SELECT system_identifier FROM log_epoch), 0),
                    (SELECT oid::int8 FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(conn)
        .await?;
        let shared = {
            let mut logs = LOGS.lock().expect("the logs' registry is never poisoned");
            logs.retain(|_, log| log.strong_count() > 0);
            match logs.get(&identity).and_then(Weak::upgrade) {
                Some(shared) => shared,
                None => {
                    let shared = Arc::new(SharedReads::default());
                    logs.insert(identity, Arc::downgrade(&shared));
                    shared
                }
            }
        };
        let id = {
            let mut kept = shared.lock();
            kept.next_reader += 1;
            let id = kept.next_reader;
            kept.readers.insert(id, from.order());
            id
        };
        Ok(Self {
            shared,
            id,
            given: Default::default(),
            read: Default::default(),
        })
    }

    /// Up to `limit` rows after `after`, in order, as
    /// [`read_after`](super::postgres::read_after) reads them: first those
    /// another reader left, then from Postgres on `conn`. Where another
    /// reader is reading the same stretch from Postgres right now (two
    /// readers side by side at the front of a backlog), waits for its rows
    /// once, up to [`WAIT_FOR_ANOTHER`], rather than read them as well.
    pub async fn read_after(
        &self,
        conn: &mut PgConnection,
        after: &LogKey,
        limit: i64,
    ) -> Result<Vec<LogRow>, sqlx::Error> {
        let limit = limit.max(0) as usize;
        let mut rows: Vec<LogRow> = Vec::with_capacity(limit);
        let mut from = after.clone();
        let mut waited = false;
        loop {
            let read_done = self.shared.read_done.notified();
            tokio::pin!(read_done);
            let (kept, others, wait) = {
                let mut kept = self.shared.lock();
                kept.readers.insert(self.id, after.order());
                kept.drop_passed();
                let rows_kept = kept.after(from.order(), limit - rows.len());
                let end = rows_kept.last().map_or(from.order(), |row| row.key.order());
                let short = rows.len() + rows_kept.len() < limit;
                let wait = short && !waited && kept.reading.values().any(|&start| start <= end);
                if wait {
                    // Before the lock is let go: its reader wakes it after
                    // it took the lock to leave its rows.
                    read_done.as_mut().enable();
                } else if short {
                    // Said under the same lock: a reader coming to the
                    // same stretch now waits for this read.
                    kept.reading.insert(self.id, end);
                }
                (rows_kept, kept.readers.len() > 1, wait)
            };
            self.given.fetch_add(kept.len() as u64, Relaxed);
            if let Some(last) = kept.last() {
                from = last.key.clone();
            }
            rows.extend(kept.iter().map(|row| LogRow::clone(row)));
            if rows.len() == limit {
                return Ok(rows);
            }
            if wait {
                waited = true;
                // At most a while: a read whose reader is not polled (busy
                // folding, say) must not hold this one up longer than its
                // own read would take.
                let _ = tokio::time::timeout(WAIT_FOR_ANOTHER, read_done).await;
                continue;
            }
            let reading = Reading {
                shared: &self.shared,
                id: self.id,
            };
            let more = read_after(conn, &from, (limit - rows.len()) as i64).await?;
            self.read.fetch_add(more.len() as u64, Relaxed);
            if others && !more.is_empty() {
                let copies: Vec<Arc<LogRow>> = more.iter().cloned().map(Arc::new).collect();
                self.shared.lock().keep(from.order(), copies.into_iter());
            }
            drop(reading);
            rows.extend(more);
            return Ok(rows);
        }
    }
}

/// A read from Postgres under way (entered in `reading`), which other
/// readers of the same stretch wait for; when it ends, or is dropped
/// unfinished, they are woken.
struct Reading<'a> {
    shared: &'a SharedReads,
    id: u64,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.shared.lock().reading.remove(&self.id);
        self.shared.read_done.notify_waiters();
    }
}

impl Reader {
    /// [`LogCursor::peek`], sharing the read with the log's other readers.
    pub async fn peek(
        &self,
        cursor: &LogCursor,
        conn: &mut PgConnection,
        limit: i64,
    ) -> Result<(Vec<RecordedEvent>, LogCursor), sqlx::Error> {
        Ok(cursor.numbered(self.read_after(conn, &cursor.key, limit).await?))
    }

    /// Rows this reader took from what others read.
    pub fn rows_shared(&self) -> u64 {
        self.given.load(Relaxed)
    }

    /// Rows this reader read from Postgres.
    pub fn rows_read(&self) -> u64 {
        self.read.load(Relaxed)
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let given = self.rows_shared();
        if given > 0 {
            tracing::debug!(
                shared = given,
                read = self.rows_read(),
                "a reader leaves the log: rows it took from shared reads, and read from Postgres"
            );
        }
        let mut kept = self.shared.lock();
        kept.readers.remove(&self.id);
        if kept.readers.is_empty() {
            kept.rows.clear();
            kept.stretches.clear();
        }
    }
}

impl SharedReads {
    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.state.lock().expect("shared reads are never poisoned")
    }
}

impl Kept {
    /// The rows kept after `after` within its stretch, at most `limit`.
    fn after(&self, after: Order, limit: usize) -> Vec<Arc<LogRow>> {
        let Some((_, &end)) = self.stretches.range(..=after).next_back() else {
            return Vec::new();
        };
        if after >= end {
            return Vec::new();
        }
        self.rows
            .range((Excluded(after), Included(end)))
            .take(limit)
            .map(|(_, row)| row.clone())
            .collect()
    }

    /// Keeps `rows`, every row of the log after `from` up to the last of
    /// them, then drops the furthest rows beyond [`KEPT_ROWS`].
    fn keep(&mut self, from: Order, rows: impl Iterator<Item = Arc<LogRow>>) {
        let mut end = from;
        for row in rows {
            end = row.key.order();
            self.rows.insert(end, row);
        }
        if end == from {
            return;
        }
        // One stretch with those it overlaps or touches.
        let (mut start, mut last) = (from, end);
        let touching: Vec<(Order, Order)> = self
            .stretches
            .range(..=end)
            .rev()
            .take_while(|(_, &e)| e >= from)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.stretches.remove(&s);
            start = start.min(s);
            last = last.max(e);
        }
        self.stretches.insert(start, last);
        if self.rows.len() > KEPT_ROWS {
            let excess = self.rows.len() - KEPT_ROWS;
            let last_kept = *self
                .rows
                .keys()
                .rev()
                .nth(excess)
                .expect("more rows than the excess");
            self.drop_beyond(last_kept);
        }
    }

    /// Drops the rows after `last_kept`.
    fn drop_beyond(&mut self, last_kept: Order) {
        self.rows.split_off(&just_after(last_kept));
        self.stretches.retain(|&start, _| start < last_kept);
        if let Some((_, end)) = self.stretches.range_mut(..last_kept).next_back() {
            *end = (*end).min(last_kept);
        }
    }

    /// Drops the rows every joined reader has passed.
    fn drop_passed(&mut self) {
        let Some(&slowest) = self.readers.values().min() else {
            return;
        };
        self.rows = self.rows.split_off(&just_after(slowest));
        let passed: Vec<Order> = self
            .stretches
            .range((Unbounded, Included(slowest)))
            .map(|(&start, _)| start)
            .collect();
        for start in passed {
            let end = self.stretches.remove(&start).expect("listed just now");
            if end > slowest {
                self.stretches.insert(slowest, end);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Row `n` of a log whose keys are (1, n, n).
    fn row(n: u64) -> LogRow {
        LogRow {
            key: LogKey {
                epoch: 1,
                txid: n.to_string(),
                position: n as i64,
            },
            event: RecordedEvent::passed_over(0, "Attempt", "AttemptStarted"),
        }
    }

    fn at(n: u64) -> Order {
        (1, n, n as i64)
    }

    fn kept_after(kept: &Kept, after: u64, limit: usize) -> Vec<u64> {
        kept.after(at(after), limit)
            .iter()
            .map(|row| row.key.order().1)
            .collect()
    }

    fn keep(kept: &mut Kept, from: u64, rows: std::ops::RangeInclusive<u64>) {
        kept.keep(at(from), rows.map(|n| Arc::new(row(n))));
    }

    #[test]
    fn a_stretch_gives_only_what_it_holds_whole() {
        let mut kept = Kept::default();
        keep(&mut kept, 10, 11..=20);
        assert_eq!(kept_after(&kept, 10, 5), vec![11, 12, 13, 14, 15]);
        assert_eq!(kept_after(&kept, 17, 100), vec![18, 19, 20]);
        // Before the stretch, at its end, beyond it: nothing is known.
        assert!(kept_after(&kept, 9, 5).is_empty());
        assert!(kept_after(&kept, 20, 5).is_empty());
        assert!(kept_after(&kept, 25, 5).is_empty());
    }

    #[test]
    fn stretches_that_touch_become_one() {
        let mut kept = Kept::default();
        keep(&mut kept, 10, 11..=20);
        keep(&mut kept, 30, 31..=40);
        keep(&mut kept, 20, 21..=30);
        assert_eq!(kept.stretches.len(), 1);
        assert_eq!(kept_after(&kept, 10, 100), (11..=40).collect::<Vec<_>>());
    }

    #[test]
    fn the_furthest_rows_go_first_beyond_the_bound() {
        let mut kept = Kept::default();
        let n = KEPT_ROWS as u64;
        keep(&mut kept, 0, 1..=n);
        keep(&mut kept, n, n + 1..=n + 10);
        assert_eq!(kept.rows.len(), KEPT_ROWS);
        assert!(kept_after(&kept, n - 1, 100) == vec![n]);
        assert!(kept_after(&kept, n, 100).is_empty());
    }

    #[test]
    fn rows_every_reader_passed_are_dropped() {
        let mut kept = Kept::default();
        keep(&mut kept, 0, 1..=100);
        kept.readers.insert(1, at(40));
        kept.readers.insert(2, at(70));
        kept.drop_passed();
        assert_eq!(kept.rows.len(), 60);
        assert_eq!(kept_after(&kept, 40, 3), vec![41, 42, 43]);
        assert!(kept_after(&kept, 39, 3).is_empty());
    }

    proptest! {
        /// Whatever was kept, dropped and bounded, a read from the kept
        /// rows is a prefix of the log after its key, gap-free.
        #[test]
        fn kept_rows_are_always_the_log_itself(
            steps in proptest::collection::vec((0u64..300, 0u64..80, any::<bool>()), 1..60),
        ) {
            let mut kept = Kept::default();
            for (from, len, pass) in steps {
                if pass {
                    kept.readers.insert(0, at(from));
                    kept.drop_passed();
                } else if len > 0 {
                    keep(&mut kept, from, from + 1..=from + len);
                }
                for after in 0..400 {
                    let got = kept_after(&kept, after, 50);
                    let expected: Vec<u64> = (after + 1..).take(got.len()).collect();
                    prop_assert_eq!(got, expected);
                }
                let mut ends: Vec<(Order, Order)> =
                    kept.stretches.iter().map(|(&s, &e)| (s, e)).collect();
                ends.sort();
                for pair in ends.windows(2) {
                    prop_assert!(pair[0].1 < pair[1].0, "stretches overlap or touch: {:?}", pair);
                }
            }
        }
    }
}
