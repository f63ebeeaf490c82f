//! The projection-worker runtime.
//!
//! A worker owns one durable pull consumer over every event subject and hands
//! batches to its [`Projection`], which applies them and advances its
//! checkpoint in one transaction. The worker acknowledges only after that.
//!
//! Order is sacred. Log seqs are contiguous, so the worker knows exactly which
//! event comes next (`checkpoint + 1`): events at or below the checkpoint are
//! acknowledged as repeats, and an event from further ahead — which can happen
//! when an earlier one is waiting to be redelivered — is negatively
//! acknowledged with a short delay and never applied early. A failing event is
//! retried with exponential backoff; after `max_failures` it is published to
//! the dead-letter stream with its error, and the [`DeadLetterPolicy`] decides
//! whether the worker stops (default) or skips it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::{AckKind, Message};
use futures::StreamExt;
use podium_domain::log::{Change, RecordedEvent};
use serde_json::json;
use tokio::sync::watch;

use crate::bus::SEQ_HEADER;
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

    /// Moves the checkpoint past `seq` without applying it (the skip policy).
    fn skip(&self, seq: u64) -> impl Future<Output = Result<(), ProjectionError>> + Send;
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
    pub batch_size: usize,
    /// Failures of one event before it is dead-lettered.
    pub max_failures: u32,
    /// First retry delay; doubles per failure up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Delay before an event that arrived ahead of its turn comes back.
    pub out_of_order_delay: Duration,
    /// How long JetStream waits for an acknowledgement before redelivering.
    pub ack_wait: Duration,
    pub policy: DeadLetterPolicy,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            max_failures: 5,
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            out_of_order_delay: Duration::from_millis(50),
            ack_wait: Duration::from_secs(30),
            policy: DeadLetterPolicy::Stop,
        }
    }
}

/// Counters for metrics, shared with whoever exports them.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub applied: AtomicU64,
    /// Repeats acknowledged without applying (seq at or below the checkpoint).
    pub repeats: AtomicU64,
    /// Events sent back because they arrived ahead of their turn.
    pub out_of_order: AtomicU64,
    /// Failed applications that will be retried.
    pub retries: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub checkpoint: AtomicU64,
    /// Duration of the last successful apply, in microseconds.
    pub last_apply_micros: AtomicU64,
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
}

/// One fetched message with the seq it carries.
struct Delivery {
    seq: u64,
    event: Result<RecordedEvent, String>,
    message: Message,
}

