//! Server-Sent Events shared by every stream: resume from `Last-Event-ID`
//! out of the read model, then live changes from the instance's
//! [`ChangeHub`](crate::query::changes::ChangeHub), nothing lost or repeated.
//!
//! A stream's request goes through the router like any other (auth, limits,
//! CORS, metrics); its handler subscribes, reads what the client missed, and
//! answers with the headers and a [`Detach`] holding the stream. The server
//! ([`super::server`]) writes the headers, takes the socket back from hyper
//! and hands it to one of the instance's [`writer`]s, which owns every
//! stream from then on: no task and no HTTP buffers per stream.
//!
//! Event ids are log seqs. A stream subscribes to live changes *before* it
//! reads the read model, at the projection's checkpoint `w` in the same
//! snapshot: what it read covers every change up to `w`, so live changes at
//! or below `w` are dropped and the rest sent. The same catch-up runs when a
//! slow client falls behind or the NATS connection was re-established.
//!
//! A source may close (a windowed leaderboard's period ends): its writer
//! then moves its streams to the source that follows, sends them the event
//! that says so with id 0, and catches them up on the new source from the
//! start. A client that reconnects in between resumes from 0: everything
//! the new source holds.

pub mod writer;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use podium_domain::log::Change;
use serde::Deserialize;

use super::error::ApiError;
use super::AppState;
use crate::auth::Principal;
use crate::query::changes::Subscription;

/// Most changes a catch-up sends one by one; beyond that the client is told
/// to reload (a `resync` event), which is cheaper for both sides.
pub const CATCH_UP_LIMIT: i64 = 1_000;

/// How long a disconnected client waits before reconnecting (`retry:`).
const RETRY_HINT: Duration = Duration::from_secs(2);

/// What one kind of stream reads and sends.
pub trait StreamSource: Send + Sync + 'static {
    /// The stream's name in metrics.
    fn kind(&self) -> &'static str;

    /// What changed after `after` (everything a fresh client needs when
    /// `None`), read from the read model in one snapshot.
    fn catch_up(
        &self,
        after: Option<u64>,
    ) -> impl Future<Output = Result<CatchUp, ApiError>> + Send;

    /// Writes the events a live change becomes.
    fn render(change: &Change, out: &mut Frames);

    /// Events a stream opens with, before what it missed (none by default):
    /// a windowed leaderboard says which period it follows.
    fn opening(&self, _out: &mut Frames) {}

    /// When what this stream follows closes (a leaderboard period's end);
    /// `None` for what never does.
    fn ends_at(&self) -> Option<DateTime<Utc>> {
        None
    }

    /// What the stream follows once [`ends_at`](Self::ends_at) has passed:
    /// the next source, the hub key of its changes, and the event that
    /// tells the client. `None` ends the stream.
    fn next(&self) -> Option<Next<Self>>
    where
        Self: Sized,
    {
        None
    }
}

/// What a stream goes on with when its source closes.
pub struct Next<S> {
    pub source: S,
    pub key: String,
    /// Written to the client before the new source's catch-up.
    pub announce: Frames,
}

/// [`StreamSource`] for the writers, which hold streams of every kind.
trait Source: Send + Sync + 'static {
    fn kind(&self) -> &'static str;
    fn catch_up(&self, after: Option<u64>) -> BoxFuture<'_, Result<CatchUp, ApiError>>;
    fn render(&self, change: &Change) -> Bytes;
    fn ends_at(&self) -> Option<DateTime<Utc>>;
    fn next(&self) -> Option<Next<Arc<dyn Source>>>;
}

impl<S: StreamSource> Source for S {
    fn kind(&self) -> &'static str {
        StreamSource::kind(self)
    }

    fn catch_up(&self, after: Option<u64>) -> BoxFuture<'_, Result<CatchUp, ApiError>> {
        Box::pin(StreamSource::catch_up(self, after))
    }

    fn render(&self, change: &Change) -> Bytes {
        let mut out = Frames::default();
        S::render(change, &mut out);
        out.freeze()
    }

    fn ends_at(&self) -> Option<DateTime<Utc>> {
        StreamSource::ends_at(self)
    }

    fn next(&self) -> Option<Next<Arc<dyn Source>>> {
        StreamSource::next(self).map(|next| Next {
            source: Arc::new(next.source) as Arc<dyn Source>,
            key: next.key,
            announce: next.announce,
        })
    }
}

/// Server-Sent Events text, written as it goes on the wire.
#[derive(Default)]
pub struct Frames(BytesMut);

