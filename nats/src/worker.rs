//! The projection-worker runtime.
//!
//! A worker feeds one [`Projection`] from the events stream. Its position is
//! the projection's own checkpoint, never a consumer's acknowledgement state:
//! it reads the checkpoint, finds the stream message holding the next event
//! ([`EventBus::position_of`]) and reads on from there with an ordered
//! consumer (no acknowledgements, recreated by the client on any gap).
//! Whatever has arrived is applied as one batch, up to `batch_size`, in one
//! transaction with the checkpoint. Events the projection does not want are
//! held back until a batch that it does want, or a quiet moment, takes them
//! along: they change nothing, and committing each by itself would cost the
//! database a transaction apiece.
//!
//! Order is sacred. Log seqs are contiguous, so the worker knows exactly which
//! event comes next (`checkpoint + 1`): events at or below the checkpoint are
//! repeats and are passed over, and an event from further ahead means the
//! reader is misplaced (the checkpoint moved under it, or the stream was
//! recreated), so it finds its place again.
//!
//! Failures come in two kinds. A transient one (Postgres unreachable,
//! restarting, out of connections; see [`podium_projections::is_transient`])
//! is retried with backoff for as long as it lasts and never counts against
//! the event. An event that fails by itself is retried `max_failures` times,
//! then published to the dead-letter stream with its error, and the
//! [`DeadLetterPolicy`] decides whether the worker stops (default) or skips it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::Message;
use futures::StreamExt;
use podium_domain::log::{Change, RecordedEvent};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::backoff::{stopped_during, Backoff};
use crate::bus::StreamPosition;
use crate::EventBus;

/// What a projection reports after committing a batch.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// Its checkpoint after the batch.
    pub checkpoint: u64,
    /// What changed, to announce on NATS.
    pub changes: Vec<Change>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// The events handed over do not start right after the checkpoint
    /// (another worker moved it, or an earlier event is missing).
    #[error("the projection is at seq {checkpoint}; the events start later")]
    Gap { checkpoint: u64 },
    /// A passing failure of the infrastructure: the same events may be
    /// applied later as they are.
    #[error("{0} (transient)")]
    Transient(String),
    /// Another instance owns the projection now.
    #[error("{0}")]
    Fenced(String),
    #[error("{0}")]
    Failed(String),
}

/// A read model fed by the worker. Implementations keep their checkpoint in
/// the same store and transaction as their read model.
pub trait Projection: Send + Sync + 'static {
    fn name(&self) -> &str;

    /// The seq of the last event applied (0 before any).
    fn checkpoint(&self) -> impl Future<Output = Result<u64, ProjectionError>> + Send;

    /// Applies events of consecutive seqs, skipping those at or below the
    /// checkpoint, and advances the checkpoint — all or nothing.
    fn apply(
        &self,
        events: &[RecordedEvent],
    ) -> impl Future<Output = Result<Applied, ProjectionError>> + Send;

    /// Whether events of this type can change the read model. The worker
    /// hands those it does not want to [`Self::apply`] undecoded, as
    /// [`RecordedEvent::passed_over`]: their seq and type, no payload.
    fn wants(&self, aggregate_type: &str, event_type: &str) -> bool {
        let _ = (aggregate_type, event_type);
        true
    }

    /// Moves the checkpoint past `seq` without applying it (the skip policy).
    fn skip(&self, seq: u64) -> impl Future<Output = Result<(), ProjectionError>> + Send;

    /// Records a dead letter where operators list it, before it goes to the
    /// dead-letter stream. Nowhere, unless the projection keeps them.
    fn record_dead_letter(
        &self,
        letter: &DeadLetter,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send {
        let _ = letter;
        async { Ok(()) }
    }
}

/// An event a projection gave up on, as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub seq: u64,
    /// The event's type, or `(undecodable)`.
    pub event_type: String,
    pub error: String,
    /// Failures of this delivery of it.
    pub failures: u32,
    /// Whether the worker skips it by itself (the skip policy).
    pub skipped: bool,
}

