//! The writers that own every open stream of an instance.
//!
//! A writer is one task holding a slab of sockets. It forwards each key its
//! streams follow from the [`ChangeHub`] (one forward per key, not per
//! stream), renders each change once, frames it once and writes it to every
//! stream of its key. A socket that would block keeps what is left in a
//! queue of shared buffers and wakes the writer when it drains; one that
//! falls `buffer` writes behind stops being queued for and is caught up from
//! the read model once drained. One heartbeat ticker serves every stream,
//! and one ticker moves the streams of a source that closed (a leaderboard
//! period that ended) on to the next, within a second of its end.
//! Catch-ups (a lost change, a NATS reconnection, a slow client) run as
//! queries beside the writer, one per key and starting point however many
//! streams need it.
//!
//! A writer never waits on a socket: sockets are non-blocking, and their
//! readiness (writable again, or readable: the client left) wakes the writer
//! through a waker per stream that names it.

use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use chrono::{DateTime, Utc};

use super::{CatchUp, Frames, Next, Opened, Source};
use crate::clock::Clock;
use crate::http::error::ApiError;
use crate::ops::metrics::Metrics;
use crate::query::changes::{ChangeHub, Delivered};

/// Bytes a client may send on a stream (it has nothing to say) before the
/// stream is closed.
const MAX_IGNORED_INPUT: usize = 64 * 1024;

/// How a stream's body is framed on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Framing {
    /// HTTP/1.1: each write is one chunk; the stream ends with the last chunk.
    Chunked,
    /// HTTP/1.0: the body runs until the connection closes.
    Close,
}

/// Writers' settings.
#[derive(Clone, Debug)]
pub struct WriterSettings {
    /// Writer tasks (streams are spread over them).
    pub writers: usize,
    /// Writes a stream may have queued while its socket blocks before it is
    /// caught up from the read model instead.
    pub buffer: usize,
    /// How often every stream gets a comment, so proxies and clients know
    /// it is alive.
    pub heartbeat: Duration,
}

/// The instance's writers; streams are handed to them round-robin.
pub struct Writers {
    shards: Vec<mpsc::UnboundedSender<(TcpStream, Box<Opened>, Framing)>>,
    next: AtomicUsize,
}

impl Writers {
    /// Starts the writers on `tasks`; they end their streams and stop when
    /// `stop` is cancelled.
    pub fn start(
        hub: Arc<ChangeHub>,
        metrics: Metrics,
        clock: Clock,
        settings: &WriterSettings,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) -> (Arc<Self>, Vec<JoinHandle<()>>) {
        let mut shards = Vec::new();
        let mut handles = Vec::new();
        for id in 0..settings.writers.max(1) {
            let (adopt, adopted) = mpsc::unbounded_channel();
            let (sink, changes) = mpsc::unbounded_channel();
            let (done, caught_up) = mpsc::unbounded_channel();
            let shard = Shard {
                id,
                hub: hub.clone(),
                metrics: metrics.clone(),
                clock: clock.clone(),
                next_end: None,
                buffer: settings.buffer.max(1),
                conns: Vec::new(),
                free: Vec::new(),
                groups: HashMap::new(),
                sink,
                ready: Arc::new(Ready::default()),
                catch_ups: HashMap::new(),
                done,
            };
            shards.push(adopt);
            handles.push(tasks.spawn(shard.run(
                adopted,
                changes,
                caught_up,
                settings.heartbeat,
                stop.clone(),
            )));
        }
        let writers = Arc::new(Self {
            shards,
            next: AtomicUsize::new(0),
        });
        (writers, handles)
    }

    /// Hands `stream`, whose headers `socket` has sent, to a writer. After
    /// shutdown the socket is closed.
    pub fn adopt(&self, socket: TcpStream, stream: Box<Opened>, framing: Framing) {
        let shard = self.next.fetch_add(1, Ordering::Relaxed) % self.shards.len();
        // A stopped writer drops the stream, which closes the socket.
        let _ = self.shards[shard].send((socket, stream, framing));
    }
}

/// Topic and key, as the hub names them.
type TopicKey = (String, String);

/// A stream by slab index and generation (a later stream may take its index).
type StreamId = (u32, u32);

/// One change's text, framed both ways, shared by every stream it goes to.
struct Wire {
    raw: Bytes,
    chunked: Bytes,
}

