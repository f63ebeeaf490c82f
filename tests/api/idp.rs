//! Tokens from an identity provider: a real JWKS server on 127.0.0.1 (axum,
//! in the test), keys from `tests/fixtures/jwks/`, and the embedded server
//! (authentication is the same in every mode).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::helpers::{poll, sample_test, spawn_embedded_with, TestApp};

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwks")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// The fixture's public key `kid` as a JWK.
fn jwk(kid: &str) -> Value {
    let set: Value = serde_json::from_slice(&fixture("jwks.json")).unwrap();
    set["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid)
        .cloned()
        .unwrap()
}

/// A JWKS server (and an OIDC discovery document) whose keys, and whether
/// it answers at all, the test changes.
#[derive(Clone)]
struct Provider {
    keys: Arc<Mutex<Vec<Value>>>,
    up: Arc<AtomicBool>,
    fetches: Arc<AtomicU64>,
    base: String,
}

impl Provider {
    async fn start(kids: &[&str]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let provider = Self {
            keys: Arc::new(Mutex::new(kids.iter().map(|k| jwk(k)).collect())),
            up: Arc::new(AtomicBool::new(true)),
            fetches: Arc::default(),
            base: format!("http://{addr}"),
        };
        async fn jwks(State(p): State<Provider>) -> impl IntoResponse {
            p.fetches.fetch_add(1, Ordering::SeqCst);
            if !p.up.load(Ordering::SeqCst) {
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
            let keys = p.keys.lock().unwrap().clone();
            Json(json!({ "keys": keys })).into_response()
        }
        async fn discovery(State(p): State<Provider>) -> impl IntoResponse {
            Json(json!({"issuer": p.base, "jwks_uri": format!("{}/jwks.json", p.base)}))
        }
        let app = Router::new()
            .route("/jwks.json", get(jwks))
            .route("/.well-known/openid-configuration", get(discovery))
            .with_state(provider.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        provider
    }

    fn jwks_url(&self) -> String {
        format!("{}/jwks.json", self.base)
    }

    fn publish(&self, kid: &str) {
        self.keys.lock().unwrap().push(jwk(kid));
    }

    fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::SeqCst)
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims of a provider's token for `sub`, valid for an hour.
fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now() + 3600, "iat": now(), "iss": "https://idp.test", "aud": "podium"})
}

