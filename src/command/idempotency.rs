//! Idempotency keys in memory, for the embedded mode (production keeps them
//! in the `idempotency_keys` table).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// A claimed key: the request's hash and, once answered, the answer.
#[derive(Clone)]
pub struct StoredKey {
    pub request_hash: Vec<u8>,
    pub answer: Option<(u16, Option<String>, Vec<u8>)>,
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
            let stored = StoredKey {
                request_hash: entry.request_hash,
                answer: Some((entry.status, entry.content_type, entry.body)),
                claimed,
            };
            keys.insert((entry.principal, entry.key), stored);
        }
        let fresh = path.with_extension("rewrite");
        let mut rewritten = std::fs::File::create(&fresh)
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

    /// Claims `key` unless another request holds it (answered within
    /// `retention`, or pending for less than `takeover`).
    pub fn claim(
        &self,
        key: (String, String),
        hash: &[u8],
        retention: Duration,
        takeover: Duration,
    ) -> bool {
        let mut keys = self.lock();
        let free = keys.get(&key).is_none_or(|held| {
            let age = held.claimed.elapsed();
            age > retention || (held.answer.is_none() && age > takeover)
        });
        if free {
            let claimed = StoredKey {
                request_hash: hash.to_vec(),
                answer: None,
                claimed: Instant::now(),
            };
            keys.insert(key, claimed);
        }
        free
    }

    pub fn get(&self, key: &(String, String)) -> Option<StoredKey> {
        self.lock().get(key).cloned()
    }

    pub fn answer(&self, key: &(String, String), answer: (u16, Option<String>, Vec<u8>)) {
        let mut keys = self.lock();
        let Some(held) = keys.get_mut(key) else {
            return;
        };
        if let Some(file) = &self.file {
            let line = KeyLine {
                principal: key.0.clone(),
                key: key.1.clone(),
                request_hash: held.request_hash.clone(),
                status: answer.0,
                content_type: answer.1.clone(),
                body: answer.2.clone(),
                at: unix_now().saturating_sub(held.claimed.elapsed().as_secs()),
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
        held.answer = Some(answer);
    }

    pub fn release(&self, key: &(String, String)) {
        self.lock().remove(key);
    }

    /// Forgets keys older than `retention`; returns how many.
    pub fn purge(&self, retention: Duration) -> u64 {
        let mut keys = self.lock();
        let before = keys.len();
        keys.retain(|_, held| held.claimed.elapsed() <= retention);
        (before - keys.len()) as u64
    }
}
