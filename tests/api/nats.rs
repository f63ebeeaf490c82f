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

/// A private three-node JetStream cluster on 127.0.0.1 (`nats-server`
/// processes, `../shared/FAULTS.md`), for the tests that kill a node. The
/// nodes and their storage go when it is dropped.
pub struct NatsCluster {
    dir: std::path::PathBuf,
    nodes: Vec<Option<crate::helpers::Killed>>,
    ports: Vec<u16>,
}

impl NatsCluster {
    /// Starts three nodes and waits until JetStream has a metadata leader.
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("podium-nats-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let ports: Vec<u16> = (0..3).map(|_| crate::postgres::free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| crate::postgres::free_port()).collect();
        let route_list = routes
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        for n in 0..3 {
            let config = dir.join(format!("n{n}.conf"));
            std::fs::write(
                &config,
                format!(
                    "server_name: n{n}\nlisten: 127.0.0.1:{}\n\
                     jetstream {{ store_dir: \"{}\" }}\n\
                     cluster {{\n  name: podium\n  listen: 127.0.0.1:{}\n  routes: [{route_list}]\n}}\n",
                    ports[n],
                    dir.join(format!("js{n}")).display(),
                    routes[n]
                ),
            )
            .unwrap();
            let child = std::process::Command::new("nats-server")
                .arg("-c")
                .arg(&config)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("nats-server starts");
            nodes.push(Some(crate::helpers::Killed(child)));
        }
        let cluster = Self { dir, nodes, ports };
        // Ready once a replicated stream can be made (and removed again).
        let url = cluster.url();
        crate::helpers::poll("the JetStream cluster", Duration::from_secs(60), || {
            let url = url.clone();
            async move {
                let servers: Vec<&str> = url.split(',').collect();
                let client = async_nats::connect(servers)
                    .await
                    .map_err(|e| e.to_string())?;
                let js = async_nats::jetstream::new(client);
                let config = async_nats::jetstream::stream::Config {
                    name: "ready".into(),
                    subjects: vec!["ready.>".into()],
                    num_replicas: 3,
                    ..Default::default()
                };
                js.create_stream(config).await.map_err(|e| e.to_string())?;
                js.delete_stream("ready").await.map_err(|e| e.to_string())?;
                Ok::<_, String>(())
            }
        })
        .await;
        cluster
    }

    /// Every node's URL, comma-separated, as `NATS_URL` takes them.
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// kill -9 of node `n`.
    pub fn kill(&mut self, n: usize) {
        if let Some(mut node) = self.nodes[n].take() {
            let _ = node.0.kill();
            let _ = node.0.wait();
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