impl Wire {
    fn new(raw: Bytes) -> Self {
        let mut chunked = Vec::with_capacity(raw.len() + 12);
        chunked.extend_from_slice(format!("{:x}\r\n", raw.len()).as_bytes());
        chunked.extend_from_slice(&raw);
        chunked.extend_from_slice(b"\r\n");
        Self {
            raw,
            chunked: chunked.into(),
        }
    }

    fn of(frames: Frames) -> Self {
        Self::new(frames.freeze())
    }

    fn framed(&self, framing: Framing) -> Bytes {
        match framing {
            Framing::Chunked => self.chunked.clone(),
            Framing::Close => self.raw.clone(),
        }
    }
}

/// Where a stream is.
enum Mode {
    /// Sent everything up to its `last`; live changes go out as they come.
    Live,
    /// Waiting for a catch-up from its `last`; changes that arrive meanwhile
    /// wait too (up to the buffer; past it, another catch-up follows).
    CatchingUp {
        queued: Vec<Arc<Delivered>>,
        overflowed: bool,
    },
    /// Its socket fell behind: nothing more is queued, and it is caught up
    /// from the read model once what is queued is written.
    Behind,
}

/// One open stream.
struct Conn {
    socket: TcpStream,
    framing: Framing,
    key: Arc<TopicKey>,
    /// Its place in its group's members.
    pos: usize,
    /// The last seq the client has been sent (or is covered by what it was sent).
    last: u64,
    /// What is left to write while the socket blocks.
    out: VecDeque<Bytes>,
    mode: Mode,
    /// Wakes the writer naming this stream.
    waker: Waker,
    /// Bytes the client sent, which are ignored.
    ignored: usize,
    _slot: super::Slot,
    _open: super::OpenGauge,
}

/// The streams of one key on one writer.
struct Group {
    key: Arc<TopicKey>,
    source: Arc<dyn Source>,
    /// When its source closes, if it does.
    ends: Option<DateTime<Utc>>,
    members: Vec<u32>,
}

impl Group {
    /// `delivered` as this key's streams are sent it (its text rendered once
    /// for every writer).
    fn wire(&self, delivered: &Delivered) -> Wire {
        Wire::new(
            delivered
                .events(|change| self.source.render(change))
                .clone(),
        )
    }
}

/// Streams whose sockets became ready, named by slab index and generation.
#[derive(Default)]
struct Ready {
    woken: Mutex<Vec<StreamId>>,
    notify: Notify,
}

struct StreamWaker {
    ready: Arc<Ready>,
    index: u32,
    generation: u32,
}

impl Wake for StreamWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready
            .woken
            .lock()
            .expect("never poisoned")
            .push((self.index, self.generation));
        self.ready.notify.notify_one();
    }
}

/// A slab entry: its generation tells a stale wake-up from a current one.
struct Entry {
    generation: u32,
    conn: Option<Conn>,
}

/// A catch-up's answer for every stream of `key` that waited from `after`.
struct CaughtUp {
    key: Arc<TopicKey>,
    after: u64,
    result: Result<CatchUp, ApiError>,
}

struct Shard {
    id: usize,
    hub: Arc<ChangeHub>,
    metrics: Metrics,
    /// What tells when a source closes.
    clock: Clock,
    /// The earliest of the groups' ends.
    next_end: Option<DateTime<Utc>>,
    buffer: usize,
    conns: Vec<Entry>,
    free: Vec<u32>,
    groups: HashMap<Arc<TopicKey>, Group>,
    sink: mpsc::UnboundedSender<Arc<Delivered>>,
    ready: Arc<Ready>,
    /// Catch-ups under way, by key and starting point, with the streams
    /// (index, generation) that wait for them.
    catch_ups: HashMap<(Arc<TopicKey>, u64), Vec<StreamId>>,
    done: mpsc::UnboundedSender<CaughtUp>,
}

/// Most changes taken from the hub in one go.
const BATCH: usize = 256;

/// How often a writer looks for sources that have closed.
const ROLL_CHECK: Duration = Duration::from_secs(1);

