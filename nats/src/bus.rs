//! The connection to NATS: stream set-up, publishing log events (with
//! JetStream de-duplication) and "changed" notifications.

use std::sync::Arc;
use std::time::Duration;

use async_nats::header::{HeaderMap, NATS_EXPECTED_LAST_MESSAGE_ID, NATS_MESSAGE_ID};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::future::try_join_all;
use podium_domain::log::{Change, RecordedEvent};
use tokio::sync::watch;

use crate::Subjects;

/// Header carrying the event's log seq, so consumers need not parse the body
/// to order messages.
pub const SEQ_HEADER: &str = "Podium-Seq";

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    #[error("cannot set up JetStream stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
    #[error("cannot publish to NATS: {0}")]
    Publish(String),
    #[error("invalid NATS configuration: {0}")]
    Config(String),
}

/// Limits of the events stream. The stream is derived data: the log in
/// Postgres is the truth, so limits only bound disk use; a consumer that falls
/// behind them is rebuilt by replay.
#[derive(Debug, Clone)]
pub struct StreamLimits {
    /// Oldest message kept.
    pub max_age: Duration,
    /// Most bytes kept, older messages dropped first; -1 for no limit but
    /// `max_age`. JetStream reserves this much of its storage for the
    /// stream up front, so set it only as high as the disk allows.
    pub max_bytes: i64,
    /// How long a `Nats-Msg-Id` is remembered: a relay retrying within this
    /// window publishes nothing twice. Consumers skip repeats anyway.
    pub duplicate_window: Duration,
    /// Copies of each stream in a JetStream cluster (1 on a single server;
    /// 3 survives the loss of any one node of three).
    pub replicas: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: -1,
            duplicate_window: Duration::from_secs(5 * 60),
            replicas: 1,
        }
    }
}

/// Where a reader of the events stream starts, for a wanted log seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamPosition {
    /// The stream message (stream sequence) holding the wanted event.
    At(u64),
    /// The wanted event is not on the stream yet: it will be at this stream
    /// sequence or later.
    Await(u64),
    /// The stream no longer holds the wanted event (its limits trimmed it,
    /// or the stream was recreated from a later point): the oldest event it
    /// keeps after it is `first_kept`.
    Missing { wanted: u64, first_kept: u64 },
}

/// The log seq a message's headers carry, if it is one of ours.
pub fn seq_header(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(SEQ_HEADER)
        .and_then(|v| v.as_str().parse::<u64>().ok())
}

/// The log seq of stream message `sequence`, if it is one of ours.
async fn log_seq_at(stream: &stream::Stream, sequence: u64) -> Result<Option<u64>, BusError> {
    match stream.get_raw_message(sequence).await {
        Ok(message) => Ok(seq_header(&message.headers)),
        // Deleted from the middle of the stream: treat it as not ours.
        Err(err) if err.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(err) => Err(BusError::Stream {
            stream: stream.cached_info().config.name.clone(),
            reason: err.to_string(),
        }),
    }
}

/// A connected bus for one subject prefix.
#[derive(Clone)]
pub struct EventBus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    subjects: Subjects,
    /// Counts (re)connections: core NATS messages sent while the connection
    /// was down are lost, so subscribers that must miss nothing catch up from
    /// the read models whenever this moves.
    connections: watch::Receiver<u64>,
}

impl EventBus {
    /// Connects to `url` (retrying in the background if NATS goes away
    /// later) for the deployment named by `prefix`.
    /// Connects to the server at `url`, or to a cluster: several URLs
    /// separated by commas, any of which will do (the client moves to
    /// another when one goes away).
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, BusError> {
        let servers: Vec<&str> = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        let subjects = Subjects::new(prefix).map_err(BusError::Config)?;
        let (connected, connections) = watch::channel(0u64);
        let connected = Arc::new(connected);
        let client = async_nats::ConnectOptions::new()
            .name("podium")
            .event_callback(move |event| {
                let connected = connected.clone();
                async move {
                    if matches!(event, async_nats::Event::Connected) {
                        connected.send_modify(|n| *n += 1);
                    }
                }
            })
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(servers)
            .await
            .map_err(|err| BusError::Connect(err.to_string()))?;
        let mut bus = Self::new(client, subjects);
        bus.connections = connections;
        Ok(bus)
    }

    pub fn new(client: async_nats::Client, subjects: Subjects) -> Self {
        let mut jetstream = jetstream::new(client.clone());
        jetstream.set_timeout(Duration::from_secs(5));
        Self {
            client,
            jetstream,
            subjects,
            connections: watch::channel(0).1,
        }
    }

    /// Changes whenever the connection is (re-)established.
    pub fn connections(&self) -> watch::Receiver<u64> {
        self.connections.clone()
    }