/// What a worker does once an event has failed `max_failures` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeadLetterPolicy {
    /// Stop and report: skipping an event would corrupt the read model.
    #[default]
    Stop,
    /// Dead-letter it and go on with the next event.
    Skip,
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Most events applied in one transaction.
    pub batch_size: usize,
    /// Failures of one event (not counting transient ones) before it is
    /// dead-lettered.
    pub max_failures: u32,
    /// First retry delay; doubles per failure up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub policy: DeadLetterPolicy,
    /// How long the stream must be quiet before held-back events the
    /// projection does not want move the checkpoint by themselves, and how
    /// long they wait at most.
    pub hold_quiet: Duration,
    pub hold_max: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            max_failures: 5,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            policy: DeadLetterPolicy::Stop,
            hold_quiet: Duration::from_millis(10),
            hold_max: Duration::from_millis(250),
        }
    }
}

/// Counters for metrics, shared with whoever exports them.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub applied: AtomicU64,
    /// Events read again that were at or below the checkpoint (passed over).
    pub repeats: AtomicU64,
    /// Events that arrived ahead of their turn; each sends the reader to
    /// find its place again.
    pub out_of_order: AtomicU64,
    /// Failed applications of an event that will be retried.
    pub retries: AtomicU64,
    /// Transient failures (the database away, say), retried without limit.
    pub transient_retries: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub checkpoint: AtomicU64,
    /// Duration of the last successful apply, in microseconds.
    pub last_apply_micros: AtomicU64,
    /// Whether the last batch took everything the stream had (false while a
    /// backlog is being worked off).
    pub caught_up: AtomicBool,
    /// Events after the checkpoint that the projection does not want, held
    /// back to go in with a later batch.
    pub held: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("NATS: {0}")]
    Bus(String),
    #[error("projection {projection}: {error}")]
    Projection { projection: String, error: String },
    #[error("projection {projection} stopped at seq {seq} after {attempts} failures: {error}")]
    Halted {
        projection: String,
        seq: u64,
        attempts: u32,
        error: String,
    },
    /// The stream has lost events the projection still needs.
    #[error(
        "projection {projection} needs seq {wanted}, but the events stream keeps only seq \
         {first_kept} and later (trimmed by its limits, or recreated): rebuild it with `podium replay`"
    )]
    Missing {
        projection: String,
        wanted: u64,
        first_kept: u64,
    },
    /// Another instance took the projection over.
    #[error("projection {projection}: {error}")]
    Fenced { projection: String, error: String },
}

/// One message read with the seq it carries.
struct Delivery {
    seq: u64,
    event: Result<RecordedEvent, String>,
    /// Whether the projection wants it (false: passed over undecoded).
    wanted: bool,
}

/// Why reading stopped.
enum Interrupted {
    Stop,
    /// The reader must find its place again (after a pause when `pause`).
    Reposition {
        pause: bool,
    },
}

pub struct Worker<P> {
    bus: EventBus,
    projection: Arc<P>,
    config: WorkerConfig,
    stats: Arc<WorkerStats>,
    checkpoint: u64,
    failures: HashMap<u64, u32>,
    /// The last change announced per topic and key.
    announced: Announced,
    /// Events right after the checkpoint that the projection does not want,
    /// held back rather than committed in a transaction of their own: they
    /// go in with the next batch that changes something, or by themselves
    /// once the stream falls quiet or they have waited long enough
    /// ([`WorkerConfig::hold_quiet`], [`WorkerConfig::hold_max`]).
    deferred: Deferred,
}

/// Unwanted events waiting to move the checkpoint.
#[derive(Default)]
struct Deferred {
    events: Vec<Delivery>,
    /// When the first of them was held back.
    since: Option<tokio::time::Instant>,
    /// When the last message arrived.
    last_arrival: Option<tokio::time::Instant>,
}

impl Deferred {
    /// When they are to be written by themselves, if any wait.
    fn due(&self, config: &WorkerConfig) -> Option<tokio::time::Instant> {
        let since = self.since?;
        let quiet = self.last_arrival.unwrap_or(since) + config.hold_quiet;
        Some(quiet.min(since + config.hold_max))
    }
}

