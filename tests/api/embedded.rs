//! What only the embedded mode does: which settings choose it (and which are
//! refused), the development secret, the start banner, and the event-log
//! file surviving a restart and a crash mid-append. None of these needs
//! Postgres or NATS. (Its behaviour as a whole is the conformance suite's.)

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::time::Duration;

use podium::auth::{JwtKeys, Role};
use podium::config::DEV_JWT_SECRET;
use podium::Settings;
use podium_domain::UserId;
use reqwest::StatusCode;
use serde_json::Value;

use crate::conformance::eventually;
use crate::helpers::{sample_test, spawn_embedded_with};

fn embedded_settings() -> Settings {
    Settings::embedded(SocketAddr::from(([127, 0, 0, 1], 0)))
}

async fn refusal(settings: Settings) -> String {
    match podium::Application::build(settings).await {
        Ok(_) => panic!("the server started"),
        Err(err) => format!("{err:#}"),
    }
}

#[tokio::test]
async fn set_ups_that_cannot_work_are_refused_at_start_with_the_reason() {
    let mut nats_only = embedded_settings();
    nats_only.nats.nats_url = Some("nats://127.0.0.1:4222".into());
    let message = refusal(nats_only).await;
    assert!(
        message.contains("NATS_URL is set but DATABASE_URL is not"),
        "{message}"
    );

    let mut api_only = embedded_settings();
    api_only.workers = false;
    assert!(refusal(api_only).await.contains("PODIUM_WORKERS=false"));

    let mut file_with_postgres = embedded_settings();
    file_with_postgres.database.database_url =
        Some("postgres://127.0.0.1:1/none".to_string().into());
    file_with_postgres.data_file = Some("events.jsonl".into());
    assert!(refusal(file_with_postgres)
        .await
        .contains("PODIUM_DATA_FILE is for the embedded mode only"));

    // With Postgres, no secret means no start (before any connection).
    let mut no_secret = embedded_settings();
    no_secret.database.database_url = Some("postgres://127.0.0.1:1/none".to_string().into());
    no_secret.database.db_acquire_timeout_secs = 1;
    let message = refusal(no_secret).await;
    assert!(
        message.contains("PODIUM_JWT_SECRET is not set"),
        "{message}"
    );
}

#[tokio::test]
async fn the_development_secret_is_refused_where_other_machines_can_reach_it() {
    let anywhere = SocketAddr::from(([0, 0, 0, 0], 0));
    let mut exposed = Settings::embedded(anywhere);
    exposed.auth.jwt_secret = None;
    let message = refusal(exposed.clone()).await;
    assert!(
        message.contains("PODIUM_JWT_SECRET is not set"),
        "{message}"
    );
    assert!(message.contains("PODIUM_EMBEDDED"), "{message}");
    // Asked for explicitly, or with a secret of its own, it starts there.
    let mut asked = exposed.clone();
    asked.embedded = true;
    assert!(podium::Application::build(asked).await.is_ok());
    let mut with_secret = exposed;
    with_secret.auth.jwt_secret = Some(crate::helpers::SECRET.to_string().into());
    assert!(podium::Application::build(with_secret).await.is_ok());
}

#[tokio::test]
async fn without_a_secret_the_embedded_server_takes_tokens_of_the_development_secret() {
    let app = spawn_embedded_with(|s| s.auth.jwt_secret = None).await;
    let dev = JwtKeys::new(DEV_JWT_SECRET).unwrap();
    let admin = dev.issue(
        &UserId::parse("admin".to_string()).unwrap(),
        Role::Admin,
        Duration::from_secs(60),
    );
    let created = app.post("/v1/tests", &admin, Some(sample_test())).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    // A token of another secret is refused.
    let other = app.admin();
    let refused = app.post("/v1/tests", &other, Some(sample_test())).await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_binary_alone_starts_embedded_and_says_so() {
    let mut server = std::process::Command::new(env!("CARGO_BIN_EXE_podium"))
        .env_remove("DATABASE_URL")
        .env_remove("NATS_URL")
        .env_remove("PODIUM_JWT_SECRET")
        .env_remove("PODIUM_DATA_FILE")
        .env("PODIUM_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the podium binary starts");
    let stderr = server.stderr.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let mut banner = String::new();
    let port = loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the server logs its address");
        if let Some(rest) = line.split("address=127.0.0.1:").nth(1) {
            break rest
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>();
        }
        banner.push_str(&line);
        banner.push('\n');
    };
    let result = async {
        assert!(banner.contains("EMBEDDED"), "{banner}");
        assert!(banner.contains("in memory only"), "{banner}");
        assert!(banner.contains(DEV_JWT_SECRET), "{banner}");
        let page = reqwest::get(format!("http://127.0.0.1:{port}/"))
            .await
            .unwrap();
        assert_eq!(page.status(), StatusCode::OK);
        assert!(page.text().await.unwrap().contains("Podium"));
        let ready: Value = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(ready["checks"]["store"], "embedded");
    }
    .await;
    let _ = server.kill();
    let _ = server.wait();
    result
}

