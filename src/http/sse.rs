//! Server-Sent Events plumbing shared by every stream: resume from
//! `Last-Event-ID` out of the read model, then live changes from the
//! instance's [`ChangeHub`](crate::query::changes::ChangeHub), nothing lost or repeated.
//!
//! Event ids are log seqs. A stream subscribes to live changes *before* it
//! reads the read model, at the projection's checkpoint `w` in the same
//! snapshot: what it read covers every change up to `w`, so live changes at
//! or below `w` are dropped and the rest sent. The same catch-up runs when a
//! slow client overflows its buffer or the NATS connection was re-established.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use podium_domain::log::Change;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

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

    /// The events a live change becomes.
    fn render(change: &Change) -> Vec<Event>;
}

/// Events read from the read model, and the checkpoint `seq` they cover.
#[derive(Default)]
pub struct CatchUp {
    pub events: Vec<Event>,
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
        self.events.push(event(id, name, data));
        self.last_id = id;
    }

    /// Replaces the events by one `resync`: more changed than a catch-up
    /// sends one by one, and the client should reload.
    pub fn resync(&mut self) {
        self.events.clear();
        self.push(
            self.seq,
            "resync",
            &serde_json::json!({"reason": "too many changes to replay; reload"}),
        );
    }
}

/// An event with an id, a name and JSON data.
pub fn event(id: u64, name: &str, data: &serde_json::Value) -> Event {
    Event::default()
        .event(name)
        .id(id.to_string())
        .data(data.to_string())
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

struct Live<S> {
    source: S,
    subscription: Subscription,
    /// The last seq the client has been sent (or is covered by what it was sent).
    last: u64,
    pending: VecDeque<Event>,
    epochs: watch::Receiver<u64>,
    stop: CancellationToken,
    state: AppState,
    _slot: Slot,
    _open: OpenGauge,
}

impl<S: StreamSource> Live<S> {
    /// Sends what changed since `last` from the read model.
    async fn catch_up(&mut self, reason: &str) -> Result<(), ApiError> {
        self.state
            .metrics
            .sse_catch_ups
            .with_label_values(&[self.source.kind(), reason])
            .inc();
        let caught = self.source.catch_up(Some(self.last)).await?;
        self.push(caught);
        Ok(())
    }

    fn push(&mut self, caught: CatchUp) {
        self.pending.extend(caught.events);
        if caught.seq > caught.last_id.max(self.last) {
            // Moves the client's Last-Event-ID past what the read model covers.
            self.pending
                .push_back(Event::default().id(caught.seq.to_string()));
        }
        self.last = self.last.max(caught.seq);
    }

    /// Whether `change`'s predecessor is newer than what this stream sent.
    fn missed(&self, change: &Change) -> bool {
        change.prev.is_some_and(|prev| prev > self.last)
    }

    /// Tells the client to reload, as of seq `seq`.
    fn resync_at(&mut self, seq: u64) {
        let mut reload = CatchUp::at(seq);
        reload.resync();
        self.push(reload);
    }

    /// The next event to send, or `None` when the stream ends.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if self.stop.is_cancelled() {
                return None;
            }
            tokio::select! {
                () = self.stop.cancelled() => return None,
                changed = self.epochs.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    self.epochs.borrow_and_update();
                    if let Err(err) = self.catch_up("bus_reconnected").await {
                        tracing::warn!(%err, "ending a stream that cannot catch up");
                        return None;
                    }
                }
                received = self.subscription.changes.recv() => match received {
                    // It came after a newer one (an owner handing over):
                    // the client's last id is past it, so it reloads.
                    Ok(delivered) if delivered.late && delivered.change.seq <= self.last => {
                        self.resync_at(self.last);
                    }
                    // The one before it was lost on the way (and this stream
                    // has not covered it otherwise): what the read model
                    // holds since the last one sent, then this one.
                    Ok(delivered) if delivered.gap && self.missed(&delivered.change) => {
                        if let Err(err) = self.catch_up("gap").await {
                            tracing::warn!(%err, "ending a stream that cannot catch up");
                            return None;
                        }
                        let lost = delivered.change.prev.unwrap_or(delivered.change.seq);
                        if self.last < lost {
                            // The read model has not got it yet (a replica
                            // behind the primary): the client reloads.
                            self.resync_at(lost);
                        }
                        if delivered.change.seq > self.last {
                            self.last = delivered.change.seq;
                            self.pending.extend(delivered.events(S::render).iter().cloned());
                        }
                    }
                    Ok(delivered) if delivered.change.seq > self.last => {
                        self.last = delivered.change.seq;
                        self.pending.extend(delivered.events(S::render).iter().cloned());
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(missed)) => {
                        tracing::debug!(missed, "a slow SSE client catches up from the read model");
                        self.state
                            .metrics
                            .sse_lagged
                            .with_label_values(&[self.source.kind(), "caught_up"])
                            .inc();
                        if let Err(err) = self.catch_up("lagged").await {
                            tracing::warn!(%err, "ending a stream that cannot catch up");
                            return None;
                        }
                    }
                    Err(RecvError::Closed) => return None,
                },
            }
        }
    }
}

/// Opens a stream for `user`: subscribes to `topic`/`key`, sends what the
/// client missed after `last_event_id` (or the fresh-client state), then
/// live changes until the client leaves or the server shuts down.
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
    let mut epochs = state.hub.epochs();
    epochs.borrow_and_update();
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
    let mut live = Live {
        source,
        subscription,
        last: last_event_id.unwrap_or(0),
        pending: VecDeque::new(),
        epochs,
        stop: state.shutdown.clone(),
        state: state.clone(),
        _slot: slot,
        _open: OpenGauge(gauge),
    };
    live.pending
        .push_back(Event::default().retry(RETRY_HINT).comment("podium"));
    live.push(caught);
    let events = futures::stream::unfold(live, |mut live| async move {
        let event = live.next().await?;
        Some((Ok::<_, Infallible>(event), live))
    });
    Ok(respond(
        events,
        Duration::from_secs(state.query.sse_heartbeat_secs.max(1)),
    ))
}

fn respond(
    events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static,
    heartbeat: Duration,
) -> Response {
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(heartbeat))
        .into_response();
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