/// The seq of the last change this worker announced per topic and key, so
/// that each change names its predecessor ([`Change::prev`]) and a
/// subscriber can tell when one was lost on the way. Bounded: past
/// [`Announced::MAX_KEYS`] it starts over, and the next change of each key
/// names none.
#[derive(Default)]
struct Announced {
    /// By topic, then key (looked up without allocating).
    last: HashMap<String, HashMap<String, u64>>,
    keys: usize,
}

impl Announced {
    const MAX_KEYS: usize = 100_000;

    /// `change`'s predecessor, remembering `change` as the last.
    fn stamp(&mut self, change: &Change) -> Option<u64> {
        let seen = self
            .last
            .get_mut(change.topic.as_str())
            .and_then(|keys| keys.get_mut(change.key.as_str()));
        if let Some(last) = seen {
            let prev = *last;
            *last = prev.max(change.seq);
            return (prev < change.seq).then_some(prev);
        }
        if self.keys >= Self::MAX_KEYS {
            self.last.clear();
            self.keys = 0;
        }
        self.keys += 1;
        self.last
            .entry(change.topic.clone())
            .or_default()
            .insert(change.key.clone(), change.seq);
        None
    }
}

impl<P: Projection> Worker<P> {
    pub fn new(bus: EventBus, projection: Arc<P>, config: WorkerConfig) -> Self {
        Self {
            bus,
            projection,
            config,
            stats: Arc::default(),
            checkpoint: 0,
            failures: HashMap::new(),
            announced: Announced::default(),
            deferred: Deferred::default(),
        }
    }

    pub fn stats(&self) -> Arc<WorkerStats> {
        self.stats.clone()
    }

    /// Counts into `stats` (kept across the restarts of a supervised worker).
    pub fn sharing_stats(mut self, stats: Arc<WorkerStats>) -> Self {
        self.stats = stats;
        self
    }

    fn name(&self) -> String {
        self.projection.name().to_string()
    }

