//! A private Postgres server for tests that stop it (the shared one serves
//! every other test at the same moment). See `../shared/FAULTS.md`.

use std::path::PathBuf;
use std::process::Command;

/// A Postgres cluster of the test's own on a free port, removed on drop.
pub struct PrivatePostgres {
    dir: PathBuf,
    pub port: u16,
}

const BIN: &str = "/usr/lib/postgresql/15/bin";

/// Runs a Postgres binary as the `postgres` user (initdb refuses root).
fn as_postgres(binary: &str, args: &[&str]) -> std::process::Output {
    let output = Command::new("runuser")
        .args(["-u", "postgres", "--", &format!("{BIN}/{binary}")])
        .args(args)
        .output()
        .expect("runuser runs");
    assert!(
        output.status.success(),
        "{binary} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A fresh temporary directory the `postgres` user owns.
fn postgres_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("podium-pg-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let chown = Command::new("chown")
        .args(["postgres", dir.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(chown.success());
    dir
}

impl PrivatePostgres {
    pub fn start() -> Self {
        let dir = postgres_dir();
        let port = free_port();
        let data = dir.join("data");
        as_postgres(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        );
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\nmax_connections = 60\nfsync = off\n",
            dir.display()
        );
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut file, conf.as_bytes()).unwrap();
        // Streaming replicas may connect (`replica`).
        let mut hba = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("pg_hba.conf"))
            .unwrap();
        std::io::Write::write_all(&mut hba, b"host replication all 127.0.0.1/32 trust\n").unwrap();
        let postgres = Self { dir, port };
        postgres.start_server();
        postgres
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn start_server(&self) {
        let log = self.dir.join("server.log").display().to_string();
        as_postgres("pg_ctl", &["-D", &self.data(), "-l", &log, "-w", "start"]);
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (fast shutdown: sessions are ended).
    pub fn stop(&self) {
        as_postgres("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    pub fn restart(&self) {
        self.start_server();
    }

    /// A hot standby of this server fed by streaming replication
    /// (`pg_basebackup -R`), on a port and in a directory of its own.
    pub fn replica(&self) -> PrivatePostgres {
        let replica = Self {
            dir: postgres_dir(),
            port: free_port(),
        };
        as_postgres(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-D",
                &replica.data(),
                "-R",
                "-X",
                "stream",
            ],
        );
        let conf = format!(
            "port = {}\nunix_socket_directories = '{}'\n",
            replica.port,
            replica.dir.display()
        );
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(replica.dir.join("data").join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut file, conf.as_bytes()).unwrap();
        replica.start_server();
        replica
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{BIN}/pg_ctl")])
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Text with COPY's special characters goes through the fold's COPY writer
/// unchanged, and NULLs stay NULL.
#[tokio::test]
async fn the_copy_writer_escapes_what_copy_would_misread() {
    let db = crate::helpers::TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query("CREATE TABLE copied (n int, t text)")
        .execute(&mut *conn)
        .await
        .unwrap();
    let texts = [
        Some("tab\there"),
        Some("line\nbreak\r\n"),
        Some("back\\slash \\N"),
        None,
        Some(""),
    ];
    let mut rows =
        podium_projections::fold::CopyWriter::start(&mut conn, "COPY copied (n, t) FROM STDIN")
            .await
            .unwrap();
    for (n, text) in texts.iter().enumerate() {
        rows.field(n).optional(*text);
        rows.end_row().await.unwrap();
    }
    assert_eq!(rows.finish().await.unwrap(), texts.len() as u64);
    let back: Vec<Option<String>> = sqlx::query_scalar("SELECT t FROM copied ORDER BY n")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    let expected: Vec<Option<String>> = texts.iter().map(|t| t.map(String::from)).collect();
    assert_eq!(back, expected);
}