impl Frames {
    /// An event with an id, a name and JSON data.
    pub fn json(&mut self, id: u64, name: &str, data: &serde_json::Value) {
        self.event(id, name, &data.to_string());
    }

    /// An event with an id, a name and `data` (one `data:` line per line).
    pub fn event(&mut self, id: u64, name: &str, data: &str) {
        self.id_line(id);
        self.line("event: ", name);
        for line in data.split('\n') {
            self.line("data: ", line.strip_suffix('\r').unwrap_or(line));
        }
        self.0.put_u8(b'\n');
    }

    /// An event without an id (the client's `Last-Event-ID` stays), named
    /// `name`, carrying JSON data.
    pub fn json_without_id(&mut self, name: &str, data: &serde_json::Value) {
        self.line("event: ", name);
        self.line("data: ", &data.to_string());
        self.0.put_u8(b'\n');
    }

    /// An event with an id alone: moves the client's `Last-Event-ID`.
    pub fn id(&mut self, id: u64) {
        self.id_line(id);
        self.0.put_u8(b'\n');
    }

    /// A comment, which clients ignore (a heartbeat, a greeting).
    fn comment(&mut self, text: &str) {
        self.line(":", text);
        self.0.put_u8(b'\n');
    }

    /// How long the client waits before it reconnects.
    fn retry(&mut self, after: Duration) {
        use std::fmt::Write;
        let _ = write!(self.0, "retry: {}\n\n", after.as_millis());
    }

    fn id_line(&mut self, id: u64) {
        use std::fmt::Write;
        // Writing to memory cannot fail.
        let _ = writeln!(self.0, "id: {id}");
    }

    fn line(&mut self, field: &str, value: &str) {
        self.0.reserve(field.len() + value.len() + 1);
        self.0.put_slice(field.as_bytes());
        self.0.put_slice(value.as_bytes());
        self.0.put_u8(b'\n');
    }

    fn append(&mut self, other: Frames) {
        self.0.unsplit(other.0);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn freeze(self) -> Bytes {
        self.0.freeze()
    }
}

/// Events read from the read model, and the checkpoint `seq` they cover.
#[derive(Default)]
pub struct CatchUp {
    pub events: Frames,
    /// The id of the last of `events` (0 when there are none).
    pub last_id: u64,
    pub seq: u64,
}

impl CatchUp {
    /// Nothing to send; the read model is at `seq`.
    pub fn at(seq: u64) -> Self {
        Self {
            seq,
            ..Self::default()
        }
    }

    /// Adds an event with id `id` named `name` carrying `data`.
    pub fn push(&mut self, id: u64, name: &str, data: &serde_json::Value) {
        self.events.json(id, name, data);
        self.last_id = id;
    }

    /// Replaces the events by one `resync`: more changed than a catch-up
    /// sends one by one, and the client should reload.
    pub fn resync(&mut self) {
        self.events = Frames::default();
        self.push(
            self.seq,
            "resync",
            &serde_json::json!({"reason": "too many changes to replay; reload"}),
        );
    }

    /// Writes these events for a client that was sent everything up to
    /// `last`, moving its `Last-Event-ID` past what the read model covers;
    /// returns what the client has then been sent up to.
    fn send_after(self, last: u64, out: &mut Frames) -> u64 {
        if self.seq > self.last_id.max(last) {
            let mut events = self.events;
            events.id(self.seq);
            out.append(events);
        } else {
            out.append(self.events);
        }
        last.max(self.seq)
    }
}

/// A stream's query: browsers' EventSource can set no headers, so the token
/// and the last event id may come here instead.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// The bearer token, for clients that cannot set `Authorization`.
    access_token: Option<String>,
    /// The last event id seen, for clients that cannot set `Last-Event-ID`.
    last_event_id: Option<String>,
}

impl StreamQuery {
    /// The caller, from `Authorization` or else `?access_token=`.
    pub async fn caller(
        &self,
        state: &AppState,
        headers: &HeaderMap,
    ) -> Result<Principal, ApiError> {
        let principal = match (headers.get(header::AUTHORIZATION), &self.access_token) {
            (Some(value), _) => {
                state
                    .keys
                    .authenticate_header(Some(value.to_str().unwrap_or_default()))
                    .await
            }
            (None, Some(token)) => state.keys.authenticate(token).await,
            (None, None) => state.keys.authenticate_header(None).await,
        };
        Ok(principal?)
    }

    /// The client's `Last-Event-ID`, from the header or `?last_event_id=`.
    pub fn last_event_id(&self, headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
        last_event_id(headers, self.last_event_id.as_deref())
    }
}

