//! The embedded event store: the log in memory, optionally appended to a
//! local file (one line per command: the JSON array of its events, synced
//! before the command is answered)
//! and read back at start. It serves cqrs-es as a
//! [`PersistedEventRepository`] (optimistic concurrency per aggregate, like
//! postgres-es) and the projector as a gap-free log in commit order.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use chrono::{DateTime, Utc};
use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use cqrs_es::Aggregate;
use podium_domain::log::RecordedEvent;
use serde_json::Value;
use tokio::sync::watch;

/// How long [`MemLog::open`] waits for another process to let go of the file.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The whole log, in memory.
pub struct MemLog {
    state: Arc<Mutex<State>>,
    /// The seq of the last event appended.
    tail: Arc<watch::Sender<u64>>,
    /// The file, whose lock also puts appends in one order.
    file: Option<(PathBuf, Arc<Mutex<LogFile>>)>,
}

/// The log's file: locked against other processes, and as long as the
/// commits it holds whole.
struct LogFile {
    file: File,
    /// Where the last whole commit ends.
    good_len: u64,
    /// A failed write could not be cut back: nothing more is appended.
    broken: bool,
}

impl LogFile {
    /// Appends one commit's line and syncs it; on any failure (a full disk,
    /// a failed sync) cuts the file back to its last whole commit, so that
    /// the next start reads every command that was answered.
    fn append(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.broken {
            return Err(std::io::Error::other(
                "the event log file could not be repaired after a failed write; restart",
            ));
        }
        match self
            .file
            .write_all(line)
            .and_then(|()| self.file.sync_data())
        {
            Ok(()) => {
                self.good_len += line.len() as u64;
                Ok(())
            }
            Err(err) => {
                let repaired = self
                    .file
                    .set_len(self.good_len)
                    .and_then(|()| self.file.sync_data());
                if let Err(repair) = repaired {
                    tracing::error!(%repair, "cannot cut the event log back after a failed write");
                    self.broken = true;
                }
                Err(err)
            }
        }
    }
}

/// The log in memory, compact: names interned, payload and metadata kept
/// as JSON text and decoded when read (a decoded `serde_json::Value` takes
/// several times the room).
#[derive(Default)]
struct State {
    events: Vec<Stored>,
    /// Indexes into `events` per aggregate type and id, in sequence order.
    streams: HashMap<Arc<str>, HashMap<Arc<str>, Vec<u32>>>,
    /// Aggregate types, event types and versions: few distinct ones.
    names: HashSet<Arc<str>>,
}

struct Stored {
    aggregate_type: Arc<str>,
    aggregate_id: Arc<str>,
    sequence: u64,
    event_type: Arc<str>,
    event_version: Arc<str>,
    payload: Box<str>,
    metadata: Box<str>,
    recorded_at: DateTime<Utc>,
}

impl Stored {
    fn recorded(&self, seq: u64) -> RecordedEvent {
        RecordedEvent {
            seq,
            position: seq as i64,
            aggregate_type: self.aggregate_type.to_string(),
            aggregate_id: self.aggregate_id.to_string(),
            sequence: self.sequence,
            event_type: self.event_type.to_string(),
            event_version: self.event_version.to_string(),
            // Written from valid JSON values by `State::push`.
            payload: serde_json::value::RawValue::from_string(self.payload.to_string())
                .expect("stored from a valid payload"),
            metadata: serde_json::from_str(&self.metadata).unwrap_or_default(),
            recorded_at: self.recorded_at,
        }
    }
}

impl State {
    fn name(&mut self, name: &str) -> Arc<str> {
        if let Some(known) = self.names.get(name) {
            return known.clone();
        }
        let name: Arc<str> = name.into();
        self.names.insert(name.clone());
        name
    }

    fn push(&mut self, event: &RecordedEvent) {
        let index = self.events.len() as u32;
        let aggregate_type = self.name(&event.aggregate_type);
        let ids = self.streams.entry(aggregate_type.clone()).or_default();
        let aggregate_id = match ids.get_key_value(event.aggregate_id.as_str()) {
            Some((id, _)) => id.clone(),
            None => Arc::from(event.aggregate_id.as_str()),
        };
        ids.entry(aggregate_id.clone()).or_default().push(index);
        let stored = Stored {
            aggregate_type,
            aggregate_id,
            sequence: event.sequence,
            event_type: self.name(&event.event_type),
            event_version: self.name(&event.event_version),
            payload: event.payload.get().into(),
            metadata: serde_json::to_string(&event.metadata)
                .unwrap_or_default()
                .into(),
            recorded_at: event.recorded_at,
        };
        self.events.push(stored);
    }

    /// One aggregate's events with their seqs, in sequence order.
    fn stream(&self, aggregate_type: &str, id: &str) -> impl Iterator<Item = (u64, &Stored)> {
        self.streams
            .get(aggregate_type)
            .and_then(|ids| ids.get(id))
            .into_iter()
            .flatten()
            .map(|&i| (u64::from(i) + 1, &self.events[i as usize]))
    }
}

