//! NATS helpers: an isolated subject prefix per test, and a private
//! nats-server for tests that stop and restart it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use podium_nats::{EventBus, Subjects};
use uuid::Uuid;

pub fn nats_url() -> String {
    std::env::var("PODIUM_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("t{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// A bus on its own prefix with its streams created; the streams are
/// deleted when the value is dropped.
pub struct TestBus {
    pub bus: EventBus,
    url: String,
}

impl TestBus {
    pub async fn new() -> Self {
        Self::on(&nats_url()).await
    }

    pub async fn on(url: &str) -> Self {
        let bus = EventBus::connect(url, &unique_prefix())
            .await
            .expect("NATS must be reachable at PODIUM_TEST_NATS_URL (see README.md)");
        bus.ensure_streams(&Default::default())
            .await
            .expect("streams");
        Self {
            bus,
            url: url.to_string(),
        }
    }

    /// Messages stored in the events stream.
    pub async fn stream_messages(&self) -> u64 {
        let mut stream = self
            .bus
            .jetstream()
            .get_stream(self.bus.subjects().events_stream())
            .await
            .unwrap();
        stream.info().await.unwrap().state.messages
    }

    pub async fn dead_letters(&self) -> u64 {
        let mut stream = self
            .bus
            .jetstream()
            .get_stream(self.bus.subjects().dead_letter_stream())
            .await
            .unwrap();
        stream.info().await.unwrap().state.messages
    }
}

impl Drop for TestBus {
    fn drop(&mut self) {
        delete_streams(self.url.clone(), self.bus.subjects().prefix().to_string());
    }
}

/// Deletes the streams of `prefix` (off the caller's runtime).
pub fn delete_streams(url: String, prefix: String) {
    crate::helpers::run_blocking(async move {
        let Ok(subjects) = Subjects::new(&prefix) else {
            return;
        };
        if let Ok(client) = async_nats::connect(url).await {
            let js = async_nats::jetstream::new(client);
            let _ = js.delete_stream(subjects.events_stream()).await;
            let _ = js.delete_stream(subjects.dead_letter_stream()).await;
        }
    });
}

/// A nats-server of the test's own, on a free port, with its own store.
pub struct PrivateNats {
    pub port: u16,
    store: PathBuf,
    child: Option<Child>,
}

impl PrivateNats {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = std::env::temp_dir().join(format!("podium-nats-{}", Uuid::new_v4().simple()));
        let mut nats = Self {
            port,
            store,
            child: None,
        };
        nats.restart();
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn binary() -> String {
        std::env::var("PODIUM_TEST_NATS_SERVER").unwrap_or_else(|_| {
            [
                "/usr/sbin/nats-server",
                "/usr/bin/nats-server",
                "/usr/local/bin/nats-server",
            ]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("nats-server")
            .to_string()
        })
    }

    /// Starts the server (again, with the same store) and waits until it listens.
    pub fn restart(&mut self) {
        let child = Command::new(Self::binary())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server (set PODIUM_TEST_NATS_SERVER to its path)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// Polls `check` until it returns true or `timeout` passes; panics with
/// `what` on timeout.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    crate::helpers::poll(what, timeout, || {
        let checked = check();
        async move { checked.await.then_some(()).ok_or("not yet") }
    })
    .await
}