    /// Consumes until `stop` is cancelled (finishing the batch in hand), the
    /// projection halts on a dead letter, another instance fences it off, or
    /// the stream turns out to lack events it needs.
    pub async fn run(mut self, stop: CancellationToken) -> Result<(), WorkerError> {
        let mut backoff = Backoff::new(self.config.backoff_base, self.config.backoff_max);
        self.checkpoint = loop {
            match self.projection.checkpoint().await {
                Ok(checkpoint) => break checkpoint,
                Err(ProjectionError::Fenced(error)) => {
                    return Err(WorkerError::Fenced {
                        projection: self.name(),
                        error,
                    })
                }
                Err(err) => {
                    self.stats.transient_retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(projection = self.projection.name(), %err, "cannot read the checkpoint; retrying");
                    if backoff.wait(&stop).await {
                        return Ok(());
                    }
                }
            }
        };
        self.stats
            .checkpoint
            .store(self.checkpoint, Ordering::Relaxed);
        let mut backoff = Backoff::new(self.config.backoff_base, self.config.backoff_max);
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            match self.read(&stop).await {
                Ok(Interrupted::Stop) => return Ok(()),
                Ok(Interrupted::Reposition { pause: false }) => backoff.reset(),
                Ok(Interrupted::Reposition { pause: true }) => {
                    if backoff.wait(&stop).await {
                        return Ok(());
                    }
                }
                Err(WorkerError::Bus(err)) => {
                    tracing::warn!(projection = self.projection.name(), %err, "cannot read the events stream; retrying");
                    if backoff.wait(&stop).await {
                        return Ok(());
                    }
                }
                Err(other) => return Err(other),
            }
        }
    }

    /// Finds the next event on the stream and applies what follows, until
    /// interrupted.
    async fn read(&mut self, stop: &CancellationToken) -> Result<Interrupted, WorkerError> {
        let bus = |e: async_nats::Error| WorkerError::Bus(e.to_string());
        // Reading starts again right after the checkpoint: what was held
        // back comes again.
        self.deferred = Deferred::default();
        self.stats.held.store(0, Ordering::Relaxed);
        let start = match self
            .bus
            .position_of(self.checkpoint + 1)
            .await
            .map_err(|e| WorkerError::Bus(e.to_string()))?
        {
            StreamPosition::At(sequence) | StreamPosition::Await(sequence) => sequence,
            StreamPosition::Missing { wanted, first_kept } => {
                return Err(WorkerError::Missing {
                    projection: self.name(),
                    wanted,
                    first_kept,
                })
            }
        };
        let stream = self
            .bus
            .events_stream()
            .await
            .map_err(|e| WorkerError::Bus(e.to_string()))?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: self.bus.subjects().all_events(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| bus(e.into()))?;
        let messages = consumer.messages().await.map_err(|e| bus(e.into()))?;
        let mut chunks = messages.ready_chunks(self.config.batch_size);
        loop {
            let due = self.deferred.due(&self.config);
            let chunk = tokio::select! {
                chunk = chunks.next() => chunk,
                () = stop.cancelled() => return Ok(Interrupted::Stop),
                () = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                    let held = self.take_held();
                    if let Some(interrupted) = self.apply_run(held, stop).await? {
                        return Ok(interrupted);
                    }
                    continue;
                }
                // A consumer left unread too long is dropped by the server,
                // and the client does not always notice: after a quiet
                // spell, find the place again with a fresh one.
                () = tokio::time::sleep(QUIET_RECHECK) => {
                    return Ok(Interrupted::Reposition { pause: false });
                }
            };
            let Some(mut chunk) = chunk else {
                return Ok(Interrupted::Reposition { pause: true });
            };
            self.deferred.last_arrival = Some(tokio::time::Instant::now());
            // Behind (the server holds more for this consumer): gather what
            // follows up to a full batch, so that a backlog is worked off in
            // large transactions while live events still go one by one.
            let gathering = tokio::time::Instant::now() + GATHER_WAIT;
            while chunk.len() < self.config.batch_size && pending(&chunk) > 0 {
                match tokio::time::timeout_at(gathering, chunks.next()).await {
                    Ok(Some(more)) => chunk.extend(more),
                    Ok(None) | Err(_) => break,
                }
            }
            let full = pending(&chunk) >= BACKLOG;
            let mut deliveries = Vec::with_capacity(chunk.len());
            let mut broken = false;
            for message in chunk {
                match message {
                    Ok(message) => deliveries.push(self.delivery(&message)),
                    Err(err) => {
                        tracing::warn!(projection = self.projection.name(), %err, "reading the stream was interrupted");
                        broken = true;
                        break;
                    }
                }
            }
            self.stats.caught_up.store(!full, Ordering::Relaxed);
            let started = Instant::now();
            if let Some(interrupted) = self.process(deliveries, stop).await? {
                return Ok(interrupted);
            }
            if started.elapsed() > QUIET_RECHECK {
                // Long retries (the database away) left the consumer unread
                // past the server's patience: start a fresh one.
                return Ok(Interrupted::Reposition { pause: false });
            }
            if broken {
                return Ok(Interrupted::Reposition { pause: true });
            }
        }
    }

    /// What `message` delivers: an event the projection does not want (its
    /// subject says the type, its header the seq) passed over undecoded,
    /// any other decoded.
    fn delivery(&self, message: &Message) -> Delivery {
        match self.bus.kind_of(message) {
            Some((seq, aggregate_type, event_type))
                if !self.projection.wants(aggregate_type, event_type) =>
            {
                Delivery {
                    seq,
                    event: Ok(RecordedEvent::passed_over(seq, aggregate_type, event_type)),
                    wanted: false,
                }
            }
            Some((seq, ..)) => decoded(message, Some(seq)),
            None => decoded(
                message,
                message.headers.as_ref().and_then(crate::bus::seq_header),
            ),
        }
    }

    /// Applies the deliveries that come next; `Some` when reading must stop
    /// or start again elsewhere.
    async fn process(
        &mut self,
        deliveries: Vec<Delivery>,
        stop: &CancellationToken,
    ) -> Result<Option<Interrupted>, WorkerError> {
        let mut run = Vec::with_capacity(deliveries.len());
        let mut ahead = false;
        let held = self.deferred.events.len() as u64;
        for delivery in deliveries {
            let next = self.checkpoint + held + run.len() as u64 + 1;
            if delivery.seq == FOREIGN {
                tracing::error!(
                    projection = self.projection.name(),
                    "a message without a log seq is on the events stream; passing over it"
                );
            } else if delivery.seq < next {
                self.stats.repeats.fetch_add(1, Ordering::Relaxed);
            } else if delivery.seq == next {
                run.push(delivery);
            } else {
                self.stats.out_of_order.fetch_add(1, Ordering::Relaxed);
                ahead = true;
                break;
            }
        }
        // Nothing the projection wants: hold it back (a transaction that
        // only moves the checkpoint costs the database as much as one that
        // applies an event), up to a batch.
        let idle = run.iter().all(|d| !d.wanted);
        if idle && self.deferred.events.len() + run.len() < self.config.batch_size {
            if !run.is_empty() {
                self.deferred
                    .since
                    .get_or_insert_with(tokio::time::Instant::now);
                self.deferred.events.extend(run);
                let held = self.deferred.events.len() as u64;
                self.stats.held.store(held, Ordering::Relaxed);
            }
        } else {
            let mut held = self.take_held();
            held.extend(run);
            if let Some(interrupted) = self.apply_run(held, stop).await? {
                return Ok(Some(interrupted));
            }
        }
        Ok(ahead.then_some(Interrupted::Reposition { pause: false }))
    }

    /// The events held back, to be applied now.
    fn take_held(&mut self) -> Vec<Delivery> {
        self.deferred.since = None;
        self.stats.held.store(0, Ordering::Relaxed);
        std::mem::take(&mut self.deferred.events)
    }

    /// Applies a run of consecutive events: as one batch, or one by one
    /// after a failure of the event's own, so that exactly the failing event
    /// is retried and dead-lettered. Transient failures retry the same batch.
    async fn apply_run(
        &mut self,
        mut run: Vec<Delivery>,
        stop: &CancellationToken,
    ) -> Result<Option<Interrupted>, WorkerError> {
        let mut backoff = Backoff::new(self.config.backoff_base, self.config.backoff_max);
        let mut one_by_one = false;
        while !run.is_empty() {
            if stop.is_cancelled() {
                return Ok(Some(Interrupted::Stop));
            }
            let take = if one_by_one { 1 } else { run.len() };
            let undecodable = run[..take]
                .iter()
                .find_map(|d| d.event.as_ref().err().cloned());
            let result = match undecodable {
                Some(reason) => Err(ProjectionError::Failed(reason)),
                None => {
                    // The events leave their deliveries for the call (no
                    // copy of each event's JSON per attempt) and come back
                    // if the batch is to be tried again.
                    let events: Vec<RecordedEvent> = run[..take]
                        .iter_mut()
                        .map(|d| {
                            std::mem::replace(&mut d.event, Err(String::new()))
                                .expect("every event of the batch decoded")
                        })
                        .collect();
                    let result = self.try_apply(&events).await;
                    if result.is_err() {
                        for (delivery, event) in run.iter_mut().zip(events) {
                            delivery.event = Ok(event);
                        }
                    }
                    result
                }
            };
            match result {
                Ok(()) => {
                    run.drain(..take);
                    backoff.reset();
                }
                Err(ProjectionError::Transient(error)) => {
                    self.stats.transient_retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        projection = self.projection.name(),
                        seq = run[0].seq,
                        error,
                        "applying failed for a passing reason; will retry"
                    );
                    if backoff.wait(stop).await {
                        return Ok(Some(Interrupted::Stop));
                    }
                }
                Err(ProjectionError::Gap { checkpoint }) => {
                    // Another applier moved the checkpoint: read from there.
                    self.set_checkpoint(checkpoint);
                    return Ok(Some(Interrupted::Reposition { pause: false }));
                }
                Err(ProjectionError::Fenced(error)) => {
                    return Err(WorkerError::Fenced {
                        projection: self.name(),
                        error,
                    })
                }
                Err(ProjectionError::Failed(error)) if take > 1 => {
                    tracing::warn!(
                        projection = self.projection.name(),
                        error,
                        "a batch failed; applying its events one by one"
                    );
                    one_by_one = true;
                }
                Err(ProjectionError::Failed(error)) => {
                    let delivery = run.remove(0);
                    match self.failed(delivery, error, stop).await? {
                        Some(retry) => run.insert(0, retry),
                        None => {
                            // Skipped: what followed it comes next.
                            one_by_one = false;
                        }
                    }
                }
            }
        }
        Ok(None)
    }

    async fn try_apply(&mut self, events: &[RecordedEvent]) -> Result<(), ProjectionError> {
        let started = Instant::now();
        let applied = self.projection.apply(events).await?;
        let micros = started.elapsed().as_micros() as u64;
        self.stats
            .last_apply_micros
            .store(micros, Ordering::Relaxed);
        self.stats.applied.fetch_add(
            applied.checkpoint.saturating_sub(self.checkpoint),
            Ordering::Relaxed,
        );
        self.set_checkpoint(applied.checkpoint);
        for event in events {
            self.failures.remove(&event.seq);
        }
        for mut change in applied.changes {
            change.prev = self.announced.stamp(&change);
            if let Err(err) = self.bus.publish_change(&change).await {
                tracing::warn!(%err, topic = change.topic, "cannot announce a change");
            }
        }
        Ok(())
    }

    fn set_checkpoint(&mut self, checkpoint: u64) {
        self.checkpoint = checkpoint;
        self.stats.checkpoint.store(checkpoint, Ordering::Relaxed);
    }

    /// Handles an event that failed by itself: `Some` to retry it (after a
    /// backoff), `None` once it was dead-lettered and skipped.
    async fn failed(
        &mut self,
        delivery: Delivery,
        error: String,
        stop: &CancellationToken,
    ) -> Result<Option<Delivery>, WorkerError> {
        let seq = delivery.seq;
        let attempts = {
            let count = self.failures.entry(seq).or_insert(0);
            *count += 1;
            *count
        };
        let projection = self.name();
        if attempts < self.config.max_failures {
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            let delay =
                Backoff::new(self.config.backoff_base, self.config.backoff_max).delay(attempts);
            tracing::warn!(
                projection,
                seq,
                attempts,
                ?delay,
                error,
                "applying an event failed; will retry"
            );
            // A stop meanwhile is seen by the caller before the retry.
            stopped_during(delay, stop).await;
            return Ok(Some(delivery));
        }
        let record = DeadLetter {
            seq,
            event_type: delivery
                .event
                .as_ref()
                .map_or_else(|_| "(undecodable)".to_string(), |e| e.event_type.clone()),
            error: error.clone(),
            failures: attempts,
            skipped: self.config.policy == DeadLetterPolicy::Skip,
        };
        let mut backoff = Backoff::new(self.config.backoff_base, self.config.backoff_max);
        loop {
            match self.projection.record_dead_letter(&record).await {
                Ok(()) => break,
                Err(ProjectionError::Transient(err)) => {
                    tracing::warn!(
                        projection,
                        seq,
                        err,
                        "cannot record a dead letter yet; retrying"
                    );
                    if backoff.wait(stop).await {
                        return Ok(Some(delivery));
                    }
                }
                Err(err) => {
                    // It still goes to the dead-letter stream below.
                    tracing::error!(projection, seq, %err, "cannot record a dead letter");
                    break;
                }
            }
        }
        let event = match &delivery.event {
            Ok(event) => serde_json::to_value(event).unwrap_or_default(),
            Err(reason) => json!(reason),
        };
        let letter = json!({
            "projection": projection,
            "seq": seq,
            "attempts": attempts,
            "error": error,
            "event": event,
        });
        let mut backoff = Backoff::new(self.config.backoff_base, self.config.backoff_max);
        while let Err(err) = self.bus.publish_dead_letter(&projection, &letter).await {
            // Not recorded yet: the event stays where it is until it is.
            tracing::error!(%err, projection, seq, "cannot publish a dead letter; retrying");
            if backoff.wait(stop).await {
                return Ok(Some(delivery));
            }
        }
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        self.failures.remove(&seq);
        match self.config.policy {
            DeadLetterPolicy::Stop => {
                tracing::error!(
                    projection,
                    seq,
                    attempts,
                    error,
                    "dead-lettered an event; the projection stops"
                );
                Err(WorkerError::Halted {
                    projection,
                    seq,
                    attempts,
                    error,
                })
            }
            DeadLetterPolicy::Skip => {
                tracing::error!(
                    projection,
                    seq,
                    attempts,
                    error,
                    "dead-lettered an event; skipping it"
                );
                let mut backoff = Backoff::new(self.config.backoff_base, self.config.backoff_max);
                loop {
                    match self.projection.skip(seq).await {
                        Ok(()) => break,
                        Err(ProjectionError::Transient(err)) => {
                            tracing::warn!(projection, seq, err, "cannot skip yet; retrying");
                            if backoff.wait(stop).await {
                                return Ok(Some(delivery));
                            }
                        }
                        Err(err) => {
                            return Err(WorkerError::Projection {
                                projection,
                                error: err.to_string(),
                            })
                        }
                    }
                }
                self.set_checkpoint(seq);
                Ok(None)
            }
        }
    }
}