impl Shard {
    async fn run(
        mut self,
        mut adopted: mpsc::UnboundedReceiver<(TcpStream, Box<Opened>, Framing)>,
        mut changes: mpsc::UnboundedReceiver<Arc<Delivered>>,
        mut caught_up: mpsc::UnboundedReceiver<CaughtUp>,
        heartbeat: Duration,
        stop: CancellationToken,
    ) {
        let mut epochs = self.hub.epochs();
        epochs.borrow_and_update();
        let mut ticker = tokio::time::interval(heartbeat.max(Duration::from_millis(100)));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker.tick().await;
        let mut rolls = tokio::time::interval(ROLL_CHECK);
        rolls.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                Some((socket, stream, framing)) = adopted.recv() => {
                    self.adopt(socket, *stream, framing);
                }
                received = changes.recv_many(&mut batch, BATCH) => {
                    if received == 0 {
                        // Only the shard itself holds the sender: never.
                        break;
                    }
                    for delivered in batch.drain(..) {
                        self.deliver(&delivered);
                    }
                }
                Some(caught) = caught_up.recv() => self.caught_up(caught),
                () = self.ready.notify.notified() => self.service_ready(),
                changed = epochs.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    epochs.borrow_and_update();
                    self.all_catch_up();
                }
                _ = ticker.tick() => self.heartbeat(),
                _ = rolls.tick() => self.roll_due(),
            }
        }
        self.end_all();
    }

    fn conn(&mut self, index: u32) -> Option<&mut Conn> {
        self.conns
            .get_mut(index as usize)
            .and_then(|entry| entry.conn.as_mut())
    }

    /// The stream at `index` if it is still the one of `generation`.
    fn current(&mut self, (index, generation): StreamId) -> Option<&mut Conn> {
        self.conns
            .get_mut(index as usize)
            .filter(|entry| entry.generation == generation)
            .and_then(|entry| entry.conn.as_mut())
    }

    fn adopt(&mut self, socket: TcpStream, stream: Opened, framing: Framing) {
        let Opened {
            source,
            topic,
            key,
            mut subscription,
            epoch,
            last,
            start,
            slot,
            open,
        } = stream;
        let key = self.group(topic, key, source);
        let group = self.groups.get_mut(&key).expect("just made");
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.conns.push(Entry {
                    generation: 0,
                    conn: None,
                });
                u32::try_from(self.conns.len() - 1).expect("fewer than 4 billion streams")
            }
        };
        let entry = &mut self.conns[index as usize];
        let waker = Waker::from(Arc::new(StreamWaker {
            ready: self.ready.clone(),
            index,
            generation: entry.generation,
        }));
        let pos = group.members.len();
        group.members.push(index);
        entry.conn = Some(Conn {
            socket,
            framing,
            key,
            pos,
            last,
            out: VecDeque::new(),
            mode: Mode::Live,
            waker,
            ignored: 0,
            _slot: slot,
            _open: open,
        });
        // The socket is fresh: its first write is taken.
        self.send(index, &Wire::new(start));
        // What changed since the handler subscribed, until this writer's
        // forward (anything also forwarded is dropped by its seq).
        loop {
            use tokio::sync::broadcast::error::TryRecvError;
            match subscription.changes.try_recv() {
                Ok(delivered) => self.apply(index, &delivered, false),
                Err(TryRecvError::Lagged(_)) => self.catch_up(index, "lagged", Vec::new()),
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        if epoch != self.hub.epoch() {
            self.catch_up(index, "bus_reconnected", Vec::new());
        }
        self.service(index);
    }

    /// The group of `topic`/`key`, made (and its key forwarded from the
    /// hub) if it is new.
    fn group(&mut self, topic: String, key: String, source: Arc<dyn Source>) -> Arc<TopicKey> {
        let key = Arc::new((topic, key));
        if let Some(group) = self.groups.get(&key) {
            return group.key.clone();
        }
        self.hub.forward(&key.0, &key.1, self.id, self.sink.clone());
        let ends = source.ends_at();
        if let Some(end) = ends {
            self.next_end = Some(self.next_end.map_or(end, |next| next.min(end)));
        }
        let group = Group {
            key: key.clone(),
            source,
            ends,
            members: Vec::new(),
        };
        self.groups.insert(key.clone(), group);
        key
    }

    /// Moves the streams of every source that has closed on to the source
    /// that follows it: each is told (the source's announcement) and caught
    /// up on the new one from the start. Streams of a source with no
    /// successor end.
    fn roll_due(&mut self) {
        let now = self.clock.now();
        if self.next_end.is_none_or(|end| end > now) {
            return;
        }
        let due: Vec<Arc<TopicKey>> = self
            .groups
            .values()
            .filter(|group| group.ends.is_some_and(|end| end <= now))
            .map(|group| group.key.clone())
            .collect();
        for key in due {
            let Some(group) = self.groups.remove(&key) else {
                continue;
            };
            self.hub.unforward(&key.0, &key.1, self.id);
            let Some(Next {
                source,
                key: next,
                announce,
            }) = group.source.next()
            else {
                for index in group.members {
                    self.close(index);
                }
                continue;
            };
            let next = self.group(key.0.clone(), next, source);
            // Every member moves first; only then are they written to, since
            // a write that fails closes its stream (and would empty the new
            // group under the others).
            let joined = self.groups.get_mut(&next).expect("just made");
            let mut moved = Vec::with_capacity(group.members.len());
            for index in group.members {
                let Some(conn) = self.conns[index as usize].conn.as_mut() else {
                    continue;
                };
                conn.key = next.clone();
                conn.pos = joined.members.len();
                joined.members.push(index);
                // What was under way for the old source no longer applies:
                // the client starts over on the new one.
                conn.mode = Mode::Live;
                conn.last = 0;
                moved.push(index);
            }
            let announce = Wire::of(announce);
            for index in moved {
                self.send_anyway(index, &announce);
                self.catch_up(index, "period", Vec::new());
            }
        }
        self.next_end = self.groups.values().filter_map(|group| group.ends).min();
    }

    /// Hands one change to every stream of its key.
    fn deliver(&mut self, delivered: &Arc<Delivered>) {
        let change = &delivered.change;
        let key = (change.topic.clone(), change.key.clone());
        let Some(group) = self.groups.get(&key) else {
            return;
        };
        let started = std::time::Instant::now();
        let (wire, kind) = (group.wire(delivered), group.source.kind());
        let members = group.members.clone();
        for index in members {
            self.apply_rendered(index, delivered, &wire, false);
        }
        self.metrics
            .sse_fan_out
            .with_label_values(&[kind])
            .observe(started.elapsed().as_secs_f64());
    }

    fn apply(&mut self, index: u32, delivered: &Arc<Delivered>, replay: bool) {
        let Some(conn) = self.conn(index) else {
            return;
        };
        let key = conn.key.clone();
        let Some(group) = self.groups.get(&key) else {
            return;
        };
        let wire = group.wire(delivered);
        self.apply_rendered(index, delivered, &wire, replay);
    }

    /// Sends `delivered` (as `wire`) to the stream at `index` if it has not
    /// been sent it, as [`Mode`] says. `replay`: the stream has just caught
    /// up, so a change after a gap that the read model does not cover yet
    /// makes the client reload rather than catch up again.
    fn apply_rendered(
        &mut self,
        index: u32,
        delivered: &Arc<Delivered>,
        wire: &Wire,
        replay: bool,
    ) {
        let buffer = self.buffer;
        let Some(conn) = self.conn(index) else {
            return;
        };
        let change = &delivered.change;
        match &mut conn.mode {
            Mode::CatchingUp { queued, overflowed } => {
                if queued.len() < buffer {
                    queued.push(delivered.clone());
                } else {
                    *overflowed = true;
                }
            }
            Mode::Behind => {}
            Mode::Live => {
                let last = conn.last;
                if delivered.late && change.seq <= last {
                    // It came after a newer one (an owner handing over): the
                    // client's last id is past it, so it reloads.
                    self.resync_at(index, last);
                } else if delivered.gap && change.prev.is_some_and(|prev| prev > last) {
                    if !replay {
                        // The one before it was lost on the way: what the
                        // read model holds since the last one sent, then this.
                        self.catch_up(index, "gap", vec![delivered.clone()]);
                        return;
                    }
                    let lost = change.prev.unwrap_or(change.seq);
                    // The read model has not got it yet (a replica behind
                    // the primary): the client reloads.
                    self.resync_at(index, lost);
                    if self.conn(index).is_some_and(|conn| change.seq > conn.last) {
                        self.send_up_to(index, wire, change.seq);
                    }
                } else if change.seq > last {
                    self.send_up_to(index, wire, change.seq);
                }
            }
        }
    }

    /// Tells the client at `index` to reload, as of seq `seq`.
    fn resync_at(&mut self, index: u32, seq: u64) {
        let Some(conn) = self.conn(index) else {
            return;
        };
        let mut reload = CatchUp::at(seq);
        reload.resync();
        let mut out = Frames::default();
        let last = reload.send_after(conn.last, &mut out);
        self.send_up_to(index, &Wire::of(out), last);
    }

    /// Writes `wire` to the stream at `index`, or queues it while the socket
    /// blocks; returns whether it did (only then has the client been sent
    /// it). A stream that falls `buffer` writes behind is marked
    /// [`Mode::Behind`] instead, and one whose socket fails is closed.
    fn send(&mut self, index: u32, wire: &Wire) -> bool {
        let buffer = self.buffer;
        let Some(conn) = self.conns[index as usize].conn.as_mut() else {
            return false;
        };
        let bytes = wire.framed(conn.framing);
        if !conn.out.is_empty() {
            if conn.out.len() >= buffer {
                if !matches!(conn.mode, Mode::Behind) {
                    conn.mode = Mode::Behind;
                    let kind = self.groups.get(&conn.key).map_or("", |g| g.source.kind());
                    self.metrics
                        .sse_lagged
                        .with_label_values(&[kind, "caught_up"])
                        .inc();
                    tracing::debug!("a slow SSE client catches up from the read model");
                }
                return false;
            }
            conn.out.push_back(bytes);
            return true;
        }
        match conn.socket.try_write(&bytes) {
            Ok(written) if written == bytes.len() => true,
            Ok(written) => {
                conn.out.push_back(bytes.slice(written..));
                self.flush(index);
                true
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => {
                conn.out.push_back(bytes);
                self.flush(index);
                true
            }
            Err(_) => {
                self.close(index);
                false
            }
        }
    }

    /// Writes `wire` to the stream at `index` even past its buffer: what
    /// must reach a slow client too (that its source changed).
    fn send_anyway(&mut self, index: u32, wire: &Wire) {
        let Some(conn) = self.conn(index) else {
            return;
        };
        if conn.out.is_empty() {
            self.send(index, wire);
        } else {
            let bytes = wire.framed(conn.framing);
            conn.out.push_back(bytes);
        }
    }

    /// Sends `wire`, which brings the client up to `seq`, to the stream at
    /// `index`; what it has been sent moves only if it was.
    fn send_up_to(&mut self, index: u32, wire: &Wire, seq: u64) {
        if self.send(index, wire) {
            if let Some(conn) = self.conn(index) {
                conn.last = conn.last.max(seq);
            }
        }
    }

    /// Writes what is queued for `index` until the socket blocks (then its
    /// waker is registered) or the queue is empty.
    fn flush(&mut self, index: u32) {
        let Some(conn) = self.conn(index) else {
            return;
        };
        let waker = conn.waker.clone();
        let mut cx = Context::from_waker(&waker);
        while let Some(front) = conn.out.front_mut() {
            match conn.socket.try_write(front) {
                Ok(written) if written == front.len() => {
                    conn.out.pop_front();
                }
                Ok(written) => {
                    bytes::Buf::advance(front, written);
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => {
                    match conn.socket.poll_write_ready(&mut cx) {
                        Poll::Pending => return,
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(_)) => return self.close(index),
                    }
                }
                Err(_) => return self.close(index),
            }
        }
    }

    /// A stream's socket became ready: reads (the client leaving shows as
    /// the end of its input), writes what is queued, and catches it up if
    /// it fell behind and has drained.
    fn service(&mut self, index: u32) {
        let Some(conn) = self.conn(index) else {
            return;
        };
        let waker = conn.waker.clone();
        let mut cx = Context::from_waker(&waker);
        let mut scratch = [0u8; 256];
        loop {
            match conn.socket.poll_read_ready(&mut cx) {
                Poll::Pending => break,
                Poll::Ready(Err(_)) => return self.close(index),
                Poll::Ready(Ok(())) => match conn.socket.try_read(&mut scratch) {
                    Ok(0) => return self.close(index),
                    Ok(read) => {
                        conn.ignored += read;
                        if conn.ignored > MAX_IGNORED_INPUT {
                            return self.close(index);
                        }
                    }
                    Err(err) if err.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => return self.close(index),
                },
            }
        }
        self.flush(index);
        if let Some(conn) = self.conn(index) {
            if conn.out.is_empty() && matches!(conn.mode, Mode::Behind) {
                self.catch_up(index, "lagged", Vec::new());
            }
        }
    }

    fn service_ready(&mut self) {
        let woken = std::mem::take(&mut *self.ready.woken.lock().expect("never poisoned"));
        for (index, generation) in woken {
            if self.current((index, generation)).is_some() {
                self.service(index);
            }
        }
    }

    /// Starts catching the stream at `index` up from the read model (with
    /// `queued` changes to send after), sharing the query with every stream
    /// of its key waiting from the same point.
    fn catch_up(&mut self, index: u32, reason: &'static str, queued: Vec<Arc<Delivered>>) {
        let generation = self.conns[index as usize].generation;
        let Some(conn) = self.conn(index) else {
            return;
        };
        match &mut conn.mode {
            Mode::CatchingUp { overflowed, .. } => {
                // Already waiting: what it reads may miss what was lost.
                *overflowed = true;
                return;
            }
            mode => {
                *mode = Mode::CatchingUp {
                    queued,
                    overflowed: false,
                }
            }
        }
        let (key, after) = (conn.key.clone(), conn.last);
        let Some(group) = self.groups.get(&key) else {
            return;
        };
        let source = group.source.clone();
        self.metrics
            .sse_catch_ups
            .with_label_values(&[source.kind(), reason])
            .inc();
        let waiting = self.catch_ups.entry((key.clone(), after)).or_default();
        waiting.push((index, generation));
        if waiting.len() > 1 {
            return;
        }
        let done = self.done.clone();
        tokio::spawn(async move {
            let result = source.catch_up(Some(after)).await;
            let _ = done.send(CaughtUp { key, after, result });
        });
    }

    fn caught_up(&mut self, caught: CaughtUp) {
        let CaughtUp { key, after, result } = caught;
        let waiting = self
            .catch_ups
            .remove(&(key.clone(), after))
            .unwrap_or_default();
        let caught = match result {
            Ok(caught) => caught,
            Err(err) => {
                tracing::warn!(%err, "ending streams that cannot catch up");
                for waiter in waiting {
                    if self.current(waiter).is_some_and(|conn| *conn.key == *key) {
                        self.close(waiter.0);
                    }
                }
                return;
            }
        };
        let mut out = Frames::default();
        let last = caught.send_after(after, &mut out);
        let wire = Wire::of(out);
        for waiter in waiting {
            let Some(conn) = self.current(waiter) else {
                continue;
            };
            // A stream that moved to another source since waits for its own.
            if !matches!(conn.mode, Mode::CatchingUp { .. }) || *conn.key != *key {
                continue;
            }
            let Mode::CatchingUp { queued, overflowed } =
                std::mem::replace(&mut conn.mode, Mode::Live)
            else {
                unreachable!("checked above");
            };
            let index = waiter.0;
            self.send_up_to(index, &wire, last);
            for delivered in &queued {
                self.apply(index, delivered, true);
            }
            if overflowed {
                self.catch_up(index, "lagged", Vec::new());
            }
        }
    }

    /// Notifications may have been lost (the NATS connection came back):
    /// every stream catches up.
    fn all_catch_up(&mut self) {
        for index in 0..self.conns.len() as u32 {
            if self.conn(index).is_some() {
                self.catch_up(index, "bus_reconnected", Vec::new());
            }
        }
    }

    fn heartbeat(&mut self) {
        let beat = Wire::new(Bytes::from_static(b":\n\n"));
        for index in 0..self.conns.len() as u32 {
            if self.conn(index).is_some_and(|conn| conn.out.is_empty()) {
                let _ = self.send(index, &beat);
            }
        }
    }

    fn close(&mut self, index: u32) {
        let entry = &mut self.conns[index as usize];
        let Some(conn) = entry.conn.take() else {
            return;
        };
        entry.generation = entry.generation.wrapping_add(1);
        self.free.push(index);
        if let Some(group) = self.groups.get_mut(&conn.key) {
            group.members.swap_remove(conn.pos);
            if let Some(&moved) = group.members.get(conn.pos) {
                if let Some(other) = self.conns[moved as usize].conn.as_mut() {
                    other.pos = conn.pos;
                }
            }
            if group.members.is_empty() {
                self.hub.unforward(&conn.key.0, &conn.key.1, self.id);
                self.groups.remove(&conn.key);
            }
        }
    }

    /// The server is stopping: every stream gets what is queued (as far as
    /// its socket takes it now) and its end, and is closed.
    fn end_all(&mut self) {
        for index in 0..self.conns.len() as u32 {
            let Some(conn) = self.conn(index) else {
                continue;
            };
            let mut ended = true;
            for bytes in conn.out.drain(..) {
                ended &= conn
                    .socket
                    .try_write(&bytes)
                    .is_ok_and(|n| n == bytes.len());
            }
            if ended && conn.framing == Framing::Chunked {
                let _ = conn.socket.try_write(b"0\r\n\r\n");
            }
            self.close(index);
        }
    }
}
