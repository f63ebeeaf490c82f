//! What the benchmarks share: a scratch database, command-line numbers and
//! percentiles. Each example compiles its own copy and uses part of it.
#![allow(dead_code)]

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

/// A migrated database of the benchmark's own; `drop` removes it.
pub struct ScratchDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    admin: PgConnection,
}

impl ScratchDb {
    /// Creates it from PODIUM_TEST_DATABASE_URL (default: the local
    /// `postgres` database) with a pool of `connections`.
    pub async fn create(connections: u32) -> anyhow::Result<Self> {
        let maintenance = std::env::var("PODIUM_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let name = format!("podium_bench_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&maintenance).await?;
        drop_abandoned(&mut admin).await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        let url = format!("{}/{name}", maintenance.rsplit_once('/').unwrap().0);
        let pool = PgPoolOptions::new()
            .max_connections(connections)
            .connect(&url)
            .await?;
        podium::ops::db::migrate(&pool).await?;
        Ok(Self {
            name,
            url,
            pool,
            admin,
        })
    }

    pub async fn drop(mut self) -> anyhow::Result<()> {
        self.pool.close().await;
        sqlx::query(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .execute(&mut self.admin)
            .await?;
        Ok(())
    }
}

/// Drops the scratch databases of earlier runs that were stopped before they
/// could (killed, or interrupted): those that no session uses. A database
/// that someone connects to meanwhile is left alone.
async fn drop_abandoned(admin: &mut PgConnection) -> anyhow::Result<()> {
    let abandoned: Vec<String> = sqlx::query_scalar(
        "SELECT datname FROM pg_database d
          WHERE datname LIKE 'podium\\_bench\\_%'
            AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datname = d.datname)",
    )
    .fetch_all(&mut *admin)
    .await?;
    for name in abandoned {
        match sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\""))
            .execute(&mut *admin)
            .await
        {
            Ok(_) => eprintln!("dropped {name}, left behind by an earlier run"),
            Err(err) => eprintln!("left {name} (an earlier run's) alone: {err}"),
        }
    }
    Ok(())
}

/// The numbers given on the command line, in order.
pub fn numeric_args() -> Vec<u64> {
    std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("arguments are whole numbers"))
        .collect()
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
