//! The HTTP server: hyper's HTTP/1 on each connection, with one difference.
//! A response that carries a stream ([`Detach`]) goes out as its headers
//! alone; once hyper has written them, the socket is taken back from hyper
//! (dropping its buffers and the connection's task) and handed to one of the
//! instance's [`Writers`], which owns the stream from then on.
//!
//! Everything before that is an ordinary request: the router's layers (auth,
//! limits, CORS, request ids, metrics) see a stream's request like any
//! other, on any request of a keep-alive connection.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{Method, Request, Version};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::sse::writer::{Framing, Writers};
use super::sse::{Detach, Opened};

/// Serves `router` on `listener` until `shutdown` resolves, then stops
/// accepting, lets every connection finish its request in flight, and
/// returns once they have. Streams already handed to `writers` end with the
/// writers.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    writers: Arc<Writers>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let (stop, stopping) = watch::channel(());
    let connections = TaskTracker::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (socket, peer) = match accepted {
            Ok(accepted) => accepted,
            // The client gave up before it was accepted.
            Err(err) if is_connection_error(&err) => continue,
            Err(err) => {
                // Most likely out of file descriptors: wait for some to close.
                tracing::error!(%err, "cannot accept connections; retrying in a second");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // Streams write small events that must not wait for an ACK.
        let _ = socket.set_nodelay(true);
        connections.spawn(connection(
            socket,
            peer,
            router.clone(),
            writers.clone(),
            stopping.clone(),
        ));
    }
    drop(listener);
    let _ = stop.send(());
    connections.close();
    connections.wait().await;
    Ok(())
}

fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Serves one connection; when a response holds a stream, hands the socket
/// to a writer once hyper has written the headers.
async fn connection(
    socket: TcpStream,
    peer: SocketAddr,
    router: Router,
    writers: Arc<Writers>,
    mut stopping: watch::Receiver<()>,
) {
    let handoff = Arc::new(Handoff::default());
    let io = TokioIo::new(Watched {
        socket,
        handoff: handoff.clone(),
    });
    let service = {
        let handoff = handoff.clone();
        hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            // hyper frames a body of unknown length in chunks for HTTP/1.1,
            // and until the connection closes for HTTP/1.0.
            let framing = match request.version() {
                Version::HTTP_10 | Version::HTTP_09 => Framing::Close,
                _ => Framing::Chunked,
            };
            let has_body = request.method() == Method::GET;
            let (router, handoff) = (router.clone(), handoff.clone());
            async move {
                let Ok(mut response) = router.oneshot(request).await;
                if let Some(stream) = response
                    .extensions_mut()
                    .remove::<Detach>()
                    .and_then(|detach| detach.take())
                {
                    // Only a GET's answer has a body to send the stream in
                    // (a HEAD gets the headers); otherwise it is dropped.
                    // The body never ends: hyper writes the headers, then
                    // waits on it until the socket is taken.
                    if has_body && response.status().is_success() {
                        handoff.hold(stream, framing);
                    }
                }
                Ok::<_, Infallible>(response)
            }
        })
    };
    let mut conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            served = poll_fn(|cx| match Pin::new(&mut conn).poll(cx) {
                Poll::Ready(result) => Poll::Ready(Some(result)),
                Poll::Pending if handoff.ready() => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }) => match served {
                Some(Ok(())) => return,
                Some(Err(err)) => {
                    tracing::debug!(%err, "connection ended with an error");
                    return;
                }
                None => break,
            },
            _ = stopping.changed(), if !shutting_down => {
                shutting_down = true;
                Pin::new(&mut conn).graceful_shutdown();
            }
        }
    }
    let socket = conn.into_parts().io.into_inner().socket;
    if let Some((stream, framing)) = handoff.take() {
        writers.adopt(socket, stream, framing);
    }
}

/// A stream waiting for hyper to write its headers, and what the socket has
/// seen since: the headers are out when a write has happened since the
/// stream was held and hyper's flush has completed after it (hyper flushes
/// only once its own buffer is empty).
#[derive(Default)]
struct Handoff {
    stream: Mutex<Option<(Box<Opened>, Framing)>>,
    held: AtomicBool,
    written: AtomicBool,
    flushed: AtomicBool,
}

impl Handoff {
    fn hold(&self, stream: Box<Opened>, framing: Framing) {
        *self.stream.lock().expect("never poisoned") = Some((stream, framing));
        self.written.store(false, Ordering::Relaxed);
        self.held.store(true, Ordering::Relaxed);
    }

    fn wrote(&self) {
        self.written.store(true, Ordering::Relaxed);
        self.flushed.store(false, Ordering::Relaxed);
    }

    fn flushed(&self) {
        self.flushed.store(true, Ordering::Relaxed);
    }

    /// Whether a stream is held and its headers are on the wire.
    fn ready(&self) -> bool {
        self.held.load(Ordering::Relaxed)
            && self.written.load(Ordering::Relaxed)
            && self.flushed.load(Ordering::Relaxed)
    }

    fn take(&self) -> Option<(Box<Opened>, Framing)> {
        self.stream.lock().expect("never poisoned").take()
    }
}

/// The connection's socket, telling its [`Handoff`] about writes and flushes.
struct Watched {
    socket: TcpStream,
    handoff: Arc<Handoff>,
}

impl Watched {
    fn wrote(&self, written: &Poll<io::Result<usize>>) {
        if matches!(written, Poll::Ready(Ok(n)) if *n > 0) {
            self.handoff.wrote();
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_read(cx, buf)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.socket).poll_write(cx, buf);
        self.wrote(&written);
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.socket).poll_write_vectored(cx, bufs);
        self.wrote(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.socket).poll_flush(cx);
        if matches!(flushed, Poll::Ready(Ok(()))) {
            self.handoff.flushed();
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_shutdown(cx)
    }
}