impl MemLog {
    /// An empty log that lives in memory only.
    pub fn in_memory() -> Self {
        Self {
            state: Arc::default(),
            tail: Arc::new(watch::channel(0).0),
            file: None,
        }
    }

    /// The log kept in `path`: its events are read back (a line torn by a
    /// crash at the very end is dropped), new ones are appended. The file is
    /// locked for this process; one still held by another (a previous
    /// process shutting down) is waited for up to [`LOCK_WAIT`].
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut options = OpenOptions::new();
        options.create(true).read(true).append(true);
        // It holds answer keys: readable by its owner only.
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options
            .open(path)
            .with_context(|| format!("cannot open the event log {}", path.display()))?;
        let waited = std::time::Instant::now();
        while file.try_lock().is_err() {
            anyhow::ensure!(
                waited.elapsed() < LOCK_WAIT,
                "{} is in use by another Podium process: one file, one process",
                path.display()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let mut state = State::default();
        let mut good_len = 0u64;
        let mut lines = BufReader::new(&file).split(b'\n').enumerate().peekable();
        while let Some((number, line)) = lines.next() {
            let line = line.with_context(|| format!("cannot read {}", path.display()))?;
            let last = lines.peek().is_none();
            match serde_json::from_slice::<Vec<RecordedEvent>>(&line) {
                Ok(commit) => {
                    for event in commit {
                        anyhow::ensure!(
                            event.seq == state.events.len() as u64 + 1,
                            "{}: event seq {} follows seq {}: the file is not a Podium log",
                            path.display(),
                            event.seq,
                            state.events.len()
                        );
                        state.push(&event);
                    }
                }
                // Only the last line can be torn (a crash while appending):
                // that command was never answered, and it is dropped whole.
                Err(_) if last => {
                    tracing::warn!(path = %path.display(), "dropping a torn last line of the event log");
                    break;
                }
                Err(err) => anyhow::bail!(
                    "{}: line {} is not an event: {err}",
                    path.display(),
                    number + 1
                ),
            }
            good_len += line.len() as u64 + 1;
        }
        let file_len = file.metadata()?.len();
        if good_len > file_len {
            // The last commit is whole but its newline was not written.
            file.write_all(b"\n")?;
        } else {
            file.set_len(good_len)?;
        }
        file.sync_data()?;
        let last = state.events.len() as u64;
        let file = LogFile {
            file,
            good_len,
            broken: false,
        };
        Ok(Self {
            state: Arc::new(Mutex::new(state)),
            tail: Arc::new(watch::channel(last).0),
            file: Some((path.to_path_buf(), Arc::new(Mutex::new(file)))),
        })
    }

    /// Where the log is kept, if not in memory only.
    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(|(path, _)| path.as_path())
    }

    /// The seq of the last event appended (0 before any).
    pub fn last(&self) -> u64 {
        *self.tail.borrow()
    }

    /// Follows the seq of the last event appended.
    pub fn tail(&self) -> watch::Receiver<u64> {
        self.tail.subscribe()
    }

