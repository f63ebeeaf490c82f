//! Idempotency keys: the port the HTTP middleware keeps them through
//! ([`IdempotencyStore`]), and its adapters side by side — the
//! `idempotency_keys` table ([`PgIdempotencyKeys`]) and, for the embedded
//! mode, memory with an optional file ([`IdempotencyKeys`]).
//!
//! A key is claimed by the first request that carries it; its answer is
//! stored when it has one; a retry with the same key gets that answer. Keys
//! are kept for [`RETENTION`]; a claim left unanswered (its process died) is
//! taken over after [`PENDING_TAKEOVER`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::PgPool;

use crate::ops::db::StoreError;

/// How long an answered key is kept.
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);
/// How long a claim may stay unanswered before another request takes it.
pub const PENDING_TAKEOVER: Duration = Duration::from_secs(60);

/// A stored answer: status, content type and body.
#[derive(Debug, Clone)]
pub struct StoredAnswer {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

/// A claimed key: the hash of the request that claimed it and, once
/// answered, its answer.
#[derive(Debug, Clone)]
pub struct Held {
    pub request_hash: Vec<u8>,
    pub answer: Option<StoredAnswer>,
}

/// Where idempotency keys are kept, per (principal, key).
#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// Claims the key for a request hashing to `hash`: true if it was free
    /// (or expired, or left pending too long), false if another holds it.
    async fn claim(&self, principal: &str, key: &str, hash: &[u8]) -> Result<bool, StoreError>;
    /// What holds the key, if anything.
    async fn held(&self, principal: &str, key: &str) -> Result<Option<Held>, StoreError>;
    /// Stores the answer of the request that claimed the key.
    async fn answer(
        &self,
        principal: &str,
        key: &str,
        answer: StoredAnswer,
    ) -> Result<(), StoreError>;
    /// Frees a claimed key so that a retry runs again.
    async fn release(&self, principal: &str, key: &str) -> Result<(), StoreError>;
    /// Forgets keys older than [`RETENTION`]; returns how many.
    async fn purge_expired(&self) -> Result<u64, StoreError>;
}

/// Keys in the `idempotency_keys` table, shared by every instance.
pub struct PgIdempotencyKeys {
    pub pool: PgPool,
}

/// [`RETENTION`] and [`PENDING_TAKEOVER`] as Postgres intervals.
const RETENTION_SQL: &str = "24 hours";
const PENDING_TAKEOVER_SQL: &str = "60 seconds";

#[async_trait]
impl IdempotencyStore for PgIdempotencyKeys {
    async fn claim(&self, principal: &str, key: &str, hash: &[u8]) -> Result<bool, StoreError> {
        let claimed = sqlx::query(&format!(
            "INSERT INTO idempotency_keys (principal, key, request_hash) VALUES ($1, $2, $3)
             ON CONFLICT (principal, key) DO UPDATE
                SET request_hash = EXCLUDED.request_hash, status = NULL, content_type = NULL,
                    body = NULL, created_at = now()
              WHERE idempotency_keys.created_at < now() - interval '{RETENTION_SQL}'
                 OR (idempotency_keys.status IS NULL
                     AND idempotency_keys.created_at < now() - interval '{PENDING_TAKEOVER_SQL}')
             RETURNING 1"
        ))
        .bind(principal)
        .bind(key)
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(claimed.is_some())
    }

    async fn held(&self, principal: &str, key: &str) -> Result<Option<Held>, StoreError> {
        type Row = (Vec<u8>, Option<i16>, Option<String>, Option<Vec<u8>>);
        let row: Option<Row> = sqlx::query_as(
            "SELECT request_hash, status, content_type, body FROM idempotency_keys
              WHERE principal = $1 AND key = $2",
        )
        .bind(principal)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(request_hash, status, content_type, body)| Held {
            request_hash,
            answer: status.map(|status| StoredAnswer {
                status: status as u16,
                content_type,
                body: body.unwrap_or_default(),
            }),
        }))
    }

    async fn answer(
        &self,
        principal: &str,
        key: &str,
        answer: StoredAnswer,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE idempotency_keys SET status = $3, content_type = $4, body = $5
              WHERE principal = $1 AND key = $2",
        )
        .bind(principal)
        .bind(key)
        .bind(answer.status as i16)
        .bind(answer.content_type)
        .bind(answer.body)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn release(&self, principal: &str, key: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM idempotency_keys WHERE principal = $1 AND key = $2")
            .bind(principal)
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        let result = sqlx::query(&format!(
            "DELETE FROM idempotency_keys WHERE created_at < now() - interval '{RETENTION_SQL}'"
        ))
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }
}