/// How long a reader waits on a quiet stream, or spends away from it, before
/// it starts a fresh consumer (the server drops an ordered consumer left
/// unread for 30 seconds).
const QUIET_RECHECK: Duration = Duration::from_secs(10);

/// How long a worker that is behind spends at most gathering the next
/// messages into a fuller batch (a backlog streams in far faster; live events
/// are not held up longer than this).
const GATHER_WAIT: Duration = Duration::from_millis(10);

/// Messages pending on the server from which a worker reports that it is
/// working off a backlog (`catching_up`) rather than following live traffic.
const BACKLOG: u64 = 100;

/// How many messages the server had for the consumer after the last of
/// `chunk` (JetStream says with each message).
fn pending<E>(chunk: &[Result<Message, E>]) -> u64 {
    chunk
        .iter()
        .rev()
        .find_map(|m| m.as_ref().ok())
        .and_then(|m| m.info().ok())
        .map_or(0, |info| info.pending)
}

/// The seq given to a message that carries none (not published by a relay).
const FOREIGN: u64 = u64::MAX;

/// `message`'s event, decoded.
fn decoded(message: &Message, header_seq: Option<u64>) -> Delivery {
    let event = serde_json::from_slice::<RecordedEvent>(&message.payload)
        .map_err(|err| format!("undecodable message: {err}"));
    let seq = match (&event, header_seq) {
        (Ok(event), _) => event.seq,
        (Err(_), Some(seq)) => seq,
        // Neither body nor header says where it belongs: not ours.
        (Err(_), None) => FOREIGN,
    };
    Delivery {
        seq,
        event,
        wanted: true,
    }
}

#[cfg(test)]
mod announced_tests {
    use super::*;

    #[test]
    fn each_change_names_the_last_one_announced_for_its_key() {
        let change = |key: &str, seq: u64| Change {
            topic: "feed".into(),
            key: key.into(),
            seq,
            data: serde_json::Value::Null,
            prev: None,
        };
        let mut announced = Announced::default();
        assert_eq!(announced.stamp(&change("ann", 4)), None);
        assert_eq!(announced.stamp(&change("bob", 6)), None);
        assert_eq!(announced.stamp(&change("ann", 9)), Some(4));
        // A repeat (a redelivered batch) names nothing older than itself.
        assert_eq!(announced.stamp(&change("ann", 9)), None);
        assert_eq!(announced.stamp(&change("ann", 11)), Some(9));
    }
}