    /// Up to `limit` events after seq `after`.
    pub fn read_after(&self, after: u64, limit: usize) -> Vec<RecordedEvent> {
        let state = self.lock();
        let start = (after as usize).min(state.events.len());
        state.events[start..]
            .iter()
            .take(limit)
            .enumerate()
            .map(|(i, stored)| stored.recorded(after + 1 + i as u64))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Appends one aggregate's new events if nobody appended to it since
    /// they were decided (else `OptimisticLockError`, as postgres-es). With
    /// a file, the whole append runs on a blocking thread, off the runtime's,
    /// and to its end even if the caller stops waiting: the line written and
    /// the events in memory never part.
    async fn append(&self, events: &[SerializedEvent]) -> Result<(), PersistenceError> {
        if events.is_empty() {
            return Ok(());
        }
        let Some((_, file)) = &self.file else {
            return commit(&self.state, &self.tail, None, events);
        };
        let (state, tail, file) = (self.state.clone(), self.tail.clone(), file.clone());
        let events = events.to_vec();
        tokio::task::spawn_blocking(move || commit(&state, &tail, Some(&file), &events))
            .await
            .map_err(|e| PersistenceError::UnknownError(Box::new(e)))?
    }

    fn events_of(&self, aggregate_type: &str, id: &str, after: usize) -> Vec<SerializedEvent> {
        self.lock()
            .stream(aggregate_type, id)
            .filter(|(_, e)| e.sequence as usize > after)
            .map(|(seq, e)| e.recorded(seq).serialized())
            .collect()
    }

    fn replay(events: Vec<SerializedEvent>) -> ReplayStream {
        let (mut feed, stream) = ReplayStream::new(events.len().max(1));
        tokio::spawn(async move {
            for event in events {
                if feed.push(Ok(event)).await.is_err() {
                    return;
                }
            }
        });
        stream
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Appends `events` (one aggregate's, decided together) to `state` and, if
/// there is one, to `file` first, durably: the file's lock keeps appends in
/// one order while the state is locked only to check and to add, never
/// across the write.
fn commit(
    state: &Mutex<State>,
    tail: &watch::Sender<u64>,
    file: Option<&Mutex<LogFile>>,
    events: &[SerializedEvent],
) -> Result<(), PersistenceError> {
    let first = &events[0];
    let mut file = file.map(lock);
    let mut held = lock(state);
    let current = held
        .stream(&first.aggregate_type, &first.aggregate_id)
        .count();
    if first.sequence != current + 1 {
        return Err(PersistenceError::OptimisticLockError);
    }
    let base = held.events.len() as u64;
    let now = crate::clock::now();
    let recorded: Vec<RecordedEvent> = events
        .iter()
        .enumerate()
        .map(|(i, e)| RecordedEvent {
            seq: base + 1 + i as u64,
            position: (base + 1 + i as u64) as i64,
            aggregate_type: e.aggregate_type.clone(),
            aggregate_id: e.aggregate_id.clone(),
            sequence: e.sequence as u64,
            event_type: e.event_type.clone(),
            event_version: e.event_version.clone(),
            payload: podium_domain::log::payload_of(&e.payload),
            metadata: serde_json::from_value(e.metadata.clone()).unwrap_or_default(),
            recorded_at: now,
        })
        .collect();
    if let Some(file) = file.as_mut() {
        // Readers wait for nothing while the line is written: the file's
        // lock alone keeps the next append behind this one.
        drop(held);
        // One line per commit, so that a torn write loses it whole.
        let mut line = serde_json::to_vec(&recorded)
            .map_err(|e| PersistenceError::UnknownError(Box::new(e)))?;
        line.push(b'\n');
        // Durable before anyone sees the events (or the command is answered).
        file.append(&line)
            .map_err(|e| PersistenceError::ConnectionError(Box::new(e)))?;
        held = lock(state);
    }
    for event in &recorded {
        held.push(event);
    }
    drop(held);
    tail.send_replace(base + recorded.len() as u64);
    Ok(())
}

/// [`MemLog`] as cqrs-es sees it.
impl PersistedEventRepository for MemLog {
    async fn get_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        Ok(self.events_of(A::TYPE, aggregate_id, 0))
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        Ok(self.events_of(A::TYPE, aggregate_id, last_sequence))
    }

    async fn get_snapshot<A: Aggregate>(
        &self,
        _aggregate_id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        Ok(None)
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        _snapshot_update: Option<(String, Value, usize)>,
    ) -> Result<(), PersistenceError> {
        self.append(events).await
    }

    async fn stream_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        Ok(Self::replay(self.events_of(A::TYPE, aggregate_id, 0)))
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        let events = self
            .lock()
            .events
            .iter()
            .enumerate()
            .filter(|(_, e)| &*e.aggregate_type == A::TYPE)
            .map(|(i, e)| e.recorded(i as u64 + 1).serialized())
            .collect();
        Ok(Self::replay(events))
    }
}

#[cfg(test)]
mod tests {
    use podium_domain::test::Test;

    use super::*;

    fn event(aggregate_id: &str) -> SerializedEvent {
        SerializedEvent {
            aggregate_id: aggregate_id.into(),
            sequence: 1,
            aggregate_type: "Test".into(),
            event_type: "TestArchived".into(),
            event_version: "1.0".into(),
            payload: serde_json::json!({"TestArchived": {"test_id": uuid::Uuid::nil()}}),
            metadata: serde_json::json!({}),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_append_whose_caller_stops_waiting_still_lands_whole() {
        let dir = std::env::temp_dir().join(format!("podium-memlog-{}", uuid::Uuid::new_v4()));
        let path = dir.join("events.jsonl");
        let log = MemLog::open(&path).await.unwrap();
        // The caller gives up as soon as the append has started.
        let first = [event("a")];
        let appending = log.persist::<Test>(&first, None);
        let _ = tokio::time::timeout(std::time::Duration::from_nanos(1), appending).await;
        log.persist::<Test>(&[event("b")], None).await.unwrap();
        let mut tail = log.tail();
        let both = tail.wait_for(|last| *last == 2);
        tokio::time::timeout(std::time::Duration::from_secs(10), both)
            .await
            .expect("both appends land")
            .unwrap();
        let seqs: Vec<u64> = log.read_after(0, 10).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2]);
        drop(log);
        // Read back: two commits, in order, nothing torn or doubled.
        let again = MemLog::open(&path).await.unwrap();
        let ids: Vec<String> = again
            .read_after(0, 10)
            .iter()
            .map(|e| format!("{}:{}", e.seq, e.aggregate_id))
            .collect();
        assert_eq!(ids.len(), 2, "{ids:?}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