pub struct Worker<P> {
    bus: EventBus,
    projection: Arc<P>,
    config: WorkerConfig,
    stats: Arc<WorkerStats>,
    checkpoint: u64,
    failures: HashMap<u64, u32>,
    stuck_since: Option<Instant>,
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
            stuck_since: None,
        }
    }

    pub fn stats(&self) -> Arc<WorkerStats> {
        self.stats.clone()
    }

    fn projection_error(&self, error: ProjectionError) -> WorkerError {
        WorkerError::Projection {
            projection: self.projection.name().to_string(),
            error: error.to_string(),
        }
    }

    /// The durable consumer of this projection, created if missing.
    async fn consumer(&self) -> Result<PullConsumer, WorkerError> {
        let subjects = self.bus.subjects();
        let stream = self
            .bus
            .jetstream()
            .get_stream(subjects.events_stream())
            .await
            .map_err(|e| WorkerError::Bus(e.to_string()))?;
        let name = self.projection.name().to_string();
        stream
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: subjects.all_events(),
                    deliver_policy: DeliverPolicy::All,
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: self.config.ack_wait,
                    // The worker counts failures itself: JetStream's count
                    // also grows with out-of-order sends back.
                    max_deliver: -1,
                    max_ack_pending: 20_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| WorkerError::Bus(e.to_string()))
    }

    /// Consumes until `stop` turns true (finishing the batch in hand) or the
    /// projection halts on a dead letter.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), WorkerError> {
        self.checkpoint = self
            .projection
            .checkpoint()
            .await
            .map_err(|e| self.projection_error(e))?;
        self.stats
            .checkpoint
            .store(self.checkpoint, Ordering::Relaxed);
        let mut bus_backoff = self.config.backoff_base;
        loop {
            // A continuous pull: messages arrive as soon as they are stored,
            // and every message already waiting is taken into one batch.
            // Looked up (or created) afresh after every interruption, so a
            // deleted consumer is recreated and replays from the start.
            let pull = async {
                let consumer = self.consumer().await?;
                consumer
                    .stream()
                    .max_messages_per_batch(self.config.batch_size)
                    .messages()
                    .await
                    .map_err(|e| WorkerError::Bus(e.to_string()))
            };
            let messages = tokio::select! {
                messages = pull => messages,
                _ = stop.changed() => return Ok(()),
            };
            let mut chunks = match messages {
                Ok(messages) => messages.ready_chunks(self.config.batch_size),
                Err(err) => {
                    tracing::warn!(projection = self.projection.name(), %err, "cannot pull; retrying");
                    if sleep_or_stop(bus_backoff, &mut stop).await {
                        return Ok(());
                    }
                    bus_backoff = (bus_backoff * 2).min(self.config.backoff_max);
                    continue;
                }
            };
            bus_backoff = self.config.backoff_base;
            loop {
                let chunk = tokio::select! {
                    chunk = chunks.next() => chunk,
                    _ = stop.changed() => return Ok(()),
                };
                let Some(chunk) = chunk else { break };
                let mut deliveries = Vec::with_capacity(chunk.len());
                let mut interrupted = false;
                for message in chunk {
                    match message {
                        Ok(message) => deliveries.push(delivery(message)),
                        Err(err) => {
                            tracing::warn!(projection = self.projection.name(), %err, "pull interrupted");
                            interrupted = true;
                        }
                    }
                }
                if !deliveries.is_empty() {
                    self.process(deliveries).await?;
                }
                if interrupted {
                    // Pull afresh (the consumer may be gone), after a pause.
                    if sleep_or_stop(self.config.backoff_base, &mut stop).await {
                        return Ok(());
                    }
                    break;
                }
                if *stop.borrow() {
                    return Ok(());
                }
            }
        }
    }

    async fn process(&mut self, mut deliveries: Vec<Delivery>) -> Result<(), WorkerError> {
        deliveries.sort_by_key(|d| d.seq);
        let mut run = Vec::new();
        let mut ahead = Vec::new();
        for delivery in deliveries {
            let next = self.checkpoint + run.len() as u64 + 1;
            if delivery.seq == FOREIGN {
                tracing::error!(
                    projection = self.projection.name(),
                    subject = %delivery.message.subject,
                    "a message without a log seq is on the events stream; dropping it"
                );
                let _ = delivery.message.ack_with(AckKind::Term).await;
            } else if delivery.seq < next {
                // At or below the checkpoint, or the same seq twice in one batch.
                self.stats.repeats.fetch_add(1, Ordering::Relaxed);
                let _ = delivery.message.ack().await;
            } else if delivery.seq == next {
                run.push(delivery);
            } else {
                ahead.push(delivery);
            }
        }
        let halted = self.apply_run(run).await;
        if !ahead.is_empty() {
            self.note_stuck(ahead.len());
        }
        for delivery in ahead {
            self.stats.out_of_order.fetch_add(1, Ordering::Relaxed);
            let delay = AckKind::Nak(Some(self.config.out_of_order_delay));
            let _ = delivery.message.ack_with(delay).await;
        }
        halted
    }

    /// Applies a run of consecutive events: as one batch, or one by one after
    /// a failure so that exactly the failing event is retried.
    async fn apply_run(&mut self, run: Vec<Delivery>) -> Result<(), WorkerError> {
        if run.is_empty() {
            return Ok(());
        }
        self.stuck_since = None;
        if run.len() > 1 && run.iter().all(|d| d.event.is_ok()) {
            let events: Vec<RecordedEvent> = run
                .iter()
                .filter_map(|d| d.event.as_ref().ok().cloned())
                .collect();
            match self.try_apply(&events).await {
                Ok(()) => {
                    for delivery in &run {
                        let _ = delivery.message.ack().await;
                    }
                    return Ok(());
                }
                Err(ProjectionError::Gap { checkpoint }) => {
                    return self.resync(checkpoint, run).await;
                }
                Err(ProjectionError::Failed(_)) => {} // isolate it below
            }
        }
        let mut deliveries = run.into_iter();
        while let Some(delivery) = deliveries.next() {
            let result = match &delivery.event {
                Ok(event) => self.try_apply(std::slice::from_ref(event)).await,
                Err(reason) => Err(ProjectionError::Failed(reason.clone())),
            };
            match result {
                Ok(()) => {
                    let _ = delivery.message.ack().await;
                }
                Err(ProjectionError::Gap { checkpoint }) => {
                    let rest: Vec<Delivery> = std::iter::once(delivery).chain(deliveries).collect();
                    return self.resync(checkpoint, rest).await;
                }
                Err(ProjectionError::Failed(error)) => {
                    let outcome = self.failed(delivery, error).await;
                    for later in deliveries {
                        let delay = AckKind::Nak(Some(self.config.out_of_order_delay));
                        let _ = later.message.ack_with(delay).await;
                    }
                    return outcome;
                }
            }
        }
        Ok(())
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
        for change in &applied.changes {
            if let Err(err) = self.bus.publish_change(change).await {
                tracing::warn!(%err, topic = change.topic, "cannot announce a change");
            }
        }
        Ok(())
    }

    fn set_checkpoint(&mut self, checkpoint: u64) {
        self.checkpoint = checkpoint;
        self.stats.checkpoint.store(checkpoint, Ordering::Relaxed);
    }

    /// Another worker moved the checkpoint: take its value and sort the
    /// deliveries again against it.
    async fn resync(&mut self, checkpoint: u64, rest: Vec<Delivery>) -> Result<(), WorkerError> {
        self.set_checkpoint(checkpoint);
        Box::pin(self.process(rest)).await
    }

    /// Handles a failed event: retry later, or dead-letter it.
    async fn failed(&mut self, delivery: Delivery, error: String) -> Result<(), WorkerError> {
        let seq = delivery.seq;
        let attempts = {
            let count = self.failures.entry(seq).or_insert(0);
            *count += 1;
            *count
        };
        let projection = self.projection.name().to_string();
        if attempts < self.config.max_failures {
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            let exponent = (attempts - 1).min(16);
            let delay =
                (self.config.backoff_base * 2u32.pow(exponent)).min(self.config.backoff_max);
            tracing::warn!(
                projection,
                seq,
                attempts,
                ?delay,
                error,
                "applying an event failed; will retry"
            );
            let _ = delivery.message.ack_with(AckKind::Nak(Some(delay))).await;
            return Ok(());
        }
        let event = match &delivery.event {
            Ok(event) => serde_json::to_value(event).unwrap_or_default(),
            Err(_) => json!(String::from_utf8_lossy(&delivery.message.payload)),
        };
        let letter = json!({
            "projection": projection,
            "seq": seq,
            "attempts": attempts,
            "error": error,
            "event": event,
        });
        if let Err(err) = self.bus.publish_dead_letter(&projection, &letter).await {
            // Not recorded yet: keep the event and try again later.
            tracing::error!(%err, projection, seq, "cannot publish a dead letter");
            let delay = AckKind::Nak(Some(self.config.backoff_max));
            let _ = delivery.message.ack_with(delay).await;
            return Ok(());
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
                // Left unacknowledged: after a fix and a restart it comes back.
                let _ = delivery.message.ack_with(AckKind::Nak(None)).await;
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
                self.projection
                    .skip(seq)
                    .await
                    .map_err(|e| self.projection_error(e))?;
                self.set_checkpoint(seq);
                let _ = delivery.message.ack().await;
                Ok(())
            }
        }
    }

    /// Warns when events keep arriving ahead of a turn that never comes (an
    /// event missing from the stream): the projection needs a replay.
    fn note_stuck(&mut self, waiting: usize) {
        let since = *self.stuck_since.get_or_insert_with(Instant::now);
        if since.elapsed() > Duration::from_secs(60) {
            tracing::error!(
                projection = self.projection.name(),
                checkpoint = self.checkpoint,
                waiting,
                "events keep arriving ahead of seq {}; if the stream lost it, run `podium replay`",
                self.checkpoint + 1
            );
            self.stuck_since = Some(Instant::now());
        }
    }
}

/// The seq given to a message that carries none (not published by a relay).
const FOREIGN: u64 = u64::MAX;

fn delivery(message: Message) -> Delivery {
    let event = serde_json::from_slice::<RecordedEvent>(&message.payload)
        .map_err(|err| format!("undecodable message: {err}"));
    let header_seq = message
        .headers
        .as_ref()
        .and_then(|h| h.get(SEQ_HEADER))
        .and_then(|v| v.as_str().parse::<u64>().ok());
    let seq = match (&event, header_seq) {
        (Ok(event), _) => event.seq,
        (Err(_), Some(seq)) => seq,
        // Neither body nor header says where it belongs: not ours.
        (Err(_), None) => FOREIGN,
    };
    Delivery {
        seq,
        event,
        message,
    }
}

/// Sleeps for `duration`; true if `stop` turned true meanwhile.
async fn sleep_or_stop(duration: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(duration) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}
