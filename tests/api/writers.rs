//! Streams on the wire, as the server's writers send them: a stream opened
//! after other requests on one keep-alive connection, HTTP/1.0 (a body that
//! ends with the connection), HEAD, and a client that stops reading (caught
//! up from the read model once it reads again). Plain sockets, so the test
//! sees exactly what the server wrote.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::helpers::{spawn_embedded_with, TestApp};
use crate::nats::wait_until;

const WAIT: Duration = Duration::from_secs(20);

/// A client on a plain socket.
struct Raw {
    socket: TcpStream,
    /// Bytes read and not yet consumed.
    seen: Vec<u8>,
}

impl Raw {
    async fn connect(app: &TestApp) -> Self {
        let address = app.address.trim_start_matches("http://");
        Self {
            socket: TcpStream::connect(address).await.unwrap(),
            seen: Vec::new(),
        }
    }

    /// A client whose socket takes little before it stops the sender.
    async fn connect_small(app: &TestApp) -> Self {
        let address = app.address.trim_start_matches("http://").parse().unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        Self {
            socket: socket.connect(address).await.unwrap(),
            seen: Vec::new(),
        }
    }

    async fn send(&mut self, request: &str) {
        self.socket.write_all(request.as_bytes()).await.unwrap();
    }

    /// Reads until `marker` has been seen; returns everything up to and
    /// including it, or `None` if the connection ends or `WAIT` passes.
    async fn until(&mut self, marker: &str) -> Option<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(at) = find(&self.seen, marker.as_bytes()) {
                let taken: Vec<u8> = self.seen.drain(..at + marker.len()).collect();
                return Some(String::from_utf8(taken).unwrap());
            }
            let mut buf = [0u8; 4096];
            let read = tokio::time::timeout_at(deadline, self.socket.read(&mut buf))
                .await
                .ok()?
                .unwrap();
            if read == 0 {
                return None;
            }
            self.seen.extend_from_slice(&buf[..read]);
        }
    }

    /// Reads until `marker` has been seen, consuming nothing.
    async fn wait_for(&mut self, marker: &str) {
        let deadline = Instant::now() + WAIT;
        while find(&self.seen, marker.as_bytes()).is_none() {
            let mut buf = [0u8; 4096];
            let read = tokio::time::timeout_at(deadline, self.socket.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no {marker:?} in time"))
                .unwrap();
            assert!(read > 0, "the connection ended before {marker:?}");
            self.seen.extend_from_slice(&buf[..read]);
        }
    }

    /// Whether the server closes the connection within `WAIT`.
    async fn closes(&mut self) -> bool {
        let deadline = Instant::now() + WAIT;
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout_at(deadline, self.socket.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(read)) => self.seen.extend_from_slice(&buf[..read]),
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn get(path: &str, token: &str, version: &str) -> String {
    format!("GET {path} {version}\r\nhost: podium\r\nauthorization: Bearer {token}\r\n\r\n")
}

async fn announce(app: &TestApp, user: &str, title: &str, body: &str) {
    let notification = json!({"user_ids": [user], "title": title, "body": body});
    let response = app
        .post("/v1/notifications", &app.admin(), Some(notification))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
}

const FEED: &str = "/v1/me/notifications/stream";

#[tokio::test]
async fn a_stream_opened_after_other_requests_on_a_keep_alive_connection_gets_its_changes() {
    let app = spawn_embedded_with(|_| {}).await;
    let token = app.user("kim");
    let mut raw = Raw::connect(&app).await;
    // Two ordinary requests first, answered on the same connection.
    for _ in 0..2 {
        raw.send(&get(
            "/v1/me/notifications/unread-count",
            &token,
            "HTTP/1.1",
        ))
        .await;
        let head = raw.until("\r\n\r\n").await.expect("an answer");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        raw.until("}").await.expect("its body");
    }
    raw.send(&get(FEED, &token, "HTTP/1.1")).await;
    let head = raw.until("\r\n\r\n").await.expect("the stream's headers");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    raw.until("event: unread_count")
        .await
        .expect("the greeting");
    announce(&app, "kim", "live", "on a reused connection").await;
    let event = raw.until("event: notification").await;
    assert!(
        event.is_some(),
        "the change arrives on the reused connection"
    );
    raw.until("on a reused connection").await.expect("its data");
}

#[tokio::test]
async fn an_http_1_0_stream_is_sent_unframed_and_ends_when_the_server_stops() {
    let app = spawn_embedded_with(|_| {}).await;
    let mut raw = Raw::connect(&app).await;
    raw.send(&get(FEED, &app.user("lee"), "HTTP/1.0")).await;
    let head = raw.until("\r\n\r\n").await.expect("the stream's headers");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    let greeting = raw.until("\n\n").await.unwrap();
    assert_eq!(greeting, "retry: 2000\n\n", "no chunk sizes on HTTP/1.0");
    announce(&app, "lee", "old client", "plain body").await;
    raw.until("event: notification").await.expect("the change");
    raw.until("plain body").await.expect("its data");
    drop(app);
    assert!(raw.closes().await, "the stream outlived the server");
}

#[tokio::test]
async fn a_head_request_for_a_stream_holds_no_stream_open() {
    let app = spawn_embedded_with(|settings| {
        settings.query.sse_max_streams_per_user = 1;
    })
    .await;
    let token = app.user("max");
    for _ in 0..3 {
        let response = app
            .client
            .head(format!("{}{FEED}", app.address))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
    }
    // The one stream max may hold is still free.
    let mut raw = Raw::connect(&app).await;
    raw.send(&get(FEED, &token, "HTTP/1.1")).await;
    let head = raw.until("\r\n\r\n").await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(app.metric("podium_sse_streams_open", &["feed"]).await, 1.0);
}

/// The SSE text of a chunked body: chunk sizes and their line ends removed.
fn dechunk(mut body: &[u8]) -> String {
    let mut text = Vec::new();
    while let Some(end) = find(body, b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&body[..end]).unwrap(), 16).unwrap();
        if size == 0 {
            break;
        }
        let chunk = &body[end + 2..];
        if chunk.len() < size + 2 {
            break;
        }
        text.extend_from_slice(&chunk[..size]);
        body = &chunk[size + 2..];
    }
    String::from_utf8(text).unwrap()
}

