//! Webhooks as the Standard Webhooks specification has them: `webhook-id`
//! (the same on every retry), `webhook-timestamp` (Unix seconds) and
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`
//! keyed with the decoded part of the endpoint's secret after `whsec_`.

use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{Claimed, Outcome};

/// Posts the webhooks of one instance.
pub struct Poster {
    client: reqwest::Client,
}

/// The signature header's value for `body` sent as message `id` at
/// `timestamp`, or why the secret cannot sign.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Result<String, String> {
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|err| format!("the endpoint's secret is not base64: {err}"))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key)
        .map_err(|err| format!("the endpoint's secret cannot key HMAC: {err}"))?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    ))
}

impl Poster {
    /// Receivers get `timeout` to answer.
    pub fn new(timeout: Duration) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            // A receiver's redirect is not an answer: it is retried.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("Podium-Webhooks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { client })
    }

    /// One try of a webhook delivery.
    pub async fn send(&self, delivery: &Claimed) -> Outcome {
        let Some(endpoint) = &delivery.endpoint else {
            return Outcome::Permanent {
                status_code: None,
                error: "the endpoint was deleted".into(),
            };
        };
        if !endpoint.active() {
            return Outcome::Permanent {
                status_code: None,
                error: "the endpoint is disabled".into(),
            };
        }
        let body = match serde_json::to_vec(&delivery.payload) {
            Ok(body) => body,
            Err(err) => {
                return Outcome::Permanent {
                    status_code: None,
                    error: err.to_string(),
                }
            }
        };
        let timestamp = chrono::Utc::now().timestamp();
        let signature = match sign(&endpoint.secret, &delivery.message_id, timestamp, &body) {
            Ok(signature) => signature,
            Err(error) => {
                return Outcome::Permanent {
                    status_code: None,
                    error,
                }
            }
        };
        let answer = self
            .client
            .post(&endpoint.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &delivery.message_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        match answer {
            Ok(response) => {
                let status = response.status();
                let code = Some(status.as_u16());
                if status.is_success() {
                    Outcome::Delivered { status_code: code }
                } else if status == reqwest::StatusCode::GONE {
                    Outcome::Gone
                } else {
                    Outcome::Temporary {
                        status_code: code,
                        error: format!("the receiver answered {status}"),
                    }
                }
            }
            Err(err) if err.is_timeout() => Outcome::Temporary {
                status_code: None,
                error: "the receiver did not answer in time".into(),
            },
            Err(err) => Outcome::Temporary {
                status_code: None,
                error: format!("cannot reach the receiver: {err}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification's reference
    /// libraries: the same secret, id, timestamp and body give this
    /// signature.
    #[test]
    fn signs_as_the_specification_example_does() {
        let signature = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn a_secret_that_is_not_base64_cannot_sign() {
        assert!(sign("whsec_%%%", "msg_1", 1, b"{}").is_err());
    }
}