    /// Every "changed" notification of this deployment, on one subscription.
    pub async fn subscribe_changes(&self) -> Result<async_nats::Subscriber, BusError> {
        self.client
            .subscribe(self.subjects.every_change())
            .await
            .map_err(|err| BusError::Connect(err.to_string()))
    }

    /// The log seq (its header) and the aggregate and event types (its
    /// subject) of an events-stream message, read without decoding its
    /// payload; `None` when either is missing.
    pub fn kind_of<'m>(&self, message: &'m jetstream::Message) -> Option<(u64, &'m str, &'m str)> {
        let seq = seq_header(message.headers.as_ref()?)?;
        let (aggregate_type, event_type) = self.subjects.event_kind(&message.subject)?;
        Some((seq, aggregate_type, event_type))
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// Whether the connection to NATS is up.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Creates the events and dead-letter streams, or updates their limits.
    pub async fn ensure_streams(&self, limits: &StreamLimits) -> Result<(), BusError> {
        let events = stream::Config {
            name: self.subjects.events_stream(),
            description: Some("Podium's event log, relayed from Postgres".into()),
            subjects: vec![self.subjects.all_events()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_age: limits.max_age,
            max_bytes: limits.max_bytes,
            duplicate_window: limits.duplicate_window,
            num_replicas: limits.replicas,
            ..Default::default()
        };
        let dead_letters = stream::Config {
            name: self.subjects.dead_letter_stream(),
            description: Some("Events a projection could not apply, with the error".into()),
            subjects: vec![self.subjects.all_dead_letters()],
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(30 * 24 * 3600),
            num_replicas: limits.replicas,
            ..Default::default()
        };
        for config in [events, dead_letters] {
            let name = config.name.clone();
            self.jetstream
                .create_or_update_stream(config)
                .await
                .map_err(|err| BusError::Stream {
                    stream: name,
                    reason: err.to_string(),
                })?;
        }
        Ok(())
    }

    /// Publishes `events` in order and returns once JetStream has stored
    /// each one. Each carries `Nats-Msg-Id` = its identity, so publishing a
    /// batch again (after a crash or a failed ack) stores nothing twice.
    ///
    /// `last` is the identity of the caller's last event, when that is the
    /// last message on the stream. Then the batch goes with one
    /// acknowledgement instead of one per event: each message is stored only
    /// right after the event before it (`Nats-Expected-Last-Msg-Id`), the
    /// first only right after `last`. Messages from one connection are
    /// handled in the order sent, so the last one stored (not a duplicate)
    /// proves that the one before it was stored just before it, and so on
    /// back to the first: the whole batch is on the stream, in order, with
    /// nothing between. Anything else (a message refused, a duplicate,
    /// another publisher's message in between) sends the batch again, each
    /// event acknowledged; what is stored already is then a duplicate.
    ///
    /// An events stream has one publisher at a time, the relay that holds
    /// the lead. One that lost it while paused can still send the rest of
    /// the batch it was publishing, but that batch is behind the new
    /// leader's first, which goes acknowledged event by event: its events
    /// are never those of a batch sent this way.
    ///
    /// `last` is left as the identity of this batch's last event if that is
    /// the stream's last message now, else `None`.
    pub async fn publish_events(
        &self,
        events: &[RecordedEvent],
        last: &mut Option<String>,
    ) -> Result<(), BusError> {
        if events.is_empty() {
            return Ok(());
        }
        if let Some(after) = last.take() {
            if self.publish_chained(events, after).await {
                *last = events.last().map(RecordedEvent::identity);
                return Ok(());
            }
        }
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            let (subject, headers, payload, _) = self.message(event)?;
            let ack = self
                .jetstream
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|err| BusError::Publish(err.to_string()))?;
            acks.push(std::future::IntoFuture::into_future(ack));
        }
        let acks = try_join_all(acks)
            .await
            .map_err(|err| BusError::Publish(err.to_string()))?;
        // A duplicate's first copy may lie anywhere before the stream's end.
        if acks.last().is_some_and(|ack| !ack.duplicate) {
            *last = events.last().map(RecordedEvent::identity);
        }
        Ok(())
    }

    /// Sends `events` each chained to the one before (the first to `after`)
    /// with only the last acknowledged: whether the whole batch was stored.
    async fn publish_chained(&self, events: &[RecordedEvent], mut after: String) -> bool {
        for (at, event) in events.iter().enumerate() {
            let Ok((subject, mut headers, payload, identity)) = self.message(event) else {
                return false;
            };
            headers.insert(NATS_EXPECTED_LAST_MESSAGE_ID, after.as_str());
            if at + 1 == events.len() {
                return match self
                    .jetstream
                    .publish_with_headers(subject, headers, payload)
                    .await
                {
                    Ok(ack) => ack.await.is_ok_and(|ack| !ack.duplicate),
                    Err(_) => false,
                };
            }
            if self
                .client
                .publish_with_headers(subject, headers, payload)
                .await
                .is_err()
            {
                return false;
            }
            after = identity;
        }
        true
    }

    /// The subject, headers and body `event` is published with, and its
    /// identity (its `Nats-Msg-Id`).
    fn message(
        &self,
        event: &RecordedEvent,
    ) -> Result<(String, HeaderMap, Bytes, String), BusError> {
        let identity = event.identity();
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, identity.as_str());
        headers.insert(SEQ_HEADER, event.seq.to_string().as_str());
        let payload = serde_json::to_vec(event).map_err(|e| BusError::Publish(e.to_string()))?;
        let subject = self
            .subjects
            .event(&event.aggregate_type, &event.event_type);
        Ok((subject, headers, Bytes::from(payload), identity))
    }

    /// Publishes a "changed" notification on core NATS (fire and forget:
    /// listeners that miss one fall back to their TTL or resync).
    pub async fn publish_change(&self, change: &Change) -> Result<(), BusError> {
        let payload = serde_json::to_vec(change).map_err(|e| BusError::Publish(e.to_string()))?;
        self.client
            .publish(
                self.subjects.changed(&change.topic, &change.key),
                Bytes::from(payload),
            )
            .await
            .map_err(|err| BusError::Publish(err.to_string()))
    }

    /// The events stream, looked up afresh (it may have been recreated).
    pub async fn events_stream(&self) -> Result<stream::Stream, BusError> {
        self.jetstream
            .get_stream(self.subjects.events_stream())
            .await
            .map_err(|e| BusError::Stream {
                stream: self.subjects.events_stream(),
                reason: e.to_string(),
            })
    }

    /// Whether the events stream is known to be gone (not merely
    /// unreachable).
    pub async fn events_stream_missing(&self) -> bool {
        use async_nats::jetstream::context::GetStreamErrorKind;
        use async_nats::jetstream::ErrorCode;
        match self
            .jetstream
            .get_stream(self.subjects.events_stream())
            .await
        {
            Err(err) => matches!(
                err.kind(),
                GetStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND
            ),
            Ok(_) => false,
        }
    }

    /// The events stream and its state now.
    async fn events_stream_state(&self) -> Result<(stream::Stream, stream::State), BusError> {
        let stream = self.events_stream().await?;
        let state = stream
            .get_info()
            .await
            .map_err(|e| BusError::Stream {
                stream: self.subjects.events_stream(),
                reason: e.to_string(),
            })?
            .state;
        Ok((stream, state))
    }

    /// The log seq of the last event on the events stream (`None` while it
    /// holds none, or ends with a message that is not one of ours).
    pub async fn last_log_seq(&self) -> Result<Option<u64>, BusError> {
        let (stream, state) = self.events_stream_state().await?;
        if state.messages == 0 {
            return Ok(None);
        }
        log_seq_at(&stream, state.last_sequence).await
    }

    /// Where on the events stream a reader wanting log seq `next` (and what
    /// follows) starts: the first stream message whose log seq is `next` or
    /// later, found by bisecting the stream (the relay publishes in log
    /// order). The stream's own sequence numbers differ from log seqs once
    /// a stream was recreated or trimmed, so they are never assumed equal.
    pub async fn position_of(&self, next: u64) -> Result<StreamPosition, BusError> {
        let (stream, state) = self.events_stream_state().await?;
        if state.messages == 0 {
            return Ok(StreamPosition::Await(state.last_sequence + 1));
        }
        let (mut low, mut high) = (state.first_sequence, state.last_sequence + 1);
        let mut found = None;
        while low < high {
            let middle = low + (high - low) / 2;
            match log_seq_at(&stream, middle).await? {
                Some(seq) if seq >= next => {
                    found = Some(seq);
                    high = middle;
                }
                // Older, or not one of ours: look later.
                _ => low = middle + 1,
            }
        }
        Ok(match found {
            None => StreamPosition::Await(state.last_sequence + 1),
            Some(seq) if seq == next => StreamPosition::At(low),
            Some(seq) => StreamPosition::Missing {
                wanted: next,
                first_kept: seq,
            },
        })
    }

    /// Publishes a dead letter and waits for JetStream to store it.
    pub async fn publish_dead_letter(
        &self,
        projection: &str,
        body: &serde_json::Value,
    ) -> Result<(), BusError> {
        let payload = serde_json::to_vec(body).map_err(|e| BusError::Publish(e.to_string()))?;
        self.jetstream
            .publish(self.subjects.dead_letter(projection), Bytes::from(payload))
            .await
            .map_err(|err| BusError::Publish(err.to_string()))?
            .await
            .map_err(|err| BusError::Publish(err.to_string()))?;
        Ok(())
    }
}