/// A token signed with fixture key `kid` (its algorithm from the name).
fn sign(kid: &str, claims: &Value) -> String {
    let (algorithm, key) = match &kid[..2] {
        "rs" => (
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(&fixture(&format!("{kid}.pem"))).unwrap(),
        ),
        "ec" => (
            Algorithm::ES256,
            EncodingKey::from_ec_pem(&fixture(&format!("{kid}.pem"))).unwrap(),
        ),
        _ => (
            Algorithm::EdDSA,
            EncodingKey::from_ed_pem(&fixture(&format!("{kid}.pem"))).unwrap(),
        ),
    };
    let mut header = Header::new(algorithm);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

/// The embedded server taking `provider`'s tokens.
async fn serve(provider: &Provider, configure: impl FnOnce(&mut podium::Settings)) -> TestApp {
    let url = provider.jwks_url();
    spawn_embedded_with(|settings| {
        settings.idp.jwks_url = Some(url);
        settings.idp.jwt_issuer = Some("https://idp.test".into());
        settings.idp.jwt_audience = Some("podium".into());
        configure(settings);
    })
    .await
}

/// The status of a user read with `token`.
async fn status(app: &TestApp, token: &str) -> StatusCode {
    app.get("/v1/me/notifications/unread-count", token)
        .await
        .status()
}

#[tokio::test]
async fn each_algorithm_verifies_and_the_role_claim_makes_admins() {
    let provider = Provider::start(&["rsa-1", "ec-1", "ed-1"]).await;
    let app = serve(&provider, |s| {
        s.idp.jwt_role_claim = "realm_access.roles".into()
    })
    .await;
    for kid in ["rsa-1", "ec-1", "ed-1"] {
        let token = sign(kid, &claims(&format!("learner-{kid}")));
        assert_eq!(status(&app, &token).await, StatusCode::OK, "{kid}");
    }
    // Who the token says, with the role its claim gives.
    let mut admin = claims("operator");
    admin["realm_access"] = json!({"roles": ["viewer", "admin"]});
    let published = app
        .post("/v1/tests", &sign("ec-1", &admin), Some(sample_test()))
        .await;
    assert_eq!(published.status(), StatusCode::CREATED);
    let learner = app
        .post(
            "/v1/tests",
            &sign("ed-1", &claims("learner")),
            Some(sample_test()),
        )
        .await;
    assert_eq!(learner.status(), StatusCode::FORBIDDEN);
    // Tokens from `podium token` keep working beside them.
    assert_eq!(status(&app, &app.user("local")).await, StatusCode::OK);
    // Streams take them in `?access_token=` too.
    let token = sign("rsa-1", &claims("streamer"));
    let stream = app
        .client
        .get(format!(
            "{}/v1/me/notifications/stream?access_token={token}",
            app.address
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
}

#[tokio::test]
async fn tokens_that_claim_too_much_are_refused() {
    let provider = Provider::start(&["rsa-1", "ec-1"]).await;
    let app = serve(&provider, |_| {}).await;
    let with = |key: &str, value: Value| {
        let mut c = claims("learner");
        c[key] = value;
        c
    };
    let without = |key: &str| {
        let mut c = claims("learner");
        c.as_object_mut().unwrap().remove(key);
        c
    };
    // The RSA public key (PEM), as a confused verifier would use it as an
    // HS256 secret.
    let public_pem = fixture("rsa-1.pub.pem");
    let mut hs256 = Header::new(Algorithm::HS256);
    hs256.kid = Some("rsa-1".into());
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"rsa-1","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims("learner").to_string())
    );
    let mut mismatched = Header::new(Algorithm::RS256);
    mismatched.kid = Some("ec-1".into());
    let cases = [
        (
            "wrong iss",
            sign("rsa-1", &with("iss", json!("https://other.test"))),
        ),
        (
            "wrong aud",
            sign("rsa-1", &with("aud", json!("another-api"))),
        ),
        ("no iss", sign("rsa-1", &without("iss"))),
        ("no exp", sign("rsa-1", &without("exp"))),
        ("expired", sign("rsa-1", &with("exp", json!(now() - 120)))),
        (
            "nbf in the future",
            sign("rsa-1", &with("nbf", json!(now() + 600))),
        ),
        ("alg none", unsigned),
        (
            "HS256 signed with the public key",
            jsonwebtoken::encode(
                &hs256,
                &claims("learner"),
                &EncodingKey::from_secret(&public_pem),
            )
            .unwrap(),
        ),
        (
            "an RSA signature under the EC key's kid",
            jsonwebtoken::encode(
                &mismatched,
                &claims("learner"),
                &EncodingKey::from_rsa_pem(&fixture("rsa-1.pem")).unwrap(),
            )
            .unwrap(),
        ),
        ("a kid nobody lists", sign("rsa-2", &claims("learner"))),
    ];
    for (case, token) in cases {
        let response = app.get("/v1/me/notifications/unread-count", &token).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{case}");
        let problem: Value = response.json().await.unwrap();
        assert!(problem["detail"].is_string(), "{case}: {problem}");
    }
    // The same claims, rightly signed, pass.
    assert_eq!(
        status(&app, &sign("rsa-1", &claims("learner"))).await,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_new_key_is_fetched_once_and_the_last_keys_outlive_an_outage() {
    let provider = Provider::start(&["rsa-1"]).await;
    let min_refetch = Duration::from_millis(1_500);
    let app = serve(&provider, |s| {
        s.idp.jwks_min_refetch_ms = min_refetch.as_millis() as u64;
    })
    .await;
    assert_eq!(provider.fetches(), 1, "fetched at start");
    // The provider rotates to a new key: a token signed with it verifies
    // once Podium has fetched the set again (at most one fetch per interval).
    provider.publish("rsa-2");
    let rotated = sign("rsa-2", &claims("learner"));
    poll("the new key to verify", Duration::from_secs(30), || async {
        match status(&app, &rotated).await {
            StatusCode::OK => Ok(()),
            other => Err(other),
        }
    })
    .await;
    // A flood of unknown kids fetches at most once per interval.
    let before = provider.fetches();
    let started = Instant::now();
    let unknown = {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("made-up".into());
        jsonwebtoken::encode(
            &header,
            &claims("learner"),
            &EncodingKey::from_rsa_pem(&fixture("rsa-1.pem")).unwrap(),
        )
        .unwrap()
    };
    for _ in 0..50 {
        assert_eq!(status(&app, &unknown).await, StatusCode::UNAUTHORIZED);
    }
    let intervals = started.elapsed().as_millis() / min_refetch.as_millis() + 1;
    let made = provider.fetches() - before;
    assert!(
        u128::from(made) <= intervals,
        "{made} fetches in {:?}",
        started.elapsed()
    );
    // The provider goes down: known keys still verify, unknown ones do not,
    // even after a fetch was tried (and failed).
    provider.up.store(false, Ordering::SeqCst);
    let tried = provider.fetches();
    poll("a failed fetch", Duration::from_secs(30), || async {
        assert_eq!(status(&app, &unknown).await, StatusCode::UNAUTHORIZED);
        if provider.fetches() > tried {
            Ok(())
        } else {
            Err(provider.fetches())
        }
    })
    .await;
    assert_eq!(status(&app, &rotated).await, StatusCode::OK);
    assert_eq!(
        status(&app, &sign("rsa-1", &claims("l"))).await,
        StatusCode::OK
    );
}

#[tokio::test]
async fn an_oidc_issuer_names_the_keys_and_the_issuer_tokens_must_carry() {
    let provider = Provider::start(&["ed-1"]).await;
    let issuer = provider.base.clone();
    let app = spawn_embedded_with(|settings| {
        settings.idp.oidc_issuer = Some(issuer.clone());
    })
    .await;
    let mut from_it = claims("learner");
    from_it["iss"] = json!(provider.base);
    assert_eq!(status(&app, &sign("ed-1", &from_it)).await, StatusCode::OK);
    // Another issuer's token, though signed with the same key, is not.
    assert_eq!(
        status(&app, &sign("ed-1", &claims("learner"))).await,
        StatusCode::UNAUTHORIZED
    );
}