#[tokio::test]
async fn the_log_file_survives_a_restart_and_a_line_torn_by_a_crash() {
    let dir = std::env::temp_dir().join(format!("podium-embedded-{}", uuid::Uuid::new_v4()));
    let file = dir.join("events.jsonl");
    let app = spawn_embedded_with(|s| s.data_file = Some(file.clone())).await;
    let test_id = app.published_test().await;
    let alice = app.user("alice");
    let attempt = app.started_attempt(&test_id, &alice).await;
    let submitted = app
        .submit(
            &attempt,
            &alice,
            Some(serde_json::json!({"answers": {"q1": 1, "q2": 0}})),
        )
        .await;
    assert_eq!(submitted.status(), StatusCode::OK);
    drop(app);
    let lines = std::fs::read_to_string(&file).unwrap().lines().count();
    assert!(lines >= 3, "published, started, submitted: {lines} lines");
    // A crash in the middle of an append leaves half a line.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap()
        .write_all(br#"[{"seq":99,"position":99,"aggr"#)
        .unwrap();

    let app = spawn_embedded_with(|s| s.data_file = Some(file.clone())).await;
    let board = format!("/v1/tests/{test_id}/leaderboard");
    let body: Value = eventually("the rebuilt leaderboard", || async {
        let body: Value = app.get(&board, &alice).await.json().await.ok()?;
        (body["total"] == 1).then_some(body)
    })
    .await;
    assert_eq!(body["entries"][0]["user_id"], "alice");
    assert_eq!(body["entries"][0]["score"], 10);
    // The submission is still refused twice; new commands append after.
    assert_eq!(
        app.submit(&attempt, &alice, None).await.status(),
        StatusCode::CONFLICT
    );
    let bob = app.user("bob");
    app.started_attempt(&test_id, &bob).await;
    drop(app);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains("\"aggr\n") && !text.contains("position\":99"));
    for line in text.lines() {
        let commit: Value = serde_json::from_str(line).expect("every line is a commit");
        assert!(commit.as_array().is_some_and(|events| !events.is_empty()));
    }

    // A damaged line in the middle is not a crash: the start is refused.
    assert!(text.lines().count() >= 4);
    let mut damaged = text.lines().map(str::to_string).collect::<Vec<_>>();
    damaged[1] = "not json".into();
    std::fs::write(&file, damaged.join("\n") + "\n").unwrap();
    let mut settings = embedded_settings();
    settings.data_file = Some(file.clone());
    let message = refusal(settings).await;
    assert!(message.contains("line 2 is not an event"), "{message}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_token_command_signs_with_the_development_secret_when_none_is_set() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_podium"))
        .args(["token", "--sub", "alice"])
        .env_remove("PODIUM_JWT_SECRET")
        .output()
        .unwrap();
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("development secret"));
    let token = String::from_utf8(output.stdout).unwrap();
    let principal = JwtKeys::new(DEV_JWT_SECRET)
        .unwrap()
        .verify_header(Some(&format!("Bearer {}", token.trim())));
    assert!(principal.is_ok());
}

