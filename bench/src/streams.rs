//! Thousands of SSE clients on plain non-blocking sockets, read by one
//! thread: on a two-core machine the load generator shares the CPU with the
//! server, so a client per task (or hyper's per-connection machinery) would
//! time the client more than the server.

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

/// Streams being opened at a time by one client thread.
const OPENING: usize = 256;

/// The text that starts a leaderboard change on the wire.
const ENTRY: &[u8] = b"event: entry";

struct Client {
    socket: TcpStream,
    sent: bool,
    /// The response head, until it is complete.
    head: Vec<u8>,
    open: bool,
    /// The last bytes read, which may begin the marker.
    tail: Vec<u8>,
    arrived: Option<Instant>,
}

/// Opens `n` streams with `request` to `addr`, sends the number opened on
/// `opened` once all are (or the first failure), and returns, once every
/// stream has seen an `entry` event or `stop` is set, when each saw it.
pub fn run(
    addr: SocketAddr,
    request: &str,
    n: usize,
    opened: mpsc::Sender<anyhow::Result<usize>>,
    stop: &AtomicBool,
) -> Vec<Option<Instant>> {
    match open_and_read(addr, request, n, &opened, stop) {
        Ok(arrivals) => arrivals,
        Err(err) => {
            let _ = opened.send(Err(err));
            Vec::new()
        }
    }
}

fn open_and_read(
    addr: SocketAddr,
    request: &str,
    n: usize,
    opened: &mpsc::Sender<anyhow::Result<usize>>,
    stop: &AtomicBool,
) -> anyhow::Result<Vec<Option<Instant>>> {
    let mut poll = Poll::new()?;
    let mut clients = Vec::with_capacity(n);
    let (mut open, mut arrived) = (0, 0);
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 16 * 1024];
    while arrived < n && !stop.load(Ordering::Relaxed) {
        // Clients arrive at a high rate, not all in the same instant: at
        // most OPENING streams are being opened at a time.
        while clients.len() < n && clients.len() - open < OPENING {
            let mut socket = TcpStream::connect(addr)?;
            let token = Token(clients.len());
            poll.registry().register(
                &mut socket,
                token,
                Interest::READABLE | Interest::WRITABLE,
            )?;
            clients.push(Client {
                socket,
                sent: false,
                head: Vec::new(),
                open: false,
                tail: Vec::new(),
                arrived: None,
            });
        }
        poll.poll(&mut events, Some(Duration::from_millis(100)))?;
        for event in &events {
            let client = &mut clients[event.token().0];
            if event.is_writable() && !client.sent {
                match client.socket.write(request.as_bytes()) {
                    Ok(written) => {
                        anyhow::ensure!(written == request.len(), "a short request write");
                        client.sent = true;
                    }
                    Err(err) if err.kind() == ErrorKind::WouldBlock => {}
                    Err(err) if err.kind() == ErrorKind::NotConnected => {}
                    Err(err) => return Err(err.into()),
                }
            }
            if !event.is_readable() {
                continue;
            }
            loop {
                let read = match client.socket.read(&mut buf) {
                    Ok(0) => anyhow::bail!("a stream ended"),
                    Ok(read) => read,
                    Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                    Err(err) => return Err(err.into()),
                };
                let mut data = &buf[..read];
                if !client.open {
                    client.head.extend_from_slice(data);
                    let Some(end) = client.head.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    anyhow::ensure!(
                        client.head.starts_with(b"HTTP/1.1 200"),
                        "a stream was answered {}",
                        String::from_utf8_lossy(&client.head[..end])
                    );
                    client.open = true;
                    open += 1;
                    if open == n {
                        let _ = opened.send(Ok(n));
                    }
                    client.tail = client.head.split_off(end + 4);
                    client.head = Vec::new();
                    data = &[];
                }
                if client.arrived.is_some() {
                    continue;
                }
                client.tail.extend_from_slice(data);
                if client.tail.windows(ENTRY.len()).any(|w| w == ENTRY) {
                    client.arrived = Some(Instant::now());
                    client.tail = Vec::new();
                    arrived += 1;
                } else {
                    let keep = client.tail.len().min(ENTRY.len() - 1);
                    client.tail.drain(..client.tail.len() - keep);
                }
            }
        }
    }
    anyhow::ensure!(open == n, "only {open} of {n} streams opened");
    Ok(clients.into_iter().map(|client| client.arrived).collect())
}
