//! A private Postgres server for tests that stop it (the shared one serves
//! every other test at the same moment). See `../shared/FAULTS.md`.

use std::path::PathBuf;
use std::process::Command;

/// A Postgres cluster of the test's own on a free port, removed on drop.
pub struct PrivatePostgres {
    dir: PathBuf,
    pub port: u16,
}

const BIN: &str = "/usr/lib/postgresql/15/bin";

/// Runs a Postgres binary as the `postgres` user (initdb refuses root).
fn as_postgres(binary: &str, args: &[&str]) -> std::process::Output {
    let output = Command::new("runuser")
        .args(["-u", "postgres", "--", &format!("{BIN}/{binary}")])
        .args(args)
        .output()
        .expect("runuser runs");
    assert!(
        output.status.success(),
        "{binary} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A fresh temporary directory the `postgres` user owns.
fn postgres_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("podium-pg-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let chown = Command::new("chown")
        .args(["postgres", dir.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(chown.success());
    dir
}

impl PrivatePostgres {
    pub fn start() -> Self {
        let dir = postgres_dir();
        let port = free_port();
        let data = dir.join("data");
        as_postgres(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        );
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\nmax_connections = 60\nfsync = off\n",
            dir.display()
        );
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut file, conf.as_bytes()).unwrap();
        // Streaming replicas may connect (`replica`).
        let mut hba = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("pg_hba.conf"))
            .unwrap();
        std::io::Write::write_all(&mut hba, b"host replication all 127.0.0.1/32 trust\n").unwrap();
        let postgres = Self { dir, port };
        postgres.start_server();
        postgres
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn start_server(&self) {
        let log = self.dir.join("server.log").display().to_string();
        as_postgres("pg_ctl", &["-D", &self.data(), "-l", &log, "-w", "start"]);
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (fast shutdown: sessions are ended).
    pub fn stop(&self) {
        as_postgres("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    pub fn restart(&self) {
        self.start_server();
    }

    /// A hot standby of this server fed by streaming replication
    /// (`pg_basebackup -R`), on a port and in a directory of its own.
    pub fn replica(&self) -> PrivatePostgres {
        let replica = Self {
            dir: postgres_dir(),
            port: free_port(),
        };
        as_postgres(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-D",
                &replica.data(),
                "-R",
                "-X",
                "stream",
            ],
        );
        let conf = format!(
            "port = {}\nunix_socket_directories = '{}'\n",
            replica.port,
            replica.dir.display()
        );
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(replica.dir.join("data").join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut file, conf.as_bytes()).unwrap();
        replica.start_server();
        replica
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{BIN}/pg_ctl")])
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Text with COPY's special characters goes through the fold's COPY writer
/// unchanged, and NULLs stay NULL.
#[tokio::test]
async fn the_copy_writer_stores_every_value_as_a_bound_parameter_would() {
    let db = crate::helpers::TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query(
        "CREATE TABLE copied (n int, t text, big bigint, id uuid, at timestamptz, score int)",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    // What text COPY would misread, NULLs, extremes, and times before 2000
    // and with nanoseconds (truncated to microseconds, as sqlx binds them).
    let texts = [
        Some("tab\there"),
        Some("line\nbreak\r\n"),
        Some("back\\slash \\N"),
        None,
        Some(""),
        Some("ünïcødé ✓"),
    ];
    let at = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().to_utc();
    let times = [
        Some(at("2026-12-03T04:05:06.123456789Z")),
        Some(at("1999-12-31T23:59:59.999999Z")),
        None,
        Some(at("2000-01-01T00:00:00Z")),
        Some(at("1970-01-01T00:00:00.000001Z")),
        Some(at("2400-02-29T12:00:00Z")),
    ];
    let bigs = [
        Some(0i64),
        Some(i64::MAX),
        Some(-1),
        None,
        Some(i64::MIN),
        Some(1),
    ];
    let scores = [0u32, 1, 100, 2_000_000_000, 7, 42];
    let ids: Vec<Option<uuid::Uuid>> = (0..texts.len())
        .map(|n| (n != 2).then(uuid::Uuid::new_v4))
        .collect();
    let mut rows = podium_projections::fold::CopyWriter::start(
        &mut conn,
        "COPY copied (n, t, big, id, at, score) FROM STDIN WITH (FORMAT binary)",
    )
    .await
    .unwrap();
    for n in 0..texts.len() {
        rows.field(n as i32)
            .field(texts[n])
            .field(bigs[n])
            .field(ids[n])
            .field(times[n])
            .field(scores[n]);
        rows.end_row().await.unwrap();
    }
    assert_eq!(rows.finish().await.unwrap(), texts.len() as u64);
    type Row = (
        Option<String>,
        Option<i64>,
        Option<uuid::Uuid>,
        Option<chrono::DateTime<chrono::Utc>>,
        i32,
    );
    let back: Vec<Row> = sqlx::query_as("SELECT t, big, id, at, score FROM copied ORDER BY n")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    // The same values bound as parameters, read back the same way.
    let mut bound: Vec<Row> = Vec::new();
    for n in 0..texts.len() {
        bound.push(
            sqlx::query_as("SELECT $1::text, $2::bigint, $3::uuid, $4::timestamptz, $5::int")
                .bind(texts[n])
                .bind(bigs[n])
                .bind(ids[n])
                .bind(times[n])
                .bind(scores[n] as i32)
                .fetch_one(&mut *conn)
                .await
                .unwrap(),
        );
    }
    assert_eq!(back, bound);
    assert_eq!(back[0].0.as_deref(), Some("tab\there"));
    assert_eq!(
        back[0].3.unwrap().to_rfc3339(),
        "2026-12-03T04:05:06.123456+00:00"
    );
    assert_eq!(back[3].4, 2_000_000_000);
}

/// The last key of the log is the last in commit order: transaction ids
/// compare as numbers (999 before 1000), not as text ("1000" before "999").
#[tokio::test]
async fn the_last_key_of_the_log_orders_transaction_ids_as_numbers() {
    let db = crate::helpers::TestDb::new().await;
    for (id, txid) in [("a", "999"), ("b", "1000"), ("c", "998")] {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                 event_version, payload, metadata, txid)
             VALUES ('Test', $1, 1, 'TestArchived', '1', '{}', '{}', $2::text::xid8)",
        )
        .bind(id)
        .bind(txid)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let mut conn = db.pool.acquire().await.unwrap();
    let last = podium::log::postgres::last_key(&mut conn)
        .await
        .unwrap()
        .expect("the log has events");
    assert_eq!(last.txid, "1000");
}

/// What lies after a key of the log is counted exactly up to
/// `COUNTED_EXACTLY` events, and estimated from the events' positions
/// beyond: exact again when no insert left a hole in them. A conflicting
/// insert leaves one, and the estimate overcounts by it alone.
#[tokio::test]
async fn what_lies_after_a_key_is_counted_without_walking_a_long_backlog() {
    use podium::log::postgres::{any_after, count_after, last_key, LogKey, COUNTED_EXACTLY};
    let db = crate::helpers::TestDb::new().await;
    let events = crate::helpers::seed_log(&db.pool, 6_000).await;
    let events = events as i64;
    assert!(
        events > COUNTED_EXACTLY,
        "a log longer than what is counted"
    );
    let mut conn = db.pool.acquire().await.unwrap();
    let start = LogKey::start();
    assert_eq!(count_after(&mut conn, &start).await.unwrap(), events);
    assert!(any_after(&mut conn, &start).await.unwrap());
    let last = last_key(&mut conn).await.unwrap().unwrap();
    assert_eq!(count_after(&mut conn, &last).await.unwrap(), 0);
    assert!(!any_after(&mut conn, &last).await.unwrap());
    // The key 100 events before the end: counted one by one.
    let near: (i32, String, i64) = sqlx::query_as(
        "SELECT epoch, txid::text, position FROM events
          ORDER BY epoch DESC, txid DESC, position DESC OFFSET 100 LIMIT 1",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    let near = LogKey {
        epoch: near.0,
        txid: near.1,
        position: near.2,
    };
    assert_eq!(count_after(&mut conn, &near).await.unwrap(), 100);
    // An insert that conflicts takes a position and writes nothing.
    let (aggregate_type, aggregate_id): (String, String) =
        sqlx::query_as("SELECT aggregate_type, aggregate_id FROM events LIMIT 1")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    for id in [aggregate_id.as_str(), "one-more"] {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                 event_version, payload, metadata)
             VALUES ($1, $2, 1, 'TestArchived', '1', '{}', '{}')
             ON CONFLICT DO NOTHING",
        )
        .bind(&aggregate_type)
        .bind(id)
        .execute(&mut *conn)
        .await
        .unwrap();
    }
    assert_eq!(count_after(&mut conn, &near).await.unwrap(), 101);
    assert_eq!(count_after(&mut conn, &start).await.unwrap(), events + 2);
}

/// Reading the log walks its commit-order index, never the whole table,
/// also once `events` has statistics (the planner then estimates that much
/// of the log matches a comparison, and used to scan from the table's
/// start for a row that usually is not there: a whole-table read per batch,
/// 630 ms at 2,000,000 events, for the relay, every projection and every
/// rebuild). So does finding where a reader that has had the first n
/// events goes on (`LogCursor::after_first`, for a far-behind projection),
/// which must order by the txid as a number, not as its text. Told by the
/// scans of `events` that the reading transaction counted.
#[tokio::test]
async fn reading_an_analyzed_log_never_scans_the_whole_table() {
    use podium::log::postgres::{any_after, count_after, last_key, LogCursor};
    let db = crate::helpers::TestDb::new().await;
    let events = crate::helpers::seed_log(&db.pool, 6_000).await;
    sqlx::query("ANALYZE events")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    // A parallel scan's counts would be its workers'.
    sqlx::query("SET LOCAL max_parallel_workers_per_gather = 0")
        .execute(&mut *tx)
        .await
        .unwrap();
    let mut cursor = LogCursor::start();
    let mut read = 0;
    let mut cursors = Vec::new();
    let mut to_end = podium::log::postgres::ReadToEnd::default();
    loop {
        let (batch, after) = cursor.peek(&mut tx, 1_000).await.unwrap();
        if batch.is_empty() {
            if to_end.at_end(&mut tx, &cursor.key).await.unwrap() {
                break;
            }
            continue;
        }
        read += batch.len() as u64;
        cursor = after;
        cursors.push(cursor.clone());
    }
    assert_eq!(read, events, "the whole log is read");
    // Where a reader that has had the first n events goes on (a far-behind
    // projection's checkpoint), found by counting along the log's order:
    // where reading them left the cursor, across the seed's transactions,
    // by reading the first n entries of the commit-order index (ordering by
    // the txid's text instead would read all of them, and sort).
    // Its entries read in this transaction (`idx_tup_read`).
    const INDEX_READS: &str =
        "SELECT pg_stat_get_xact_tuples_returned('events_commit_order'::regclass)";
    for cursor in &cursors {
        let before: i64 = sqlx::query_scalar(INDEX_READS)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(
            &LogCursor::after_first(&mut tx, cursor.seq).await.unwrap(),
            cursor
        );
        let after: i64 = sqlx::query_scalar(INDEX_READS)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        let read = after - before;
        assert!(
            read <= cursor.seq as i64,
            "{read} index entries read to find the cursor after {} events",
            cursor.seq
        );
    }
    let last = last_key(&mut tx).await.unwrap().unwrap();
    assert!(!any_after(&mut tx, &last).await.unwrap());
    assert_eq!(count_after(&mut tx, &last).await.unwrap(), 0);
    let (whole, indexed): (i64, i64) = sqlx::query_as(
        "SELECT seq_scan, COALESCE(idx_scan, 0) FROM pg_stat_xact_user_tables
          WHERE relid = 'events'::regclass",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(whole, 0, "sequential scans of the log while reading it");
    assert!(indexed > 0, "the reads went through an index");
}

/// Each event's place: its seq and its row's position.
fn places(events: &[podium_domain::log::RecordedEvent]) -> Vec<(u64, i64)> {
    events.iter().map(|e| (e.seq, e.position)).collect()
}

/// Reads `reader`'s log to its `expected`th event in batches of `batch`,
/// waiting while its writers have yet to commit them (30 s at most).
async fn read_shared(
    reader: &podium::log::shared::Reader,
    conn: &mut sqlx::PgConnection,
    batch: i64,
    expected: &tokio::sync::watch::Receiver<Option<usize>>,
) -> Vec<(u64, i64)> {
    use podium::log::postgres::LogCursor;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut cursor = LogCursor::start();
    let mut read = Vec::new();
    loop {
        let (events, next) = reader.peek(&cursor, conn, batch).await.unwrap();
        read.extend(places(&events));
        cursor = next;
        if events.is_empty() {
            if *expected.borrow() == Some(read.len()) {
                return read;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} events read, {:?} expected",
                read.len(),
                *expected.borrow()
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

/// Readers of one log in one process that share their reads (the relay, a
/// rebuild and the policy's catch-up in a backlog) each read exactly the
/// log a reader of their own reads, event for event and in its order, also
/// while writers commit out of order under them, whatever their batch; and
/// a reader of another database reads its own log, not theirs. One that
/// comes after another reads from what the other read.
#[tokio::test]
async fn readers_that_share_their_reads_read_the_log_as_one_alone_does() {
    use podium::log::postgres::LogKey;
    use podium::log::shared::Reader;
    let db = crate::helpers::TestDb::with_pool_size(6).await;
    let other = crate::helpers::TestDb::new().await;
    let seeded = crate::helpers::seed_log(&db.pool, 1_000).await;
    let other_seeded = crate::helpers::seed_log(&other.pool, 300).await;

    // One reader after another: the second takes all from the first's reads.
    let mut first_conn = db.pool.acquire().await.unwrap();
    let mut second_conn = db.pool.acquire().await.unwrap();
    let first = Reader::join(&mut first_conn, &LogKey::start())
        .await
        .unwrap();
    let second = Reader::join(&mut second_conn, &LogKey::start())
        .await
        .unwrap();
    let (_, all_there) = tokio::sync::watch::channel(Some(seeded as usize));
    let alone = crate::helpers::whole_log(&mut first_conn, 500).await;
    let alone = places(&alone);
    assert_eq!(
        read_shared(&first, &mut first_conn, 100, &all_there).await,
        alone
    );
    assert_eq!(
        read_shared(&second, &mut second_conn, 37, &all_there).await,
        alone
    );
    assert_eq!(first.rows_read(), seeded);
    assert_eq!((second.rows_shared(), second.rows_read()), (seeded, 0));
    drop((first, second, first_conn, second_conn));

    // Side by side while transactions commit out of order: a transaction
    // that began first (lower id) commits after one that began later.
    let (done, expected) = tokio::sync::watch::channel(None);
    let writer = {
        let pool = db.pool.clone();
        tokio::spawn(async move {
            let insert = |id: String| {
                sqlx::query(
                    "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                         event_version, payload, metadata)
                     VALUES ('Test', $1, 1, 'TestArchived', '1', '{}', '{}')",
                )
                .bind(id)
            };
            for n in 0..150 {
                let mut early = pool.begin().await.unwrap();
                insert(format!("early-{n}"))
                    .execute(&mut *early)
                    .await
                    .unwrap();
                let mut late = pool.begin().await.unwrap();
                insert(format!("late-{n}"))
                    .execute(&mut *late)
                    .await
                    .unwrap();
                late.commit().await.unwrap();
                tokio::task::yield_now().await;
                early.commit().await.unwrap();
            }
        })
    };
    let mut readers = Vec::new();
    for batch in [7, 64, 300] {
        let mut conn = db.pool.acquire().await.unwrap();
        // Joined before any of them reads: each keeps what it reads for the
        // others from its first read.
        let reader = Reader::join(&mut conn, &LogKey::start()).await.unwrap();
        let expected = expected.clone();
        readers.push(async move {
            let read = read_shared(&reader, &mut conn, batch, &expected).await;
            (read, reader.rows_shared())
        });
    }
    let readers: Vec<_> = readers.into_iter().map(tokio::spawn).collect();
    let mut other_conn = other.pool.acquire().await.unwrap();
    let other_reader = Reader::join(&mut other_conn, &LogKey::start())
        .await
        .unwrap();
    let (_, other_there) = tokio::sync::watch::channel(Some(other_seeded as usize));
    let other_read = read_shared(&other_reader, &mut other_conn, 50, &other_there).await;
    writer.await.unwrap();
    let total = seeded as usize + 300;
    done.send(Some(total)).unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let log = places(&crate::helpers::whole_log(&mut conn, 1_000).await);
    assert_eq!(log.len(), total);
    let mut shared = 0;
    for reader in readers {
        let (read, from_others) = reader.await.unwrap();
        assert!(
            read == log,
            "a sharing reader read another log than the log"
        );
        shared += from_others;
    }
    assert!(shared > 0, "the readers side by side shared nothing");
    let other_log = places(&crate::helpers::whole_log(&mut other_conn, 1_000).await);
    assert_eq!(other_read, other_log);
    assert_eq!(other_reader.rows_shared(), 0);
}

/// A reader waits for another's read of the same stretch only a moment: one
/// whose reader is not polled (busy folding a batch, say) never holds it up.
#[tokio::test]
async fn a_shared_read_never_waits_long_for_another_readers_read() {
    use podium::log::postgres::LogCursor;
    use podium::log::shared::Reader;
    let db = crate::helpers::TestDb::new().await;
    crate::helpers::seed_log(&db.pool, 100).await;
    let mut stalled_conn = db.pool.acquire().await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let start = LogCursor::start();
    let stalled = Reader::join(&mut stalled_conn, &start.key).await.unwrap();
    let reader = Reader::join(&mut conn, &start.key).await.unwrap();
    // The log locked for a moment, so that a read sent cannot be answered.
    let mut locker = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    // Its read sent, then never polled again.
    let mut stalled_read = Box::pin(stalled.peek(&start, &mut stalled_conn, 50));
    assert!(futures::poll!(stalled_read.as_mut()).is_pending());
    // The lock let go once the other reader, done waiting, reads itself:
    // two reads of the log then wait for it.
    let reads_waiting = "SELECT count(*) FROM pg_stat_activity
                          WHERE datname = current_database() AND wait_event_type = 'Lock'
                            AND query LIKE '%FROM events%'";
    let release = async {
        crate::helpers::poll(
            "the other reader to read the log itself",
            std::time::Duration::from_secs(10),
            || async {
                let waiting: i64 = sqlx::query_scalar(reads_waiting)
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
                if waiting >= 2 {
                    Ok(())
                } else {
                    Err(waiting)
                }
            },
        )
        .await;
        locker.commit().await.unwrap();
    };
    let ((events, _), ()) = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        futures::future::join(
            async { reader.peek(&start, &mut conn, 50).await.unwrap() },
            release,
        ),
    )
    .await
    .expect("the read waited on a read that never ends");
    drop(stalled_read);
    let log = crate::helpers::whole_log(&mut stalled_conn, 50).await;
    assert_eq!(places(&events), places(&log[..50]));
    assert_eq!(reader.rows_read(), 50);
}
