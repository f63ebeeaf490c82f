//! Read-model benchmark: replay throughput over a large log, and rank
//! lookups on a leaderboard of one test with as many entries.
//!
//!     cargo run --release --example read_model_bench -- [EVENTS] [LOOKUPS]
//!
//! Writes EVENTS `AttemptSubmitted` events (one test, one user each, scores
//! 0–100) straight into a scratch database's log with SQL, rebuilds every read
//! model with `podium::projector::replay` (as `podium replay --projection all` does),
//! then times LOOKUPS rank lookups of random users (entry and rank, and the
//! 5 neighbours above). Needs Postgres (PODIUM_TEST_DATABASE_URL).

use std::time::Instant;

use podium::projector::replay::{replay, Scope};
use podium_projections::leaderboard::LeaderboardQueries;
use uuid::Uuid;

mod support;
use support::{ms, numeric_args, percentile, ScratchDb};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = numeric_args();
    let events = *args.first().unwrap_or(&1_000_000);
    let lookups = *args.get(1).unwrap_or(&2_000);
    let db = ScratchDb::create(4).await?;
    let pool = db.pool.clone();
    let test_id = Uuid::new_v4();

    eprintln!("writing {events} events…");
    let started = Instant::now();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         SELECT 'Attempt', a.id::text, 2, 'AttemptSubmitted', '1.0',
                jsonb_build_object('AttemptSubmitted', jsonb_build_object(
                    'attempt_id', a.id, 'test_id', $1::uuid, 'user_id', 'user-' || a.i,
                    'answers', '{}'::jsonb, 'score', (a.i * 7919) % 101, 'max_score', 100,
                    'correct', ((a.i * 7919) % 101) / 10, 'question_count', 10, 'duration_ms', 60000,
                    'submitted_at', to_char((timestamptz '2026-01-01' + a.i * interval '1 second')
                                            AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'))),
                jsonb_build_object('actor', 'user-' || a.i, 'request_id', 'bench',
                                   'recorded_at', '2026-01-01T00:00:00Z')
           FROM (SELECT i, md5('attempt-' || i)::uuid AS id FROM generate_series(1, $2::bigint) i) a",
    )
    .bind(test_id)
    .bind(events as i64)
    .execute(&pool)
    .await?;
    eprintln!("written in {:.1} s", started.elapsed().as_secs_f64());

    let started = Instant::now();
    let mut progress = podium::projector::replay::stderr_progress();
    let rebuilt = replay(&pool, &Scope::All.read_models(), &mut progress).await?;
    let replay_secs = started.elapsed().as_secs_f64();
    assert!(rebuilt.iter().all(|r| r.checkpoint == events));

    let mut conn = pool.acquire().await?;
    let total = LeaderboardQueries::total(&mut *conn, test_id).await?;
    let mut rank_times = Vec::new();
    let mut around_times = Vec::new();
    let mut state = 0x2545F4914F6CDD1Du64;
    for _ in 0..lookups {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let user = format!("user-{}", 1 + state % events);
        let t = Instant::now();
        let entry = LeaderboardQueries::entry_of(&mut conn, test_id, &user)
            .await?
            .unwrap();
        rank_times.push(t.elapsed());
        let t = Instant::now();
        let above =
            LeaderboardQueries::above(&mut conn, test_id, &entry.entry.rank_key(), entry.rank, 5)
                .await?;
        around_times.push(t.elapsed());
        assert_eq!(above.len() as u64, (entry.rank - 1).min(5));
    }
    rank_times.sort();
    around_times.sort();
    let offset_probe = Instant::now();
    let deep = LeaderboardQueries::page_at_offset(&mut conn, test_id, total - 60, 50).await?;
    let offset_ms = ms(offset_probe.elapsed());
    assert_eq!(deep.len(), 50);

    println!("read-model benchmark ({events} AttemptSubmitted events, one test)");
    println!(
        "replay --projection all: {:.1} s, {:.0} events/s",
        replay_secs,
        events as f64 / replay_secs
    );
    println!(
        "rank lookup (entry + rank) on {total} entries: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({lookups} lookups)",
        ms(percentile(&rank_times, 0.5)),
        ms(percentile(&rank_times, 0.99)),
        ms(*rank_times.last().unwrap()),
    );
    println!(
        "5 neighbours above: p50 {:.2} ms, p99 {:.2} ms",
        ms(percentile(&around_times, 0.5)),
        ms(percentile(&around_times, 0.99)),
    );
    println!(
        "offset page of 50 at rank {}: {offset_ms:.2} ms",
        total - 59
    );
    drop(conn);
    drop(pool);
    db.drop().await?;
    Ok(())
}
