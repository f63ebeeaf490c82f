//! A small Server-Sent Events client for tests: reads a streaming response
//! and parses its events as a browser's EventSource would.

use std::time::Duration;

use reqwest::{Response, StatusCode};
use serde_json::Value;
use tokio::time::Instant;

use crate::helpers::TestApp;

/// One dispatched event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: String,
    pub event: String,
    pub data: Value,
}

pub struct SseClient {
    response: Response,
    buffer: String,
    /// The last event id seen, as EventSource keeps it (id-only blocks too).
    pub last_event_id: Option<String>,
    /// Comment lines seen (heartbeats).
    pub comments: usize,
}

impl SseClient {
    /// Opens `path` as `token`, resuming after `last_event_id` if given.
    pub async fn open(app: &TestApp, path: &str, token: &str, last_event_id: Option<&str>) -> Self {
        let mut request = app
            .client
            .get(format!("{}{path}", app.address))
            .bearer_auth(token)
            .timeout(Duration::from_secs(3600));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.expect("the stream opens");
        assert_eq!(response.status(), StatusCode::OK, "the stream is refused");
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Self {
            response,
            buffer: String::new(),
            last_event_id: last_event_id.map(str::to_string),
            comments: 0,
        }
    }

    /// The next dispatched event, or `None` if none arrives within `timeout`
    /// or the stream ends.
    pub async fn next(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(event) = self.parse(&block) {
                    return Some(event);
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .ok()?
                .expect("the stream reads")?;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The next event named `name`, skipping others.
    pub async fn next_named(&mut self, name: &str, timeout: Duration) -> Option<SseEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self.next(left).await?;
            if event.event == name {
                return Some(event);
            }
        }
    }

    fn parse(&mut self, block: &str) -> Option<SseEvent> {
        let (mut event, mut data, mut id) = (String::from("message"), String::new(), None);
        for line in block.lines() {
            if line.starts_with(':') {
                self.comments += 1;
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event = value.to_string(),
                "data" => {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(value);
                }
                "id" => id = Some(value.to_string()),
                _ => {}
            }
        }
        if let Some(id) = id {
            self.last_event_id = Some(id);
        }
        if data.is_empty() {
            return None;
        }
        Some(SseEvent {
            id: self.last_event_id.clone().unwrap_or_default(),
            event,
            data: serde_json::from_str(&data).expect("event data is JSON"),
        })
    }
}

impl SseClient {
    /// Reads until `n` comment lines (heartbeats) have been seen; false if
    /// `timeout` passes first.
    pub async fn until_comments(&mut self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.comments < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // Events are skipped; only the comments count here.
            let _ = self.next(left.min(Duration::from_millis(200))).await;
        }
        true
    }
}

impl SseClient {
    /// Whether the server ends the stream within `timeout`.
    pub async fn ends_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Err(_) => return false,
                Ok(Ok(None)) | Ok(Err(_)) => return true,
                Ok(Ok(Some(_))) => continue,
            }
        }
    }
}
