//! The port the rate limiter keeps its shared windows' counts through
//! ([`WindowStore`]), with its adapters side by side: the
//! `rate_limit_windows` table, shared by every instance ([`PgWindows`]), and
//! memory for the embedded mode, where this process is the only one
//! ([`MemoryWindows`]).

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use sqlx::PgPool;

use crate::ops::db::StoreError;

/// A fixed window, in seconds since the Unix epoch: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: u64,
    pub end: u64,
}

/// Where the windows' shared counts live.
#[async_trait]
pub trait WindowStore: Send + Sync {
    /// Takes up to `chunk` tokens from `bucket`'s count in `window`, never
    /// beyond `limit`: returns the tokens granted and the count after.
    async fn lease(
        &self,
        bucket: &str,
        window: Window,
        chunk: u32,
        limit: u32,
    ) -> Result<(u32, u32), StoreError>;

    /// Forgets the windows that ended by `now` (Unix seconds); returns how
    /// many.
    async fn purge_expired(&self, now: u64) -> Result<u64, StoreError>;
}

/// Windows in Postgres: one row per (bucket, window), leased atomically.
pub struct PgWindows {
    pub pool: PgPool,
}

#[async_trait]
impl WindowStore for PgWindows {
    async fn lease(
        &self,
        bucket: &str,
        window: Window,
        chunk: u32,
        limit: u32,
    ) -> Result<(u32, u32), StoreError> {
        let (granted, used): (i32, i32) = sqlx::query_as(
            "INSERT INTO rate_limit_windows AS w (bucket, window_start, used, last_grant, expires_at)
             VALUES ($1, $2, LEAST($3, $4), LEAST($3, $4), $5)
             ON CONFLICT (bucket, window_start) DO UPDATE
                SET used = LEAST(w.used + $3, $4), last_grant = LEAST(w.used + $3, $4) - w.used
             RETURNING last_grant, used",
        )
        .bind(bucket)
        .bind(window.start as i64)
        .bind(chunk as i32)
        .bind(limit as i32)
        .bind(window.end as i64)
        .fetch_one(&self.pool)
        .await?;
        Ok((granted.max(0) as u32, used.max(0) as u32))
    }

    async fn purge_expired(&self, now: u64) -> Result<u64, StoreError> {
        let deleted = sqlx::query("DELETE FROM rate_limit_windows WHERE expires_at < $1")
            .bind(now as i64)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(deleted)
    }
}

/// Windows in memory: (bucket, window start) → (count, window end).
#[derive(Default)]
pub struct MemoryWindows {
    windows: Mutex<HashMap<(String, u64), (u32, u64)>>,
}

impl MemoryWindows {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u64), (u32, u64)>> {
        self.windows.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl WindowStore for MemoryWindows {
    async fn lease(
        &self,
        bucket: &str,
        window: Window,
        chunk: u32,
        limit: u32,
    ) -> Result<(u32, u32), StoreError> {
        let mut windows = self.lock();
        let (used, _) = windows
            .entry((bucket.to_string(), window.start))
            .or_insert((0, window.end));
        let before = *used;
        *used = (before + chunk).min(limit);
        Ok((*used - before, *used))
    }

    async fn purge_expired(&self, now: u64) -> Result<u64, StoreError> {
        let mut windows = self.lock();
        let before = windows.len();
        windows.retain(|_, (_, ends)| *ends > now);
        Ok((before - windows.len()) as u64)
    }
}
