//! Demo data through the public API (`podium seed`): a few tests with
//! questions, a collection of them, a few hundred learners, thousands of attempts with a plausible
//! spread of scores, and announcements — every one a real request to a
//! running server, so it works against any deployment and sets off the
//! notification policy, leaderboards and streams like real traffic.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use podium_domain::UserId;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::auth::{JwtKeys, Role};

/// How much to create.
#[derive(Debug, Clone, Copy)]
pub struct DemoSize {
    pub learners: usize,
    pub attempts: usize,
}

/// What was created, and tokens to look at it.
pub struct Seeded {
    pub tests: Vec<String>,
    /// A collection of all the tests: its board sums each learner's bests.
    pub collection: String,
    pub admin_token: String,
    pub learner: String,
    pub learner_token: String,
}

/// A question: prompt, choices, the right choice.
type Question = (&'static str, &'static [&'static str], usize);

/// Topics of the demo tests: a title and four questions each.
const CATALOG: [(&str, [Question; 4]); 3] = [
    (
        "World capitals",
        [
            ("Capital of Canada?", &["Toronto", "Ottawa", "Vancouver"], 1),
            (
                "Capital of Australia?",
                &["Sydney", "Melbourne", "Canberra"],
                2,
            ),
            ("Capital of Kenya?", &["Nairobi", "Mombasa"], 0),
            ("Capital of Peru?", &["Cusco", "Lima", "Arequipa"], 1),
        ],
    ),
    (
        "Algebra basics",
        [
            ("2x + 3 = 11, x = ?", &["3", "4", "5"], 1),
            ("(a + b)² = ?", &["a² + b²", "a² + 2ab + b²"], 1),
            ("x² = 49, x > 0, x = ?", &["7", "-7", "49"], 0),
            ("3(x − 2) = 9, x = ?", &["3", "5", "1"], 1),
        ],
    ),
    (
        "Biology 101",
        [
            (
                "Powerhouse of the cell?",
                &["Nucleus", "Mitochondrion", "Ribosome"],
                1,
            ),
            ("DNA bases number…", &["2", "4", "20"], 1),
            (
                "Plants make sugar by…",
                &["Photosynthesis", "Respiration"],
                0,
            ),
            ("Red blood cells carry…", &["Oxygen", "Insulin", "Bile"], 0),
        ],
    ),
];

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    /// Sends a request, waiting out rate limits (`Retry-After`); returns the
    /// JSON answer of a success.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        loop {
            let mut request = self
                .http
                .request(method.clone(), format!("{}{path}", self.base))
                .bearer_auth(token);
            if let Some(body) = &body {
                request = request.json(body);
            }
            let response = request
                .send()
                .await
                .with_context(|| format!("cannot reach {}", self.base))?;
            let status = response.status();
            if status == StatusCode::TOO_MANY_REQUESTS {
                let wait = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(1u64);
                tracing::info!(wait, "rate limited; waiting (run the server with PODIUM_RATE_LIMITS=off for a fast seed)");
                tokio::time::sleep(Duration::from_secs(wait.clamp(1, 60))).await;
                continue;
            }
            let answer: Value = response.json().await.unwrap_or(Value::Null);
            anyhow::ensure!(
                status.is_success(),
                "{method} {path} answered {status}: {answer}"
            );
            return Ok(answer);
        }
    }
}

/// A small deterministic pseudo-random sequence: the same demo every time.
fn mix(n: u64) -> u64 {
    let mut x = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Seeds the server at `base_url`, signing tokens with `keys`.
pub async fn seed(base_url: &str, keys: &JwtKeys, size: DemoSize) -> anyhow::Result<Seeded> {
    let client = Arc::new(Client {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?,
        base: base_url.trim_end_matches('/').to_string(),
    });
    let token = |user: &str, role| -> anyhow::Result<String> {
        Ok(keys.issue(
            &UserId::parse(user)?,
            role,
            Duration::from_secs(7 * 24 * 3600),
        ))
    };
    let admin = token("demo-admin", Role::Admin)?;
    let mut tests = Vec::new();
    let mut keys_of = Vec::new();
    for (title, questions) in CATALOG {
        let body = json!({
            "title": title,
            "time_limit_secs": 900,
            "questions": questions.iter().enumerate().map(|(i, (prompt, choices, answer))| json!({
                "id": format!("q{}", i + 1), "prompt": prompt, "choices": choices, "answer": answer, "points": i + 1,
            })).collect::<Vec<_>>(),
        });
        let published = client
            .send(reqwest::Method::POST, "/v1/tests", &admin, Some(body))
            .await?;
        tests.push(published["id"].as_str().unwrap_or_default().to_string());
        keys_of.push(questions.map(|(_, choices, answer)| (choices.len(), answer)));
    }
    let created = client
        .send(
            reqwest::Method::POST,
            "/v1/collections",
            &admin,
            Some(json!({"title": "All three tests", "test_ids": tests})),
        )
        .await?;
    let collection = created["id"].as_str().unwrap_or_default().to_string();
    let learners: Vec<(String, String)> = (1..=size.learners.max(1))
        .map(|n| {
            let user = format!("learner-{n:03}");
            token(&user, Role::User).map(|t| (user, t))
        })
        .collect::<anyhow::Result<_>>()?;
    let learners = Arc::new(learners);
    let plan = Arc::new((tests.clone(), keys_of));
    let workers = 8.min(size.attempts.max(1));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (client, learners, plan) = (client.clone(), learners.clone(), plan.clone());
        let attempts = size.attempts;
        tasks.push(tokio::spawn(async move {
            for n in (w..attempts).step_by(workers) {
                let r = mix(n as u64);
                let (user, token) = &learners[(r % learners.len() as u64) as usize];
                let t = ((r >> 16) % plan.0.len() as u64) as usize;
                // Each learner has a skill: the chance to get a question right.
                let name = user
                    .bytes()
                    .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
                let skill = 35 + mix(name) % 60;
                let answers: serde_json::Map<String, Value> = plan.1[t]
                    .iter()
                    .enumerate()
                    .map(|(q, (choices, right))| {
                        let roll = mix(r ^ (q as u64 + 1)) % 100;
                        let choice = if roll < skill {
                            *right
                        } else {
                            (right + 1) % choices
                        };
                        (format!("q{}", q + 1), json!(choice))
                    })
                    .collect();
                let started = client
                    .send(
                        reqwest::Method::POST,
                        &format!("/v1/tests/{}/attempts", plan.0[t]),
                        token,
                        None,
                    )
                    .await?;
                let attempt = started["attempt_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                client
                    .send(
                        reqwest::Method::POST,
                        &format!("/v1/attempts/{attempt}/submit"),
                        token,
                        Some(json!({ "answers": answers })),
                    )
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    for chunk in learners.chunks(1_000) {
        let user_ids: Vec<&str> = chunk.iter().map(|(user, _)| user.as_str()).collect();
        for (title, body) in [
            (
                "Welcome to Podium",
                "Pick a test, beat your best, watch the leaderboard move.",
            ),
            (
                "New tests are up",
                "World capitals, Algebra basics and Biology 101 are open.",
            ),
        ] {
            client
                .send(
                    reqwest::Method::POST,
                    "/v1/notifications",
                    &admin,
                    Some(json!({"user_ids": user_ids, "title": title, "body": body})),
                )
                .await?;
        }
    }
    let (learner, learner_token) = learners[0].clone();
    Ok(Seeded {
        tests,
        collection,
        admin_token: admin,
        learner,
        learner_token,
    })
}