/// Idempotency keys in memory (the `idempotency_keys` table of production),
/// and, beside a file-backed log, in a file of answered keys, so that a
/// retry after a restart still gets the first answer.
#[derive(Default)]
pub struct IdempotencyKeys {
    keys: Mutex<HashMap<(String, String), StoredKey>>,
    file: Option<Mutex<std::fs::File>>,
}

/// An answered key as its file keeps it.
#[derive(serde::Serialize, serde::Deserialize)]
struct KeyLine {
    principal: String,
    key: String,
    request_hash: Vec<u8>,
    status: u16,
    content_type: Option<String>,
    body: Vec<u8>,
    /// When it was claimed, in seconds since the Unix epoch.
    at: u64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// A claimed key and when it was claimed.
struct StoredKey {
    held: Held,
    claimed: Instant,
}

impl IdempotencyKeys {
    /// Keys answered within `retention`, read back from `path`; new answers
    /// are appended to it. The file is rewritten at start with the keys
    /// still kept (so it does not grow forever); an unreadable line (one
    /// torn by a crash) is dropped: that key's retry would only run again.
    pub fn open(path: &std::path::Path, retention: Duration) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        use std::io::Write as _;
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
        };
        let now = unix_now();
        let mut keys = HashMap::new();
        let mut kept = Vec::new();
        for line in text.lines() {
            let Ok(entry) = serde_json::from_str::<KeyLine>(line) else {
                continue;
            };
            let age = Duration::from_secs(now.saturating_sub(entry.at));
            let Some(claimed) = Instant::now().checked_sub(age).filter(|_| age <= retention) else {
                continue;
            };
            kept.extend_from_slice(line.as_bytes());
            kept.push(b'\n');
            let held = Held {
                request_hash: entry.request_hash,
                answer: Some(StoredAnswer {
                    status: entry.status,
                    content_type: entry.content_type,
                    body: entry.body,
                }),
            };
            let stored = StoredKey { held, claimed };
            keys.insert((entry.principal, entry.key), stored);
        }
        let fresh = path.with_extension("rewrite");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        // Answers can hold what a user may see alone: owner only.
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut rewritten = options
            .open(&fresh)
            .with_context(|| format!("cannot write {}", fresh.display()))?;
        rewritten.write_all(&kept)?;
        rewritten.sync_data()?;
        std::fs::rename(&fresh, path)
            .with_context(|| format!("cannot replace {}", path.display()))?;
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        Ok(Self {
            keys: Mutex::new(keys),
            file: Some(Mutex::new(file)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), StoredKey>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl IdempotencyStore for IdempotencyKeys {
    async fn claim(&self, principal: &str, key: &str, hash: &[u8]) -> Result<bool, StoreError> {
        let mut keys = self.lock();
        let pair = (principal.to_string(), key.to_string());
        let free = keys.get(&pair).is_none_or(|stored| {
            let age = stored.claimed.elapsed();
            age > RETENTION || (stored.held.answer.is_none() && age > PENDING_TAKEOVER)
        });
        if free {
            let held = Held {
                request_hash: hash.to_vec(),
                answer: None,
            };
            let claimed = Instant::now();
            keys.insert(pair, StoredKey { held, claimed });
        }
        Ok(free)
    }

    async fn held(&self, principal: &str, key: &str) -> Result<Option<Held>, StoreError> {
        let pair = (principal.to_string(), key.to_string());
        Ok(self.lock().get(&pair).map(|stored| stored.held.clone()))
    }

    async fn answer(
        &self,
        principal: &str,
        key: &str,
        answer: StoredAnswer,
    ) -> Result<(), StoreError> {
        let mut keys = self.lock();
        let Some(stored) = keys.get_mut(&(principal.to_string(), key.to_string())) else {
            return Ok(());
        };
        if let Some(file) = &self.file {
            let line = KeyLine {
                principal: principal.to_string(),
                key: key.to_string(),
                request_hash: stored.held.request_hash.clone(),
                status: answer.status,
                content_type: answer.content_type.clone(),
                body: answer.body.clone(),
                at: unix_now().saturating_sub(stored.claimed.elapsed().as_secs()),
            };
            let written = serde_json::to_vec(&line).map(|mut bytes| {
                bytes.push(b'\n');
                use std::io::Write as _;
                let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
                file.write_all(&bytes)
            });
            if !matches!(written, Ok(Ok(()))) {
                tracing::warn!(
                    "cannot store an idempotent answer; a retry after a restart runs again"
                );
            }
        }
        stored.held.answer = Some(answer);
        Ok(())
    }

    async fn release(&self, principal: &str, key: &str) -> Result<(), StoreError> {
        self.lock()
            .remove(&(principal.to_string(), key.to_string()));
        Ok(())
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        let mut keys = self.lock();
        let before = keys.len();
        keys.retain(|_, stored| stored.claimed.elapsed() <= RETENTION);
        Ok((before - keys.len()) as u64)
    }
}