#[tokio::test]
async fn an_idempotent_retry_after_a_restart_gets_the_first_answer() {
    let dir = std::env::temp_dir().join(format!("podium-embedded-{}", uuid::Uuid::new_v4()));
    let file = dir.join("events.jsonl");
    let publish = |app: &crate::helpers::TestApp| {
        app.request(reqwest::Method::POST, "/v1/tests", Some(&app.admin()))
            .header("Idempotency-Key", "publish-once")
            .json(&sample_test())
            .send()
    };
    let app = spawn_embedded_with(|s| s.data_file = Some(file.clone())).await;
    let first = publish(&app).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    drop(app);

    let app = spawn_embedded_with(|s| s.data_file = Some(file.clone())).await;
    let retry = publish(&app).await.unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.json::<Value>().await.unwrap(), first);
    // Nothing new was recorded: still one test.
    let admin = app.admin();
    eventually("the catalog", || async {
        let body: Value = app.get("/v1/tests", &admin).await.json().await.ok()?;
        (body["items"].as_array()?.len() == 1).then_some(())
    })
    .await;
    let other = app
        .request(reqwest::Method::POST, "/v1/tests", Some(&admin))
        .header("Idempotency-Key", "publish-once")
        .json(&serde_json::json!({"title": "Another", "questions": sample_test()["questions"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        other.status(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "same key, other body"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tmpfs of `kib` KiB mounted on a fresh directory, unmounted on drop:
/// a disk that fills up.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(kib: u32) -> Self {
        let dir = std::env::temp_dir().join(format!("podium-disk-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(mounted.success(), "mounting a tmpfs needs root");
        Self(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[tokio::test]
async fn a_full_disk_answers_503_and_the_next_start_keeps_every_answered_command() {
    use std::os::unix::fs::PermissionsExt as _;
    let disk = SmallDisk::mount(256);
    let file = disk.0.join("events.jsonl");
    // Most of the disk is taken: the log has a few dozen KiB.
    let filler = disk.0.join("filler");
    std::fs::write(&filler, vec![0u8; 200 * 1024]).unwrap();
    let app = spawn_embedded_with(|s| s.data_file = Some(file.clone())).await;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the log holds answer keys: owner only");
    // Another process cannot take the same file meanwhile.
    let second = podium::log::memory::MemLog::open(&file).await;
    assert!(second.is_err(), "two writers on one file");

    let admin = app.admin();
    let mut answered = 0;
    let refused = loop {
        assert!(answered < 2_000, "the disk never filled");
        let response = app.post("/v1/tests", &admin, Some(sample_test())).await;
        match response.status() {
            StatusCode::CREATED => answered += 1,
            _ => break response,
        }
    };
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["type"], "urn:podium:problem:service-unavailable");
    // Room again: commands go on, after the one that failed.
    std::fs::remove_file(&filler).unwrap();
    for _ in 0..3 {
        let response = app.post("/v1/tests", &admin, Some(sample_test())).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        answered += 1;
    }
    drop(app);

    // Every answered command is there after a restart, and nothing else.
    let app = spawn_embedded_with(|s| s.data_file = Some(file.clone())).await;
    let token = app.user("reader");
    let listed = eventually("the tests read back", || async {
        let body: Value = app.get("/v1/tests", &token).await.json().await.ok()?;
        let count = body["items"].as_array()?.len();
        (count == answered).then_some(count)
    })
    .await;
    assert_eq!(listed, answered);
}

#[tokio::test]
async fn read_all_with_nothing_unread_records_nothing_embedded_too() {
    let dir = std::env::temp_dir().join(format!("podium-embedded-{}", uuid::Uuid::new_v4()));
    let file = dir.join("events.jsonl");
    let app = spawn_embedded_with(|s| s.data_file = Some(file.clone())).await;
    let bob = app.user("bob");
    let read_alls = || {
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("\"event_type\":\"AllNotificationsRead\""))
            .count()
    };
    let unread = |count: u64| {
        let app = &app;
        let bob = bob.clone();
        eventually("the unread count", move || {
            let bob = bob.clone();
            async move {
                let body: Value = app
                    .get("/v1/me/notifications/unread-count", &bob)
                    .await
                    .json()
                    .await
                    .ok()?;
                (body["unread_count"] == count).then_some(())
            }
        })
    };
    let read_all = || app.post("/v1/me/notifications/read-all", &bob, None);
    app.published_test().await;
    unread(0).await;
    assert_eq!(read_all().await.status(), StatusCode::NO_CONTENT);
    assert_eq!(read_alls(), 0, "nothing was unread");
    let sent = app
        .post(
            "/v1/notifications",
            &app.admin(),
            Some(serde_json::json!({"user_ids": ["bob"], "title": "Exam", "body": "Monday"})),
        )
        .await;
    assert_eq!(sent.status(), StatusCode::ACCEPTED);
    unread(1).await;
    assert_eq!(read_all().await.status(), StatusCode::NO_CONTENT);
    assert_eq!(read_alls(), 1);
    unread(0).await;
    assert_eq!(read_all().await.status(), StatusCode::NO_CONTENT);
    assert_eq!(read_alls(), 1, "nothing unread again");
    drop(app);
    let _ = std::fs::remove_dir_all(dir);
}