fn last_event_id(headers: &HeaderMap, query: Option<&str>) -> Result<Option<u64>, ApiError> {
    let raw = match headers.get("last-event-id") {
        Some(value) => Some(value.to_str().unwrap_or("?")),
        None => query,
    };
    raw.filter(|raw| !raw.is_empty())
        .map(|raw| {
            raw.trim().parse::<u64>().map_err(|_| {
                ApiError::BadRequest(format!(
                    "Last-Event-ID {raw:?} is not an event id of this stream"
                ))
            })
        })
        .transpose()
}

/// Open streams per user, bounded.
#[derive(Default)]
pub struct StreamSlots {
    open: Mutex<HashMap<String, usize>>,
}

/// One open stream of a user; frees its slot when dropped.
pub struct Slot {
    slots: Arc<StreamSlots>,
    user: String,
}

impl StreamSlots {
    pub fn take(self: &Arc<Self>, user: &str, max: usize) -> Result<Slot, ApiError> {
        let mut open = self.open.lock().expect("never poisoned");
        let count = open.entry(user.to_string()).or_default();
        if *count >= max {
            return Err(ApiError::TooManyRequests {
                detail: format!("you have {max} streams open already; close one first"),
                retry_after_secs: RETRY_HINT.as_secs(),
            });
        }
        *count += 1;
        Ok(Slot {
            slots: self.clone(),
            user: user.to_string(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().expect("never poisoned");
        if let Some(count) = open.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.user);
            }
        }
    }
}

/// Counts an open stream in metrics while it lives.
struct OpenGauge(prometheus::IntGauge);

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// An open stream on its way from its handler to a writer.
pub struct Opened {
    source: Arc<dyn Source>,
    topic: String,
    key: String,
    /// Changes since before the catch-up, until a writer forwards the key.
    subscription: Subscription,
    /// The hub's epoch before the catch-up: if it moved, notifications may
    /// have been lost meanwhile.
    epoch: u64,
    /// What the client has been sent (or is covered by what it was sent).
    last: u64,
    /// The greeting and the catch-up, not yet written.
    start: Bytes,
    slot: Slot,
    open: OpenGauge,
}

/// A stream for the server to hand to a writer, in the response's
/// extensions. (Extensions must be `Clone`: whoever takes it first has it.)
#[derive(Clone)]
pub struct Detach(Arc<Mutex<Option<Box<Opened>>>>);

impl Detach {
    pub fn take(&self) -> Option<Box<Opened>> {
        self.0.lock().expect("never poisoned").take()
    }
}

/// Opens a stream for `user`: subscribes to `topic`/`key`, reads what the
/// client missed after `last_event_id` (or the fresh-client state), and
/// answers with the stream's headers; the server hands the stream to a
/// writer, which sends that and then live changes until the client leaves
/// or the server shuts down.
pub async fn open<S: StreamSource>(
    state: &AppState,
    user: &str,
    source: S,
    topic: &str,
    key: &str,
    last_event_id: Option<u64>,
) -> Result<Response, ApiError> {
    let slot = state
        .streams
        .take(user, state.query.sse_max_streams_per_user)?;
    // Subscribe first: a change committed after the catch-up's snapshot is
    // then in the subscription's buffer.
    let subscription = state.hub.subscribe(topic, key);
    let epoch = state.hub.epoch();
    if last_event_id.is_some() {
        state
            .metrics
            .sse_catch_ups
            .with_label_values(&[source.kind(), "resume"])
            .inc();
    }
    let caught = source.catch_up(last_event_id).await?;
    let gauge = state.metrics.sse_open.with_label_values(&[source.kind()]);
    // Slow clients of this kind of stream show in /metrics as zero until one is.
    state
        .metrics
        .sse_lagged
        .with_label_values(&[source.kind(), "caught_up"]);
    gauge.inc();
    let mut start = Frames::default();
    start.retry(RETRY_HINT);
    start.comment("podium");
    source.opening(&mut start);
    let last = caught.send_after(last_event_id.unwrap_or(0), &mut start);
    let opened = Opened {
        source: Arc::new(source),
        topic: topic.to_string(),
        key: key.to_string(),
        subscription,
        epoch,
        last,
        start: start.freeze(),
        slot,
        open: OpenGauge(gauge),
    };
    // Of unknown length (axum would add `content-length: 0` to an empty
    // one), and never ending: the writer sends the events on the socket.
    let body = Body::from_stream(futures::stream::pending::<Result<Bytes, Infallible>>());
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
        .extensions_mut()
        .insert(Detach(Arc::new(Mutex::new(Some(Box::new(opened))))));
    Ok(response)
}