#[tokio::test]
async fn a_client_that_stops_reading_is_caught_up_with_every_change_once() {
    // A write queue of one: a client whose socket fills is soon behind.
    let app = spawn_embedded_with(|settings| {
        settings.query.sse_buffer = 1;
    })
    .await;
    let mut raw = Raw::connect_small(&app).await;
    raw.send(&get(FEED, &app.user("ned"), "HTTP/1.1")).await;
    raw.until("\r\n\r\n").await.expect("the stream's headers");
    raw.wait_for("event: unread_count").await;
    // ned stops reading while 600 notifications of 5,000 characters
    // (3 MB) are made: more than the sockets' buffers hold.
    const COUNT: usize = 600;
    let body = "x".repeat(5_000);
    for i in 0..COUNT {
        announce(&app, "ned", &format!("n{i}"), &body).await;
    }
    wait_until(
        Duration::from_secs(60),
        "the writer finds ned behind",
        || async { app.metric("podium_sse_slow_clients_total", &["feed"]).await >= 1.0 },
    )
    .await;
    // Then reads everything: each notification once, the count at the end.
    // Through a 4 KiB window that is several MB (what was queued, then the
    // catch-up), a few KB a round trip: slow when the machine is busy.
    let mut wire = std::mem::take(&mut raw.seen);
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut buf = vec![0u8; 64 * 1024];
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut unread = 0;
    while unread < COUNT as u64 {
        let read = tokio::time::timeout_at(deadline, raw.socket.read(&mut buf))
            .await
            .expect("the stream goes on")
            .unwrap();
        assert!(read > 0, "the stream ended");
        wire.extend_from_slice(&buf[..read]);
        // Complete chunks only: the body ends in "\r\n" after each one.
        let text = dechunk(&wire);
        seen.clear();
        unread = 0;
        for block in text.split("\n\n") {
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|line| line.strip_prefix(name))
                    .map(str::to_string)
            };
            let (Some(event), Some(data)) = (field("event: "), field("data: ")) else {
                continue;
            };
            let data: Value = serde_json::from_str(&data).unwrap();
            match event.as_str() {
                "notification" => {
                    *seen
                        .entry(data["title"].as_str().unwrap().to_string())
                        .or_default() += 1
                }
                "unread_count" => unread = data["unread_count"].as_u64().unwrap(),
                "resync" => panic!("{COUNT} changes fit a catch-up; no reload needed"),
                _ => {}
            }
        }
    }
    assert_eq!(seen.len(), COUNT, "every notification arrives");
    assert!(seen.values().all(|&n| n == 1), "none twice");
    assert!(
        app.metric("podium_sse_catch_ups_total", &["feed", "lagged"])
            .await
            >= 1.0
    );
}
